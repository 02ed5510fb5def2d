"""Public fused ops: gated-MLP activation x product x per-neuron scale.

Each op is a `torch.library` custom op (schema, fake implementation, autograd), so it works
under `torch.compile(fullgraph=True)` and passes `torch.library.opcheck`. The op body picks
a backend at run time (sgm_ext.backends) and calls it on 2-D row views; the backward is the
reference math of sgm_ext.reference, shared by all backends.

Contract (DESIGN.md section 4): out = act(gate * gate_scale) * up * s_eff + strength * shift
with s_eff = 1 - strength (1 - scale) (the shift: an affine site's b, e.g. AcT's transport map
on the MLP's product); math in fp32, output rounded to the input dtype.
"""
from typing import Optional, Union

import torch
from torch import Tensor

from ..core.activations import canonical_activation
from . import backends, reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---------------------------------------------------------------- helpers on [..., n] tensors

def _rows(t, n):
    """[..., n] -> [R, n] with unit column stride (a view when the layout allows)."""
    if t is None:
        return None
    t2 = t.reshape(-1, n)
    return t2 if t2.stride(-1) == 1 or n <= 1 else t2.contiguous()


def _new_out(like, n):
    return torch.empty((*like.shape[:-1], n), dtype=like.dtype, device=like.device)


def _run_elementwise(gate, up, scale, gate_scale, strength, strength_value, act, out, shift):
    n = out.shape[-1]
    fn = backends.select("act_mul_scale", out.device.type)
    if shift is None:  # the scale-only call, as backends built before shifts take it
        fn(out.view(-1, n), gate, up, scale, gate_scale, strength, strength_value, act)
    else:
        fn(out.view(-1, n), gate, up, scale, gate_scale, strength, strength_value, act, shift)
    return out


def _vector_grad(d, like):
    return None if d is None else d.to(like.dtype)


_is_functorch_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", lambda t: False)


def _needs_dispatcher(*tensors):
    """Whether a call must go through the registered custom op rather than straight to its
    implementation: when gradients flow, when torch.compile traces, or for tensor subclasses
    and functorch-wrapped tensors. Plain inference skips the dispatcher's Python layers,
    which cost several times the op itself at decode sizes."""
    if torch.compiler.is_compiling():
        return True
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is not None and (type(t) is not Tensor or (grad and t.requires_grad)
                              or _is_functorch_wrapped(t)):
            return True
    return False


# ---------------------------------------------------------------- act_mul_scale

def _act_mul_scale_impl(gate: Tensor, up: Tensor, scale: Optional[Tensor],
                        gate_scale: Optional[Tensor], strength: Optional[Tensor],
                        strength_value: Optional[float], act: str,
                        shift: Optional[Tensor] = None) -> Tensor:
    n = gate.shape[-1]
    return _run_elementwise(_rows(gate, n), _rows(up, n), scale, gate_scale, strength,
                            strength_value, act, _new_out(gate, n), shift)


_act_mul_scale = torch.library.custom_op("sgm_ext::act_mul_scale", _act_mul_scale_impl,
                                      mutates_args=())


@_act_mul_scale.register_fake
def _(gate, up, scale, gate_scale, strength, strength_value, act, shift=None):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)


def _save_elementwise(ctx, inputs, output):
    *tensors, ctx.strength_value, ctx.act, shift = inputs
    ctx.save_for_backward(*tensors, shift)


def _save_gemm(ctx, inputs, output):
    *tensors, ctx.strength_value, ctx.act = inputs
    ctx.save_for_backward(*tensors)


def _act_mul_scale_bwd(ctx, grad):
    gate, up, scale, gate_scale, strength, shift = ctx.saved_tensors
    n = gate.shape[-1]
    d_gate, d_up, d_scale, d_gs, d_st, d_shift = reference.act_mul_scale_backward(
        _rows(grad, n), _rows(gate, n), _rows(up, n), scale, gate_scale, strength,
        ctx.strength_value, ctx.act, shift)
    return (d_gate.view(gate.shape).to(gate.dtype), d_up.view(up.shape).to(up.dtype),
            _vector_grad(d_scale, scale), _vector_grad(d_gs, gate_scale),
            _vector_grad(d_st, strength), None, None, _vector_grad(d_shift, shift))


_act_mul_scale.register_autograd(_act_mul_scale_bwd, setup_context=_save_elementwise)


def act_mul_scale_prechecked(gate, up, scale, gate_scale, act, shift=None):
    """act_mul_scale (up None: act_scale) for a caller that checked scale, gate_scale, shift
    and act beforehand and applies them on every call, as a patched MLP does: float32 vectors
    of the inputs' width on their device, no gradient, a canonical activation name, no
    strength (a float strength is in the vectors already).

    Plain inference goes straight to the backend; anything else (autograd, torch.compile,
    tensor subclasses) takes the public op. The public op's checks and dispatch layers cost
    about three times an eager elementwise op per call (bench/RESULTS.md), and in a decode step
    each Python line runs with cold caches (the weights streamed between two calls evict
    them), so with the compiled backends the fast path is one call into C++.
    """
    if not _needs_dispatcher(gate, up):
        device_type = gate.device.type
        if shift is None:
            alloc = backends.select_alloc(device_type)
            if alloc is not None:
                return alloc(gate, up, scale, gate_scale, act)
        else:
            alloc = backends.select_alloc(device_type, shift=True)
            if alloc is not None:
                return alloc(gate, up, scale, gate_scale, act, shift)
        if (gate.is_contiguous() and gate.dtype in DTYPES
                and (up is None or (up.is_contiguous() and up.shape == gate.shape
                                    and up.dtype == gate.dtype))):
            n = gate.shape[-1]
            out = torch.empty_like(gate)
            _run_elementwise(gate.view(-1, n), None if up is None else up.view(-1, n), scale,
                             gate_scale, None, None, act, out, shift)
            return out
    if up is None:
        return act_scale(gate, scale, act=act, shift=shift)
    return act_mul_scale(gate, up, scale, act=act, gate_scale=gate_scale, shift=shift)


# ---------------------------------------------------------------- packed [..., 2I] layout

def _act_mul_scale_packed_impl(gate_up: Tensor, scale: Optional[Tensor],
                               gate_scale: Optional[Tensor], strength: Optional[Tensor],
                               strength_value: Optional[float], act: str,
                               shift: Optional[Tensor] = None) -> Tensor:
    n = gate_up.shape[-1] // 2
    rows = _rows(gate_up, 2 * n)
    return _run_elementwise(rows[:, :n], rows[:, n:], scale, gate_scale, strength,
                            strength_value, act, _new_out(gate_up, n), shift)


_act_mul_scale_packed = torch.library.custom_op("sgm_ext::act_mul_scale_packed",
                                             _act_mul_scale_packed_impl, mutates_args=())


@_act_mul_scale_packed.register_fake
def _(gate_up, scale, gate_scale, strength, strength_value, act, shift=None):
    return gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2))


def _act_mul_scale_packed_bwd(ctx, grad):
    gate_up, scale, gate_scale, strength, shift = ctx.saved_tensors
    n = gate_up.shape[-1] // 2
    rows = _rows(gate_up, 2 * n)
    d_gate, d_up, d_scale, d_gs, d_st, d_shift = reference.act_mul_scale_backward(
        _rows(grad, n), rows[:, :n], rows[:, n:], scale, gate_scale, strength,
        ctx.strength_value, ctx.act, shift)
    d_gate_up = torch.cat([d_gate, d_up], dim=1).view(gate_up.shape).to(gate_up.dtype)
    return (d_gate_up, _vector_grad(d_scale, scale), _vector_grad(d_gs, gate_scale),
            _vector_grad(d_st, strength), None, None, _vector_grad(d_shift, shift))


_act_mul_scale_packed.register_autograd(_act_mul_scale_packed_bwd, setup_context=_save_elementwise)


# ---------------------------------------------------------------- non-gated act_scale

def _act_scale_impl(x: Tensor, scale: Optional[Tensor], strength: Optional[Tensor],
                    strength_value: Optional[float], act: str,
                    shift: Optional[Tensor] = None) -> Tensor:
    n = x.shape[-1]
    return _run_elementwise(_rows(x, n), None, scale, None, strength, strength_value, act,
                            _new_out(x, n), shift)


_act_scale = torch.library.custom_op("sgm_ext::act_scale", _act_scale_impl, mutates_args=())


@_act_scale.register_fake
def _(x, scale, strength, strength_value, act, shift=None):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _act_scale_bwd(ctx, grad):
    x, scale, strength, shift = ctx.saved_tensors
    n = x.shape[-1]
    d_x, _, d_scale, _, d_st, d_shift = reference.act_mul_scale_backward(
        _rows(grad, n), _rows(x, n), None, scale, None, strength, ctx.strength_value, ctx.act,
        shift)
    return (d_x.view(x.shape).to(x.dtype), _vector_grad(d_scale, scale),
            _vector_grad(d_st, strength), None, None, _vector_grad(d_shift, shift))


_act_scale.register_autograd(_act_scale_bwd, setup_context=_save_elementwise)


# ---------------------------------------------------------------- gated_up_proj (GEMM + epilogue)

def _gated_up_proj_impl(x: Tensor, w_gate: Tensor, w_up: Tensor, scale: Optional[Tensor],
                   gate_scale: Optional[Tensor], strength: Optional[Tensor],
                   strength_value: Optional[float], act: str) -> Tensor:
    n = w_gate.shape[0]
    out = _new_out(x, n)
    fn = backends.select("gated_up_proj", x.device.type)
    fn(out.view(-1, n), x.reshape(-1, x.shape[-1]), w_gate, w_up, scale, gate_scale, strength,
       strength_value, act)
    return out


_gated_up_proj = torch.library.custom_op("sgm_ext::gated_up_proj", _gated_up_proj_impl,
                                      mutates_args=())


@_gated_up_proj.register_fake
def _(x, w_gate, w_up, scale, gate_scale, strength, strength_value, act):
    return x.new_empty((*x.shape[:-1], w_gate.shape[0]))


def _gated_up_proj_bwd(ctx, grad):
    x, w_gate, w_up, scale, gate_scale, strength = ctx.saved_tensors
    cd = reference.compute_dtype(x.dtype)
    x2 = x.reshape(-1, x.shape[-1]).to(cd)
    wg, wu = w_gate.to(cd), w_up.to(cd)
    # Recompute the two projections, then the elementwise backward gives their gradients.
    d_g, d_u, d_scale, d_gs, d_st, _ = reference.act_mul_scale_backward(
        grad.reshape(-1, wg.shape[0]), x2 @ wg.T, x2 @ wu.T, scale, gate_scale, strength,
        ctx.strength_value, ctx.act)
    d_x = (d_g @ wg + d_u @ wu).view(x.shape).to(x.dtype)
    return (d_x, (d_g.T @ x2).to(w_gate.dtype), (d_u.T @ x2).to(w_up.dtype),
            _vector_grad(d_scale, scale), _vector_grad(d_gs, gate_scale),
            _vector_grad(d_st, strength), None, None)


_gated_up_proj.register_autograd(_gated_up_proj_bwd, setup_context=_save_gemm)


# ---------------------------------------------------------------- argument checks

def _check_input(name, t):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16 "
                        "(float64 for gradient checks)")
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension")


def _check_like(name, t, ref, shape=None):
    _check_input(name, t)
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}, expected {ref.dtype} on {ref.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")


def _check_vector(name, v, n, ref):
    """scale / gate_scale / shift: None or [n] float32 (float64 allowed beside float64
    inputs)."""
    if v is None:
        return None
    if not isinstance(v, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(v).__name__}")
    if v.shape != (n,):
        raise ValueError(f"{name} has shape {tuple(v.shape)}, expected ({n},): one value per "
                         "neuron")
    allowed = (torch.float32, torch.float64) if ref.dtype == torch.float64 else (torch.float32,)
    if v.dtype not in allowed:
        raise TypeError(f"{name} must be float32, got {v.dtype}")
    if v.device != ref.device:
        raise ValueError(f"{name} is on {v.device}, inputs are on {ref.device}")
    return v


def _strength_args(strength, scale, lead_shape, ref, shift=None):
    """Normalise strength to (per-row tensor [R] or None, float or None).

    Strength only acts through the scale and the shift, so without both it is dropped; a
    float 1.0 is the same as no strength (and keeps s_eff == scale bit for bit).
    """
    if strength is None or (scale is None and shift is None):
        return None, None
    if isinstance(strength, Tensor):
        if strength.device != ref.device:
            raise ValueError(f"strength is on {strength.device}, inputs are on {ref.device}")
        try:
            rows = strength.to((scale if scale is not None else shift).dtype) \
                .broadcast_to(lead_shape)
        except RuntimeError:
            raise ValueError(f"strength of shape {tuple(strength.shape)} does not broadcast to "
                             f"the leading dims {tuple(lead_shape)} (use e.g. [B, 1] for "
                             "[B, T, I] inputs)") from None
        return rows.reshape(-1), None
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError("strength must be None, a float or a tensor, got "
                        f"{type(strength).__name__}")
    value = float(strength)
    return None, (None if value == 1.0 else value)


# ---------------------------------------------------------------- public API

def act_mul_scale(gate: Tensor, up: Tensor, scale: Optional[Tensor] = None, *, act: str = "silu",
                  gate_scale: Optional[Tensor] = None,
                  strength: Union[None, float, Tensor] = None,
                  shift: Optional[Tensor] = None) -> Tensor:
    """act(gate * gate_scale) * up * s_eff + strength * shift, s_eff = 1 - strength (1 - scale).

    gate, up: [..., I] fp32 / fp16 / bf16, same shape; scale, gate_scale, shift: [I] float32
    or None; strength: None, a float, or a tensor broadcastable to the leading dims ([B, 1]
    for [B, T, I]: one strength per sequence). Returns [..., I] in the input dtype.
    """
    act = canonical_activation(act)
    _check_input("gate", gate)
    _check_like("up", up, gate, gate.shape)
    n = gate.shape[-1]
    scale = _check_vector("scale", scale, n, gate)
    gate_scale = _check_vector("gate_scale", gate_scale, n, gate)
    shift = _check_vector("shift", shift, n, gate)
    st, sv = _strength_args(strength, scale, gate.shape[:-1], gate, shift)
    op = (_act_mul_scale if _needs_dispatcher(gate, up, scale, gate_scale, st, shift)
          else _act_mul_scale_impl)
    return op(gate, up, scale, gate_scale, st, sv, act, shift)


def act_mul_scale_packed(gate_up: Tensor, scale: Optional[Tensor] = None, *, act: str = "silu",
                         gate_scale: Optional[Tensor] = None,
                         strength: Union[None, float, Tensor] = None,
                         shift: Optional[Tensor] = None) -> Tensor:
    """act_mul_scale on a concatenated [..., 2I] input: gate first, then up (Phi-3, vLLM).
    scale, gate_scale, shift: [I]; returns [..., I]."""
    act = canonical_activation(act)
    _check_input("gate_up", gate_up)
    if gate_up.shape[-1] % 2:
        raise ValueError(f"gate_up's last dim is {gate_up.shape[-1]}; the packed layout needs 2*I")
    n = gate_up.shape[-1] // 2
    scale = _check_vector("scale", scale, n, gate_up)
    gate_scale = _check_vector("gate_scale", gate_scale, n, gate_up)
    shift = _check_vector("shift", shift, n, gate_up)
    st, sv = _strength_args(strength, scale, gate_up.shape[:-1], gate_up, shift)
    op = (_act_mul_scale_packed if _needs_dispatcher(gate_up, scale, gate_scale, st, shift)
          else _act_mul_scale_packed_impl)
    return op(gate_up, scale, gate_scale, st, sv, act, shift)


def act_scale(x: Tensor, scale: Optional[Tensor] = None, *, act: str,
              strength: Union[None, float, Tensor] = None,
              shift: Optional[Tensor] = None) -> Tensor:
    """act(x) * s_eff + strength * shift: the non-gated MLP's neurons (CLIP / SigLIP fc1).
    x: [..., I]; scale, shift: [I] float32; returns [..., I] in x's dtype."""
    act = canonical_activation(act)
    _check_input("x", x)
    n = x.shape[-1]
    scale = _check_vector("scale", scale, n, x)
    shift = _check_vector("shift", shift, n, x)
    st, sv = _strength_args(strength, scale, x.shape[:-1], x, shift)
    op = _act_scale if _needs_dispatcher(x, scale, st, shift) else _act_scale_impl
    return op(x, scale, st, sv, act, shift)


def gated_up_proj(x: Tensor, w_gate: Tensor, w_up: Tensor, scale: Optional[Tensor] = None, *,
                  act: str = "silu", gate_scale: Optional[Tensor] = None,
                  strength: Union[None, float, Tensor] = None) -> Tensor:
    """act((x @ w_gate.T) * gate_scale) * (x @ w_up.T) * s_eff in one kernel on CUDA.

    x: [..., H]; w_gate, w_up: [I, H] (nn.Linear weights, no bias) in x's dtype; scale,
    gate_scale: [I] float32. Returns [..., I] in x's dtype.
    """
    act = canonical_activation(act)
    _check_input("x", x)
    _check_input("w_gate", w_gate)
    if w_gate.dim() != 2 or w_gate.shape[1] != x.shape[-1]:
        raise ValueError(f"w_gate has shape {tuple(w_gate.shape)}, expected [I, {x.shape[-1]}]")
    _check_like("w_gate", w_gate, x)
    _check_like("w_up", w_up, x, w_gate.shape)
    n = w_gate.shape[0]
    scale = _check_vector("scale", scale, n, x)
    gate_scale = _check_vector("gate_scale", gate_scale, n, x)
    st, sv = _strength_args(strength, scale, x.shape[:-1], x)
    op = (_gated_up_proj if _needs_dispatcher(x, w_gate, w_up, scale, gate_scale, st)
          else _gated_up_proj_impl)
    return op(x, w_gate, w_up, scale, gate_scale, st, sv, act)
