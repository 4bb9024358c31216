// The element types a kernel may be asked to run on, named without torch so that
// kernels and their Params structs stay free of it. Launchers translate at::ScalarType.
#pragma once

namespace cram {

enum class ElementType { kFloat32, kFloat16, kBFloat16, kFloat64 };

}  // namespace cram
