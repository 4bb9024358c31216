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
// Loads a thread keeps in flight: a tile of q or k has 16 * 4 * threads_per_row elements, one of v
// or b 16 * rows (threads / threads_per_row); more (d_k <= 8) are loaded after, one by one.
constexpr int kKeyLoads = 16, kValueLoads = 4;

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
  int64_t seqlen, heads, key_dim, value_dim;
  float scale;
};

size_t fwd_smem_bytes(const Layout& l) {
  return sizeof(float) * (2 * kFwdTile * l.key_pad + 2 * kFwdTile * l.rows + kFwdTile + kFwdTile * l.threads);
}

template <typename T>
__global__ void __launch_bounds__(kFwdThreads) metaplastic_fwd_kernel(const __grid_constant__ FwdArgs<T> a,
                                                                         const __grid_constant__ Layout l) {
  extern __shared__ float smem[];
  float* q_s = smem;                         // [tile][key_pad]
  float* k_s = q_s + kFwdTile * l.key_pad;   // [tile][key_pad]
  float* v_s = k_s + kFwdTile * l.key_pad;   // [tile][rows]
  float* b_s = v_s + kFwdTile * l.rows;      // [tile][rows]
  float* decay_s = b_s + kFwdTile * l.rows;  // [tile]
  float* o_part = decay_s + kFwdTile;        // [tile][threads]: each thread's part of o

  const int64_t len = a.seqlen, H = a.heads, dk = a.key_dim, dv = a.value_dim;
  const int64_t bh = batch_head(l), batch = bh / H, head = bh % H;
  const Position pos = thread_position(l, dv);
  const int local_row = threadIdx.x / l.threads_per_row, row0 = row_block(l) * l.rows;
  const float prior = a.prior[head];

  float M[kCols], I[kCols];
  const int64_t state_base = (bh * dv + pos.row) * dk;
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    const bool in = pos.row_valid && pos.col0 + c < dk;
    M[c] = in && a.M0 ? a.M0[state_base + pos.col0 + c] : 0.f;
    I[c] = in && a.Ibar0 ? a.Ibar0[state_base + pos.col0 + c] : 0.f;
  }

  const int64_t qk_base = (batch * len * H + head) * dk, v_base = (batch * len * H + head) * dv;
  TileLoad<T, kKeyLoads> load_q, load_k;
  TileLoad<T, kValueLoads> load_v, load_b;
  float next_log_alpha = 0.f;
  const auto issue = [&](int64_t t0) {
    const int tokens = static_cast<int>(min(static_cast<int64_t>(kFwdTile), len - t0));
    load_q.issue(a.q + qk_base, t0, tokens, len, H * dk, dk, 0, l.key_pad);
    load_k.issue(a.k + qk_base, t0, tokens, len, H * dk, dk, 0, l.key_pad);
    load_v.issue(a.v + v_base, t0, tokens, len, H * dv, dv, row0, l.rows);
    load_b.issue(a.b + v_base, t0, tokens, len, H * dv, dv, row0, l.rows);
    if (threadIdx.x < tokens) next_log_alpha = a.log_alpha[(batch * len + t0 + threadIdx.x) * H + head];
  };
  if (len > 0) issue(0);
  for (int64_t t0 = 0; t0 < len; t0 += kFwdTile) {
    const int tokens = static_cast<int>(min(static_cast<int64_t>(kFwdTile), len - t0));
    __syncthreads();  // the previous tile's shared memory is no longer read
    load_q.store(q_s, kFwdTile, 1.f);
    load_k.store(k_s, kFwdTile, 1.f);
    load_v.store(v_s, kFwdTile, 1.f);
    load_b.store(b_s, kFwdTile, 1.f);
    // Past the end: decay 1 and zero inputs leave the state as it is.
    if (threadIdx.x < kFwdTile) decay_s[threadIdx.x] = threadIdx.x < tokens ? expf(next_log_alpha) : 1.f;
    __syncthreads();
    if (t0 + kFwdTile < len) issue(t0 + kFwdTile);  // in flight while this tile computes

#pragma unroll
    for (int tt = 0; tt < kFwdTile; ++tt) {
      float q[kCols], k[kCols];
      load_floats(q_s + tt * l.key_pad + pos.col0, q);
      load_floats(k_s + tt * l.key_pad + pos.col0, k);
      const float v = v_s[tt * l.rows + local_row], b = b_s[tt * l.rows + local_row], decay = decay_s[tt];
      float o = 0.f;
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        // fma(v, k, decay * M): at a reset (decay 0) exactly v * k, as the reference.
        M[c] = fmaf(v, k[c], decay * M[c]);
        I[c] = fmaf(b, k[c] * k[c], decay * I[c]);
        o = fmaf(__fdividef(M[c], I[c] + prior), q[c], o);
      }
      o_part[tt * blockDim.x + threadIdx.x] = o;  // summed over the row group after the tile
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < tokens * l.rows; idx += blockDim.x) {
      const int tt = idx / l.rows, r = idx % l.rows;
      const float* part = o_part + tt * blockDim.x + r * l.threads_per_row;
      float o = 0.f;
      for (int j = 0; j < l.threads_per_row; ++j) o += part[(j + r) & (l.threads_per_row - 1)];  // rotated: fewer bank conflicts
      if (row0 + r < dv) a.o[v_base + (t0 + tt) * H * dv + row0 + r] = from_float<T>(a.scale * o);
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
template <typename T>
__global__ void __launch_bounds__(kFwdThreads) metaplastic_step_kernel(const __grid_constant__ FwdArgs<T> a,
                                                                          const __grid_constant__ Layout l) {
  const int64_t H = a.heads, dk = a.key_dim, dv = a.value_dim;
  const int64_t bh = batch_head(l), head = bh % H;
  const Position pos = thread_position(l, dv);
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
  o = row_group_sum(o, l.threads_per_row);
  if (pos.row_valid && pos.lane_in_row == 0) a.o[bh * dv + pos.row] = from_float<T>(a.scale * o);
}

template <typename T, typename P>
FwdArgs<T> fwd_args(const P& p) {
  FwdArgs<T> a{};
  a.q = static_cast<const T*>(p.q);
  a.k = static_cast<const T*>(p.k);
  a.v = static_cast<const T*>(p.v);
  a.b = static_cast<const T*>(p.b);
  a.log_alpha = static_cast<const float*>(p.log_alpha);
  a.prior = static_cast<const float*>(p.prior);
  a.seqlen = p.seqlen;
  a.heads = p.heads;
  a.key_dim = p.key_dim;
  a.value_dim = p.value_dim;
  a.scale = static_cast<float>(p.scale);
  return a;
}

}  // namespace
}  // namespace metaplastic

size_t metaplastic_scan_fwd_workspace_bytes(const MetaplasticShape&) { return 0; }

void metaplastic_scan_fwd_cuda(const MetaplasticParams& p, void* stream) {
  using namespace metaplastic;
  if (p.batch == 0 || p.heads == 0) return;
  const Layout l = make_layout(p.key_dim, p.value_dim, kFwdThreads);
  const dim3 grid(static_cast<unsigned>(l.row_blocks * p.batch * p.heads));
  const size_t smem = fwd_smem_bytes(l);
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a = fwd_args<T>(p);
    a.M0 = static_cast<const float*>(p.M0);
    a.Ibar0 = static_cast<const float*>(p.Ibar0);
    a.o = static_cast<T*>(p.o);
    a.M = static_cast<float*>(p.M);
    a.Ibar = static_cast<float*>(p.Ibar);
    metaplastic_fwd_kernel<T><<<grid, l.threads, smem, static_cast<cudaStream_t>(stream)>>>(a, l);
    CRAM_CUDA_CHECK(cudaGetLastError());
  });
}

void metaplastic_step_cuda(const MetaplasticStepParams& p, void* stream) {
  using namespace metaplastic;
  if (p.batch == 0 || p.heads == 0) return;
  const Layout l = make_layout(p.key_dim, p.value_dim, kFwdThreads);
  const dim3 grid(static_cast<unsigned>(l.row_blocks * p.batch * p.heads));
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    FwdArgs<T> a = fwd_args<T>(p);
    a.o = static_cast<T*>(p.o);
    a.M = static_cast<float*>(p.M);
    a.Ibar = static_cast<float*>(p.Ibar);
    metaplastic_step_kernel<T><<<grid, l.threads, 0, static_cast<cudaStream_t>(stream)>>>(a, l);
    CRAM_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace cram
