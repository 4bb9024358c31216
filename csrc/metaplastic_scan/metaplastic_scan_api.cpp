// Torch-facing launcher of the metaplastic scan: argument checks, the accumulation-type
// copies of the small per-token / per-head inputs, output allocation, and the choice of
// CPU or CUDA kernel. Registered for both backends.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "metaplastic_scan/metaplastic_scan.h"

namespace cram {
namespace {

struct Dims {
  int64_t B, T, H, dk, dv;
};

// q, k (B, T, H, d_k); v, b (B, T, H, d_v) (T absent for a step); log_alpha (B, T, H);
// prior (H,). Returns the sizes.
Dims check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& b,
                  const at::Tensor& log_alpha, const at::Tensor& prior, bool step) {
  check_supported_device(q, "q");
  const int64_t dim = step ? 3 : 4;
  check_dim(q, "q", dim, step ? "(B, H, d_k)" : "(B, T, H, d_k)");
  check_dim(v, "v", dim, step ? "(B, H, d_v)" : "(B, T, H, d_v)");
  if (q.is_cuda()) {
    check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16});
  } else {
    check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}, std::pair{&b, "b"},
                                std::pair{&log_alpha, "log_alpha"}, std::pair{&prior, "prior"}}) {
    check_same_device(*t, name, q, "q");
  }
  check_same_dtype(k, "k", q, "q");
  check_same_dtype(v, "v", q, "q");
  check_same_dtype(b, "b", q, "q");
  check_shape(k, "k", q.sizes());
  const Dims d{q.size(0), step ? 1 : q.size(1), q.size(dim - 2), q.size(dim - 1), v.size(dim - 1)};
  const std::vector<int64_t> v_lead(q.sizes().begin(), q.sizes().end() - 1), v_has(v.sizes().begin(), v.sizes().end() - 1);
  TORCH_CHECK_VALUE(v_lead == v_has, "v: expected shape ", at::IntArrayRef(v_lead), " + (d_v,) like q's ",
                    q.sizes(), ", got ", v.sizes());
  // After v's own check: b is compared with v, so a wrong v must not be reported as a wrong b.
  check_shape(b, "b", v.sizes());
  check_dtype(log_alpha, "log_alpha", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_shape(log_alpha, "log_alpha", at::IntArrayRef(v_lead));
  check_dtype(prior, "prior", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_shape(prior, "prior", {d.H});
  TORCH_CHECK_VALUE(d.dk >= 1 && d.dv >= 1, "q, v: expected head dims d_k, d_v >= 1, got d_k=", d.dk, ", d_v=", d.dv);
  if (q.is_cuda()) {
    TORCH_CHECK_VALUE(d.dk <= kMetaplasticCudaMaxHeadDim, "q: d_k must be at most ", kMetaplasticCudaMaxHeadDim, " on CUDA, got ", d.dk);
    TORCH_CHECK_VALUE(d.dv <= kMetaplasticCudaMaxHeadDim, "v: d_v must be at most ", kMetaplasticCudaMaxHeadDim, " on CUDA, got ", d.dv);
    // A block per (batch, head, slice of at most 128 value rows), in one grid dimension.
    TORCH_CHECK_VALUE(d.B * d.H <= (INT32_MAX >> 7) && d.T <= INT32_MAX,
                      "q: B*H must be at most 2**24 and T fit in int32 on CUDA, got ", q.sizes());
  }
  return d;
}

void check_state(const std::optional<at::Tensor>& t, const char* name, const at::Tensor& q, const Dims& d) {
  if (!t.has_value()) return;
  check_same_device(*t, name, q, "q");
  check_shape(*t, name, {d.B, d.H, d.dv, d.dk});
  check_dtype(*t, name, {accumulate_dtype(q.scalar_type())});
}

at::Tensor as_accumulate(const at::Tensor& t, const at::Tensor& q) {
  return t.to(accumulate_dtype(q.scalar_type())).contiguous();
}

std::optional<at::Tensor> contiguous(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional(t->contiguous()) : std::nullopt;
}

const void* data_or_null(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr() : nullptr; }

// The per-token inputs and the prior as the kernels read them: contiguous, log_alpha and the
// prior in the accumulation type. Shared by the scan, its backward and the step.
struct Inputs {
  at::Tensor q, k, v, b, log_alpha, prior;

  Inputs(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& b_in,
         const at::Tensor& log_alpha_in, const at::Tensor& prior_in)
      : q(q_in.contiguous()),
        k(k_in.contiguous()),
        v(v_in.contiguous()),
        b(b_in.contiguous()),
        log_alpha(as_accumulate(log_alpha_in, q)),
        prior(as_accumulate(prior_in, q)) {}

  // The shape and these pointers of a MetaplasticParams, MetaplasticBwdParams or MetaplasticStepParams.
  template <typename Params>
  void fill(Params& p, const Dims& d, double scale) const {
    p.batch = d.B;
    p.seqlen = d.T;
    p.heads = d.H;
    p.key_dim = d.dk;
    p.value_dim = d.dv;
    p.dtype = element_type_of(q);
    p.scale = scale;
    p.q = q.data_ptr();
    p.k = k.data_ptr();
    p.v = v.data_ptr();
    p.b = b.data_ptr();
    p.log_alpha = log_alpha.data_ptr();
    p.prior = prior.data_ptr();
  }
};

at::Tensor cuda_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> metaplastic_scan(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const at::Tensor& b_in,
    const at::Tensor& log_alpha_in, const at::Tensor& prior_in, const std::optional<at::Tensor>& M0_in,
    const std::optional<at::Tensor>& Ibar0_in, double scale) {
  const Dims d = check_inputs(q_in, k_in, v_in, b_in, log_alpha_in, prior_in, false);
  check_state(M0_in, "M0", q_in, d);
  check_state(Ibar0_in, "Ibar0", q_in, d);

  c10::OptionalDeviceGuard guard(q_in.device());
  const Inputs in(q_in, k_in, v_in, b_in, log_alpha_in, prior_in);
  const at::Tensor& q = in.q;
  const auto M0 = contiguous(M0_in), Ibar0 = contiguous(Ibar0_in);
  const auto acc = q.options().dtype(accumulate_dtype(q.scalar_type()));
  at::Tensor o = at::empty({d.B, d.T, d.H, d.dv}, q.options());
  at::Tensor M = at::empty({d.B, d.H, d.dv, d.dk}, acc), Ibar = at::empty({d.B, d.H, d.dv, d.dk}, acc);

  MetaplasticParams p{};
  in.fill(p, d, scale);
  p.M0 = data_or_null(M0);
  p.Ibar0 = data_or_null(Ibar0);
  p.o = o.data_ptr();
  p.M = M.data_ptr();
  p.Ibar = Ibar.data_ptr();
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    const at::Tensor workspace = cuda_workspace(metaplastic_scan_fwd_workspace_bytes(p), q);
    p.workspace = workspace.data_ptr();
    metaplastic_scan_fwd_cuda(p, cuda_stream_of(q));
#endif
  } else {
    metaplastic_scan_fwd_cpu(p);
  }
  return {o, M, Ibar};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
metaplastic_scan_backward(const at::Tensor& grad_o_in, const at::Tensor& grad_M_in, const at::Tensor& grad_Ibar_in,
                          const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                          const at::Tensor& b_in, const at::Tensor& log_alpha_in, const at::Tensor& prior_in,
                          const std::optional<at::Tensor>& M0_in, const std::optional<at::Tensor>& Ibar0_in,
                          double scale) {
  const Dims d = check_inputs(q_in, k_in, v_in, b_in, log_alpha_in, prior_in, false);
  check_state(M0_in, "M0", q_in, d);
  check_state(Ibar0_in, "Ibar0", q_in, d);
  check_same_device(grad_o_in, "grad_o", q_in, "q");
  check_same_dtype(grad_o_in, "grad_o", q_in, "q");
  check_shape(grad_o_in, "grad_o", v_in.sizes());
  check_state(grad_M_in, "grad_M", q_in, d);
  check_state(grad_Ibar_in, "grad_Ibar", q_in, d);

  c10::OptionalDeviceGuard guard(q_in.device());
  const Inputs in(q_in, k_in, v_in, b_in, log_alpha_in, prior_in);
  const at::Tensor& q = in.q;
  const at::Tensor grad_o = grad_o_in.contiguous(), grad_M = grad_M_in.contiguous(),
                   grad_Ibar = grad_Ibar_in.contiguous();
  const auto M0 = contiguous(M0_in), Ibar0 = contiguous(Ibar0_in);
  at::Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(in.k), grad_v = at::empty_like(in.v),
             grad_b = at::empty_like(in.b), grad_log_alpha = at::empty_like(in.log_alpha),
             grad_prior = at::empty_like(in.prior), grad_M0 = at::empty_like(grad_M),
             grad_Ibar0 = at::empty_like(grad_M);

  MetaplasticBwdParams p{};
  in.fill(p, d, scale);
  p.grad_o = grad_o.data_ptr();
  p.grad_M = grad_M.data_ptr();
  p.grad_Ibar = grad_Ibar.data_ptr();
  p.M0 = data_or_null(M0);
  p.Ibar0 = data_or_null(Ibar0);
  p.grad_q = grad_q.data_ptr();
  p.grad_k = grad_k.data_ptr();
  p.grad_v = grad_v.data_ptr();
  p.grad_b = grad_b.data_ptr();
  p.grad_log_alpha = grad_log_alpha.data_ptr();
  p.grad_prior = grad_prior.data_ptr();
  p.grad_M0 = grad_M0.data_ptr();
  p.grad_Ibar0 = grad_Ibar0.data_ptr();
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    const at::Tensor workspace = cuda_workspace(metaplastic_scan_bwd_workspace_bytes(p), q);
    p.workspace = workspace.data_ptr();
    metaplastic_scan_bwd_cuda(p, cuda_stream_of(q));
#endif
  } else {
    metaplastic_scan_bwd_cpu(p);
  }
  // log_alpha and prior were read in the accumulation type; their gradients go back in the
  // dtypes they came in.
  return {grad_q,
          grad_k,
          grad_v,
          grad_b,
          grad_log_alpha.to(log_alpha_in.scalar_type()),
          grad_prior.to(prior_in.scalar_type()),
          grad_M0,
          grad_Ibar0};
}

// One decoding token; M and Ibar are updated in place, so they must be the contiguous
// accumulation-type tensors a cache holds (no silent copy that the update would miss).
at::Tensor metaplastic_step(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                            const at::Tensor& b_in, const at::Tensor& log_alpha_in, const at::Tensor& prior_in,
                            at::Tensor& M, at::Tensor& Ibar, double scale) {
  const Dims d = check_inputs(q_in, k_in, v_in, b_in, log_alpha_in, prior_in, true);
  check_state(M, "M", q_in, d);
  check_state(Ibar, "Ibar", q_in, d);
  TORCH_CHECK_VALUE(M.is_contiguous() && Ibar.is_contiguous(),
                    "M, Ibar: the state is updated in place and must be contiguous");

  c10::OptionalDeviceGuard guard(q_in.device());
  const Inputs in(q_in, k_in, v_in, b_in, log_alpha_in, prior_in);
  const at::Tensor& q = in.q;
  at::Tensor o = at::empty({d.B, d.H, d.dv}, q.options());

  MetaplasticStepParams p{};
  in.fill(p, d, scale);
  p.M = M.data_ptr();
  p.Ibar = Ibar.data_ptr();
  p.o = o.data_ptr();
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    metaplastic_step_cuda(p, cuda_stream_of(q));
#endif
  } else {
    metaplastic_step_cpu(p);
  }
  return o;
}

}  // namespace

TORCH_LIBRARY_IMPL(cram, CPU, m) {
  m.impl("metaplastic_scan", &metaplastic_scan);
  m.impl("metaplastic_scan_backward", &metaplastic_scan_backward);
  m.impl("metaplastic_step", &metaplastic_step);
}

#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram, CUDA, m) {
  m.impl("metaplastic_scan", &metaplastic_scan);
  m.impl("metaplastic_scan_backward", &metaplastic_scan_backward);
  m.impl("metaplastic_step", &metaplastic_step);
}
#endif

}  // namespace cram
