// Entry points of the CUDA routed attention: dispatch on (element type, head dim) to the
// launchers instantiated in routed_attention_{fwd,bwd}_hdim*_*.cu.

#include <cutlass/numeric_types.h>

#include <stdexcept>
#include <string>

#include "common/cuda_check.h"

#include "routed_attention/routed_attention_fwd_kernel.cuh"
#include "routed_attention/routed_attention_fwd_kernel_sm90.cuh"
#include "routed_attention/routed_attention_bwd_kernel.cuh"
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

constexpr int kMaxDevices = 64;

// fn() for the current device, computed once per device (a race computes the same value twice).
template <class Fn>
bool once_per_device(signed char (&known)[kMaxDevices], Fn&& fn) {
  int device = 0;
  CRAM_CUDA_CHECK(cudaGetDevice(&device));
  if (device < kMaxDevices && known[device] != 0) return known[device] > 0;
  const bool value = fn(device);
  if (device < kMaxDevices) known[device] = value ? 1 : -1;
  return value;
}

// The arch of the code of this build that runs on the device.
int running_binary_version() {
  cudaFuncAttributes attr{};
  CRAM_CUDA_CHECK(cudaFuncGetAttributes(&attr, arch_probe_kernel));
  return attr.binaryVersion;
}

}  // namespace

bool routed_attention_fused_dq_supported() {
  static signed char known[kMaxDevices] = {};  // 0 unknown, 1 yes, -1 no
  return once_per_device(known, [](int) { return running_binary_version() >= 90; });
}

bool routed_attention_sm90_supported() {
  static signed char known[kMaxDevices] = {};
  return once_per_device(known, [](int device) {
#ifdef CRAM_CUDA_ARCHS
    // The code running on the device is sm_90 code, and the build's sm_90 code is sm_90a
    // (wgmma exists only there): a build lists one of "9.0" and "9.0a".
    const std::string archs = CRAM_CUDA_ARCHS;
    if (archs.find("9.0a") == std::string::npos && archs.find("90a") == std::string::npos) return false;
    int major = 0, minor = 0;
    CRAM_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CRAM_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    return major == 9 && minor == 0 && running_binary_version() == 90;
#else
    (void)device;
    return false;
#endif
  });
}

size_t routed_attention_fwd_workspace_bytes(const RoutedAttentionParams& p) {
  size_t bytes = 0;
  dispatch(p, "routed_attention", [&](auto d, auto) {
    constexpr int D = decltype(d)::value;
    // The tiles of the kernel run_routed_attention_fwd picks.
    const int block_m = p.fwd_sm90 ? ra::FwdConfigSm90<D>::kBlockM : ra::FwdConfig<D>::kBlockM;
    const int block_n = p.fwd_sm90 ? ra::FwdConfigSm90<D>::kBlockN : ra::FwdConfig<D>::kBlockN;
    bytes = ra::FwdWorkspace::bytes(ra::fwd_plan_sizes(p, block_m, block_n), block_m, D);
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
