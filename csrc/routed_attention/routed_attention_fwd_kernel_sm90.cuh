// Forward of routed attention on Hopper (sm_90a): the SM80 kernel's work plan, gathers,
// causal mask, online softmax and epilogues (routed_attention_fwd_common.cuh), with the two
// GEMMs on warpgroup MMAs (wgmma) and the key/value tiles brought in by TMA. One CTA per
// work item, warp-specialised (as FlashAttention-3):
//   - kBlockM / 64 consumer warpgroups, each owning 64 query rows:
//       S = Q K^T   wgmma with both operands in shared memory;
//       O += P V    wgmma with P in registers (the softmax's output, never stored) and V in
//                   shared memory read transposed by the tensor cores (an MN-major operand);
//   - one producer warpgroup, of which one thread issues the TMA copies of K and V into
//     kStages stages each, and gives its registers to the consumers (setmaxnreg).
// Each stage has a "full" mbarrier (the copy's bytes landed) and an "empty" one (every
// consumer warp is done with it), so the consumers never wait on each other inside the key
// loop, and the loads need neither their registers nor their issue slots.
// Key tile n's S = Q K^T and tile n + 1's P V are issued together; the softmax of tile n
// runs on the other units while P V runs on the tensor cores, and the output is rescaled
// once P V is done (FlashAttention-3's overlap within a warpgroup).
//
// The gathered query rows are not a box: the consumers load them with cp.async (once per
// work item). The layouts are the canonical 128-byte-swizzled wgmma layouts; for 16-bit
// elements they place every element where TMA's 128-byte swizzle and the row loads
// (load_rows_async, SmemRowAtom) put it, so the loads and the output's store see the same
// bytes through SmemRowAtom tilings.
#pragma once

#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "routed_attention/routed_attention_fwd_common.cuh"
#include "routed_attention/routed_attention_tma.cuh"
#include "routed_attention/routed_attention_wgmma.cuh"

namespace cram {
namespace ra {

template <int kHeadDim_, int kBlockM_, int kBlockN_, class Element_>
struct FwdTraitsSm90 {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kWarpGroups = kBlockM / 64;        // consumers (MMA and softmax)
  static constexpr int kConsumerThreads = 128 * kWarpGroups;
  static constexpr int kNThreads = kConsumerThreads + 128;  // and the producer warpgroup
  // Registers a thread after the reallocation: the producer keeps the minimum, the
  // consumers take the rest of the 64 K (168 each at launch, with 384 threads).
  static constexpr int kProducerRegisters = 24;
  static constexpr int kConsumerRegisters = 240;
  static_assert(kWarpGroups == 2, "the register split is for two consumer warpgroups");
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
  // The query row loads' and the output's view of Q's bytes.
  using SmemRowLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));

  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutK{}))::value;  // every stage
  static constexpr int kTileElems = kBlockN * kHeadDim;                        // one stage
  static constexpr int kTileBytes = kTileElems * int(sizeof(Element));
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
    routed_attention_fwd_kernel_sm90(const __grid_constant__ RoutedAttentionParams p, const FwdPlanSizes sizes,
                                     const __grid_constant__ KvTensorMaps maps) {
#if defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  using Element = typename Traits::Element;
  using Barrier = cutlass::arch::ClusterTransactionBarrier;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;
  constexpr int kConsumerThreads = Traits::kConsumerThreads;
  constexpr int kStages = Traits::kStages;

  extern __shared__ __align__(1024) char smem_sm90[];  // the 128-byte swizzle repeats every 1024 bytes
  __shared__ int s_scratch[kNThreads / 32];
  __shared__ int s_pos[kBlockM];
  __shared__ int s_limit[kBlockM];
  // K and V stage s: full_*[s] completes when its copy has landed, empty_*[s] when every
  // consumer warp has finished the MMAs that read it.
  __shared__ uint64_t full_k[kStages], full_v[kStages], empty_k[kStages], empty_v[kStages];

  const int tid = threadIdx.x;
  if (tid == 0) {
#pragma unroll
    for (int s = 0; s < kStages; ++s) {
      Barrier::init(&full_k[s], 1);
      Barrier::init(&full_v[s], 1);
      Barrier::init(&empty_k[s], kConsumerThreads / 32);
      Barrier::init(&empty_v[s], kConsumerThreads / 32);
    }
    cutlass::arch::fence_barrier_init();
  }
  // fwd_item's block-wide barriers also publish the initialised mbarriers.
  const FwdWorkspace ws(p.workspace, sizes, kBlockM);
  FwdItem it;
  if (!fwd_item<kBlockM, kBlockN, kNThreads>(p, ws, it, s_pos, s_limit, s_scratch)) return;

  Element* smem_q = reinterpret_cast<Element*>(smem_sm90);
  Element* smem_k = smem_q + Traits::kSmemQElems;
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  // Key tiles run from n_hi - 1 down to n_lo; the i-th of them (i = n_hi - 1 - n) uses stage
  // i % kStages for the (i / kStages)-th time, whose barrier phase has that parity.
  const int n_hi = it.n_hi, n_lo = it.n_lo, n_tiles = n_hi - n_lo;
  auto stage = [](int i) { return i % kStages; };
  auto phase = [](int i) { return static_cast<uint32_t>((i / kStages) & 1); };

  // ---- producer: one thread copies K and V tile after tile, each once its stage is free.
  if (tid >= kConsumerThreads) {
    cutlass::arch::warpgroup_reg_dealloc<Traits::kProducerRegisters>();
    if (tid == kConsumerThreads) {
      const int kv_head = it.h / (p.num_heads / p.num_kv_heads);
      for (int i = 0; i < n_tiles; ++i) {
        const int n = n_hi - 1 - i, s = stage(i);
        // Waiting on the parity before the first phase returns at once: the stages start free.
        Barrier::wait(&empty_k[s], phase(i) ^ 1);
        Barrier::arrive_and_expect_tx(&full_k[s], Traits::kTileBytes);
        tma_load_key_tile<kHeadDim, kBlockN>(&maps.k, &full_k[s], smem_k + s * Traits::kTileElems, n, kv_head, it.b);
        Barrier::wait(&empty_v[s], phase(i) ^ 1);
        Barrier::arrive_and_expect_tx(&full_v[s], Traits::kTileBytes);
        tma_load_key_tile<kHeadDim, kBlockN>(&maps.v, &full_v[s], smem_v + s * Traits::kTileElems, n, kv_head, it.b);
      }
    }
    return;
  }
  cutlass::arch::warpgroup_reg_alloc<Traits::kConsumerRegisters>();

  // ---- consumers
  const FwdRowLoads<Element, kBlockM, kBlockN, kHeadDim, kConsumerThreads> loads(p, it, s_pos);
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutK{});
  Tensor sVt = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutVt{});
  Tensor sQ_rows = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemRowLayoutQ{});
  auto wait_k = [&](int i) { Barrier::wait(&full_k[stage(i)], phase(i)); };
  auto wait_v = [&](int i) { Barrier::wait(&full_v[stage(i)], phase(i)); };
  // After warpgroup_wait has seen the MMAs reading the stage complete (in every lane of the warp).
  auto release_k = [&](int i) {
    if (tid % 32 == 0) Barrier::arrive(&empty_k[stage(i)]);
  };
  auto release_v = [&](int i) {
    if (tid % 32 == 0) Barrier::arrive(&empty_v[stage(i)]);
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
  // The masked softmax of key tile n's scores (in acc_s), and the correction of the output.
  auto softmax_of = [&](int n, float (&corr)[kRows]) {
    if (n >= it.n_first_masked) apply_causal_mask<kBlockN>(s, tScS_rc, s_limit, n);
    softmax.update(s, scale_log2, corr);
  };
  auto keep_p = [&]() {
    Tensor converted = convert_fragment<Element>(acc_s);
    cute::copy(converted, rP);
  };

  // ---- prologue: the gathered Q (cp.async writes through the generic proxy, wgmma reads
  // through the async one: fenced before the barrier that publishes it, which also
  // publishes s_limit); S of the last key tile and its softmax (nothing to rescale yet).
  loads.query_tile(sQ_rows);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async_shared();
  sync_threads<kConsumerThreads>();
  if (negate_q) {
    uint32_t* q_words = reinterpret_cast<uint32_t*>(smem_q);
    for (int i = tid; i < Traits::kSmemQElems / 2; i += kConsumerThreads) q_words[i] ^= 0x80008000u;  // sign bits
    fence_proxy_async_shared();
    sync_threads<kConsumerThreads>();
  }
  wait_k(0);
  warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK(_, _, _, stage(0)), acc_s);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_s);
  release_k(0);
  {
    float corr[kRows];
    softmax_of(n_hi - 1, corr);
  }
  keep_p();

  // ---- key tile i (n = n_hi - 1 - i): S of tile i on the tensor cores together with P V of
  // tile i - 1; the softmax of tile i while that P V runs; then the output rescaled, once
  // P V is done.
  for (int i = 1; i < n_tiles; ++i) {
    const int n = n_hi - 1 - i;
    wait_k(i);
    wait_v(i - 1);
    warpgroup_gemm_issue</*kZeroInit=*/true, /*kRegisterA=*/false>(mma_s, tSrQ, tSrK(_, _, _, stage(i)), acc_s);
    warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_o, tOrP, tOrV(_, _, _, stage(i - 1)), acc_o);
    warpgroup_wait<1>();  // S of tile i
    warpgroup_fence_operand(acc_s);
    release_k(i);
    float corr[kRows];
    softmax_of(n, corr);
    warpgroup_wait<0>();  // P V of tile i - 1
    warpgroup_fence_operand(acc_o);
    warpgroup_fence_operand(tOrP);
    release_v(i - 1);
    softmax.rescale_output(acc_o_rc, corr);
    keep_p();
  }

  // ---- the last P V
  wait_v(n_tiles - 1);
  warpgroup_gemm_issue</*kZeroInit=*/false, /*kRegisterA=*/true>(mma_o, tOrP, tOrV(_, _, _, stage(n_tiles - 1)), acc_o);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);

  float lse[kRows];
  softmax.finish(acc_o_rc, scale_log2, lse);
  if (it.split()) {
    Tensor tOcO = thr_mma_o.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    write_split_partial<kBlockM, kHeadDim>(ws, it.partial, acc_o, tOcO, tScS_rc, lse);
    return;
  }
  // Output through the Q buffer: a warpgroup's accumulator rows are its own Q rows, whose
  // last reader, its last S = Q K^T, it has waited for.
  write_output<kBlockM, kHeadDim, kConsumerThreads, kRows, Element>(
      p, it, s_pos, convert_fragment<Element>(acc_o), sQ_rows,
      make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, mma_o), tScS_rc, lse);
#endif
}

}  // namespace ra
}  // namespace cram
