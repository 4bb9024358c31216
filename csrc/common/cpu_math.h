// exp written with plain arithmetic so that the compiler vectorises the loops that
// call it (std::exp is an opaque libm call and keeps a loop scalar without
// -ffast-math). Cody-Waite range reduction and a degree-6 polynomial: within
// 2 ulp of std::exp on [-87, 88]; clamps outside (exp(-87) ~ 1.6e-38 stands in for 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace cram {

inline float exp_vectorisable(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  // Round to nearest by adding and removing 1.5 * 2^23 (no libm call, so it vectorises).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline double exp_vectorisable(double x) { return std::exp(x); }

}  // namespace cram
