// Error checking of CUDA runtime calls and kernel launches on the host side of the
// kernels. Throws std::runtime_error (torch turns it into a Python RuntimeError),
// naming the failed call and where it was made.
#pragma once

#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

namespace cram {

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error: ") + cudaGetErrorString(err) + " in " + what + " at " + file +
                             ":" + std::to_string(line));
  }
}

}  // namespace cram

// CRAM_CUDA_CHECK(cudaMemsetAsync(...)); after a launch: CRAM_CUDA_CHECK(cudaGetLastError()).
#define CRAM_CUDA_CHECK(expr) ::cram::cuda_check((expr), #expr, __FILE__, __LINE__)
