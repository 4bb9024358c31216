// Maps an ElementType to the C++ element type of the CPU kernels (c10's half types
// convert to and from float implicitly) and its accumulation type.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "common/element_type.h"

namespace cram {

template <typename T> struct AccumulateType { using type = float; };
template <> struct AccumulateType<double> { using type = double; };

template <typename Fn>
void dispatch_cpu_element_type(ElementType t, Fn&& fn) {
  switch (t) {
    case ElementType::kFloat32: fn(float{}); break;
    case ElementType::kFloat64: fn(double{}); break;
    case ElementType::kFloat16: fn(c10::Half{}); break;
    case ElementType::kBFloat16: fn(c10::BFloat16{}); break;
  }
}

}  // namespace cram
