// The element types on the device: short vectors of float32 / float16 / bfloat16
// moved as one access and kept packed in 32-bit registers, their conversion to and
// from the float32 accumulator, and the host-side dispatch from ElementType to the
// device type. Shared by the .cu files; no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <stdexcept>
#include <type_traits>

#include "common/element_type.h"

namespace cram {

// Elements of T in one 16-byte access.
template <typename T>
constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// VEC elements of T (16 bytes, or a single element) held in 32-bit words, two 16-bit
// elements a word. Kept as words rather than as T[VEC] on purpose: an array of
// 16-bit structs costs one register per element, the words half as many, which is
// what lets a thread keep a tile of them in registers.
template <typename T, int VEC>
struct Packed {
  static_assert(VEC == 1 || VEC * sizeof(T) == 16, "a 16-byte vector or a single element");
  static constexpr int kWords = VEC * sizeof(T) < 4 ? 1 : VEC * sizeof(T) / 4;
  unsigned w[kWords];
};

// kStreaming: for data read exactly once. The evict-first hint (ld.global.cs) keeps the
// stream from displacing what stays in L2 (measured 4-10% faster for the router's
// single pass over hidden on an H100).
template <typename T, int VEC, bool kStreaming = false>
__device__ __forceinline__ Packed<T, VEC> load_packed(const T* p) {
  const auto load = [](const auto* q) { return kStreaming ? __ldcs(q) : *q; };
  Packed<T, VEC> v;
  if constexpr (VEC * sizeof(T) == 16) {
    const uint4 u = load(reinterpret_cast<const uint4*>(p));
    v.w[0] = u.x, v.w[1] = u.y, v.w[2] = u.z, v.w[3] = u.w;
  } else if constexpr (sizeof(T) == 4) {
    v.w[0] = load(reinterpret_cast<const unsigned*>(p));
  } else {
    v.w[0] = load(reinterpret_cast<const unsigned short*>(p));
  }
  return v;
}

template <typename T, int VEC>
__device__ __forceinline__ void store_packed(T* p, const Packed<T, VEC>& v) {
  if constexpr (VEC * sizeof(T) == 16) {
    // The intrinsic, not a plain uint4 assignment: the optimiser may split that into
    // four 4-byte stores (it did in the scan kernels).
    __stwb(reinterpret_cast<uint4*>(p), make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]));
  } else if constexpr (sizeof(T) == 4) {
    *reinterpret_cast<unsigned*>(p) = v.w[0];
  } else {
    *reinterpret_cast<unsigned short*>(p) = static_cast<unsigned short>(v.w[0]);
  }
}

template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> zero_packed() {
  Packed<T, VEC> v;
#pragma unroll
  for (int i = 0; i < Packed<T, VEC>::kWords; ++i) v.w[i] = 0u;  // +0.0 in every type
  return v;
}

// Element i as float32 (i a compile-time constant after unrolling).
template <typename T, int VEC>
__device__ __forceinline__ float element(const Packed<T, VEC>& v, int i) {
  if constexpr (sizeof(T) == 4) {
    return __uint_as_float(v.w[i]);
  } else {
    const unsigned word = v.w[i / 2];
    const unsigned bits = i % 2 == 0 ? word & 0xffffu : word >> 16;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      return __uint_as_float(bits << 16);  // bfloat16 is the top half of a float32
    } else {
      return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
    }
  }
}

// VEC float32 values rounded to nearest into a Packed.
template <typename T, int VEC>
__device__ __forceinline__ Packed<T, VEC> pack(const float (&f)[VEC]) {
  Packed<T, VEC> v;
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v.w[i] = __float_as_uint(f[i]);
  } else if constexpr (VEC == 1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>) {
      v.w[0] = __bfloat16_as_ushort(__float2bfloat16_rn(f[0]));
    } else {
      v.w[0] = __half_as_ushort(__float2half_rn(f[0]));
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; i += 2) {
      if constexpr (std::is_same_v<T, __nv_bfloat16>) {
        const __nv_bfloat162 two = __floats2bfloat162_rn(f[i], f[i + 1]);  // .x is the low half
        v.w[i / 2] = *reinterpret_cast<const unsigned*>(&two);
      } else {
        const __half2 two = __floats2half2_rn(f[i], f[i + 1]);
        v.w[i / 2] = *reinterpret_cast<const unsigned*>(&two);
      }
    }
  }
  return v;
}

// VEC float32 values: 16-byte loads when VEC is a multiple of 4 (p then 16-byte aligned).
template <int VEC>
__device__ __forceinline__ void load_floats(const float* p, float (&out)[VEC]) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      const float4 f = *reinterpret_cast<const float4*>(p + i);
      out[i] = f.x, out[i + 1] = f.y, out[i + 2] = f.z, out[i + 3] = f.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = p[i];
  }
}

inline bool is_aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Calls fn(T{}) with T the device type of t. float64 has no CUDA kernels (the
// launchers refuse it before getting here).
template <typename Fn>
void dispatch_cuda_element_type(ElementType t, Fn&& fn) {
  switch (t) {
    case ElementType::kFloat32: fn(float{}); break;
    case ElementType::kFloat16: fn(__half{}); break;
    case ElementType::kBFloat16: fn(__nv_bfloat16{}); break;
    default: throw std::invalid_argument("cram CUDA kernels: float64 is not supported on CUDA");
  }
}

}  // namespace cram
