// Torch-facing launcher of the router: argument checks, output allocation,
// and the choice of CPU or CUDA kernel. Registered for both backends.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "route/route.h"

#ifdef CRAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace cram {
namespace {

void check_hidden(const at::Tensor& hidden) {
  check_supported_device(hidden, "hidden");
  check_dim(hidden, "hidden", 3, "(B, T, C)");
  if (hidden.is_cuda()) {
    check_dtype(hidden, "hidden", {at::kFloat, at::kHalf, at::kBFloat16});
  } else {
    check_dtype(hidden, "hidden", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
}

void check_weight(const at::Tensor& weight, const at::Tensor& hidden) {
  check_same_device(weight, "weight", hidden, "hidden");
  check_dtype(weight, "weight", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_shape(weight, "weight", {hidden.size(2)});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> route(const at::Tensor& hidden_in, const at::Tensor& weight,
                                                                 const at::Tensor& bias, double threshold,
                                                                 const std::optional<at::Tensor>& force) {
  check_hidden(hidden_in);
  check_weight(weight, hidden_in);
  check_same_device(bias, "bias", hidden_in, "hidden");
  check_dtype(bias, "bias", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dim(bias, "bias", 0, "(a scalar)");
  const int64_t B = hidden_in.size(0), T = hidden_in.size(1);
  TORCH_CHECK_VALUE(T <= INT32_MAX, "hidden: T must fit in int32 for index, got ", T);
  if (force.has_value()) {
    check_same_device(*force, "force", hidden_in, "hidden");
    check_dtype(*force, "force", {at::kBool});
    check_shape(*force, "force", {B, T});
  }

  c10::OptionalDeviceGuard guard(hidden_in.device());
  const at::ScalarType acc = accumulate_dtype(hidden_in.scalar_type());
  const at::Tensor hidden = hidden_in.contiguous();
  // The CUDA kernel reads weight and bias in float32 or in hidden's type as they are:
  // a conversion kernel would cost about as much as the router itself at small sizes.
  const auto kernel_dtype = [&](const at::Tensor& t) {
    const bool as_is = hidden.is_cuda() && (t.scalar_type() == at::kFloat || t.scalar_type() == hidden.scalar_type());
    return as_is ? t.scalar_type() : acc;
  };
  const at::Tensor weight_k = weight.to(kernel_dtype(weight)).contiguous(), bias_k = bias.to(kernel_dtype(bias));
  const std::optional<at::Tensor> force_c = force.has_value() ? std::optional(force->contiguous()) : std::nullopt;
  at::Tensor prob = at::empty({B, T}, hidden.options().dtype(acc));
  at::Tensor mask = at::empty({B, T}, hidden.options().dtype(at::kBool));
  at::Tensor index = at::empty({B, T}, hidden.options().dtype(at::kInt));
  at::Tensor counts = at::empty({B}, hidden.options().dtype(at::kInt));

  RouteParams p{};
  p.batch = B;
  p.seqlen = T;
  p.channels = hidden.size(2);
  p.dtype = element_type_of(hidden);
  p.weight_dtype = element_type_of(weight_k);
  p.bias_dtype = element_type_of(bias_k);
  p.threshold = threshold;
  p.hidden = hidden.data_ptr();
  p.weight = weight_k.data_ptr();
  p.bias = bias_k.data_ptr();
  p.force = force_c.has_value() ? force_c->data_ptr<bool>() : nullptr;
  p.prob = prob.data_ptr();
  p.mask = mask.data_ptr<bool>();
  p.index = index.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  if (hidden.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // Scratch of the kernels (routed counts per tile), from the caching allocator:
    // no sync, and graph-safe. Freed at scope exit, reused in stream order.
    const at::Tensor workspace = at::empty({static_cast<int64_t>(route_fwd_workspace_bytes(p))},
                                           hidden.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    route_fwd_cuda(p, cuda_stream_of(hidden));
#endif
  } else {
    route_fwd_cpu(p);
  }
  return {prob, mask, index, counts};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> route_backward(const at::Tensor& grad_prob_in, const at::Tensor& prob_in,
                                                              const at::Tensor& hidden_in, const at::Tensor& weight) {
  check_hidden(hidden_in);
  check_weight(weight, hidden_in);
  const at::ScalarType acc = accumulate_dtype(hidden_in.scalar_type());
  const at::IntArrayRef rows = hidden_in.sizes().slice(0, 2);
  for (const auto& [t, name] : {std::pair{&grad_prob_in, "grad_prob"}, std::pair{&prob_in, "prob"}}) {
    check_same_device(*t, name, hidden_in, "hidden");
    check_dtype(*t, name, {acc});
    check_shape(*t, name, rows);
  }

  c10::OptionalDeviceGuard guard(hidden_in.device());
  const at::Tensor hidden = hidden_in.contiguous(), grad_prob = grad_prob_in.contiguous(), prob = prob_in.contiguous();
  const at::Tensor weight_acc = weight.to(acc).contiguous();
  at::Tensor grad_hidden = at::empty_like(hidden);
  at::Tensor grad_weight = at::empty_like(weight_acc);
  at::Tensor grad_bias = at::empty({}, weight_acc.options());

  RouteBwdParams p{};
  p.batch = hidden.size(0);
  p.seqlen = hidden.size(1);
  p.channels = hidden.size(2);
  p.dtype = element_type_of(hidden);
  p.grad_prob = grad_prob.data_ptr();
  p.prob = prob.data_ptr();
  p.hidden = hidden.data_ptr();
  p.weight = weight_acc.data_ptr();
  p.grad_hidden = grad_hidden.data_ptr();
  p.grad_weight = grad_weight.data_ptr();
  p.grad_bias = grad_bias.data_ptr();
  if (hidden.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // Scratch of the kernels (partial sums of grad_weight / grad_bias).
    const at::Tensor workspace = at::empty({static_cast<int64_t>(route_bwd_workspace_bytes(p))},
                                           hidden.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    route_bwd_cuda(p, cuda_stream_of(hidden));
#endif
  } else {
    route_bwd_cpu(p);
  }
  return {grad_hidden, grad_weight.to(weight.scalar_type()), grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(cram, CPU, m) {
  m.impl("route", &route);
  m.impl("route_backward", &route_backward);
}

#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram, CUDA, m) {
  m.impl("route", &route);
  m.impl("route_backward", &route_backward);
}
#endif

}  // namespace cram
