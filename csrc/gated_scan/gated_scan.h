// Gated linear scan h[t] = exp(log_a[t]) * h[t-1] + x[t], per channel, over (B, T, C)
// row-major tensors. The interface between the launcher (gated_scan_api.cpp) and the
// CPU / CUDA kernels; nothing here depends on torch.
//
// Element pointers have the input's element type; h0, h_last and their gradients
// have the accumulation type (float32, or float64 for float64 inputs).
#pragma once

#include <cstddef>
#include <cstdint>

#include "common/element_type.h"

namespace cram {

struct GatedScanParams {
  int64_t batch, seqlen, channels;
  ElementType dtype;
  const void* x;      // (B, T, C)
  const void* log_a;  // (B, T, C)
  const void* h0;     // (B, C) accumulation type, or nullptr for zeros
  void* h;            // (B, T, C) out
  void* h_last;       // (B, C) accumulation type, out
  void* workspace;    // CUDA only: gated_scan_fwd_workspace_bytes(*this) bytes of scratch, or nullptr if 0
};

// Reverse scan: g[t] = grad_h[t] + a[t+1] g[t+1] (g[T-1] also gets grad_h_last),
// grad_x = g, grad_log_a[t] = g[t] a[t] h[t-1], grad_h0 = a[0] g[0].
struct GatedScanBwdParams {
  int64_t batch, seqlen, channels;
  ElementType dtype;
  const void* grad_h;       // (B, T, C)
  const void* grad_h_last;  // (B, C) accumulation type
  const void* log_a;        // (B, T, C)
  const void* h;            // (B, T, C): the forward's output, h[t-1] for grad_log_a
  const void* h0;           // (B, C) accumulation type, or nullptr for zeros
  void* grad_x;             // (B, T, C) out
  void* grad_log_a;         // (B, T, C) out
  void* grad_h0;            // (B, C) accumulation type, out
  void* workspace;          // CUDA only: gated_scan_bwd_workspace_bytes(*this) bytes of scratch, or nullptr if 0
};

void gated_scan_fwd_cpu(const GatedScanParams& p);
void gated_scan_bwd_cpu(const GatedScanBwdParams& p);

#ifdef CRAM_WITH_CUDA
// Scratch the CUDA kernels need (the chunk states of the parallel scan); depends on
// the shape, dtype and pointer alignment, so call it with every other field set.
// The kernels initialise it themselves (on the stream, no sync): any allocation will do.
size_t gated_scan_fwd_workspace_bytes(const GatedScanParams& p);
size_t gated_scan_bwd_workspace_bytes(const GatedScanBwdParams& p);
void gated_scan_fwd_cuda(const GatedScanParams& p, void* stream);
void gated_scan_bwd_cuda(const GatedScanBwdParams& p, void* stream);
#endif

}  // namespace cram
