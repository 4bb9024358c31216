// Forward of routed attention, FlashAttention-2 style on SM80 MMA atoms (run on sm_90a):
// one CTA per work item of the plan (routed_attention_fwd_plan.cuh): a tile of kBlockM
// routed queries of one head and batch row, and a range of its key tiles (all of them
// unless the tile is split), with an online softmax over the key tiles.
//
// A query tile is gathered through index: row i holds position t_i = index[b, slot0 + i].
// Keys run over tiles 0 .. (t_max + S - T) / kBlockN; the causal mask j <= t_i + (S - T)
// is applied only on key tiles past t_min + (S - T). Output rows are scattered back to
// out[b, t_i, h, :] and lse[b, h, t_i]; rows that are not routed are never touched (the
// plan's prologue kernel fills them with 0 and -inf).
#pragma once

#include <cfloat>

#include "routed_attention/routed_attention_fwd_plan.cuh"

namespace cram {
namespace ra {

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, class Element_>
struct FwdTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0, "head dim must be a multiple of 64");
  static_assert(kBlockM % (16 * kNWarps) == 0, "each warp takes 16-row slabs of the query tile");
  static_assert(kBlockM <= kNThreads, "one thread per query row for the row metadata");
  static_assert(kBlockN % 16 == 0);

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  // Warps stacked along M; every warp sees the whole key tile.
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  // 64-column pages swizzled so that ldmatrix and 16-byte cp.async are conflict-free.
  using SmemLayoutAtom = decltype(composition(Swizzle<3, 3, 3>{}, Layout<Shape<_8, _64>, Stride<_64, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // V seen as (D, kBlockN): the B operand of P @ V.
  using SmemLayoutVt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutVtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutVt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutKV{}))::value;
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kSmemKVElems) * int(sizeof(Element));
};

// Tile shapes per head dim (both dtypes), 4 warps (32 query rows a warp): 128 x 64 for
// D = 128, as FlashAttention-2 on SM80; 128 x 128 for D = 64. Measured on an H100 at
// B=4 H=32 T=4096 D=64, 128 x 128 beat 128 x 64 by 5% at density 1 and by 10% at 0.1
// (ptxas spills 48 bytes), and 8 warps were slower with either key tile.
template <int kHeadDim>
struct FwdConfig {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = kHeadDim == 64 ? 128 : 64;
  static constexpr int kNWarps = 4;
};

// One CTA per work item of the plan; CTAs past the plan's item count exit at once.
template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    routed_attention_fwd_kernel(const __grid_constant__ RoutedAttentionParams p, const FwdPlanSizes sizes) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(128) char smem[];
  __shared__ int s_scratch[kNThreads / 32];
  __shared__ int s_pos[kBlockM];
  __shared__ int s_limit[kBlockM];

  const int tid = threadIdx.x;
  const int T = p.seqlen_q, S = p.seqlen_k, shift = S - T;

  const FwdWorkspace ws(p.workspace, sizes, kBlockM);
  if (static_cast<int>(blockIdx.x) >= ws.header[0]) return;
  const FwdWorkItem item = ws.items[blockIdx.x];
  const int b = item.b, h = item.h;
  const bool split = item.partial >= 0;

  const int my_pos = tid < kBlockM ? routed_position(p, b, item.slot0 + tid, item.slot0 + item.rows) : -1;
  if (tid < kBlockM) s_pos[tid] = my_pos;
  const int t_min = block_allreduce<kNThreads>(my_pos >= 0 ? my_pos : INT_MAX, s_scratch, OpMin{});
  const int t_max = block_allreduce<kNThreads>(my_pos, s_scratch, OpMax{});
  if (t_max < 0) return;  // no valid position in the tile (malformed index only)

  // ---- key range: the item's, within the tile's own. (The plan takes a tile's range
  // from its last slot; with a malformed, non-ascending index the two can differ: the
  // result is then wrong, but every access stays in bounds.)
  const int n_key_tiles = (t_max + shift) / kBlockN + 1;
  const int n_lo = item.n_lo, n_hi = min(item.n_hi, n_key_tiles);
  // Tiles from here on hold keys past t_min + shift: some rows need the causal mask.
  const int n_first_masked = (t_min + shift + 1) / kBlockN;
  if (n_lo >= n_hi) {  // an empty split: contributes nothing to the merge
    if (split && tid < kBlockM) ws.lse[static_cast<int64_t>(item.partial) * kBlockM + tid] = -INFINITY;
    return;
  }

  const int kv_head = h / (p.num_heads / p.num_kv_heads);
  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;

  // ---- shared memory
  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_k = smem_q + Traits::kSmemQElems;
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVtNoSwizzle{});

  auto load_q = [&]() {
    load_rows_async<kBlockM, kHeadDim, kNThreads>(
        sQ,
        [&](int r) -> const Element* {
          const int t = s_pos[r];
          return t >= 0 ? q_ptr + static_cast<int64_t>(t) * p.q_row_stride : nullptr;
        },
        q_ptr);
  };
  auto load_kv = [&](auto& sX, const Element* base, int64_t row_stride, int n) {
    load_rows_async<kBlockN, kHeadDim, kNThreads>(
        sX,
        [&](int r) -> const Element* {
          const int j = n * kBlockN + r;
          return j < S ? base + static_cast<int64_t>(j) * row_stride : nullptr;
        },
        base);
  };

  // ---- MMA partitions
  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK);
  Tensor tOrVt = thr_mma.partition_fragment_B(sVtNoSwizzle);
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  auto smem_tiled_copy_Q = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_Q = smem_tiled_copy_Q.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_Q.partition_S(sQ);
  auto smem_tiled_copy_K = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_K = smem_tiled_copy_K.get_thread_slice(tid);
  Tensor tSsK = smem_thr_copy_K.partition_S(sK);
  auto smem_tiled_copy_V = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto smem_thr_copy_V = smem_tiled_copy_V.get_thread_slice(tid);
  Tensor tOsVt = smem_thr_copy_V.partition_S(sVt);

  // (row, col) coordinates of this thread's score elements, as a (rows, cols) view.
  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;

  // ---- prologue: Q and the last key tile in flight
  load_q();
  load_kv(sK, k_ptr, p.k_row_stride, n_hi - 1);
  cp_async_commit();

  // Last key each row may see (invalid rows: any finite pattern, they are never stored).
  if (tid < kBlockM) s_limit[tid] = (my_pos >= 0 ? my_pos : t_min) + shift;
  __syncthreads();

  float row_max[kRows], row_sum[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    row_max[i] = -INFINITY;
    row_sum[i] = 0.f;
  }
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  // Scores stay unscaled; the scale is folded into the exponent (one FFMA an element,
  // as FlashAttention does). That needs a positive scale: a negative one is applied by
  // negating Q in shared memory, and 0 becomes FLT_MIN, which gives the same uniform
  // weights (exp2(s * FLT_MIN) rounds to 1) while masked scores stay -inf.
  const bool negate_q = p.scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(p.scale_log2), FLT_MIN);

  for (int n = n_hi - 1; n >= n_lo; --n) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n] landed; every warp is done with V[n + 1]
    if (negate_q && n == n_hi - 1) {  // Q landed with the first K tile
      uint32_t* q_words = reinterpret_cast<uint32_t*>(smem_q);
      for (int i = tid; i < Traits::kSmemQElems / 2; i += kNThreads) q_words[i] ^= 0x80008000u;  // sign bits
      __syncthreads();
    }
    load_kv(sV, v_ptr, p.v_row_stride, n);
    cp_async_commit();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_tiled_copy_Q, smem_tiled_copy_K, smem_thr_copy_Q,
            smem_thr_copy_K);

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n > n_lo) {
      load_kv(sK, k_ptr, p.k_row_stride, n - 1);
      cp_async_commit();
    }

    // Causal mask on the tiles that need it (scores unscaled), then the online softmax
    // update; row_max is kept unscaled too.
    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    if (n >= n_first_masked) {
      const int col0 = n * kBlockN;
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const int limit = s_limit[get<0>(tScS_rc(i, 0))] - col0;  // last visible column of the row
#pragma unroll
        for (int c = 0; c < kCols; ++c) {
          if (get<1>(tScS_rc(0, c)) > limit) s(i, c) = -INFINITY;
        }
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      float m = row_max[i];
#pragma unroll
      for (int c = 0; c < kCols; ++c) m = fmaxf(m, s(i, c));
      m = quad_max(m);
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;  // a row with every key masked so far
      const float corr = exp2f(row_max[i] * scale_log2 - m_scaled);
      row_max[i] = m;
      float sum = row_sum[i] * corr;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float e = exp2f(fmaf(s(i, c), scale_log2, -m_scaled));
        s(i, c) = e;
        sum += e;
      }
      row_sum[i] = sum;
#pragma unroll
      for (int c = 0; c < decltype(size<1>(acc_o_rc))::value; ++c) acc_o_rc(i, c) *= corr;
    }

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_tiled_copy_V, smem_thr_copy_V);
  }

  // ---- epilogue: normalise, log-sum-exp (natural log)
  float row_lse[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const float sum = quad_sum(row_sum[i]);
    const bool any = sum > 0.f;
    const float inv = any ? 1.f / sum : 0.f;
    row_lse[i] = any ? (row_max[i] * scale_log2 + __log2f(sum)) * kLn2 : -INFINITY;
#pragma unroll
    for (int c = 0; c < decltype(size<1>(acc_o_rc))::value; ++c) acc_o_rc(i, c) *= inv;
  }
  const bool quad_leader = (tid % 4) == 0;

  if (split) {
    // Partials in fp32, one row of kHeadDim per query row, for the combine kernel.
    float* o_ws = ws.o + static_cast<int64_t>(item.partial) * kBlockM * kHeadDim;
    Tensor cO = make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{});
    Tensor tOcO = thr_mma.partition_C(cO);
    static_assert(decltype(size(acc_o))::value % 2 == 0);
#pragma unroll
    for (int e = 0; e < decltype(size(acc_o))::value; e += 2) {
      const int r = get<0>(tOcO(e)), d = get<1>(tOcO(e));  // elements e, e + 1: columns d, d + 1
      *reinterpret_cast<float2*>(o_ws + r * kHeadDim + d) = make_float2(acc_o(e), acc_o(e + 1));
    }
    if (quad_leader) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        ws.lse[static_cast<int64_t>(item.partial) * kBlockM + get<0>(tScS_rc(i, 0))] = row_lse[i];
      }
    }
    return;
  }

  // Output through smem (the Q buffer: every warp finished its last Q·K^T before the
  // barrier inside the last iteration, and reads only its own rows anyway).
  Tensor rO = convert_fragment<Element>(acc_o);
  Tensor sO = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  auto smem_tiled_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_copy_O = smem_tiled_copy_O.get_thread_slice(tid);
  cute::copy(smem_tiled_copy_O, smem_thr_copy_O.retile_S(rO), smem_thr_copy_O.partition_D(sO));
  if (quad_leader) {
    float* lse_row = p.lse + (static_cast<int64_t>(b) * p.num_heads + h) * T;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int t = s_pos[get<0>(tScS_rc(i, 0))];
      if (t >= 0) lse_row[t] = row_lse[i];
    }
  }
  __syncthreads();
  Element* out_ptr = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  store_rows<kBlockM, kHeadDim, kNThreads>(sO, [&](int r) -> Element* {
    const int t = s_pos[r];
    return t >= 0 ? out_ptr + static_cast<int64_t>(t) * p.out_row_stride : nullptr;
  });
}

// Merges the partials of split tiles: lse = log sum_s exp(lse_s),
// out = sum_s exp(lse_s - lse) O_s, scattered to the routed rows. One CTA per
// kCombineRows rows of a split tile: with one CTA per tile the few split tiles of a
// low density left the GPU nearly empty (72 us at B=2 H=16 T=8192 D=128, density
// 0.016, on an H100). A thread has all of its row's partials in flight at once.
constexpr int kCombineRows = 16;
constexpr int kCombineThreads = 128;

template <int kBlockM>
__host__ __device__ constexpr int combine_ctas_per_tile() {
  return kBlockM / kCombineRows;
}

template <int kHeadDim, int kBlockM, class Element>
__global__ void __launch_bounds__(kCombineThreads)
    routed_attention_fwd_combine_kernel(const __grid_constant__ RoutedAttentionParams p, const FwdPlanSizes sizes) {
  static_assert(kBlockM % kCombineRows == 0 && kCombineRows <= kCombineThreads);
  __shared__ int s_pos[kCombineRows];
  __shared__ float s_weight[kMaxSplits][kCombineRows];

  const int tid = threadIdx.x;
  const int T = p.seqlen_q;
  const FwdWorkspace ws(p.workspace, sizes, kBlockM);
  const int tile_index = blockIdx.x / combine_ctas_per_tile<kBlockM>();
  const int r0 = (blockIdx.x % combine_ctas_per_tile<kBlockM>()) * kCombineRows;
  if (tile_index >= ws.header[1]) return;
  const FwdSplitTile tile = ws.split_tiles[tile_index];
  if (r0 >= tile.rows) return;
  const int b = tile.b, h = tile.h, n_split = tile.n_split;
  const int64_t first = tile.first_partial;

  if (tid < kCombineRows) {
    const int r = r0 + tid;
    const int t = routed_position(p, b, tile.slot0 + r, tile.slot0 + tile.rows);
    s_pos[tid] = t;
    if (t >= 0) {
      float lse_s[kMaxSplits];
      float m = -INFINITY;
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) {
        lse_s[s] = s < n_split ? ws.lse[(first + s) * kBlockM + r] : -INFINITY;
        m = fmaxf(m, lse_s[s]);
      }
      float sum = 0.f;
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) sum += lse_s[s] == -INFINITY ? 0.f : __expf(lse_s[s] - m);
      const float lse = m == -INFINITY ? -INFINITY : m + __logf(sum);
#pragma unroll
      for (int s = 0; s < kMaxSplits; ++s) {
        s_weight[s][tid] = (lse_s[s] == -INFINITY || lse == -INFINITY) ? 0.f : __expf(lse_s[s] - lse);
      }
      p.lse[(static_cast<int64_t>(b) * p.num_heads + h) * T + t] = lse;
    }
  }
  __syncthreads();

  Element* out_ptr = static_cast<Element*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride;
  constexpr int kVecPerRow = kHeadDim / 4;
  for (int idx = tid; idx < kCombineRows * kVecPerRow; idx += kCombineThreads) {
    const int i = idx / kVecPerRow, d = (idx % kVecPerRow) * 4;
    const int pos = s_pos[i];
    if (pos < 0) continue;
    const float* o_row = ws.o + ((first * kBlockM + r0 + i) * kHeadDim + d);
    float4 o[kMaxSplits];
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      // An empty split (weight 0) never wrote its partial O: not read.
      o[s] = s < n_split && s_weight[s][i] != 0.f
                 ? *reinterpret_cast<const float4*>(o_row + static_cast<int64_t>(s) * kBlockM * kHeadDim)
                 : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int s = 0; s < kMaxSplits; ++s) {
      const float w = s < n_split ? s_weight[s][i] : 0.f;
      acc.x += w * o[s].x;
      acc.y += w * o[s].y;
      acc.z += w * o[s].z;
      acc.w += w * o[s].w;
    }
    cutlass::NumericArrayConverter<Element, float, 4, cutlass::FloatRoundStyle::round_to_nearest> conv;
    cutlass::Array<float, 4> in;
    in[0] = acc.x;
    in[1] = acc.y;
    in[2] = acc.z;
    in[3] = acc.w;
    const cutlass::Array<Element, 4> out = conv(in);
    *reinterpret_cast<uint2*>(out_ptr + static_cast<int64_t>(pos) * p.out_row_stride + d) =
        *reinterpret_cast<const uint2*>(&out);
  }
}

}  // namespace ra
}  // namespace cram
