// Entry points of the CUDA routed attention: dispatch on (element type, head dim) to the
// launchers instantiated in routed_attention_{fwd,bwd}_hdim*_*.cu.

#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "common/cuda_check.h"

#include "routed_attention/routed_attention_bwd_kernel.cuh"
#include "routed_attention/routed_attention_fwd_kernel.cuh"
#include "routed_attention/routed_attention_launch.h"
#include "routed_attention/routed_attention_params.h"

namespace cram {
namespace {

template <class F>
void dispatch(const RoutedAttentionParams& p, const char* what, F&& f) {
  const bool bf16 = p.dtype == ElementType::kBFloat16, fp16 = p.dtype == ElementType::kFloat16;
  if (!bf16 && !fp16) throw std::invalid_argument(std::string(what) + ": CUDA supports float16 and bfloat16 only");
  if (p.head_dim == 64) {
    if (bf16) return f(std::integral_constant<int, 64>{}, cutlass::bfloat16_t{});
    return f(std::integral_constant<int, 64>{}, cutlass::half_t{});
  }
  if (p.head_dim == 128) {
    if (bf16) return f(std::integral_constant<int, 128>{}, cutlass::bfloat16_t{});
    return f(std::integral_constant<int, 128>{}, cutlass::half_t{});
  }
  throw std::invalid_argument(std::string(what) + ": CUDA supports head dims 64 and 128, got " +
                              std::to_string(p.head_dim));
}

// Compiled like every kernel of the build: its binary version is the arch of the code that runs.
__global__ void arch_probe_kernel() {}

}  // namespace

bool routed_attention_fused_dq_supported() {
  constexpr int kMaxDevices = 64;
  static signed char known[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no (a race writes the same value)
  int device = 0;
  CRAM_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && known[device] != 0) return known[device] > 0;
  cudaFuncAttributes attr{};
  CRAM_CUDA_CHECK(cudaFuncGetAttributes(&attr, arch_probe_kernel));
  const bool supported = attr.binaryVersion >= 90;
  if (device < kMaxDevices) known[device] = supported ? 1 : -1;
  return supported;
}

size_t routed_attention_fwd_workspace_bytes(const RoutedAttentionParams& p) {
  size_t bytes = 0;
  dispatch(p, "routed_attention", [&](auto d, auto) {
    constexpr int D = decltype(d)::value;
    using Config = ra::FwdConfig<D>;
    bytes = ra::FwdWorkspace::bytes(ra::fwd_plan_sizes(p, Config::kBlockM, Config::kBlockN), Config::kBlockM, D);
  });
  return bytes;
}

void routed_attention_fwd_cuda(const RoutedAttentionParams& p, void* stream) {
  dispatch(p, "routed_attention", [&](auto d, auto e) {
    ra::run_routed_attention_fwd<decltype(d)::value, decltype(e)>(p, static_cast<cudaStream_t>(stream));
  });
}

size_t routed_attention_bwd_workspace_bytes(const RoutedAttentionParams& p) {
  return ra::BwdWorkspace::bytes(p.batch, p.num_heads, p.seqlen_q, p.fused_dq ? p.head_dim : 0);
}

void routed_attention_bwd_cuda(const RoutedAttentionParams& p, void* stream) {
  dispatch(p, "routed_attention_backward", [&](auto d, auto e) {
    ra::run_routed_attention_bwd<decltype(d)::value, decltype(e)>(p, static_cast<cudaStream_t>(stream));
  });
}

}  // namespace cram
