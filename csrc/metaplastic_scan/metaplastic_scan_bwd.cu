// CUDA backward of the metaplastic scan: the adjoint recurrence of docs/metaplastic.md §3,
//   G^M_t = dmu_t / P_t + a_{t+1} G^M_{t+1},   G^I_t = -dmu_t mu_t / P_t + a_{t+1} G^I_{t+1},
// run backwards in time, which needs every token's state in reverse order. Storing them all
// would take T d_v d_k floats per head; this kernel keeps them in three levels instead:
//   1. a forward pass writes the state at the start of every chunk of kChunk tokens to the
//      workspace (its own rows only);
//   2. going back chunk by chunk, the chunk's entry state is reloaded and advanced through the
//      chunk, the entry state of each of its kSubs sub-blocks of kSub tokens kept in shared
//      memory (each thread its own entries);
//   3. each sub-block is recomputed from its entry into registers (the thread's kSub x kCols
//      states of M and Ibar) and walked backwards.
// That recomputes each state three times, for 2 d_v d_k' floats of workspace per kChunk tokens
// per head (d_k' = the padded d_k of the block shape: 32, 64 or 128). Sub-blocks are short so
// that the registers allow two blocks per multiprocessor (where shared memory does too: d_k
// <= 64 on an H100): the time loop is a chain of dependent shuffles and shared-memory round
// trips, and one block of 8 warps left the multiprocessor mostly waiting on them.
//
// Thread layout as the forward (metaplastic_cuda_layout.cuh). Sums over key columns (dv, db,
// and the parts of dlog_alpha) close inside a row group; sums over value rows (dq, dk) go
// through warp shuffles, shared memory per sub-block, then float32 atomics to a
// (B, T, H, d_k) buffer, because a head's rows are spread over several blocks. Those last
// sums are therefore not bitwise reproducible run to run (as the non-deterministic backward
// of routed_attention).

#include <cuda_runtime.h>

#include "common/cuda_check.h"
#include "common/cuda_elements.cuh"
#include "metaplastic_scan/metaplastic_cuda_layout.cuh"
#include "metaplastic_scan/metaplastic_scan.h"

namespace cram {
namespace metaplastic {
namespace {

constexpr int kBwdThreads = 256;
constexpr int kSub = 8;
constexpr int kSubs = 4;
constexpr int kChunk = kSubs * kSub;
static_assert(kCols == 4, "the sub-block entry states are one float4 per thread");

template <typename T>
struct BwdArgs {
  const T* grad_o;
  const T* q;
  const T* k;
  const T* v;
  const T* b;
  const float* grad_M;
  const float* grad_Ibar;
  const float* log_alpha;
  const float* prior;
  const float* M0;
  const float* Ibar0;
  T* grad_v;
  T* grad_b;
  float* grad_log_alpha;  // zeroed before the kernel
  float* grad_prior;      // zeroed
  float* grad_M0;
  float* grad_Ibar0;
  float* dq;              // (B, T, H, d_k), zeroed
  float* dk;              // likewise
  float* checkpoint_M;    // [B * H][chunks][d_v][kKeyPad]
  float* checkpoint_I;
  int64_t seqlen, heads, key_dim, value_dim, chunks, row_blocks;
  float scale;
};

template <class S>
constexpr size_t bwd_smem_bytes() {
  return sizeof(float) * (3 * kChunk * S::kKeyPad + 3 * kChunk * S::kRows + kChunk  // inputs of a chunk
                          + 2 * S::kWarps * kSub * S::kKeyPad + 3 * kSub * S::kRows  // parts of a sub-block's sums
                          + 2 * kSubs * kCols * S::kThreads);                        // sub-block entry states
}

// Two blocks a multiprocessor (which caps the registers at 128 a thread) where two fit in the
// shared memory of an H100 (228 KB): for d_k <= 64. Above, one block fits anyway, and the cap
// would only make it spill.
template <class S>
constexpr int bwd_min_blocks() {
  return 2 * (bwd_smem_bytes<S>() + 1024) <= 228 * 1024 ? 2 : 1;
}

template <class S>
struct SharedTiles {
  float *q, *k, *k2, *v, *b, *grad_o, *decay;  // a chunk's inputs (k2 = k * k): [kChunk][kKeyPad] or [kChunk][kRows]
  float *dq, *dk;        // a sub-block's sums over each warp's rows: [kWarps][kSub][kKeyPad]
  float *dv, *db, *dla;  // [kSub][kRows] each, one after the other; dla: each row's part
  float4* entry;         // [kSubs][2 (M, Ibar)][kThreads]: each thread's kCols entries of a sub-block's entry state

  __device__ explicit SharedTiles(float* smem) {
    q = smem;
    k = q + kChunk * S::kKeyPad;
    k2 = k + kChunk * S::kKeyPad;
    v = k2 + kChunk * S::kKeyPad;
    b = v + kChunk * S::kRows;
    grad_o = b + kChunk * S::kRows;
    decay = grad_o + kChunk * S::kRows;
    dq = decay + kChunk;
    dk = dq + S::kWarps * kSub * S::kKeyPad;
    dv = dk + S::kWarps * kSub * S::kKeyPad;
    db = dv + kSub * S::kRows;
    dla = db + kSub * S::kRows;
    // 16-byte aligned: every offset before is a multiple of 4 floats (kKeyPad, kRows, kChunk, kSub are).
    entry = reinterpret_cast<float4*>(dla + kSub * S::kRows);
  }
};

// The sums over a row group of three values at once. The first two steps trade halves
// (lanes keep half their values and send the other half to the partner, which adds them),
// the rest add the one value left: 2 + 1 + (log2(kThreadsPerRow) - 2) shuffles where three
// plain sums take 3 log2(kThreadsPerRow). Lane l of the row group ends with the sum of value
// (l / (kThreadsPerRow / 4)): 0, 1, 2, or 3 (nothing) for the top quarter.
template <int kThreadsPerRow>
__device__ __forceinline__ float row_group_sums3(float x0, float x1, float x2, int lane_in_row) {
  static_assert(kThreadsPerRow >= 4, "two halving steps");
  constexpr int kHalf = kThreadsPerRow / 2, kQuarter = kThreadsPerRow / 4;
  const bool upper = lane_in_row & kHalf, upper_quarter = lane_in_row & kQuarter;
  float keep0 = upper ? x2 : x0, keep1 = upper ? 0.f : x1;
  keep0 += __shfl_xor_sync(0xffffffffu, upper ? x0 : x2, kHalf);
  keep1 += __shfl_xor_sync(0xffffffffu, upper ? x1 : 0.f, kHalf);
  float sum = upper_quarter ? keep1 : keep0;
  sum += __shfl_xor_sync(0xffffffffu, upper_quarter ? keep0 : keep1, kQuarter);
#pragma unroll
  for (int offset = kQuarter / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  return sum;
}

// State update of one token for this thread's kCols entries (the forward's arithmetic, so
// that the recomputed states are bitwise the forward's).
__device__ __forceinline__ void advance(float (&M)[kCols], float (&I)[kCols], const float (&k)[kCols],
                                        const float (&k2)[kCols], float v, float b, float decay) {
#pragma unroll
  for (int c = 0; c < kCols; ++c) {
    M[c] = fmaf(v, k[c], decay * M[c]);
    I[c] = fmaf(b, k2[c], decay * I[c]);
  }
}

template <typename T, class S>
struct Chunk {
  const BwdArgs<T>& a;
  const SharedTiles<S>& s;
  const Position& pos;
  int64_t batch, head, t0;  // t0: the chunk's first token
  float prior;

  __device__ void advance_tokens(float (&M)[kCols], float (&I)[kCols], int first, int count) const {
    for (int tt = first; tt < first + count; ++tt) {
      float k[kCols], k2[kCols];
      load_floats(s.k + tt * S::kKeyPad + pos.col0, k);
      load_floats(s.k2 + tt * S::kKeyPad + pos.col0, k2);
      advance(M, I, k, k2, s.v[tt * S::kRows + pos.local_row], s.b[tt * S::kRows + pos.local_row], s.decay[tt]);
    }
  }

  // Tokens [base, base + kSub) of the chunk, backwards, from the state before token base.
  // RM, RI: the adjoint reaching the state after the sub-block's last token, decayed (a G of
  // the next token); on return, that before its first token.
  __device__ void backward_sub(int base, const float (&start_M)[kCols], const float (&start_I)[kCols],
                                float (&RM)[kCols], float (&RI)[kCols], float& grad_prior) const {
    const int local_row = pos.local_row;
    float hM[kSub][kCols], hI[kSub][kCols];  // the states after each token of the sub-block
#pragma unroll
    for (int j = 0; j < kSub; ++j) {
      const int tt = base + j;
      float k[kCols], k2[kCols];
      load_floats(s.k + tt * S::kKeyPad + pos.col0, k);
      load_floats(s.k2 + tt * S::kKeyPad + pos.col0, k2);
      const float v = s.v[tt * S::kRows + local_row], b = s.b[tt * S::kRows + local_row], decay = s.decay[tt];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float prev_M = j == 0 ? start_M[c] : hM[j - 1][c], prev_I = j == 0 ? start_I[c] : hI[j - 1][c];
        hM[j][c] = fmaf(v, k[c], decay * prev_M);
        hI[j][c] = fmaf(b, k2[c], decay * prev_I);
      }
    }
#pragma unroll
    for (int j = kSub - 1; j >= 0; --j) {
      const int tt = base + j;
      float q[kCols], k[kCols], k2[kCols];
      load_floats(s.q + tt * S::kKeyPad + pos.col0, q);
      load_floats(s.k + tt * S::kKeyPad + pos.col0, k);
      load_floats(s.k2 + tt * S::kKeyPad + pos.col0, k2);
      const float v = s.v[tt * S::kRows + local_row], b = s.b[tt * S::kRows + local_row], b2 = b + b;
      const float grad_o = s.grad_o[tt * S::kRows + local_row], decay = s.decay[tt];  // grad_o carries the scale
      float dv = 0.f, db = 0.f, dla = 0.f, dq[kCols], dk[kCols];
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
        const float prev_M = j == 0 ? start_M[c] : hM[j - 1][c], prev_I = j == 0 ? start_I[c] : hI[j - 1][c];
        const float r = __fdividef(1.f, hI[j][c] + prior);
        const float mu = hM[j][c] * r;
        const float dmu = grad_o * q[c];
        const float gm = fmaf(dmu, r, RM[c]);
        const float u = dmu * mu * r;  // -(the local part of G^I), also -(d prior)
        const float gi = RI[c] - u;
        grad_prior -= u;
        dq[c] = mu * grad_o;
        dk[c] = fmaf(gm, v, k[c] * (gi * b2));  // d(b k^2)/dk = 2 b k
        dv = fmaf(gm, k[c], dv);
        db = fmaf(gi, k2[c], db);
        dla = fmaf(gm, prev_M, fmaf(gi, prev_I, dla));
        RM[c] = decay * gm;
        RI[c] = decay * gi;
      }
      dla *= decay;  // a reset (decay 0) gets exactly 0
      {
        constexpr int kQuarter = S::kThreadsPerRow / 4;
        const float sum = row_group_sums3<S::kThreadsPerRow>(dv, db, dla, pos.lane_in_row);
        const int which = pos.lane_in_row / kQuarter;  // 0: dv, 1: db, 2: dla, 3: none
        if (pos.lane_in_row % kQuarter == 0 && which < 3) s.dv[(which * kSub + j) * S::kRows + local_row] = sum;
      }
      // Over the rows of one warp here, over the warps in flush_sub (plain stores: no shared
      // atomics, which are compare-and-swap loops for floats).
#pragma unroll
      for (int c = 0; c < kCols; ++c) {
#pragma unroll
        for (int offset = S::kThreadsPerRow; offset < 32; offset *= 2) {
          dq[c] += __shfl_xor_sync(0xffffffffu, dq[c], offset);
          dk[c] += __shfl_xor_sync(0xffffffffu, dk[c], offset);
        }
      }
      if (threadIdx.x % 32 < S::kThreadsPerRow) {
        const int at = (threadIdx.x / 32 * kSub + j) * S::kKeyPad + pos.col0;
        *reinterpret_cast<float4*>(s.dq + at) = make_float4(dq[0], dq[1], dq[2], dq[3]);
        *reinterpret_cast<float4*>(s.dk + at) = make_float4(dk[0], dk[1], dk[2], dk[3]);
      }
    }
    __syncthreads();
    flush_sub(base);
    __syncthreads();
  }

  // The sub-block's sums to global memory: over the warps (dq, dk) and rows (dlog_alpha) first.
  __device__ void flush_sub(int base) const {
    const int64_t len = a.seqlen, H = a.heads, dk = a.key_dim, dv = a.value_dim;
    constexpr int kKeySums = kSub * S::kKeyPad;
#pragma unroll
    for (int i = 0; i < (kKeySums + S::kThreads - 1) / S::kThreads; ++i) {
      const int idx = threadIdx.x + i * S::kThreads, j = idx / S::kKeyPad, col = idx % S::kKeyPad;
      const int64_t t = t0 + base + j;
      if ((kKeySums % S::kThreads == 0 || idx < kKeySums) && t < len && col < dk) {
        float dq = 0.f, dk_sum = 0.f;
#pragma unroll
        for (int w = 0; w < S::kWarps; ++w) {
          dq += s.dq[w * kKeySums + idx];
          dk_sum += s.dk[w * kKeySums + idx];
        }
        const int64_t at = ((batch * len + t) * H + head) * dk + col;
        atomicAdd(a.dq + at, dq);
        atomicAdd(a.dk + at, dk_sum);
      }
    }
    constexpr int kRowSums = kSub * S::kRows;
#pragma unroll
    for (int i = 0; i < (kRowSums + S::kThreads - 1) / S::kThreads; ++i) {
      const int idx = threadIdx.x + i * S::kThreads, j = idx / S::kRows, r = idx % S::kRows;
      const int64_t t = t0 + base + j;
      if ((kRowSums % S::kThreads == 0 || idx < kRowSums) && t < len && pos.row0 + r < dv) {
        const int64_t at = ((batch * len + t) * H + head) * dv + pos.row0 + r;
        a.grad_v[at] = from_float<T>(s.dv[idx]);
        a.grad_b[at] = from_float<T>(s.db[idx]);
      }
    }
    if (threadIdx.x < kSub) {
      const int64_t t = t0 + base + threadIdx.x;
      if (t < len) {
        float dla = 0.f;
#pragma unroll
        for (int r = 0; r < S::kRows; ++r) dla += s.dla[threadIdx.x * S::kRows + r];
        atomicAdd(a.grad_log_alpha + (batch * len + t) * H + head, dla);
      }
    }
  }
};

template <typename T, class S>
__global__ void __launch_bounds__(S::kThreads, bwd_min_blocks<S>()) metaplastic_bwd_kernel(const __grid_constant__ BwdArgs<T> a) {
  extern __shared__ __align__(16) float smem[];
  __shared__ float block_grad_prior;
  const SharedTiles<S> s(smem);
  const int64_t len = a.seqlen, H = a.heads, dk = a.key_dim, dv = a.value_dim, N = a.chunks;
  const Position pos = thread_position<S>(a.row_blocks, dv);
  const int64_t bh = pos.batch_head, batch = bh / H, head = bh % H;
  const int64_t qk_base = (batch * len * H + head) * dk, v_base = (batch * len * H + head) * dv + pos.row0;
  const int key_width = static_cast<int>(dk), row_width = static_cast<int>(dv - pos.row0);
  const int64_t state_base = (bh * dv + pos.row) * dk;

  if (threadIdx.x == 0) block_grad_prior = 0.f;

  auto load_state = [&](const float* M_src, const float* I_src, int64_t base, int64_t width, float (&M)[kCols],
                        float (&I)[kCols]) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      const bool in = pos.row_valid && pos.col0 + c < width;
      M[c] = in && M_src ? M_src[base + pos.col0 + c] : 0.f;
      I[c] = in && I_src ? I_src[base + pos.col0 + c] : 0.f;
    }
  };
  auto checkpoint_base = [&](int64_t n) { return ((bh * N + n) * dv + pos.row) * S::kKeyPad; };
  // A chunk's inputs to shared memory. A partial last chunk: its tiles are zero past the end,
  // and decay 1 there leaves everything as it is.
  auto stage = [&](int64_t t0, bool with_q) {
    const int tokens = static_cast<int>(min(static_cast<int64_t>(kChunk), len - t0));
    const int64_t qk_at = qk_base + t0 * H * dk, v_at = v_base + t0 * H * dv;
    TileLoad<T, kChunk, S::kKeyPad, S::kThreads> load_q, load_k;
    TileLoad<T, kChunk, S::kRows, S::kThreads> load_v, load_b, load_grad_o;
    if (with_q) load_q.issue(a.q + qk_at, H * dk, tokens, key_width);
    load_k.issue(a.k + qk_at, H * dk, tokens, key_width);
    load_v.issue(a.v + v_at, H * dv, tokens, row_width);
    load_b.issue(a.b + v_at, H * dv, tokens, row_width);
    if (with_q) load_grad_o.issue(a.grad_o + v_at, H * dv, tokens, row_width);
    const float log_alpha = threadIdx.x < tokens ? a.log_alpha[(batch * len + t0 + threadIdx.x) * H + head] : 0.f;
    __syncthreads();  // the previous chunk's tiles are no longer read
    if (with_q) load_q.store(s.q, 1.f);
    load_k.store(s.k, 1.f, s.k2);
    load_v.store(s.v, 1.f);
    load_b.store(s.b, 1.f);
    if (with_q) load_grad_o.store(s.grad_o, a.scale);
    if (threadIdx.x < kChunk) s.decay[threadIdx.x] = threadIdx.x < tokens ? expf(log_alpha) : 1.f;
    __syncthreads();
  };

  // 1. The entry state of every chunk.
  float M[kCols], I[kCols];
  load_state(a.M0, a.Ibar0, state_base, dk, M, I);
  for (int64_t n = 0; n + 1 < N; ++n) {
    stage(n * kChunk, false);
    const Chunk<T, S> chunk{a, s, pos, batch, head, n * kChunk, 0.f};
    chunk.advance_tokens(M, I, 0, kChunk);
    if (pos.row_valid) {
      const int64_t at = checkpoint_base(n + 1) + pos.col0;
      *reinterpret_cast<float4*>(a.checkpoint_M + at) = make_float4(M[0], M[1], M[2], M[3]);
      *reinterpret_cast<float4*>(a.checkpoint_I + at) = make_float4(I[0], I[1], I[2], I[3]);
    }
  }

  // 2. Backwards, chunk by chunk.
  float RM[kCols], RI[kCols], grad_prior = 0.f;
  load_state(a.grad_M, a.grad_Ibar, state_base, dk, RM, RI);
  const float prior = a.prior[head];
  for (int64_t n = N - 1; n >= 0; --n) {
    stage(n * kChunk, true);
    const Chunk<T, S> chunk{a, s, pos, batch, head, n * kChunk, prior};
    float start_M[kCols], start_I[kCols];
    if (n == 0) {
      load_state(a.M0, a.Ibar0, state_base, dk, start_M, start_I);
    } else {
      load_state(a.checkpoint_M, a.checkpoint_I, checkpoint_base(n), S::kKeyPad, start_M, start_I);
    }
    for (int sub = 0; sub < kSubs; ++sub) {
      s.entry[(2 * sub) * S::kThreads + threadIdx.x] = make_float4(start_M[0], start_M[1], start_M[2], start_M[3]);
      s.entry[(2 * sub + 1) * S::kThreads + threadIdx.x] = make_float4(start_I[0], start_I[1], start_I[2], start_I[3]);
      if (sub + 1 < kSubs) chunk.advance_tokens(start_M, start_I, sub * kSub, kSub);
    }
    for (int sub = kSubs - 1; sub >= 0; --sub) {
      const float4 m = s.entry[(2 * sub) * S::kThreads + threadIdx.x], i = s.entry[(2 * sub + 1) * S::kThreads + threadIdx.x];
      const float entry_M[kCols] = {m.x, m.y, m.z, m.w}, entry_I[kCols] = {i.x, i.y, i.z, i.w};
      chunk.backward_sub(sub * kSub, entry_M, entry_I, RM, RI, grad_prior);
    }
  }

  // RM, RI now hold a_1 G_1: the gradient of the initial state.
  if (pos.row_valid) {
#pragma unroll
    for (int c = 0; c < kCols; ++c) {
      if (pos.col0 + c < dk) {
        a.grad_M0[state_base + pos.col0 + c] = RM[c];
        a.grad_Ibar0[state_base + pos.col0 + c] = RI[c];
      }
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) grad_prior += __shfl_xor_sync(0xffffffffu, grad_prior, offset);
  __syncthreads();
  if (threadIdx.x % 32 == 0) atomicAdd(&block_grad_prior, grad_prior);
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(a.grad_prior + head, block_grad_prior);
}

template <typename T>
__global__ void to_element_kernel(const float* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = from_float<T>(src[i]);
  }
}

// Calls fn(S{}) with the backward's block shape for this d_k on this device: 256 threads, or
// 128 where the shared memory of 256 (148 KB at d_k > 64, per-warp sums included) passes the
// device's limit for a block (e.g. the 99 KB of sm_86 / sm_89; an A100's 163 KB holds it).
template <typename Fn>
void dispatch_bwd_shape(int64_t key_dim, Fn&& fn) {
  dispatch_threads_per_row(key_dim, [&](auto threads_per_row) {
    constexpr int kThreadsPerRow = decltype(threads_per_row)::value;
    using Wide = BlockShape<kThreadsPerRow, kBwdThreads>;
    if constexpr (kThreadsPerRow == 32) {
      int device = 0, limit = 0;
      CRAM_CUDA_CHECK(cudaGetDevice(&device));
      CRAM_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
      if (bwd_smem_bytes<Wide>() > static_cast<size_t>(limit)) {
        fn(BlockShape<kThreadsPerRow, kBwdThreads / 2>{});
        return;
      }
    }
    fn(Wide{});
  });
}

struct Workspace {
  size_t checkpoint_floats, dqk_floats;
  size_t bytes() const { return sizeof(float) * (2 * checkpoint_floats + 2 * dqk_floats); }
};

size_t round_up4(size_t n) { return (n + 3) / 4 * 4; }

template <class S>
Workspace workspace_of(const MetaplasticShape& p) {
  const size_t chunks = static_cast<size_t>((p.seqlen + kChunk - 1) / kChunk);
  return {round_up4(static_cast<size_t>(p.batch * p.heads) * chunks * p.value_dim * S::kKeyPad),
          round_up4(static_cast<size_t>(p.batch * p.seqlen * p.heads * p.key_dim))};
}

}  // namespace
}  // namespace metaplastic

size_t metaplastic_scan_bwd_workspace_bytes(const MetaplasticShape& p) {
  using namespace metaplastic;
  size_t bytes = 0;
  dispatch_bwd_shape(p.key_dim, [&](auto shape) { bytes = workspace_of<decltype(shape)>(p).bytes(); });
  return bytes;
}

void metaplastic_scan_bwd_cuda(const MetaplasticBwdParams& p, void* stream_ptr) {
  using namespace metaplastic;
  const auto stream = static_cast<cudaStream_t>(stream_ptr);
  const int64_t bh = p.batch * p.heads, rows_total = bh * p.seqlen;
  CRAM_CUDA_CHECK(cudaMemsetAsync(p.grad_prior, 0, sizeof(float) * p.heads, stream));
  if (bh == 0) return;
  dispatch_bwd_shape(p.key_dim, [&](auto shape) {
    using S = decltype(shape);
    const Workspace w = workspace_of<S>(p);
    float* checkpoint_M = static_cast<float*>(p.workspace);
    float* checkpoint_I = checkpoint_M + w.checkpoint_floats;
    float* dq = checkpoint_I + w.checkpoint_floats;
    float* dk = dq + w.dqk_floats;
    const int64_t qk_elems = rows_total * p.key_dim;
    CRAM_CUDA_CHECK(cudaMemsetAsync(dq, 0, sizeof(float) * 2 * w.dqk_floats, stream));
    CRAM_CUDA_CHECK(cudaMemsetAsync(p.grad_log_alpha, 0, sizeof(float) * rows_total, stream));
    constexpr size_t smem = bwd_smem_bytes<S>();
    const int64_t row_blocks = row_blocks_for(p.value_dim, S::kRows);
    const dim3 grid(static_cast<unsigned>(row_blocks * bh));
    dispatch_cuda_element_type(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      BwdArgs<T> a{};
      a.grad_o = static_cast<const T*>(p.grad_o);
      a.q = static_cast<const T*>(p.q);
      a.k = static_cast<const T*>(p.k);
      a.v = static_cast<const T*>(p.v);
      a.b = static_cast<const T*>(p.b);
      a.grad_M = static_cast<const float*>(p.grad_M);
      a.grad_Ibar = static_cast<const float*>(p.grad_Ibar);
      a.log_alpha = static_cast<const float*>(p.log_alpha);
      a.prior = static_cast<const float*>(p.prior);
      a.M0 = static_cast<const float*>(p.M0);
      a.Ibar0 = static_cast<const float*>(p.Ibar0);
      a.grad_v = static_cast<T*>(p.grad_v);
      a.grad_b = static_cast<T*>(p.grad_b);
      a.grad_log_alpha = static_cast<float*>(p.grad_log_alpha);
      a.grad_prior = static_cast<float*>(p.grad_prior);
      a.grad_M0 = static_cast<float*>(p.grad_M0);
      a.grad_Ibar0 = static_cast<float*>(p.grad_Ibar0);
      a.dq = dq;
      a.dk = dk;
      a.checkpoint_M = checkpoint_M;
      a.checkpoint_I = checkpoint_I;
      a.seqlen = p.seqlen;
      a.heads = p.heads;
      a.key_dim = p.key_dim;
      a.value_dim = p.value_dim;
      a.chunks = (p.seqlen + kChunk - 1) / kChunk;
      a.row_blocks = row_blocks;
      a.scale = static_cast<float>(p.scale);
      CRAM_CUDA_CHECK(cudaFuncSetAttribute(metaplastic_bwd_kernel<T, S>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem)));
      metaplastic_bwd_kernel<T, S><<<grid, S::kThreads, smem, stream>>>(a);
      CRAM_CUDA_CHECK(cudaGetLastError());
      if (qk_elems > 0) {
        const int threads = 256;
        const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((qk_elems + threads - 1) / threads, 65535));
        to_element_kernel<T><<<blocks, threads, 0, stream>>>(dq, static_cast<T*>(p.grad_q), qk_elems);
        CRAM_CUDA_CHECK(cudaGetLastError());
        to_element_kernel<T><<<blocks, threads, 0, stream>>>(dk, static_cast<T*>(p.grad_k), qk_elems);
        CRAM_CUDA_CHECK(cudaGetLastError());
      }
    });
  });
}

}  // namespace cram
