// Torch-facing launcher of routed attention: argument checks, output allocation,
// and the choice of kernel.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <limits>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "routed_attention/routed_attention.h"

namespace cram {
namespace {

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_supported_device(q, "q");
  check_dim(q, "q", 4, "(B, T, H, D)");
  check_dim(k, "k", 4, "(B, S, Hk, D)");
  check_dim(v, "v", 4, "(B, S, Hk, D)");
  check_same_device(k, "k", q, "q");
  check_same_device(v, "v", q, "q");
  if (q.is_cuda()) {
    check_dtype(q, "q", {at::kHalf, at::kBFloat16});
  } else {
    check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), D = q.size(3), S = k.size(1), Hk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "k: expected shape (B=", B, ", S, Hk, D=", D, "), got ",
                    k.sizes());
  check_shape(v, "v", k.sizes());
  TORCH_CHECK_VALUE(Hk > 0 && H % Hk == 0, "k: the number of query heads H=", H,
                    " must be a multiple of the number of key/value heads Hk=", Hk);
  TORCH_CHECK_VALUE(S >= T, "k: expected S >= T (keys cover every query position), got S=", S, " < T=", T);
  TORCH_CHECK_VALUE(T <= INT32_MAX, "q: T must fit in int32, got ", T);
  if (q.is_cuda()) {
    TORCH_CHECK_VALUE(D == 64 || D == 128, "q: head dim D must be 64 or 128 on CUDA, got ", D);
  }
}

void check_route_tensors(const at::Tensor& index, const at::Tensor& counts, const at::Tensor& q) {
  check_same_device(index, "index", q, "q");
  check_same_device(counts, "counts", q, "q");
  check_dtype(index, "index", {at::kInt});
  check_dtype(counts, "counts", {at::kInt});
  check_shape(index, "index", {q.size(0), q.size(1)});
  check_shape(counts, "counts", {q.size(0)});
}

// The CPU path computes in the accumulation type; reduced precision is upcast once here.
at::Tensor cpu_compute(const at::Tensor& t) { return t.to(accumulate_dtype(t.scalar_type())).contiguous(); }

std::tuple<at::Tensor, at::Tensor> routed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& index, const at::Tensor& counts,
                                                    double softmax_scale) {
  check_qkv(q, k, v);
  check_route_tensors(index, counts, q);
  c10::OptionalDeviceGuard guard(q.device());
  const at::ScalarType acc = accumulate_dtype(q.scalar_type());
  at::Tensor lse = at::full({q.size(0), q.size(2), q.size(1)}, -std::numeric_limits<double>::infinity(),
                            q.options().dtype(acc));
  at::Tensor out = at::zeros(q.sizes(), q.options().dtype(acc));
  routed_attention_fwd_cpu(cpu_compute(q), cpu_compute(k), cpu_compute(v), index.contiguous(), counts.contiguous(),
                           softmax_scale, out, lse);
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& index, const at::Tensor& counts, double softmax_scale) {
  check_qkv(q, k, v);
  check_route_tensors(index, counts, q);
  for (const auto& [t, name] : {std::pair{&grad_out, "grad_out"}, std::pair{&out, "out"}}) {
    check_same_device(*t, name, q, "q");
    check_same_dtype(*t, name, q, "q");
    check_shape(*t, name, q.sizes());
  }
  check_same_device(lse, "lse", q, "q");
  check_dtype(lse, "lse", {accumulate_dtype(q.scalar_type())});
  check_shape(lse, "lse", {q.size(0), q.size(2), q.size(1)});

  c10::OptionalDeviceGuard guard(q.device());
  const at::Tensor qc = cpu_compute(q), kc = cpu_compute(k), vc = cpu_compute(v);
  at::Tensor grad_q = at::zeros_like(qc), grad_k = at::zeros_like(kc), grad_v = at::zeros_like(vc);
  routed_attention_bwd_cpu(cpu_compute(grad_out), qc, kc, vc, cpu_compute(out), lse.contiguous(), index.contiguous(),
                           counts.contiguous(), softmax_scale, grad_q, grad_k, grad_v);
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(cram, CPU, m) {
  m.impl("routed_attention", &routed_attention);
  m.impl("routed_attention_backward", &routed_attention_backward);
}

}  // namespace cram
