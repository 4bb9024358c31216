// Backward of routed attention:
//
// 1. preprocess: for every routed slot i of row b and head h, delta = rowsum(dO * O) and
//    lse * log2(e), stored compacted by slot ([B, H, T] fp32, slot order) in the workspace;
//    zeros in the rows of grad_q that are not routed (and, on the fast path, in the dQ
//    accumulator's routed slots).
// 2. dK/dV: one CTA per (key tile, kv head, batch row). The routed queries that see the key
//    tile are the slots i >= i0 with index[b, i] + (S - T) >= j0 (index is sorted: i0 by a
//    binary search on the device). The CTA loops over every head of its GQA group and over
//    those slots in chunks of kBlockM gathered rows, recomputes P and dS, and accumulates
//    dV += P^T dO and dK += dS^T Q in registers. Every key row is written (zeros where no
//    routed query sees it). On the fast path (p.fused_dq) it also computes
//    dQ = dS K for each chunk and adds it to a float accumulator ordered by slot with one
//    bulk reduction (the order of the additions varies, so dQ's last bits do).
// 3. fast path: a convert kernel scales the accumulator and scatters it to the routed rows.
//    deterministic: a dQ kernel, one CTA per routed query tile (the forward's tiling),
//    loops over its key tiles, recomputing S and dP: dQ += dS K, written to the routed rows.
//    Two more matmuls, but each dQ row is written by one CTA, bitwise reproducible.
#pragma once

#include "routed_attention/routed_attention_bwd_common.cuh"

namespace cram {
namespace ra {

// ------------------------------------------------------------------ preprocess

// Blocks from row_blocks on write zeros to the rows of grad_q that are not routed (the dQ
// kernel writes the routed ones).
template <int kHeadDim, class Element>
__global__ void __launch_bounds__(256)
    routed_attention_bwd_preprocess_kernel(const __grid_constant__ RoutedAttentionParams p, int row_blocks) {
  if (static_cast<int>(blockIdx.x) >= row_blocks) {
    fill_unrouted_rows<256>(p, p.grad_q, p.num_heads * kHeadDim * static_cast<int>(sizeof(Element)), nullptr,
                            blockIdx.x - row_blocks, gridDim.x - row_blocks);
    return;
  }
  constexpr int kThreadsPerRow = kHeadDim / 8;  // 16 bytes each
  constexpr int kRowsPerBlock = 256 / kThreadsPerRow;
  static_assert(kThreadsPerRow <= 32 && 32 % kThreadsPerRow == 0);
  const int H = p.num_heads, T = p.seqlen_q;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kThreadsPerRow;
  const int lane = threadIdx.x % kThreadsPerRow;
  const int64_t total = static_cast<int64_t>(p.batch) * T * H;
  // Rows in (b, slot, h) order, h fastest: neighbouring rows are neighbouring in memory.
  const bool in_range = row < total;
  const int h = in_range ? static_cast<int>(row % H) : 0;
  const int64_t bs = in_range ? row / H : 0;
  const int slot = static_cast<int>(bs % T);
  const int b = static_cast<int>(bs / T);
  const int count = in_range ? clamped_count(p.counts, b, T) : 0;
  const bool has_slot = in_range && slot < count;
  const int t = has_slot ? routed_position(p, b, slot, count) : -1;

  float acc = 0.f;
  if (t >= 0) {
    const Element* o = static_cast<const Element*>(p.out) + b * p.out_batch_stride + t * p.out_row_stride +
                       h * p.out_head_stride + lane * 8;
    const Element* d = static_cast<const Element*>(p.grad_out) + b * p.do_batch_stride + t * p.do_row_stride +
                       h * p.do_head_stride + lane * 8;
    const uint4 ov = *reinterpret_cast<const uint4*>(o);
    const uint4 dv = *reinterpret_cast<const uint4*>(d);
    const Element* oe = reinterpret_cast<const Element*>(&ov);
    const Element* de = reinterpret_cast<const Element*>(&dv);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc += static_cast<float>(oe[i]) * static_cast<float>(de[i]);
  }
#pragma unroll
  for (int o = kThreadsPerRow / 2; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (has_slot && p.fused_dq) {  // the fused dQ path adds into these rows
    const BwdWorkspace ws(p.workspace, p.batch, H, T);
    float4* z = reinterpret_cast<float4*>(
        ws.dq_accum + ((static_cast<int64_t>(b) * H + h) * BwdWorkspace::padded_slots(T) + slot) * kHeadDim + lane * 8);
    z[0] = make_float4(0.f, 0.f, 0.f, 0.f);
    z[1] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  if (lane == 0 && has_slot) {
    const BwdWorkspace ws(p.workspace, p.batch, H, T);
    const int64_t bh = static_cast<int64_t>(b) * H + h;
    ws.lse_log2[bh * T + slot] = t >= 0 ? p.lse[bh * T + t] * kLog2e : INFINITY;
    ws.delta[bh * T + slot] = acc;
  }
}

// ------------------------------------------------------------------ dQ

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, class Element_>
struct DqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 64 == 0);
  static_assert(kBlockM % (16 * kNWarps) == 0);
  static_assert(kBlockM <= kNThreads);

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>, Tile<Int<16 * kNWarps>, _16, _16>>;

  using SmemLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  // K seen as (D, kBlockN): the B operand of dS @ K.
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutKtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutKV{}))::value;
  // Q, dO, and two stages of K and V.
  static constexpr int kSmemBytes = (2 * kSmemQElems + 4 * kSmemKVElems) * int(sizeof(Element));
};

template <int kHeadDim>
struct DqConfig {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = 64;
  static constexpr int kNWarps = 4;
};

template <class Traits>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    routed_attention_bwd_dq_kernel(const __grid_constant__ RoutedAttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(128) char smem[];
  __shared__ int s_scratch[kNThreads / 32 + 2];
  __shared__ int s_pos[kBlockM];

  const int tid = threadIdx.x;
  const int T = p.seqlen_q, S = p.seqlen_k, H = p.num_heads, shift = S - T;

  QueryTile tile;
  const int n_tiles = locate_query_tile<kNThreads>(p, kBlockM, blockIdx.x, tile, s_scratch);
  if (static_cast<int>(blockIdx.x) >= n_tiles) return;
  const int b = tile.b, h = tile.h;

  const int my_pos = tid < kBlockM ? routed_position(p, b, tile.slot0 + tid, tile.slot_end()) : -1;
  if (tid < kBlockM) s_pos[tid] = my_pos;
  const int t_min = block_allreduce<kNThreads>(my_pos >= 0 ? my_pos : INT_MAX, s_scratch, OpMin{});
  const int t_max = block_allreduce<kNThreads>(my_pos, s_scratch, OpMax{});
  if (t_max < 0) return;
  const int n_key_tiles = (t_max + shift) / kBlockN + 1;
  const int n_first_masked = (t_min + shift + 1) / kBlockN;

  const int kv_head = h / (H / p.num_kv_heads);
  const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const Element* do_ptr = static_cast<const Element*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride;
  const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
  const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;

  Element* smem_q = reinterpret_cast<Element*>(smem);
  Element* smem_do = smem_q + Traits::kSmemQElems;
  Element* smem_k = smem_do + Traits::kSmemQElems;     // 2 stages
  Element* smem_v = smem_k + 2 * Traits::kSmemKVElems;  // 2 stages
  Tensor sQ = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sdO = make_tensor(make_smem_ptr(smem_do), typename Traits::SmemLayoutQ{});

  auto load_gathered = [&](auto& sX, const Element* base, int64_t row_stride) {
    load_rows_async<kBlockM, kHeadDim, kNThreads>(
        sX,
        [&](int r) -> const Element* {
          const int t = s_pos[r];
          return t >= 0 ? base + static_cast<int64_t>(t) * row_stride : nullptr;
        },
        base);
  };
  auto load_kv = [&](int n, int stage) {
    Tensor sK = make_tensor(make_smem_ptr(smem_k + stage * Traits::kSmemKVElems), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem_v + stage * Traits::kSmemKVElems), typename Traits::SmemLayoutKV{});
    auto key_row = [&](const Element* base, int64_t stride) {
      return [=](int r) -> const Element* {
        const int j = n * kBlockN + r;
        return j < S ? base + static_cast<int64_t>(j) * stride : nullptr;
      };
    };
    load_rows_async<kBlockN, kHeadDim, kNThreads>(sK, key_row(k_ptr, p.k_row_stride), k_ptr);
    load_rows_async<kBlockN, kHeadDim, kNThreads>(sV, key_row(v_ptr, p.v_row_stride), v_ptr);
  };

  typename Traits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tid);
  Tensor sK0 = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sKt0 = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKtNoSwizzle{});
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);
  Tensor tSrK = thr_mma.partition_fragment_B(sK0);
  Tensor tdPrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tdPrV = thr_mma.partition_fragment_B(sK0);
  Tensor tdQrKt = thr_mma.partition_fragment_B(sKt0);
  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});

  auto smem_tiled_copy_A = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_A = smem_tiled_copy_A.get_thread_slice(tid);
  auto smem_tiled_copy_B = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, tiled_mma);
  auto smem_thr_copy_B = smem_tiled_copy_B.get_thread_slice(tid);
  auto smem_tiled_copy_Bt = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, tiled_mma);
  auto smem_thr_copy_Bt = smem_tiled_copy_Bt.get_thread_slice(tid);
  Tensor tSsQ = smem_thr_copy_A.partition_S(sQ);
  Tensor tdPsdO = smem_thr_copy_A.partition_S(sdO);

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_mma.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;

  load_gathered(sQ, q_ptr, p.q_row_stride);
  load_gathered(sdO, do_ptr, p.do_row_stride);
  load_kv(n_key_tiles - 1, 0);
  cp_async_commit();

  const BwdWorkspace ws(p.workspace, p.batch, H, T);
  const int64_t bh_off = (static_cast<int64_t>(b) * H + h) * T;
  int row_limit[kRows];
  float row_lse[kRows], row_delta[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = get<0>(tScS_rc(i, 0));
    const int t = s_pos[r];
    row_limit[i] = (t >= 0 ? t : t_min) + shift;
    row_lse[i] = t >= 0 ? ws.lse_log2[bh_off + tile.slot0 + r] : INFINITY;  // bad row: P = 0
    row_delta[i] = t >= 0 ? ws.delta[bh_off + tile.slot0 + r] : 0.f;
  }
  clear(acc_dq);
  const float scale_log2 = p.scale_log2;

  for (int n = n_key_tiles - 1, it = 0; n >= 0; --n, ++it) {
    const int stage = it & 1;
    cp_async_wait<0>();
    __syncthreads();  // stage `stage` landed; every warp is done with the other stage
    if (n > 0) {
      load_kv(n - 1, stage ^ 1);
      cp_async_commit();
    }
    Tensor sK = make_tensor(make_smem_ptr(smem_k + stage * Traits::kSmemKVElems), typename Traits::SmemLayoutKV{});
    Tensor sV = make_tensor(make_smem_ptr(smem_v + stage * Traits::kSmemKVElems), typename Traits::SmemLayoutKV{});
    Tensor sKt = make_tensor(make_smem_ptr(smem_k + stage * Traits::kSmemKVElems), typename Traits::SmemLayoutKt{});

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, tSrQ, tSrK, tSsQ, smem_thr_copy_B.partition_S(sK), tiled_mma, smem_tiled_copy_A,
            smem_tiled_copy_B, smem_thr_copy_A, smem_thr_copy_B);
    gemm_ss(acc_dp, tdPrdO, tdPrV, tdPsdO, smem_thr_copy_B.partition_S(sV), tiled_mma, smem_tiled_copy_A,
            smem_tiled_copy_B, smem_thr_copy_A, smem_thr_copy_B);

    // dS = P * (dP - delta), P = exp2(s * scale * log2e - lse * log2e), masked keys P = 0.
    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));
    const bool need_mask = n >= n_first_masked;
    const int col0 = n * kBlockN;
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int j = col0 + get<1>(tScS_rc(0, c));
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const float pr = (need_mask && j > row_limit[i]) ? 0.f : exp2f(s(i, c) * scale_log2 - row_lse[i]);
        s(i, c) = pr * (dp(i, c) - row_delta[i]);
      }
    }
    Tensor rdS = convert_fragment<Element>(acc_s);
    Tensor tdQrdS = make_tensor(rdS.data(), acc_to_a_layout(rdS.layout()));
    gemm_rs(acc_dq, tdQrdS, tdQrKt, smem_thr_copy_Bt.partition_S(sKt), tiled_mma, smem_tiled_copy_Bt,
            smem_thr_copy_Bt);
  }

  // ---- epilogue: dQ * scale through smem (the Q buffer) to the routed rows.
#pragma unroll
  for (int e = 0; e < decltype(size(acc_dq))::value; ++e) acc_dq(e) *= p.softmax_scale;
  Tensor rdQ = convert_fragment<Element>(acc_dq);
  __syncthreads();  // every warp is done reading sQ / sdO
  auto smem_tiled_copy_O = make_tiled_copy_C(typename Traits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_copy_O = smem_tiled_copy_O.get_thread_slice(tid);
  cute::copy(smem_tiled_copy_O, smem_thr_copy_O.retile_S(rdQ), smem_thr_copy_O.partition_D(sQ));
  __syncthreads();
  Element* dq_ptr = static_cast<Element*>(p.grad_q) + b * p.dq_batch_stride + h * p.dq_head_stride;
  store_rows<kBlockM, kHeadDim, kNThreads>(sQ, [&](int r) -> Element* {
    const int t = s_pos[r];
    return t >= 0 ? dq_ptr + static_cast<int64_t>(t) * p.dq_row_stride : nullptr;
  });
}

// ------------------------------------------------------------------ dK / dV

template <int kHeadDim_, int kBlockM_, int kBlockN_, int kNWarps_, int kAtomMSdP_, int kAtomNdKV_, class Element_>
struct DkvTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = kBlockM_;  // gathered query rows per chunk
  static constexpr int kBlockN = kBlockN_;  // keys per CTA
  static constexpr int kNWarps = kNWarps_;
  static constexpr int kNThreads = kNWarps * 32;
  static constexpr int kAtomMSdP = kAtomMSdP_;  // warps along M in S = Q K^T, dP = dO V^T
  static constexpr int kAtomNdKV = kAtomNdKV_;  // warps along keys in dV = P^T dO, dK = dS^T Q
  static_assert(kHeadDim % 64 == 0);
  static_assert(kBlockM % 64 == 0 && kBlockN % 64 == 0, "64-column swizzle pages");
  static_assert(kBlockM <= kNThreads);
  static_assert(kNWarps % kAtomMSdP == 0 && kNWarps % kAtomNdKV == 0);

  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>, MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMmaSdP = TiledMMA<MmaAtom, Layout<Shape<Int<kAtomMSdP>, Int<kNWarps / kAtomMSdP>, _1>>,
                               Tile<Int<16 * kAtomMSdP>, Int<16 * kNWarps / kAtomMSdP>, _16>>;
  using TiledMmaDkv = TiledMMA<MmaAtom, Layout<Shape<Int<kAtomNdKV>, Int<kNWarps / kAtomNdKV>, _1>>,
                               Tile<Int<16 * kAtomNdKV>, Int<16 * kNWarps / kAtomNdKV>, _16>>;

  using SmemLayoutQ = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  using SmemLayoutQt =
      decltype(composition(SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutQtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutQt{}));
  using SmemLayoutKV = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));
  using SmemLayoutPdS = decltype(tile_to_shape(SmemRowAtom{}, Shape<Int<kBlockM>, Int<kBlockN>>{}));
  using SmemLayoutPdSt =
      decltype(composition(SmemLayoutPdS{}, make_layout(Shape<Int<kBlockN>, Int<kBlockM>>{}, GenRowMajor{})));
  using SmemLayoutPdStNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutPdSt{}));
  // K seen as (D, kBlockN): the B operand of dQ = dS K (the fused dQ path).
  using SmemLayoutKt =
      decltype(composition(SmemLayoutKV{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, GenRowMajor{})));
  using SmemLayoutKtNoSwizzle = decltype(get_nonswizzle_portion(SmemLayoutKt{}));

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;
  using SmemCopyAtomT = Copy_Atom<SM75_U16x8_LDSM_T, Element>;
  using SmemCopyAtomC = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  static constexpr int kSmemQElems = decltype(size(SmemLayoutQ{}))::value;
  static constexpr int kSmemKVElems = decltype(size(SmemLayoutKV{}))::value;
  static constexpr int kSmemPElems = decltype(size(SmemLayoutPdS{}))::value;
  // K, V, two stages of Q and dO, P, dS.
  static constexpr int kSmemBytes =
      (2 * kSmemKVElems + 4 * kSmemQElems + 2 * kSmemPElems) * int(sizeof(Element));
  // The fused dQ path adds two float (kBlockM, kHeadDim) staging tiles for the bulk reductions.
  static constexpr int kSmemDqBytes = kBlockM * kHeadDim * int(sizeof(float));
  static constexpr int kSmemBytesFusedDq = kSmemBytes + 2 * kSmemDqBytes;
};

template <int kHeadDim>
struct DkvConfig {
  static constexpr int kBlockM = kDkvBlockM;
  static constexpr int kBlockN = 128;
  static constexpr int kNWarps = 8;
  static constexpr int kAtomMSdP = 2;
  static constexpr int kAtomNdKV = 4;
};

// kFusedDq: also dQ = dS K for every job, staged in shared memory and added to the
// workspace's slot-ordered float accumulator with one bulk reduction a job (sm_90
// cp.reduce.async.bulk), instead of the dQ kernel that recomputes S and dP.
template <class Traits, bool kFusedDq>
__global__ void __launch_bounds__(Traits::kNThreads, 1)
    routed_attention_bwd_dkdv_kernel(const __grid_constant__ RoutedAttentionParams p) {
  using Element = typename Traits::Element;
  constexpr int kBlockM = Traits::kBlockM;
  constexpr int kBlockN = Traits::kBlockN;
  constexpr int kHeadDim = Traits::kHeadDim;
  constexpr int kNThreads = Traits::kNThreads;

  extern __shared__ __align__(128) char smem[];
  __shared__ int s_limit[2][kBlockM];
  __shared__ float s_lse[2][kBlockM];
  __shared__ float s_delta[2][kBlockM];

  const int tid = threadIdx.x;
  const DkvTile<Element, kBlockM, kBlockN, kHeadDim, kNThreads> tile(p);
  const int n_jobs = tile.n_jobs;

  Element* smem_k = reinterpret_cast<Element*>(smem);
  Element* smem_v = smem_k + Traits::kSmemKVElems;
  Element* smem_q = smem_v + Traits::kSmemKVElems;       // 2 stages
  Element* smem_do = smem_q + 2 * Traits::kSmemQElems;   // 2 stages
  Element* smem_p = smem_do + 2 * Traits::kSmemQElems;
  Element* smem_ds = smem_p + Traits::kSmemPElems;
  float* smem_dq = reinterpret_cast<float*>(smem_ds + Traits::kSmemPElems);  // kFusedDq only
  Tensor sK = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKV{});
  Tensor sV = make_tensor(make_smem_ptr(smem_v), typename Traits::SmemLayoutKV{});
  Tensor sP = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdS{});
  Tensor sdS = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdS{});
  Tensor sPt = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdSt{});
  Tensor sdSt = make_tensor(make_smem_ptr(smem_ds), typename Traits::SmemLayoutPdSt{});

  tile.load_kv(sK, sV);
  auto load_job = [&](int jb, int stage) {
    tile.load_job(jb,
                  make_tensor(make_smem_ptr(smem_q + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQ{}),
                  make_tensor(make_smem_ptr(smem_do + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQ{}),
                  s_limit[stage], s_lse[stage], s_delta[stage]);
  };
  if (n_jobs > 0) load_job(0, 0);
  cp_async_commit();

  // ---- MMA partitions
  typename Traits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tid);
  typename Traits::TiledMmaDkv mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tid);

  Tensor sQ0 = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQ{});
  Tensor sQt0 = make_tensor(make_smem_ptr(smem_q), typename Traits::SmemLayoutQtNoSwizzle{});
  Tensor sPtNoSwizzle = make_tensor(make_smem_ptr(smem_p), typename Traits::SmemLayoutPdStNoSwizzle{});
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ0);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);
  Tensor tdPrdO = thr_sdp.partition_fragment_A(sQ0);
  Tensor tdPrV = thr_sdp.partition_fragment_B(sV);
  Tensor tdVrPt = thr_dkv.partition_fragment_A(sPtNoSwizzle);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sQt0);
  Tensor tdKrdSt = thr_dkv.partition_fragment_A(sPtNoSwizzle);
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt0);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kBlockN>, Int<kHeadDim>>{});

  auto copy_sdp_A = make_tiled_copy_A(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_sdp_A = copy_sdp_A.get_thread_slice(tid);
  auto copy_sdp_B = make_tiled_copy_B(typename Traits::SmemCopyAtom{}, mma_sdp);
  auto thr_copy_sdp_B = copy_sdp_B.get_thread_slice(tid);
  Tensor tSsK = thr_copy_sdp_B.partition_S(sK);
  Tensor tdPsV = thr_copy_sdp_B.partition_S(sV);
  auto copy_dkv_A = make_tiled_copy_A(typename Traits::SmemCopyAtomT{}, mma_dkv);
  auto thr_copy_dkv_A = copy_dkv_A.get_thread_slice(tid);
  auto copy_dkv_B = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma_dkv);
  auto thr_copy_dkv_B = copy_dkv_B.get_thread_slice(tid);
  Tensor tdVsPt = thr_copy_dkv_A.partition_S(sPt);
  Tensor tdKsdSt = thr_copy_dkv_A.partition_S(sdSt);
  auto copy_pds = make_tiled_copy_C(typename Traits::SmemCopyAtomC{}, mma_sdp);
  auto thr_copy_pds = copy_pds.get_thread_slice(tid);
  Tensor tPsP = thr_copy_pds.partition_D(sP);
  Tensor tdSsdS = thr_copy_pds.partition_D(sdS);
  // dQ = dS K: A from sdS, B = K^T through transposing loads.
  Tensor sKtNoSwizzle = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKtNoSwizzle{});
  Tensor sKt = make_tensor(make_smem_ptr(smem_k), typename Traits::SmemLayoutKt{});
  Tensor tdQrdS = thr_sdp.partition_fragment_A(sdS);
  Tensor tdQrKt = thr_sdp.partition_fragment_B(sKtNoSwizzle);
  auto copy_dq_B = make_tiled_copy_B(typename Traits::SmemCopyAtomT{}, mma_sdp);
  auto thr_copy_dq_B = copy_dq_B.get_thread_slice(tid);
  Tensor tdQsKt = thr_copy_dq_B.partition_S(sKt);
  Tensor tdQsdS = thr_copy_sdp_A.partition_S(sdS);
  Tensor tdQcdQ = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  auto reduce_dq = [&](int job) {  // thread 0: the dQ accumulator's rows of job += staging[job & 1]
    tile.reduce_dq(job, smem_dq + (job & 1) * (kBlockM * kHeadDim));
  };

  Tensor cS = make_identity_tensor(Shape<Int<kBlockM>, Int<kBlockN>>{});
  Tensor tScS = thr_sdp.partition_C(cS);
  Tensor tScS_rc = make_tensor(tScS.data(), acc_rowcol_layout(tScS.layout()));
  constexpr int kRows = decltype(size<0>(tScS_rc))::value;
  constexpr int kCols = decltype(size<1>(tScS_rc))::value;

  clear(acc_dk);
  clear(acc_dv);
  const float scale_log2 = p.scale_log2;

  for (int jb = 0; jb < n_jobs; ++jb) {
    const int stage = jb & 1;
    cp_async_wait<0>();
    __syncthreads();  // job jb landed (and K, V); every warp is done with job jb - 1
    if (jb + 1 < n_jobs) {
      load_job(jb + 1, stage ^ 1);
      cp_async_commit();
    }
    if constexpr (kFusedDq) {
      if (tid == 0 && jb > 0) reduce_dq(jb - 1);
    }
    Tensor sQ = make_tensor(make_smem_ptr(smem_q + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQ{});
    Tensor sdO = make_tensor(make_smem_ptr(smem_do + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQ{});
    Tensor sQt = make_tensor(make_smem_ptr(smem_q + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQt{});
    Tensor sdOt =
        make_tensor(make_smem_ptr(smem_do + stage * Traits::kSmemQElems), typename Traits::SmemLayoutQt{});

    int row_limit[kRows];
    float row_lse[kRows], row_delta[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int r = get<0>(tScS_rc(i, 0));
      row_limit[i] = s_limit[stage][r];
      row_lse[i] = s_lse[stage][r];
      row_delta[i] = s_delta[stage][r];
    }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kBlockN>>{});
    clear(acc_s);
    clear(acc_dp);
    gemm_ss(acc_s, tSrQ, tSrK, thr_copy_sdp_A.partition_S(sQ), tSsK, mma_sdp, copy_sdp_A, copy_sdp_B,
            thr_copy_sdp_A, thr_copy_sdp_B);
    gemm_ss(acc_dp, tdPrdO, tdPrV, thr_copy_sdp_A.partition_S(sdO), tdPsV, mma_sdp, copy_sdp_A, copy_sdp_B,
            thr_copy_sdp_A, thr_copy_sdp_B);

    Tensor s = make_tensor(acc_s.data(), acc_rowcol_layout(acc_s.layout()));
    Tensor dp = make_tensor(acc_dp.data(), acc_rowcol_layout(acc_dp.layout()));
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const int j = tile.j0 + get<1>(tScS_rc(0, c));
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const float pr = j > row_limit[i] ? 0.f : exp2f(s(i, c) * scale_log2 - row_lse[i]);
        s(i, c) = pr;
        dp(i, c) = pr * (dp(i, c) - row_delta[i]);
      }
    }
    Tensor rP = convert_fragment<Element>(acc_s);
    Tensor rdS = convert_fragment<Element>(acc_dp);
    cute::copy(copy_pds, thr_copy_pds.retile_S(rP), tPsP);
    cute::copy(copy_pds, thr_copy_pds.retile_S(rdS), tdSsdS);
    if constexpr (kFusedDq) {
      if (tid == 0) bulk_wait_read<1>();
    }
    __syncthreads();  // P, dS complete (and the dQ staging buffer of this job free)

    if constexpr (kFusedDq) {
      // dQ of this job into staging buffer jb & 1; thread 0 hands it to the TMA unit at the
      // top of the next job (after that barrier) and, before the "P, dS" barrier, waits
      // until the reduction of job jb - 2 has read the buffer this job writes.
      Tensor acc_dq = partition_fragment_C(mma_sdp, Shape<Int<kBlockM>, Int<kHeadDim>>{});
      clear(acc_dq);
      gemm_ss(acc_dq, tdQrdS, tdQrKt, tdQsdS, tdQsKt, mma_sdp, copy_sdp_A, copy_dq_B, thr_copy_sdp_A, thr_copy_dq_B);
      float* staging = smem_dq + stage * (kBlockM * kHeadDim);
#pragma unroll
      for (int e = 0; e < decltype(size(acc_dq))::value; e += 2) {
        const int r = get<0>(tdQcdQ(e)), d = get<1>(tdQcdQ(e));  // elements e, e + 1: columns d, d + 1
        *reinterpret_cast<float2*>(staging + r * kHeadDim + d) = make_float2(acc_dq(e), acc_dq(e + 1));
      }
      fence_proxy_async_shared();
    }

    gemm_ss(acc_dv, tdVrPt, tdVrdOt, tdVsPt, thr_copy_dkv_B.partition_S(sdOt), mma_dkv, copy_dkv_A, copy_dkv_B,
            thr_copy_dkv_A, thr_copy_dkv_B);
    gemm_ss(acc_dk, tdKrdSt, tdKrQt, tdKsdSt, thr_copy_dkv_B.partition_S(sQt), mma_dkv, copy_dkv_A, copy_dkv_B,
            thr_copy_dkv_A, thr_copy_dkv_B);
  }

  // ---- epilogue: dK * scale and dV through smem (the K / V buffers) to every key row.
#pragma unroll
  for (int e = 0; e < decltype(size(acc_dk))::value; ++e) acc_dk(e) *= p.softmax_scale;
  Tensor rdK = convert_fragment<Element>(acc_dk);
  Tensor rdV = convert_fragment<Element>(acc_dv);
  cp_async_wait<0>();
  __syncthreads();  // every warp is done with sK / sV (and no load is in flight)
  if constexpr (kFusedDq) {
    if (tid == 0 && n_jobs > 0) reduce_dq(n_jobs - 1);
  }
  auto copy_dkv_C = make_tiled_copy_C(typename Traits::SmemCopyAtomC{}, mma_dkv);
  auto thr_copy_dkv_C = copy_dkv_C.get_thread_slice(tid);
  cute::copy(copy_dkv_C, thr_copy_dkv_C.retile_S(rdK), thr_copy_dkv_C.partition_D(sK));
  cute::copy(copy_dkv_C, thr_copy_dkv_C.retile_S(rdV), thr_copy_dkv_C.partition_D(sV));
  __syncthreads();
  tile.store_dkdv(sK, sV);
  if constexpr (kFusedDq) {
    if (tid == 0) bulk_wait_read<0>();  // shared memory must outlive the last reduction's read
  }
}

// grad_q[b, t, h] = dq_accum[b, h, slot] * softmax_scale at the routed rows (the fused
// dQ path; the preprocess kernel zeroes the others). One thread per 4 elements.
template <int kHeadDim, class Element>
__global__ void __launch_bounds__(256)
    routed_attention_bwd_convert_dq_kernel(const __grid_constant__ RoutedAttentionParams p) {
  constexpr int kVec = kHeadDim / 4;
  const int H = p.num_heads, T = p.seqlen_q;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t total = static_cast<int64_t>(p.batch) * H * T * kVec;
  if (i >= total) return;
  const int v = static_cast<int>(i % kVec);
  const int64_t row = i / kVec;  // (b, h, slot)
  const int slot = static_cast<int>(row % T);
  const int h = static_cast<int>((row / T) % H);
  const int b = static_cast<int>(row / (static_cast<int64_t>(T) * H));
  const int count = clamped_count(p.counts, b, T);
  if (slot >= count) return;
  const int t = routed_position(p, b, slot, count);
  if (t < 0) return;
  const BwdWorkspace ws(p.workspace, p.batch, H, T);
  const float4 a = *reinterpret_cast<const float4*>(
      ws.dq_accum + ((static_cast<int64_t>(b) * H + h) * BwdWorkspace::padded_slots(T) + slot) * kHeadDim + 4 * v);
  cutlass::Array<float, 4> in;
  in[0] = a.x * p.softmax_scale;
  in[1] = a.y * p.softmax_scale;
  in[2] = a.z * p.softmax_scale;
  in[3] = a.w * p.softmax_scale;
  cutlass::NumericArrayConverter<Element, float, 4, cutlass::FloatRoundStyle::round_to_nearest> conv;
  const cutlass::Array<Element, 4> o = conv(in);
  Element* dq = static_cast<Element*>(p.grad_q) + b * p.dq_batch_stride + static_cast<int64_t>(t) * p.dq_row_stride +
                h * p.dq_head_stride + 4 * v;
  *reinterpret_cast<uint2*>(dq) = *reinterpret_cast<const uint2*>(&o);
}

}  // namespace ra
}  // namespace cram
