// Argument checks shared by every op's launcher. Each failure names the argument,
// what was expected and what was given; TORCH_CHECK_TYPE / TORCH_CHECK_VALUE surface
// in Python as TypeError / ValueError.
#pragma once

#include <ATen/ATen.h>

#include <initializer_list>
#include <sstream>
#include <string>

namespace cram {

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::ostringstream s;
  bool first = true;
  for (auto d : dtypes) {
    s << (first ? "" : ", ") << c10::toString(d);
    first = false;
  }
  return s.str();
}

inline void check_dtype(const at::Tensor& t, const char* name, std::initializer_list<at::ScalarType> allowed) {
  for (auto d : allowed) {
    if (t.scalar_type() == d) return;
  }
  TORCH_CHECK_TYPE(false, name, ": expected dtype in {", dtype_list(allowed), "}, got ", t.scalar_type());
}

inline void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), name, ": expected the dtype of ", ref_name, " (",
                   ref.scalar_type(), "), got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, ": expected a ", dim, "-d tensor ", layout, ", got shape ", t.sizes());
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, ": expected shape ", expected, ", got ", t.sizes());
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, ": expected a tensor on ", ref.device(), " like ", ref_name,
                    ", got one on ", t.device());
}

inline void check_supported_device(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_cpu() || t.is_cuda(), name, ": expected a CPU or CUDA tensor, got one on ", t.device());
}

}  // namespace cram
