// Device helpers shared by the routed-attention kernels: the device-side tile scheduler
// (routed query tiles enumerated from counts, no host sync), gathered cp.async row loads,
// CuTe fragment layout conversions, the smem-operand GEMM loops and quad reductions.
#pragma once

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>
#include <cutlass/numeric_types.h>

#include "common/block_scan.cuh"
#include "common/cuda_check.h"
#include "common/element_type.h"
#include "routed_attention/routed_attention_params.h"

namespace cram {
namespace ra {

using namespace cute;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

__host__ __device__ inline int ceil_div(int a, int b) { return (a + b - 1) / b; }

__device__ __forceinline__ int clamped_count(const int32_t* counts, int b, int T) {
  return min(max(counts[b], 0), T);
}

// ------------------------------------------------------------------ block reductions

// Sum / min / max over the block; every thread gets the result. `scratch` holds
// kNThreads / 32 values; the function synchronises before returning and may be called
// again right away.
template <int kNThreads, typename V, class Op>
__device__ __forceinline__ V block_allreduce(V v, V* scratch, Op op) {
  static_assert(kNThreads % 32 == 0, "whole warps");
  constexpr int kWarps = kNThreads / 32;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch may still be read by a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) v = op(v, scratch[w]);
  return v;
}

struct OpSum {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return a + b; }
};
struct OpMin {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return min(a, b); }
};
struct OpMax {
  template <typename V>
  __device__ __forceinline__ V operator()(V a, V b) const { return max(a, b); }
};

// ------------------------------------------------------------------ tile scheduler
//
// (Used by the backward's dQ kernel, one CTA per tile. The forward runs the items of a
// plan instead, tiles cut into key splits: routed_attention_fwd_plan.cuh.)
//
// A routed query tile is up to kBlockM consecutive slots of index[b, :counts[b]] for one
// head. Tiles are aligned to the end of the row (the last tile ends at counts[b]) so that
// the one partial tile holds the earliest positions, the ones that see the fewest keys.
// Tiles are numbered without gaps, batch row by batch row; within a row, by rounds (all
// heads of the row's last tile, then of the tile before, ...), so that the tiles with the
// most keys start first. The numbering depends on counts, read here on the
// device by every CTA: a grid sized for the host-known maximum (ceil(T / kBlockM) tiles
// per (b, h)) has its real tiles in its first CTAs and the others exit at once.

// The round-th tile from the end of a row of `count` routed slots (round 0: the last
// tile): slots slot0 .. slot0 + rows - 1, rows <= 0 when the row has no such tile.
__device__ __forceinline__ void end_aligned_tile(int count, int round, int block_m, int& slot0, int& rows) {
  const int end = count - round * block_m;
  slot0 = max(0, end - block_m);
  rows = end - slot0;
}

struct QueryTile {
  int b = 0, h = 0;
  int slot0 = 0;  // first slot of index[b] in the tile
  int rows = 0;   // slots in the tile, <= kBlockM: slots slot0 .. slot0 + rows - 1
  __device__ int slot_end() const { return slot0 + rows; }
};

// Finds tile `tile_id`; returns the number of tiles (tile is valid iff tile_id < result).
// Synchronises. `scratch` holds kNThreads / 32 + 2 ints.
template <int kNThreads>
__device__ int locate_query_tile(const RoutedAttentionParams& p, int block_m, int tile_id, QueryTile& tile,
                                 int* scratch) {
  int* found = scratch + kNThreads / 32;  // [b, local index]
  if (threadIdx.x == 0) found[0] = -1;
  int base = 0;
  for (int b0 = 0; b0 < p.batch; b0 += kNThreads) {
    const int b = b0 + threadIdx.x;
    const int n = b < p.batch ? ceil_div(clamped_count(p.counts, b, p.seqlen_q), block_m) * p.num_heads : 0;
    int total;
    const int incl = block_inclusive_sum<kNThreads>(n, total, scratch);
    const int excl = incl - n;
    if (n > 0 && tile_id >= base + excl && tile_id < base + incl) {
      found[0] = b;
      found[1] = tile_id - base - excl;
    }
    base += total;
  }
  __syncthreads();
  const int b = found[0];
  if (b >= 0) {
    const int count = clamped_count(p.counts, b, p.seqlen_q);
    const int local = found[1];
    const int round = local / p.num_heads;  // 0: the row's last tile
    tile.b = b;
    tile.h = local % p.num_heads;
    end_aligned_tile(count, round, block_m, tile.slot0, tile.rows);
  }
  __syncthreads();  // found[] is reused by the next call
  return base;
}

// The routed position held by slot `slot` of row b, or -1 when the slot is not below
// `end` (past counts, or past the tile) or holds an out-of-range position.
__device__ __forceinline__ int routed_position(const RoutedAttentionParams& p, int b, int slot, int end) {
  if (slot < 0 || slot >= end) return -1;
  const int t = p.index[static_cast<int64_t>(b) * p.seqlen_q + slot];
  return (t >= 0 && t < p.seqlen_q) ? t : -1;
}

// ------------------------------------------------------------------ rows not routed

constexpr int kFillUnitRows = 32;  // positions of one batch row a fill unit covers (one warp's ballot)

// Fill units of a (B, T, ...) tensor: kFillUnitRows consecutive positions of one batch row.
__host__ __device__ inline int64_t fill_units(const RoutedAttentionParams& p) {
  return static_cast<int64_t>(p.batch) * ceil_div(p.seqlen_q, kFillUnitRows);
}

// The first slot i of index[b, :count] with index[b, i] >= value, count if none (a
// binary search on the increasing positions; on a malformed index it stays in bounds and
// takes log2(count) steps, the answer then being some slot).
__device__ __forceinline__ int lower_bound_slot(const RoutedAttentionParams& p, int b, int count, int value) {
  const int32_t* row = p.index + static_cast<int64_t>(b) * p.seqlen_q;
  int lo = 0, hi = count;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (row[mid] < value) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo;
}

// Whether position t of row b is among index[b, :count]. On an unsorted index it may
// miss a routed t, which then gets filled and later overwritten, never the reverse: a
// hit means t is there.
__device__ __forceinline__ bool is_routed(const RoutedAttentionParams& p, int b, int count, int t) {
  const int i = lower_bound_slot(p, b, count, t);
  return i < count && p.index[static_cast<int64_t>(b) * p.seqlen_q + i] == t;
}

// Writes the values of the rows that are not routed, units first_unit, first_unit +
// unit_stride, ... (fill_units): zeros in `rows`, a contiguous (B, T, row_bytes) tensor,
// and -inf in lse (B, H, T) when lse is given. Routed rows are left alone, so at density
// 1 nothing is written, and the kernels that write routed rows need not run after this.
template <int kThreads>
__device__ void fill_unrouted_rows(const RoutedAttentionParams& p, void* rows, int row_bytes, float* lse,
                                   int64_t first_unit, int64_t unit_stride) {
  static_assert(kThreads >= 32 && kThreads % 32 == 0, "whole warps");
  __shared__ unsigned s_routed;
  const int T = p.seqlen_q, units_per_row = ceil_div(T, kFillUnitRows);
  const int row_vecs = row_bytes / 16;
  for (int64_t u = first_unit; u < fill_units(p); u += unit_stride) {
    const int b = static_cast<int>(u / units_per_row), t0 = static_cast<int>(u % units_per_row) * kFillUnitRows;
    const int n = min(kFillUnitRows, T - t0);
    if (threadIdx.x < 32) {
      const int t = t0 + threadIdx.x;
      const bool routed = threadIdx.x < n && is_routed(p, b, clamped_count(p.counts, b, T), t);
      const unsigned mask = __ballot_sync(0xffffffffu, routed);
      if (threadIdx.x == 0) s_routed = mask;
    }
    __syncthreads();
    const unsigned routed = s_routed;
    uint4* out = static_cast<uint4*>(rows) + (static_cast<int64_t>(b) * T + t0) * row_vecs;
    for (int i = threadIdx.x; i < n * row_vecs; i += kThreads) {
      if (!((routed >> (i / row_vecs)) & 1u)) out[i] = make_uint4(0u, 0u, 0u, 0u);
    }
    if (lse != nullptr) {
      for (int i = threadIdx.x; i < p.num_heads * kFillUnitRows; i += kThreads) {
        const int h = i / kFillUnitRows, r = i % kFillUnitRows;
        if (r < n && !((routed >> r) & 1u)) lse[(static_cast<int64_t>(b) * p.num_heads + h) * T + t0 + r] = -INFINITY;
      }
    }
    __syncthreads();  // s_routed is rewritten by the next unit
  }
}

// ------------------------------------------------------------------ cp.async

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool pred) {
  const uint32_t dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem_dst));
  const int src_size = pred ? 16 : 0;  // 0: nothing is read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_size));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// sm_90 bulk reduction: global[dst, dst + bytes) += shared[src, ...) as floats, done by the
// TMA unit asynchronously (one thread issues it; bytes a multiple of 16, both 16-byte
// aligned). Writes to shared memory by other threads must be made visible to the async
// proxy first (fence_proxy_async_shared, then a barrier). Before sm_90 these instructions do
// not exist: the backward takes the deterministic path there (routed_attention_fused_dq_supported), and
// the kernel, still compiled for every arch of the build, traps if it ever does.
__device__ __forceinline__ void bulk_reduce_add_f32(float* dst, const float* src, int bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(src));
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n" ::"l"(dst), "r"(s),
               "r"(bytes)
               : "memory");
  asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
#else
  __trap();
#endif
}
// Waits until at most kPending of the bulk operations this thread issued last are still
// reading shared memory.
template <int kPending>
__device__ __forceinline__ void bulk_wait_read() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(kPending) : "memory");
#endif
}

// A barrier over threads 0 .. kNThreads - 1 of the CTA (named barrier 1): all of them in a
// kernel of kNThreads threads, the consumer warps of a warp-specialised one.
template <int kNThreads>
__device__ __forceinline__ void sync_threads() {
  static_assert(kNThreads % 32 == 0, "whole warps");
  asm volatile("bar.sync 1, %0;\n" ::"n"(kNThreads) : "memory");
}

__device__ __forceinline__ void fence_proxy_async_shared() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  if constexpr (N == 0) {
    asm volatile("cp.async.wait_all;\n" ::);
  } else {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
  }
}

// The smem layout of the row loads: pages of 8 rows x 64 16-bit elements, each 128-byte row
// swizzled in 16-byte chunks. Conflict-free for ldmatrix and 16-byte cp.async, and for
// 16-bit elements the canonical 128-byte-swizzled layout of wgmma operands.
using SmemRowAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));

// Issues cp.async loads of a (kRows, kCols) tile of 16-bit elements into the smem tensor
// `s` whose row r comes from row_ptr(r) (nullptr: the row is zero-filled). `s` must have
// the kernels' smem layout: (8 x 64)-element swizzled atoms tiled down the rows first, so
// that element (r + 8a, c + 64b) sits at offset(r, c) + 512a + 64 * kRows * b for any r, c
// (checked on the host by the layout test). Threads take 16-byte chunks, 8 threads a row
// of a 64-column page; one address computation per thread, the rest are immediates.
template <int kRows, int kCols, int kNThreads, class SmemTensor, class RowPtr>
__device__ __forceinline__ void load_rows_async(SmemTensor& s, RowPtr&& row_ptr, const void* safe_src) {
  static_assert(kCols % 64 == 0, "head dim must be a multiple of 64");
  static_assert((kRows * 8) % kNThreads == 0, "rows must cover the threads");
  static_assert((kNThreads / 8) % 8 == 0, "row step must keep the swizzle phase");
  constexpr int kIters = kRows * 8 / kNThreads;
  constexpr int kRowStep = kNThreads / 8;
  const int r0 = threadIdx.x / 8, c = (threadIdx.x % 8) * 8;
  auto* dst0 = &s(r0, c);
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const auto* src = row_ptr(r0 + i * kRowStep);
    const bool ok = src != nullptr;
#pragma unroll
    for (int pg = 0; pg < kCols / 64; ++pg) {
      cp_async_16(dst0 + i * kRowStep * 64 + pg * kRows * 64,
                  ok ? static_cast<const void*>(src + pg * 64 + c) : safe_src, ok);
    }
  }
}

// Copies a (kRows, kCols) smem tile (layout as for load_rows_async) to global rows given
// by row_ptr(r) (nullptr: skipped), in 16-byte chunks.
template <int kRows, int kCols, int kNThreads, class SmemTensor, class RowPtr>
__device__ __forceinline__ void store_rows(const SmemTensor& s, RowPtr&& row_ptr) {
  static_assert((kRows * 8) % kNThreads == 0, "rows must cover the threads");
  static_assert((kNThreads / 8) % 8 == 0, "row step must keep the swizzle phase");
  constexpr int kIters = kRows * 8 / kNThreads;
  constexpr int kRowStep = kNThreads / 8;
  const int r0 = threadIdx.x / 8, c = (threadIdx.x % 8) * 8;
  const auto* src0 = &s(r0, c);
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    auto* dst = row_ptr(r0 + i * kRowStep);
    if (dst == nullptr) continue;
#pragma unroll
    for (int pg = 0; pg < kCols / 64; ++pg) {
      *reinterpret_cast<uint4*>(dst + pg * 64 + c) =
          *reinterpret_cast<const uint4*>(src0 + i * kRowStep * 64 + pg * kRows * 64);
    }
  }
}

// ------------------------------------------------------------------ fragment layouts
//
// An SM80 m16n8 accumulator fragment has layout ((2, 2), MMA_M, MMA_N): value mode 0
// runs along N (two adjacent columns), value mode 1 along M (rows r and r + 8). An sm_90
// warpgroup m64nN accumulator has ((2, 2, N / 8), MMA_M, MMA_N): the same, then the
// n8 column groups. In both, the four threads of a quad hold the columns of the same rows.

// Accumulator -> a (rows, cols) view of the thread's elements: ((2, MMA_M), (2, MMA_N))
// for SM80, ((2, MMA_M), (2, N / 8, MMA_N)) for sm_90.
template <class Layout>
__host__ __device__ constexpr auto acc_rowcol_layout(Layout l) {
  static_assert(decltype(rank(l))::value == 3);
  if constexpr (decltype(rank<0>(l))::value == 2) {
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
  } else {
    static_assert(decltype(rank<0>(l))::value == 3);
    return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<0, 2>(l), get<2>(l)));
  }
}

// Accumulator of S = Q K^T -> A-operand fragment of P V over the same columns (k16 blocks
// of two n8 column groups; values: column pair, row half, k half).
//   SM80  ((2, 2), MMA_M, MMA_N)      -> ((2, 2, 2), MMA_M, MMA_N / 2)
//   sm_90 ((2, 2, N / 8), MMA_M, 1)   -> ((2, 2, 2), MMA_M, N / 16)
template <class Layout>
__host__ __device__ constexpr auto acc_to_a_layout(Layout l) {
  if constexpr (decltype(rank<0>(l))::value == 2) {
    static_assert(decltype(size<2>(l))::value % 2 == 0);
    auto d = logical_divide(l, Shape<Underscore, Underscore, _2>{});  // ((2,2), MMA_M, (2, MMA_N/2))
    return make_layout(make_layout(get<0, 0>(d), get<0, 1>(d), get<2, 0>(d)), get<1>(d), get<2, 1>(d));
  } else {
    static_assert(decltype(size<2>(l))::value == 1 && decltype(size<0, 2>(l))::value % 2 == 0);
    auto v = logical_divide(get<0>(l), Shape<Underscore, Underscore, _2>{});  // (2, 2, (2, N/16))
    return make_layout(make_layout(get<0>(v), get<1>(v), get<2, 0>(v)), get<1>(l), get<2, 1>(v));
  }
}

// fp32 fragment -> 16-bit fragment of the same layout (pairs converted together).
template <class To, class Engine, class Layout>
__device__ __forceinline__ auto convert_fragment(Tensor<Engine, Layout> const& t) {
  auto out = make_tensor<To>(t.layout());
  constexpr int N = decltype(size(t))::value;
  static_assert(N % 2 == 0);
  cutlass::NumericArrayConverter<To, float, 2, cutlass::FloatRoundStyle::round_to_nearest> conv;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    cutlass::Array<float, 2> in;
    in[0] = t(2 * i);
    in[1] = t(2 * i + 1);
    const cutlass::Array<To, 2> o = conv(in);
    out(2 * i) = o[0];
    out(2 * i + 1) = o[1];
  }
  return out;
}

// ------------------------------------------------------------------ GEMM loops

// acc += A * B^T over the K mode, both operands read from smem through ldmatrix one
// k-block ahead of the MMAs.
template <class Acc, class FragA, class FragB, class SmemA, class SmemB, class TiledMma, class CopyA, class CopyB,
          class ThrCopyA, class ThrCopyB>
__device__ __forceinline__ void gemm_ss(Acc& acc, FragA& tCrA, FragB& tCrB, SmemA const& tCsA, SmemB const& tCsB,
                                        TiledMma& mma, CopyA const& copy_a, CopyB const& copy_b,
                                        ThrCopyA const& thr_copy_a, ThrCopyB const& thr_copy_b) {
  auto tCrA_view = thr_copy_a.retile_D(tCrA);
  auto tCrB_view = thr_copy_b.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsA) == size<1>(tCrA_view))::value);
  static_assert(decltype(size<1>(tCsB) == size<1>(tCrB_view))::value);
  static_assert(decltype(size<2>(tCsA) == size<2>(tCsB))::value);
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;
  cute::copy(copy_a, tCsA(_, _, 0), tCrA_view(_, _, 0));
  cute::copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    if (i + 1 < kBlocks) {
      cute::copy(copy_a, tCsA(_, _, i + 1), tCrA_view(_, _, i + 1));
      cute::copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    }
    cute::gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// acc += A * B^T with A already in registers (e.g. P or dS), B read from smem.
template <class Acc, class FragA, class FragB, class SmemB, class TiledMma, class CopyB, class ThrCopyB>
__device__ __forceinline__ void gemm_rs(Acc& acc, FragA const& tCrA, FragB& tCrB, SmemB const& tCsB, TiledMma& mma,
                                        CopyB const& copy_b, ThrCopyB const& thr_copy_b) {
  auto tCrB_view = thr_copy_b.retile_D(tCrB);
  static_assert(decltype(size<1>(tCsB) == size<1>(tCrB_view))::value);
  constexpr int kBlocks = decltype(size<2>(tCrA))::value;
  static_assert(kBlocks == decltype(size<2>(tCrB))::value);
  cute::copy(copy_b, tCsB(_, _, 0), tCrB_view(_, _, 0));
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    if (i + 1 < kBlocks) cute::copy(copy_b, tCsB(_, _, i + 1), tCrB_view(_, _, i + 1));
    cute::gemm(mma, tCrA(_, _, i), tCrB(_, _, i), acc);
  }
}

// ------------------------------------------------------------------ quad reductions
// The four threads of a quad (lanes 4q .. 4q+3) hold the columns of the same rows.

__device__ __forceinline__ float quad_max(float v) {
  v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// Opts a kernel into more than 48 KB of dynamic shared memory.
template <class Kernel>
inline void set_max_dynamic_smem(Kernel kernel, int bytes) {
  // Set whenever there is dynamic memory: the 48 KB default covers static and
  // dynamic shared memory together, so a kernel with exactly 48 KB dynamic plus a
  // few static arrays fails to launch without it.
  if (bytes > 0) {
    CRAM_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
}

}  // namespace ra
}  // namespace cram
