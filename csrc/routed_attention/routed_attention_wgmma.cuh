// Warpgroup MMA (wgmma) helpers of the sm_90a kernels.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "routed_attention/routed_attention_utils.cuh"

namespace cram {
namespace ra {

// Issues acc (+)= A B over the K mode as one batch of warpgroup MMAs, not waited for: the
// caller waits (warpgroup_wait) and then fences acc (warpgroup_fence_operand) before reading
// it. A is in registers (kRegisterA) or in shared memory (descriptors).
template <bool kZeroInit, bool kRegisterA, class TiledMma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void warpgroup_gemm_issue(TiledMma& mma, FragA& a, const FragB& b, Acc& acc) {
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (kZeroInit) mma.accumulate_ = GMMA::ScaleOut::Zero;
#pragma unroll
  for (int k = 0; k < decltype(size<2>(a))::value; ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
}

}  // namespace ra
}  // namespace cram
