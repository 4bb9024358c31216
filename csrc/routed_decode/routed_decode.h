// Routed decoding: one new query token per batch row attends over that row's KV cache, and
// only in the rows the router sent to attention. Interface between the launcher
// (routed_decode_api.cpp) and the kernels; nothing here depends on torch.
//
// For every row b with routed[b] and n = min(max(seqlens[b], 0), S) > 0, every head h:
//   out[b, h] = softmax(scale * q[b, h] . k[b, j, h / G]) @ v[b, j, h / G] over j < n,
//   lse[b, h] = log of the sum of exp(scale * q . k) over the same keys,
// with G = H / Hk query heads per key/value head; other rows get out = 0 and lse = -inf and
// read nothing but routed[b] and seqlens[b].
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/element_type.h"

namespace cram {

struct RoutedDecodeParams {
  int64_t batch, num_heads, num_kv_heads, head_dim, cache_len;  // B, H, Hk, D, S (the buffers' length)
  ElementType dtype;  // of q, k_cache, v_cache and out
  double softmax_scale;
  // Strides in elements; the head dim is contiguous (stride 1) in every tensor.
  const void* q;  // (B, H, D)
  int64_t q_batch_stride, q_head_stride;
  const void* k;  // (B, S, Hk, D)
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  const void* v;  // (B, S, Hk, D)
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  const int32_t* seqlens;  // (B,) keys valid per row; clamped to [0, S]
  const bool* routed;      // (B,)
  void* out;               // (B, H, D) contiguous, out
  void* lse;               // (B, H) contiguous, float32 (float64 for float64 inputs on the CPU), out
  // CUDA only: the split over the cache (FlashDecoding) and its scratch.
  int num_sms;
  int num_splits, split_len;  // set by routed_decode_plan
  void* workspace;            // routed_decode_workspace_bytes(*this) bytes
};

void routed_decode_cpu(const RoutedDecodeParams& p);

#ifdef CRAM_WITH_CUDA
// Chooses num_splits and split_len from the shapes alone (no host sync: capturable in a CUDA
// graph) and returns the scratch the kernels need for them.
size_t routed_decode_plan(RoutedDecodeParams& p);
void routed_decode_cuda(const RoutedDecodeParams& p, void* stream);
#endif

}  // namespace cram
