// Block-wide prefix sum, shared by the router's compaction and the attention tile
// scheduler. Free of torch.
#pragma once

#include <cuda_runtime.h>

namespace cram {

// Inclusive prefix sum of v over the block in thread order; total gets the block's
// sum. scratch: kThreads / 32 values in shared memory. Barriers on both sides of the
// scratch use make back-to-back calls (and other users of scratch) safe.
template <int kThreads, typename V>
__device__ __forceinline__ V block_inclusive_sum(V v, V& total, V* scratch) {
  static_assert(kThreads % 32 == 0, "whole warps");
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int d = 1; d < 32; d *= 2) {
    const V n = __shfl_up_sync(0xffffffffu, v, d);
    if (lane >= d) v += n;
  }
  __syncthreads();
  if (lane == 31) scratch[warp] = v;
  __syncthreads();
  V before = 0;
  total = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const V s = scratch[w];
    if (w < warp) before += s;
    total += s;
  }
  __syncthreads();
  return v + before;
}

}  // namespace cram
