// Declarations of the per-(head dim, element type) launchers, defined in the
// routed_attention_{fwd,bwd}_hdim*_*.cu instantiation files and dispatched from
// routed_attention_cuda.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "routed_attention/routed_attention_params.h"

namespace cram {
namespace ra {

template <int kHeadDim, class Element>
void run_routed_attention_fwd(const RoutedAttentionParams& p, cudaStream_t stream);

template <int kHeadDim, class Element>
void run_routed_attention_bwd(const RoutedAttentionParams& p, cudaStream_t stream);

}  // namespace ra
}  // namespace cram
