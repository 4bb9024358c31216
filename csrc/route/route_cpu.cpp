// CPU router: one parallel pass over the (b, t) rows for the decision, then the
// compaction of each batch row (sequential within a row, parallel over rows).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_dispatch.h"
#include "route/route.h"

namespace cram {
namespace {

template <typename T>
void route_forward(const RouteParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const int64_t T_ = p.seqlen, C = p.channels;
  const T* hidden = static_cast<const T*>(p.hidden);
  const Acc* weight = static_cast<const Acc*>(p.weight);
  const Acc bias = *static_cast<const Acc*>(p.bias);
  Acc* prob = static_cast<Acc*>(p.prob);

  at::parallel_for(0, p.batch * T_, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* row = hidden + r * C;
      Acc dot = 0;
      for (int64_t c = 0; c < C; ++c) dot += static_cast<Acc>(row[c]) * weight[c];
      const Acc pr = Acc(1) / (Acc(1) + std::exp(-(dot + bias)));
      prob[r] = pr;
      p.mask[r] = pr > static_cast<Acc>(p.threshold) || (p.force != nullptr && p.force[r]);
    }
  });
  at::parallel_for(0, p.batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      int32_t n = 0;
      for (int64_t t = 0; t < T_; ++t) {
        if (p.mask[b * T_ + t]) p.index[b * T_ + n++] = static_cast<int32_t>(t);
      }
      std::fill(p.index + b * T_ + n, p.index + (b + 1) * T_, static_cast<int32_t>(T_));
      p.counts[b] = n;
    }
  });
}

template <typename T>
void route_backward(const RouteBwdParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const int64_t rows = p.batch * p.seqlen, C = p.channels;
  const T* hidden = static_cast<const T*>(p.hidden);
  const Acc* weight = static_cast<const Acc*>(p.weight);
  const Acc* grad_prob = static_cast<const Acc*>(p.grad_prob);
  const Acc* prob = static_cast<const Acc*>(p.prob);
  T* grad_hidden = static_cast<T*>(p.grad_hidden);

  // The sums over all B*T rows (grad_bias, grad_weight) accumulate in double: a
  // float running sum over ~1e4+ rows would lose several digits to rounding.
  std::vector<Acc> grad_logit(rows);
  double grad_bias = 0;
  for (int64_t r = 0; r < rows; ++r) {
    grad_logit[r] = grad_prob[r] * prob[r] * (Acc(1) - prob[r]);
    grad_bias += static_cast<double>(grad_logit[r]);
  }
  *static_cast<Acc*>(p.grad_bias) = static_cast<Acc>(grad_bias);

  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < C; ++c) grad_hidden[r * C + c] = static_cast<T>(grad_logit[r] * weight[c]);
    }
  });
  // Each thread owns a slice of channels and sweeps every row, so no reduction across threads.
  Acc* grad_weight = static_cast<Acc*>(p.grad_weight);
  at::parallel_for(0, C, 16, [&](int64_t c_begin, int64_t c_end) {
    std::vector<double> sum(c_end - c_begin, 0.0);
    for (int64_t r = 0; r < rows; ++r) {
      const T* row = hidden + r * C;
      for (int64_t c = c_begin; c < c_end; ++c) {
        sum[c - c_begin] += static_cast<double>(grad_logit[r] * static_cast<Acc>(row[c]));
      }
    }
    for (int64_t c = c_begin; c < c_end; ++c) grad_weight[c] = static_cast<Acc>(sum[c - c_begin]);
  });
}

}  // namespace

void route_fwd_cpu(const RouteParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { route_forward<decltype(tag)>(p); });
}

void route_bwd_cpu(const RouteBwdParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { route_backward<decltype(tag)>(p); });
}

}  // namespace cram
