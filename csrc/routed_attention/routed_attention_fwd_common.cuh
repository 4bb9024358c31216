// What the SM80 and the sm_90a forward kernels share: a work item's rows and key range,
// the causal mask and the online softmax on a (rows, cols) view of the score fragment,
// the two epilogues (a split's fp32 partial, or the output scattered to the routed rows),
// and the combine kernel that merges a split tile's partials.
#pragma once

#include <cfloat>

#include "routed_attention/routed_attention_fwd_plan.cuh"

namespace cram {
namespace ra {

// One CTA's work item, with the rows it gathers: s_pos[r] = the position of row r (-1: none).
struct FwdItem {
  int b, h;
  int partial;          // >= 0: a split, written to partial buffer `partial`
  int t_min;            // earliest routed position of the tile
  int n_lo, n_hi;       // key tiles to run, [n_lo, n_hi), n_hi > n_lo
  int n_first_masked;   // key tiles from here on hold keys past t_min + shift
  __device__ bool split() const { return partial >= 0; }
};

// Reads this CTA's work item and its rows into s_pos (visible to every thread on return) and
// s_limit (the last key each row may see; visible after the caller's next barrier, which the
// kernels pass before their first mask, so the first loads need not wait for it). Returns
// false when there is nothing to compute: past the plan's items, a tile without a valid
// position (malformed index only), or an empty split (its partial lse is then set to -inf,
// so that the merge skips it). Every thread returns the same.
template <int kBlockM, int kBlockN, int kNThreads>
__device__ bool fwd_item(const RoutedAttentionParams& p, const FwdWorkspace& ws, FwdItem& it, int* s_pos,
                         int* s_limit, int* s_scratch) {
  static_assert(kBlockM <= kNThreads, "one thread per query row for the row metadata");
  const int tid = threadIdx.x;
  const int shift = p.seqlen_k - p.seqlen_q;
  if (static_cast<int>(blockIdx.x) >= ws.header[0]) return false;
  const FwdWorkItem item = ws.items[blockIdx.x];
  it.b = item.b;
  it.h = item.h;
  it.partial = item.partial;

  const int my_pos = tid < kBlockM ? routed_position(p, item.b, item.slot0 + tid, item.slot0 + item.rows) : -1;
  if (tid < kBlockM) s_pos[tid] = my_pos;
  it.t_min = block_allreduce<kNThreads>(my_pos >= 0 ? my_pos : INT_MAX, s_scratch, OpMin{});
  const int t_max = block_allreduce<kNThreads>(my_pos, s_scratch, OpMax{});
  if (t_max < 0) return false;

  // The item's key range, within the tile's own. (The plan takes a tile's range from its
  // last slot; with a malformed, non-ascending index the two can differ: the result is then
  // wrong, but every access stays in bounds.)
  const int n_key_tiles = (t_max + shift) / kBlockN + 1;
  it.n_lo = item.n_lo;
  it.n_hi = min(item.n_hi, n_key_tiles);
  it.n_first_masked = (it.t_min + shift + 1) / kBlockN;
  if (it.n_lo >= it.n_hi) {  // an empty split: contributes nothing to the merge
    if (it.split() && tid < kBlockM) ws.lse[static_cast<int64_t>(it.partial) * kBlockM + tid] = -INFINITY;
    return false;
  }
  // Invalid rows: any finite limit, they are never stored.
  if (tid < kBlockM) s_limit[tid] = (my_pos >= 0 ? my_pos : it.t_min) + shift;
  return true;
}

// The row loads of one work item: its gathered queries, and key tiles of its key/value head.
template <class Element, int kBlockM, int kBlockN, int kHeadDim, int kNThreads>
struct FwdRowLoads {
  const RoutedAttentionParams& p;
  const int* s_pos;
  const Element *q, *k, *v;  // row b, head h (key/value head h / group) of each

  __device__ FwdRowLoads(const RoutedAttentionParams& params, const FwdItem& it, const int* positions)
      : p(params), s_pos(positions) {
    const int kv_head = it.h / (p.num_heads / p.num_kv_heads);
    q = static_cast<const Element*>(p.q) + it.b * p.q_batch_stride + it.h * p.q_head_stride;
    k = static_cast<const Element*>(p.k) + it.b * p.k_batch_stride + kv_head * p.k_head_stride;
    v = static_cast<const Element*>(p.v) + it.b * p.v_batch_stride + kv_head * p.v_head_stride;
  }

  // cp.async of the tile's query rows (zeros for rows without a position) into sQ.
  template <class SmemTile>
  __device__ __forceinline__ void query_tile(SmemTile&& sQ) const {
    load_rows_async<kBlockM, kHeadDim, kNThreads>(
        sQ,
        [&](int r) -> const Element* {
          const int t = s_pos[r];
          return t >= 0 ? q + static_cast<int64_t>(t) * p.q_row_stride : nullptr;
        },
        q);
  }
  // cp.async of key tile n of K or V (zeros past S) into sX.
  template <class SmemTile>
  __device__ __forceinline__ void key_tile(SmemTile&& sX, const Element* base, int64_t row_stride, int n) const {
    load_rows_async<kBlockN, kHeadDim, kNThreads>(
        sX,
        [&](int r) -> const Element* {
          const int j = n * kBlockN + r;
          return j < p.seqlen_k ? base + static_cast<int64_t>(j) * row_stride : nullptr;
        },
        base);
  }
  template <class SmemTile>
  __device__ __forceinline__ void k_tile(SmemTile&& sK, int n) const { key_tile(sK, k, p.k_row_stride, n); }
  template <class SmemTile>
  __device__ __forceinline__ void v_tile(SmemTile&& sV, int n) const { key_tile(sV, v, p.v_row_stride, n); }
};

// Sets the scores of key tile n past each row's last visible key to -inf. s: the thread's
// scores as (rows, cols); coords: their (row, col) in the tile, same view.
template <int kBlockN, class Scores, class Coords>
__device__ __forceinline__ void apply_causal_mask(Scores& s, const Coords& coords, const int* s_limit, int n) {
  const int col0 = n * kBlockN;
#pragma unroll
  for (int i = 0; i < decltype(size<0>(s))::value; ++i) {
    const int limit = s_limit[get<0>(coords(i, 0))] - col0;  // last visible column of the row
#pragma unroll
    for (int c = 0; c < decltype(size<1>(s))::value; ++c) {
      if (get<1>(coords(0, c)) > limit) s(i, c) = -INFINITY;
    }
  }
}

// The online softmax of the rows a thread holds (with the three other threads of its quad,
// which hold the rest of the columns). Scores stay unscaled and the scale is folded into
// the exponent (one FFMA an element, as FlashAttention does); row_max is kept unscaled too.
template <int kRows>
struct OnlineSoftmax {
  float row_max[kRows], row_sum[kRows];

  __device__ OnlineSoftmax() {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      row_max[i] = -INFINITY;
      row_sum[i] = 0.f;
    }
  }

  // s: this key tile's (masked) scores as (rows, cols), replaced by their exponentials;
  // corr: the factors the output accumulated so far must be rescaled by (rescale_output),
  // which the sm_90a kernel does later, once the MMA writing that accumulator is done.
  template <class Scores>
  __device__ __forceinline__ void update(Scores& s, float scale_log2, float (&corr)[kRows]) {
    static_assert(decltype(size<0>(s))::value == kRows);
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      float m = row_max[i];
#pragma unroll
      for (int c = 0; c < decltype(size<1>(s))::value; ++c) m = fmaxf(m, s(i, c));
      m = quad_max(m);
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;  // a row with every key masked so far
      corr[i] = exp2f(row_max[i] * scale_log2 - m_scaled);
      row_max[i] = m;
      float sum = row_sum[i] * corr[i];
#pragma unroll
      for (int c = 0; c < decltype(size<1>(s))::value; ++c) {
        const float e = exp2f(fmaf(s(i, c), scale_log2, -m_scaled));
        s(i, c) = e;
        sum += e;
      }
      row_sum[i] = sum;
    }
  }

  // o: the output accumulator as (rows, cols).
  template <class Out>
  __device__ __forceinline__ static void rescale_output(Out& o, const float (&corr)[kRows]) {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
#pragma unroll
      for (int c = 0; c < decltype(size<1>(o))::value; ++c) o(i, c) *= corr[i];
    }
  }

  // Normalises o and returns each row's log-sum-exp (natural log; -inf for a row that saw
  // no key, whose output is then 0).
  template <class Out>
  __device__ __forceinline__ void finish(Out& o, float scale_log2, float (&lse)[kRows]) const {
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const float sum = quad_sum(row_sum[i]);
      const bool any = sum > 0.f;
      const float inv = any ? 1.f / sum : 0.f;
      lse[i] = any ? (row_max[i] * scale_log2 + __log2f(sum)) * kLn2 : -INFINITY;
#pragma unroll
      for (int c = 0; c < decltype(size<1>(o))::value; ++c) o(i, c) *= inv;
    }
  }
};

// A split's partial: fp32 O, one row of kHeadDim per query row, and the rows' lse, for the
// combine kernel. acc_o: the thread's accumulator; o_coords: its (row, col) coordinates
// (thr_mma.partition_C of an identity tensor), whose value mode starts with pairs of
// adjacent columns; row_coords: (rows, cols) view of the score coordinates.
template <int kBlockM, int kHeadDim, int kRows, class Acc, class OCoords, class RowCoords>
__device__ __forceinline__ void write_split_partial(const FwdWorkspace& ws, int partial, const Acc& acc_o,
                                                    const OCoords& o_coords, const RowCoords& row_coords,
                                                    const float (&lse)[kRows]) {
  float* o_ws = ws.o + static_cast<int64_t>(partial) * kBlockM * kHeadDim;
  static_assert(decltype(size(acc_o))::value % 2 == 0);
#pragma unroll
  for (int e = 0; e < decltype(size(acc_o))::value; e += 2) {
    const int r = get<0>(o_coords(e)), d = get<1>(o_coords(e));  // elements e, e + 1: columns d, d + 1
    *reinterpret_cast<float2*>(o_ws + r * kHeadDim + d) = make_float2(acc_o(e), acc_o(e + 1));
  }
  if (threadIdx.x % 4 == 0) {  // the quad's leader
#pragma unroll
    for (int i = 0; i < kRows; ++i) ws.lse[static_cast<int64_t>(partial) * kBlockM + get<0>(row_coords(i, 0))] = lse[i];
  }
}

// The output: rO (the thread's normalised accumulator in the element type) through sO (a
// free (kBlockM, kHeadDim) smem tile in load_rows_async's layout) to the routed rows of
// out, and the rows' lse. Every thread must have finished reading what sO overlays.
template <int kBlockM, int kHeadDim, int kNThreads, int kRows, class Element, class FragO, class SmemO,
          class TiledCopyO, class RowCoords>
__device__ __forceinline__ void write_output(const RoutedAttentionParams& p, const FwdItem& it, const int* s_pos,
                                             const FragO& rO, SmemO& sO, const TiledCopyO& tiled_copy_o,
                                             const RowCoords& row_coords, const float (&lse)[kRows]) {
  auto thr_copy_o = tiled_copy_o.get_thread_slice(threadIdx.x);
  cute::copy(tiled_copy_o, thr_copy_o.retile_S(rO), thr_copy_o.partition_D(sO));
  if (threadIdx.x % 4 == 0) {
    float* lse_row = p.lse + (static_cast<int64_t>(it.b) * p.num_heads + it.h) * p.seqlen_q;
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const int t = s_pos[get<0>(row_coords(i, 0))];
      if (t >= 0) lse_row[t] = lse[i];
    }
  }
  sync_threads<kNThreads>();
  Element* out_ptr = static_cast<Element*>(p.out) + it.b * p.out_batch_stride + it.h * p.out_head_stride;
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
