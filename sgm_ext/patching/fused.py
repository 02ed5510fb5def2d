"""Fused mode: the swapped-in MLP forward (Fused), which calls the MLP's own sub-modules and one
sgm_ext op for activation x product x scales, with its fast path for decoding; FusedWithInput
changes the MLP's input first (the `input` site)."""
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import allocating_op
from ..ops import custom_ops as ops
from .state import PatchState
from .strength import ScalesAtStrength

_GEMM_DTYPES = (torch.float16, torch.bfloat16)
# With SGM_EXT_GATED_UP_PROJ=1, plain fp16 / bf16 Linears without bias on CUDA take
# ops.gated_up_proj (both projections and the epilogue in one Triton kernel); off by default,
# since on an H100 that kernel is slower than cuBLAS's two GEMMs plus the elementwise op
# (bench/RESULTS.md, GPU).
GATED_UP_PROJ = os.environ.get("SGM_EXT_GATED_UP_PROJ") == "1"


def _affine_after(x, linear, factor, shift):
    """factor * linear(x) + shift (factor None: linear(x) + shift) in one pass after it. An
    output in another dtype or device than the bound vectors (the model moved) comes back
    unchanged: the fast forward then remakes its state and the general forward applies the
    site."""
    y = linear(x)
    if y.dtype != shift.dtype or y.device != shift.device:
        return y
    # _affine's last line, inlined: this runs in the decode loop, where a call costs
    return y + shift if factor is None else torch.addcmul(shift, y, factor)


def _affine(y, factor, shift):
    """factor * y + shift in one pass, each part only where given: the fused forward's form
    (hook mode, the reference, multiplies and adds as two ops)."""
    if shift is None:
        return _mul(y, factor)
    return y + shift if factor is None else torch.addcmul(shift, y, factor)


def _mul(x, factor):
    return x if factor is None else x * factor


def _plain_linear(m, x):
    """A plain nn.Linear in x's dtype without hooks (accelerate's included): calling F.linear
    with its weight is calling it."""
    return (type(m) is nn.Linear and m.weight.dtype == x.dtype
            and not (m._forward_hooks or m._forward_pre_hooks or hasattr(m, "_hf_hook")))


def _use_gated_up_proj(gate, up, x):
    """On CUDA, plain fp16 / bf16 nn.Linear gate and up without bias or hooks: one fused GEMM."""
    return (GATED_UP_PROJ and x.is_cuda and x.dtype in _GEMM_DTYPES
            and all(_plain_linear(m, x) and m.bias is None for m in (gate, up)))


class Fused(PatchState):
    """The swapped-in MLP forward of one target (registry.MLPInfo `info`, its module), applying
    its scales and shifts at the handle's strength (`at`, a ScalesAtStrength)."""

    def __init__(self, target, strength, original):
        self.info, self.module = target.info, target.module
        self.at = ScalesAtStrength(target.scales, target.shifts, strength, target.info.path)
        self.original = original  # the forward it replaces (called at strength 0)
        # Sub-modules looked up once: nn.Module.__getattr__ costs microseconds per call, which
        # a decode step feels. Wrap (PEFT, quantize) before patching, not after.
        self.subs = {role: getattr(target.module, attr) for role, attr in target.info.roles.items()}
        self.impl = getattr(self, "_" + target.info.layout)
        self.fast = None  # None: not built yet; False: the general forward only (_fast_state)

    def set_strength(self, strength):
        self.at.set_strength(strength)
        self.fast = None

    def __call__(self, *args, **kwargs):
        fast = self.fast
        if fast and len(args) == 1 and not kwargs:
            return self._fast_forward(args[0], fast)
        x = self._one_input(args, kwargs)
        if self.at.strength.is_zero:
            return self.original(x)  # strength 0 is the unpatched model, exactly
        return self.impl(x)

    def _one_input(self, args, kwargs):
        if len(args) + len(kwargs) != 1:
            raise TypeError(f"{self.info.path}: the fused {self.info.class_name} forward takes "
                            f"one input, got {len(args)} positional and {sorted(kwargs)} keyword")
        return args[0] if args else next(iter(kwargs.values()))

    # The float-strength forward of decoding. Between two calls of one MLP a decode step
    # streams every other layer's weights, which evicts the caches, so every Python line of
    # the forward runs cold (bench/RESULTS.md, Patch): the fast forward is as short as the
    # unpatched one (the sub-modules, one C++ call for activation x product x scales, the down
    # multiply), with its state made once per strength and device by the general forward.

    def _fast_state(self, like):
        """What _fast_forward needs for the handle's float strength on like's device and dtype:
        (device, dtype, allocating op, its dispatcher form, sub-modules, scale, gate_scale,
        act, down factor); False where only the general forward applies (per-sequence
        strength, strength 0, no allocating backend, gated_up_proj, the non-gated layout).
        A mid shift is bound into both forms of the op; a site with a shift on a Linear's
        output (gate, up, gate_up, down) makes that sub-module the Linear with its affine map
        (see _shifted_output)."""
        at = self.at
        alloc = allocating_op(like.device.type)
        if (not at.strength.uniform or at.strength.is_zero or alloc is None
                or self.info.layout == "non_gated" or (GATED_UP_PROJ and like.is_cuda)):
            return False
        eff = at.effective(like.device)
        prechecked = ops.act_mul_scale_prechecked
        if eff["mid_shift"] is not None:
            shift_alloc = allocating_op(like.device.type, shift=True)
            if shift_alloc is None:  # a library built before shifts
                return False
            alloc = functools.partial(shift_alloc, shift=eff["mid_shift"])
            prechecked = functools.partial(prechecked, shift=eff["mid_shift"])
        roles = ("gate", "up") if self.info.layout == "gated" else ("gate_up",)
        subs = tuple(self._shifted_output(r, like) if r in at.shifts else self.subs[r]
                     for r in roles)
        if "down" in at.shifts:
            down, down_factor = self._shifted_output("down", like), None
        else:
            down, down_factor = self.subs["down"], at.factor("down", like)
        return (like.device, like.dtype, alloc, prechecked, subs + (down,), eff["prod"],
                eff["gate_scale"], self.info.act, down_factor)

    def _fast_forward(self, x, fast):
        # The checks read attributes and call no Python function: torch.compile traces the
        # allocating ops through their fake kernels (compiled.py); autograd and tensor subclasses
        # take the op's dispatcher form. The allocating ops do not check that the vectors are on
        # the activations' device, so the state's device is compared here.
        device, dtype, alloc, prechecked, subs, scale, gate_scale, act, down_factor = fast
        if len(subs) == 3:
            g, u = subs[0](x), subs[1](x)
        else:  # packed gate_up: the halves are strided views, no copy
            gu = subs[0](x)
            n = gu.shape[-1] // 2
            g, u = gu[..., :n], gu[..., n:]
        if g.device != device or g.dtype is not dtype:  # the model moved: a new state, and
            self.fast = None  # this call by the general forward, from x (g and u may carry
            return self.impl(x)  # gate / up shifts already)
        if g.requires_grad or u.requires_grad or type(g) is not Tensor:
            h = prechecked(g, u, scale, gate_scale, act)
        else:
            h = alloc(g, u, scale, gate_scale, act)
        y = subs[-1](h)
        return y if down_factor is None else y * down_factor

    # A Linear's output site with a shift: y = s_eff linear(x) + strength b, scale and shift
    # applied together right after the Linear (a gate / up shift acts before the activation
    # and the product, so those sites leave the op's vectors). For the down site without a
    # scale, on a plain nn.Linear (no hooks, nothing wrapped), the shift is that GEMM's bias
    # (torch adds a bias inside the matmul: no pass over [T, H] of its own); otherwise one
    # pass after the Linear (an add, or an addcmul with the scale).

    def _shifted_output(self, kind, like):
        """The fast forward's sub-module for an output site with a shift, at the float
        strength: a C-level F.linear(h, W, bias + strength b) for such a down site, else the
        Linear then the affine map (vectors bound once)."""
        linear = self.subs[kind]
        if kind == "down" and "down" not in self.at.scales and _plain_linear(linear, like):
            return functools.partial(F.linear, weight=linear.weight, bias=self._down_bias(like))
        return functools.partial(_affine_after, linear=linear, factor=self.at.factor(kind, like),
                                 shift=self.at.shift(kind, like))

    def _down_bias(self, like):
        """The down projection's bias plus strength * b, in like's dtype (float strength)."""
        return self.at.bias_plus_shift("down", self.subs["down"].bias, like)

    def _down(self, h):
        """down(h) with the down site's scale and shift, every strength and module kind."""
        down, at = self.subs["down"], self.at
        if "down" not in at.shifts:
            y = down(h)
            return _mul(y, at.factor("down", y))
        if at.strength.uniform and "down" not in at.scales and _plain_linear(down, h):
            return F.linear(h, down.weight, self._down_bias(h))
        return self._site(kind="down", y=down(h))

    def _site(self, kind, y):
        """One site's scale and shift on y, as the fused forward applies them (_affine)."""
        return _affine(y, self.at.factor(kind, y), self.at.shift(kind, y))

    # The general forward: every strength, layout and device.

    def _gated(self, x):
        gate, up, at = self.subs["gate"], self.subs["up"], self.at
        per_row_gate = not at.strength.uniform and "gate" in at.scales
        if not (per_row_gate or at.pre or at.shifts) and _use_gated_up_proj(gate, up, x):
            scale, gate_scale, strength, up_first = at.op_args(x)
            if not up_first:
                h = ops.gated_up_proj(x, gate.weight, up.weight, scale, act=self.info.act,
                                      gate_scale=gate_scale, strength=strength)
                return self._down(h)
        return self._tail(gate(x), up(x))

    def _packed(self, x):
        gu, at = self.subs["gate_up"](x), self.at
        if "gate_up" in at.pre:
            gu = self._site("gate_up", gu)
        if at.strength.uniform:  # the halves are strided views: no copy
            n = gu.shape[-1] // 2
            return self._tail(gu[..., :n], gu[..., n:])
        if "gate_up" not in at.pre:
            gu = _mul(gu, at.factor("gate_up", gu))
        mid, mid_shift = at.raw(gu.device).get("mid"), at.mid_shift(gu.device)
        h = ops.act_mul_scale_packed(gu, mid, act=self.info.act, shift=mid_shift,
                                     strength=at.op_strength(gu, mid, mid_shift))
        return self._down(h)

    def _tail(self, g, u):
        """down(act(g) * u with the scales and shifts): the gated layouts' general forward."""
        at = self.at
        scale, gate_scale, strength, up_first = at.op_args(g)
        if "gate" in at.pre or ("gate" in at.scales and not at.strength.uniform):
            g = self._site("gate", g)
        if up_first:
            u = self._site("up", u)
        if at.strength.uniform:  # the s_eff vectors were checked when the model was patched
            h = ops.act_mul_scale_prechecked(g, u, scale, gate_scale, self.info.act,
                                             at.mid_shift(g.device))
            if self.fast is None and not torch.compiler.is_compiling():
                self.fast = self._fast_state(g)
        else:
            h = ops.act_mul_scale(g, u, scale, act=self.info.act, gate_scale=gate_scale,
                                  strength=strength, shift=at.mid_shift(g.device))
        return self._down(h)

    def _non_gated(self, x):
        a, at = self._site("fc1", self.subs["fc1"](x)), self.at
        if at.strength.uniform:
            eff = at.effective(a.device)
            h = ops.act_mul_scale_prechecked(a, None, eff.get("mid"), None, self.info.act,
                                             eff["mid_shift"])
        else:
            mid, mid_shift = at.raw(a.device).get("mid"), at.mid_shift(a.device)
            h = ops.act_scale(a, mid, act=self.info.act, shift=mid_shift,
                              strength=at.op_strength(a, mid, mid_shift))
        return self.subs["fc2"](h)


class FusedWithInput(Fused):
    """Fused for an MLP with an `input` site: x * s_eff + strength * b (one pass, _affine) on
    the MLP's input, then Fused's forward on it, fast path included. A class of its own so
    that the forward of every other MLP, the decode loop's, runs not one line more."""

    def __init__(self, target, strength, original):
        super().__init__(target, strength, original)
        self.input_fast = None  # (device, dtype, s_eff, strength * b) at a float strength

    def set_strength(self, strength):
        super().set_strength(strength)
        self.input_fast = None

    def __call__(self, *args, **kwargs):
        x = args[0] if len(args) == 1 and not kwargs else self._one_input(args, kwargs)
        bound = self.input_fast  # the vectors looked up once per strength, device and dtype
        if bound and x.device == bound[0] and x.dtype is bound[1]:
            x = _affine(x, bound[2], bound[3])
        elif not self.at.strength.is_zero:  # strength 0: the original forward on x itself
            factor, shift = self.at.factor("input", x), self.at.shift("input", x)
            if self.at.strength.uniform and not torch.compiler.is_compiling():
                self.input_fast = (x.device, x.dtype, factor, shift)
            x = _affine(x, factor, shift)
        return Fused.__call__(self, x)


def fused_forward(target, strength, original):
    """The swapped-in forward of one target: FusedWithInput where it changes the MLP's input,
    else Fused."""
    kind = FusedWithInput if "input" in target.kinds() else Fused
    return kind(target, strength, original)
