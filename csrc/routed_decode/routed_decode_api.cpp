// Torch-facing launcher of routed decoding: argument checks, output allocation, the choice of
// kernel. Registered for CPU and CUDA.

#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/torch_utils.h"
#include "routed_decode/routed_decode.h"

#ifdef CRAM_WITH_CUDA
#include <ATen/cuda/CUDAContext.h>
#endif

namespace cram {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& seqlens,
                  const at::Tensor& routed) {
  check_supported_device(q, "q");
  check_dim(q, "q", 3, "(B, H, D): one query token per row");
  check_dim(k, "k_cache", 4, "(B, S, Hk, D)");
  check_dim(v, "v_cache", 4, "(B, S, Hk, D)");
  for (const auto& [t, name] : {std::pair{&k, "k_cache"}, std::pair{&v, "v_cache"}, std::pair{&seqlens, "seqlens"},
                                std::pair{&routed, "routed"}}) {
    check_same_device(*t, name, q, "q");
  }
  if (q.is_cuda()) {
    check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16});
  } else {
    check_dtype(q, "q", {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  }
  check_same_dtype(k, "k_cache", q, "q");
  check_same_dtype(v, "v_cache", q, "q");
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), Hk = k.size(2);
  TORCH_CHECK_VALUE(k.size(0) == B && k.size(3) == D, "k_cache: expected shape (B=", B, ", S, Hk, D=", D, "), got ",
                    k.sizes());
  check_shape(v, "v_cache", k.sizes());
  TORCH_CHECK_VALUE(Hk > 0 && H % Hk == 0, "k_cache: the number of query heads H=", H,
                    " must be a multiple of the number of key/value heads Hk=", Hk);
  check_dtype(seqlens, "seqlens", {at::kInt});
  check_shape(seqlens, "seqlens", {B});
  check_dtype(routed, "routed", {at::kBool});
  check_shape(routed, "routed", {B});
  if (q.is_cuda()) {
    TORCH_CHECK_VALUE(D == 64 || D == 128, "q: head dim D must be 64 or 128 on CUDA, got ", D);
    TORCH_CHECK_VALUE(k.size(1) <= INT32_MAX, "k_cache: S must fit in int32 on CUDA, got ", k.size(1));
  }
}

// The kernels read rows of D elements with a unit stride along D; on CUDA in 16-byte pieces, so
// rows must start 16-byte aligned. A cache that is not (a view starting mid-row) is copied:
// correct, but a copy of the whole cache every step, so allocate caches contiguous.
at::Tensor readable(const at::Tensor& t) {
  if (t.stride(-1) != 1) return t.contiguous();
  if (!t.is_cuda()) return t;
  const int64_t vec = 16 / t.element_size();
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) aligned = aligned && (t.size(d) == 1 || t.stride(d) % vec == 0);
  if (aligned) return t;
  at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone(at::MemoryFormat::Contiguous);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> routed_decode(const at::Tensor& q_in, const at::Tensor& k_in,
                                                 const at::Tensor& v_in, const at::Tensor& seqlens_in,
                                                 const at::Tensor& routed_in, double softmax_scale) {
  check_inputs(q_in, k_in, v_in, seqlens_in, routed_in);
  c10::OptionalDeviceGuard guard(q_in.device());
  const at::Tensor q = readable(q_in), k = readable(k_in), v = readable(v_in);
  const at::Tensor seqlens = seqlens_in.contiguous(), routed = routed_in.contiguous();
  // Written whole by the kernels (0 and -inf where not routed).
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({q.size(0), q.size(1)}, q.options().dtype(accumulate_dtype(q.scalar_type())));

  RoutedDecodeParams p{};
  p.batch = q.size(0);
  p.num_heads = q.size(1);
  p.head_dim = q.size(2);
  p.num_kv_heads = k.size(2);
  p.cache_len = k.size(1);
  p.dtype = element_type_of(q);
  p.softmax_scale = softmax_scale;
  p.q = q.data_ptr(), p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1);
  p.k = k.data_ptr(), p.k_batch_stride = k.stride(0), p.k_row_stride = k.stride(1), p.k_head_stride = k.stride(2);
  p.v = v.data_ptr(), p.v_batch_stride = v.stride(0), p.v_row_stride = v.stride(1), p.v_head_stride = v.stride(2);
  p.seqlens = seqlens.data_ptr<int32_t>();
  p.routed = routed.data_ptr<bool>();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr();
  if (q.numel() == 0) return {out, lse};
  if (q.is_cuda()) {
#ifdef CRAM_WITH_CUDA
    p.num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    const size_t bytes = routed_decode_plan(p);
    at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, q.options().dtype(at::kByte));
    p.workspace = workspace.data_ptr();
    routed_decode_cuda(p, cuda_stream_of(q));
#else
    TORCH_CHECK(false, "routed_decode: cram_ext was built without CUDA support");
#endif
  } else {
    routed_decode_cpu(p);
  }
  return {out, lse};
}

TORCH_LIBRARY_IMPL(cram, CPU, m) { m.impl("routed_decode", &routed_decode); }

#ifdef CRAM_WITH_CUDA
TORCH_LIBRARY_IMPL(cram, CUDA, m) { m.impl("routed_decode", &routed_decode); }
#endif

}  // namespace cram
