"""Float64 references for the op tests, written independently of sgm_ext's own math."""
import torch
import torch.nn.functional as F

ACT64 = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
}

# (atol, rtol) per output dtype. fp16 / bf16: one ulp of the output relative to the value, since
# the Triton interpreter truncates fp32 -> fp16 / bf16 stores instead of rounding (DESIGN.md 5).
TOLERANCE = {
    torch.float32: (1e-6, 1e-5),
    torch.float16: (1e-5, 2.0 ** -10 + 1e-4),
    torch.bfloat16: (1e-5, 2.0 ** -7 + 1e-4),
    torch.float64: (1e-12, 1e-10),
}


def expected(gate, up, act, scale=None, gate_scale=None, strength=None, shift=None):
    """act(gate * gate_scale) * up * (1 - strength (1 - scale)) + strength * shift in float64.

    strength: None, a number, or a tensor broadcastable to gate.shape[:-1].
    """
    g = gate.double()
    if gate_scale is not None:
        g = g * gate_scale.double()
    h = ACT64[act](g)
    if up is not None:
        h = h * up.double()
    if scale is not None:
        s = scale.double()
        if isinstance(strength, torch.Tensor):
            s = 1 - strength.double()[..., None] * (1 - s)
        elif strength is not None:
            s = 1 - strength * (1 - s)
        h = h * s
    if shift is not None:
        b = shift.double()
        if isinstance(strength, torch.Tensor):
            b = strength.double()[..., None] * b
        elif strength is not None:
            b = strength * b
        h = h + b
    return h


def assert_matches(out, ref, dtype=None, atol=None, rtol=None):
    dtype = dtype or out.dtype
    a, r = TOLERANCE[dtype]
    a, r = atol or a, rtol or r
    assert out.shape == ref.shape, (out.shape, ref.shape)
    out64 = out.double()
    assert torch.isfinite(out64).all(), "non-finite output (unwritten or poisoned element?)"
    err = (out64 - ref).abs()
    bound = a + r * ref.abs()
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (
        f"max error {err.flatten()[worst].item():.3g} at flat index {int(worst)} "
        f"(value {out64.flatten()[worst].item():.6g}, expected {ref.flatten()[worst].item():.6g}, "
        f"allowed {bound.flatten()[worst].item():.3g})")
