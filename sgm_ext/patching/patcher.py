"""Apply a ScaleSet to a model: `patch(model, scales, mode=...)`.

Three ways to do the same math on each site, y = s_eff x + strength * b with s_eff = 1 -
strength (1 - scale) and b the site's shift (0 where it has none):
- "fused": the MLP's forward is swapped for one that calls the MLP's own sub-modules (so
  quantized Linears, PEFT LoRA layers and accelerate hooks keep working) and sgm_ext.ops for
  the activation x product x scale. With SGM_EXT_GATED_UP_PROJ=1, plain fp16 / bf16 Linears
  without bias on CUDA take ops.gated_up_proj (both projections and the epilogue in one
  Triton kernel); off by default, since on an H100 that kernel is slower than cuBLAS's two
  GEMMs plus the elementwise op (bench/RESULTS.md, GPU).
- "fold": the scales are multiplied into the weights (rows of the Linear a site is the output
  of, columns of the down / fc2 Linear for `mid`), the shifts into the biases (a bias is
  created where there is none; a `mid` shift b enters the down bias as W_down b); the touched
  slices are saved first and copied back on unpatch, so restoring is bit-exact (a created
  bias is removed again).
- "hook": forward hooks on the sub-modules that change their outputs (multiply, then add), as
  AurA and ml-act do it; the reference the other two are tested against.

Everything is validated before the model is touched: on any error the model is unchanged
and the message names the offending entry. The forward swap keeps parameters and state_dict
keys as they are (an instance attribute shadows the class's forward; unpatch deletes it).

What remove() undoes is plain data on the handle (swapped forwards, hook objects, saved weight
slices, marked modules), never closures: copy.deepcopy of a patched model maps all of it onto
the copy, which is then an independent patched model with a handle of its own. Pickling a
patched model (pickle, torch.save(model)) is refused with a message saying what to do;
torch.save(model.state_dict()) works as for any model.
"""
import contextlib
import copy
import difflib
import functools
import os
from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.scale_math import check_strength, effective_scale, effective_shift
from ..ops import custom_ops as ops
from ..ops.backends import select_alloc
from .registry import REGISTRY, describe, find_mlps, site_index
from .scales import ScaleSet, config_fingerprint, load_scales, load_vectors

MODES = ("fused", "fold", "hook")
_HANDLE_ATTR = "_sgm_ext_patch"  # on the patched model (root) and on every patched MLP
_GEMM_DTYPES = (torch.float16, torch.bfloat16)
GATED_UP_PROJ = os.environ.get("SGM_EXT_GATED_UP_PROJ") == "1"  # see the module docstring


def supported_architectures() -> dict:
    """{MLP class name: layout} of the registry table. Any other module with gate_proj /
    up_proj / down_proj Linears and an act_fn is covered by the generic gated rule."""
    return {name: layout.kind for name, layout in REGISTRY.items()}


# ---------------------------------------------------------------- copying, not pickling

_NO_PICKLE = ("a model patched by sgm-ext cannot be pickled (pickle.dumps, torch.save(model)): "
              "remove the patch first (handle.remove() / sgm_ext.unpatch(model)), save, and "
              "patch again after loading; torch.save(model.state_dict()) works while patched")


class _PatchState:
    """Base of every object a patch leaves in a model (handle, swapped forward, hooks):
    copy.deepcopy copies it attribute by attribute through deepcopy's memo, so the copy refers
    to the copied modules and tensors; pickling it raises, naming what to do instead."""

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    def __reduce_ex__(self, protocol):
        raise TypeError(_NO_PICKLE)


# ---------------------------------------------------------------- per-sequence strength

def _rows(handle, x, where):
    """The handle's per-sequence strength [B] -> [B, 1, ..., 1] against x [B, ...]."""
    strength = handle.strength_on(x.device)
    if x.dim() < 2 or x.shape[0] != strength.shape[0]:
        raise ValueError(f"{where}: per-sequence strength has {strength.shape[0]} entries but "
                         f"the activations there have shape {tuple(x.shape)}; it needs the "
                         "batch as the first dimension (put scales on the language model only, "
                         "or use a float strength)")
    return strength.view(-1, *([1] * (x.dim() - 1)))


# ---------------------------------------------------------------- resolving scales to MLPs

class _Target(NamedTuple):
    info: object  # registry.MLPInfo
    module: nn.Module
    scales: dict  # site kind -> float32 CPU tensor
    shifts: dict  # site kind -> float32 CPU tensor (sites with an added shift)

    def kinds(self):
        """The site kinds this MLP changes, with a scale, a shift or both."""
        return list(dict.fromkeys([*self.scales, *self.shifts]))


def _as_scaleset(scales):
    if isinstance(scales, ScaleSet):
        return scales
    if isinstance(scales, (str, os.PathLike)):
        return load_scales(scales)
    if isinstance(scales, Mapping):
        return ScaleSet(scales)
    raise TypeError(f"scales must be a ScaleSet, a dict or a path, got {type(scales).__name__}")


def _unwrap(model):
    """A PEFT PeftModel is patched through the model it wraps (site names stay the same)."""
    get = getattr(model, "get_base_model", None)
    if callable(get) and hasattr(model, "peft_config"):
        return get()
    return model


def _site_error(site, modules, mlps):
    parent, _, _ = site.rpartition(".")
    if parent in mlps:
        info = mlps[parent]
        return ValueError(f"unknown site {site!r}: {parent} is a {info.class_name} whose sites "
                          f"are {', '.join(info.sites())}")
    if parent and parent in modules:  # "" is the model itself: a key without dots is no site
        describe(modules[parent], parent)  # raises, naming the class the registry does not know
    close = difflib.get_close_matches(site, [s for i in mlps.values() for s in i.sites()], n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ValueError(f"unknown site {site!r}: no such module in the model{hint}")


def _resolve(root, scales):
    """Group the scales by MLP: [_Target], checking every site resolves and every size."""
    mlps = find_mlps(root)
    index = site_index(mlps)
    modules = dict(root.named_modules())
    by_mlp = {}
    for what, entries in (("scales", scales.scales), ("shifts", scales.shifts)):
        for site, value in entries.items():
            if site not in index:
                raise _site_error(site, modules, mlps)
            info, kind = index[site]
            want = info.site_size(kind)
            if value.numel() != want:
                raise ValueError(f"{what}[{site!r}] has {value.numel()} values, the model's "
                                 f"{kind} site there has {want} ({info.class_name})")
            by_mlp.setdefault(info.path, ({}, {}))[what == "shifts"][kind] = value
    return [_Target(mlps[p], modules[p], s, b) for p, (s, b) in by_mlp.items()]


def _check_fingerprint(root, scales):
    want = scales.metadata.get("config_fingerprint")
    config = getattr(root, "config", None)
    if not want or config is None:
        return
    have = config_fingerprint(config)
    if want != have:
        made_for = scales.metadata.get("model_type", "another model")
        raise ValueError(f"the scales were made for a model with config fingerprint {want} "
                         f"({made_for}); this model's is {have} "
                         f"({getattr(config, 'model_type', '?')})")


# ---------------------------------------------------------------- fused and hook modes

class _Scaled(_PatchState):
    """The scales and shifts of one MLP: s_eff and strength * b per device for the handle's
    float strength, per row for a per-sequence one."""

    def __init__(self, handle, target):
        self.handle = handle
        self.info = target.info
        self.module = target.module
        self.scales = target.scales
        self.shifts = target.shifts
        # A gate / up / gate_up shift acts before the activation or the product, so the fused
        # forward applies those sites to the op's inputs (x * s_eff + shift) instead of
        # passing their scales to the op.
        self.pre = tuple(k for k in ("gate", "up", "gate_up") if k in target.shifts)
        self._cache = {}

    def invalidate(self):
        self._cache.clear()

    def raw(self, device):
        """The scales themselves on `device` (per-sequence strength applies them per row)."""
        key = ("raw", device)
        if key not in self._cache:
            self._cache[key] = {k: s.to(device) for k, s in self.scales.items()}
        return self._cache[key]

    def raw_shifts(self, device):
        """The shifts themselves on `device`."""
        key = ("raw shifts", device)
        if key not in self._cache:
            self._cache[key] = {k: b.to(device) for k, b in self.shifts.items()}
        return self._cache[key]

    def effective(self, device):
        """{kind: s_eff [n] float32} for the float strength, plus what the op takes:
        "gate_scale" (gate, or the gate half of gate_up) and "prod" (up, or the up half of
        gate_up, times mid): one vector each, computed once. Sites in self.pre are left out
        of both (the forward applies them to the op's inputs)."""
        key = ("eff", device)
        if key not in self._cache:
            lam = self.handle.strength
            eff = {k: effective_scale(s, lam).to(device) for k, s in self.scales.items()}
            gate, up = eff.get("gate"), eff.get("up")
            if "gate_up" in eff and "gate_up" not in self.pre:
                gate, up = (half.contiguous() for half in eff["gate_up"].chunk(2))
            gate = None if "gate" in self.pre else gate
            up = None if "up" in self.pre else up
            mid = eff.get("mid")
            eff["gate_scale"] = gate
            eff["prod"] = up * mid if up is not None and mid is not None else \
                (up if up is not None else mid)
            mid_shift = self.shifts.get("mid")
            eff["mid_shift"] = None if mid_shift is None else \
                effective_shift(mid_shift.to(device), lam)
            self._cache[key] = eff
        return self._cache[key]

    def factor(self, kind, like):
        """s_eff of one site to multiply `like` by (in like's dtype), or None."""
        if kind not in self.scales:
            return None
        lam = self.handle.strength
        if isinstance(lam, float):
            key = ("factor", kind, like.device, like.dtype)  # cast once, not per forward
            if key not in self._cache:
                self._cache[key] = self.effective(like.device)[kind].to(like.dtype)
            return self._cache[key]
        s = self.raw(like.device)[kind]
        return effective_scale(s, _rows(self.handle, like, self.info.path)).to(like.dtype)

    def shift(self, kind, like):
        """strength * b of one site to add to `like` (in like's dtype), or None."""
        if kind not in self.shifts:
            return None
        lam = self.handle.strength
        if isinstance(lam, float):
            key = ("shift", kind, like.device, like.dtype)
            if key not in self._cache:
                b = self.shifts[kind].to(like.device)
                self._cache[key] = effective_shift(b, lam).to(like.dtype)
            return self._cache[key]
        b = self.raw_shifts(like.device)[kind]
        return effective_shift(b, _rows(self.handle, like, self.info.path)).to(like.dtype)

    def apply(self, kind, x):
        """x * s_eff + strength * b for one site (each part only where the site has it)."""
        factor, shift = self.factor(kind, x), self.shift(kind, x)
        if factor is not None:
            x = x * factor
        return x if shift is None else x + shift


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


class _Fused(_Scaled):
    """The swapped-in MLP forward."""

    def __init__(self, handle, target, original):
        super().__init__(handle, target)
        self.original = original  # the forward it replaces (called at strength 0)
        # Sub-modules looked up once: nn.Module.__getattr__ costs microseconds per call, which
        # a decode step feels. Wrap (PEFT, quantize) before patching, not after.
        self.subs = {role: getattr(target.module, attr) for role, attr in target.info.roles.items()}
        self.impl = getattr(self, "_" + target.info.layout)
        self.fast = None  # None: not built yet; False: the general forward only (_fast_state)

    def invalidate(self):
        super().invalidate()
        self.fast = None

    def __call__(self, *args, **kwargs):
        fast = self.fast
        if fast and len(args) == 1 and not kwargs:
            return self._fast_forward(args[0], fast)
        if len(args) + len(kwargs) != 1:
            raise TypeError(f"{self.info.path}: the fused {self.info.class_name} forward takes "
                            f"one input, got {len(args)} positional and {sorted(kwargs)} keyword")
        x = args[0] if args else next(iter(kwargs.values()))
        lam = self.handle.strength
        if isinstance(lam, float) and lam == 0.0:
            return self.original(x)  # strength 0 is the unpatched model, exactly
        return self.impl(x, lam)

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
        lam = self.handle.strength
        alloc = select_alloc(like.device.type)
        if (not isinstance(lam, float) or lam == 0.0 or alloc is None
                or self.info.layout == "non_gated" or (GATED_UP_PROJ and like.is_cuda)):
            return False
        eff = self.effective(like.device)
        prechecked = ops.act_mul_scale_prechecked
        if eff["mid_shift"] is not None:
            shift_alloc = select_alloc(like.device.type, shift=True)
            if shift_alloc is None:  # a library built before shifts
                return False
            alloc = functools.partial(shift_alloc, shift=eff["mid_shift"])
            prechecked = functools.partial(prechecked, shift=eff["mid_shift"])
        roles = ("gate", "up") if self.info.layout == "gated" else ("gate_up",)
        subs = tuple(self._shifted_output(r, like) if r in self.shifts else self.subs[r]
                     for r in roles)
        if "down" in self.shifts:
            down, down_factor = self._shifted_output("down", like), None
        else:
            down, down_factor = self.subs["down"], self.factor("down", like)
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
            return self.impl(x, self.handle.strength)  # gate / up shifts already)
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
        if kind == "down" and "down" not in self.scales and _plain_linear(linear, like):
            return functools.partial(F.linear, weight=linear.weight, bias=self._down_bias(like))
        return functools.partial(_affine_after, linear=linear, factor=self.factor(kind, like),
                                 shift=self.shift(kind, like))

    def _down_bias(self, like):
        """The down projection's bias plus strength * b, in like's dtype (float strength)."""
        key = ("down bias", like.device, like.dtype)
        if key not in self._cache:
            shift = self.shift("down", like).float()
            bias = self.subs["down"].bias
            self._cache[key] = (shift if bias is None else bias.float() + shift).to(like.dtype)
        return self._cache[key]

    def _down(self, h):
        """down(h) with the down site's scale and shift, every strength and module kind."""
        down = self.subs["down"]
        if "down" not in self.shifts:
            y = down(h)
            return _mul(y, self.factor("down", y))
        if (isinstance(self.handle.strength, float) and "down" not in self.scales
                and _plain_linear(down, h)):
            return F.linear(h, down.weight, self._down_bias(h))
        return self._site(kind="down", y=down(h))

    def _site(self, kind, y):
        """One site's scale and shift on y, as the fused forward applies them (_affine)."""
        return _affine(y, self.factor(kind, y), self.shift(kind, y))

    # The general forward: every strength, layout and device.

    def _elementwise_args(self, like, lam):
        """(scale, gate_scale, strength, up first) for the op on [..., I] activations.

        A float strength is folded into the s_eff vectors, up x mid into one. A per-sequence
        strength goes to the op with one scale; a second product-side scale (up beside mid),
        or an up shift, makes the up site apply to `up` first (up first: True).
        """
        if isinstance(lam, float):
            eff = self.effective(like.device)
            return eff["prod"], eff["gate_scale"], None, "up" in self.pre
        raw = self.raw(like.device)
        up_first = "up" in self.pre or ("mid" in raw and "up" in raw)
        scale = raw.get("mid") if up_first else raw.get("mid", raw.get("up"))
        strength = self._op_strength(like, scale, self.raw_shifts(like.device).get("mid"))
        return scale, None, strength, up_first

    def _op_strength(self, like, scale, shift):
        """The per-sequence strength as the op takes it ([B, 1, ...] over like's leading
        dims), or None when the op has neither a scale nor a shift to apply it to."""
        if scale is None and shift is None:
            return None
        return _rows(self.handle, like, self.info.path)[..., 0]

    def _gated(self, x, lam):
        gate, up = self.subs["gate"], self.subs["up"]
        per_row_gate = not isinstance(lam, float) and "gate" in self.scales
        if not (per_row_gate or self.pre or self.shifts) and _use_gated_up_proj(gate, up, x):
            scale, gate_scale, strength, up_first = self._elementwise_args(x, lam)
            if not up_first:
                h = ops.gated_up_proj(x, gate.weight, up.weight, scale, act=self.info.act,
                                      gate_scale=gate_scale, strength=strength)
                return self._down(h)
        return self._tail(gate(x), up(x), lam)

    def _packed(self, x, lam):
        gu = self.subs["gate_up"](x)
        if "gate_up" in self.pre:
            gu = self._site("gate_up", gu)
        if isinstance(lam, float):  # the halves are strided views: no copy
            n = gu.shape[-1] // 2
            return self._tail(gu[..., :n], gu[..., n:], lam)
        if "gate_up" not in self.pre:
            gu = _mul(gu, self.factor("gate_up", gu))
        mid, mid_shift = self.raw(gu.device).get("mid"), self.raw_shifts(gu.device).get("mid")
        h = ops.act_mul_scale_packed(gu, mid, act=self.info.act, shift=mid_shift,
                                     strength=self._op_strength(gu, mid, mid_shift))
        return self._down(h)

    def _tail(self, g, u, lam):
        """down(act(g) * u with the scales and shifts): the gated layouts' general forward."""
        scale, gate_scale, strength, up_first = self._elementwise_args(g, lam)
        if "gate" in self.pre or ("gate" in self.scales and not isinstance(lam, float)):
            g = self._site("gate", g)
        if up_first:
            u = self._site("up", u)
        if isinstance(lam, float):  # the s_eff vectors were checked when the model was patched
            h = ops.act_mul_scale_prechecked(g, u, scale, gate_scale, self.info.act,
                                             self.effective(g.device)["mid_shift"])
            if self.fast is None and not torch.compiler.is_compiling():
                self.fast = self._fast_state(g)
        else:
            h = ops.act_mul_scale(g, u, scale, act=self.info.act, gate_scale=gate_scale,
                                  strength=strength,
                                  shift=self.raw_shifts(g.device).get("mid"))
        return self._down(h)

    def _non_gated(self, x, lam):
        a = self._site("fc1", self.subs["fc1"](x))
        if isinstance(lam, float):
            eff = self.effective(a.device)
            h = ops.act_mul_scale_prechecked(a, None, eff.get("mid"), None, self.info.act,
                                             eff["mid_shift"])
        else:
            mid, mid_shift = self.raw(a.device).get("mid"), self.raw_shifts(a.device).get("mid")
            h = ops.act_scale(a, mid, act=self.info.act, shift=mid_shift,
                              strength=self._op_strength(a, mid, mid_shift))
        return self.subs["fc2"](h)


class _OutputHook(_PatchState):
    """Forward hook: output * s_eff + strength * b of one site (AurA's and ml-act's way)."""

    def __init__(self, scaled, kind):
        self.scaled, self.kind = scaled, kind

    def __call__(self, module, args, output):
        return self.scaled.apply(self.kind, output)


class _InputHook(_PatchState):
    """Forward pre-hook: input * s_eff + strength * b of one site (`mid`, the input of down /
    fc2)."""

    def __init__(self, scaled, kind):
        self.scaled, self.kind = scaled, kind

    def __call__(self, module, args):
        return (self.scaled.apply(self.kind, args[0]), *args[1:])


# ---------------------------------------------------------------- fold mode

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
    """Fold edit: set a Linear's bias (created when it has none) to `value` (float32)."""
    linear: nn.Module
    value: torch.Tensor


def _shift_biases(target, strength, where):
    """{Linear attribute: new bias [out] float32} for the Linears a shift folds into.

    A Linear L with output y = W x + c whose output site has s_eff and shift b, and whose
    input is a `mid` site with shift b_mid (L = down / fc2), computes after folding
    s_eff (W (x + b_mid) + c) + b: its new bias is s_eff (c + W b_mid) + b, from the weights
    as they are before any fold.
    """
    info, m = target.info, target.module
    shifts = {k: effective_shift(b, strength) for k, b in target.shifts.items()}
    biases = {}
    for kind, b in shifts.items():
        if not b.any():  # strength 0 or a zero vector: nothing to add, no bias to create
            continue
        attr, reads_input = info.site_point(kind)
        lin = getattr(m, attr)
        if _lora_parts(lin) is not None:
            raise ValueError(f"fold mode cannot fold the shift of {info.site(kind)} into "
                             f"{where(attr)}, a LoRA layer; use mode='fused' or mode='hook'")
        w = _plain_weight(lin, where(attr))
        if attr not in biases:
            biases[attr] = (lin.bias.detach().float().cpu().clone() if lin.bias is not None
                            else torch.zeros(w.shape[0]))
        if reads_input:
            biases[attr] += w.detach().float().cpu() @ b
    for attr, c in biases.items():  # the output site's scale and shift of each such Linear
        for kind, (a, reads_input) in ((k, info.site_point(k)) for k in target.kinds()):
            if a == attr and not reads_input:
                if kind in target.scales:
                    c.mul_(effective_scale(target.scales[kind], strength))
                if kind in shifts:
                    c.add_(shifts[kind])
    return biases


def _fold_plan(target, strength):
    """[_Scale | _Bias] for one MLP: the slices fold mode multiplies and the biases it sets."""
    info, m = target.info, target.module

    def where(attr):
        return f"{info.path}.{attr}"

    biases = _shift_biases(target, strength, where)
    eff = {k: effective_scale(s, strength) for k, s in target.scales.items()}
    plan = []
    for kind, e in eff.items():
        idx = (e != 1.0).nonzero().flatten()
        if idx.numel() == 0:
            continue
        attr, reads_input = info.site_point(kind)  # an input site scales columns, else rows
        axis = "cols" if reads_input else "rows"
        lin = getattr(m, attr)
        for tensor, dim in _fold_params(lin, axis, where(attr)):
            if attr in biases and tensor is lin.bias:
                continue  # set as a whole below
            plan.append(_Scale(tensor, dim, idx, e[idx]))
    return plan + [_Bias(getattr(m, attr), c) for attr, c in biases.items()]


def _apply_fold(plan):
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


def _undo_fold(saved):
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


def _remove_hook(module, hook, pre):
    """Remove a forward (pre-)hook by identity: the hook dicts are keyed by an id that a deep
    copy keeps, but a RemovableHandle would hold a weak reference to the original's dict."""
    if pre:
        hooks, extras = module._forward_pre_hooks, ("_forward_pre_hooks_with_kwargs",)
    else:
        hooks, extras = module._forward_hooks, ("_forward_hooks_with_kwargs",
                                                "_forward_hooks_always_called")
    for key in [k for k, h in hooks.items() if h is hook]:
        del hooks[key]
        for name in extras:
            getattr(module, name, {}).pop(key, None)


# ---------------------------------------------------------------- the handle

class PatchHandle(_PatchState):
    """A patched model: change the strength, or remove the patch (also as a context manager).

    copy.deepcopy of the patched model gives the copy a handle of its own (find it with
    `sgm_ext.unpatch(copy)`); a patched model cannot be pickled (remove the patch first)."""

    def __init__(self, model, root, targets, mode, strength):
        self.model, self.mode = model, mode
        self.sites = tuple(t.info.site(k) for t in targets for k in t.kinds())
        self._root, self._targets, self._strength = root, targets, strength
        # What remove() undoes, as data (a deep copy maps the modules onto the copy's):
        self._swaps = []  # (module, attribute, had an instance value, that value)
        self._hooks = []  # (module, hook object, is a pre-hook)
        self._marked = []  # modules carrying the marker
        self._scaled = []
        self._folded = None  # fold mode: [(tensor, dim, index, saved slice)]
        self._strength_devices = {}  # per-sequence strength copied to each device once
        self.active = False

    @property
    def strength(self):
        return self._strength

    def strength_on(self, device):
        """The per-sequence strength tensor on `device`."""
        t = self._strength_devices.get(device)
        if t is None:
            t = self._strength_devices[device] = self._strength.to(device)
        return t

    def _apply(self):
        if self.mode == "fold":
            self._folded = _apply_fold(self._plan(self._strength))
        for t in self._targets:
            if self.mode == "fused":
                self._swap_forward(t)
            elif self.mode == "hook":
                self._add_hooks(t)
            _set_marker(t.module, self)
            self._marked.append(t.module)
        _set_marker(self._root, self)
        self.active = True

    def _plan(self, strength):
        return [edit for t in self._targets for edit in _fold_plan(t, strength)]

    def _swap_forward(self, target):
        m = target.module
        # accelerate's hooks replace `forward` with a wrapper that calls `_old_forward`: swap
        # that, so the hook (device placement, offload) keeps running around the fused forward.
        attr = "_old_forward" if hasattr(m, "_hf_hook") and "_old_forward" in m.__dict__ \
            else "forward"
        had = attr in m.__dict__
        previous = m.__dict__.get(attr)
        original = previous if had else type(m).forward.__get__(m)
        fused = _Fused(self, target, original)
        self._scaled.append(fused)
        self._swaps.append((m, attr, had, previous))
        m.__dict__[attr] = fused

    def _add_hooks(self, target):
        scaled = _Scaled(self, target)
        self._scaled.append(scaled)
        info, m = target.info, target.module
        for kind in target.kinds():
            attr, reads_input = info.site_point(kind)
            sub = getattr(m, attr)
            if reads_input:
                hook = _InputHook(scaled, kind)
                sub.register_forward_pre_hook(hook)
            else:
                hook = _OutputHook(scaled, kind)
                sub.register_forward_hook(hook)
            self._hooks.append((sub, hook, reads_input))

    def set_strength(self, strength: Union[float, torch.Tensor]) -> "PatchHandle":
        """A float in [0, 1], or a tensor [B] / [B, 1]: one strength per sequence of the next
        batches (fused and hook modes). Fold mode re-folds the weights (a float only)."""
        if not self.active:
            raise RuntimeError("this patch has been removed")
        strength = check_strength(strength)
        if self.mode == "fold":
            if not isinstance(strength, float):
                raise ValueError("fold mode bakes one strength into the weights; per-sequence "
                                 "strength needs mode='fused' or mode='hook'")
            # planned from the unfolded weights (a mid shift enters the down bias through
            # W_down); the Linears were checked when the model was patched
            _undo_fold(self._folded)
            self._folded = _apply_fold(self._plan(strength))
        self._strength = strength
        self._strength_devices.clear()
        for s in self._scaled:
            s.invalidate()
        return self

    def remove(self) -> None:
        """Restore the model exactly: original forwards, no hooks, the saved weight slices."""
        if not self.active:
            return
        while self._marked:
            _clear_marker(self._marked.pop(), self)
        while self._hooks:
            _remove_hook(*self._hooks.pop())
        while self._swaps:
            m, attr, had, previous = self._swaps.pop()
            if had:
                m.__dict__[attr] = previous
            else:
                m.__dict__.pop(attr, None)
        if self._folded is not None:
            _undo_fold(self._folded)
            self._folded = None
        _clear_marker(self._root, self)
        self.active = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()

    def __repr__(self):
        state = "active" if self.active else "removed"
        return (f"PatchHandle({self.mode}, {len(self.sites)} sites, "
                f"strength={self._strength}, {state})")


def _set_marker(module, handle):
    module.__dict__[_HANDLE_ATTR] = handle


def _clear_marker(module, handle):
    if module.__dict__.get(_HANDLE_ATTR) is handle:
        del module.__dict__[_HANDLE_ATTR]


# ---------------------------------------------------------------- public API

def patch(model: nn.Module, scales: Union[ScaleSet, Mapping, str, os.PathLike], *,
          mode: str = "fused", strength: Union[float, torch.Tensor] = 1.0,
          allow_amplify: bool = False) -> "PatchHandle":
    """Apply per-neuron scales to a model; returns a PatchHandle.

    scales: a ScaleSet, a dict {site: [n] tensor} (n: the site's width, I or H) or a path to
    a scale file. mode: "fused", "fold" or "hook". strength: a float in [0, 1] or one per
    sequence ([B] / [B, 1] tensor; the activations' first dim is the batch). Scales above 1
    (amplification) need allow_amplify=True. On any error the model is left untouched.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    strength = check_strength(strength)
    if mode == "fold" and not isinstance(strength, float):
        raise ValueError("fold mode bakes one strength into the weights; per-sequence "
                         "strength needs mode='fused' or mode='hook'")
    root = _unwrap(model)
    if type(root).__module__.startswith("vllm."):
        raise ValueError("this is a model vLLM runs: vLLM models are patched when they load, "
                         "through the sgm_ext plugin (additional_config={'sgm_ext': {'scales': "
                         "...}}); a change made after start-up would be ignored by its compiled "
                         "graphs")
    for path, m in root.named_modules():
        existing = m.__dict__.get(_HANDLE_ATTR)
        if existing is not None:
            where = f"the model's {path}" if path else "the model"
            raise ValueError(f"{where} is already patched ({existing!r}); call "
                             "unpatch / handle.remove() first")
    targets = check_scales(root, scales, allow_amplify=allow_amplify)
    handle = PatchHandle(model, root, targets, mode, strength)
    if mode == "fold":
        handle._plan(strength)  # every Linear foldable? raises before anything changes
    handle._apply()
    return handle


def check_scales(model: nn.Module, scales: Union[ScaleSet, Mapping, str, os.PathLike], *,
                 allow_amplify: bool = False) -> list:
    """Check scales against a model without changing it, as patch does: values, the config
    fingerprint, every site and its size. Returns the targets, one per MLP (info: its
    registry.MLPInfo, module, scales: {site kind: tensor}); raises naming the first bad
    entry. A model built on the meta device is enough (no weights are read)."""
    scales = _as_scaleset(scales)
    if not scales.sites():
        raise ValueError("the scale set is empty: nothing to patch")
    scales.validate(allow_amplify=allow_amplify)
    root = _unwrap(model)
    _check_fingerprint(root, scales)
    return _resolve(root, scales)


def steering(model: nn.Module, vectors: Union[Mapping, str, os.PathLike], *,
             mode: str = "fused", strength: Union[float, torch.Tensor] = 1.0) -> "PatchHandle":
    """Add steering vectors to MLP outputs (activation addition: ActAdd, contrastive activation
    addition): y = down(h) + strength * v, a shift on each MLP's `down` site.

    vectors: {name: [H] tensor} or a plain tensor file (safetensors, or a torch-saved dict;
    load_vectors); a name is an MLP's path (`model.layers.3.mlp`) or its down projection's
    (`model.layers.3.mlp.down_proj`). Returns the PatchHandle (set_strength, remove); the
    model is untouched on any error. Vectors on other sites: a ScaleSet with shifts."""
    if isinstance(vectors, (str, os.PathLike)):
        vectors = load_vectors(vectors)
    mlps = find_mlps(_unwrap(model))
    index = site_index(mlps)
    shifts = {}
    for name, v in dict(vectors).items():
        info = mlps.get(name)
        if info is not None and "down" not in info.sites().values():
            raise ValueError(f"steering vector {name!r}: {info.class_name} has no down site "
                             f"(its sites: {', '.join(info.sites().values())})")
        site = info.site("down") if info is not None else name
        if site in index and index[site][1] != "down":
            raise ValueError(f"steering vector {name!r} is on a {index[site][1]} site; steering "
                             "vectors are added to MLP outputs (down sites): give the MLP's or "
                             "its down projection's path, or use a ScaleSet with shifts")
        shifts[site] = v
    return patch(model, ScaleSet({}, {"method": "steering"}, shifts=shifts), mode=mode,
                 strength=strength)


def unpatch(model: nn.Module) -> None:
    """Remove the patch of a model that sgm_ext.patch patched."""
    handle = _unwrap(model).__dict__.get(_HANDLE_ATTR)
    if handle is None:
        raise ValueError("the model is not patched by sgm-ext")
    handle.remove()


@contextlib.contextmanager
def patched(model: nn.Module, scales, **kwargs):
    """`with patched(model, scales, mode=..., strength=...) as handle:` patch, then unpatch."""
    handle = patch(model, scales, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
