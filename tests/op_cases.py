"""Inputs and checks the op tests share (test_ops, test_compiled, test_gpu): random tensors
in every memory layout, scales and strengths, the option matrices, and the allocating op's check."""
import torch
from reference64 import assert_matches, expected


def rand(shape, dtype, layout, gen, device="cpu"):
    """Normal values of `shape` ([..., n]) in the given memory layout.

    contiguous; strided: rows padded and the start offset by 3 elements (unaligned pointer);
    padded: aligned rows whose stride is a multiple of 16 elements while n is not (the vector
    kernels' ragged tail after aligned vectors: [R, 1040][:, :1029]); transposed: the last dim
    is not the contiguous one.
    """
    *lead, n = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen).to(device, dtype)
    if layout == "strided":
        return torch.randn(*lead, n + 7, generator=gen).to(device, dtype)[..., 3:3 + n]
    if layout == "padded":
        stride = (n // 16 + 1) * 16
        return torch.randn(*lead, stride, generator=gen).to(device, dtype)[..., :n]
    if layout == "transposed":
        return torch.randn(n, *lead, generator=gen).to(device, dtype).movedim(0, -1)
    raise ValueError(layout)


def rand_scale(n, gen, dtype=torch.float32, device="cpu"):
    s = torch.rand(n, generator=gen, dtype=torch.float64).to(device, dtype)
    s[0] = 0.0  # fully suppressed neuron
    s[-1] = 1.0  # untouched neuron
    return s


def rand_strength(kind, lead, gen, dtype=torch.float32, device="cpu"):
    if kind is None or isinstance(kind, float):
        return kind
    # one strength per sequence: [B, 1, ...] over the leading dims
    shape = lead[:1] + (1,) * (len(lead) - 1)
    return torch.rand(shape, generator=gen, dtype=torch.float64).to(device, dtype)


# (leading dims, I, layout, scale?, gate_scale?, strength): every option value appears, with
# odd I that is not a multiple of any block (1029 spans two 1024-column blocks plus a tail).
VARIANTS = [
    ((7,), 37, "contiguous", False, False, None),
    ((3, 5), 130, "strided", True, False, None),
    ((2, 3, 4), 37, "transposed", True, True, 0.3),
    ((3, 5), 1029, "packed", True, True, "rows"),
    ((7,), 130, "packed", False, True, 0.5),
    ((2, 3, 4), 37, "contiguous", True, False, "rows"),
    ((3, 5), 37, "strided", True, True, 0.0),
    ((7,), 1029, "strided", True, False, 0.7),
    ((2, 3, 4), 130, "packed", True, False, None),
    ((4, 1), 21, "transposed", True, True, "rows"),
    ((3, 5), 1029, "padded", True, True, "rows"),
    ((7,), 37, "padded", True, False, 0.3),
]


def variant_id(v):
    lead, n, layout, sc, gs, st = v
    return (f"{'x'.join(map(str, lead))}x{n}-{layout}-{'s' if sc else 'ns'}-"
            f"{'gs' if gs else 'ngs'}-st{st}")



# (leading dims, H, I, x layout, weights transposed in memory?, scale, gate_scale, strength)
GEMM_VARIANTS = [
    ((5,), 40, 33, "contiguous", False, True, False, 0.5),
    ((2, 3), 70, 65, "strided", True, True, True, "rows"),
    ((17,), 48, 130, "contiguous", False, False, False, None),
    ((3, 7), 33, 70, "strided", False, True, False, None),
]


def check_alloc_op(lead, n, layout, dtype, gen, device="cpu"):
    """sgm_ext::_act_mul_scale_alloc takes [..., I] views as they come (a patched MLP passes
    the two halves of a packed gate_up) and returns a new contiguous tensor (tests/test_gpu.py
    runs this on CUDA)."""
    if layout == "packed":
        gate_up = rand((*lead, 2 * n), dtype, "contiguous", gen, device)
        gate, up = gate_up[..., :n], gate_up[..., n:]
    else:
        gate, up = (rand((*lead, n), dtype, layout, gen, device) for _ in range(2))
    scale, gate_scale = rand_scale(n, gen, device=device), 0.5 + rand_scale(n, gen, device=device)
    out = torch.ops.sgm_ext._act_mul_scale_alloc(gate, up, scale, gate_scale, "gelu")
    assert out.device == gate.device and out.is_contiguous() and out.dtype == dtype
    assert_matches(out, expected(gate, up, "gelu", scale, gate_scale))
    out = torch.ops.sgm_ext._act_mul_scale_alloc(gate, None, scale, None, "relu")
    assert_matches(out, expected(gate, None, "relu", scale))
    empty = torch.ops.sgm_ext._act_mul_scale_alloc(gate[..., :0], up[..., :0], None, None, "silu")
    assert empty.shape == (*lead, 0)
    shift = torch.randn(n, generator=gen).to(device)  # the allocating op with a shift
    out = torch.ops.sgm_ext._act_mul_scale_shift_alloc(gate, up, scale, gate_scale, "gelu", shift)
    assert out.is_contiguous() and out.dtype == dtype
    assert_matches(out, expected(gate, up, "gelu", scale, gate_scale, shift=shift))
    out = torch.ops.sgm_ext._act_mul_scale_shift_alloc(gate, None, None, None, "relu", shift)
    assert_matches(out, expected(gate, None, "relu", shift=shift))
