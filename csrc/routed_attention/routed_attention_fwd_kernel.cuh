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

#include "routed_attention/routed_attention_fwd_common.cuh"

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

  using SmemLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
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
  const FwdWorkspace ws(p.workspace, sizes, kBlockM);
  FwdItem it;
  if (!fwd_item<kBlockM, kBlockN, kNThreads>(p, ws, it, s_pos, s_limit, s_scratch)) return;

  const FwdRowLoads<Element, kBlockM, kBlockN, kHeadDim, kNThreads> loads(p, it, s_pos);

  // ---- shared memory
  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_k = smem_q + Traits::kSmemQElems;
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
  Tensor sVtNoSwizzle = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVtNoSwizzle{});

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

  // ---- prologue: Q and the last key tile in flight
  loads.query_tile(sQ);
  loads.k_tile(sK, it.n_hi - 1);
  cp_async_commit();

  OnlineSoftmax<kRows> softmax;
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  // The scale is folded into the exponent, which needs it positive: a negative one is
  // applied by negating Q in shared memory, and 0 becomes FLT_MIN, which gives the same
  // uniform weights (exp2(s * FLT_MIN) rounds to 1) while masked scores stay -inf.
  const bool negate_q = p.scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(p.scale_log2), FLT_MIN);

  for (int n = it.n_hi - 1; n >= it.n_lo; --n) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    cp_async_wait<0>();
    __syncthreads();  // K[n] landed; every warp is done with V[n + 1]
    if (negate_q && n == it.n_hi - 1) {  // Q landed with the first K tile
      uint32_t* q_words = reinterpret_cast<uint32_t*>(smem_q);
      for (int i = tid; i < Traits::kSmemQElems / 2; i += kNThreads) q_words[i] ^= 0x80008000u;  // sign bits
      __syncthreads();
    }
    loads.v_tile(sV, n);
    cp_async_commit();

    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, tSsK, tiled_mma, smem_tiled_copy_Q, smem_tiled_copy_K, smem_thr_copy_Q,
            smem_thr_copy_K);

    cp_async_wait<0>();
    __syncthreads();  // V[n] landed; every warp is done with K[n]
    if (n > it.n_lo) {
      loads.k_tile(sK, n - 1);
      cp_async_commit();
    }

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    if (n >= it.n_first_masked) apply_causal_mask<kBlockN>(s, tScS_rc, s_limit, n);
    float corr[kRows];
    softmax.update(s, scale_log2, corr);
    softmax.rescale_output(acc_o_rc, corr);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    gemm_rs(acc_o, tOrP, tOrVt, tOsVt, tiled_mma, smem_tiled_copy_V, smem_thr_copy_V);
  }

  float lse[kRows];
  softmax.finish(acc_o_rc, scale_log2, lse);
  if (it.split()) {
    Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    write_split_partial<kBlockM, kHeadDim>(ws, it.partial, acc_o, tOcO, tScS_rc, lse);
    return;
  }
  // Output through smem (the Q buffer: every warp finished its last Q·K^T before the
  // barrier inside the last iteration, and reads only its own rows anyway).
  Tensor sO = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  write_output<kBlockM, kHeadDim, kNThreads, kRows, Element>(
      p, it, s_pos, convert_fragment<Element>(acc_o), sO,
      make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma), tScS_rc, lse);
}

}  // namespace ra
}  // namespace cram
