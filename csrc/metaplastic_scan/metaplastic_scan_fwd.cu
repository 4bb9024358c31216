// CUDA forward of the metaplastic scan and its one-token decoding step.
//
// Each block scans one (batch, head) over the whole sequence for a slice of value rows, the
// state in registers (metaplastic_cuda_layout.cuh). Tokens arrive in tiles staged in shared
// memory as float32, so that each thread reads its q and k columns as one float4 and the
// row's v and b as one float; the outputs of a tile are gathered in shared memory and written
// row-contiguous.

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/cuda_elements.cuh"
#include "metaplastic_scan/metaplastic_cuda_layout.cuh"
#include "metaplastic_scan/metaplastic_scan.h"

namespace cram {
namespace metaplastic {
namespace {

constexpr int kFwdThreads = 128;  // fewer rows a block: more blocks for small B * H
constexpr int kFwdTile = 16;      // tokens staged at once

template <int kThreadsPerRow>
using FwdShape = BlockShape<kThreadsPerRow, kFwdThreads>;

// Blocks a multiprocessor, which caps the registers a thread: ncu found the forward waiting on
// latency (no eligible warp on 44% of the cycles at d_k 64, 96 registers, 5 blocks of 4 warps).
// Six blocks cap it at 80 registers, which d_k <= 64 fits without spilling; d_k > 64 would
// spill there, and keeps four (128 registers).
template <int kThreadsPerRow>
constexpr int fwd_min_blocks() {
  return kThreadsPerRow <= 16 ? 6 : 4;
}

template <typename T>
struct FwdArgs {
  const T* q;
  const T* k;
  const T* v;
  const T* b;
  const float* log_alpha;
  const float* prior;
  const float* M0;
  const float* Ibar0;
  T* o;
  float* M;
  float* Ibar;
  int64_t seqlen, heads, key_dim, value_dim, row_blocks;
  float scale;
};

template <class S>
constexpr size_t fwd_smem_bytes() {
  return sizeof(float) * (3 * kFwdTile * S::kKeyPad + 2 * kFwdTile * S::kRows + kFwdTile + kFwdTile * S::kThreads);
}

template <typename T, int kThreadsPerRow>
__global__ void __launch_bounds__(kFwdThreads, fwd_min_blocks<kThreadsPerRow>()) metaplastic_fwd_kernel(const __grid_constant__ FwdArgs<T> a) {
  using S = FwdShape<kThreadsPerRow>;
  __shared__ __align__(16) float q_s[kFwdTile][S::kKeyPad];
  __shared__ __align__(16) float k_s[kFwdTile][S::kKeyPad];
  __shared__ __align__(16) float k2_s[kFwdTile][S::kKeyPad];  // k * k
  __shared__ float v_s[kFwdTile][S::kRows];
  __shared__ float b_s[kFwdTile][S::kRows];
  __shared__ float decay_s[kFwdTile];
  __shared__ float o_part[kFwdTile][S::kThreads];  // each thread's part of o, summed over the row group after the tile

  const int64_t len = a.seqlen, H = a.heads, dk = a.key_dim, dv = a.value_dim;
  const Position pos = thread_position<S>(a.row_blocks, dv);
  const int64_t bh = pos.batch_head, batch = bh / H, head = bh % H;
  const float prior = a.prior[head];

  float M[kCols], I[kCols];
  const int64_t state_base = (bh * dv + pos.row) * dk;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const bool in = pos.row_valid && pos.col0 + c < dk;
    M[c] = in && a.M0 ? a.M0[state_base + pos.col0 + c] : 0.f;
    I[c] = in && a.Ibar0 ? a.Ibar0[state_base + pos.col0 + c] : 0.f;
  }

  const int64_t qk_base = (batch * len * H + head) * dk, v_base = (batch * len * H + head) * dv + pos.row0;
  const int key_width = static_cast<int>(dk), row_width = static_cast<int>(dv - pos.row0);
  TileLoad<T, kFwdTile, S::kKeyPad, S::kThreads> load_q, load_k;
  TileLoad<T, kFwdTile, S::kRows, S::kThreads> load_v, load_b;
  float next_log_alpha = 0.f;
  const auto issue = [&](int64_t t0) {
    const int tokens = static_cast<int>(min(static_cast<int64_t>(kFwdTile), len - t0));
    load_q.issue(a.q + qk_base + t0 * H * dk, H * dk, tokens, key_width);
    load_k.issue(a.k + qk_base + t0 * H * dk, H * dk, tokens, key_width);
    load_v.issue(a.v + v_base + t0 * H * dv, H * dv, tokens, row_width);
    load_b.issue(a.b + v_base + t0 * H * dv, H * dv, tokens, row_width);
    if (threadIdx.x < tokens) next_log_alpha = a.log_alpha[(batch * len + t0 + threadIdx.x) * H + head];
  };
  if (len > 0) issue(0);
  for (int64_t t0 = 0; t0 < len; t0 += kFwdTile) {
    const int tokens = static_cast<int>(min(static_cast<int64_t>(kFwdTile), len - t0));
    __syncthreads();  // the previous tile's shared memory is no longer read
    load_q.store(&q_s[0][0], 1.f);
    load_k.store(&k_s[0][0], 1.f, &k2_s[0][0]);
    load_v.store(&v_s[0][0], 1.f);
    load_b.store(&b_s[0][0], 1.f);
    // Past the end: decay 1 and zero inputs leave the state as it is.
    if (threadIdx.x < kFwdTile) decay_s[threadIdx.x] = threadIdx.x < tokens ? expf(next_log_alpha) : 1.f;
    __syncthreads();
    if (t0 + kFwdTile < len) issue(t0 + kFwdTile);  // in flight while this tile computes

#pragma unroll
    for (int tt = 0; tt < kFwdTile; ++tt) {
      float q[kCols], k[kCols], k2[kCols];
      load_floats(&q_s[tt][pos.col0], q);
      load_floats(&k_s[tt][pos.col0], k);
      load_floats(&k2_s[tt][pos.col0], k2);
      const float v = v_s[tt][pos.local_row], b = b_s[tt][pos.local_row], decay = decay_s[tt];
      float o = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        // fma(v, k, decay * M): at a reset (decay 0) exactly v * k, as the reference.
        M[c] = fmaf(v, k[c], decay * M[c]);
        I[c] = fmaf(b, k2[c], decay * I[c]);
        o = fmaf(__fdividef(M[c], I[c] + prior), q[c], o);
      }
      o_part[tt][threadIdx.x] = o;
    }
    __syncthreads();
    constexpr int kOutputs = kFwdTile * S::kRows;
#pragma unroll
    for (int i = 0; i < (kOutputs + S::kThreads - 1) / S::kThreads; ++i) {
      const int idx = threadIdx.x + i * S::kThreads, tt = idx / S::kRows, r = idx % S::kRows;
      if (kOutputs % S::kThreads != 0 && idx >= kOutputs) break;
      const float* part = &o_part[tt][r * S::kThreadsPerRow];
      float o = 0.f;
#pragma unroll
      for (int j = 0; j < S::kThreadsPerRow; ++j) o += part[(j + r) % S::kThreadsPerRow];  // rotated: fewer bank conflicts
      if (tt < tokens && r < row_width) a.o[v_base + (t0 + tt) * H * dv + r] = from_float<T>(a.scale * o);
    }
  }

  if (pos.row_valid) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (pos.col0 + c < dk) {
        a.M[state_base + pos.col0 + c] = M[c];
        a.Ibar[state_base + pos.col0 + c] = I[c];
      }
    }
  }
}

// One token for every (batch, head): the state is read, updated and written back in place.
template <typename T, int kThreadsPerRow>
__global__ void __launch_bounds__(kFwdThreads) metaplastic_step_kernel(const __grid_constant__ FwdArgs<T> a) {
  using S = FwdShape<kThreadsPerRow>;
  const int64_t H = a.heads, dk = a.key_dim, dv = a.value_dim;
  const Position pos = thread_position<S>(a.row_blocks, dv);
  const int64_t bh = pos.batch_head, head = bh % H;
  const float prior = a.prior[head];
  const int64_t state_base = (bh * dv + pos.row) * dk;
  const float decay = expf(a.log_alpha[bh]);
  const float v = pos.row_valid ? to_float(a.v[bh * dv + pos.row]) : 0.f;
  const float b = pos.row_valid ? to_float(a.b[bh * dv + pos.row]) : 0.f;
  float o = 0.f;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const int64_t col = pos.col0 + c;
    if (pos.row_valid && col < dk) {
      const float k = to_float(a.k[bh * dk + col]), q = to_float(a.q[bh * dk + col]);
      const float M = fmaf(v, k, decay * a.M[state_base + col]);
      const float I = fmaf(b, k * k, decay * a.Ibar[state_base + col]);
      a.M[state_base + col] = M;
      a.Ibar[state_base + col] = I;
      o = fmaf(__fdividef(M, I + prior), q, o);
    }
  }
  o = row_group_sum<S::kThreadsPerRow>(o);
  if (pos.row_valid && pos.lane_in_row == 0) a.o[bh * dv + pos.row] = from_float<T>(a.scale * o);
}

// The arguments both kernels share (P: MetaplasticParams or MetaplasticStepParams), for a
// grid of row_blocks blocks per (batch, head).
template <typename T, typename P>
FwdArgs<T> fwd_args(const P& p, int64_t row_blocks) {
  FwdArgs<T> a{};
  a.q = static_cast<const T*>(p.q);
  a.k = static_cast<const T*>(p.k);
  a.v = static_cast<const T*>(p.v);
  a.b = static_cast<const T*>(p.b);
  a.log_alpha = static_cast<const float*>(p.log_alpha);
  a.prior = static_cast<const float*>(p.prior);
  a.o = static_cast<T*>(p.o);
  a.M = static_cast<float*>(p.M);
  a.Ibar = static_cast<float*>(p.Ibar);
  a.seqlen = p.seqlen;
  a.heads = p.heads;
  a.key_dim = p.key_dim;
  a.value_dim = p.value_dim;
  a.row_blocks = row_blocks;
  a.scale = static_cast<float>(p.scale);
  return a;
}

}  // namespace
}  // namespace metaplastic

size_t metaplastic_scan_fwd_workspace_bytes(const MetaplasticShape&) { return 0; }

void metaplastic_scan_fwd_cuda(const MetaplasticParams& p, void* stream) {
  using namespace metaplastic;
  if (p.batch == 0 || p.heads == 0) return;
  dispatch_threads_per_row(p.key_dim, [&](auto threads_per_row) {
    using S = FwdShape<decltype(threads_per_row)::value>;
    static_assert(fwd_smem_bytes<S>() <= 48 * 1024, "static shared memory");
    const int64_t row_blocks = row_blocks_for(p.value_dim, S::kRows);
    const dim3 grid(static_cast<unsigned>(row_blocks * p.batch * p.heads));
    dispatch_cuda_element_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      FwdArgs<T> a = fwd_args<T>(p, row_blocks);
      a.M0 = static_cast<const float*>(p.M0);
      a.Ibar0 = static_cast<const float*>(p.Ibar0);
      metaplastic_fwd_kernel<T, S::kThreadsPerRow><<<grid, S::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a);
      CRAM_CUDA_CHECK(cudaGetLastError());
    });
  });
}

void metaplastic_step_cuda(const MetaplasticStepParams& p, void* stream) {
  using namespace metaplastic;
  if (p.batch == 0 || p.heads == 0) return;
  dispatch_threads_per_row(p.key_dim, [&](auto threads_per_row) {
    using S = FwdShape<decltype(threads_per_row)::value>;
    const int64_t row_blocks = row_blocks_for(p.value_dim, S::kRows);
    const dim3 grid(static_cast<unsigned>(row_blocks * p.batch * p.heads));
    dispatch_cuda_element_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      metaplastic_step_kernel<T, S::kThreadsPerRow>
          <<<grid, S::kThreads, 0, static_cast<cudaStream_t>(stream)>>>(fwd_args<T>(p, row_blocks));
      CRAM_CUDA_CHECK(cudaGetLastError());
    });
  });
}

}  // namespace cram
