// Forward of routed attention on Hopper (sm_90a): the SM80 kernel's work plan, gathers,
// causal mask, online softmax and epilogues (routed_attention_fwd_common.cuh), with the two
// GEMMs on warpgroup MMAs (wgmma) instead of SM80 MMA atoms. One CTA of kBlockM / 64
// warpgroups per work item; each warpgroup owns 64 query rows:
//   S = Q K^T   wgmma with both operands in shared memory (no ldmatrix, no register copies);
//   O += P V    wgmma with P in registers (the softmax's output, never stored) and V in
//               shared memory read transposed by the tensor cores (an MN-major operand).
// Key tile n's S = Q K^T and tile n + 1's P V are issued together; the softmax of tile n
// runs on the other units while P V runs on the tensor cores, and the output is rescaled
// once P V is done (FlashAttention-3's overlap within a warpgroup). K and V have two stages
// each in shared memory, loaded with cp.async one key tile ahead: at the top of the step of
// key tile n, K[n] and V[n + 1] have landed, and the stages of K[n + 1] and V[n + 2], which
// no MMA reads any more, take K[n - 1] and V[n]. cp.async writes through the generic proxy
// and wgmma reads through the async proxy, so each landed tile is fenced (fence.proxy.async)
// before the barrier that publishes it.
//
// The layouts are the canonical 128-byte-swizzled wgmma layouts; for 16-bit elements they
// place every element where the row loads (load_rows_async, SmemRowAtom) put it, so the
// loads and the output's store see the same bytes through SmemRowAtom tilings.
#pragma once

#include "routed_attention/routed_attention_fwd_common.cuh"
#include "routed_attention/routed_attention_wgmma.cuh"

namespace cram {
namespace ra {

template <int kHeadDim_, int kBlockM_, int kBlockN_, class Element_>
struct FwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpGroups = kBlockM / 64;
  static constexpr int kNThreads = 128 * kWarpGroups;
  static_assert(kBlockM % 64 == 0 && kHeadDim % 64 == 0 && kBlockN % 64 == 0);

  // Warpgroups stacked along M; every warpgroup sees the whole key tile.
  using WarpGroups = Layout<Shape<Int<kWarpGroups>, _1, _1>>;
  using TiledMmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>>(), WarpGroups{}));
  using TiledMmaO = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      WarpGroups{}));

  // The MMAs' views: Q and K as K-major (row, head dim) tiles, V as the MN-major (head dim,
  // key) operand of P V, its atoms tiled down the keys first as the rows were loaded. K and V
  // have kStages stages (the last mode).
  static constexpr int kStages = 2;
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutK = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{}, Step<_2, _1, _3>{}));
  // The row loads' and the output's views of the same bytes.
  using SmemRowLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemRowLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));

  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutK{}))::value;  // every stage
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kSmemKVElems) * int(sizeof(Element));
};

// Tile shapes per head dim (both dtypes): 128 query rows (two warpgroups) and 128 keys.
template <int kHeadDim>
struct FwdConfigSm90 {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
};

// One CTA per work item of the plan; CTAs past the plan's item count exit at once. Built
// for every arch of the build, empty but for sm_90a (the launcher only runs it there).
template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    routed_attention_fwd_kernel_sm90(const __grid_constant__ RoutedAttentionParams p, const FwdPlanSizes sizes) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(1024) char smem_sm90[];  // the 128-byte swizzle repeats every 1024 bytes
  __shared__ int s_scratch[kNThreads / 32];
  __shared__ int s_pos[kBlockM];
  __shared__ int s_limit[kBlockM];

  const int tid = threadIdx.x;
  const FwdWorkspace ws(p.workspace, sizes, kBlockM);
  FwdItem it;
  if (!fwd_item<kBlockM, kBlockN, kNThreads>(p, ws, it, s_pos, s_limit, s_scratch)) return;

  const FwdRowLoads<Element, kBlockM, kBlockN, kHeadDim, kNThreads> loads(p, it, s_pos);

  // ---- shared memory: each tile seen by the MMAs and by the row loads
  Element* smem_q = reinterpret_cast<Element*>(smem_sm90);
  Element* smem_k = smem_q + Traits::kSmemQElems;
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
  Tensor sQ_rows = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemRowLayoutQ{});
  Tensor sK_rows = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemRowLayoutKV{});
  Tensor sV_rows = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemRowLayoutKV{});
  auto stage = [](int n) { return n & 1; };  // key tile n's K and V stage

  // The tiles in flight landed: this thread's cp.async writes are complete and ordered before
  // the tensor cores' reads, then the barrier publishes everyone's (and says that every
  // warpgroup has waited for the MMAs it issued before).
  auto tiles_landed = [&]() {
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();
  };

  // ---- MMA partitions
  typename Traits::TiledMmaS mma_s;
  typename Traits::TiledMmaO mma_o;
  auto thr_mma_s = mma_s.get_thread_slice(tid);
  auto thr_mma_o = mma_o.get_thread_slice(tid);
  Tensor tSrQ = thr_mma_s.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma_s.partition_fragment_B(sK);   // (MMA, MMA_N, MMA_K, stage)
  Tensor tOrV = thr_mma_o.partition_fragment_B(sVt);  // likewise
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});
  Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
  // P of the previous key tile, as the A operand of its P V.
  Tensor rP = make_tensor<Element>(acc_s.layout());
  Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  OnlineSoftmax<kRows> softmax;
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
  // A negative scale is applied by negating Q in shared memory (the softmax needs it
  // positive, as in the SM80 kernel); 0 becomes FLT_MIN.
  const bool negate_q = p.scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(p.scale_log2), FLT_MIN);
  const int n_hi = it.n_hi, n_lo = it.n_lo;
  // The masked softmax of key tile n's scores (in acc_s), and the correction of the output.
  auto softmax_of = [&](int n, float (&corr)[kRows]) {
    if (n >= it.n_first_masked) apply_causal_mask<kBlockN>(s, tScS_rc, s_limit, n);
    softmax.update(s, scale_log2, corr);
  };
  auto keep_p = [&]() {
    Tensor converted = convert_fragment<Element>(acc_s);
    cute::copy(converted, rP);
  };

  // ---- prologue: Q and K[n_hi - 1]; S of the last key tile while K[n_hi - 2] and V[n_hi - 1]
  // load; its softmax (the output is still 0: nothing to rescale).
  loads.query_tile(sQ_rows);
  loads.k_tile(sK_rows(_, _, stage(n_hi - 1)), n_hi - 1);
  cp_async_commit();
  tiles_landed();
  if (negate_q) {
    uint32_t* q_words = reinterpret_cast<uint32_t*>(smem_q);
    for (int i = tid; i < Traits::kSmemQElems / 2; i += kNThreads) q_words[i] ^= 0x80008000u;  // sign bits
    fence_proxy_async_shared();
    __syncthreads();
  }
  if (n_hi - 1 > n_lo) loads.k_tile(sK_rows(_, _, stage(n_hi - 2)), n_hi - 2);
  loads.v_tile(sV_rows(_, _, stage(n_hi - 1)), n_hi - 1);
  cp_async_commit();
  warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK(_, _, _, stage(n_hi - 1)), acc_s);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);
  {
    float corr[kRows];
    softmax_of(n_hi - 1, corr);
  }
  keep_p();

  // ---- key tile n: S of tile n on the tensor cores together with P V of tile n + 1; the
  // softmax of tile n while that P V runs; then the output rescaled, once P V is done.
  for (int n = n_hi - 2; n >= n_lo; --n) {
    tiles_landed();  // K[n], V[n + 1]; every warpgroup is done with K[n + 1] and V[n + 2]
    if (n > n_lo) loads.k_tile(sK_rows(_, _, stage(n - 1)), n - 1);
    loads.v_tile(sV_rows(_, _, stage(n)), n);
    cp_async_commit();
    warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK(_, _, _, stage(n)), acc_s);
    warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_o, tOrP, tOrV(_, _, _, stage(n + 1)), acc_o);
    warpgroup_wait<1>();  // S of tile n
    warpgroup_fence_operand(acc_s);
    float corr[kRows];
    softmax_of(n, corr);
    warpgroup_wait<0>();  // P V of tile n + 1
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(tOrP);
    softmax.rescale_output(acc_o_rc, corr);
    keep_p();
  }

  // ---- the last P V
  tiles_landed();  // V[n_lo]
  warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_o, tOrP, tOrV(_, _, _, stage(n_lo)), acc_o);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);

  float lse[kRows];
  softmax.finish(acc_o_rc, scale_log2, lse);
  if (it.split()) {
    Tensor tOcO = thr_mma_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    write_split_partial<kBlockM, kHeadDim>(ws, it.partial, acc_o, tOcO, tScS_rc, lse);
    return;
  }
  // Output through the Q buffer: its last reader, the last S = Q K^T, was waited for
  // before the barrier inside the last iteration.
  write_output<kBlockM, kHeadDim, kNThreads, kRows, Element>(
      p, it, s_pos, convert_fragment<Element>(acc_o), sQ_rows,
      make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_o), tScS_rc, lse);
#endif
}

}  // namespace ra
}  // namespace cram
