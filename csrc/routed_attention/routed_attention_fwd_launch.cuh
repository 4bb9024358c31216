// Host-side launch of the routed-attention forward for one (head dim, element type), on the
// SM80 kernel or the sm_90a one (p.fwd_sm90); included by the per-instantiation .cu files only.
#pragma once

#include <algorithm>
#include <climits>

#include "routed_attention/routed_attention_fwd_kernel.cuh"
#include "routed_attention/routed_attention_fwd_kernel_sm90.cuh"
#include "routed_attention/routed_attention_launch.h"

namespace cram {
namespace ra {

// The plan's prologue, the forward kernel of Traits (launch_kernel(items, sizes) launches it
// on that many CTAs), and the combine of split tiles.
template <class Traits, class LaunchKernel>
void launch_routed_attention_fwd(const RoutedAttentionParams& p, LaunchKernel&& launch_kernel, cudaStream_t stream) {
  using Element = typename Traits::Element;
  constexpr int kHeadDim = Traits::kHeadDim;
  const FwdPlanSizes sizes = fwd_plan_sizes(p, Traits::kBlockM, Traits::kBlockN);
  if (sizes.max_items == 0) return;
  if (!is_contiguous_bthd(p, kHeadDim, p.out_batch_stride, p.out_row_stride, p.out_head_stride)) {
    throw std::invalid_argument("routed_attention: out must be a contiguous (B, T, H, D) tensor");
  }
  if (sizes.max_items > INT_MAX) throw std::runtime_error("routed_attention: too many query tiles for one launch");

  // Block 0 plans, the others fill the rows not routed.
  const int row_bytes = p.num_heads * kHeadDim * static_cast<int>(sizeof(Element));
  const int64_t fill_blocks = std::max<int64_t>(1, std::min<int64_t>(fill_units(p), 2 * p.num_sms));
  routed_attention_fwd_prologue_kernel<Traits::kBlockM, Traits::kBlockN>
      <<<static_cast<unsigned>(1 + fill_blocks), kPlanThreads, 0, stream>>>(p, sizes, row_bytes);
  CRAM_CUDA_CHECK(cudaGetLastError());
  launch_kernel(static_cast<unsigned>(sizes.max_items), sizes);
  CRAM_CUDA_CHECK(cudaGetLastError());
  if (sizes.max_split_tiles > 0) {
    routed_attention_fwd_combine_kernel<kHeadDim, Traits::kBlockM, Element>
        <<<sizes.max_split_tiles * combine_ctas_per_tile<Traits::kBlockM>(), kCombineThreads, 0, stream>>>(p, sizes);
    CRAM_CUDA_CHECK(cudaGetLastError());
  }
}

template <int kHeadDim, class Element>
void run_routed_attention_fwd(const RoutedAttentionParams& p, cudaStream_t stream) {
  if constexpr (routed_attention_fwd_sm90_head_dim(kHeadDim)) {
    if (p.fwd_sm90) {
      using Config = FwdConfigSm90<kHeadDim>;
      using Traits = FwdTraitsSm90<kHeadDim, Config::kBlockM, Config::kBlockN, Element>;
      launch_routed_attention_fwd<Traits>(
          p,
          [&](unsigned items, const FwdPlanSizes& sizes) {
            const KvTensorMaps maps = make_kv_tensor_maps<Element, Traits::kBlockN>(p);
            const auto kernel = routed_attention_fwd_kernel_sm90<Traits>;
            set_max_dynamic_smem(kernel, Traits::kSmemBytes);
            kernel<<<items, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, sizes, maps);
          },
          stream);
      return;
    }
  }
  if (p.fwd_sm90) throw std::logic_error("routed_attention: no sm_90a forward for this head dim");
  using Config = FwdConfig<kHeadDim>;
  using Traits = FwdTraits<kHeadDim, Config::kBlockM, Config::kBlockN, Config::kNWarps, Element>;
  launch_routed_attention_fwd<Traits>(
      p,
      [&](unsigned items, const FwdPlanSizes& sizes) {
        const auto kernel = routed_attention_fwd_kernel<Traits>;
        set_max_dynamic_smem(kernel, Traits::kSmemBytes);
        kernel<<<items, Traits::kNThreads, Traits::kSmemBytes, stream>>>(p, sizes);
      },
      stream);
}

}  // namespace ra
}  // namespace cram
