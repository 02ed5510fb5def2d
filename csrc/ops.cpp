// sgm_ext::act_mul_scale_out: schema, argument checks, the CPU kernel (rows in parallel, each
// row by the vectorized kernel of the running CPU capability), the host check op, and the
// Python module sgm_ext._C (empty: importing it loads the library, which registers the ops).
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/Version.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "ops.h"

namespace sgm_ext {

Act parse_act(const std::string& name) {
  static const std::pair<const char*, Act> kNames[] = {
      {"silu", Act::silu}, {"gelu", Act::gelu}, {"gelu_tanh", Act::gelu_tanh},
      {"quick_gelu", Act::quick_gelu}, {"relu", Act::relu}};
  for (const auto& [n, a] : kNames) {
    if (name == n) return a;
  }
  TORCH_CHECK(false, "act_mul_scale_out: unknown activation '", name,
              "'; expected one of silu, gelu, gelu_tanh, quick_gelu, relu");
  return Act::silu;  // not reached
}

namespace {

void check_rows(const char* what, const at::Tensor& t, const at::Tensor& out) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == out.sizes(), "act_mul_scale_out: ", what,
              " has shape ", t.sizes(), ", expected ", out.sizes());
  TORCH_CHECK(t.scalar_type() == out.scalar_type(), "act_mul_scale_out: ", what, " is ",
              t.scalar_type(), ", out is ", out.scalar_type());
  TORCH_CHECK(t.device() == out.device(), "act_mul_scale_out: ", what, " is on ", t.device(),
              ", out is on ", out.device());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "act_mul_scale_out: ", what,
              " must have unit column stride, got strides ", t.strides());
}

// scale / gate_scale / strength / shift: 1-D of length n, float32 (float64 too for float64 inputs);
// returned contiguous in the compute dtype.
const void* vector_arg(const char* what, const std::optional<at::Tensor>& v, int64_t n,
                       const at::Tensor& out, std::vector<at::Tensor>& keep) {
  if (!v.has_value()) return nullptr;
  const bool fp64 = out.scalar_type() == at::kDouble;
  TORCH_CHECK(v->dim() == 1 && v->size(0) == n, "act_mul_scale_out: ", what, " has shape ",
              v->sizes(), ", expected [", n, "]");
  TORCH_CHECK(v->scalar_type() == at::kFloat || (fp64 && v->scalar_type() == at::kDouble),
              "act_mul_scale_out: ", what, " must be float32, got ", v->scalar_type());
  TORCH_CHECK(v->device() == out.device(), "act_mul_scale_out: ", what, " is on ", v->device(),
              ", out is on ", out.device());
  keep.push_back(v->to(fp64 ? at::kDouble : at::kFloat).contiguous());
  return keep.back().const_data_ptr();
}

}  // namespace

RowArgs check_act_mul_scale(const at::Tensor& out, const at::Tensor& gate,
                            const std::optional<at::Tensor>& up,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& gate_scale,
                            const std::optional<at::Tensor>& strength,
                            std::optional<double> strength_value,
                            const std::optional<at::Tensor>& shift, std::vector<at::Tensor>& keep) {
  const auto dtype = out.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                  dtype == at::kDouble,
              "act_mul_scale_out: out has dtype ", dtype,
              "; supported: float32, float16, bfloat16, float64");
  TORCH_CHECK(out.dim() == 2, "act_mul_scale_out: out must be 2-D [rows, I], got shape ",
              out.sizes());
  check_rows("out", out, out);
  check_rows("gate", gate, out);
  if (up.has_value()) check_rows("up", *up, out);
  const int64_t rows = out.size(0), cols = out.size(1);
  RowArgs a{};
  a.out = out.data_ptr();
  a.gate = gate.const_data_ptr();
  a.up = up.has_value() ? up->const_data_ptr() : nullptr;
  a.scale = vector_arg("scale", scale, cols, out, keep);
  a.gate_scale = vector_arg("gate_scale", gate_scale, cols, out, keep);
  a.strength = vector_arg("strength", strength, rows, out, keep);
  a.shift = vector_arg("shift", shift, cols, out, keep);
  a.strength_value = strength_value.value_or(1.0);
  // As in sgm_ext.reference: a per-row strength, when given, wins over strength_value.
  a.strength_mode = strength.has_value() ? Strength::rows
      : strength_value.has_value() ? Strength::value : Strength::none;
  a.n_cols = cols;
  a.stride_out = out.stride(0);
  a.stride_gate = gate.stride(0);
  a.stride_up = up.has_value() ? up->stride(0) : 0;
  return a;
}

at::Tensor act_mul_scale_alloc(ActMulScaleOutFn out_fn, const at::Tensor& gate,
                               const std::optional<at::Tensor>& up,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& gate_scale, c10::string_view act,
                               const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(gate.dim() >= 1, "_act_mul_scale_alloc: gate must have at least one dim");
  TORCH_CHECK(!up.has_value() || up->sizes() == gate.sizes(), "_act_mul_scale_alloc: up has shape ",
              up.has_value() ? up->sizes() : gate.sizes(), ", gate has shape ", gate.sizes());
  const int64_t cols = gate.size(-1);
  const int64_t rows = cols == 0 ? 0 : gate.numel() / cols;
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  at::Tensor out_rows = out.view({rows, cols});
  // [rows, cols] with unit column stride: a view of what a Linear returns (or of the halves of
  // a packed gate_up), a copy of anything else
  const auto as_rows = [&](const at::Tensor& t) {
    at::Tensor r = t.reshape({rows, cols});
    return cols > 1 && r.stride(1) != 1 ? r.contiguous() : r;
  };
  const std::optional<at::Tensor> up_rows =
      up.has_value() ? std::optional<at::Tensor>(as_rows(*up)) : std::nullopt;
  out_fn(out_rows, as_rows(gate), up_rows, scale, gate_scale, std::nullopt,
         std::nullopt, act, shift);
  return out;
}

namespace cpu {
RowsFn select_vec_rows_DEFAULT(int dtype_code, Act act, bool shift);
RowsFn select_vec_rows_AVX2(int dtype_code, Act act, bool shift);
RowsFn select_vec_rows_AVX512(int dtype_code, Act act, bool shift);
}  // namespace cpu

namespace {

// The scalar row loop (act_mul_scale.h's element function on one element at a time).
RowsFn select_scalar_rows(at::ScalarType dtype, Act act) {
  RowsFn fn = nullptr;
  dispatch_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "act_mul_scale_host", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      fn = &scalar_rows<scalar_t, acc_t, A>;
    });
  });
  return fn;
}

// The vectorized kernel for the capability torch itself runs with here ("AVX512", "AVX2" or
// "DEFAULT"; the ATEN_CPU_CAPABILITY variable lowers it for both).
RowsFn select_cpu_rows(at::ScalarType dtype, Act act, bool shift) {
  if (dtype == at::kDouble) return select_scalar_rows(dtype, act);  // fp64: gradcheck only
  const int code = dtype == at::kFloat ? 0 : dtype == at::kHalf ? 1 : 2;
  static const std::string capability = at::get_cpu_capability();
#if defined(__x86_64__)
  if (capability == "AVX512") return cpu::select_vec_rows_AVX512(code, act, shift);
  if (capability == "AVX2") return cpu::select_vec_rows_AVX2(code, act, shift);
#endif
  return cpu::select_vec_rows_DEFAULT(code, act, shift);
}

void check_cpu(const at::Tensor& out, const at::Tensor& gate, const std::optional<at::Tensor>& up) {
  for (const at::Tensor* t : {&out, &gate}) {
    TORCH_CHECK(t->device().is_cpu(), "act_mul_scale_out (CPU kernel): tensor on ", t->device());
  }
  TORCH_CHECK(!up.has_value() || up->device().is_cpu(),
              "act_mul_scale_out (CPU kernel): up on ", up->device());
}

void act_mul_scale_out_cpu(at::Tensor& out, const at::Tensor& gate,
                           const std::optional<at::Tensor>& up,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& gate_scale,
                           const std::optional<at::Tensor>& strength,
                           std::optional<double> strength_value, c10::string_view act,
                           const std::optional<at::Tensor>& shift) {
  check_cpu(out, gate, up);
  std::vector<at::Tensor> keep;
  const RowArgs args = check_act_mul_scale(out, gate, up, scale, gate_scale, strength,
                                           strength_value, shift, keep);
  const RowsFn fn = select_cpu_rows(out.scalar_type(), parse_act(std::string(act)),
                                    args.shift != nullptr);
  if (out.numel() == 0) return;
  // At least 32K elements per task (ATen's grain), so small calls stay on one thread.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(args.n_cols, 1));
  at::parallel_for(0, out.size(0), grain, [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

// The per-element functions of act_mul_scale.h evaluated one element at a time, serially:
// what the CUDA kernel computes, run on the host, for tests against a float64 reference.
at::Tensor act_mul_scale_host(const at::Tensor& gate, const std::optional<at::Tensor>& up,
                              const std::optional<at::Tensor>& scale,
                              const std::optional<at::Tensor>& gate_scale,
                              const std::optional<at::Tensor>& strength,
                              std::optional<double> strength_value, c10::string_view act,
                              const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(gate.dim() == 2, "_act_mul_scale_host: gate must be 2-D, got shape ", gate.sizes());
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  check_cpu(out, gate, up);
  std::vector<at::Tensor> keep;
  const RowArgs args = check_act_mul_scale(out, gate, up, scale, gate_scale, strength,
                                           strength_value, shift, keep);
  select_scalar_rows(out.scalar_type(), parse_act(std::string(act)))(args, 0, out.size(0));
  return out;
}

}  // namespace
}  // namespace sgm_ext

// FRAGMENT: the Python side (sgm_ext/ops.py) defines other ops of the same namespace.
TORCH_LIBRARY_FRAGMENT(sgm_ext, m) {
  // shift (last, optional: scale-only callers pass as before): out += strength * shift
  m.def("act_mul_scale_out(Tensor(a!) out, Tensor gate, Tensor? up, Tensor? scale, "
        "Tensor? gate_scale, Tensor? strength, float? strength_value, str act, "
        "Tensor? shift=None) -> ()");
  m.def("_act_mul_scale_host(Tensor gate, Tensor? up, Tensor? scale, Tensor? gate_scale, "
        "Tensor? strength, float? strength_value, str act, Tensor? shift=None) -> Tensor");
  // act_mul_scale_out on [..., I] inputs into a new tensor: the inference fast path
  // of sgm_ext.ops.act_mul_scale_prechecked (one dispatch per call; no autograd, no strength).
  m.def("_act_mul_scale_alloc(Tensor gate, Tensor? up, Tensor? scale, Tensor? gate_scale, "
        "str act) -> Tensor");
  m.def("_act_mul_scale_shift_alloc(Tensor gate, Tensor? up, Tensor? scale, Tensor? gate_scale, "
        "str act, Tensor shift) -> Tensor");
}

TORCH_LIBRARY_IMPL(sgm_ext, CPU, m) {
  m.impl("act_mul_scale_out", &sgm_ext::act_mul_scale_out_cpu);
  m.impl("_act_mul_scale_host", &sgm_ext::act_mul_scale_host);
  m.impl("_act_mul_scale_alloc",
         &sgm_ext::act_mul_scale_alloc_with<&sgm_ext::act_mul_scale_out_cpu>);
  m.impl("_act_mul_scale_shift_alloc",
         &sgm_ext::act_mul_scale_shift_alloc_with<&sgm_ext::act_mul_scale_out_cpu>);
}

static PyModuleDef sgm_ext_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "sgm-ext's compiled library: importing it registers the sgm_ext:: CPU / CUDA kernels.",
    -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sgm_ext_c_module); }
