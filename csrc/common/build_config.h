// What this binary was compiled with, reported by cram_ext.build_info().
// setup.py / CMake define the CRAM_* macros; defaults describe a CPU-only build.
#pragma once

#include <string>

#ifndef CRAM_CUDA_ARCHS
#define CRAM_CUDA_ARCHS ""
#endif
#ifndef CRAM_CUDA_VERSION
#define CRAM_CUDA_VERSION ""
#endif
#ifndef CRAM_CUTLASS_VERSION
#define CRAM_CUTLASS_VERSION ""
#endif

namespace cram {

inline std::string build_config_json() {
#ifdef CRAM_WITH_CUDA
  const char* backends = "[\"cpu\", \"cuda\"]";
#else
  const char* backends = "[\"cpu\"]";
#endif
  return std::string("{\"backends\": ") + backends + ", \"cuda_archs\": \"" CRAM_CUDA_ARCHS
         "\", \"cuda_version\": \"" CRAM_CUDA_VERSION "\", \"cutlass_version\": \"" CRAM_CUTLASS_VERSION "\"}";
}

}  // namespace cram
