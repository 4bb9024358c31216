// Metaplastic working memory (docs/metaplastic.md): per batch row b and head h, two
// d_v x d_k states scanned with one scalar decay a_t = exp(log_alpha_t) per token,
//   M_t    = a_t M_{t-1}    + v_t k_t^T
//   Ibar_t = a_t Ibar_{t-1} + b_t (k_t * k_t)^T
//   o_t    = scale * (M_t / (Ibar_t + prior_h)) q_t
// The interface between the launcher (metaplastic_scan_api.cpp) and the CPU / CUDA
// kernels; nothing here depends on torch.
//
// Layout: q, k (B, T, H, d_k); v, b, o (B, T, H, d_v), contiguous, element type `dtype`.
// log_alpha (B, T, H), prior (H,), the states (B, H, d_v, d_k) (row = value channel) and
// every gradient of them are in the accumulation type (float32, or float64 for float64).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/element_type.h"

namespace cram {

// The CUDA kernels' limit on d_k and d_v: the launcher checks it, the kernels' dispatch relies on it.
constexpr int64_t kMetaplasticCudaMaxHeadDim = 128;

struct MetaplasticShape {
  int64_t batch, seqlen, heads, key_dim, value_dim;
  ElementType dtype;
  double scale;
};

struct MetaplasticParams : MetaplasticShape {
  const void* q;
  const void* k;
  const void* v;
  const void* b;
  const void* log_alpha;  // (B, T, H) accumulation type
  const void* prior;      // (H,) accumulation type
  const void* M0;         // (B, H, d_v, d_k) accumulation type, or nullptr for zeros
  const void* Ibar0;      // likewise
  void* o;                // (B, T, H, d_v) out
  void* M;                // (B, H, d_v, d_k) out: the final state
  void* Ibar;             // likewise
  void* workspace;        // CUDA only: metaplastic_scan_fwd_workspace_bytes(*this) bytes
};

// The backward recomputes the states from the inputs (the forward saves nothing but its
// inputs), then runs the adjoint recurrence of docs/metaplastic.md §3 in reverse.
struct MetaplasticBwdParams : MetaplasticShape {
  const void* grad_o;        // (B, T, H, d_v)
  const void* grad_M;        // (B, H, d_v, d_k) accumulation type: gradient of the final state
  const void* grad_Ibar;     // likewise
  const void* q;
  const void* k;
  const void* v;
  const void* b;
  const void* log_alpha;
  const void* prior;
  const void* M0;            // or nullptr
  const void* Ibar0;         // or nullptr
  void* grad_q;              // (B, T, H, d_k) out, element type
  void* grad_k;
  void* grad_v;              // (B, T, H, d_v) out, element type
  void* grad_b;
  void* grad_log_alpha;      // (B, T, H) out, accumulation type
  void* grad_prior;          // (H,) out, accumulation type
  void* grad_M0;             // (B, H, d_v, d_k) out, accumulation type
  void* grad_Ibar0;
  void* workspace;           // CUDA only: metaplastic_scan_bwd_workspace_bytes(*this) bytes
};

// One decoding token: q, k (B, H, d_k), v, b, o (B, H, d_v), log_alpha (B, H); the state
// (M, Ibar) is read and updated in place.
struct MetaplasticStepParams : MetaplasticShape {  // seqlen unused (1)
  const void* q;
  const void* k;
  const void* v;
  const void* b;
  const void* log_alpha;
  const void* prior;
  void* M;
  void* Ibar;
  void* o;
};

void metaplastic_scan_fwd_cpu(const MetaplasticParams& p);
void metaplastic_scan_bwd_cpu(const MetaplasticBwdParams& p);
void metaplastic_step_cpu(const MetaplasticStepParams& p);

#ifdef CRAM_WITH_CUDA
// Scratch of the CUDA kernels (chunk states); depends on the shape only. Any allocation
// will do: the kernels initialise what they read.
size_t metaplastic_scan_fwd_workspace_bytes(const MetaplasticShape& p);
size_t metaplastic_scan_bwd_workspace_bytes(const MetaplasticShape& p);
void metaplastic_scan_fwd_cuda(const MetaplasticParams& p, void* stream);
void metaplastic_scan_bwd_cuda(const MetaplasticBwdParams& p, void* stream);
void metaplastic_step_cuda(const MetaplasticStepParams& p, void* stream);
#endif

}  // namespace cram
