// Per-element math of act_mul_scale: the one definition that the CUDA kernel, the vectorized
// CPU kernel and the host check (sgm_ext::_act_mul_scale_host) all call.
//
// Functions are templated on the value type T and on a math policy M (exp, erf, relu for T),
// so the same formula runs on float / double scalars (ScalarMath: host libm or CUDA's device
// libm) and on ATen Vectorized<float> lanes (the CPU kernel's policy). The formulas are the
// fp32 forms of sgm_ext/activations.py and kernels/common.py.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__)
#define SGM_HOST_DEVICE __host__ __device__ __forceinline__
#else
// always_inline: no out-of-line copy is emitted, so the copies compiled inside the AVX2 /
// AVX-512 translation units can never be the one the linker keeps for the baseline code.
#define SGM_HOST_DEVICE inline __attribute__((always_inline))
#endif

namespace sgm_ext {

enum class Act : int { silu = 0, gelu = 1, gelu_tanh = 2, quick_gelu = 3, relu = 4 };

// Scalar math for float and double, on the host (libm) and on the device (CUDA libdevice).
struct ScalarMath {
  SGM_HOST_DEVICE static float exp(float x) { return ::expf(x); }
  SGM_HOST_DEVICE static double exp(double x) { return ::exp(x); }
  SGM_HOST_DEVICE static float erf(float x) { return ::erff(x); }
  SGM_HOST_DEVICE static double erf(double x) { return ::erf(x); }
  // x < 0 ? 0 : x keeps a NaN a NaN, as torch.relu does.
  template <class T>
  SGM_HOST_DEVICE static T relu(T x) { return x < T(0) ? T(0) : x; }
};

// act(x); sigmoid-based forms x / (1 + exp(-k x)) as in the Triton kernels.
template <Act A, class M, class T>
SGM_HOST_DEVICE T activate(T x) {
  if constexpr (A == Act::silu) {
    return x / (T(1.0) + M::exp(T(-1.0) * x));
  } else if constexpr (A == Act::gelu) {  // exact erf form
    return T(0.5) * x * (T(1.0) + M::erf(x * T(0.7071067811865476)));
  } else if constexpr (A == Act::gelu_tanh) {
    // 0.5 (1 + tanh(z)) == sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3)
    return x / (T(1.0) + M::exp(T(-1.5957691216057308) * (x + T(0.044715) * x * x * x)));
  } else if constexpr (A == Act::quick_gelu) {
    return x / (T(1.0) + M::exp(T(-1.702) * x));
  } else {
    static_assert(A == Act::relu, "unknown activation");
    return M::relu(x);
  }
}

// s_eff = 1 - strength (1 - scale), evaluated as strength * scale + (1 - strength) like
// sgm_ext.scale_math.effective_scale: exact at both ends (strength 0 gives 1, strength 1 the
// scale bit for bit). Without a strength the kernels use the scale itself. Each operation is
// rounded on its own, as torch rounds the same expression: a fused multiply-add, which the
// compilers form unasked (nvcc's --fmad; GCC's -ffp-contract, turned off in setup.py), would
// round once and give other bits than the s_eff a patched model computes in Python.
template <class T>
SGM_HOST_DEVICE T effective_scale(T scale, T strength) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fadd_rn(__fmul_rn(strength, scale), 1.0f - strength);
  } else if constexpr (std::is_same_v<T, double>) {
    return __dadd_rn(__dmul_rn(strength, scale), 1.0 - strength);
  } else
#endif
  return strength * scale + (T(1.0) - strength);
}

// strength * shift: the added part of an affine site (y = s_eff x + strength * shift), rounded
// on its own like effective_scale; and h + that, never contracted with the multiply that made h.
template <class T>
SGM_HOST_DEVICE T effective_shift(T shift, T strength) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fmul_rn(strength, shift);
  } else if constexpr (std::is_same_v<T, double>) {
    return __dmul_rn(strength, shift);
  } else
#endif
  return strength * shift;
}

template <class T>
SGM_HOST_DEVICE T add_shift(T h, T shift) {
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same_v<T, float>) {
    return __fadd_rn(h, shift);
  } else if constexpr (std::is_same_v<T, double>) {
    return __dadd_rn(h, shift);
  } else
#endif
  return h + shift;
}

// act(gate * gate_scale) * up * s_eff. Absent operands are passed as 1 (x * 1 == x exactly),
// which gives the non-gated form (up = 1) and the unscaled one (s_eff = 1).
template <Act A, class M, class T>
SGM_HOST_DEVICE T act_mul_scale_element(T gate, T up, T gate_scale, T s_eff) {
  return activate<A, M>(gate * gate_scale) * up * s_eff;
}

// Calls f(std::integral_constant<Act, a>{}) so kernels are instantiated per activation.
template <class F>
inline void dispatch_act(Act a, F&& f) {
  switch (a) {
    case Act::silu: f(std::integral_constant<Act, Act::silu>{}); break;
    case Act::gelu: f(std::integral_constant<Act, Act::gelu>{}); break;
    case Act::gelu_tanh: f(std::integral_constant<Act, Act::gelu_tanh>{}); break;
    case Act::quick_gelu: f(std::integral_constant<Act, Act::quick_gelu>{}); break;
    case Act::relu: f(std::integral_constant<Act, Act::relu>{}); break;
  }
}

}  // namespace sgm_ext
