// Forward of routed attention on Hopper (sm_90a): the SM80 kernel's work plan, gathers,
// causal mask, online softmax and epilogues (routed_attention_fwd_common.cuh), with the two
// GEMMs on warpgroup MMAs (wgmma) instead of SM80 MMA atoms. One CTA of kBlockM / 64
// warpgroups per work item; each warpgroup owns 64 query rows:
//   S = Q K^T   wgmma with both operands in shared memory (no ldmatrix, no register copies);
//   O += P V    wgmma with P in registers (the softmax's output, never stored) and V in
//               shared memory read transposed by the tensor cores (an MN-major operand).
// Shared memory holds the gathered Q tile and one K and one V tile, loaded with cp.async in
// the SM80 kernel's order (V[n] while S[n] is computed, K[n - 1] during the softmax and
// P V[n]). cp.async writes through the generic proxy and wgmma reads through the async
// proxy, so each landed tile is fenced (fence.proxy.async) before the barrier that
// publishes it.
//
// The layouts are the canonical 128-byte-swizzled wgmma layouts; for 16-bit elements they
// place every element where the row loads (load_rows_async, SmemRowAtom) put it, so the
// loads and the output's store see the same bytes through SmemRowAtom tilings.
#pragma once

#include <cute/atom/mma_traits_sm90_gmma.hpp>

#include "routed_attention/routed_attention_fwd_common.cuh"

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
  // key) operand of P V, its atoms tiled down the keys first as the rows were loaded.
  using SmemLayoutQ = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(GMMA::Layout_K_SW128_Atom<Element>{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutVt = decltype(tile_to_shape(GMMA::Layout_MN_SW128_Atom<Element>{},
                                              Shape<Int<kHeadDim>, Int<kBlockN>>{}, Step<_2, _1>{}));
  // The row loads' and the output's views of the same bytes.
  using SmemRowLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemRowLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));

  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutKV{}))::value;
  static constexpr int kSmemBytes = (kSmemQElems + 2 * kSmemKVElems) * int(sizeof(Element));
};

// Tile shapes per head dim (both dtypes): 128 query rows (two warpgroups) and 128 keys.
template <int kHeadDim>
struct FwdConfigSm90 {
  static constexpr int kBlockM = 128;
  static constexpr int kBlockN = 128;
};

// acc (+)= A B over the K mode with one batch of warpgroup MMAs, waited for. A is in
// registers (kRegisterA) or in shared memory (descriptors).
template <bool kZeroInit, bool kRegisterA, class TiledMma, class FragA, class FragB, class Acc>
__device__ __forceinline__ void warpgroup_gemm(TiledMma& mma, FragA& a, const FragB& b, Acc& acc) {
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
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
  if constexpr (kRegisterA) warpgroup_fence_operand(a);
}

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
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
  Tensor sQ_rows = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemRowLayoutQ{});
  Tensor sK_rows = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemRowLayoutKV{});
  Tensor sV_rows = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemRowLayoutKV{});

  // A tile landed: this thread's cp.async writes are complete and ordered before the
  // tensor cores' reads, then the barrier publishes everyone's.
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
  Tensor tSrK = thr_mma_s.partition_fragment_B(sK);
  Tensor tOrV = thr_mma_o.partition_fragment_B(sVt);
  Tensor acc_o = partition_fragment_C(mma_o, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma_s.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;

  // ---- prologue: Q and the last key tile in flight
  loads.query_tile(sQ_rows);
  loads.k_tile(sK_rows, it.n_hi - 1);
  cp_async_commit();

  OnlineSoftmax<kRows> softmax;
  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_rowcol_layout(acc_o.layout()));
  // A negative scale is applied by negating Q in shared memory (the softmax needs it
  // positive, as in the SM80 kernel); 0 becomes FLT_MIN.
  const bool negate_q = p.scale_log2 < 0.f;
  const float scale_log2 = fmaxf(fabsf(p.scale_log2), FLT_MIN);

  for (int n = it.n_hi - 1; n >= it.n_lo; --n) {
    Tensor acc_s = partition_fragment_C(mma_s, Shape<Int<kBlockM>, Int<kBlockN>>{});
    tiles_landed();  // K[n] (and Q) landed; every warpgroup is done with V[n + 1]
    if (negate_q && n == it.n_hi - 1) {
      uint32_t* q_words = reinterpret_cast<uint32_t*>(smem_q);
      for (int i = tid; i < Traits::kSmemQElems / 2; i += kNThreads) q_words[i] ^= 0x80008000u;  // sign bits
      fence_proxy_async_shared();
      __syncthreads();
    }
    loads.v_tile(sV_rows, n);
    cp_async_commit();

    warpgroup_gemm</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK, acc_s);

    tiles_landed();  // V[n] landed; every warpgroup is done with K[n]
    if (n > it.n_lo) {
      loads.k_tile(sK_rows, n - 1);
      cp_async_commit();
    }

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    if (n >= it.n_first_masked) apply_causal_mask<kBlockN>(s, tScS_rc, s_limit, n);
    softmax.update(s, acc_o_rc, scale_log2);

    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_to_a_layout(rP.layout()));
    warpgroup_gemm</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_o, tOrP, tOrV, acc_o);
  }

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
