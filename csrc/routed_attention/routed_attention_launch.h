// Declarations of the per-(head dim, element type) launchers, defined in the
// routed_attention_{fwd,bwd}_hdim*_*.cu instantiation files and dispatched from
// routed_attention_cuda.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "routed_attention/routed_attention_params.h"

namespace cram {
namespace ra {

// Whether a (B, T, H, D) tensor of these strides is contiguous, as out and grad_q must be:
// the kernels that fill their rows not routed address them as one flat buffer.
inline bool is_contiguous_bthd(const RoutedAttentionParams& p, int head_dim, int64_t batch_stride,
                               int64_t row_stride, int64_t head_stride) {
  return head_stride == head_dim && row_stride == int64_t{p.num_heads} * head_dim &&
         batch_stride == int64_t{p.seqlen_q} * p.num_heads * head_dim;
}

template <int kHeadDim, class Element>
void run_routed_attention_fwd(const RoutedAttentionParams& p, cudaStream_t stream);

template <int kHeadDim, class Element>
void run_routed_attention_bwd(const RoutedAttentionParams& p, cudaStream_t stream);

}  // namespace ra
}  // namespace cram
