// Torch-facing launcher of the gated scan: argument checks, output allocation,
// and the choice of CPU or CUDA kernel. Registered for both backends.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "gated_scan/gated_scan.h"

namespace cram {
namespace {

void check_scan_input(const at::Tensor& t, const char* name) {
  check_supported_device(t, name);
  check_dim(t, name, 3, "(B, T, C)");
  if (t.is_cuda()) {
    check_dtype(t, name, {at::kFloat, at::kHalf, at::kBFloat16});
  } else {
    check_dtype(t, name, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
}

void check_state(const at::Tensor& t, const char* name, const at::Tensor& x) {
  check_same_device(t, name, x, "x");
  check_shape(t, name, {x.size(0), x.size(2)});
  check_dtype(t, name, {accumulate_dtype(x.scalar_type())});
}

std::tuple<at::Tensor, at::Tensor> gated_scan(const at::Tensor& x_in, const at::Tensor& log_a_in,
                                              const std::optional<at::Tensor>& h0_in) {
  check_scan_input(x_in, "x");
  check_same_device(log_a_in, "log_a", x_in, "x");
  check_same_dtype(log_a_in, "log_a", x_in, "x");
  check_shape(log_a_in, "log_a", x_in.sizes());
  if (h0_in.has_value()) check_state(*h0_in, "h0", x_in);

  c10::OptionalDeviceGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), log_a = log_a_in.contiguous();
  const std::optional<at::Tensor> h0 = h0_in.has_value() ? std::optional(h0_in->contiguous()) : std::nullopt;
  at::Tensor h = at::empty_like(x);
  at::Tensor h_last = at::empty({x.size(0), x.size(2)}, x.options().dtype(accumulate_dtype(x.scalar_type())));

  GatedScanParams p{};
  p.batch = x.size(0);
  p.seqlen = x.size(1);
  p.channels = x.size(2);
  p.dtype = element_type_of(x);
  p.x = x.data_ptr();
  p.log_a = log_a.data_ptr();
  p.h0 = h0.has_value() ? h0->data_ptr() : nullptr;
  p.h = h.data_ptr();
  p.h_last = h_last.data_ptr();
  if (x.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    // Scratch of the parallel scan (chunk states), from the caching allocator: no
    // sync, and graph-safe. Freed at scope exit, reused in stream order.
    const at::Tensor workspace = at::empty({static_cast<int64_t>(gated_scan_fwd_workspace_bytes(p))},
                                           x.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    gated_scan_fwd_cuda(p, cuda_stream_of(x));
#endif
  } else {
    gated_scan_fwd_cpu(p);
  }
  return {h, h_last};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_scan_backward(const at::Tensor& grad_h_in,
                                                                   const at::Tensor& grad_h_last_in,
                                                                   const at::Tensor& log_a_in, const at::Tensor& h_in,
                                                                   const std::optional<at::Tensor>& h0_in) {
  check_scan_input(h_in, "h");
  check_same_device(log_a_in, "log_a", h_in, "h");
  check_same_dtype(log_a_in, "log_a", h_in, "h");
  check_shape(log_a_in, "log_a", h_in.sizes());
  check_same_device(grad_h_in, "grad_h", h_in, "h");
  check_same_dtype(grad_h_in, "grad_h", h_in, "h");
  check_shape(grad_h_in, "grad_h", h_in.sizes());
  check_state(grad_h_last_in, "grad_h_last", h_in);
  if (h0_in.has_value()) check_state(*h0_in, "h0", h_in);

  c10::OptionalDeviceGuard guard(h_in.device());
  const at::Tensor grad_h = grad_h_in.contiguous(), grad_h_last = grad_h_last_in.contiguous();
  const at::Tensor log_a = log_a_in.contiguous(), h = h_in.contiguous();
  const std::optional<at::Tensor> h0 = h0_in.has_value() ? std::optional(h0_in->contiguous()) : std::nullopt;
  at::Tensor grad_x = at::empty_like(h), grad_log_a = at::empty_like(h), grad_h0 = at::empty_like(grad_h_last);

  GatedScanBwdParams p{};
  p.batch = h.size(0);
  p.seqlen = h.size(1);
  p.channels = h.size(2);
  p.dtype = element_type_of(h);
  p.grad_h = grad_h.data_ptr();
  p.grad_h_last = grad_h_last.data_ptr();
  p.log_a = log_a.data_ptr();
  p.h = h.data_ptr();
  p.h0 = h0.has_value() ? h0->data_ptr() : nullptr;
  p.grad_x = grad_x.data_ptr();
  p.grad_log_a = grad_log_a.data_ptr();
  p.grad_h0 = grad_h0.data_ptr();
  if (h.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    const at::Tensor workspace = at::empty({static_cast<int64_t>(gated_scan_bwd_workspace_bytes(p))},
                                           h.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    gated_scan_bwd_cuda(p, cuda_stream_of(h));
#endif
  } else {
    gated_scan_bwd_cpu(p);
  }
  return {grad_x, grad_log_a, grad_h0};
}

}  // namespace

TORCH_LIBRARY_IMPL(cram, CPU, m) {
  m.impl("gated_scan", &gated_scan);
  m.impl("gated_scan_backward", &gated_scan_backward);
}

#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram, CUDA, m) {
  m.impl("gated_scan", &gated_scan);
  m.impl("gated_scan_backward", &gated_scan_backward);
}
#endif

}  // namespace cram
