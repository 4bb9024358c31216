// CUDA router: prob = sigmoid(hidden . weight + bias), mask = prob > threshold | force,
// the in-row compaction of the routed positions into index / counts, and the
// backward of prob with respect to hidden, weight and bias.
//
// Forward, two kernels and no host sync:
//   route_logits: one pass over hidden (the only large read: 16-byte streaming loads,
//     a group of up to 32 threads per row, float32 dot product), writing prob and mask
//     and, per tile of kTileRows positions of a row, the number of routed positions;
//   route_compact: blocks of kSpan positions of a row, many per row, so one long row
//     is still compacted by many SMs. A block learns how many positions before it
//     are routed by summing the tile counts (no look-back, no ordering between
//     blocks), ranks its own positions with a block scan, and writes each position
//     to its slot: routed ones ascending from the front, the others (value T)
//     from the back, so that every slot of index is written exactly once and the
//     tail needs no knowledge of the row's total.
// Backward, two kernels: route_bwd streams hidden once, writing grad_hidden and
// per-block partial sums of grad_weight / grad_bias; route_reduce adds the partials
// in a fixed order (deterministic, no atomics, no zero-fill).

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#include "common/block_scan.cuh"
#include "common/cuda_check.h"
#include "common/cuda_elements.cuh"
#include "route/route.h"

namespace cram {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr int kTileRows = 64;                 // positions per routed count
constexpr int kItems = 8;                     // positions per thread in route_compact
constexpr int kSpan = kThreads * kItems;      // positions per route_compact block
static_assert(kSpan % kTileRows == 0, "a span is a whole number of tiles");
constexpr int kLogitLoads = 8;                // loads of a row in flight per thread in route_logits
constexpr int kLogitBlocksPerSm = 4;          // route_logits occupancy (<= 64 registers a thread)
static_assert(kTileRows % 32 == 0 && kTileRows <= kThreads, "a tile's positions are finished by whole warps");
constexpr int kWeightChunk = 4096;            // weight channels staged in shared memory at a time
constexpr int kBwdUnroll = 4;                 // rows in flight per thread in route_bwd
constexpr int kReduceChannels = 32;           // channels per route_reduce block

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int log2_ceil(int64_t n) {
  int k = 0;
  while ((int64_t{1} << k) < n) ++k;
  return k;
}

// Threads per row in route_logits / across channels in route_bwd: enough to cover
// the row's vectors once, at most a warp.
int group_log2(int64_t channels, int vec) { return std::min(5, log2_ceil(std::max<int64_t>(1, ceil_div(channels, vec)))); }

// Exclusive prefix sum of v over the block in thread order; total gets the sum.
template <typename V>
__device__ V block_exclusive_sum(V v, V& total) {
  __shared__ V warp_sums[kWarps];
  return block_inclusive_sum<kThreads>(v, total, warp_sums) - v;
}

// ------------------------------------------------------------------ forward

// A float32 from element i of an array of type t (weight and bias come in float32 or
// in hidden's type; converting them here saves the launcher a conversion kernel).
__device__ __forceinline__ float load_as_float(const void* p, int64_t i, ElementType t) {
  switch (t) {
    case ElementType::kFloat16: return __half2float(static_cast<const __half*>(p)[i]);
    case ElementType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// Persistent blocks, kLogitBlocksPerSm per SM: block i takes tiles i, i + gridDim.x, ...
// of kTileRows positions of a row (tile_id = b * tiles_per_row + tile). Within a tile,
// groups of 2^log2_group threads take one position at a time, group g positions
// g, g + groups, ...; a thread keeps kLogitLoads 16-byte loads of its row in flight.
// The weight is staged in shared memory as float32, kWeightChunk channels at a time
// (once per block when C fits in one chunk): read from L1 next to the streamed hidden
// rows it was evicted and re-read from L2, which cost about 8% of the bandwidth
// (measured on an H100). Logits are summed per chunk into shared memory, so a thread
// holds one accumulator whatever C is, and its registers go to loads in flight.
// tile_counts[tile_id] = routed positions of the tile.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, kLogitBlocksPerSm)
    route_logits_kernel(const RouteParams p, int log2_group, int64_t tiles_per_row, int* tile_counts) {
  __shared__ __align__(16) float weight_chunk[kWeightChunk];
  __shared__ float tile_logits[kTileRows];
  __shared__ int routed_in_warp[kTileRows / 32];
  const int64_t T_ = p.seqlen, C = p.channels, num_tiles = p.batch * tiles_per_row;
  const int group_size = 1 << log2_group, groups = kThreads >> log2_group;
  const int g = threadIdx.x >> log2_group, gl = threadIdx.x & (group_size - 1);
  const T* hidden = static_cast<const T*>(p.hidden);
  const int64_t stride = static_cast<int64_t>(group_size) * VEC;
  const bool one_chunk = C <= kWeightChunk;
  const float bias = load_as_float(p.bias, 0, p.bias_dtype);
  const float threshold = static_cast<float>(p.threshold);
  const unsigned char* force = reinterpret_cast<const unsigned char*>(p.force);  // any nonzero byte is true

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // route_compact may be placed now; it waits for this grid to finish (launch_compact).
  cudaTriggerProgrammaticLaunchCompletion();
#endif
  for (int64_t tile_id = blockIdx.x; tile_id < num_tiles; tile_id += gridDim.x) {
    const int64_t b = tile_id / tiles_per_row, t0 = (tile_id % tiles_per_row) * kTileRows;
    for (int64_t c_base = 0; c_base < C; c_base += kWeightChunk) {
      const int chunk = static_cast<int>(C - c_base < kWeightChunk ? C - c_base : kWeightChunk);
      if (!one_chunk || tile_id == blockIdx.x) {
        __syncthreads();  // every thread is done with the previous chunk
        for (int i = threadIdx.x; i < chunk; i += kThreads) {
          weight_chunk[i] = load_as_float(p.weight, c_base + i, p.weight_dtype);
        }
        __syncthreads();
      }
      // groups divides kTileRows, or (groups of 1 or 2 threads) is a multiple of it
      // whose extra groups fill whole warps: either way a warp's groups enter and leave
      // this loop together, and every lane of a group takes part in its shuffles.
      for (int i = g; i < kTileRows; i += groups) {
        const int64_t t = t0 + i;
        float acc = 0.0f;
        if (t < T_) {
          const T* row = hidden + (b * T_ + t) * C + c_base;
          for (int c0 = gl * VEC; c0 < chunk; c0 += kLogitLoads * stride) {
            Packed<T, VEC> h[kLogitLoads];
#pragma unroll
            for (int u = 0; u < kLogitLoads; ++u) {
              const int c = c0 + u * stride;
              h[u] = c < chunk ? load_packed<T, VEC, /*kStreaming=*/true>(row + c) : zero_packed<T, VEC>();
            }
#pragma unroll
            for (int u = 0; u < kLogitLoads; ++u) {
              const int c = c0 + u * stride;
              if (c < chunk) {
                float w[VEC];
                load_floats<VEC>(weight_chunk + c, w);
#pragma unroll
                for (int v = 0; v < VEC; ++v) acc += element(h[u], v) * w[v];
              }
            }
          }
        }
        for (int o = group_size / 2; o > 0; o /= 2) acc += __shfl_xor_sync(kFullMask, acc, o);
        if (gl == 0) tile_logits[i] = c_base == 0 ? acc : tile_logits[i] + acc;
      }
    }
    __syncthreads();

    if (threadIdx.x < kTileRows) {  // whole warps
      const int64_t t = t0 + threadIdx.x;
      bool m = false;
      if (t < T_) {
        const int64_t r = b * T_ + t;
        const float prob = 1.0f / (1.0f + __expf(-(tile_logits[threadIdx.x] + bias)));
        m = prob > threshold || (force != nullptr && force[r] != 0);
        static_cast<float*>(p.prob)[r] = prob;
        p.mask[r] = m;
      }
      const unsigned routed = __ballot_sync(kFullMask, m);
      if ((threadIdx.x & 31) == 0) routed_in_warp[threadIdx.x / 32] = __popc(routed);
    }
    // Also orders this tile's reads of tile_logits before the next tile's writes.
    __syncthreads();
    if (threadIdx.x == 0) {
      int routed = 0;
      for (int w = 0; w < kTileRows / 32; ++w) routed += routed_in_warp[w];
      tile_counts[tile_id] = routed;
    }
  }
}

// Block = (row b, span of kSpan positions); thread i holds positions
// span * kSpan + i * kItems + [0, kItems).
__global__ void __launch_bounds__(kThreads) route_compact_kernel(const RouteParams p, int64_t tiles_per_row,
                                                                int64_t spans_per_row, const int* tile_counts) {
  const int64_t T_ = p.seqlen;
  const int64_t b = blockIdx.x / spans_per_row, span = blockIdx.x % spans_per_row;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  cudaGridDependencySynchronize();  // route_logits' mask and tile counts are written and visible
#endif

  // Routed positions before the span: the tile counts of the row up to it.
  const int* row_counts = tile_counts + b * tiles_per_row;
  const int64_t tiles_before = span * (kSpan / kTileRows);
  int partial = 0;
#pragma unroll 4
  for (int64_t i = threadIdx.x; i < tiles_before; i += kThreads) partial += row_counts[i];
  int routed_before_span;
  block_exclusive_sum(partial, routed_before_span);

  const unsigned char* mask = reinterpret_cast<const unsigned char*>(p.mask) + b * T_;
  const int64_t t_first = span * kSpan + threadIdx.x * kItems;
  bool m[kItems];
  int n = 0;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    m[j] = t_first + j < T_ && mask[t_first + j] != 0;
    n += m[j];
  }
  int routed_in_span;
  int64_t routed = routed_before_span + block_exclusive_sum(n, routed_in_span);  // routed before t_first

  // Position t goes to slot `routed` if routed, else to slot T-1-u, u = t - routed
  // being the number of unrouted positions before it. Both slots are in [0, T) by
  // construction; the check only guards against inconsistent input.
  int32_t* index = p.index + b * T_;
#pragma unroll
  for (int j = 0; j < kItems; ++j) {
    const int64_t t = t_first + j;
    if (t < T_) {
      const int64_t slot = m[j] ? routed : T_ - 1 - (t - routed);
      if (slot >= 0 && slot < T_) index[slot] = static_cast<int32_t>(m[j] ? t : T_);
      routed += m[j];
    }
  }
  if (span == spans_per_row - 1 && threadIdx.x == 0) p.counts[b] = routed_before_span + routed_in_span;
}

// ----------------------------------------------------------------- backward

// Block = (channel slice blockIdx.x of 2^log2_cw threads x VEC channels, row tile
// blockIdx.y of rows_per_tile rows). Each thread keeps its channels' weights and
// grad_weight partial sums in registers while it sweeps its rows.
// partial_w[tile * C + c], partial_b[tile] (written by slice 0).
// (4 blocks per SM with 16-byte accesses; the scalar fallback would spill at that cap.)
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads, VEC == 1 ? 2 : 4) route_bwd_kernel(const RouteBwdParams p, int log2_cw,
                                                            int64_t rows_per_tile, float* partial_w,
                                                            float* partial_b) {
  __shared__ float channel_sums[kThreads * VEC];
  const int64_t C = p.channels, rows = p.batch * p.seqlen;
  const int cw = 1 << log2_cw, thread_rows = kThreads >> log2_cw;
  const int cv = threadIdx.x & (cw - 1), tr = threadIdx.x >> log2_cw;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * cw + cv) * VEC;
  const bool active = c < C;  // C is a multiple of VEC
  const int64_t tile = blockIdx.y;
  const int64_t r_end = std::min(rows, (tile + 1) * rows_per_tile);
  const T* hidden = static_cast<const T*>(p.hidden);
  T* grad_hidden = static_cast<T*>(p.grad_hidden);
  const float* grad_prob = static_cast<const float*>(p.grad_prob);
  const float* prob = static_cast<const float*>(p.prob);

  float w[VEC], acc[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) w[v] = 0.0f, acc[v] = 0.0f;
  if (active) load_floats<VEC>(static_cast<const float*>(p.weight) + c, w);
  float bias_acc = 0.0f;

  for (int64_t r0 = tile * rows_per_tile + tr; r0 < r_end; r0 += kBwdUnroll * thread_rows) {
    // Loads of kBwdUnroll rows first, so that they are in flight together.
    Packed<T, VEC> h[kBwdUnroll];
    float grad_logit[kBwdUnroll];
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t r = r0 + u * thread_rows;
      const bool valid = r < r_end;
      const float pr = valid ? prob[r] : 0.0f;
      grad_logit[u] = valid ? grad_prob[r] * pr * (1.0f - pr) : 0.0f;
      h[u] = valid && active ? load_packed<T, VEC>(hidden + r * C + c) : zero_packed<T, VEC>();
    }
#pragma unroll
    for (int u = 0; u < kBwdUnroll; ++u) {
      const int64_t r = r0 + u * thread_rows;
      bias_acc += grad_logit[u];
      if (r < r_end && active) {
        float gh[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          acc[v] += grad_logit[u] * element(h[u], v);
          gh[v] = grad_logit[u] * w[v];
        }
        store_packed<T, VEC>(grad_hidden + r * C + c, pack<T, VEC>(gh));
      }
    }
  }

  // Sum the thread rows: channel_sums[tr][cv * VEC + v] is channel_sums[threadIdx.x * VEC + v].
#pragma unroll
  for (int v = 0; v < VEC; ++v) channel_sums[threadIdx.x * VEC + v] = acc[v];
  __syncthreads();
  const int slice_channels = cw * VEC;
  for (int i = threadIdx.x; i < slice_channels; i += kThreads) {
    const int64_t ch = static_cast<int64_t>(blockIdx.x) * slice_channels + i;
    float s = 0.0f;
    for (int k = 0; k < thread_rows; ++k) s += channel_sums[k * slice_channels + i];
    if (ch < C) partial_w[tile * C + ch] = s;
  }
  if (blockIdx.x == 0) {
    // Every thread of a thread row saw the same rows: count them once (cv == 0).
    float total;
    block_exclusive_sum(cv == 0 ? bias_acc : 0.0f, total);
    if (threadIdx.x == 0) partial_b[tile] = total;
  }
}

// grad_weight[c] = sum over tiles of partial_w[tile][c], grad_bias likewise, in a
// fixed order. Block = kReduceChannels channels x kWarps tile strides.
__global__ void __launch_bounds__(kThreads) route_reduce_kernel(const float* partial_w, const float* partial_b,
                                                               int64_t tiles, int64_t C, float* grad_weight,
                                                               float* grad_bias) {
  __shared__ float sums[kWarps][kReduceChannels + 1];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kReduceChannels + lane;
  float s = 0.0f;
  if (c < C) {
#pragma unroll 4
    for (int64_t k = warp; k < tiles; k += kWarps) s += partial_w[k * C + c];
  }
  sums[warp][lane] = s;
  __syncthreads();
  if (warp == 0 && c < C) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) total += sums[w][lane];
    grad_weight[c] = total;
  }
  if (blockIdx.x == 0) {
    float sb = 0.0f;
    for (int64_t k = threadIdx.x; k < tiles; k += kThreads) sb += partial_b[k];
    float total;
    block_exclusive_sum(sb, total);
    if (threadIdx.x == 0) *grad_bias = total;
  }
}

// --------------------------------------------------------------------- host

static_assert(kReduceChannels == 32, "route_reduce maps a warp's lanes to channels");

template <typename T>
bool fwd_vectorised(const RouteParams& p) {
  return p.channels % kVec16<T> == 0 && is_aligned16(p.hidden);
}

template <typename T>
bool bwd_vectorised(const RouteBwdParams& p) {
  return p.channels % kVec16<T> == 0 && is_aligned16(p.hidden) && is_aligned16(p.grad_hidden) &&
         is_aligned16(p.weight);
}

struct FwdPlan {
  int64_t tiles_per_row, spans_per_row;
  size_t workspace_bytes;
};

FwdPlan fwd_plan(const RouteParams& p) {
  FwdPlan plan{};
  plan.tiles_per_row = ceil_div(p.seqlen, kTileRows);
  plan.spans_per_row = ceil_div(p.seqlen, kSpan);
  plan.workspace_bytes = static_cast<size_t>(p.batch * plan.tiles_per_row) * sizeof(int);
  return plan;
}

template <typename T, int VEC>
void launch_logits(const RouteParams& p, const FwdPlan& plan, cudaStream_t stream) {
  const int64_t blocks = std::min<int64_t>(p.batch * plan.tiles_per_row, int64_t{kLogitBlocksPerSm} * p.num_sms);
  route_logits_kernel<T, VEC><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      p, group_log2(p.channels, VEC), plan.tiles_per_row, static_cast<int*>(p.workspace));
  CRAM_CUDA_CHECK(cudaGetLastError());
}

// route_compact as a programmatic dependent launch where its code waits for route_logits
// (griddepcontrol.wait, compiled for sm_90+): its blocks are placed while route_logits
// finishes, instead of the stream's launch gap between the two. Decided from the code that
// runs on this device, not from the device alone: a build JIT-compiled from older PTX has
// no wait in route_compact, and would then read mask and tile counts too early.
void launch_compact(const RouteParams& p, const FwdPlan& plan, cudaStream_t stream) {
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(static_cast<unsigned>(p.batch * plan.spans_per_row));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute dependent{};
  dependent.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  dependent.val.programmaticStreamSerializationAllowed = 1;
  cudaFuncAttributes compact{};
  CRAM_CUDA_CHECK(cudaFuncGetAttributes(&compact, route_compact_kernel));
  if (compact.ptxVersion >= 90) {
    config.attrs = &dependent;
    config.numAttrs = 1;
  }
  CRAM_CUDA_CHECK(cudaLaunchKernelEx(&config, route_compact_kernel, p, plan.tiles_per_row, plan.spans_per_row,
                                     static_cast<const int*>(p.workspace)));
}

struct BwdPlan {
  int vec, log2_cw;
  int64_t slices, rows_per_tile, row_tiles;
  size_t workspace_bytes;
};

// About 4 blocks per SM in all: one wave that streams hidden, with few enough row
// tiles that the partial sums stay small (row_tiles x C floats).
template <typename T>
BwdPlan bwd_plan(const RouteBwdParams& p) {
  BwdPlan plan{};
  plan.vec = bwd_vectorised<T>(p) ? kVec16<T> : 1;
  plan.log2_cw = group_log2(p.channels, plan.vec);
  const int64_t cw = int64_t{1} << plan.log2_cw, thread_rows = kThreads / cw;
  plan.slices = std::max<int64_t>(1, ceil_div(ceil_div(p.channels, plan.vec), cw));
  const int64_t rows = p.batch * p.seqlen;
  const int64_t target_tiles = std::max<int64_t>(1, ceil_div(int64_t{4} * p.num_sms, plan.slices));
  const int64_t step = thread_rows * kBwdUnroll;
  plan.rows_per_tile = std::max<int64_t>(step, ceil_div(ceil_div(rows, target_tiles), step) * step);
  plan.row_tiles = ceil_div(rows, plan.rows_per_tile);
  plan.workspace_bytes = static_cast<size_t>(plan.row_tiles * (p.channels + 1)) * sizeof(float);
  return plan;
}

template <typename T, int VEC>
void launch_bwd(const RouteBwdParams& p, const BwdPlan& plan, float* partial_w, float* partial_b,
                cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(plan.slices), static_cast<unsigned>(plan.row_tiles));
  route_bwd_kernel<T, VEC><<<grid, kThreads, 0, stream>>>(p, plan.log2_cw, plan.rows_per_tile, partial_w, partial_b);
  CRAM_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t route_fwd_workspace_bytes(const RouteParams& p) { return fwd_plan(p).workspace_bytes; }

size_t route_bwd_workspace_bytes(const RouteBwdParams& p) {
  if (p.batch * p.seqlen == 0) return 0;
  size_t bytes = 0;
  dispatch_cuda_element_type(p.dtype, [&](auto tag) { bytes = bwd_plan<decltype(tag)>(p).workspace_bytes; });
  return bytes;
}

void route_fwd_cuda(const RouteParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch == 0) return;
  if (p.seqlen == 0) {
    CRAM_CUDA_CHECK(cudaMemsetAsync(p.counts, 0, static_cast<size_t>(p.batch) * sizeof(int32_t), stream));
    return;
  }
  const FwdPlan plan = fwd_plan(p);
  if (p.workspace == nullptr) throw std::invalid_argument("route: the CUDA kernels need a workspace");
  if (p.num_sms <= 0) throw std::invalid_argument("route: num_sms must be set");
  for (const ElementType t : {p.weight_dtype, p.bias_dtype}) {  // what load_as_float reads
    if (t != ElementType::kFloat32 && t != p.dtype) {
      throw std::invalid_argument("route: the CUDA kernels read weight and bias in float32 or in hidden's type");
    }
  }
  if (p.batch * plan.tiles_per_row > INT32_MAX) throw std::invalid_argument("route: too many rows for one launch");
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (fwd_vectorised<T>(p)) {
      launch_logits<T, kVec16<T>>(p, plan, stream);
    } else {
      launch_logits<T, 1>(p, plan, stream);
    }
  });
  launch_compact(p, plan, stream);
}

void route_bwd_cuda(const RouteBwdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch * p.seqlen == 0) {
    // No rows: every gradient is an empty sum.
    CRAM_CUDA_CHECK(cudaMemsetAsync(p.grad_weight, 0, static_cast<size_t>(p.channels) * sizeof(float), stream));
    CRAM_CUDA_CHECK(cudaMemsetAsync(p.grad_bias, 0, sizeof(float), stream));
    return;
  }
  if (p.workspace == nullptr) throw std::invalid_argument("route_backward: the CUDA kernels need a workspace");
  if (p.num_sms <= 0) throw std::invalid_argument("route_backward: num_sms must be set");
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    const BwdPlan plan = bwd_plan<T>(p);
    float* partial_w = static_cast<float*>(p.workspace);
    float* partial_b = partial_w + plan.row_tiles * p.channels;
    if (plan.vec == 1) {
      launch_bwd<T, 1>(p, plan, partial_w, partial_b, stream);
    } else {
      launch_bwd<T, kVec16<T>>(p, plan, partial_w, partial_b, stream);
    }
    const int64_t blocks = std::max<int64_t>(1, ceil_div(p.channels, kReduceChannels));
    route_reduce_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial_w, partial_b, plan.row_tiles, p.channels, static_cast<float*>(p.grad_weight),
        static_cast<float*>(p.grad_bias));
    CRAM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace cram
