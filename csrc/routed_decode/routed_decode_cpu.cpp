// CPU kernel of routed decoding: one task per (row, head), scores over the row's valid keys,
// an exact softmax, the weighted sum of values. Reads the inputs in their own dtype and
// strides and accumulates in float32 (float64 for float64 inputs).

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_dispatch.h"
#include "routed_decode/routed_decode.h"

namespace cram {
namespace {

template <typename T>
void decode_rows(const RoutedDecodeParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const T* q = static_cast<const T*>(p.q);
  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  T* out = static_cast<T*>(p.out);
  Acc* lse = static_cast<Acc*>(p.lse);
  const int64_t H = p.num_heads, D = p.head_dim, G = p.num_heads / p.num_kv_heads;
  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scores, acc(D);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const int64_t n = p.routed[b] ? std::clamp<int64_t>(p.seqlens[b], 0, p.cache_len) : 0;
      T* o = out + bh * D;
      if (n == 0) {
        std::fill(o, o + D, T(0));
        lse[bh] = -std::numeric_limits<Acc>::infinity();
        continue;
      }
      const T* qr = q + b * p.q_batch_stride + h * p.q_head_stride;
      const T* kb = k + b * p.k_batch_stride + (h / G) * p.k_head_stride;
      const T* vb = v + b * p.v_batch_stride + (h / G) * p.v_head_stride;
      scores.resize(n);
      Acc m = -std::numeric_limits<Acc>::infinity();
      for (int64_t j = 0; j < n; ++j) {
        const T* kr = kb + j * p.k_row_stride;
        Acc s = 0;
        for (int64_t d = 0; d < D; ++d) s += static_cast<Acc>(qr[d]) * static_cast<Acc>(kr[d]);
        scores[j] = s * static_cast<Acc>(p.softmax_scale);
        m = std::max(m, scores[j]);
      }
      std::fill(acc.begin(), acc.end(), Acc(0));
      Acc l = 0;
      for (int64_t j = 0; j < n; ++j) {
        const Acc w = std::exp(scores[j] - m);
        l += w;
        const T* vr = vb + j * p.v_row_stride;
        for (int64_t d = 0; d < D; ++d) acc[d] += w * static_cast<Acc>(vr[d]);
      }
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[d] / l);
      lse[bh] = m + std::log(l);
    }
  });
}

}  // namespace

void routed_decode_cpu(const RoutedDecodeParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto element) { decode_rows<decltype(element)>(p); });
}

}  // namespace cram
