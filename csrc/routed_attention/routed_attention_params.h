// Torch-free interface between the routed-attention launcher (routed_attention_api.cpp)
// and the CUDA kernels (routed_attention_*.cu). Semantics: docs/design.md §2.
//
// Layouts: q, out, grad_out, grad_q are (B, T, H, D); k, v, grad_k, grad_v are
// (B, S, Hk, D); every one of them has a unit stride along D, 16-byte aligned rows
// (base pointer 16-byte aligned, batch/seq/head strides multiples of 8 elements), and
// the element type `dtype`. lse is (B, H, T) float32 contiguous; index is (B, T) int32
// contiguous; counts is (B,) int32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/element_type.h"

namespace cram {

struct RoutedAttentionParams {
  // Sizes. T: query positions, S >= T: keys (bottom-right causal alignment, shift S - T).
  int batch = 0, seqlen_q = 0, seqlen_k = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  ElementType dtype = ElementType::kBFloat16;

  // Strides in elements (batch, sequence, head); the head-dim stride is 1.
  int64_t q_batch_stride = 0, q_row_stride = 0, q_head_stride = 0;
  int64_t k_batch_stride = 0, k_row_stride = 0, k_head_stride = 0;
  int64_t v_batch_stride = 0, v_row_stride = 0, v_head_stride = 0;
  int64_t out_batch_stride = 0, out_row_stride = 0, out_head_stride = 0;

  // Routing: index[b, :counts[b]] are the routed positions of row b (increasing);
  // slots past counts[b] are ignored. Bad entries (t outside [0, T), counts outside
  // [0, T]) are skipped or clamped: never an out-of-bounds access.
  const int32_t* index = nullptr;  // (B, T)
  const int32_t* counts = nullptr;  // (B,)

  // Forward. out is contiguous; the CUDA forward writes all of out and lse (0 and -inf
  // at rows not routed, in the plan's prologue kernel).
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  void* out = nullptr;
  float* lse = nullptr;  // (B, H, T); read by the backward

  float softmax_scale = 0.f;
  float scale_log2 = 0.f;  // softmax_scale * log2(e)

  // Backward. grad_q is contiguous; every row of grad_q (zeros where not routed),
  // grad_k and grad_v is written.
  const void* grad_out = nullptr;
  void* grad_q = nullptr;
  void* grad_k = nullptr;
  void* grad_v = nullptr;
  int64_t do_batch_stride = 0, do_row_stride = 0, do_head_stride = 0;
  int64_t dq_batch_stride = 0, dq_row_stride = 0, dq_head_stride = 0;
  int64_t dk_batch_stride = 0, dk_row_stride = 0, dk_head_stride = 0;
  int64_t dv_batch_stride = 0, dv_row_stride = 0, dv_head_stride = 0;
  // true: dQ is summed inside the dK/dV kernel by sm_90 bulk reductions into a float
  // workspace (faster; the order of the additions, so dQ's last bits, varies run to run).
  // false: a separate dQ kernel writes each dQ row from one CTA (bitwise reproducible). The
  // launcher sets it from the user's `deterministic` and routed_attention_fused_dq_supported().
  bool fused_dq = false;

  // Scratch memory of the size that *_workspace_bytes returned for these params, 256-byte
  // aligned; its content on entry does not matter.
  void* workspace = nullptr;

  int num_sms = 132;  // multiprocessors of the device (sizes the forward's work plan)
  // true: the forward runs the sm_90a kernel (warpgroup MMAs), false: the SM80 one. The
  // launcher sets it from routed_attention_sm90_supported(), the head dim
  // (routed_attention_fwd_sm90_head_dim) and the environment switch
  // CRAM_ROUTED_ATTENTION_SM80=1; the workspace size depends on it.
  bool fwd_sm90 = false;
  // true: the backward's dK/dV kernel (and the fused dQ) runs on warpgroup MMAs (sm_90a),
  // false: the SM80 one. Set like fwd_sm90 (routed_attention_bwd_sm90_head_dim).
  bool bwd_sm90 = false;
};

#ifdef CRAM_WITH_CUDA
// Bytes of workspace the forward needs: a function of the shapes and num_sms only, never
// of counts/index, so it can be allocated without a host sync.
size_t routed_attention_fwd_workspace_bytes(const RoutedAttentionParams& p);
void routed_attention_fwd_cuda(const RoutedAttentionParams& p, void* stream);

// Bytes of workspace the backward needs (same rules). May be 0.
size_t routed_attention_bwd_workspace_bytes(const RoutedAttentionParams& p);
void routed_attention_bwd_cuda(const RoutedAttentionParams& p, void* stream);
// Whether the code this build runs on the current device has sm_90's bulk reductions, which
// the fused dQ (fused_dq = true) needs: false on Ampere, and on Hopper running a
// compute_80 PTX build.
bool routed_attention_fused_dq_supported();
// Whether the sm_90a kernels can run on the current device: a Hopper GPU (compute capability
// 9.0) and a build with sm_90a code (TORCH_CUDA_ARCH_LIST with "9.0a").
bool routed_attention_sm90_supported();
#endif

// Head dims the sm_90a forward serves. At 64 its first version (two warpgroups, one CTA a
// multiprocessor) measured slower than the SM80 kernel on an H100 (1.34 against 1.00 ms at
// B=4 H=32 T=4096, density 1), so D = 64 keeps the SM80 kernel on Hopper.
constexpr bool routed_attention_fwd_sm90_head_dim(int head_dim) { return head_dim == 128; }
// Head dims the sm_90a dK/dV kernel serves (not yet measured at 64).
constexpr bool routed_attention_bwd_sm90_head_dim(int head_dim) { return head_dim == 128; }

}  // namespace cram
