// Host-side launch of the routed-attention forward for one (head dim, element type);
// included by the per-instantiation .cu files only.
#pragma once

#include <climits>

#include "routed_attention/routed_attention_fwd_kernel.cuh"
#include "routed_attention/routed_attention_launch.h"

namespace cram {
namespace ra {

template <int kHeadDim, class Element>
void run_routed_attention_fwd(const RoutedAttentionParams& p, cudaStream_t stream) {
  using Config = FwdConfig<kHeadDim>;
  using Traits = FwdTraits<kHeadDim, Config::kBlockM, Config::kBlockN, Config::kNWarps, Element>;
  const FwdPlanSizes sizes = fwd_plan_sizes(p, Traits::kBlockM, Traits::kBlockN);
  if (sizes.max_items == 0) return;
  if (sizes.max_items > INT_MAX) throw std::runtime_error("routed_attention: too many query tiles for one launch");

  routed_attention_fwd_plan_kernel<Traits::kBlockM, Traits::kBlockN><<<1, kPlanThreads, 0, stream>>>(p, sizes);
  CRAM_CUDA_CHECK(cudaGetLastError());
  auto kernel = routed_attention_fwd_kernel<Traits>;
  set_max_dynamic_smem(kernel, Traits::kSmemBytes);
  kernel<<<static_cast<unsigned>(sizes.max_items), Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, sizes);
  CRAM_CUDA_CHECK(cudaGetLastError());
  if (sizes.max_split_tiles > 0) {
    routed_attention_fwd_combine_kernel<kHeadDim, Traits::kBlockM, Element>
        <<<sizes.max_split_tiles, Traits::kBlockM, 0, stream>>>(p, sizes);
    CRAM_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace ra
}  // namespace cram
