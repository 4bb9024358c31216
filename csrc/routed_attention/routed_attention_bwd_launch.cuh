// Host-side launch of the routed-attention backward for one (head dim, element type);
// included by the per-instantiation .cu files only.
#pragma once

#include <algorithm>
#include <climits>
#include <stdexcept>

#include "routed_attention/routed_attention_bwd_dkdv_kernel_sm90.cuh"
#include "routed_attention/routed_attention_bwd_kernel.cuh"
#include "routed_attention/routed_attention_launch.h"

namespace cram {
namespace ra {

// The dK/dV kernel of Traits over every key tile of every (batch, kv head): the one that also
// sums dQ (fused) or the one that leaves dQ to the dQ kernel.
template <class Traits, class Kernel>
void launch_dkdv(const RoutedAttentionParams& p, Kernel fused, Kernel plain, cudaStream_t stream) {
  const int64_t grid = static_cast<int64_t>(p.batch) * p.num_kv_heads * ceil_div(p.seqlen_k, Traits::kBlockN);
  if (grid > INT_MAX) throw std::runtime_error("routed_attention_backward: too many key tiles for one launch");
  if (grid == 0) return;
  const Kernel kernel = p.fused_dq ? fused : plain;
  const int bytes = p.fused_dq ? Traits::kSmemBytesFusedDq : Traits::kSmemBytes;
  set_max_dynamic_smem(kernel, bytes);
  kernel<<<static_cast<unsigned>(grid), Traits::kNThreads, bytes, stream>>>(p);
  CRAM_CUDA_CHECK(cudaGetLastError());
}

// The dK/dV kernel of this head dim: sm_90a (p.bwd_sm90) or SM80.
template <int kHeadDim, class Element>
void run_dkdv(const RoutedAttentionParams& p, cudaStream_t stream) {
  if constexpr (routed_attention_bwd_sm90_head_dim(kHeadDim)) {
    if (p.bwd_sm90) {
      using Config = DkvConfigSm90<kHeadDim>;
      using Traits = DkvTraitsSm90<kHeadDim, Config::kBlockM, Config::kBlockN, Element>;
      launch_dkdv<Traits>(p, routed_attention_bwd_dkdv_kernel_sm90<Traits, true>,
                          routed_attention_bwd_dkdv_kernel_sm90<Traits, false>, stream);
      return;
    }
  }
  if (p.bwd_sm90) throw std::logic_error("routed_attention_backward: no sm_90a backward for this head dim");
  using Config = DkvConfig<kHeadDim>;
  using Traits = DkvTraits<kHeadDim, Config::kBlockM, Config::kBlockN, Config::kNWarps, Config::kAtomMSdP,
                           Config::kAtomNdKV, Element>;
  launch_dkdv<Traits>(p, routed_attention_bwd_dkdv_kernel<Traits, true>, routed_attention_bwd_dkdv_kernel<Traits, false>,
                      stream);
}

template <int kHeadDim, class Element>
void run_routed_attention_bwd(const RoutedAttentionParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
  const int64_t key_tiles_total = static_cast<int64_t>(p.batch) * p.num_kv_heads;
  if (rows == 0 && (key_tiles_total == 0 || p.seqlen_k == 0)) return;

  // 1. delta = rowsum(dO * O) and lse * log2(e), compacted by slot; zeros in the rows of
  // grad_q not routed.
  if (rows > 0) {
    if (!is_contiguous_bthd(p, kHeadDim, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride)) {
      throw std::invalid_argument("routed_attention_backward: grad_q must be a contiguous (B, T, H, D) tensor");
    }
    constexpr int kRowsPerBlock = 256 / (kHeadDim / 8);
    const int64_t row_blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
    const int64_t fill_blocks = std::min<int64_t>(fill_units(p), 4 * p.num_sms);
    if (row_blocks + fill_blocks > INT_MAX) {
      throw std::runtime_error("routed_attention_backward: too many rows for one launch");
    }
    routed_attention_bwd_preprocess_kernel<kHeadDim, Element>
        <<<static_cast<unsigned>(row_blocks + fill_blocks), 256, 0, stream>>>(p, static_cast<int>(row_blocks));
    CRAM_CUDA_CHECK(cudaGetLastError());
  }

  // 2. dK, dV: every key tile of every (batch, kv head), zeros where no query sees it.
  run_dkdv<kHeadDim, Element>(p, stream);
  if (p.fused_dq) {
    if (rows > 0) {
      const int64_t blocks = (rows * (kHeadDim / 4) + 255) / 256;
      if (blocks > INT_MAX) throw std::runtime_error("routed_attention_backward: too many rows for one launch");
      routed_attention_bwd_convert_dq_kernel<kHeadDim, Element><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(p);
      CRAM_CUDA_CHECK(cudaGetLastError());
    }
    return;
  }

  // 3. dQ: routed query tiles (grid sized for the maximum; absent tiles exit at once).
  if (rows > 0) {
    using C = DqConfig<kHeadDim>;
    using Traits = DqTraits<kHeadDim, C::kBlockM, C::kBlockN, C::kNWarps, Element>;
    const int64_t grid = static_cast<int64_t>(p.batch) * p.num_heads * ceil_div(p.seqlen_q, Traits::kBlockM);
    if (grid > INT_MAX) throw std::runtime_error("routed_attention_backward: too many query tiles for one launch");
    auto kernel = routed_attention_bwd_dq_kernel<Traits>;
    set_max_dynamic_smem(kernel, Traits::kSmemBytes);
    kernel<<<static_cast<unsigned>(grid), Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
    CRAM_CUDA_CHECK(cudaGetLastError());
  }
}

}  // namespace ra
}  // namespace cram
