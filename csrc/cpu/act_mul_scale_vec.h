// The vectorized CPU row kernel of act_mul_scale, compiled once per CPU capability.
//
// Each act_mul_scale_<capability>.cpp sets CPU_CAPABILITY (and the matching compiler target)
// and includes this file, so the ATen Vectorized types, and everything here, live in a
// namespace of that capability's name: the variants never share a symbol. ops.cpp picks the
// variant torch itself runs with (at::native::get_cpu_capability).
//
// Data is loaded 2 float vectors at a time (one Vectorized<BFloat16 / Half> converted to two
// float vectors), computed in fp32 by the per-element functions of act_mul_scale.h, and
// converted back with round to nearest even; the row's last columns take the scalar path.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../rows.h"

namespace sgm_ext::cpu {
inline namespace CPU_CAPABILITY {

using at::vec::Vectorized;
using fVec = Vectorized<float>;

// The math policy of act_mul_scale.h for float vectors. exp_u20: ATen's polynomial exp (at
// most 20 ulp, inputs clamped to the finite range), several times cheaper than the 1-ulp
// Sleef call; its error stays far inside the fp32 tolerance of the op (1e-5 relative) and
// the kernel stays bound by memory, not by the exp.
struct VecMath {
  static fVec exp(const fVec& x) { return x.exp_u20(); }
  static fVec erf(const fVec& x) { return x.erf(); }
  static fVec relu(const fVec& x) { return at::vec::clamp_min(x, fVec(0.0f)); }
};

constexpr int64_t kF = fVec::size();
constexpr int64_t kChunk = 2 * kF;  // elements per loop step, for every data type

template <class scalar_t>
inline void load2(const scalar_t* p, fVec& lo, fVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo = fVec::loadu(p);
    hi = fVec::loadu(p + kF);
  } else {
    std::tie(lo, hi) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  }
}

template <class scalar_t>
inline void store2(scalar_t* p, const fVec& lo, const fVec& hi) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    lo.store(p);
    hi.store(p + kF);
  } else {
    at::vec::convert_from_float<scalar_t>(lo, hi).store(p);
  }
}

// kShift: the row loop with a shift is its own instance, chosen with the others by
// select_vec_rows, so the scale-only loop is the code it was before shifts existed (a branch
// between the two instances inside one row function measured 2-3% per decode-size call).
template <class scalar_t, Act A, bool kShift>
void vec_rows(const RowArgs& a, int64_t begin, int64_t end) {
  const auto* scale = static_cast<const float*>(a.scale);
  const auto* gate_scale = static_cast<const float*>(a.gate_scale);
  const auto* shift = static_cast<const float*>(a.shift);
  const fVec one(1.0f);
  for (int64_t r = begin; r < end; ++r) {
    const auto* gate = static_cast<const scalar_t*>(a.gate) + r * a.stride_gate;
    const auto* up = a.up ? static_cast<const scalar_t*>(a.up) + r * a.stride_up : nullptr;
    auto* out = static_cast<scalar_t*>(a.out) + r * a.stride_out;
    const float strength = a.strength_mode == Strength::rows
        ? static_cast<const float*>(a.strength)[r] : static_cast<float>(a.strength_value);
    const fVec strength_v(strength);
    int64_t j = 0;
    for (; j + kChunk <= a.n_cols; j += kChunk) {
      fVec g[2], u[2] = {one, one}, gs[2] = {one, one}, s[2] = {one, one};
      load2(gate + j, g[0], g[1]);
      if (up) load2(up + j, u[0], u[1]);
      if (gate_scale) load2(gate_scale + j, gs[0], gs[1]);
      if (scale) {
        load2(scale + j, s[0], s[1]);
        if (a.strength_mode != Strength::none) {
          s[0] = effective_scale(s[0], strength_v);
          s[1] = effective_scale(s[1], strength_v);
        }
      }
      fVec h[2] = {act_mul_scale_element<A, VecMath>(g[0], u[0], gs[0], s[0]),
                   act_mul_scale_element<A, VecMath>(g[1], u[1], gs[1], s[1])};
      if constexpr (kShift) {
        fVec b[2];
        load2(shift + j, b[0], b[1]);
        for (int k = 0; k < 2; ++k) {
          h[k] = add_shift(h[k], a.strength_mode == Strength::none
                                     ? b[k] : effective_shift(b[k], strength_v));
        }
      }
      store2(out + j, h[0], h[1]);
    }
    for (; j < a.n_cols; ++j) {  // scalar tail: the same element function on floats
      float s = 1.0f;
      if (scale) s = a.strength_mode == Strength::none ? scale[j] : effective_scale(scale[j], strength);
      float h = act_mul_scale_element<A, ScalarMath>(
          static_cast<float>(gate[j]), up ? static_cast<float>(up[j]) : 1.0f,
          gate_scale ? gate_scale[j] : 1.0f, s);
      if constexpr (kShift) {
        h = add_shift(h, a.strength_mode == Strength::none ? shift[j]
                                                           : effective_shift(shift[j], strength));
      }
      out[j] = static_cast<scalar_t>(h);
    }
  }
}


// The row kernel for a data type code (0 float, 1 Half, 2 BFloat16), an activation, and
// whether the call has a shift.
template <bool kShift>
RowsFn select_vec_rows_for(int dtype_code, Act act) {
  RowsFn fn = nullptr;
  dispatch_act(act, [&](auto a) {
    constexpr Act A = decltype(a)::value;
    switch (dtype_code) {
      case 0: fn = &vec_rows<float, A, kShift>; break;
      case 1: fn = &vec_rows<c10::Half, A, kShift>; break;
      case 2: fn = &vec_rows<c10::BFloat16, A, kShift>; break;
    }
  });
  return fn;
}

inline RowsFn select_vec_rows(int dtype_code, Act act, bool shift) {
  return shift ? select_vec_rows_for<true>(dtype_code, act)
               : select_vec_rows_for<false>(dtype_code, act);
}

}  // namespace CPU_CAPABILITY
}  // namespace sgm_ext::cpu

// Each capability file defines its entry point with this, e.g. select_vec_rows_AVX2.
#define SGM_EXT_DEFINE_VEC_ROWS(NAME)                        \
  namespace sgm_ext::cpu {                                   \
  RowsFn NAME(int dtype_code, Act act, bool shift) {         \
    return select_vec_rows(dtype_code, act, shift);          \
  }                                                          \
  }
