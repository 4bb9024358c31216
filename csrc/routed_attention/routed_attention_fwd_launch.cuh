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
  const int capacity = fwd_split_capacity(p, Traits::kBlockN);
  const int64_t max_tiles =
      static_cast<int64_t>(p.batch) * p.num_heads * ceil_div(p.seqlen_q, Traits::kBlockM);
  const int64_t grid = max_tiles > capacity ? max_tiles : capacity;
  if (max_tiles == 0) return;
  if (grid > INT_MAX) throw std::runtime_error("routed_attention: too many query tiles for one launch");

  auto kernel = routed_attention_fwd_kernel<Traits>;
  set_max_dynamic_smem(kernel, Traits::kSmemBytes);
  kernel<<<static_cast<unsigned>(grid), Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, capacity);
  CRAM_CUDA_CHECK(cudaGetLastError());
  if (capacity > 0) {
    // In split mode there are at most capacity / 2 tiles (at least two splits each).
    const int combine_grid = capacity / 2 > 0 ? capacity / 2 : 1;
    routed_attention_fwd_combine_kernel<kHeadDim, Traits::kBlockM, Traits::kBlockN, Element>
        <<<combine_grid, Traits::kBlockM, 0, stream>>>(p, capacity);
    CRAM_CUDA_CHECK(cudaGetLastError());
  }
}

template <int kHeadDim>
size_t routed_attention_fwd_workspace_bytes_for(const RoutedAttentionParams& p) {
  using Config = FwdConfig<kHeadDim>;
  return FwdWorkspace::bytes(fwd_split_capacity(p, Config::kBlockN), Config::kBlockM, kHeadDim);
}

}  // namespace ra
}  // namespace cram
