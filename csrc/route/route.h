// Router decision: prob = sigmoid(hidden . weight + bias), mask = prob > threshold | force,
// and per batch row the routed positions compacted in increasing order into index
// (T in the unused tail) with their number in counts. Interface between the launcher
// (route_api.cpp) and the kernels; nothing here depends on torch.
//
// prob and the gradients of weight/bias have the accumulation type (float32, or
// float64 for float64 hidden). The forward's weight and bias come in weight_dtype /
// bias_dtype: the accumulation type for the CPU kernels; float32 or hidden's type for
// the CUDA kernels, which convert while they read. The backward's weight has the
// accumulation type (the launcher converts).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/element_type.h"

namespace cram {

struct RouteParams {
  int64_t batch, seqlen, channels;
  ElementType dtype;  // of hidden
  ElementType weight_dtype, bias_dtype;
  double threshold;
  const void* hidden;   // (B, T, C)
  const void* weight;   // (C,)
  const void* bias;     // scalar, read on the device (no host sync)
  const bool* force;    // (B, T) or nullptr
  void* prob;           // (B, T) out
  bool* mask;           // (B, T) out
  int32_t* index;       // (B, T) out
  int32_t* counts;      // (B,) out
  int num_sms;          // CUDA only: multiprocessors of the device (sizes the grid)
  void* workspace;      // CUDA only: route_fwd_workspace_bytes(*this) bytes of scratch, or nullptr if 0
};

// grad_logit = grad_prob * prob * (1 - prob); grad_hidden = grad_logit weight,
// grad_weight = sum over (b, t) of grad_logit hidden, grad_bias = sum of grad_logit.
struct RouteBwdParams {
  int64_t batch, seqlen, channels;
  ElementType dtype;  // of hidden
  const void* grad_prob;  // (B, T)
  const void* prob;       // (B, T)
  const void* hidden;     // (B, T, C)
  const void* weight;     // (C,)
  void* grad_hidden;      // (B, T, C) out
  void* grad_weight;      // (C,) out
  void* grad_bias;        // scalar out
  int num_sms;            // CUDA only: multiprocessors of the device (sizes the grid and the workspace)
  void* workspace;        // CUDA only: route_bwd_workspace_bytes(*this) bytes of scratch, or nullptr if 0
};

void route_fwd_cpu(const RouteParams& p);
void route_bwd_cpu(const RouteBwdParams& p);

#ifdef CRAM_WITH_CUDA
// Scratch the CUDA kernels need (per-tile routed counts forward, per-block partial
// sums of grad_weight / grad_bias backward); call with every other field set. Any
// allocation will do: the kernels write every byte they later read.
size_t route_fwd_workspace_bytes(const RouteParams& p);
size_t route_bwd_workspace_bytes(const RouteBwdParams& p);
void route_fwd_cuda(const RouteParams& p, void* stream);
void route_bwd_cuda(const RouteBwdParams& p, void* stream);
#endif

}  // namespace cram
