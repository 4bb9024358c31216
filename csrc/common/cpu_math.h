// exp written with plain arithmetic so that the compiler vectorises the loops that
// call it (std::exp is an opaque libm call and keeps a loop scalar without
// -ffast-math). Cody-Waite range reduction and a degree-6 polynomial: within
// 2 ulp of std::exp on [-87, 88]; 0 below -87 (off by less than exp(-87) = 1.65e-38: the
// bottom of the normal range and the subnormals); exp(88) above; NaN for NaN. Exact 0 at -inf matters: log_a = -inf is the
// scan's reset, h[t] = x[t], and its gradient must be exactly 0.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cram {

// 1.5 * 2^23: x log2(e) + kRoundShift holds round(x log2(e)) = n in its low mantissa bits, n
// without a float-to-int conversion (undefined out of range, as at x = -inf) and without libm.
constexpr float kRoundShift = 12582912.0f;

// 2^n from `shifted` = n + kRoundShift (0x4B400000: the bits of kRoundShift).
inline float two_to_the(float shifted) {
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

inline float exp_vectorisable(float x_in) {
  // No lower clamp: below -87 the result is replaced by 0 at the end, whatever 2^n was.
  const float x = x_in > 88.0f ? 88.0f : x_in;
  const float shifted = x * 1.44269504088896341f + kRoundShift;
  const float n = shifted - kRoundShift;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return x_in < -87.0f ? 0.0f : p * two_to_the(shifted);
}

inline double exp_vectorisable(double x) { return std::exp(x); }

// exp for softmax weights, x = s - max <= 0, in fewer operations than exp_vectorisable: the
// softmax pass of CPU attention spends most of its time here. With kFma (a caller compiled for
// FMA; elsewhere std::fma is a library call and the loop would not vectorise), the range
// reduction is one fma, in which n ln2 is exact; the single-float ln2 is off by 2e-9, so r is
// off by less than 3e-7 at the bottom of the range, where exp is below 1e-38. Without it, the
// two-part reduction of exp_vectorisable. Then a degree-5 polynomial for exp(r): within 5e-7
// relative of std::exp on [-87, 0] (4.0e-7 with kFma, 1.8e-7 without, over a 1e-5 grid when
// written; the float32 attention tests hold the result to 1e-5); 0 below -87 and at -inf, NaN for NaN.
template <bool kFma>
inline float exp_nonpositive(float x) {
  const auto mul_add = [](float a, float b, float c) { return kFma ? std::fma(a, b, c) : a * b + c; };
  const float shifted = mul_add(x, 1.44269504088896341f, kRoundShift);
  const float n = shifted - kRoundShift;
  const float r = kFma ? std::fma(n, -0.693147180559945309f, x) : (x - n * 0.693359375f) + n * 2.12194440e-4f;
  // 1 + r + r^2 (c2 + c3 r + c4 r^2 + c5 r^3), coefficients fitted for the least maximum
  // relative error on [-ln2/2, ln2/2] (1.05e-7 in exact arithmetic).
  float p = mul_add(8.312525227665901e-3f, r, 4.1890114545822144e-2f);
  p = mul_add(p, r, 1.6667114198207855e-1f);
  p = mul_add(p, r, 4.99992311000824e-1f);
  p = mul_add(p, r * r, r) + 1.0f;
  return x < -87.0f ? 0.0f : p * two_to_the(shifted);
}

template <bool kFma>
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace cram
