// Host-side launch of the routed-attention backward for one (head dim, element type);
// included by the per-instantiation .cu files only.
#pragma once

#include <algorithm>
#include <climits>
#include <stdexcept>

#include "routed_attention/routed_attention_bwd_kernel.cuh"
#include "routed_attention/routed_attention_launch.h"

namespace cram {
namespace ra {

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
  {
    using C = DkvConfig<kHeadDim>;
    using Traits = DkvTraits<kHeadDim, C::kBlockM, C::kBlockN, C::kNWarps, C::kAtomMSdP, C::kAtomNdKV, Element>;
    const int64_t grid = key_tiles_total * ceil_div(p.seqlen_k, Traits::kBlockN);
    if (grid > INT_MAX) throw std::runtime_error("routed_attention_backward: too many key tiles for one launch");
    if (grid > 0) {
      if (p.fused_dq) {
        auto kernel = routed_attention_bwd_dkdv_kernel<Traits, true>;
        constexpr int kBytes = Traits::kSmemBytesFusedDq;
        set_max_dynamic_smem(kernel, kBytes);
        kernel<<<static_cast<unsigned>(grid), Traits::kNThreads, kBytes, stream>>>(p);
      } else {
        auto kernel = routed_attention_bwd_dkdv_kernel<Traits, false>;
        set_max_dynamic_smem(kernel, Traits::kSmemBytes);
        kernel<<<static_cast<unsigned>(grid), Traits::kNThreads, Traits::kSmemBytes, stream>>>(p);
      }
      CRAM_CUDA_CHECK(cudaGetLastError());
    }
  }
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
