// The act_mul_scale_out op: argument checks shared by its CPU and CUDA kernels.
#pragma once

#include <optional>
#include <vector>
#include <string>

#include <ATen/core/Tensor.h>

#include "rows.h"

namespace sgm_ext {

Act parse_act(const std::string& name);

// Checks the arguments of act_mul_scale_out (naming the bad one) and returns them as row
// pointers; `keep` holds scale / gate_scale / strength / shift converted to the compute dtype (a
// no-op when they already are) for as long as the pointers are used.
RowArgs check_act_mul_scale(const at::Tensor& out, const at::Tensor& gate,
                            const std::optional<at::Tensor>& up,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& gate_scale,
                            const std::optional<at::Tensor>& strength,
                            std::optional<double> strength_value,
                            const std::optional<at::Tensor>& shift, std::vector<at::Tensor>& keep);

// A device's kernel of act_mul_scale_out.
using ActMulScaleOutFn = void (*)(at::Tensor& out, const at::Tensor& gate,
                                  const std::optional<at::Tensor>& up,
                                  const std::optional<at::Tensor>& scale,
                                  const std::optional<at::Tensor>& gate_scale,
                                  const std::optional<at::Tensor>& strength,
                                  std::optional<double> strength_value, c10::string_view act,
                                  const std::optional<at::Tensor>& shift);

// The kernel of sgm_ext::_act_mul_scale_alloc on one device: a new tensor of gate's shape from
// [..., I] inputs, computed by that device's act_mul_scale_out on the rows.
at::Tensor act_mul_scale_alloc(ActMulScaleOutFn out_fn, const at::Tensor& gate,
                               const std::optional<at::Tensor>& up,
                               const std::optional<at::Tensor>& scale,
                               const std::optional<at::Tensor>& gate_scale, c10::string_view act,
                               const std::optional<at::Tensor>& shift);

// act_mul_scale_alloc bound to one device's kernel: what TORCH_LIBRARY_IMPL registers, as
// _act_mul_scale_alloc (scale only: its schema, and so its per-call cost, as before shifts) and
// _act_mul_scale_shift_alloc (with a shift).
template <ActMulScaleOutFn OutFn>
at::Tensor act_mul_scale_alloc_with(const at::Tensor& gate, const std::optional<at::Tensor>& up,
                                    const std::optional<at::Tensor>& scale,
                                    const std::optional<at::Tensor>& gate_scale,
                                    c10::string_view act) {
  return act_mul_scale_alloc(OutFn, gate, up, scale, gate_scale, act, std::nullopt);
}

template <ActMulScaleOutFn OutFn>
at::Tensor act_mul_scale_shift_alloc_with(const at::Tensor& gate,
                                          const std::optional<at::Tensor>& up,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& gate_scale,
                                          c10::string_view act, const at::Tensor& shift) {
  return act_mul_scale_alloc(OutFn, gate, up, scale, gate_scale, act, shift);
}

}  // namespace sgm_ext
