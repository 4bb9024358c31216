// CPU metaplastic scan (docs/metaplastic.md). The recurrence is sequential in T, so threads
// split independent lanes, one per (batch row, head); inside a lane the loop runs over time
// with the two d_v x d_k states in the accumulation type, row (value channel) by row, the
// d_k key channels innermost, contiguous and vectorised.
//
// Forward (§1): token by token, the running state kept in the final-state outputs.
// Backward (§3): the adjoint recurrence in reverse. It reads every token's state, which is
// recomputed rather than stored: a forward pass keeps the entry state of every chunk of C
// tokens, then the chunks are walked in reverse, each chunk's C states recomputed from its
// entry state into scratch and its tokens walked in reverse, carrying the adjoints G^M, G^I.
// Scratch per lane: (N + C + 1) * 2 * d_v * d_k for N = ceil(T / C) chunks; C = max(64, sqrt(T))
// keeps that O(sqrt(T)) for long sequences, at the price of one more forward pass.

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common/cpu_dispatch.h"
#include "common/cpu_isa.h"
#include "metaplastic_scan/metaplastic_scan.h"

#define CRAM_ALWAYS_INLINE __attribute__((always_inline)) inline

namespace cram {
namespace {

// Partial sums per reduction: a float sum vectorises only if its order may change, which
// the compiler may not do by itself (no -ffast-math). Also the column padding of the
// backward's scratch, so that its row loops run in whole blocks of kWidth.
constexpr int64_t kWidth = 8;
constexpr int64_t kMinChunk = 64;

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Tokens per chunk of the backward: 64, or sqrt(T) for long sequences (the scratch holds
// T / C entry states and C token states), and never more than T.
int64_t chunk_length(int64_t seqlen) {
  const auto root = static_cast<int64_t>(std::ceil(std::sqrt(static_cast<double>(seqlen))));
  return std::max<int64_t>(1, std::min(seqlen, std::max(kMinChunk, root)));
}

// sum_j x[j] y[j], in kWidth partial sums.
template <typename Acc>
CRAM_ALWAYS_INLINE Acc dot(const Acc* __restrict x, const Acc* __restrict y, int64_t n) {
  Acc part[kWidth] = {};
  int64_t j = 0;
  for (; j + kWidth <= n; j += kWidth) {
    for (int64_t l = 0; l < kWidth; ++l) part[l] += x[j + l] * y[j + l];
  }
  Acc s = 0;
  for (; j < n; ++j) s += x[j] * y[j];
  for (int64_t l = 0; l < kWidth; ++l) s += part[l];
  return s;
}

template <typename Acc>
CRAM_ALWAYS_INLINE Acc sum(const Acc (&part)[kWidth]) {
  Acc s = 0;
  for (int64_t l = 0; l < kWidth; ++l) s += part[l];
  return s;
}

// One token's q, k rows in the accumulation type, and k * k.
template <typename T, typename Acc>
CRAM_ALWAYS_INLINE void load_keys(const T* q, const T* k, Acc* qa, Acc* ka, Acc* kka, int64_t dk) {
  for (int64_t j = 0; j < dk; ++j) {
    qa[j] = static_cast<Acc>(q[j]);
    ka[j] = static_cast<Acc>(k[j]);
    kka[j] = ka[j] * ka[j];
  }
}

// Where one lane's rows are: token t of a (B, T, H, d) tensor is at t * H * d from the
// lane's token 0, of log_alpha at t * H.
struct LaneShape {
  int64_t seqlen, heads, dk, dv;
};

LaneShape lane_shape(const MetaplasticShape& p) { return {p.seqlen, p.heads, p.key_dim, p.value_dim}; }

// -------------------------------------------------------------------------- forward

template <typename T>
struct ForwardLane {
  using Acc = typename AccumulateType<T>::type;
  const T* q;  // the lane's token 0
  const T* k;
  const T* v;
  const T* b;
  const Acc* log_alpha;
  const Acc* M0;     // the lane's initial state, or nullptr for zeros; may be M itself (a step)
  const Acc* Ibar0;
  T* o;
  Acc* M;            // the running state, then the final one
  Acc* Ibar;
  Acc* scratch;      // 4 * d_k
  Acc prior, scale;
  LaneShape s;

  CRAM_ALWAYS_INLINE void run() const {
    const int64_t dk = s.dk, dv = s.dv, n = dv * dk;
    if (M0 != M) {
      for (int64_t x = 0; x < n; ++x) M[x] = M0 ? M0[x] : Acc(0);
    }
    if (Ibar0 != Ibar) {
      for (int64_t x = 0; x < n; ++x) Ibar[x] = Ibar0 ? Ibar0[x] : Acc(0);
    }
    Acc* qa = scratch;
    Acc* ka = scratch + dk;
    Acc* kka = scratch + 2 * dk;
    Acc* w = scratch + 3 * dk;
    for (int64_t t = 0; t < s.seqlen; ++t) {
      const int64_t tk = t * s.heads * dk, tv = t * s.heads * dv;
      load_keys(q + tk, k + tk, qa, ka, kka, dk);
      // exp(-inf) = 0: a reset multiplies the old state by exactly 0.
      const Acc a = std::exp(log_alpha[t * s.heads]);
      for (int64_t i = 0; i < dv; ++i) {
        Acc* __restrict Mi = M + i * dk;
        Acc* __restrict Ii = Ibar + i * dk;
        const Acc vi = static_cast<Acc>(v[tv + i]), bi = static_cast<Acc>(b[tv + i]);
        for (int64_t j = 0; j < dk; ++j) {
          Mi[j] = a * Mi[j] + vi * ka[j];
          Ii[j] = a * Ii[j] + bi * kka[j];
          w[j] = Mi[j] / (Ii[j] + prior);  // mu_t, row i
        }
        o[tv + i] = static_cast<T>(scale * dot(w, qa, dk));
      }
    }
  }
};

// -------------------------------------------------------------------------- backward

// The backward's scratch holds states with their rows padded to dkp = round_up(d_k, kWidth)
// columns, zero in the padding (q, k are zero there too), so that every row loop runs in
// whole blocks of kWidth with its partial sums.
template <typename T>
struct BackwardLane {
  using Acc = typename AccumulateType<T>::type;
  const T* grad_o;
  const T* q;
  const T* k;
  const T* v;
  const T* b;
  const Acc* log_alpha;
  const Acc* grad_M;  // the lane's gradient of the final state
  const Acc* grad_Ibar;
  const Acc* M0;      // or nullptr
  const Acc* Ibar0;
  T* grad_q;
  T* grad_k;
  T* grad_v;
  T* grad_b;
  Acc* grad_log_alpha;
  Acc* grad_M0;
  Acc* grad_Ibar0;
  double* grad_prior;  // the lane's share of the head's d prior
  Acc* scratch;        // scratch_size(...) elements, zero-initialised
  Acc prior, scale;
  LaneShape s;
  int64_t chunk;

  static int64_t scratch_size(const LaneShape& s, int64_t chunk) {
    const int64_t dkp = round_up(s.dk, kWidth), S = s.dv * dkp;
    const int64_t chunks = (s.seqlen + chunk - 1) / chunk;
    return (chunks + chunk + 1) * 2 * S + 6 * dkp + 3 * s.dv;
  }

  // state (dv x dk, or zeros when src is nullptr) -> padded (dv x dkp)
  CRAM_ALWAYS_INLINE void pad(Acc* dst, const Acc* src, int64_t dkp) const {
    for (int64_t i = 0; i < s.dv; ++i) {
      for (int64_t j = 0; j < dkp; ++j) dst[i * dkp + j] = (src && j < s.dk) ? src[i * s.dk + j] : Acc(0);
    }
  }

  CRAM_ALWAYS_INLINE void unpad(Acc* dst, const Acc* src, int64_t dkp) const {
    for (int64_t i = 0; i < s.dv; ++i) {
      for (int64_t j = 0; j < s.dk; ++j) dst[i * s.dk + j] = src[i * dkp + j];
    }
  }

  // (M, Ibar) after token t from (M, Ibar) before it; `out` may be `prev` (in place).
  CRAM_ALWAYS_INLINE void advance(const Acc* prevM, const Acc* prevI, Acc* outM, Acc* outI, int64_t t, Acc* ka,
                                  Acc* kka, int64_t dkp) const {
    const int64_t tk = t * s.heads * s.dk, tv = t * s.heads * s.dv;
    for (int64_t j = 0; j < s.dk; ++j) {
      ka[j] = static_cast<Acc>(k[tk + j]);
      kka[j] = ka[j] * ka[j];
    }
    const Acc a = std::exp(log_alpha[t * s.heads]);
    for (int64_t i = 0; i < s.dv; ++i) {
      const Acc vi = static_cast<Acc>(v[tv + i]), bi = static_cast<Acc>(b[tv + i]);
      const int64_t r = i * dkp;
      for (int64_t j = 0; j < dkp; ++j) {
        outM[r + j] = a * prevM[r + j] + vi * ka[j];
        outI[r + j] = a * prevI[r + j] + bi * kka[j];
      }
    }
  }

  CRAM_ALWAYS_INLINE void run() const {
    const int64_t dk = s.dk, dv = s.dv, dkp = round_up(dk, kWidth), S = dv * dkp;
    const int64_t T_ = s.seqlen, chunks = (T_ + chunk - 1) / chunk;
    Acc* entries = scratch;                    // chunks x (M, Ibar): the state entering chunk n
    Acc* states = entries + chunks * 2 * S;    // chunk x (M, Ibar): the state after each token of a chunk
    Acc* GM = states + chunk * 2 * S;          // the adjoints G^M, G^I of the state after the current token
    Acc* GI = GM + S;
    Acc* qa = GI + S;  // rows of the current token, d_k ones padded
    Acc* ka = qa + dkp;
    Acc* kka = ka + dkp;
    Acc* dqa = kka + dkp;
    Acc* dkv = dqa + dkp;  // sum_i G^M_ij v_i
    Acc* dkb = dkv + dkp;  // sum_i G^I_ij b_i
    Acc* va = dkb + dkp;
    Acc* ba = va + dv;
    Acc* doa = ba + dv;

    // 1. entry states, chunk by chunk.
    if (chunks > 0) {
      pad(entries, M0, dkp);
      pad(entries + S, Ibar0, dkp);
    }
    for (int64_t n = 0; n + 1 < chunks; ++n) {
      const Acc* prev = entries + n * 2 * S;
      Acc* next = entries + (n + 1) * 2 * S;
      for (int64_t t = n * chunk; t < (n + 1) * chunk; ++t) {
        advance(prev, prev + S, next, next + S, t, ka, kka, dkp);
        prev = next;
      }
    }

    // 2. the adjoints, from the gradient of the final state backwards.
    pad(GM, grad_M, dkp);
    pad(GI, grad_Ibar, dkp);
    double prior_sum = 0;
    for (int64_t n = chunks - 1; n >= 0; --n) {
      const int64_t t0 = n * chunk, t1 = std::min(T_, t0 + chunk);
      const Acc* entry = entries + n * 2 * S;
      for (int64_t t = t0; t < t1; ++t) {
        const Acc* prev = t == t0 ? entry : states + (t - t0 - 1) * 2 * S;
        Acc* out = states + (t - t0) * 2 * S;
        advance(prev, prev + S, out, out + S, t, ka, kka, dkp);
      }
      for (int64_t t = t1 - 1; t >= t0; --t) {
        const Acc* Mt = states + (t - t0) * 2 * S;
        const Acc* It = Mt + S;
        const Acc* Mp = t == t0 ? entry : states + (t - t0 - 1) * 2 * S;
        const Acc* Ip = Mp + S;
        prior_sum += reverse_token(t, Mt, It, Mp, Ip, GM, GI, qa, ka, kka, dqa, dkv, dkb, va, ba, doa, dkp);
      }
    }
    // G after token 1's decay: a_1 G_1, the gradient of the initial state (grad_M when T = 0).
    unpad(grad_M0, GM, dkp);
    unpad(grad_Ibar0, GI, dkp);
    *grad_prior = prior_sum;
  }

  // Token t of the adjoint recurrence (docs/metaplastic.md §3): on entry G = R_t (what
  // reaches the state after t from later tokens), on exit G = a_t G_t = R_{t-1}. Writes
  // t's gradients and returns its share of d prior.
  CRAM_ALWAYS_INLINE Acc reverse_token(int64_t t, const Acc* __restrict Mt, const Acc* __restrict It,
                                       const Acc* __restrict Mp, const Acc* __restrict Ip, Acc* __restrict GM,
                                       Acc* __restrict GI, Acc* __restrict qa, Acc* __restrict ka,
                                       Acc* __restrict kka, Acc* __restrict dqa, Acc* __restrict dkv,
                                       Acc* __restrict dkb, Acc* __restrict va, Acc* __restrict ba,
                                       Acc* __restrict doa, int64_t dkp) const {
    const int64_t dk = s.dk, dv = s.dv;
    const int64_t tk = t * s.heads * dk, tv = t * s.heads * dv;
    load_keys(q + tk, k + tk, qa, ka, kka, dk);
    for (int64_t i = 0; i < dv; ++i) {
      va[i] = static_cast<Acc>(v[tv + i]);
      ba[i] = static_cast<Acc>(b[tv + i]);
      doa[i] = scale * static_cast<Acc>(grad_o[tv + i]);  // scale dO_t: dmu_t = (scale dO_t) q_t^T
    }
    for (int64_t j = 0; j < dkp; ++j) dqa[j] = dkv[j] = dkb[j] = 0;
    const Acc a = std::exp(log_alpha[t * s.heads]);
    Acc alpha_part[kWidth] = {}, prior_part[kWidth] = {};
    for (int64_t i = 0; i < dv; ++i) {
      const int64_t r = i * dkp;
      const Acc sdo = doa[i], vi = va[i], bi = ba[i];
      Acc dv_part[kWidth] = {}, db_part[kWidth] = {};
      for (int64_t j0 = 0; j0 < dkp; j0 += kWidth) {
        for (int64_t l = 0; l < kWidth; ++l) {
          const int64_t j = j0 + l, x = r + j;
          const Acc inv = Acc(1) / (It[x] + prior);  // 1 / P_t
          const Acc mu = Mt[x] * inv;
          dqa[j] += sdo * mu;
          const Acc g = sdo * qa[j] * inv;  // dmu / P
          const Acc gmu = g * mu;           // dmu * mu / P
          const Acc gm = GM[x] + g, gi = GI[x] - gmu;  // G^M_t, G^I_t
          prior_part[l] -= gmu;
          dv_part[l] += gm * ka[j];
          db_part[l] += gi * kka[j];
          dkv[j] += gm * vi;
          dkb[j] += gi * bi;
          // <G_t, state_{t-1}>; at a reset (a = 0) the states before are finite, so 0 below.
          alpha_part[l] += gm * Mp[x] + gi * Ip[x];
          GM[x] = a * gm;
          GI[x] = a * gi;
        }
      }
      grad_v[tv + i] = static_cast<T>(sum(dv_part));
      grad_b[tv + i] = static_cast<T>(sum(db_part));
    }
    for (int64_t j = 0; j < dk; ++j) {
      grad_q[tk + j] = static_cast<T>(dqa[j]);
      grad_k[tk + j] = static_cast<T>(dkv[j] + Acc(2) * ka[j] * dkb[j]);
    }
    grad_log_alpha[t * s.heads] = a * sum(alpha_part);
    return sum(prior_part);
  }
};

// -------------------------------------------------------------------------- drivers

// The forward and the decoding step: a step is the forward of one token whose initial state
// is its final state (updated in place).
template <typename T>
void forward(const MetaplasticShape& p, const void* q, const void* k, const void* v, const void* b,
             const void* log_alpha, const void* prior, const void* M0, const void* Ibar0, void* o, void* M,
             void* Ibar) {
  using Acc = typename AccumulateType<T>::type;
  const LaneShape s = lane_shape(p);
  const int64_t T_ = s.seqlen, H = s.heads, dk = s.dk, dv = s.dv;
  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(4 * dk);
    for (int64_t l = begin; l < end; ++l) {
      const int64_t bi = l / H, h = l % H;
      const int64_t tok = bi * T_ * H + h;  // the lane's token 0 in (B, T, H, ...)
      const int64_t state = l * dv * dk;
      const Acc* m0 = static_cast<const Acc*>(M0);
      const Acc* i0 = static_cast<const Acc*>(Ibar0);
      run_lane(ForwardLane<T>{static_cast<const T*>(q) + tok * dk, static_cast<const T*>(k) + tok * dk,
                              static_cast<const T*>(v) + tok * dv, static_cast<const T*>(b) + tok * dv,
                              static_cast<const Acc*>(log_alpha) + tok, m0 ? m0 + state : nullptr,
                              i0 ? i0 + state : nullptr, static_cast<T*>(o) + tok * dv,
                              static_cast<Acc*>(M) + state, static_cast<Acc*>(Ibar) + state, scratch.data(),
                              static_cast<const Acc*>(prior)[h], static_cast<Acc>(p.scale), s});
    }
  });
}

template <typename T>
void backward(const MetaplasticBwdParams& p) {
  using Acc = typename AccumulateType<T>::type;
  const LaneShape s = lane_shape(p);
  const int64_t T_ = s.seqlen, H = s.heads, dk = s.dk, dv = s.dv;
  const int64_t chunk = chunk_length(T_);
  // d prior sums over every batch row of a head: each lane writes its own share (in double:
  // a sum over T * d_v * d_k terms), summed over batch rows afterwards, in a fixed order.
  std::vector<double> prior_share(p.batch * H, 0.0);
  const Acc* M0 = static_cast<const Acc*>(p.M0);
  const Acc* Ibar0 = static_cast<const Acc*>(p.Ibar0);
  at::parallel_for(0, p.batch * H, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> scratch(BackwardLane<T>::scratch_size(s, chunk), Acc(0));
    for (int64_t l = begin; l < end; ++l) {
      const int64_t bi = l / H, h = l % H;
      const int64_t tok = bi * T_ * H + h;
      const int64_t state = l * dv * dk;
      run_lane(BackwardLane<T>{
          static_cast<const T*>(p.grad_o) + tok * dv, static_cast<const T*>(p.q) + tok * dk,
          static_cast<const T*>(p.k) + tok * dk, static_cast<const T*>(p.v) + tok * dv,
          static_cast<const T*>(p.b) + tok * dv, static_cast<const Acc*>(p.log_alpha) + tok,
          static_cast<const Acc*>(p.grad_M) + state, static_cast<const Acc*>(p.grad_Ibar) + state,
          M0 ? M0 + state : nullptr, Ibar0 ? Ibar0 + state : nullptr, static_cast<T*>(p.grad_q) + tok * dk,
          static_cast<T*>(p.grad_k) + tok * dk, static_cast<T*>(p.grad_v) + tok * dv,
          static_cast<T*>(p.grad_b) + tok * dv, static_cast<Acc*>(p.grad_log_alpha) + tok,
          static_cast<Acc*>(p.grad_M0) + state, static_cast<Acc*>(p.grad_Ibar0) + state, &prior_share[l],
          scratch.data(), static_cast<const Acc*>(p.prior)[h], static_cast<Acc>(p.scale), s, chunk});
    }
  });
  Acc* grad_prior = static_cast<Acc*>(p.grad_prior);
  for (int64_t h = 0; h < H; ++h) {
    double total = 0;
    for (int64_t bi = 0; bi < p.batch; ++bi) total += prior_share[bi * H + h];
    grad_prior[h] = static_cast<Acc>(total);
  }
}

}  // namespace

void metaplastic_scan_fwd_cpu(const MetaplasticParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) {
    forward<decltype(tag)>(p, p.q, p.k, p.v, p.b, p.log_alpha, p.prior, p.M0, p.Ibar0, p.o, p.M, p.Ibar);
  });
}

void metaplastic_scan_bwd_cpu(const MetaplasticBwdParams& p) {
  dispatch_cpu_element_type(p.dtype, [&](auto tag) { backward<decltype(tag)>(p); });
}

void metaplastic_step_cpu(const MetaplasticStepParams& p) {
  MetaplasticShape one = p;
  one.seqlen = 1;
  dispatch_cpu_element_type(p.dtype, [&](auto tag) {
    forward<decltype(tag)>(one, p.q, p.k, p.v, p.b, p.log_alpha, p.prior, p.M, p.Ibar, p.o, p.M, p.Ibar);
  });
}

}  // namespace cram
