"""Per-element math shared by the Triton kernels (the fp32 formulas of sgm_ext.activations)."""
import torch
import triton
import triton.language as tl

STRENGTH_NONE, STRENGTH_VALUE, STRENGTH_ROWS = 0, 1, 2


@triton.jit
def activation(x, ACT: tl.constexpr):
    if ACT == "silu":
        y = x / (1.0 + tl.exp(-x))
    elif ACT == "gelu":
        y = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # 0.5 (1 + tanh(z)) == sigmoid(2 z), z = sqrt(2/pi) (x + 0.044715 x^3)
        y = x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    elif ACT == "quick_gelu":
        y = x / (1.0 + tl.exp(-1.702 * x))
    else:
        tl.static_assert(ACT == "relu")
        y = tl.where(x > 0.0, x, 0.0)
    return y


@triton.jit
def suppress(h, scale, strength, HAS_SCALE: tl.constexpr, STRENGTH_MODE: tl.constexpr):
    """h * s_eff, s_eff = 1 - strength (1 - scale) evaluated as strength * scale + (1 - strength):
    exact at strength 0 and 1, as in sgm_ext.reference.effective_scale."""
    if HAS_SCALE:
        if STRENGTH_MODE == 0:
            h = h * scale
        else:
            h = h * (strength * scale + (1.0 - strength))
    return h


@triton.jit
def add_shift(h, shift, strength, STRENGTH_MODE: tl.constexpr):
    """h + strength * shift (the shift itself without a strength), as
    sgm_ext.reference.effective_shift: strength 0 adds exactly 0."""
    if STRENGTH_MODE == 0:
        h = h + shift
    else:
        h = h + strength * shift
    return h


def strength_mode(strength, strength_value):
    if strength is not None:
        return STRENGTH_ROWS
    return STRENGTH_NONE if strength_value is None else STRENGTH_VALUE


def compute_dtype(dtype):
    """fp32 math for fp32/fp16/bf16; fp64 inputs (gradcheck) compute in fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
                 torch.float64: "fp64"}
