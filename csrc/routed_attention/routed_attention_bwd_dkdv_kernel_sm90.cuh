// dK and dV (and the fused dQ) of routed attention on Hopper (sm_90a): the SM80 dK/dV
// kernel's work (DkvTile: one CTA per key tile, jobs of kBlockM gathered query rows, Q and dO
// of the next job loaded with cp.async during this one) with its GEMMs on warpgroup MMAs.
// Each of the two warpgroups owns 64 of the tile's 128 keys and computes the transposed
// scores, so that P^T and dS^T leave the accumulators already as the A operands of dV and dK:
//   S^T  = K Q^T      (keys, queries), both operands in shared memory
//   dP^T = V dO^T     likewise
//   dV  += P^T dO     P^T in registers, dO read transposed (MN-major) from shared memory
//   dK  += dS^T Q     likewise
//   dQ   = dS K       (fused dQ only) both warpgroups store dS^T to shared memory, read back
//                     as an MN-major A; K as an MN-major B; each warpgroup one half of the
//                     head dim; summed into the workspace by a bulk reduction as in SM80.
// cp.async and the dS^T stores write through the generic proxy and wgmma reads through the
// async proxy, so each is fenced (fence.proxy.async) before the barrier that publishes it.
#pragma once

#include "routed_attention/routed_attention_bwd_common.cuh"
#include "routed_attention/routed_attention_wgmma.cuh"

namespace cram {
namespace ra {

template <int kHeadDim_, int kBlockM_, int kBlockN_, class Element_>
struct DkvTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // gathered query rows per job
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kWarpGroups = kBlockN / 64;
  static constexpr int kNThreads = 128 * kWarpGroups;
  static_assert(kBlockM == 64, "one warpgroup's rows of dQ; the dQ accumulator's padding");
  static_assert(kBlockN % 64 == 0 && kHeadDim % 64 == 0);

  // Warpgroups stacked along the keys (M) for S^T, dP^T, dV, dK; along the head dim (N) for dQ.
  using AlongM = Layout<Shape<Int<kWarpGroups>, _1, _1>>;
  using AlongN = Layout<Shape<_1, Int<kWarpGroups>, _1>>;
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockM>, Int<kHeadDim>>>(), AlongM{}));
  using TiledMmaDkv = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockM>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      AlongM{}));
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim / kWarpGroups>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      AlongN{}));

  // The MMAs' views: K, V, Q, dO as K-major (row, head dim) tiles; K, Q, dO also as the
  // MN-major (head dim, row) operands, atoms tiled down the rows first as the rows were
  // loaded; Q and dO with two stages (the last mode). dS as the MN-major (query, key) A of
  // dQ, and the same bytes as (key, query) for the stores from the S^T accumulators.
  static constexpr int kStages = 2;
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutKVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                               Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{}));
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{},
                                             Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                              Step<_2, _1, _3>{}));
  using SmemLayoutdS = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutdSt =
      decltype(composition(SmemLayoutdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  // The row loads' and the dK / dV stores' views of the same bytes.
  using SmemRowLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemRowLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));

  using SmemCopyAtomC = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemKVElems = decltype(size(SmemLayoutKV{}))::value;
  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;  // both stages
  static constexpr int kSmemdSElems = decltype(size(SmemLayoutdS{}))::value;
  // K, V, two stages of Q and dO, dS.
  static constexpr int kSmemBytes = (2 * kSmemKVElems + 2 * kSmemQElems + kSmemdSElems) * int(sizeof(Element));
  // The fused dQ path adds two float (kBlockM, kHeadDim) staging tiles for the bulk reductions.
  static constexpr int kSmemDqElems = kBlockM * kHeadDim;
  static constexpr int kSmemBytesFusedDq = kSmemBytes + 2 * kSmemDqElems * int(sizeof(float));
};

template <int kHeadDim>
struct DkvConfigSm90 {
  static constexpr int kBlockM = kDkvBlockM;
  static constexpr int kBlockN = 128;
};

// Built for every arch of the build, empty but for sm_90a (the launcher only runs it there).
template <class Traits, bool kFusedDq>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    routed_attention_bwd_dkdv_kernel_sm90(const __grid_constant__ RoutedAttentionParams p) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(1024) char smem_sm90[];  // the 128-byte swizzle repeats every 1024 bytes
  __shared__ int s_limit[2][kBlockM];
  __shared__ float s_lse[2][kBlockM];
  __shared__ float s_delta[2][kBlockM];

  const int tid = threadIdx.x;
  const DkvTile<Element, kBlockM, kBlockN, kHeadDim, kNThreads> tile(p);
  const int n_jobs = tile.n_jobs;

  // ---- shared memory: each tile seen by the MMAs and by the row loads / stores
  Element* smem_k = reinterpret_cast<Element*>(smem_sm90);
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Element* smem_q = smem_v + Traits::kSmemKVElems;
  Element* smem_do = smem_q + Traits::kSmemQElems;
  Element* smem_ds = smem_do + Traits::kSmemQElems;
  float* smem_dq = reinterpret_cast<float*>(smem_ds + Traits::kSmemdSElems);  // kFusedDq only
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKVt{});
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{});
  Tensor sQt = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQt{});
  Tensor sdOt = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQt{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutdS{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutdSt{});
  Tensor sK_rows = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemRowLayoutKV{});
  Tensor sV_rows = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemRowLayoutKV{});
  Tensor sQ_rows = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemRowLayoutQ{});
  Tensor sdO_rows = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemRowLayoutQ{});

  tile.load_kv(sK_rows, sV_rows);
  auto load_job = [&](int jb, int stage) {
    tile.load_job(jb, sQ_rows(_, _, stage), sdO_rows(_, _, stage), s_limit[stage], s_lse[stage], s_delta[stage]);
  };
  if (n_jobs > 0) load_job(0, 0);
  cp_async_commit();

  // ---- MMA partitions (shared-memory operands are descriptors; Q, dO per stage)
  typename Traits::TiledMmaSdP mma_sdp;
  typename Traits::TiledMmaDkv mma_dkv;
  typename Traits::TiledMmaDq mma_dq;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  auto thr_dkv = mma_dkv.get_thread_slice(tid);
  auto thr_dq = mma_dq.get_thread_slice(tid);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);
  Tensor tdPrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);     // (MMA, MMA_N, MMA_K, stage)
  Tensor tdPrdO = thr_sdp.partition_fragment_B(sdO);  // likewise
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  // (key, query) of each element of the S^T accumulators; the dS^T stores' destinations.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockN>, Int<kBlockM>>{}));
  Tensor tdSsdSt = thr_sdp.partition_C(sdSt);
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  clear(acc_dk);
  clear(acc_dv);
  const float scale_log2 = p.scale_log2;

  for (int jb = 0; jb < n_jobs; ++jb) {
    const int stage = jb & 1;
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // job jb landed (and K, V); every warpgroup is done with job jb - 1
    if (jb + 1 < n_jobs) {
      load_job(jb + 1, stage ^ 1);
      cp_async_commit();
    }
    if constexpr (kFusedDq) {
      if (tid == 0 && jb > 0) tile.reduce_dq(jb - 1, smem_dq + ((jb - 1) & 1) * Traits::kSmemDqElems);
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockN>, Int<kBlockM>>{});
    warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_s);
    warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_sdp, tdPrV, tdPrdO(_, _, _, stage), acc_dp);
    warpgroup_wait<0>();
    warpgroup_fence_operand(acc_s);
    warpgroup_fence_operand(acc_dp);

    // P^T = exp2(S^T * scale * log2e - lse * log2e), 0 at the keys a query does not see;
    // dS^T = P^T * (dP^T - delta). Both per query, a column here.
    const int* limit = s_limit[stage];
    const float* lse = s_lse[stage];
    const float* delta = s_delta[stage];
#pragma unroll
    for (int e = 0; e < decltype(size(acc_s))::value; ++e) {
      const int j = tile.j0 + get<0>(tScS(e)), q = get<1>(tScS(e));
      const float pr = j > limit[q] ? 0.f : exp2f(acc_s(e) * scale_log2 - lse[q]);
      acc_s(e) = pr;
      acc_dp(e) = pr * (acc_dp(e) - delta[q]);
    }
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor rdS = convert_fragment<Element>(acc_dp);
    if constexpr (kFusedDq) cute::copy(rdS, tdSsdSt);
    Tensor tdVrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    Tensor tdKrdS = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
    warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), acc_dv);
    warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), acc_dk);

    if constexpr (kFusedDq) {
      // dQ of this job into staging buffer jb & 1, which thread 0 hands to the TMA unit at
      // the top of the next job; before the barrier it waits until the reduction of job
      // jb - 2 has read that buffer.
      if (tid == 0) bulk_wait_read<1>();
      fence_proxy_async_shared();
      __syncthreads();  // dS^T complete from both warpgroups; the staging buffer free
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_dq, tdQrdS, tdQrKt, acc_dq);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_dq);
      float* staging = smem_dq + stage * Traits::kSmemDqElems;
#pragma unroll
      for (int e = 0; e < decltype(size(acc_dq))::value; e += 2) {
        const int r = get<0>(tdQcdQ(e)), d = get<1>(tdQcdQ(e));  // elements e, e + 1: columns d, d + 1
        *reinterpret_cast<float2*>(staging + r * kHeadDim + d) = make_float2(acc_dq(e), acc_dq(e + 1));
      }
      fence_proxy_async_shared();
    }
    warpgroup_wait<0>();  // dV, dK: done with rP, rdS and with this stage of Q, dO
    warpgroup_fence_operand(acc_dv);
    warpgroup_fence_operand(acc_dk);
    warpgroup_fence_operand(tdVrP);
    warpgroup_fence_operand(tdKrdS);
  }

  // ---- epilogue: dK * scale and dV through shared memory (the K / V buffers) to every key row.
#pragma unroll
  for (int e = 0; e < decltype(size(acc_dk))::value; ++e) acc_dk(e) *= p.softmax_scale;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  cp_async_wait<0>();
  __syncthreads();  // every warpgroup's MMAs are done with sK / sV, and no load is in flight
  if constexpr (kFusedDq) {
    if (tid == 0 && n_jobs > 0) tile.reduce_dq(n_jobs - 1, smem_dq + ((n_jobs - 1) & 1) * Traits::kSmemDqElems);
  }
  auto copy_c = make_tiled_copy_C(typename Traits::SmemCopyAtomC{}, mma_dkv);
  auto thr_copy_c = copy_c.get_thread_slice(tid);
  cute::copy(copy_c, thr_copy_c.retile_S(rdK), thr_copy_c.partition_D(sK_rows));
  cute::copy(copy_c, thr_copy_c.retile_S(rdV), thr_copy_c.partition_D(sV_rows));
  __syncthreads();
  tile.store_dkdv(sK_rows, sV_rows);
  if constexpr (kFusedDq) {
    if (tid == 0) bulk_wait_read<0>();  // shared memory must outlive the last reduction's read
  }
#endif
}

}  // namespace ra
}  // namespace cram
