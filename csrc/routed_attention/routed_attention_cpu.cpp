// CPU routed attention. Work is proportional to the routed queries and the keys
// they see: routed positions are taken in blocks of kBlockQ (gathered into a dense
// tile), each block is multiplied only against keys up to its last position, and
// the causal mask is applied only to the band of keys between the block's first
// and last position. The products go through ATen's GEMM; threads split the blocks.

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "routed_attention/routed_attention.h"

namespace cram {
namespace {

constexpr int64_t kBlockQ = 64;

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

// Blocks of every (batch, head). Within a head, blocks are listed from both ends
// inwards (first, last, second, ...): late blocks see more keys, and the
// contiguous ranges that parallel_for hands to threads then cost about the same.
std::vector<QueryBlock> query_blocks(const std::vector<at::Tensor>& positions, int64_t H) {
  std::vector<QueryBlock> blocks;
  for (int64_t b = 0; b < static_cast<int64_t>(positions.size()); ++b) {
    const int64_t n = positions[b].numel();
    const int64_t num = (n + kBlockQ - 1) / kBlockQ;
    std::vector<int64_t> order;
    for (int64_t lo = 0, hi = num - 1; lo <= hi; ++lo, --hi) {
      order.push_back(lo);
      if (hi != lo) order.push_back(hi);
    }
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t blk : order) {
        at::Tensor pos = positions[b].narrow(0, blk * kBlockQ, std::min(kBlockQ, n - blk * kBlockQ));
        const auto [mn, mx] = at::aminmax(pos);
        blocks.push_back({b, h, pos, mn.item<int64_t>(), mx.item<int64_t>()});
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

void routed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                              const at::Tensor& counts, double scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t T = q.size(1), H = q.size(2), S = k.size(1), group = H / k.size(2), shift = S - T;
  const std::vector<QueryBlock> blocks = query_blocks(routed_positions(index, counts, T), H);

  // The ATen calls below must compute in the dtype they are given: a caller under
  // autocast would otherwise have its matmuls cast to bfloat16 inside this kernel.
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  // at::parallel_for does not carry the caller's thread-local state to its worker
  // threads; without it the ATen calls below would run with autograd on (recording
  // a graph, racing on out's autograd metadata), outside inference mode and autocast.
  const at::ThreadLocalState tls;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    at::ThreadLocalStateGuard tls_guard(tls);
    for (int64_t i = begin; i < end; ++i) {
      const QueryBlock& blk = blocks[i];
      const int64_t b = blk.batch, h = blk.head, nk = blk.t_max + shift + 1;
      const at::Tensor q_blk = q[b].select(1, h).index_select(0, blk.pos);
      const at::Tensor k_seen = k[b].select(1, h / group).narrow(0, 0, nk);
      const at::Tensor v_seen = v[b].select(1, h / group).narrow(0, 0, nk);
      // Softmax with one exp per score; normalising the (n, D) output rather than
      // the (n, keys) probabilities saves a pass over the scores.
      at::Tensor s = masked_scores(q_blk, k_seen, blk, shift, scale);
      const at::Tensor row_max = at::amax(s, 1, /*keepdim=*/true);
      const at::Tensor row_sum = s.sub_(row_max).exp_().sum(1, /*keepdim=*/true);
      out[b].select(1, h).index_copy_(0, blk.pos, at::mm(s, v_seen).div_(row_sum));
      lse[b][h].index_copy_(0, blk.pos, row_sum.log_().add_(row_max).squeeze(1));
    }
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
