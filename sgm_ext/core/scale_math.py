"""The scale math, in one place: effective scale, the methods that make scales, and the checks.

Every backend, patch mode, the profiler and the readers of other projects' files call these,
so that they agree bit for bit (DESIGN.md section 2):

- s_eff = 1 - strength (1 - scale), evaluated as `strength * scale + (1 - strength)` in the
  scale's dtype: exact at both ends (strength 0 gives 1, strength 1 gives the scale itself),
  the form the CUDA, C++ and Triton kernels use too;
- AurA's factor alpha = 1 - 2 (AUROC - 0.5) for expert neurons, 1 for the others; the
  baselines `det0` (alpha 0) and `damp` (a constant alpha);
- the shift of an affine site (y = s_eff x + strength * b: AcT's transport maps, steering
  vectors) is strength * b, evaluated with the same rounded strength as s_eff;
- strengths lie in [0, 1]; scales are finite, >= 0, and > 1 (amplification) only when asked;
  shifts are finite.
"""
from typing import Optional, Union

import torch
from torch import Tensor

METHODS = ("aura", "det0", "damp")

Strength = Union[float, Tensor]


# ---------------------------------------------------------------- s_eff

def effective_scale(scale: Tensor, strength: Optional[Strength]) -> Tensor:
    """s_eff = strength * scale + (1 - strength), in scale's dtype.

    scale: [..., n]; strength: None or 1.0 (the scale itself, the same tensor), a float, or a
    tensor that broadcasts against scale (e.g. [R, 1] against [n]: one strength per row). A
    float is rounded to the scale's dtype first, so a float strength and a tensor holding the
    same value give identical bits.
    """
    if strength is None:
        return scale
    if isinstance(strength, Tensor):
        st = strength.to(scale.dtype)
    else:
        if strength == 1.0:
            return scale
        # rounded as a Python number: a device tensor made from it would be a host-to-device
        # copy per call (refused under CUDA graph capture)
        st = torch.tensor(float(strength), dtype=scale.dtype).item()
    return st * scale + (1.0 - st)


def effective_shift(shift: Tensor, strength: Optional[Strength]) -> Tensor:
    """strength * b, in shift's dtype: the added part of y = s_eff x + strength * b.

    Same strength forms and rounding as effective_scale (None or 1.0: the shift itself, the
    same tensor), so strength 0 adds exactly 0 and strength 1 adds b bit for bit.
    """
    if strength is None:
        return shift
    if isinstance(strength, Tensor):
        return strength.to(shift.dtype) * shift
    if strength == 1.0:
        return shift
    return torch.tensor(float(strength), dtype=shift.dtype).item() * shift


# ---------------------------------------------------------------- methods

def aura_alpha(auroc: Tensor) -> Tensor:
    """AurA's factor for an expert neuron: 1 - 2 (AUROC - 0.5), same shape and dtype."""
    return 1.0 - 2.0 * (auroc - 0.5)


def check_method(method: str, alpha: Optional[float] = None) -> None:
    """ValueError unless `method` is one of METHODS and `alpha` fits it (damp needs one)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "damp":
        if alpha is None or not (0.0 <= alpha <= 1.0):
            raise ValueError(f"method 'damp' needs alpha in [0, 1], got {alpha!r}")
    elif alpha is not None:
        raise ValueError(f"alpha is for method 'damp' only (method is {method!r})")


def method_scales(auroc: Tensor, experts: Tensor, method: str = "aura",
                  alpha: Optional[float] = None) -> Tensor:
    """Per-neuron factors [n] float32: the method's alpha where `experts` ([n] bool), else 1.

    auroc: [n] (float64 from the profiler). aura: 1 - 2 (AUROC - 0.5); det0: 0; damp: alpha.
    """
    check_method(method, alpha)
    if method == "aura":
        value = aura_alpha(auroc)
    else:
        value = torch.full_like(auroc, 0.0 if method == "det0" else float(alpha))
    return torch.where(experts, value, torch.ones_like(auroc)).to(torch.float32)


# ---------------------------------------------------------------- checks

def check_strength(strength: Strength, *, per_sequence: bool = True,
                   name: str = "strength") -> Strength:
    """A float in [0, 1] (returned as float), or, with per_sequence, a float tensor [B] or
    [B, 1] of them (returned as float32 [B]). ValueError / TypeError naming the bad entry."""
    if isinstance(strength, Tensor):
        if not per_sequence:
            raise TypeError(f"{name} must be a float here, got a tensor")
        if strength.dim() == 2 and strength.shape[1] == 1:
            strength = strength[:, 0]
        if strength.dim() != 1 or strength.numel() == 0 or not strength.is_floating_point():
            raise ValueError(f"a {name} tensor must be float with shape [B] or [B, 1] (one "
                             f"per sequence), got {strength.dtype} {tuple(strength.shape)}")
        bad = ~(torch.isfinite(strength) & (strength >= 0) & (strength <= 1))
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"{name}[{i}] is {strength[i].item()}: strengths lie in [0, 1]")
        return strength.detach().to(torch.float32)
    if isinstance(strength, bool) or not isinstance(strength, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(strength).__name__}")
    value = float(strength)
    if not 0.0 <= value <= 1.0:  # NaN fails this too
        raise ValueError(f"{name} is {value}; {name} must be in [0, 1] (0: no change, 1: the "
                         "full scales)")
    return value


def check_fraction(value: float, name: str) -> float:
    """A number in [0, 1] (thresholds, alphas); ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def illegal_counts(t: Tensor) -> dict:
    """{"not finite", "negative", "above 1"}: how many of a site's scales break each rule
    (above 1 is legal only as asked-for amplification)."""
    finite = torch.isfinite(t)
    return {"not finite": int((~finite).sum()), "negative": int((t < 0).sum()),
            "above 1": int((finite & (t > 1)).sum())}


def check_scale_values(site: str, t: Tensor, allow_amplify: bool = False) -> None:
    """ValueError naming the first illegal entry of a site's scales: not finite, < 0, or > 1
    (unless allow_amplify)."""
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"scales[{site!r}][{i}] is {t[i].item()}: scales must be finite")
    if (t < 0).any():
        i = int((t < 0).nonzero()[0])
        raise ValueError(f"scales[{site!r}][{i}] is {t[i].item()}: scales must be >= 0")
    if not allow_amplify and (t > 1).any():
        i = int((t > 1).nonzero()[0])
        raise ValueError(f"scales[{site!r}][{i}] is {t[i].item()} > 1 (amplification); "
                         "pass allow_amplify=True if that is intended")


def check_shift_values(site: str, t: Tensor) -> None:
    """ValueError naming the first entry of a site's shift that is not finite."""
    bad = ~torch.isfinite(t)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ValueError(f"shifts[{site!r}][{i}] is {t[i].item()}: shifts must be finite")
