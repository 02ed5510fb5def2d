"""The `torch` backend: the reference math of every op, in plain torch.

All functions work on 2-D views: rows = the flattened leading dims, columns = the I neurons.
Math runs in fp32 (fp64 for fp64 inputs, which gradcheck needs); the result is rounded once
to the output dtype (torch's casts round to nearest even). The autograd formulas of the ops
live here too, so every backend shares one backward.
"""
import torch

from ..core import scale_math
from ..core.activations import activation, activation_grad


def compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_scale(scale, strength, strength_value):
    """s_eff shaped to broadcast over [R, I] (None: no scaling): scale_math.effective_scale
    with the per-row strength [R] (or None) as a column, else the float strength_value."""
    if scale is None:
        return None
    if strength is not None:
        return scale_math.effective_scale(scale, strength[:, None])
    return scale_math.effective_scale(scale, strength_value)


def effective_shift(shift, strength, strength_value):
    """strength * shift shaped to broadcast over [R, I] (None: no shift), as
    effective_scale."""
    if shift is None:
        return None
    if strength is not None:
        return scale_math.effective_shift(shift, strength[:, None])
    return scale_math.effective_shift(shift, strength_value)


def _scaled_product(g, u, scale, gate_scale, strength, strength_value, act, shift=None):
    """act(g * gate_scale) * u * s_eff + strength * shift, every tensor already in the
    compute dtype."""
    if gate_scale is not None:
        g = g * gate_scale
    h = activation(g, act)
    if u is not None:
        h = h * u
    s = effective_scale(scale, strength, strength_value)
    h = h if s is None else h * s
    b = effective_shift(shift, strength, strength_value)
    return h if b is None else h + b


def _cast(t, dtype):
    return None if t is None else t.to(dtype)


def act_mul_scale(out, gate, up, scale, gate_scale, strength, strength_value, act, shift=None):
    """out[R, I] = act(gate * gate_scale) * up * s_eff + strength * shift; up None gives the
    non-gated form."""
    cd = compute_dtype(gate.dtype)
    h = _scaled_product(gate.to(cd), _cast(up, cd), _cast(scale, cd), _cast(gate_scale, cd),
                        _cast(strength, cd), strength_value, act, _cast(shift, cd))
    out.copy_(h)
    return out


def gated_up_proj(out, x, w_gate, w_up, scale, gate_scale, strength, strength_value, act):
    """out[R, I] = act((x @ w_gate.T) * gate_scale) * (x @ w_up.T) * s_eff."""
    cd = compute_dtype(x.dtype)
    xc = x.to(cd)
    g = xc @ w_gate.to(cd).T
    u = xc @ w_up.to(cd).T
    h = _scaled_product(g, u, _cast(scale, cd), _cast(gate_scale, cd), _cast(strength, cd),
                        strength_value, act)
    out.copy_(h)
    return out


def act_mul_scale_backward(grad, gate, up, scale, gate_scale, strength, strength_value, act,
                           shift=None):
    """Gradients of act_mul_scale on 2-D inputs, in the compute dtype.

    Returns (d_gate, d_up, d_scale, d_gate_scale, d_strength, d_shift); d_up is None when up
    is None.
    """
    cd = compute_dtype(gate.dtype)
    go = grad.to(cd)
    g0 = gate.to(cd)
    gs = _cast(gate_scale, cd)
    g = g0 if gs is None else g0 * gs
    a = activation(g, act)
    da = activation_grad(g, act)
    u = _cast(up, cd)
    au = a if u is None else a * u
    sc = _cast(scale, cd)
    st = _cast(strength, cd)
    s = effective_scale(sc, st, strength_value)
    go_s = go if s is None else go * s
    d_up = None if u is None else go_s * a
    d_g = go_s * da if u is None else go_s * u * da  # gradient w.r.t. g = gate * gate_scale
    d_gate = d_g if gs is None else d_g * gs
    d_gate_scale = None if gs is None else (d_g * g0).sum(0)
    d_scale = d_strength = d_shift = None
    b = _cast(shift, cd)
    if b is not None:  # d (strength b) / d b = strength; d / d strength = b
        if st is not None:
            d_shift = (go * st[:, None]).sum(0)
        else:
            d_shift = go.sum(0) * (1.0 if strength_value is None else strength_value)
    if st is not None and (sc is not None or b is not None):
        d_strength = torch.zeros_like(st)
        if b is not None:
            d_strength = d_strength + (go * b).sum(1)
    if sc is not None:
        go_au = go * au
        # d s_eff / d scale = strength (1 with no strength); d s_eff / d strength = scale - 1
        if st is not None:
            d_scale = (go_au * st[:, None]).sum(0)
            d_strength = d_strength + (go_au * (sc - 1.0)).sum(1)
        elif strength_value is not None:
            d_scale = go_au.sum(0) * strength_value
        else:
            d_scale = go_au.sum(0)
    return d_gate, d_up, d_scale, d_gate_scale, d_strength, d_shift
