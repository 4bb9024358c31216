// CPU routed attention. Work is proportional to the routed queries and the keys
// they see: routed positions are taken in blocks (gathered into a dense
// tile), each block is multiplied only against keys up to its last position, and
// the causal mask is applied only to the band of keys between the block's first
// and last position. The products go through ATen's GEMM; threads split the blocks.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "common/cpu_isa.h"
#include "common/cpu_math.h"
#include "routed_attention/routed_attention.h"

namespace cram {
namespace {

// Routed queries are taken in blocks of consecutive routed positions: up to kMaxBlockQ of them
// (fewer GEMM calls, each larger), but a block stops growing past kMinBlockQ queries once it
// spans kBlockSpan positions, because the keys inside its span are computed for every query
// of the block and masked for the earlier ones (at low density a long span is mostly waste).
constexpr int64_t kMinBlockQ = 64, kMaxBlockQ = 256, kBlockSpan = 256;

// The valid routed positions of each batch row, as int64 tensors. Bad entries are
// dropped here so that nothing below can index out of range.
std::vector<at::Tensor> routed_positions(const at::Tensor& index, const at::Tensor& counts, int64_t T) {
  const int64_t B = index.size(0);
  const int32_t* idx = index.data_ptr<int32_t>();
  const int32_t* cnt = counts.data_ptr<int32_t>();
  std::vector<at::Tensor> positions(B);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = std::clamp<int64_t>(cnt[b], 0, T);
    std::vector<int64_t> valid;
    valid.reserve(n);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t t = idx[b * T + i];
      if (t >= 0 && t < T) valid.push_back(t);
    }
    positions[b] = at::tensor(valid, at::kLong);
  }
  return positions;
}

struct QueryBlock {
  int64_t batch, head;
  at::Tensor pos;  // (n,) int64 positions of the block's queries
  int64_t t_min, t_max;
};

// [start, end) of each block of one batch row's sorted routed positions.
std::vector<std::pair<int64_t, int64_t>> block_bounds(const at::Tensor& positions) {
  const int64_t n = positions.numel();
  const int64_t* p = positions.data_ptr<int64_t>();
  std::vector<std::pair<int64_t, int64_t>> bounds;
  for (int64_t start = 0; start < n;) {
    int64_t end = std::min(n, start + kMinBlockQ);
    while (end < n && end - start < kMaxBlockQ && p[end] - p[start] < kBlockSpan) ++end;
    bounds.emplace_back(start, end);
    start = end;
  }
  return bounds;
}

// Blocks of every (batch, head). Within a head, blocks are listed from both ends
// inwards (first, last, second, ...): late blocks see more keys, and the
// contiguous ranges that parallel_for hands to threads then cost about the same.
std::vector<QueryBlock> query_blocks(const std::vector<at::Tensor>& positions, int64_t H) {
  std::vector<QueryBlock> blocks;
  for (int64_t b = 0; b < static_cast<int64_t>(positions.size()); ++b) {
    const auto bounds = block_bounds(positions[b]);
    const int64_t* p = positions[b].data_ptr<int64_t>();
    std::vector<int64_t> order;
    for (int64_t lo = 0, hi = static_cast<int64_t>(bounds.size()) - 1; lo <= hi; ++lo, --hi) {
      order.push_back(lo);
      if (hi != lo) order.push_back(hi);
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t blk : order) {
        const auto [start, end] = bounds[blk];
        // min/max rather than the ends: a malformed (unsorted) routing stays in bounds and masked.
        const auto [mn, mx] = std::minmax_element(p + start, p + end);
        blocks.push_back({b, h, positions[b].narrow(0, start, end - start), *mn, *mx});
      }
    }
  }
  return blocks;
}

// scale * q_blk k^T over keys [0, t_max + shift], with keys past each query's own
// position masked: only the band after t_min + shift can hold such keys.
at::Tensor masked_scores(const at::Tensor& q_blk, const at::Tensor& k_seen, const QueryBlock& blk, int64_t shift,
                         double scale) {
  at::Tensor s = at::mm(q_blk, k_seen.t()).mul_(scale);
  const int64_t nk = k_seen.size(0), band0 = blk.t_min + shift + 1;
  if (band0 < nk) {
    at::Tensor cols = at::arange(band0, nk, blk.pos.options());
    at::Tensor future = cols.unsqueeze(0) > (blk.pos + shift).unsqueeze(1);
    s.narrow(1, band0, nk - band0).masked_fill_(future, -std::numeric_limits<double>::infinity());
  }
  return s;
}

}  // namespace

namespace {

// Keys per chunk of the forward: a block's scores for one chunk (up to kMaxBlockQ x kBlockK
// floats, 512 KiB) stay in L2 between the two GEMMs and the softmax pass that runs between them,
// where whole rows of scores (up to S keys) would go to memory and back several times.
constexpr int64_t kBlockK = 512;

// The softmax pass over one chunk of scores, for rows 0..n-1: keys j <= pos[i] + shift are
// visible; the row's running max m, sum l and rescale factor alpha are updated and the
// scores replaced by exp(s - m) (0 where masked). The reductions keep kLanes partial results
// so that the compiler vectorises them (a single running max or sum is a loop-carried
// dependence it may not reorder without -ffast-math).
constexpr int kLanes = 16;

template <typename scalar_t, bool kFma>
__attribute__((always_inline)) inline void softmax_chunk(scalar_t* sp, int64_t n, int64_t kc, int64_t c0,
                                                         const int64_t* pos, int64_t shift, scalar_t* m, scalar_t* l,
                                                         scalar_t* alpha) {
  for (int64_t i = 0; i < n; ++i) {
    scalar_t* row = sp + i * kc;
    const int64_t seen = std::clamp<int64_t>(pos[i] + shift - c0 + 1, 0, kc);
    const int64_t full = seen / kLanes * kLanes;
    scalar_t part[kLanes];
    for (int w = 0; w < kLanes; ++w) part[w] = m[i];
    for (int64_t j = 0; j < full; j += kLanes) {
      for (int w = 0; w < kLanes; ++w) part[w] = part[w] > row[j + w] ? part[w] : row[j + w];
    }
    scalar_t mx = m[i];
    for (int w = 0; w < kLanes; ++w) mx = std::max(mx, part[w]);
    for (int64_t j = full; j < seen; ++j) mx = std::max(mx, row[j]);
    // Every row sees key 0 in the first chunk, so mx is finite from then on (unless the
    // inputs are not: NaN propagates as in the reference).
    for (int w = 0; w < kLanes; ++w) part[w] = 0;
    for (int64_t j = 0; j < full; j += kLanes) {
      for (int w = 0; w < kLanes; ++w) {
        row[j + w] = exp_nonpositive<kFma>(row[j + w] - mx);
        part[w] += row[j + w];
      }
    }
    scalar_t sum = 0;
    for (int w = 0; w < kLanes; ++w) sum += part[w];
    for (int64_t j = full; j < seen; ++j) {
      row[j] = exp_nonpositive<kFma>(row[j] - mx);
      sum += row[j];
    }
    std::fill(row + seen, row + kc, scalar_t(0));
    alpha[i] = seen == 0 ? scalar_t(1) : exp_nonpositive<kFma>(m[i] - mx);
    if (seen > 0) {
      l[i] = l[i] * alpha[i] + sum;
      m[i] = mx;
    }
  }
}

// acc = alpha acc + pv, row by row.
template <typename scalar_t>
__attribute__((always_inline)) inline void rescale_add(scalar_t* acc, const scalar_t* pv, const scalar_t* alpha,
                                                       int64_t n, int64_t D) {
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t d = 0; d < D; ++d) acc[i * D + d] = acc[i * D + d] * alpha[i] + pv[i * D + d];
  }
}

template <typename scalar_t>
CRAM_TARGET_AVX2 void softmax_chunk_avx2(scalar_t* sp, int64_t n, int64_t kc, int64_t c0, const int64_t* pos,
                                         int64_t shift, scalar_t* m, scalar_t* l, scalar_t* alpha) {
  softmax_chunk<scalar_t, true>(sp, n, kc, c0, pos, shift, m, l, alpha);
}

template <typename scalar_t>
CRAM_TARGET_AVX2 void rescale_add_avx2(scalar_t* acc, const scalar_t* pv, const scalar_t* alpha, int64_t n,
                                       int64_t D) {
  rescale_add(acc, pv, alpha, n, D);
}

// Rows of a block that share one GEMM in a chunk some of them see only in part. The causal
// band of a block of n consecutive positions is n x n, half of it masked; splitting the rows
// into groups that each stop at their own last key leaves kRowGroup x kRowGroup triangles
// instead (at density 1 and T = 4096, 4% fewer multiply-adds), while a chunk every row sees
// whole stays one GEMM.
constexpr int64_t kRowGroup = 64;

// One query block over keys [0, nk): for each chunk of keys, S = q k^T (GEMM), then in one
// pass per row the causal mask, the running max, exp and the row sum (online softmax: softmax_chunk), then
// acc = alpha acc + P v (GEMM). `q_blk` is already multiplied by the softmax scale; `t_min` is
// the block's first position.
template <typename scalar_t>
void attend_block(const at::Tensor& q_blk, const at::Tensor& k_seen, const at::Tensor& v_seen, const int64_t* pos,
                  int64_t t_min, int64_t shift, at::Tensor& s_buf, at::Tensor& pv_buf, scalar_t* acc, scalar_t* m,
                  scalar_t* l) {
  const int64_t n = q_blk.size(0), D = q_blk.size(1), nk = k_seen.size(0);
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  std::fill(acc, acc + n * D, scalar_t(0));
  std::fill(m, m + n, kNegInf);
  std::fill(l, l + n, scalar_t(0));
  std::vector<scalar_t> alpha(n);
  at::Tensor pv = pv_buf.narrow(0, 0, n * D).view({n, D});
  for (int64_t c0 = 0; c0 < nk; c0 += kBlockK) {
    const int64_t kc = std::min(kBlockK, nk - c0);
    const at::Tensor k_chunk = k_seen.narrow(0, c0, kc), v_chunk = v_seen.narrow(0, c0, kc);
    const int64_t group = t_min + shift >= c0 + kc - 1 ? n : kRowGroup;  // every row sees the whole chunk
    for (int64_t r0 = 0; r0 < n; r0 += group) {
      const int64_t rows = std::min(group, n - r0);
      const int64_t last = *std::max_element(pos + r0, pos + r0 + rows);
      const int64_t kv = std::clamp<int64_t>(last + shift - c0 + 1, 0, kc);  // keys of the chunk these rows see
      if (kv == 0) {
        std::fill(alpha.begin() + r0, alpha.begin() + r0 + rows, scalar_t(1));
        pv.narrow(0, r0, rows).zero_();
        continue;
      }
      // Each group's scores are a contiguous (rows, kv) matrix at its rows' place in the buffer.
      at::Tensor s = s_buf.narrow(0, r0 * kc, rows * kv).view({rows, kv});
      at::mm_out(s, q_blk.narrow(0, r0, rows), k_chunk.narrow(0, 0, kv).t());
      scalar_t* sp = s.data_ptr<scalar_t>();
      if (cpu_has_avx2()) {
        softmax_chunk_avx2(sp, rows, kv, c0, pos + r0, shift, m + r0, l + r0, alpha.data() + r0);
      } else {
        softmax_chunk<scalar_t, false>(sp, rows, kv, c0, pos + r0, shift, m + r0, l + r0, alpha.data() + r0);
      }
      at::Tensor pv_rows = pv.narrow(0, r0, rows);
      at::mm_out(pv_rows, s, v_chunk.narrow(0, 0, kv));
    }
    if (cpu_has_avx2()) {
      rescale_add_avx2(acc, pv.data_ptr<scalar_t>(), alpha.data(), n, D);
    } else {
      rescale_add(acc, pv.data_ptr<scalar_t>(), alpha.data(), n, D);
    }
  }
}

}  // namespace

void routed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                              const at::Tensor& counts, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t T = q.size(1), H = q.size(2), S = k.size(1), D = q.size(3), group = H / k.size(2), shift = S - T;
  const std::vector<QueryBlock> blocks = query_blocks(routed_positions(index, counts, T), H);

  // The ATen calls below must compute in the dtype they are given: a caller under
  // autocast would otherwise have its matmuls cast to bfloat16 inside this kernel.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // at::parallel_for does not carry the caller's thread-local state to its worker
  // threads; without it the ATen calls below would run with autograd on (recording
  // a graph, racing on out's autograd metadata), outside inference mode and autocast.
  const at::ThreadLocalState tls;
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "routed_attention_fwd_cpu", [&] {
    at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
      at::ThreadLocalStateGuard tls_guard(tls);
      at::Tensor s_buf = at::empty({kMaxBlockQ * kBlockK}, q.options());
      at::Tensor pv_buf = at::empty({kMaxBlockQ * D}, q.options());
      std::vector<scalar_t> acc(kMaxBlockQ * D), m(kMaxBlockQ), l(kMaxBlockQ);
      scalar_t* o = out.data_ptr<scalar_t>();
      scalar_t* lse_p = lse.data_ptr<scalar_t>();
      for (int64_t i = begin; i < end; ++i) {
        const QueryBlock& blk = blocks[i];
        const int64_t b = blk.batch, h = blk.head, nk = blk.t_max + shift + 1, n = blk.pos.numel();
        const at::Tensor q_blk = q[b].select(1, h).index_select(0, blk.pos).mul_(scale);
        const at::Tensor k_seen = k[b].select(1, h / group).narrow(0, 0, nk);
        const at::Tensor v_seen = v[b].select(1, h / group).narrow(0, 0, nk);
        const int64_t* pos = blk.pos.data_ptr<int64_t>();
        attend_block<scalar_t>(q_blk, k_seen, v_seen, pos, blk.t_min, shift, s_buf, pv_buf, acc.data(), m.data(),
                                 l.data());
        // out and lse are contiguous, (B, T, H, D) and (B, H, T).
        for (int64_t r = 0; r < n; ++r) {
          scalar_t* dst = o + ((b * T + pos[r]) * H + h) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = acc[r * D + d] / l[r];
          lse_p[(b * H + h) * T + pos[r]] = m[r] + std::log(l[r]);
        }
      }
    });
  });
}

void routed_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& index, const at::Tensor& counts, double scale, at::Tensor& grad_q,
                              at::Tensor& grad_k, at::Tensor& grad_v) {
  const int64_t T = q.size(1), H = q.size(2), Hk = k.size(2), S = k.size(1), group = H / Hk, shift = S - T;
  const std::vector<QueryBlock> blocks = query_blocks(routed_positions(index, counts, T), H);

  // Threads own (batch, kv head) pairs: every block that adds into one slice of
  // grad_k / grad_v runs on the same thread, so the accumulation needs no locks.
  std::vector<std::vector<const QueryBlock*>> by_kv_head(q.size(0) * Hk);
  for (const QueryBlock& blk : blocks) by_kv_head[blk.batch * Hk + blk.head / group].push_back(&blk);

  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // see the forward
  const at::ThreadLocalState tls;
  at::parallel_for(0, static_cast<int64_t>(by_kv_head.size()), 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t bg = begin; bg < end; ++bg) {
      for (const QueryBlock* blk : by_kv_head[bg]) {
        const int64_t b = blk->batch, h = blk->head, g = h / group, nk = blk->t_max + shift + 1;
        const at::Tensor q_blk = q[b].select(1, h).index_select(0, blk->pos);
        const at::Tensor do_blk = grad_out[b].select(1, h).index_select(0, blk->pos);
        const at::Tensor o_blk = out[b].select(1, h).index_select(0, blk->pos);
        const at::Tensor l_blk = lse[b][h].index_select(0, blk->pos);
        const at::Tensor k_seen = k[b].select(1, g).narrow(0, 0, nk);
        const at::Tensor v_seen = v[b].select(1, g).narrow(0, 0, nk);

        at::Tensor p = masked_scores(q_blk, k_seen, *blk, shift, scale).sub_(l_blk.unsqueeze(1)).exp_();
        grad_v[b].select(1, g).narrow(0, 0, nk).addmm_(p.t(), do_blk);
        // dS = P * (dP - rowsum(dO * O)), the softmax backward with rowsum(P * dP) = rowsum(dO * O).
        const at::Tensor delta = (do_blk * o_blk).sum(1, /*keepdim=*/true);
        at::Tensor ds = p.mul_(at::mm(do_blk, v_seen.t()).sub_(delta));
        grad_q[b].select(1, h).index_copy_(0, blk->pos, at::mm(ds, k_seen).mul_(scale));
        grad_k[b].select(1, g).narrow(0, 0, nk).addmm_(ds.t(), q_blk, 1.0, scale);
      }
    }
  });
}

}  // namespace cram
