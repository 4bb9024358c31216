// How the CUDA kernels of the metaplastic scan split the (d_v x d_k) state of one batch row
// and head over threads, shared by the forward, backward and decoding kernels.
//
// A thread owns kCols consecutive key columns of one value row. The state never leaves its
// registers: the updates are elementwise, and the read-out divides entry by entry, so no
// product form exists (docs/metaplastic.md §3). The threads of one row ("row group",
// kThreadsPerRow consecutive lanes) cover d_k; a block holds kRows rows of one (batch, head):
// block x is row slice x % row_blocks of (batch, head) x / row_blocks (one grid dimension:
// B * H may pass the 65535 of the others).
//   - Sums over key columns (the read-out o_i, dv_i, db_i) are shuffles inside a row group.
//   - Sums over value rows (dq_j, dk_j) cross row groups, warps and blocks.
// The time loop is sequential in every block: B * H * ceil(d_v / kRows) blocks make the
// parallelism, which is enough for the shapes of a model layer (hundreds of blocks).
//
// The block shape is a template (BlockShape): the kernels are bound by the instructions they
// issue (docs/metaplastic.md §6), and with the shape known at compile time the index
// arithmetic of every tile and sum folds into constants and their loops unroll.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "metaplastic_scan/metaplastic_scan.h"

namespace cram {
namespace metaplastic {

constexpr int kCols = 4;  // key columns per thread: one float4 of q or k from shared memory

template <int kThreadsPerRow_, int kThreads_>
struct BlockShape {
  static constexpr int kThreadsPerRow = kThreadsPerRow_;  // a power of two, kThreadsPerRow * kCols >= d_k
  static constexpr int kThreads = kThreads_;
  static constexpr int kRows = kThreads / kThreadsPerRow;  // value rows per block
  static constexpr int kKeyPad = kThreadsPerRow * kCols;   // the padded d_k of the shared-memory tiles
  static constexpr int kWarps = kThreads / 32;
  static_assert(kThreadsPerRow >= 1 && kThreadsPerRow <= 32 && (kThreadsPerRow & (kThreadsPerRow - 1)) == 0);
  static_assert(kThreads % 32 == 0);
};

inline int64_t row_blocks_for(int64_t value_dim, int rows) { return (value_dim + rows - 1) / rows; }

// Calls fn(std::integral_constant<int, n>{}) with n the threads per row that cover d_k
// (<= kMetaplasticCudaMaxHeadDim): 8, 16 or 32. Narrower rows (d_k <= 16) would waste fewer
// lanes, but such heads are too small to matter for speed and each width is a compiled kernel more.
template <typename Fn>
void dispatch_threads_per_row(int64_t key_dim, Fn&& fn) {
  static_assert(32 * kCols >= kMetaplasticCudaMaxHeadDim, "the widest row covers every d_k the launcher lets through");
  if (key_dim < 1 || key_dim > kMetaplasticCudaMaxHeadDim) {
    throw std::invalid_argument("metaplastic_scan CUDA kernels: d_k must be in [1, " +
                                std::to_string(kMetaplasticCudaMaxHeadDim) + "], got " + std::to_string(key_dim));
  }
  if (key_dim <= 8 * kCols) {
    fn(std::integral_constant<int, 8>{});
  } else if (key_dim <= 16 * kCols) {
    fn(std::integral_constant<int, 16>{});
  } else {
    fn(std::integral_constant<int, 32>{});
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __half2float(x);
  } else {
    return __bfloat162float(x);
  }
}

template <typename T>
__device__ __forceinline__ T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __half>) {
    return __float2half_rn(x);
  } else {
    return __float2bfloat16_rn(x);
  }
}

// Sum over the kThreadsPerRow lanes of a row group (consecutive lanes; every lane gets it).
template <int kThreadsPerRow>
__device__ __forceinline__ float row_group_sum(float x) {
#pragma unroll
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Where this block and thread sit: the (batch, head), the block's first value row, the
// thread's value row (may be >= d_v in the last row block: such a thread computes on zeros
// and writes nothing), its first key column, its lane in the row group.
struct Position {
  int64_t batch_head;
  int row0, local_row, row, col0, lane_in_row;
  bool row_valid;
};

template <class S>
__device__ __forceinline__ Position thread_position(int64_t row_blocks, int64_t value_dim) {
  Position p;
  p.batch_head = blockIdx.x / row_blocks;
  p.row0 = static_cast<int>(blockIdx.x - p.batch_head * row_blocks) * S::kRows;
  p.lane_in_row = threadIdx.x % S::kThreadsPerRow;
  p.local_row = threadIdx.x / S::kThreadsPerRow;
  p.row = p.row0 + p.local_row;
  p.col0 = p.lane_in_row * kCols;
  p.row_valid = p.row < value_dim;
  return p;
}

// A tile of kTokens tokens of one (batch, head) of a (B, T, H, D) tensor, kWidth columns of D
// from a first one (0, or a block's first value row), staged as a float tile [kTokens][kWidth]
// of shared memory (zeros past D and past the end of the sequence). issue() starts the loads into
// registers, store() converts and writes them: the loads of every tile issued between the
// two are in flight together, and a kernel that issues the next tile before computing on
// the current one hides their latency.
//
// Thread x loads tile element x + i * kThreads. kThreads is a multiple of kWidth, so that is
// always column x % kWidth, at tokens x / kWidth + i * kTokenStep: one address and one
// column test a thread, then a fixed stride, rather than a division and a 64-bit product per
// element (those were a third of the forward's instructions).
template <typename T, int kTokens, int kWidth, int kThreads>
struct TileLoad {
  static_assert(kThreads % kWidth == 0, "a thread keeps one column");
  static constexpr int kTokenStep = kThreads / kWidth;
  static constexpr int kCount = kTokens * kWidth;  // less than kThreads: the threads past it idle
  static constexpr int kPer = (kTokens + kTokenStep - 1) / kTokenStep;
  T raw[kPer];

  // first: the tile's first token at its first column; tokens: how many of the kTokens exist;
  // width: how many of the kWidth columns exist (D - the first column).
  __device__ __forceinline__ void issue(const T* first, int64_t token_stride, int tokens, int width) {
    const int col = threadIdx.x % kWidth, token = threadIdx.x / kWidth;
    const T* p = first + token * token_stride + col;
    const int64_t step = kTokenStep * token_stride;
    const int tokens_left = col < width ? tokens - token : 0;
#pragma unroll
    for (int i = 0; i < kPer; ++i, p += step) raw[i] = i * kTokenStep < tokens_left ? *p : from_float<T>(0.f);
  }

  // squares: a second tile for the squares of the values (k * k: once per token and column
  // here rather than once per state entry in the time loop), or nullptr.
  __device__ __forceinline__ void store(float* tile, float mul, float* squares = nullptr) const {
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = threadIdx.x + i * kThreads;
      if (kCount < kThreads && idx >= kCount) break;
      const float x = mul * to_float(raw[i]);
      tile[idx] = x;
      if (squares) squares[idx] = x * x;
    }
  }
};

}  // namespace metaplastic
}  // namespace cram
