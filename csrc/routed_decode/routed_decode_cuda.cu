// CUDA kernels of routed decoding (FlashDecoding-style split over the cache).
//
// Decoding reads the whole KV cache once per step and does two FLOPs a byte: it is memory
// bound, so the kernels are plain streaming code, no tensor cores. A block takes one
// (split of the cache, key/value head, group of up to kHeadsPerBlock query heads, row): it
// reads each key and value row of its split once for all the heads of its group (GQA). Rows
// the router did not send to attention are skipped after reading routed[b]. The combine
// kernel merges the splits' partial outputs through their log-sum-exps and writes out and lse
// for every row (0 and -inf where not routed), so nothing is left unwritten.
//
// Threads: a key row of D elements is read by kLanes lanes in 16-byte pieces; a warp holds
// 32 / kLanes such "slots", each going through its own keys with its own online softmax.
// A slot loads kUnroll keys (and their values) before using any, to keep loads in flight, and
// updates its softmax once per such chunk: one rescale of the accumulators per chunk instead
// of one per key. The kernel is bound by instruction issue as much as by memory, so the
// per-key work is kept small: the scores of a block's kHeads query heads are summed over a
// slot's lanes by a halving exchange (a lane keeps half of the values it holds and sends its
// partner the other half) and broadcast back: 9 shuffles for 4 heads at kLanes = 16, where
// plain butterflies take 16.

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "common/cuda_check.h"
#include "common/cuda_elements.cuh"
#include "routed_decode/routed_decode.h"

namespace cram {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kHeadsPerBlock = 4;
constexpr int kUnroll = 8;
constexpr float kLog2e = 1.4426950408889634f;

template <typename T, int D>
struct DecodeShape {
  static constexpr int kVec = kVec16<T>;
  static constexpr int kLanes = D / kVec;  // lanes that read one key row
  static constexpr int kSlots = 32 / kLanes;  // key rows a warp reads at once
  static constexpr int kKeysPerIter = kWarps * kSlots * kUnroll;
  static_assert(D % kVec == 0 && kLanes <= 32 && 32 % kLanes == 0, "head dim");
};

template <typename T>
__device__ __forceinline__ void store_float(T* p, float x) {
  const float f[1] = {x};
  store_packed<T, 1>(p, pack<T, 1>(f));
}

__device__ __forceinline__ int valid_keys(const RoutedDecodeParams& p, int64_t b) {
  if (!p.routed[b]) return 0;
  const int64_t n = p.seqlens[b];
  return static_cast<int>(n < 0 ? 0 : (n > p.cache_len ? p.cache_len : n));
}

// s[g], one lane's partial dot products of kHeadsPerBlock (= 4) heads, summed over the
// LANES lanes of its slot (lanes first .. first + LANES - 1); every lane gets the four sums.
// The first two rounds halve what each lane holds: lanes whose sub has bit LANES/2 set keep
// heads 2 and 3 and send 0 and 1, their partners the opposite; then bit LANES/4 splits the
// pair. After the plain rounds left, the lane with sub bits (b1, b0) at (LANES/2, LANES/4)
// holds head 2 * b1 + b0's sum, which four shuffles broadcast.
template <int LANES>
__device__ __forceinline__ void slot_sum(float (&s)[kHeadsPerBlock], int first, int sub) {
  static_assert(kHeadsPerBlock == 4 && LANES >= 4, "the halving exchange is written for 4 heads");
  constexpr unsigned kAll = 0xffffffffu;
  const bool hi = sub & (LANES / 2);
  float a0 = hi ? s[2] : s[0], a1 = hi ? s[3] : s[1];
  a0 += __shfl_xor_sync(kAll, hi ? s[0] : s[2], LANES / 2);
  a1 += __shfl_xor_sync(kAll, hi ? s[1] : s[3], LANES / 2);
  const bool lo = sub & (LANES / 4);
  float c = lo ? a1 : a0;
  c += __shfl_xor_sync(kAll, lo ? a0 : a1, LANES / 4);
#pragma unroll
  for (int off = LANES / 8; off > 0; off /= 2) c += __shfl_xor_sync(kAll, c, off);
#pragma unroll
  for (int g = 0; g < 4; ++g) s[g] = __shfl_sync(kAll, c, first + (g >> 1) * (LANES / 2) + (g & 1) * (LANES / 4));
}

// Merges softmax state (m, l, acc) with another's; m in log2 units, -inf when empty.
template <int VEC>
__device__ __forceinline__ void merge(float& m, float& l, float (&acc)[VEC], float m2, float l2, const float (&acc2)[VEC]) {
  const float m_new = fmaxf(m, m2);
  if (m_new == -INFINITY) return;  // both empty
  const float a = exp2f(m - m_new), a2 = exp2f(m2 - m_new);
  l = l * a + l2 * a2;
#pragma unroll
  for (int i = 0; i < VEC; ++i) acc[i] = acc[i] * a + acc2[i] * a2;
  m = m_new;
}

// Partial results of split s for head h of row b: o_part[(b*H + h)*splits + s][D] (normalised
// by its own sum) and lse_part[...] (log2 units).
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) routed_decode_split_kernel(const RoutedDecodeParams p) {
  using Shape = DecodeShape<T, D>;
  constexpr int VEC = Shape::kVec, LANES = Shape::kLanes, SLOTS = Shape::kSlots;
  const int64_t b = blockIdx.z;
  const int n = valid_keys(p, b);
  const int split = blockIdx.x;
  const int begin = split * p.split_len;
  if (begin >= n) return;  // the combine kernel knows which splits hold keys
  const int end = min(n, begin + p.split_len);
  const int H = static_cast<int>(p.num_heads), Hk = static_cast<int>(p.num_kv_heads), G = H / Hk;
  const int kvh = blockIdx.y % Hk, group = blockIdx.y / Hk;
  const int h0 = kvh * G + group * kHeadsPerBlock;
  const int heads = min(kHeadsPerBlock, G - group * kHeadsPerBlock);

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int slot = lane / LANES, sub = lane % LANES;
  const int dim0 = sub * VEC;

  float q[kHeadsPerBlock][VEC];
  const float scale_log2 = static_cast<float>(p.softmax_scale) * kLog2e;
#pragma unroll
  for (int g = 0; g < kHeadsPerBlock; ++g) {
    const int h = g < heads ? h0 + g : h0;
    const auto qv = load_packed<T, VEC>(static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride + dim0);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q[g][i] = element(qv, i) * scale_log2;
  }

  float m[kHeadsPerBlock], l[kHeadsPerBlock], acc[kHeadsPerBlock][VEC];
#pragma unroll
  for (int g = 0; g < kHeadsPerBlock; ++g) {
    m[g] = -INFINITY, l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[g][i] = 0.f;
  }

  const T* kbase = static_cast<const T*>(p.k) + b * p.k_batch_stride + kvh * p.k_head_stride + dim0;
  const T* vbase = static_cast<const T*>(p.v) + b * p.v_batch_stride + kvh * p.v_head_stride + dim0;
  // The loop bound is the same for every lane (the shuffles below need the whole warp); this
  // slot's keys are base + u * kWarps * SLOTS, masked past the end.
  const int offset = warp * SLOTS + slot;
  for (int block_base = begin; block_base < end; block_base += Shape::kKeysPerIter) {
    const int base = block_base + offset;
    Packed<T, VEC> kv[kUnroll], vv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int j = base + u * kWarps * SLOTS;
      kv[u] = zero_packed<T, VEC>(), vv[u] = zero_packed<T, VEC>();
      if (j < end) {
        kv[u] = load_packed<T, VEC, true>(kbase + j * p.k_row_stride);
        vv[u] = load_packed<T, VEC, true>(vbase + j * p.v_row_stride);
      }
    }
    float s[kUnroll][kHeadsPerBlock];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int g = 0; g < kHeadsPerBlock; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < VEC; ++i) dot += q[g][i] * element(kv[u], i);
        s[u][g] = dot;
      }
      slot_sum<LANES>(s[u], slot * LANES, sub);
      if (base + u * kWarps * SLOTS >= end) {
#pragma unroll
        for (int g = 0; g < kHeadsPerBlock; ++g) s[u][g] = -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < kHeadsPerBlock; ++g) {
      float m_new = m[g];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) m_new = fmaxf(m_new, s[u][g]);
      if (m_new == -INFINITY) continue;  // no key of this slot yet
      const float alpha = exp2f(m[g] - m_new);
      l[g] *= alpha;
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[g][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const float w = exp2f(s[u][g] - m_new);
        l[g] += w;
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[g][i] += w * element(vv[u], i);
      }
      m[g] = m_new;
    }
  }

  // Merge the slots of the warp: lanes holding the same dims differ by multiples of LANES.
#pragma unroll
  for (int off = LANES; off < 32; off *= 2) {
#pragma unroll
    for (int g = 0; g < kHeadsPerBlock; ++g) {
      float acc2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc2[i] = __shfl_xor_sync(0xffffffffu, acc[g][i], off);
      const float m2 = __shfl_xor_sync(0xffffffffu, m[g], off), l2 = __shfl_xor_sync(0xffffffffu, l[g], off);
      merge<VEC>(m[g], l[g], acc[g], m2, l2, acc2);
    }
  }

  // Merge the warps through shared memory; warp 0's first slot writes the partials.
  __shared__ float s_m[kWarps][kHeadsPerBlock], s_l[kWarps][kHeadsPerBlock];
  __shared__ float s_acc[kWarps][kHeadsPerBlock][D];
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < kHeadsPerBlock; ++g) {
      if (sub == 0) s_m[warp][g] = m[g], s_l[warp][g] = l[g];
#pragma unroll
      for (int i = 0; i < VEC; ++i) s_acc[warp][g][dim0 + i] = acc[g][i];
    }
  }
  __syncthreads();
  if (warp != 0 || slot != 0) return;
  float* o_part = static_cast<float*>(p.workspace);
  float* lse_part = o_part + p.batch * p.num_heads * p.num_splits * D;
#pragma unroll
  for (int g = 0; g < kHeadsPerBlock; ++g) {
    if (g >= heads) break;
    for (int w = 1; w < kWarps; ++w) {
      float acc2[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc2[i] = s_acc[w][g][dim0 + i];
      merge<VEC>(m[g], l[g], acc[g], s_m[w][g], s_l[w][g], acc2);
    }
    const int64_t row = (b * p.num_heads + h0 + g) * p.num_splits + split;
    float* o = o_part + row * D + dim0;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o[i] = acc[g][i] / l[g];
    if (sub == 0) lse_part[row] = m[g] + log2f(l[g]);
  }
}

// One warp per (row, head): merges the splits that hold keys, writes out and lse.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) routed_decode_combine_kernel(const RoutedDecodeParams p) {
  constexpr int PER_LANE = D / 32;
  const int64_t bh = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (bh >= p.batch * p.num_heads) return;
  const int lane = threadIdx.x % 32;
  const int64_t b = bh / p.num_heads;
  const int n = valid_keys(p, b);
  T* out = static_cast<T*>(p.out) + bh * D;
  float* lse = static_cast<float*>(p.lse);
  if (n == 0) {
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) store_float(out + lane + 32 * i, 0.f);
    if (lane == 0) lse[bh] = -INFINITY;
    return;
  }
  const float* o_part = static_cast<const float*>(p.workspace);
  const float* lse_part = o_part + p.batch * p.num_heads * p.num_splits * D;
  const int splits = (n + p.split_len - 1) / p.split_len;
  const int64_t row0 = bh * p.num_splits;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, lse_part[row0 + s]);
  float sum = 0.f, acc[PER_LANE] = {};
  for (int s = 0; s < splits; ++s) {
    const float w = exp2f(lse_part[row0 + s] - m);
    sum += w;
#pragma unroll
    for (int i = 0; i < PER_LANE; ++i) acc[i] += w * o_part[(row0 + s) * D + lane + 32 * i];
  }
#pragma unroll
  for (int i = 0; i < PER_LANE; ++i) store_float(out + lane + 32 * i, acc[i] / sum);
  if (lane == 0) lse[bh] = (m + log2f(sum)) / kLog2e;
}

template <typename T, int D>
void launch(const RoutedDecodeParams& p, cudaStream_t stream) {
  const int groups = static_cast<int>((p.num_heads / p.num_kv_heads + kHeadsPerBlock - 1) / kHeadsPerBlock);
  const dim3 grid(p.num_splits, static_cast<unsigned>(p.num_kv_heads * groups), static_cast<unsigned>(p.batch));
  routed_decode_split_kernel<T, D><<<grid, kThreads, 0, stream>>>(p);
  CRAM_CUDA_CHECK(cudaGetLastError());
  const int64_t rows = p.batch * p.num_heads;
  routed_decode_combine_kernel<T, D><<<static_cast<unsigned>((rows + kWarps - 1) / kWarps), kThreads, 0, stream>>>(p);
  CRAM_CUDA_CHECK(cudaGetLastError());
}

template <typename T>
int keys_per_iter(int64_t D) {
  return D == 64 ? DecodeShape<T, 64>::kKeysPerIter : DecodeShape<T, 128>::kKeysPerIter;
}

}  // namespace

size_t routed_decode_plan(RoutedDecodeParams& p) {
  int step = 0;
  dispatch_cuda_element_type(p.dtype, [&](auto element) { step = keys_per_iter<decltype(element)>(p.head_dim); });
  const int64_t groups = (p.num_heads / p.num_kv_heads + kHeadsPerBlock - 1) / kHeadsPerBlock;
  const int64_t blocks = p.batch * p.num_kv_heads * groups;
  const int64_t S = std::max<int64_t>(p.cache_len, 1);
  // A block's work is bounded whatever the router decides, so that the few rows routed in a
  // sparse step still spread over many blocks (the plan cannot see how many rows are routed:
  // it is fixed by the shapes, for CUDA graphs): 1024 keys where that still gives every
  // multiprocessor 16 blocks when all rows are routed, else 512, and shorter splits, down to
  // 256 keys (below that the merge costs more than the parallelism brings), where the whole
  // batch would not give four blocks per multiprocessor (on an H200, at B = 64 and S = 32K,
  // 1024-key splits read the cache 7% faster than 512 with every row routed, and 13% faster
  // with 3 rows of 64). The partial results are kept to 64K (row, head, split) triples
  // (34 MB at D = 128): longer caches get longer splits.
  constexpr int64_t kMaxPartials = 65536;
  const int64_t sms = std::max(p.num_sms, 1);
  const int64_t split_keys = blocks * ((S + 1023) / 1024) >= 16 * sms ? 1024 : 512;
  const int64_t fill = std::max<int64_t>(1, (4 * sms + blocks - 1) / blocks);
  const int64_t cap = std::max<int64_t>(fill, kMaxPartials / (p.batch * p.num_heads));
  const int64_t splits = std::max<int64_t>(
      1, std::min({std::max((S + split_keys - 1) / split_keys, std::min(fill, (S + 255) / 256)), cap, int64_t{1024}}));
  int64_t len = (S + splits - 1) / splits;
  len = (len + step - 1) / step * step;
  p.split_len = static_cast<int>(len);
  p.num_splits = static_cast<int>((S + len - 1) / len);
  return static_cast<size_t>(p.batch * p.num_heads * p.num_splits) * (p.head_dim + 1) * sizeof(float);
}

void routed_decode_cuda(const RoutedDecodeParams& p, void* stream_ptr) {
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  dispatch_cuda_element_type(p.dtype, [&](auto element) {
    using T = decltype(element);
    if (p.head_dim == 64) {
      launch<T, 64>(p, stream);
    } else {
      launch<T, 128>(p, stream);
    }
  });
}

}  // namespace cram
