"""Fold mode: the scales multiplied into the weights (rows of the Linear a site is the output
of, columns of down / fc2 for `mid`, columns of the first projections for `input`), the shifts
into the biases; the touched slices are saved first and copied back on unpatch, so restoring is
bit-exact."""
from typing import NamedTuple

import torch
from torch import nn

from .strength import ScalesAtStrength

NEEDS_ONE_STRENGTH = ("fold mode bakes one strength into the weights; per-sequence "
                      "strength needs mode='fused' or mode='hook'")


def fold_plan(targets, strength):
    """The edits folding every target at `strength` (a float Strength) makes: raises, naming
    the module, where a Linear cannot be folded (so before anything changes)."""
    strength.require_uniform(NEEDS_ONE_STRENGTH)
    return [edit for t in targets for edit in _mlp_plan(t, strength)]


def _lora_parts(lin):
    """A PEFT LoRA Linear: (base Linear, [lora_A Linears], [lora_B Linears]); else None."""
    if not (hasattr(lin, "base_layer") and hasattr(lin, "lora_A") and hasattr(lin, "lora_B")):
        return None
    return lin.base_layer, list(lin.lora_A.values()), list(lin.lora_B.values())


def _plain_weight(lin, where):
    w = getattr(lin, "weight", None)
    if type(lin) is not nn.Linear or not isinstance(w, nn.Parameter) \
            or not w.is_floating_point() or w.device.type == "meta":
        raise ValueError(f"fold mode cannot fold scales into {where}: it is a "
                         f"{type(lin).__name__} without a plain float weight (quantized, packed "
                         "or offloaded weights); use mode='fused' or mode='hook'")
    return w


def _fold_params(lin, axis, where):
    """[(tensor, dim)] to multiply for scaling a linear-like module's outputs (axis "rows")
    or its inputs (axis "cols"). LoRA: base and lora_B rows, or base and lora_A columns."""
    lora = _lora_parts(lin)
    if lora is not None:
        if len(getattr(lin, "lora_magnitude_vector", ())):
            raise ValueError(f"fold mode cannot fold scales into {where}: DoRA's weight "
                             "normalisation does not commute with scaling; use mode='fused'")
        base, a_layers, b_layers = lora
        for i, extra in enumerate(a_layers + b_layers):
            _plain_weight(extra, f"{where} (LoRA adapter {i})")
        if axis == "cols":
            return _fold_params(base, axis, where) + [(a.weight, 1) for a in a_layers]
        return _fold_params(base, axis, where) + [(b.weight, 0) for b in b_layers] + \
            [(b.bias, 0) for b in b_layers if b.bias is not None]
    w = _plain_weight(lin, where)
    if axis == "cols":
        return [(w, 1)]
    return [(w, 0)] + ([(lin.bias, 0)] if lin.bias is not None else [])


class _Scale(NamedTuple):
    """Fold edit: multiply slices `index` along `dim` of `tensor` by `factors`."""
    tensor: torch.Tensor
    dim: int
    index: torch.Tensor
    factors: torch.Tensor


class _Bias(NamedTuple):
    """Fold edit: set a Linear's bias (created when it has none) to `value` (float64, rounded
    once to the weight's dtype when set)."""
    linear: nn.Module
    value: torch.Tensor


def _shift_biases(target, at, where):
    """{Linear attribute: new bias [out] float64} for the Linears a shift folds into.

    A Linear L with output y = W x + c whose output site has s_eff and shift b, and whose
    input is a site with shift b_in (`mid` for down / fc2, `input` for the first projections:
    W (s x + b_in) = (W diag(s)) x + W b_in), computes after folding s_eff (W (x + b_in) + c)
    + b: its new bias is s_eff (c + W b_in) + b, from the weights as they are before any fold,
    in float64.
    """
    info, m = target.info, target.module
    eff, shifts = at.folded()
    biases = {}
    for kind, b in shifts.items():
        if not b.any():  # strength 0 or a zero vector: nothing to add, no bias to create
            continue
        for attr, reads_input in info.fold_points(kind):
            lin = getattr(m, attr)
            if _lora_parts(lin) is not None:
                raise ValueError(f"fold mode cannot fold the shift of {info.site(kind)} into "
                                 f"{where(attr)}, a LoRA layer; use mode='fused' or mode='hook'")
            w = _plain_weight(lin, where(attr))
            if attr not in biases:
                biases[attr] = (lin.bias.detach().double().cpu().clone() if lin.bias is not None
                                else torch.zeros(w.shape[0], dtype=torch.float64))
            if reads_input:
                biases[attr] += w.detach().double().cpu() @ b.double()
    for attr, c in biases.items():  # the output site's scale and shift of each such Linear
        for kind in target.kinds():
            if (attr, False) in info.fold_points(kind):
                if kind in eff:
                    c.mul_(eff[kind].double())
                if kind in shifts:
                    c.add_(shifts[kind].double())
    return biases


def _mlp_plan(target, strength):
    """[_Scale | _Bias] for one MLP: the slices fold mode multiplies and the biases it sets."""
    info, m = target.info, target.module

    def where(attr):
        return f"{info.path}.{attr}"

    at = ScalesAtStrength(target.scales, target.shifts, strength, info.path)
    biases = _shift_biases(target, at, where)
    eff, _ = at.folded()
    plan = []
    for kind, e in eff.items():
        idx = (e != 1.0).nonzero().flatten()
        if idx.numel() == 0:
            continue
        for attr, reads_input in info.fold_points(kind):  # an input scales columns, else rows
            lin = getattr(m, attr)
            for tensor, dim in _fold_params(lin, "cols" if reads_input else "rows", where(attr)):
                if attr in biases and tensor is lin.bias:
                    continue  # set as a whole below
                plan.append(_Scale(tensor, dim, idx, e[idx]))
    return plan + [_Bias(getattr(m, attr), c) for attr, c in biases.items()]


def apply_fold(plan):
    """Save every touched slice and bias, then multiply and set; returns what restores them:
    [(tensor, dim, index, saved slice)] and [(Linear, its bias Parameter or None, saved)]."""
    scales = [e for e in plan if isinstance(e, _Scale)]
    biases = [e for e in plan if isinstance(e, _Bias)]
    saved = [(t, dim, idx, t.detach().index_select(dim, idx.to(t.device)).clone())
             for t, dim, idx, _ in scales]
    saved_biases = [(lin, lin.bias, None if lin.bias is None else lin.bias.detach().clone())
                    for lin, _ in biases]
    with torch.no_grad():
        for t, dim, idx, factors in scales:
            i = idx.to(t.device)
            shape = [1] * t.dim()
            shape[dim] = -1
            cd = torch.promote_types(t.dtype, torch.float32)  # fp32 math (fp64 stays fp64)
            part = t.index_select(dim, i).to(cd) * factors.to(t.device, cd).view(shape)
            t.index_copy_(dim, i, part.to(t.dtype))
        for lin, value in biases:
            w = lin.weight
            if lin.bias is None:
                lin.bias = nn.Parameter(value.to(w.device, w.dtype),
                                        requires_grad=w.requires_grad)
            else:
                lin.bias.copy_(value)
    return saved, saved_biases


def undo_fold(saved):
    slices, biases = saved
    with torch.no_grad():
        for t, dim, idx, original in reversed(slices):
            t.index_copy_(dim, idx.to(t.device), original.to(t.device, t.dtype))
        for lin, param, original in reversed(biases):
            if param is None:
                lin.bias = None  # the Linear had no bias: remove the one fold created
            else:
                param.copy_(original)
                lin.bias = param
