// Torch-facing launcher of routed attention: argument checks, output allocation,
// and the choice of kernel.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "routed_attention/routed_attention.h"
#include "routed_attention/routed_attention_params.h"

#ifdef CRAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace cram {
namespace {

// (B, H, T, D) is the layout SDPA takes: a q in it gets that said before any other
// complaint (a wrong H, a wrong T in index) that would hide it.
void check_not_bhtd(const at::Tensor& q, const at::Tensor& index) {
  TORCH_CHECK_VALUE(q.dim() != 4 || index.dim() != 2 || index.size(1) == q.size(1) || index.size(1) != q.size(2),
                    "q: expected (B, T, H, D) with T=", index.size(1), " as index has, got ", q.sizes(),
                    ", which looks like (B, H, T, D): pass q.transpose(1, 2) (and k, v likewise)");
}

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

#ifdef CRAM_WITH_CUDA
// The CUDA kernels read (B, L, heads, D) tensors through strides with a unit stride along D
// and 16-byte aligned rows, and the sm_90a forward through TMA, which also needs a nonzero
// stride along every dimension it steps along (an expanded tensor has 0); anything else is
// copied into that form once here.
at::Tensor cuda_compute(const at::Tensor& t) {
  const auto aligned = [](const at::Tensor& x) {
    for (int i = 0; i < 3; ++i) {
      if (x.stride(i) % 8 != 0 || (x.stride(i) == 0 && x.size(i) > 1)) return false;
    }
    return x.stride(3) == 1 && reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0;
  };
  if (aligned(t)) return t;
  at::Tensor c = t.contiguous();
  return aligned(c) ? c : c.clone(at::MemoryFormat::Contiguous);
}

// Shapes, strides and pointers shared by the forward and the backward.
RoutedAttentionParams cuda_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const at::Tensor& index, const at::Tensor& counts, double softmax_scale) {
  TORCH_CHECK_VALUE(k.size(1) <= INT32_MAX && q.size(0) <= INT32_MAX && q.size(2) <= INT32_MAX,
                    "routed_attention: sizes must fit in int32 on CUDA, got q ", q.sizes(), " and k ", k.sizes());
  RoutedAttentionParams p;
  p.batch = static_cast<int>(q.size(0));
  p.seqlen_q = static_cast<int>(q.size(1));
  p.num_heads = static_cast<int>(q.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.seqlen_k = static_cast<int>(k.size(1));
  p.num_kv_heads = static_cast<int>(k.size(2));
  p.dtype = element_type_of(q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_row_stride = q.stride(1), p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.index = index.data_ptr<int32_t>();
  p.counts = counts.data_ptr<int32_t>();
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.scale_log2 = static_cast<float>(softmax_scale * 1.4426950408889634);
  p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return p;
}

// CRAM_ROUTED_ATTENTION_SM80=1 runs the SM80 kernels on Hopper too (to test and compare
// both there). Read at every call, so that a test can switch it.
bool forced_sm80() {
  const char* v = std::getenv("CRAM_ROUTED_ATTENTION_SM80");
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

// Whether the forward (forward = true) or the backward's dK/dV runs its sm_90a kernel on the
// current device for this head dim.
bool runs_sm90(int64_t head_dim, bool forward) {
  const int d = static_cast<int>(head_dim);
  const bool served = forward ? routed_attention_fwd_sm90_head_dim(d) : routed_attention_bwd_sm90_head_dim(d);
  return served && !forced_sm80() && routed_attention_sm90_supported();
}

// Scratch memory for a kernel, from torch's caching allocator (graph-safe, no sync).
void* cuda_workspace(size_t bytes, const at::Tensor& like, at::Tensor& holder) {
  if (bytes == 0) return nullptr;
  holder = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  return holder.data_ptr();
}

std::tuple<at::Tensor, at::Tensor> routed_attention_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                         const at::Tensor& v_in, const at::Tensor& index_in,
                                                         const at::Tensor& counts_in, double softmax_scale) {
  const at::Tensor q = cuda_compute(q_in), k = cuda_compute(k_in), v = cuda_compute(v_in);
  const at::Tensor index = index_in.contiguous(), counts = counts_in.contiguous();
  // Contiguous, and written whole by the kernels: 0 and -inf where not routed.
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  RoutedAttentionParams p = cuda_params(q, k, v, index, counts, softmax_scale);
  p.out = out.data_ptr();
  p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
  p.lse = lse.data_ptr<float>();
  p.fwd_sm90 = runs_sm90(p.head_dim, /*forward=*/true);
  at::Tensor workspace;
  p.workspace = cuda_workspace(routed_attention_fwd_workspace_bytes(p), q, workspace);
  routed_attention_fwd_cuda(p, cuda_stream_of(q));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> routed_attention_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& index_in, const at::Tensor& counts_in,
    double softmax_scale, bool deterministic) {
  const at::Tensor q = cuda_compute(q_in), k = cuda_compute(k_in), v = cuda_compute(v_in);
  const at::Tensor grad_out = cuda_compute(grad_out_in), out = cuda_compute(out_in);
  const at::Tensor lse = lse_in.contiguous();
  const at::Tensor index = index_in.contiguous(), counts = counts_in.contiguous();
  // Every row of the three is written (grad_q: zeros where not routed).
  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  RoutedAttentionParams p = cuda_params(q, k, v, index, counts, softmax_scale);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_batch_stride = out.stride(0), p.out_row_stride = out.stride(1), p.out_head_stride = out.stride(2);
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.grad_out = grad_out.data_ptr();
  p.do_batch_stride = grad_out.stride(0), p.do_row_stride = grad_out.stride(1), p.do_head_stride = grad_out.stride(2);
  p.grad_q = grad_q.data_ptr();
  p.dq_batch_stride = grad_q.stride(0), p.dq_row_stride = grad_q.stride(1), p.dq_head_stride = grad_q.stride(2);
  p.grad_k = grad_k.data_ptr();
  p.dk_batch_stride = grad_k.stride(0), p.dk_row_stride = grad_k.stride(1), p.dk_head_stride = grad_k.stride(2);
  p.grad_v = grad_v.data_ptr();
  p.dv_batch_stride = grad_v.stride(0), p.dv_row_stride = grad_v.stride(1), p.dv_head_stride = grad_v.stride(2);
  // The fused dQ sums with sm_90's bulk reductions; elsewhere the separate dQ kernel (the
  // deterministic path) is the only one there is.
  p.fused_dq = !deterministic && routed_attention_fused_dq_supported();
  p.bwd_sm90 = runs_sm90(p.head_dim, /*forward=*/false);
  at::Tensor workspace;
  p.workspace = cuda_workspace(routed_attention_bwd_workspace_bytes(p), q, workspace);
  routed_attention_bwd_cuda(p, cuda_stream_of(q));
  return {grad_q, grad_k, grad_v};
}
#endif

std::tuple<at::Tensor, at::Tensor> routed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const at::Tensor& index, const at::Tensor& counts,
                                                    double softmax_scale, bool /*deterministic: the forward always is*/) {
  check_not_bhtd(q, index);
  check_qkv(q, k, v);
  check_route_tensors(index, counts, q);
  c10::OptionalDeviceGuard guard(q.device());
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    return routed_attention_cuda(q, k, v, index, counts, softmax_scale);
#else
    TORCH_CHECK(false, "routed_attention: cram_ext was built without CUDA support");
#endif
  }
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
    const at::Tensor& lse, const at::Tensor& index, const at::Tensor& counts, double softmax_scale,
    bool deterministic) {
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
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    return routed_attention_backward_cuda(grad_out, q, k, v, out, lse, index, counts, softmax_scale, deterministic);
#else
    TORCH_CHECK(false, "routed_attention_backward: cram_ext was built without CUDA support");
#endif
  }
  const at::Tensor qc = cpu_compute(q), kc = cpu_compute(k), vc = cpu_compute(v);
  at::Tensor grad_q = at::zeros_like(qc), grad_k = at::zeros_like(kc), grad_v = at::zeros_like(vc);
  routed_attention_bwd_cpu(cpu_compute(grad_out), qc, kc, vc, cpu_compute(out), lse.contiguous(), index.contiguous(),
                           counts.contiguous(), softmax_scale, grad_q, grad_k, grad_v);
  return {grad_q.to(q.scalar_type()), grad_k.to(k.scalar_type()), grad_v.to(v.scalar_type())};
}

}  // namespace

std::string routed_attention_kernel(c10::Device device, int64_t head_dim, c10::string_view which) {
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "device: expected cpu or cuda, got ", device);
  TORCH_CHECK_VALUE(which == "forward" || which == "backward", "which: expected 'forward' or 'backward', got '",
                    which, "'");
  if (device.is_cpu()) return "cpu";
#ifdef CRAM_WITH_CUDA
  c10::OptionalDeviceGuard guard;  // "cuda" without an index: the current device
  if (device.has_index()) guard.reset_device(device);
  return runs_sm90(head_dim, which == "forward") ? "sm90a" : "sm80";
#else
  TORCH_CHECK(false, "routed_attention_kernel: cram_ext was built without CUDA support");
#endif
}

TORCH_LIBRARY_IMPL(cram, CPU, m) {
  m.impl("routed_attention", &routed_attention);
  m.impl("routed_attention_backward", &routed_attention_backward);
}

#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram, CUDA, m) {
  m.impl("routed_attention", &routed_attention);
  m.impl("routed_attention_backward", &routed_attention_backward);
}
#endif

}  // namespace cram
