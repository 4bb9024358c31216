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

inline float exp_vectorisable(float x_in) {
  // No lower clamp: below -87 the result is replaced by 0 at the end, whatever 2^n was.
  const float x = x_in > 88.0f ? 88.0f : x_in;
  // x log2(e) + 1.5 * 2^23 holds round(x log2(e)) = n in its low mantissa bits: n without a
  // float-to-int conversion (undefined out of range, as at x = -inf) and without libm.
  const float shifted = x * 1.44269504088896341f + 12582912.0f;
  const float n = shifted - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  uint32_t bits;
  std::memcpy(&bits, &shifted, sizeof(bits));
  bits = (bits - 0x4B400000u + 127u) << 23;  // 2^n (0x4B400000: the bits of 1.5 * 2^23)
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x_in < -87.0f ? 0.0f : p * scale;
}

inline double exp_vectorisable(double x) { return std::exp(x); }

}  // namespace cram
