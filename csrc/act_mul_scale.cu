// The CUDA kernel of sgm_ext::act_mul_scale_out.
//
// One template over data types and activations. Each thread handles VEC consecutive columns
// of one row: with every pointer 16-byte aligned and every row stride a multiple of VEC, VEC
// fills 16 bytes and each access is a single 128-bit load / store (VEC = 1 is the scalar path
// for anything else: offset views, the packed layout with an odd I). A row's last I % VEC
// columns are done one by one. Math in the compute type (float, double for double inputs) by
// the per-element functions of act_mul_scale.h; the current stream, no host synchronisation.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops.h"

namespace sgm_ext {
namespace {

template <class T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// N values of the compute type from p (16-byte aligned when N * sizeof(acc_t) >= 16), in
// 16-byte pieces: scale and gate_scale are float32 even when the data are 2-byte types.
template <int N, class acc_t>
__device__ __forceinline__ void load_acc(const acc_t* __restrict__ p, acc_t (&dst)[N]) {
  constexpr int kPiece = (N * sizeof(acc_t) >= 16) ? 16 / sizeof(acc_t) : N;
#pragma unroll
  for (int k = 0; k < N; k += kPiece) {
    const auto piece = *reinterpret_cast<const Pack<acc_t, kPiece>*>(p + k);
#pragma unroll
    for (int i = 0; i < kPiece; ++i) dst[k + i] = piece.v[i];
  }
}

template <class scalar_t, class acc_t, Act A, int VEC>
__global__ void act_mul_scale_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ gate,
                                     const scalar_t* __restrict__ up,
                                     const acc_t* __restrict__ scale,
                                     const acc_t* __restrict__ gate_scale,
                                     const acc_t* __restrict__ strength,
                                     const acc_t* __restrict__ shift, acc_t strength_value,
                                     Strength strength_mode, int64_t n_cols, int64_t stride_out,
                                     int64_t stride_gate, int64_t stride_up) {
  const int64_t row = blockIdx.x;
  out += row * stride_out;
  gate += row * stride_gate;
  if (up) up += row * stride_up;
  const acc_t st = strength_mode == Strength::rows ? strength[row] : strength_value;

  using DataPack = Pack<scalar_t, VEC>;
  const int64_t n_vec = n_cols / VEC;
  for (int64_t v = blockIdx.y * int64_t(blockDim.x) + threadIdx.x; v < n_vec;
       v += int64_t(gridDim.y) * blockDim.x) {
    const int64_t col = v * VEC;
    const DataPack g = *reinterpret_cast<const DataPack*>(gate + col);
    DataPack u;
    if (up) u = *reinterpret_cast<const DataPack*>(up + col);
    acc_t gs[VEC], s[VEC], b[VEC];
    if (gate_scale) load_acc<VEC>(gate_scale + col, gs);
    if (scale) load_acc<VEC>(scale + col, s);
    if (shift) load_acc<VEC>(shift + col, b);
    DataPack h;
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc_t s_eff = acc_t(1);
      if (scale) s_eff = strength_mode == Strength::none ? s[i] : effective_scale(s[i], st);
      acc_t y = act_mul_scale_element<A, ScalarMath>(
          static_cast<acc_t>(g.v[i]), up ? static_cast<acc_t>(u.v[i]) : acc_t(1),
          gate_scale ? gs[i] : acc_t(1), s_eff);
      if (shift) y = add_shift(y, strength_mode == Strength::none ? b[i] : effective_shift(b[i], st));
      h.v[i] = static_cast<scalar_t>(y);
    }
    *reinterpret_cast<DataPack*>(out + col) = h;
  }
  if (VEC > 1 && blockIdx.y == 0) {  // the row's last n_cols % VEC columns
    for (int64_t col = n_vec * VEC + threadIdx.x; col < n_cols; col += blockDim.x) {
      acc_t s_eff = acc_t(1);
      if (scale) s_eff = strength_mode == Strength::none ? scale[col] : effective_scale(scale[col], st);
      acc_t y = act_mul_scale_element<A, ScalarMath>(
          static_cast<acc_t>(gate[col]), up ? static_cast<acc_t>(up[col]) : acc_t(1),
          gate_scale ? gate_scale[col] : acc_t(1), s_eff);
      if (shift) {
        y = add_shift(y, strength_mode == Strength::none ? shift[col] : effective_shift(shift[col], st));
      }
      out[col] = static_cast<scalar_t>(y);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <class scalar_t, class acc_t, Act A, int VEC>
void launch(const RowArgs& a, int64_t rows, cudaStream_t stream) {
  constexpr int kMaxThreads = 256;
  const int64_t n_vec = std::max<int64_t>(a.n_cols / VEC, 1);
  // Small rows: fewer threads (a multiple of a warp); long rows: several blocks per row.
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, (n_vec + 31) / 32 * 32));
  const int64_t col_blocks = std::min<int64_t>((n_vec + threads - 1) / threads, 65535);
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(col_blocks));
  act_mul_scale_kernel<scalar_t, acc_t, A, VEC><<<grid, threads, 0, stream>>>(
      static_cast<scalar_t*>(a.out), static_cast<const scalar_t*>(a.gate),
      static_cast<const scalar_t*>(a.up), static_cast<const acc_t*>(a.scale),
      static_cast<const acc_t*>(a.gate_scale), static_cast<const acc_t*>(a.strength),
      static_cast<const acc_t*>(a.shift), static_cast<acc_t>(a.strength_value), a.strength_mode, a.n_cols, a.stride_out,
      a.stride_gate, a.stride_up);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void act_mul_scale_out_cuda(at::Tensor& out, const at::Tensor& gate,
                            const std::optional<at::Tensor>& up,
                            const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& gate_scale,
                            const std::optional<at::Tensor>& strength,
                            std::optional<double> strength_value, c10::string_view act,
                            const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(out.is_cuda(), "act_mul_scale_out (CUDA kernel): out is on ", out.device());
  const c10::cuda::CUDAGuard guard(out.device());
  std::vector<at::Tensor> keep;
  const RowArgs a = check_act_mul_scale(out, gate, up, scale, gate_scale, strength,
                                        strength_value, shift, keep);
  const int64_t rows = out.size(0);
  TORCH_CHECK(rows <= INT32_MAX, "act_mul_scale_out: ", rows, " rows; at most 2^31 - 1");
  if (out.numel() == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_act(parse_act(std::string(act)), [&](auto act_c) {
    constexpr Act A = decltype(act_c)::value;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "act_mul_scale_out_cuda", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vectorizable =
          aligned16(a.out) && aligned16(a.gate) && (!a.up || aligned16(a.up)) &&
          (!a.scale || aligned16(a.scale)) && (!a.gate_scale || aligned16(a.gate_scale)) &&
          (!a.shift || aligned16(a.shift)) &&
          a.stride_out % kVec == 0 && a.stride_gate % kVec == 0 && a.stride_up % kVec == 0;
      if (vectorizable) {
        launch<scalar_t, acc_t, A, kVec>(a, rows, stream);
      } else {
        launch<scalar_t, acc_t, A, 1>(a, rows, stream);
      }
    });
  });
}

}  // namespace
}  // namespace sgm_ext

TORCH_LIBRARY_IMPL(sgm_ext, CUDA, m) {
  m.impl("act_mul_scale_out", &sgm_ext::act_mul_scale_out_cuda);
  m.impl("_act_mul_scale_alloc",
         &sgm_ext::act_mul_scale_alloc_with<&sgm_ext::act_mul_scale_out_cuda>);
  m.impl("_act_mul_scale_shift_alloc",
         &sgm_ext::act_mul_scale_shift_alloc_with<&sgm_ext::act_mul_scale_out_cuda>);
}
