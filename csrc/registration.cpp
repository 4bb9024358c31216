// The one place where the `cram` operator namespace and its schemas are declared.
// Implementations register themselves per backend next to their kernels
// (TORCH_LIBRARY_IMPL in <op>/<op>_api.cpp); fake impls and autograd live in cram_ext/ops.py.

#include <Python.h>
#include <torch/library.h>

#include <string>

#include "common/build_config.h"
#include "routed_attention/routed_attention.h"

// Importing cram_ext._C loads this shared library, which runs the static
// registrations below; the module itself exposes nothing.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

namespace cram {

static std::string build_info() { return build_config_json(); }

TORCH_LIBRARY(cram, m) {
  m.def("build_info() -> str", &build_info);

  m.def("gated_scan(Tensor x, Tensor log_a, Tensor? h0) -> (Tensor h, Tensor h_last)");
  m.def(
      "gated_scan_backward(Tensor grad_h, Tensor grad_h_last, Tensor log_a, Tensor h, Tensor? h0)"
      " -> (Tensor grad_x, Tensor grad_log_a, Tensor grad_h0)");

  m.def(
      "route(Tensor hidden, Tensor weight, Tensor bias, float threshold, Tensor? force)"
      " -> (Tensor prob, Tensor mask, Tensor index, Tensor counts)");
  m.def(
      "route_backward(Tensor grad_prob, Tensor prob, Tensor hidden, Tensor weight)"
      " -> (Tensor grad_hidden, Tensor grad_weight, Tensor grad_bias)");

  m.def("routed_attention_kernel(Device device, int head_dim, str which) -> str", &routed_attention_kernel);
  m.def(
      "routed_attention(Tensor q, Tensor k, Tensor v, Tensor index, Tensor counts, float softmax_scale,"
      " bool deterministic=False)"
      " -> (Tensor out, Tensor lse)");
  m.def(
      "routed_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor index, Tensor counts, float softmax_scale, bool deterministic=False)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  m.def(
      "routed_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, Tensor routed, float softmax_scale)"
      " -> (Tensor out, Tensor lse)");

  m.def(
      "metaplastic_scan(Tensor q, Tensor k, Tensor v, Tensor b, Tensor log_alpha, Tensor prior, Tensor? M0,"
      " Tensor? Ibar0, float scale) -> (Tensor o, Tensor M, Tensor Ibar)");
  m.def(
      "metaplastic_scan_backward(Tensor grad_o, Tensor grad_M, Tensor grad_Ibar, Tensor q, Tensor k, Tensor v,"
      " Tensor b, Tensor log_alpha, Tensor prior, Tensor? M0, Tensor? Ibar0, float scale)"
      " -> (Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_b, Tensor grad_log_alpha, Tensor grad_prior,"
      " Tensor grad_M0, Tensor grad_Ibar0)");
  m.def(
      "metaplastic_step(Tensor q, Tensor k, Tensor v, Tensor b, Tensor log_alpha, Tensor prior, Tensor(a!) M,"
      " Tensor(b!) Ibar, float scale) -> Tensor o");
}

}  // namespace cram
