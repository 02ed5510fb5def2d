"""act(gate * gate_scale) * up * s_eff + strength * shift, and the non-gated
act(x) * s_eff + strength * shift, on 2-D row views.

One program handles BLOCK columns of one row: the row's strength is one scalar load, the
scale slice is a contiguous vector load, and with 16-divisible row strides and I the JIT
can prove alignment, so every global load and store is 128 bits wide.
"""
import triton
import triton.language as tl

from .common import activation, add_shift, compute_dtype, strength_mode, suppress


@triton.jit
def act_mul_scale_kernel(
    out_ptr, gate_ptr, up_ptr, scale_ptr, gate_scale_ptr, strength_ptr, shift_ptr,
    strength_value, n_cols, stride_gate, stride_up, stride_out,
    HAS_UP: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_GATE_SCALE: tl.constexpr,
    HAS_SHIFT: tl.constexpr,
    STRENGTH_MODE: tl.constexpr, ACT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # R * I may pass 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(gate_ptr + row * stride_gate + cols, mask=mask, other=0.0).to(COMPUTE)
    if HAS_GATE_SCALE:
        g = g * tl.load(gate_scale_ptr + cols, mask=mask, other=1.0).to(COMPUTE)
    h = activation(g, ACT)
    if HAS_UP:
        h = h * tl.load(up_ptr + row * stride_up + cols, mask=mask, other=0.0).to(COMPUTE)
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=mask, other=1.0).to(COMPUTE)
    strength = 1.0
    if STRENGTH_MODE == 1:
        strength = strength_value
    elif STRENGTH_MODE == 2:
        strength = tl.load(strength_ptr + row).to(COMPUTE)
    h = suppress(h, scale, strength, HAS_SCALE, STRENGTH_MODE)
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + cols, mask=mask, other=0.0).to(COMPUTE)
        h = add_shift(h, shift, strength, STRENGTH_MODE)
    tl.store(out_ptr + row * stride_out + cols, h.to(out_ptr.dtype.element_ty), mask=mask)


# 1024 columns on 4 warps: 8 elements a thread, one or two 16-byte accesses per tensor.
BLOCK, NUM_WARPS = 1024, 4


def launch_config(n_cols):
    block = min(BLOCK, max(16, triton.next_power_of_2(n_cols)))
    return block, max(1, min(NUM_WARPS, block // 256))


def act_mul_scale(out, gate, up, scale, gate_scale, strength, strength_value, act, shift=None):
    """out[R, I] = act(gate * gate_scale) * up * s_eff + strength * shift (up None: the
    non-gated form).

    gate, up, out: [R, I] with unit column stride; scale, gate_scale, shift: [I]; strength: [R].
    """
    rows, cols = gate.shape
    if rows == 0 or cols == 0:
        return out
    block, num_warps = launch_config(cols)
    grid = (rows, triton.cdiv(cols, block))
    act_mul_scale_kernel[grid](
        out, gate, gate if up is None else up,
        gate if scale is None else scale, gate if gate_scale is None else gate_scale,
        gate if strength is None else strength, gate if shift is None else shift,
        1.0 if strength_value is None else float(strength_value),
        cols, gate.stride(0), 0 if up is None else up.stride(0), out.stride(0),
        HAS_UP=up is not None, HAS_SCALE=scale is not None,
        HAS_GATE_SCALE=gate_scale is not None, HAS_SHIFT=shift is not None,
        STRENGTH_MODE=strength_mode(strength, strength_value), ACT=act,
        COMPUTE=compute_dtype(gate.dtype), BLOCK=block, num_warps=num_warps,
    )
    return out
