// Tensor Memory Accelerator (TMA) loads of key/value tiles for the sm_90a kernels: a tensor
// map per K and V built on the host, and the device-side copy of one key tile into shared
// memory, completed on an mbarrier. K and V are (B, S, Hk, D) with a unit stride along D and
// strides that are multiples of 8 elements (RoutedAttentionParams), which is what TMA needs
// (16-byte aligned base and strides); rows past S arrive as zeros.
#pragma once

#include <cuda.h>

#include <cuda_runtime.h>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/numeric_types.h>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "routed_attention/routed_attention_params.h"

namespace cram {
namespace ra {

// Boxes are 64 columns of the head dim (128 bytes of 16-bit elements, the span of the
// 128-byte swizzle) by kBlockN keys: a key tile of D columns is D / 64 boxes, landing as the
// (kBlockN, 64) panels of the canonical 128-byte-swizzled K-major layout (SmemRowAtom tiled
// down the keys, then along D), which is where the row loads put them.
constexpr int kTmaBoxCols = 64;

struct KvTensorMaps {
  CUtensorMap k, v;
};

// The driver's cuTensorMapEncodeTiled, looked up once through the runtime (the extension does
// not link the driver library).
inline decltype(&cuTensorMapEncodeTiled) tensor_map_encode_tiled() {
  static const auto fn = [] {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found);
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("routed_attention: the CUDA driver has no cuTensorMapEncodeTiled");
    }
    return reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(ptr);
  }();
  return fn;
}

template <class Element, int kBlockN>
CUtensorMap make_key_tensor_map(const RoutedAttentionParams& p, const void* base, int64_t batch_stride,
                                int64_t row_stride, int64_t head_stride) {
  static_assert(sizeof(Element) == 2, "16-bit elements");
  constexpr auto dtype = std::is_same_v<Element, cutlass::half_t> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16
                                                                  : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  // A dimension of extent 1 is never stepped along: any valid stride (PyTorch may report any).
  auto bytes = [](int64_t stride, int64_t extent) -> cuuint64_t {
    return extent > 1 ? static_cast<cuuint64_t>(stride) * sizeof(Element) : 16;
  };
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(p.head_dim), static_cast<cuuint64_t>(p.seqlen_k),
                              static_cast<cuuint64_t>(p.num_kv_heads), static_cast<cuuint64_t>(p.batch)};
  const cuuint64_t strides[3] = {bytes(row_stride, p.seqlen_k), bytes(head_stride, p.num_kv_heads),
                                 bytes(batch_stride, p.batch)};
  const cuuint32_t box[4] = {kTmaBoxCols, kBlockN, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult status = tensor_map_encode_tiled()(
      &map, dtype, 4, const_cast<void*>(base), dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) {
    throw std::runtime_error("routed_attention: cuTensorMapEncodeTiled failed for k or v (CUresult " +
                             std::to_string(static_cast<int>(status)) + ")");
  }
  return map;
}

template <class Element, int kBlockN>
KvTensorMaps make_kv_tensor_maps(const RoutedAttentionParams& p) {
  return {make_key_tensor_map<Element, kBlockN>(p, p.k, p.k_batch_stride, p.k_row_stride, p.k_head_stride),
          make_key_tensor_map<Element, kBlockN>(p, p.v, p.v_batch_stride, p.v_row_stride, p.v_head_stride)};
}

// Key tile n (keys n * kBlockN ...) of key/value head `kv_head` of batch row b into dst
// (kBlockN * kHeadDim elements, 1024-byte aligned), counted on the transaction barrier bar
// (which expects kBlockN * kHeadDim * sizeof(Element) bytes, zero-filled rows included).
template <int kHeadDim, int kBlockN, class Element>
__device__ __forceinline__ void tma_load_key_tile(const CUtensorMap* map, uint64_t* bar, Element* dst, int n,
                                                  int kv_head, int b) {
#pragma unroll
  for (int panel = 0; panel < kHeadDim / kTmaBoxCols; ++panel) {
    cute::SM90_TMA_LOAD_4D::copy(map, bar, static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL),
                                 dst + panel * kBlockN * kTmaBoxCols, panel * kTmaBoxCols, n * kBlockN, kv_head, b);
  }
}

}  // namespace ra
}  // namespace cram
