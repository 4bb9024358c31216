// CPU gated scan. The recurrence is sequential in T, so threads split the
// independent (batch, channel-block) lanes; inside a lane the loop runs over
// time with the channel block innermost, contiguous and vectorisable.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>

#include "common/cpu_dispatch.h"
#include "common/cpu_math.h"
#include "gated_scan/gated_scan.h"

namespace cram {
namespace {

constexpr int64_t kChannelBlock = 64;

template <typename T>
void forward_lanes(const GatedScanParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const int64_t T_ = p.seqlen, C = p.channels;
  const int64_t blocks_per_row = (C + kChannelBlock - 1) / kChannelBlock;
  const T* x = static_cast<const T*>(p.x);
  const T* log_a = static_cast<const T*>(p.log_a);
  const Acc* h0 = static_cast<const Acc*>(p.h0);
  T* h = static_cast<T*>(p.h);
  Acc* h_last = static_cast<Acc*>(p.h_last);

  at::parallel_for(0, p.batch * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    Acc state[kChannelBlock];
    for (int64_t lane = begin; lane < end; ++lane) {
      const int64_t b = lane / blocks_per_row;
      const int64_t c0 = (lane % blocks_per_row) * kChannelBlock;
      const int64_t n = std::min(kChannelBlock, C - c0);
      for (int64_t c = 0; c < n; ++c) state[c] = h0 ? h0[b * C + c0 + c] : Acc(0);
      const int64_t row = b * T_ * C + c0;
      for (int64_t t = 0; t < T_; ++t) {
        const int64_t off = row + t * C;
        for (int64_t c = 0; c < n; ++c) {
          state[c] = exp_vectorisable(static_cast<Acc>(log_a[off + c])) * state[c] + static_cast<Acc>(x[off + c]);
          h[off + c] = static_cast<T>(state[c]);
        }
      }
      for (int64_t c = 0; c < n; ++c) h_last[b * C + c0 + c] = state[c];
    }
  });
}

template <typename T>
void backward_lanes(const GatedScanBwdParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const int64_t T_ = p.seqlen, C = p.channels;
  const int64_t blocks_per_row = (C + kChannelBlock - 1) / kChannelBlock;
  const T* grad_h = static_cast<const T*>(p.grad_h);
  const Acc* grad_h_last = static_cast<const Acc*>(p.grad_h_last);
  const T* log_a = static_cast<const T*>(p.log_a);
  const T* h = static_cast<const T*>(p.h);
  const Acc* h0 = static_cast<const Acc*>(p.h0);
  T* grad_x = static_cast<T*>(p.grad_x);
  T* grad_log_a = static_cast<T*>(p.grad_log_a);
  Acc* grad_h0 = static_cast<Acc*>(p.grad_h0);

  at::parallel_for(0, p.batch * blocks_per_row, 1, [&](int64_t begin, int64_t end) {
    // carry[c] = a[t+1] * g[t+1]: the gradient flowing into h[t] from later steps.
    Acc carry[kChannelBlock];
    for (int64_t lane = begin; lane < end; ++lane) {
      const int64_t b = lane / blocks_per_row;
      const int64_t c0 = (lane % blocks_per_row) * kChannelBlock;
      const int64_t n = std::min(kChannelBlock, C - c0);
      for (int64_t c = 0; c < n; ++c) carry[c] = grad_h_last[b * C + c0 + c];
      const int64_t row = b * T_ * C + c0;
      // One reverse step at time t, given the state h[t-1] before it.
      auto step = [&](int64_t t, auto&& h_prev) {
        const int64_t off = row + t * C;
        for (int64_t c = 0; c < n; ++c) {
          const Acc g = static_cast<Acc>(grad_h[off + c]) + carry[c];
          const Acc a = exp_vectorisable(static_cast<Acc>(log_a[off + c]));
          grad_x[off + c] = static_cast<T>(g);
          grad_log_a[off + c] = static_cast<T>(g * a * h_prev(c));
          carry[c] = a * g;
        }
      };
      for (int64_t t = T_ - 1; t >= 1; --t) {
        const T* h_row = h + row + (t - 1) * C;
        step(t, [&](int64_t c) { return static_cast<Acc>(h_row[c]); });
      }
      if (T_ > 0) {
        const Acc* h0_row = h0 ? h0 + b * C + c0 : nullptr;
        step(0, [&](int64_t c) { return h0_row ? h0_row[c] : Acc(0); });
      }
      for (int64_t c = 0; c < n; ++c) grad_h0[b * C + c0 + c] = carry[c];
    }
  });
}

}  // namespace

void gated_scan_fwd_cpu(const GatedScanParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { forward_lanes<decltype(tag)>(p); });
}

void gated_scan_bwd_cpu(const GatedScanBwdParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { backward_lanes<decltype(tag)>(p); });
}

}  // namespace cram
