// What the backward's kernels share: the workspace (lse, delta and the fused dQ sums by
// slot) and the work of one dK/dV CTA (its key tile, the jobs of gathered query rows that
// see it, their loads, the dQ reduction and the dK/dV store), for the SM80 and the sm_90a
// dK/dV kernels.
#pragma once

#include "routed_attention/routed_attention_utils.cuh"

namespace cram {
namespace ra {

// Rows of gathered queries a dK/dV job takes (DkvConfig::kBlockM for every head dim): the
// fused dQ accumulator pads each (b, h) by this many slots, since a job's rows start below
// the row's count and so end below T + kDkvBlockM.
constexpr int kDkvBlockM = 64;

// Workspace of the backward: lse * log2(e) (+inf for a bad slot) and delta, per (b, h, slot),
// and on the fast path the float dQ accumulator. Each part starts on a 128-byte boundary:
// the preprocess kernel zeroes the accumulator with 16-byte stores and the bulk reductions
// need 16-byte aligned addresses, whatever B * H * T is.
struct BwdWorkspace {
  float* lse_log2;
  float* delta;
  float* dq_accum;  // (B, H, T + kDkvBlockM, D) by slot: the fused dQ path's sums (absent if deterministic)

  static constexpr size_t kAlign = 128;
  __host__ __device__ static size_t aligned(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
  __host__ __device__ static size_t row_bytes(int batch, int heads, int seqlen_q) {
    return aligned(static_cast<size_t>(batch) * heads * seqlen_q * sizeof(float));
  }
  __host__ __device__ static int padded_slots(int seqlen_q) { return seqlen_q + kDkvBlockM; }
  // head_dim 0: no dQ accumulator (the deterministic path).
  static size_t bytes(int batch, int heads, int seqlen_q, int head_dim) {
    return 2 * row_bytes(batch, heads, seqlen_q) +
           static_cast<size_t>(batch) * heads * padded_slots(seqlen_q) * head_dim * sizeof(float);
  }
  __host__ __device__ BwdWorkspace(void* base, int batch, int heads, int seqlen_q) {
    char* c = static_cast<char*>(base);
    const size_t rows = row_bytes(batch, heads, seqlen_q);
    lse_log2 = reinterpret_cast<float*>(c);
    delta = reinterpret_cast<float*>(c + rows);
    dq_accum = reinterpret_cast<float*>(c + 2 * rows);
  }
};

// The work of one dK/dV CTA: key tile j0 = (blockIdx.x / (B * Hk)) * kBlockN of batch row b
// and kv head kv_head (key tile slowest: the tiles with the most queries, the first keys,
// start first). The routed queries that see the tile are the slots i >= i0 with
// index[b, i] + (S - T) >= j0 (index is sorted: i0 by a binary search). Job jb takes the
// kBlockM slots from slot0(jb) of head head(jb), every head of the GQA group in turn.
template <class Element, int kBlockM, int kBlockN, int kHeadDim, int kNThreads>
struct DkvTile {
  const RoutedAttentionParams& p;
  int b, kv_head, group, j0, count, i0, n_chunks, n_jobs;

  __device__ explicit DkvTile(const RoutedAttentionParams& params) : p(params) {
    const int T = p.seqlen_q, Hk = p.num_kv_heads;
    const int bg = blockIdx.x % (p.batch * Hk);
    b = bg / Hk;
    kv_head = bg % Hk;
    group = p.num_heads / Hk;
    j0 = static_cast<int>(blockIdx.x / (p.batch * Hk)) * kBlockN;
    count = clamped_count(p.counts, b, T);
    i0 = lower_bound_slot(p, b, count, j0 - (p.seqlen_k - T));
    n_chunks = ceil_div(count - i0, kBlockM);  // >= 0
    n_jobs = n_chunks * group;
  }

  __device__ int head(int jb) const { return kv_head * group + jb / n_chunks; }
  __device__ int slot0(int jb) const { return i0 + (jb % n_chunks) * kBlockM; }

  // K and V of the tile into (kBlockN, kHeadDim) row tiles (zero rows past S).
  template <class SmemK, class SmemV>
  __device__ void load_kv(SmemK&& sK, SmemV&& sV) const {
    const Element* k_ptr = static_cast<const Element*>(p.k) + b * p.k_batch_stride + kv_head * p.k_head_stride;
    const Element* v_ptr = static_cast<const Element*>(p.v) + b * p.v_batch_stride + kv_head * p.v_head_stride;
    const int S = p.seqlen_k, j_first = j0;
    auto key_row = [=](const Element* base, int64_t stride) {
      return [=](int r) -> const Element* {
        const int j = j_first + r;
        return j < S ? base + static_cast<int64_t>(j) * stride : nullptr;
      };
    };
    load_rows_async<kBlockN, kHeadDim, kNThreads>(sK, key_row(k_ptr, p.k_row_stride), k_ptr);
    load_rows_async<kBlockN, kHeadDim, kNThreads>(sV, key_row(v_ptr, p.v_row_stride), v_ptr);
  }

  // Job jb's gathered Q and dO rows into (kBlockM, kHeadDim) row tiles, and per row its causal
  // limit (the last key it sees; -1 for a bad slot: every key masked), lse * log2(e) and delta.
  template <class SmemQ, class SmemDO>
  __device__ void load_job(int jb, SmemQ&& sQ, SmemDO&& sdO, int* limit, float* lse, float* delta) const {
    const int T = p.seqlen_q, h = head(jb), m0 = slot0(jb), bb = b, n = count;
    const Element* q_ptr = static_cast<const Element*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const Element* do_ptr = static_cast<const Element*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride;
    const RoutedAttentionParams& params = p;
    auto gathered = [&](const Element* base, int64_t stride) {
      return [=, &params](int r) -> const Element* {
        const int t = routed_position(params, bb, m0 + r, n);
        return t >= 0 ? base + static_cast<int64_t>(t) * stride : nullptr;
      };
    };
    load_rows_async<kBlockM, kHeadDim, kNThreads>(sQ, gathered(q_ptr, p.q_row_stride), q_ptr);
    load_rows_async<kBlockM, kHeadDim, kNThreads>(sdO, gathered(do_ptr, p.do_row_stride), do_ptr);
    if (threadIdx.x < kBlockM) {
      const BwdWorkspace ws(p.workspace, p.batch, p.num_heads, T);
      const int r = threadIdx.x, slot = m0 + r;
      const int t = routed_position(p, b, slot, count);
      const int64_t off = (static_cast<int64_t>(b) * p.num_heads + h) * T + slot;
      limit[r] = t >= 0 ? t + (p.seqlen_k - T) : -1;
      lse[r] = t >= 0 ? ws.lse_log2[off] : INFINITY;
      delta[r] = t >= 0 ? ws.delta[off] : 0.f;
    }
  }

  // One thread: the fused dQ accumulator's rows of job jb += the (kBlockM, kHeadDim) float
  // tile `staging` in shared memory (made visible to the async proxy before), by the TMA unit.
  __device__ void reduce_dq(int jb, const float* staging) const {
    static_assert(kBlockM == kDkvBlockM, "the dQ accumulator is padded by kDkvBlockM slots");
    const BwdWorkspace ws(p.workspace, p.batch, p.num_heads, p.seqlen_q);
    const int64_t row = (static_cast<int64_t>(b) * p.num_heads + head(jb)) * BwdWorkspace::padded_slots(p.seqlen_q) +
                        slot0(jb);  // slot0 + kBlockM <= padded_slots
    bulk_reduce_add_f32(ws.dq_accum + row * kHeadDim, staging, kBlockM * kHeadDim * int(sizeof(float)));
  }

  // dK and dV from (kBlockN, kHeadDim) row tiles to every key row of the tile.
  template <class SmemDK, class SmemDV>
  __device__ void store_dkdv(const SmemDK& sdK, const SmemDV& sdV) const {
    Element* dk_ptr = static_cast<Element*>(p.grad_k) + b * p.dk_batch_stride + kv_head * p.dk_head_stride;
    Element* dv_ptr = static_cast<Element*>(p.grad_v) + b * p.dv_batch_stride + kv_head * p.dv_head_stride;
    const int S = p.seqlen_k;
    store_rows<kBlockN, kHeadDim, kNThreads>(sdK, [&](int r) -> Element* {
      const int j = j0 + r;
      return j < S ? dk_ptr + static_cast<int64_t>(j) * p.dk_row_stride : nullptr;
    });
    store_rows<kBlockN, kHeadDim, kNThreads>(sdV, [&](int r) -> Element* {
      const int j = j0 + r;
      return j < S ? dv_ptr + static_cast<int64_t>(j) * p.dv_row_stride : nullptr;
    });
  }
};

}  // namespace ra
}  // namespace cram
