// CUDA gated scan, h[t] = exp(log_a[t]) h[t-1] + x[t] per channel, and its backward.
//
// A step is an affine map of the state, s -> a s + x, and affine maps compose, so T
// splits into chunks scanned in parallel and stitched together by the state carried
// from one chunk to the next. One block owns one chunk of one lane (a slice of kW
// channels of one batch row) and keeps its whole tile in registers, so the inputs
// are read from memory exactly once, even when B*C is small and T long:
//   1. each thread folds its S consecutive steps into one map (A, X);
//   2. a block scan over the threads' maps (shuffles in a warp, shared memory across
//      warps) gives each thread the map from the chunk's start to its first step;
//   3. the state entering the chunk comes from the earlier chunks by decoupled
//      look-back (Merrill & Garland 2016, as in cub::DeviceScan): a chunk publishes
//      its map as soon as it has it, and its end state as soon as it knows its start
//      state; it finds its start state by walking back over published maps, a window
//      of chunks at a time, until it meets a published end state;
//   4. each thread replays its steps from its true start state and writes the outputs.
// The backward is the same scan run from the end of time towards the start, on the
// carry c that flows into step t from later steps: g = grad_h[t] + c, and the carry
// passed on is a[t] g, i.e. the map c -> a c + a grad_h[t].
//
// Traffic: forward reads x and log_a and writes h once (3 tensors); backward reads
// grad_h, log_a, h and writes grad_x, grad_log_a (5). The chunk states add 12 bytes
// per channel per chunk, plus their memset: 1-2% of the tensors' bytes.

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>

#include "common/cuda_check.h"
#include "common/cuda_elements.cuh"
#include "gated_scan/gated_scan.h"

namespace cram {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// The shape of one block's tile. Threads across channels: 8 threads x 16 bytes cover
// 128 contiguous bytes of a row (a whole cache line) per access; with scalar access
// (C not a multiple of the vector, or unaligned tensors) 32 threads do.
template <int VEC, int S>
struct ChunkLayout {
  static constexpr int kChannelThreads = VEC == 1 ? 32 : 8;
  static constexpr int kW = kChannelThreads * VEC;         // channels per lane
  static constexpr int kGroups = kThreads / kChannelThreads;  // threads along time
  static constexpr int kSteps = kGroups * S;               // steps per chunk
  static constexpr int kWindow = kThreads / kW;            // look-back: threads per channel
  static_assert(kWindow >= 1 && kWindow <= 8 && 32 % kWindow == 0, "look-back window within a warp");
};

// Steps per thread: a thread's tile (S vectors per input tensor) stays in registers
// between the two passes. On the 16-byte path, S = 8 forward / 4 backward (three
// inputs) is the most that stays spill-free at 2 blocks per SM (ptxas -v: 126 / 120
// registers); the scalar fallback holds one element a step and takes more steps.
constexpr int fwd_steps(int vec) { return vec == 1 ? 16 : 8; }
constexpr int bwd_steps(int vec) { return vec == 1 ? 8 : 4; }

// ---------------------------------------------------------------- chunk states
//
// Each chunk but the last publishes, per channel, its map (A, X) in one 64-bit word
// (A's bits low, X's high) and its end state in one 32-bit word. The workspace is
// set to all ones before the kernel; all ones (a NaN no arithmetic here produces,
// and replaced by another NaN if it ever did) means "not published yet". Each word
// carries its own readiness, so no flag or fence orders one word against another:
// word-sized relaxed accesses at GPU scope are enough.

constexpr unsigned kNotReady = 0xffffffffu;

struct ChunkStatus {
  unsigned long long* map;  // [chunks - 1][B*C]
  unsigned* end;            // [chunks - 1][B*C]
  int64_t stride;           // B*C
};

__device__ __forceinline__ unsigned publishable(float v) {
  const unsigned u = __float_as_uint(v);
  return u == kNotReady ? 0x7fffffffu : u;
}

__device__ __forceinline__ unsigned load_relaxed(const unsigned* p) {
  unsigned v;
  asm volatile("ld.relaxed.gpu.global.b32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned long long load_relaxed(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.relaxed.gpu.global.b64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void store_relaxed(unsigned* p, unsigned v) {
  asm volatile("st.relaxed.gpu.global.b32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void store_relaxed(unsigned long long* p, unsigned long long v) {
  asm volatile("st.relaxed.gpu.global.b64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Where a block sits in the scan.
struct LaneChunk {
  int64_t chunk;       // in scan order: time order forward, reverse time order backward
  int64_t num_chunks;
  int64_t channel0;    // b * C + the lane's first channel: index into the states and init
  int valid;           // channels of the lane inside C
  const float* init;   // (B, C) state entering chunk 0, or nullptr for zeros
};

// The end word of this thread's first look-back predecessor, loaded before the tile
// is consumed so that its latency hides behind the tile loads. In the steady state
// the previous chunk has long finished and this is the whole look-back.
template <int kWindow>
__device__ __forceinline__ unsigned early_probe(const ChunkStatus& st, const LaneChunk& lc) {
  const int j = threadIdx.x / kWindow, o = threadIdx.x % kWindow;
  const int64_t pred = lc.chunk - 1 - o;
  if (pred < 0 || j >= lc.valid) return kNotReady;
  return load_relaxed(st.end + pred * st.stride + lc.channel0 + j);
}

// The state entering chunk lc.chunk (> 0) for channel j = threadIdx.x / kWindow. The
// kWindow threads of a channel (adjacent lanes of one warp) read kWindow predecessors
// at once, thread o the chunk `chunk - 1 - base - o`, then fold them nearest first:
// a map composes into the running map, an end state (or the initial state before
// chunk 0) closes the walk. A window with an unpublished chunk is read again: every
// earlier chunk has a lower block index, so it is running or done and will publish.
constexpr int kNone = 0, kMap = 1, kEnd = 2;

template <int kWindow>
__device__ float look_back(const ChunkStatus& st, const LaneChunk& lc, unsigned probe) {
  const int lane = threadIdx.x % 32;
  const int o = threadIdx.x % kWindow;
  const int j = threadIdx.x / kWindow;
  const int first_lane = lane & ~(kWindow - 1);
  const int64_t ch = lc.channel0 + j;
  bool found = j >= lc.valid;
  float carry = 0.0f, acc_a = 1.0f, acc_x = 0.0f;  // running map: end of chunk (base+o) -> our start
  int64_t base = 0;
  bool first = true;
  while (__any_sync(kFullMask, !found)) {
    int kind = kEnd;
    float v0 = 0.0f, v1 = 0.0f;
    if (!found) {
      const int64_t pred = lc.chunk - 1 - base - o;
      if (pred < 0) {
        v0 = lc.init != nullptr ? lc.init[ch] : 0.0f;
      } else {
        const unsigned e = first ? probe : load_relaxed(st.end + pred * st.stride + ch);
        if (e != kNotReady) {
          v0 = __uint_as_float(e);
        } else {
          const unsigned long long m = load_relaxed(st.map + pred * st.stride + ch);
          if (static_cast<unsigned>(m) == kNotReady) {
            kind = kNone;
          } else {
            kind = kMap;
            v0 = __uint_as_float(static_cast<unsigned>(m));
            v1 = __uint_as_float(static_cast<unsigned>(m >> 32));
          }
        }
      }
    }
    first = false;
    const unsigned waiting = __ballot_sync(kFullMask, kind == kNone);
    const bool ready = ((waiting >> first_lane) & ((1u << kWindow) - 1u)) == 0;
#pragma unroll
    for (int i = 0; i < kWindow; ++i) {
      const int k = __shfl_sync(kFullMask, kind, first_lane + i);
      const float a = __shfl_sync(kFullMask, v0, first_lane + i);
      const float x = __shfl_sync(kFullMask, v1, first_lane + i);
      if (!found && ready) {
        if (k == kEnd) {
          carry = acc_a * a + acc_x;
          found = true;
        } else {
          acc_x = acc_a * x + acc_x;
          acc_a *= a;
        }
      }
    }
    if (!found) {
      if (ready) {
        base += kWindow;
      } else {
        __nanosleep(64);
      }
    }
  }
  return carry;
}

template <int W>
struct ScanShared {
  float2 warp_map[kWarps][W];   // (A, X) of each warp's steps, per channel
  float warp_start[kWarps][W];  // state entering each warp's steps, per channel
};

// Steps 2 and 3: given this thread's map (a, x) over its steps (a, x are clobbered),
// returns in `start` the state entering its first step, and publishes the chunk's
// map and end state. Threads are ordered in time by (warp, position in warp); the
// position is lane / kChannelThreads.
template <int VEC, int CW>
__device__ void chunk_scan(float (&a)[VEC], float (&x)[VEC], float (&start)[VEC], const ChunkStatus& st,
                           const LaneChunk& lc, unsigned probe, ScanShared<CW * VEC>& sh) {
  constexpr int W = CW * VEC, kPerWarp = 32 / CW, kWindow = kThreads / W;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int cv = lane % CW, pos = lane / CW;

  // Inclusive scan over this warp's positions: compose the earlier map, then ours.
#pragma unroll
  for (int d = 1; d < kPerWarp; d *= 2) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float pa = __shfl_up_sync(kFullMask, a[v], d * CW);
      const float px = __shfl_up_sync(kFullMask, x[v], d * CW);
      if (pos >= d) {
        x[v] = a[v] * px + x[v];
        a[v] *= pa;
      }
    }
  }
  // The map of the earlier positions of this warp (identity for the first).
  float ea[VEC], ex[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    ea[v] = __shfl_up_sync(kFullMask, a[v], CW);
    ex[v] = __shfl_up_sync(kFullMask, x[v], CW);
    if (pos == 0) ea[v] = 1.0f, ex[v] = 0.0f;
  }
  if (pos == kPerWarp - 1) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) sh.warp_map[warp][cv * VEC + v] = make_float2(a[v], x[v]);
  }
  __syncthreads();

  // One thread per channel (the first of its look-back window) speaks for it.
  const int j = threadIdx.x / kWindow;
  const bool speaker = threadIdx.x % kWindow == 0;
  const bool publish = speaker && j < lc.valid && lc.chunk + 1 < lc.num_chunks;
  const int64_t ch = lc.channel0 + j;
  if (publish && lc.chunk > 0) {
    // Chunk 0 publishes its end state straight away: no map needed.
    float ba = 1.0f, bx = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float2 m = sh.warp_map[w][j];
      bx = m.x * bx + m.y;
      ba *= m.x;
    }
    const unsigned long long word =
        static_cast<unsigned long long>(__float_as_uint(bx)) << 32 | publishable(ba);
    store_relaxed(st.map + lc.chunk * st.stride + ch, word);
  }
  float carry;
  if (lc.chunk == 0) {
    carry = j < lc.valid && lc.init != nullptr ? lc.init[ch] : 0.0f;
  } else {
    carry = look_back<kWindow>(st, lc, probe);
  }
  if (speaker) {
    float s = carry;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sh.warp_start[w][j] = s;
      const float2 m = sh.warp_map[w][j];
      s = m.x * s + m.y;
    }
    if (publish) store_relaxed(st.end + lc.chunk * st.stride + ch, publishable(s));
  }
  __syncthreads();
#pragma unroll
  for (int v = 0; v < VEC; ++v) start[v] = ea[v] * sh.warp_start[warp][cv * VEC + v] + ex[v];
}

// Makes v opaque to the optimiser. Applied to the tile between the two passes, it
// stops the compiler from reusing the float32 values (exp(log_a), converted x) of the
// first pass in the second: they would stay live across the block scan in place of
// the packed inputs, double the registers of the tile, and spill.
template <typename T, int VEC>
__device__ __forceinline__ void hide_from_optimiser(Packed<T, VEC>& v) {
#pragma unroll
  for (int i = 0; i < Packed<T, VEC>::kWords; ++i) asm volatile("" : "+r"(v.w[i]));
}

// ------------------------------------------------------------------- kernels
//
// Block index = chunk * lanes + lane: chunk-major, so that a chunk's predecessors
// have lower block indices. Like cub::DeviceScan (and so torch.cumsum), the
// look-back relies on blocks being dispatched in index order, so that a waiting
// block never holds the place of one it waits for.

template <typename T, int VEC, int S>
__global__ void __launch_bounds__(kThreads, 2)
    gated_scan_fwd_kernel(const GatedScanParams p, const ChunkStatus st, int64_t lanes_per_row, int64_t num_chunks) {
  using L = ChunkLayout<VEC, S>;
  __shared__ ScanShared<L::kW> sh;
  const int64_t T_ = p.seqlen, C = p.channels;
  const int64_t lanes = p.batch * lanes_per_row;
  const int64_t chunk = blockIdx.x / lanes, lane = blockIdx.x % lanes;
  const int64_t b = lane / lanes_per_row, c0 = (lane % lanes_per_row) * L::kW;
  const int cv = threadIdx.x % L::kChannelThreads, group = threadIdx.x / L::kChannelThreads;
  const int64_t c = c0 + cv * VEC;
  const bool active = c < C;  // C is a multiple of VEC: a vector is all in or all out
  const int64_t t0 = chunk * L::kSteps + group * S;
  const T* x_in = static_cast<const T*>(p.x);
  const T* log_a_in = static_cast<const T*>(p.log_a);
  T* h_out = static_cast<T*>(p.h);

  // The whole tile is loaded before anything is computed: S x 2 loads in flight per
  // thread. Steps past T get log_a = 0, x = 0: the identity map.
  Packed<T, VEC> xs[S], ls[S];
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t t = t0 + s;
    if (active && t < T_) {
      const int64_t off = (b * T_ + t) * C + c;
      xs[s] = load_packed<T, VEC>(x_in + off);
      ls[s] = load_packed<T, VEC>(log_a_in + off);
    } else {
      xs[s] = zero_packed<T, VEC>();
      ls[s] = zero_packed<T, VEC>();
    }
  }
  const LaneChunk lc{chunk, num_chunks, b * C + c0, static_cast<int>(C - c0 < L::kW ? C - c0 : L::kW),
                     static_cast<const float*>(p.h0)};
  const unsigned probe = early_probe<L::kWindow>(st, lc);

  float a[VEC], xm[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) a[v] = 1.0f, xm[v] = 0.0f;
#pragma unroll
  for (int s = 0; s < S; ++s) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float as = __expf(element(ls[s], v));
      xm[v] = as * xm[v] + element(xs[s], v);
      a[v] *= as;
    }
  }
  float h[VEC];
  chunk_scan<VEC, L::kChannelThreads>(a, xm, h, st, lc, probe, sh);
#pragma unroll
  for (int s = 0; s < S; ++s) hide_from_optimiser(xs[s]), hide_from_optimiser(ls[s]);

  // Replay from the true start state. exp is recomputed rather than kept: keeping
  // a in float32 would double the registers of the tile and halve the occupancy
  // (the MUFU unit has room: 2 exp per element is ~1/3 of its rate at HBM speed).
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const int64_t t = t0 + s;
    if (active && t < T_) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) h[v] = __expf(element(ls[s], v)) * h[v] + element(xs[s], v);
      store_packed<T, VEC>(h_out + (b * T_ + t) * C + c, pack<T, VEC>(h));
    }
  }
  // The thread holding step T-1 holds the final state (steps past T were skipped).
  if (active && t0 <= T_ - 1 && T_ - 1 < t0 + S) {
    float* h_last = static_cast<float*>(p.h_last) + b * C + c;
#pragma unroll
    for (int v = 0; v < VEC; ++v) h_last[v] = h[v];
  }
}

template <typename T, int VEC, int S>
__global__ void __launch_bounds__(kThreads, 2)
    gated_scan_bwd_kernel(const GatedScanBwdParams p, const ChunkStatus st, int64_t lanes_per_row,
                          int64_t num_chunks) {
  using L = ChunkLayout<VEC, S>;
  __shared__ ScanShared<L::kW> sh;
  const int64_t T_ = p.seqlen, C = p.channels;
  const int64_t lanes = p.batch * lanes_per_row;
  const int64_t chunk = blockIdx.x / lanes, lane = blockIdx.x % lanes;
  const int64_t b = lane / lanes_per_row, c0 = (lane % lanes_per_row) * L::kW;
  const int cv = threadIdx.x % L::kChannelThreads, group = threadIdx.x / L::kChannelThreads;
  const int64_t c = c0 + cv * VEC;
  const bool active = c < C;
  // Scan chunk 0 ends at time T and group 0 holds a chunk's latest steps; this
  // thread's steps are t_end - 1, t_end - 2, ..., t_end - S, in that order.
  const int64_t t_end = T_ - chunk * L::kSteps - group * S;
  const T* grad_h = static_cast<const T*>(p.grad_h);
  const T* log_a_in = static_cast<const T*>(p.log_a);
  const T* h_in = static_cast<const T*>(p.h);
  T* grad_x = static_cast<T*>(p.grad_x);
  T* grad_log_a = static_cast<T*>(p.grad_log_a);

  // Steps before time 0 get log_a = 0, grad_h = 0: the identity map.
  Packed<T, VEC> gs[S], ls[S], hp[S];  // hp[r] = h[t - 1], the state before step t
#pragma unroll
  for (int r = 0; r < S; ++r) {
    const int64_t t = t_end - 1 - r;
    if (active && t >= 0) {
      const int64_t off = (b * T_ + t) * C + c;
      gs[r] = load_packed<T, VEC>(grad_h + off);
      ls[r] = load_packed<T, VEC>(log_a_in + off);
      hp[r] = t > 0 ? load_packed<T, VEC>(h_in + off - C) : zero_packed<T, VEC>();
    } else {
      gs[r] = zero_packed<T, VEC>();
      ls[r] = zero_packed<T, VEC>();
      hp[r] = zero_packed<T, VEC>();
    }
  }
  const LaneChunk lc{chunk, num_chunks, b * C + c0, static_cast<int>(C - c0 < L::kW ? C - c0 : L::kW),
                     static_cast<const float*>(p.grad_h_last)};
  const unsigned probe = early_probe<L::kWindow>(st, lc);
  const bool holds_t0 = active && t_end > 0 && t_end - S <= 0;

  float a[VEC], xm[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) a[v] = 1.0f, xm[v] = 0.0f;
#pragma unroll
  for (int r = 0; r < S; ++r) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) {
      const float as = __expf(element(ls[r], v));
      xm[v] = as * (xm[v] + element(gs[r], v));
      a[v] *= as;
    }
  }
  float carry[VEC];
  chunk_scan<VEC, L::kChannelThreads>(a, xm, carry, st, lc, probe, sh);
#pragma unroll
  for (int r = 0; r < S; ++r) hide_from_optimiser(gs[r]), hide_from_optimiser(ls[r]);

  float h0[VEC];  // the state before step 0, for the thread that holds it
#pragma unroll
  for (int v = 0; v < VEC; ++v) h0[v] = holds_t0 && p.h0 != nullptr ? static_cast<const float*>(p.h0)[b * C + c + v] : 0.0f;
#pragma unroll
  for (int r = 0; r < S; ++r) {
    const int64_t t = t_end - 1 - r;
    if (active && t >= 0) {
      float gx[VEC], gla[VEC];
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        const float as = __expf(element(ls[r], v));
        gx[v] = element(gs[r], v) + carry[v];
        const float h_prev = t > 0 ? element(hp[r], v) : h0[v];
        gla[v] = gx[v] * as * h_prev;
        carry[v] = as * gx[v];
      }
      const int64_t off = (b * T_ + t) * C + c;
      store_packed<T, VEC>(grad_x + off, pack<T, VEC>(gx));
      store_packed<T, VEC>(grad_log_a + off, pack<T, VEC>(gla));
    }
  }
  // After step 0 the carry is a[0] g[0], the gradient of h0.
  if (holds_t0) {
    float* grad_h0 = static_cast<float*>(p.grad_h0) + b * C + c;
#pragma unroll
    for (int v = 0; v < VEC; ++v) grad_h0[v] = carry[v];
  }
}

// --------------------------------------------------------------------- host

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct ScanPlan {
  int64_t lanes_per_row, num_chunks, blocks;
  size_t workspace_bytes;
};

template <int VEC, int S>
ScanPlan make_plan(int64_t B, int64_t T, int64_t C) {
  using L = ChunkLayout<VEC, S>;
  ScanPlan plan{};
  plan.lanes_per_row = ceil_div(C, L::kW);
  plan.num_chunks = ceil_div(T, L::kSteps);
  plan.blocks = B * plan.lanes_per_row * plan.num_chunks;
  // The last chunk publishes nothing; one chunk needs no states at all.
  plan.workspace_bytes = plan.num_chunks > 1 ? static_cast<size_t>(plan.num_chunks - 1) * B * C *
                                                   (sizeof(unsigned long long) + sizeof(unsigned))
                                             : 0;
  return plan;
}

ChunkStatus status_in(void* workspace, const ScanPlan& plan, int64_t B, int64_t C) {
  ChunkStatus st{};
  st.stride = B * C;
  st.map = static_cast<unsigned long long*>(workspace);
  st.end = plan.workspace_bytes > 0 ? reinterpret_cast<unsigned*>(st.map + (plan.num_chunks - 1) * st.stride)
                                    : nullptr;
  return st;
}

// 16-byte accesses need C to be a whole number of vectors and every (B, T, C) tensor
// 16-byte aligned (a contiguous tensor at a storage offset may not be).
template <typename T>
bool fwd_vectorised(const GatedScanParams& p) {
  return p.channels % kVec16<T> == 0 && is_aligned16(p.x) && is_aligned16(p.log_a) && is_aligned16(p.h);
}

template <typename T>
bool bwd_vectorised(const GatedScanBwdParams& p) {
  return p.channels % kVec16<T> == 0 && is_aligned16(p.grad_h) && is_aligned16(p.log_a) && is_aligned16(p.h) &&
         is_aligned16(p.grad_x) && is_aligned16(p.grad_log_a);
}

template <typename T>
ScanPlan fwd_plan(const GatedScanParams& p) {
  constexpr int V = kVec16<T>;
  return fwd_vectorised<T>(p) ? make_plan<V, fwd_steps(V)>(p.batch, p.seqlen, p.channels)
                              : make_plan<1, fwd_steps(1)>(p.batch, p.seqlen, p.channels);
}

template <typename T>
ScanPlan bwd_plan(const GatedScanBwdParams& p) {
  constexpr int V = kVec16<T>;
  return bwd_vectorised<T>(p) ? make_plan<V, bwd_steps(V)>(p.batch, p.seqlen, p.channels)
                              : make_plan<1, bwd_steps(1)>(p.batch, p.seqlen, p.channels);
}

void prepare_launch(const ScanPlan& plan, void* workspace, cudaStream_t stream) {
  if (plan.blocks > INT32_MAX) throw std::invalid_argument("gated_scan: too many blocks for one launch");
  if (plan.workspace_bytes == 0) return;
  if (workspace == nullptr) throw std::invalid_argument("gated_scan: the CUDA kernels need a workspace");
  // All ones = "not published yet" (see ChunkStatus).
  CRAM_CUDA_CHECK(cudaMemsetAsync(workspace, 0xff, plan.workspace_bytes, stream));
}

template <typename T, int VEC>
void launch_fwd(const GatedScanParams& p, cudaStream_t stream) {
  constexpr int S = fwd_steps(VEC);
  const ScanPlan plan = make_plan<VEC, S>(p.batch, p.seqlen, p.channels);
  prepare_launch(plan, p.workspace, stream);
  gated_scan_fwd_kernel<T, VEC, S><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(
      p, status_in(p.workspace, plan, p.batch, p.channels), plan.lanes_per_row, plan.num_chunks);
  CRAM_CUDA_CHECK(cudaGetLastError());
}

template <typename T, int VEC>
void launch_bwd(const GatedScanBwdParams& p, cudaStream_t stream) {
  constexpr int S = bwd_steps(VEC);
  const ScanPlan plan = make_plan<VEC, S>(p.batch, p.seqlen, p.channels);
  prepare_launch(plan, p.workspace, stream);
  gated_scan_bwd_kernel<T, VEC, S><<<static_cast<unsigned>(plan.blocks), kThreads, 0, stream>>>(
      p, status_in(p.workspace, plan, p.batch, p.channels), plan.lanes_per_row, plan.num_chunks);
  CRAM_CUDA_CHECK(cudaGetLastError());
}

// dst = src, or zeros when src is null: the state when there are no steps (T = 0).
void copy_state(void* dst, const void* src, int64_t n, cudaStream_t stream) {
  const size_t bytes = static_cast<size_t>(n) * sizeof(float);
  if (src != nullptr) {
    CRAM_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream));
  } else {
    CRAM_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, stream));
  }
}

}  // namespace

size_t gated_scan_fwd_workspace_bytes(const GatedScanParams& p) {
  size_t bytes = 0;
  dispatch_cuda_element_type(p.dtype, [&](auto tag) { bytes = fwd_plan<decltype(tag)>(p).workspace_bytes; });
  return bytes;
}

size_t gated_scan_bwd_workspace_bytes(const GatedScanBwdParams& p) {
  size_t bytes = 0;
  dispatch_cuda_element_type(p.dtype, [&](auto tag) { bytes = bwd_plan<decltype(tag)>(p).workspace_bytes; });
  return bytes;
}

void gated_scan_fwd_cuda(const GatedScanParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch == 0 || p.channels == 0) return;
  if (p.seqlen == 0) return copy_state(p.h_last, p.h0, p.batch * p.channels, stream);
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (fwd_vectorised<T>(p)) {
      launch_fwd<T, kVec16<T>>(p, stream);
    } else {
      launch_fwd<T, 1>(p, stream);
    }
  });
}

void gated_scan_bwd_cuda(const GatedScanBwdParams& p, void* stream_ptr) {
  const cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.batch == 0 || p.channels == 0) return;
  if (p.seqlen == 0) return copy_state(p.grad_h0, p.grad_h_last, p.batch * p.channels, stream);
  dispatch_cuda_element_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (bwd_vectorised<T>(p)) {
      launch_bwd<T, kVec16<T>>(p, stream);
    } else {
      launch_bwd<T, 1>(p, stream);
    }
  });
}

}  // namespace cram
