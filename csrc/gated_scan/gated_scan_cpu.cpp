// CPU gated scan. The recurrence is sequential in T, so threads split independent
// lanes, each a batch row and a slice of channels; inside a lane the loop runs over
// time with the channel slice innermost, contiguous and vectorised. Slices are as
// wide as the thread count allows, so each time step reads one contiguous run.

#include <ATen/Parallel.h>

#include <algorithm>

#include "common/cpu_dispatch.h"
#include "common/cpu_isa.h"
#include "common/cpu_math.h"
#include "gated_scan/gated_scan.h"

namespace cram {
namespace {

constexpr int64_t kMaxSlice = 1024;  // channels of one lane: its state lives on the stack

struct Lanes {
  int64_t slice, per_row;
};

// Enough lanes for every thread, each as wide as possible (up to kMaxSlice).
Lanes make_lanes(int64_t batch, int64_t channels) {
  const int64_t threads = at::get_num_threads();
  const int64_t want_per_row = std::max<int64_t>(1, (threads + batch - 1) / batch);
  int64_t slice = (channels + want_per_row - 1) / want_per_row;
  slice = std::min(kMaxSlice, (slice + 15) / 16 * 16);
  return {slice, (channels + slice - 1) / slice};
}

template <typename T>
struct ForwardLane {
  using Acc = typename AccumulateType<T>::type;
  const T* __restrict x;
  const T* __restrict log_a;
  const Acc* __restrict h0;  // lane's slice of h0, or nullptr
  T* __restrict h;
  Acc* __restrict h_last;
  int64_t seqlen, stride, n;

  __attribute__((always_inline)) inline void run() const {
    Acc state[kMaxSlice];
    for (int64_t c = 0; c < n; ++c) state[c] = h0 ? h0[c] : Acc(0);
    for (int64_t t = 0; t < seqlen; ++t) {
      const int64_t off = t * stride;
      for (int64_t c = 0; c < n; ++c) {
        state[c] = exp_vectorisable(static_cast<Acc>(log_a[off + c])) * state[c] + static_cast<Acc>(x[off + c]);
        h[off + c] = static_cast<T>(state[c]);
      }
    }
    for (int64_t c = 0; c < n; ++c) h_last[c] = state[c];
  }
};

// carry = a[t+1] * g[t+1], the gradient reaching h[t] from later steps.
template <typename T>
struct BackwardLane {
  using Acc = typename AccumulateType<T>::type;
  const T* __restrict grad_h;
  const Acc* __restrict grad_h_last;
  const T* __restrict log_a;
  const T* __restrict h;
  const Acc* __restrict h0;  // lane's slice of h0, or nullptr
  T* __restrict grad_x;
  T* __restrict grad_log_a;
  Acc* __restrict grad_h0;
  int64_t seqlen, stride, n;

  // One reverse step at time t, given h_prev(c) = h[t-1] at channel c.
  template <typename HPrev>
  __attribute__((always_inline)) inline void step(Acc* carry, int64_t t, HPrev h_prev) const {
    const int64_t off = t * stride;
    for (int64_t c = 0; c < n; ++c) {
      const Acc g = static_cast<Acc>(grad_h[off + c]) + carry[c];
      const Acc a = exp_vectorisable(static_cast<Acc>(log_a[off + c]));
      grad_x[off + c] = static_cast<T>(g);
      grad_log_a[off + c] = static_cast<T>(g * a * h_prev(c));
      carry[c] = a * g;
    }
  }

  __attribute__((always_inline)) inline void run() const {
    Acc carry[kMaxSlice];
    for (int64_t c = 0; c < n; ++c) carry[c] = grad_h_last[c];
    for (int64_t t = seqlen - 1; t >= 1; --t) {
      const T* h_row = h + (t - 1) * stride;
      step(carry, t, [&](int64_t c) { return static_cast<Acc>(h_row[c]); });
    }
    if (seqlen > 0) step(carry, 0, [&](int64_t c) { return h0 ? h0[c] : Acc(0); });
    for (int64_t c = 0; c < n; ++c) grad_h0[c] = carry[c];
  }
};

// Calls lane(seq, state, n) in parallel for every (batch row, channel slice): seq and
// state are the slice's first element in the (B, T, C) and (B, C) tensors, n its width.
template <typename Fn>
void for_each_lane(int64_t batch, int64_t seqlen, int64_t channels, const Fn& lane) {
  const Lanes lanes = make_lanes(batch, channels);
  at::parallel_for(0, batch * lanes.per_row, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / lanes.per_row, c0 = (i % lanes.per_row) * lanes.slice;
      lane(b * seqlen * channels + c0, b * channels + c0, std::min(lanes.slice, channels - c0));
    }
  });
}

template <typename T>
void forward(const GatedScanParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const Acc* h0 = static_cast<const Acc*>(p.h0);
  for_each_lane(p.batch, p.seqlen, p.channels, [&](int64_t seq, int64_t state, int64_t n) {
    run_lane(ForwardLane<T>{static_cast<const T*>(p.x) + seq, static_cast<const T*>(p.log_a) + seq,
                            h0 ? h0 + state : nullptr, static_cast<T*>(p.h) + seq,
                            static_cast<Acc*>(p.h_last) + state, p.seqlen, p.channels, n});
  });
}

template <typename T>
void backward(const GatedScanBwdParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const Acc* h0 = static_cast<const Acc*>(p.h0);
  for_each_lane(p.batch, p.seqlen, p.channels, [&](int64_t seq, int64_t state, int64_t n) {
    run_lane(BackwardLane<T>{static_cast<const T*>(p.grad_h) + seq, static_cast<const Acc*>(p.grad_h_last) + state,
                             static_cast<const T*>(p.log_a) + seq, static_cast<const T*>(p.h) + seq,
                             h0 ? h0 + state : nullptr, static_cast<T*>(p.grad_x) + seq,
                             static_cast<T*>(p.grad_log_a) + seq, static_cast<Acc*>(p.grad_h0) + state, p.seqlen,
                             p.channels, n});
  });
}

}  // namespace

void gated_scan_fwd_cpu(const GatedScanParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}

void gated_scan_bwd_cpu(const GatedScanBwdParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { backward<decltype(tag)>(p); });
}

}  // namespace cram
