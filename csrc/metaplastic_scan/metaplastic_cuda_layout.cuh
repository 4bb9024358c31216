// How the CUDA kernels of the metaplastic scan split the (d_v x d_k) state of one batch row
// and head over threads, shared by the forward, backward and decoding kernels.
//
// A thread owns kCols consecutive key columns of one value row. The state never leaves its
// registers: the updates are elementwise, and the read-out divides entry by entry, so no
// product form exists (docs/metaplastic.md §3). The threads of one row ("row group",
// threads_per_row consecutive lanes, a power of two) cover d_k; a block holds `rows` rows
// of one (batch, head): block x is row slice x % row_blocks of (batch, head) x / row_blocks
// (one grid dimension: B * H may pass the 65535 of the others).
//   - Sums over key columns (the read-out o_i, dv_i, db_i) are shuffles inside a row group.
//   - Sums over value rows (dq_j, dk_j) cross row groups, warps and blocks.
// The time loop is sequential in every block: B * H * ceil(d_v / rows) blocks make the
// parallelism, which is enough for the shapes of a model layer (hundreds of blocks).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace cram {
namespace metaplastic {

constexpr int kCols = 4;           // key columns per thread: one float4 of q or k from shared memory
constexpr int kMaxHeadDim = 128;
constexpr int kMaxThreads = 256;

struct Layout {
  int threads_per_row;  // power of two, threads_per_row * kCols >= d_k
  int rows;             // value rows per block
  int row_blocks;       // ceil(d_v / rows)
  int threads;          // rows * threads_per_row, a multiple of 32
  int key_pad;          // threads_per_row * kCols: the padded d_k of the shared-memory tiles
};

inline Layout make_layout(int64_t key_dim, int64_t value_dim, int max_threads = kMaxThreads) {
  Layout l{};
  const int need = static_cast<int>((key_dim + kCols - 1) / kCols);
  l.threads_per_row = 1;
  while (l.threads_per_row < need) l.threads_per_row *= 2;
  // As many rows as the block holds, but no more than d_v (rounded up to fill whole warps).
  const int warp_rows = std::max(1, 32 / l.threads_per_row);
  const int rows_for_dv = static_cast<int>((value_dim + warp_rows - 1) / warp_rows) * warp_rows;
  l.rows = std::min(max_threads / l.threads_per_row, rows_for_dv);
  l.row_blocks = static_cast<int>((value_dim + l.rows - 1) / l.rows);
  l.threads = l.rows * l.threads_per_row;
  l.key_pad = l.threads_per_row * kCols;
  return l;
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

// Sum over the threads_per_row lanes of a row group (consecutive lanes; every lane gets it).
__device__ __forceinline__ float row_group_sum(float x, int threads_per_row) {
  for (int offset = threads_per_row / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

__device__ __forceinline__ int row_block(const Layout& l) { return static_cast<int>(blockIdx.x % l.row_blocks); }
__device__ __forceinline__ int64_t batch_head(const Layout& l) { return blockIdx.x / l.row_blocks; }

// Where this thread sits: its value row (may be >= d_v in the last row block: such a thread
// computes on zeros and writes nothing), its first key column, its lane in the row group.
struct Position {
  int row, col0, lane_in_row;
  bool row_valid;
};

__device__ __forceinline__ Position thread_position(const Layout& l, int64_t value_dim) {
  Position p;
  p.lane_in_row = threadIdx.x % l.threads_per_row;
  const int local_row = threadIdx.x / l.threads_per_row;
  p.row = row_block(l) * l.rows + local_row;
  p.col0 = p.lane_in_row * kCols;
  p.row_valid = p.row < value_dim;
  return p;
}

// A tile of a (B, T, H, D) tensor for one (b, h): `tokens` tokens from token t0 on, columns
// [col_begin, col_begin + pad) (zeros past D or T), bound for a float tile [tile_tokens][pad] of
// shared memory. issue() starts the thread's first kPer loads into registers, store() converts
// and writes them (and loads the rest, if any, one by one): the loads of every tile issued
// between the two are in flight together, and a kernel that issues the next tile before
// computing on the current one hides their latency entirely.
template <typename T, int kPer>
struct TileLoad {
  T raw[kPer];
  const T* src;
  int64_t t0, seqlen, token_stride, dim;
  int tokens, col_begin, pad;

  __device__ __forceinline__ bool at(int tt, int c, int64_t& offset) const {
    const int64_t t = t0 + tt, col = col_begin + c;
    offset = t * token_stride + col;
    return tt < tokens && t < seqlen && col < dim;
  }

  __device__ __forceinline__ bool at(int idx, int64_t& offset) const {
    const int tt = idx / pad;
    return at(tt, idx - tt * pad, offset);
  }

  __device__ __forceinline__ void issue(const T* src_, int64_t t0_, int tokens_, int64_t seqlen_,
                                        int64_t token_stride_, int64_t dim_, int col_begin_, int pad_) {
    src = src_, t0 = t0_, seqlen = seqlen_, token_stride = token_stride_, dim = dim_;
    tokens = tokens_, col_begin = col_begin_, pad = pad_;
    // The (token, column) of element threadIdx.x + i * blockDim.x, stepped from one division:
    // an integer division per element costs more than the tile's arithmetic.
    int tt = threadIdx.x / pad, c = threadIdx.x - tt * pad;
    const int step_tt = blockDim.x / pad, step_c = blockDim.x - step_tt * pad;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      int64_t offset;
      raw[i] = at(tt, c, offset) ? src[offset] : from_float<T>(0.f);
      tt += step_tt, c += step_c;
      if (c >= pad) c -= pad, ++tt;
    }
  }

  // Fills all tile_tokens rows of the tile: zeros after the `tokens` loaded.
  __device__ __forceinline__ void store(float* tile, int tile_tokens, float mul) const {
    const int n = tile_tokens * pad;
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int idx = threadIdx.x + i * blockDim.x;
      if (idx < n) tile[idx] = mul * to_float(raw[i]);  // raw is 0 where nothing was loaded
    }
    for (int idx = threadIdx.x + kPer * blockDim.x; idx < n; idx += blockDim.x) {
      int64_t offset;
      tile[idx] = at(idx, offset) ? mul * to_float(src[offset]) : 0.f;
    }
  }
};

}  // namespace metaplastic
}  // namespace cram
