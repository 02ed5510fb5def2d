// Raw-pointer view of one act_mul_scale call, handed from the op (ops.cpp) to the CPU row
// kernels, and the scalar row loop over the per-element functions of act_mul_scale.h.
#pragma once

#include <cstdint>

#include "act_mul_scale.h"

namespace sgm_ext {

enum class Strength : int { none = 0, value = 1, rows = 2 };

// Pointers are to the data type of the call (out / gate / up) and to its compute type
// (scale, gate_scale, strength, shift: float, or double for double inputs). Absent ones are
// null.
struct RowArgs {
  void* out;
  const void* gate;
  const void* up;
  const void* scale;
  const void* gate_scale;
  const void* strength;  // [rows], used when strength_mode == rows
  const void* shift;  // [n_cols]: out += strength * shift (the shift itself without strength)
  double strength_value;  // used when strength_mode == value
  Strength strength_mode;
  int64_t n_cols, stride_out, stride_gate, stride_up;  // row strides, in elements
};

using RowsFn = void (*)(const RowArgs&, int64_t begin, int64_t end);

// Rows [begin, end) one element at a time: the double path of the CPU backend and the host
// check of the per-element functions. acc_t is the compute type (float, double for double).
template <class scalar_t, class acc_t, Act A>
void scalar_rows(const RowArgs& a, int64_t begin, int64_t end) {
  const auto* scale = static_cast<const acc_t*>(a.scale);
  const auto* gate_scale = static_cast<const acc_t*>(a.gate_scale);
  const auto* shift = static_cast<const acc_t*>(a.shift);
  for (int64_t r = begin; r < end; ++r) {
    const auto* gate = static_cast<const scalar_t*>(a.gate) + r * a.stride_gate;
    const auto* up = a.up ? static_cast<const scalar_t*>(a.up) + r * a.stride_up : nullptr;
    auto* out = static_cast<scalar_t*>(a.out) + r * a.stride_out;
    const acc_t strength = a.strength_mode == Strength::rows
        ? static_cast<const acc_t*>(a.strength)[r] : static_cast<acc_t>(a.strength_value);
    for (int64_t j = 0; j < a.n_cols; ++j) {
      acc_t s = acc_t(1);
      if (scale) {
        s = a.strength_mode == Strength::none ? scale[j] : effective_scale(scale[j], strength);
      }
      acc_t h = act_mul_scale_element<A, ScalarMath>(
          static_cast<acc_t>(gate[j]), up ? static_cast<acc_t>(up[j]) : acc_t(1),
          gate_scale ? gate_scale[j] : acc_t(1), s);
      if (shift) {
        h = add_shift(h, a.strength_mode == Strength::none ? shift[j]
                                                           : effective_shift(shift[j], strength));
      }
      out[j] = static_cast<scalar_t>(h);  // c10::Half / BFloat16 round to nearest even
    }
  }
}

}  // namespace sgm_ext
