// Causal attention for routed queries only: for each batch row b and each of its
// counts[b] routed positions t = index[b, i], every head attends to keys
// j <= t + (S - T) (bottom-right aligned); other rows get out = 0, lse = -inf.
// q: (B, T, H, D); k, v: (B, S, Hk, D) with H % Hk == 0; lse: (B, H, T).
// Interface between the launcher (routed_attention_api.cpp) and the kernels.
#pragma once

#include <ATen/ATen.h>

#include <string>

namespace cram {

// Out-of-range entries of index (t < 0 or t >= T) are skipped and counts is
// clamped to [0, T], so a malformed routing can give a wrong answer but never an
// out-of-bounds access. out and lse must arrive filled with 0 and -inf.
void routed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& index,
                              const at::Tensor& counts, double scale, at::Tensor& out, at::Tensor& lse);

// grad_q, grad_k and grad_v must arrive zero-filled: rows that were not routed, and
// keys that no routed query sees, get no gradient.
void routed_attention_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                              const at::Tensor& index, const at::Tensor& counts, double scale, at::Tensor& grad_q,
                              at::Tensor& grad_k, at::Tensor& grad_v);

// The kernel the forward (which = "forward") or the backward's dK/dV ("backward") runs for
// this head dim on `device`, as things stand (the build, the device, the
// CRAM_ROUTED_ATTENTION_SM80 switch): "sm90a", "sm80" or "cpu".
std::string routed_attention_kernel(c10::Device device, int64_t head_dim, c10::string_view which);

}  // namespace cram
