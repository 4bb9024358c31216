// Launcher-side helpers between torch tensors and the torch-free kernel interfaces.
#pragma once

#include <ATen/ATen.h>

#include "common/element_type.h"

namespace cram {

inline ElementType element_type_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return ElementType::kFloat32;
    case at::kHalf: return ElementType::kFloat16;
    case at::kBFloat16: return ElementType::kBFloat16;
    case at::kDouble: return ElementType::kFloat64;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", t.scalar_type());
  }
}

// float32 for the reduced-precision types and float32 itself, float64 for float64.
inline at::ScalarType accumulate_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

template <typename T>
inline const T* optional_data_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace cram

#ifdef CRAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>

namespace cram {

// The stream the CUDA kernels must run on: torch's current stream for t's device.
inline void* cuda_stream_of(const at::Tensor& t) {
  return static_cast<void*>(at::cuda::getCurrentCUDAStream(t.device().index()).stream());
}

}  // namespace cram
#endif
