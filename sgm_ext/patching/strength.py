"""Scales at a strength: the one place that tells one strength for every sequence from one per
sequence, and turns an MLP's scale and shift vectors into what a mode multiplies and adds."""
from ..core.scale_math import check_strength, effective_scale, effective_shift
from .state import PatchState


class Strength(PatchState):
    """A checked strength: `uniform`, one float for every sequence (the s_eff vectors are fixed:
    computed once, foldable into weights), or one per sequence ([B] float32, applied per row of
    the activations on every call). The handle holds one, shared by all its MLPs."""

    def __init__(self, value):
        self.value = check_strength(value)
        self.uniform = isinstance(self.value, float)  # the only place the kind of strength is read
        self.is_zero = self.uniform and self.value == 0.0  # the unpatched model, exactly
        self._devices = {}  # a per-sequence strength copied to each device once

    def require_uniform(self, message):
        """The float strength; ValueError(message) for a per-sequence one."""
        if not self.uniform:
            raise ValueError(message)
        return self.value

    def rows(self, x, where):
        """The per-sequence strength [B] -> [B, 1, ..., 1] against x [B, ...], on x's device."""
        strength = self._devices.get(x.device)
        if strength is None:
            strength = self._devices[x.device] = self.value.to(x.device)
        if x.dim() < 2 or x.shape[0] != strength.shape[0]:
            raise ValueError(f"{where}: per-sequence strength has {strength.shape[0]} entries but "
                             f"the activations there have shape {tuple(x.shape)}; it needs the "
                             "batch as the first dimension (put scales on the language model only, "
                             "or use a float strength)")
        return strength.view(-1, *([1] * (x.dim() - 1)))

    def __repr__(self):
        return str(self.value)


# The rules the fused op's arguments follow, shared with the vLLM modules (serving.modules),
# which keep their vectors in buffers of their own (CUDA graphs read them in place).

def op_scales(gate, up, mid):
    """(gate_scale, prod) for the op from s_eff vectors at a float strength (None where the
    site has none): gate's, and the product side's (up x mid, computed once, or the one there
    is)."""
    prod = up * mid if up is not None and mid is not None else (up if up is not None else mid)
    return gate, prod


def per_row_scale(up, mid, up_shifted=False):
    """(scale, up first) at a per-sequence strength: the op takes one raw scale with the
    strength rows (mid, or up alone), so a second product-side scale (up beside mid), or an up
    shift, makes the up site apply to `up` before the op (up first: True)."""
    up_first = up_shifted or (mid is not None and up is not None)
    return (mid if up_first or mid is not None else up), up_first


def row_factor(scale, rows, dtype):
    """s_eff per row ([R, ..., n]) of a raw scale at the strength rows, in `dtype`."""
    return effective_scale(scale, rows).to(dtype)


class ScalesAtStrength(PatchState):
    """One MLP's scales and shifts ({site kind: float32 CPU vector}) at the handle's Strength:
    s_eff and strength * b per device (and dtype) for a float strength, computed once and
    cached until the strength changes; per row for a per-sequence one. `where` (the MLP's
    path) names it in errors."""

    def __init__(self, scales, shifts, strength, where):
        self.scales, self.shifts, self.where = scales, shifts, where
        self.strength = strength
        # A gate / up / gate_up shift acts before the activation or the product, so the fused
        # forward applies those sites to the op's inputs (x * s_eff + shift) instead of
        # passing their scales to the op.
        self.pre = tuple(k for k in ("gate", "up", "gate_up") if k in shifts)
        self._cache = {}

    def set_strength(self, strength):
        self.strength = strength
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
            lam = self.strength.value
            eff = {k: effective_scale(s, lam).to(device) for k, s in self.scales.items()}
            gate, up = eff.get("gate"), eff.get("up")
            if "gate_up" in eff and "gate_up" not in self.pre:
                gate, up = (half.contiguous() for half in eff["gate_up"].chunk(2))
            gate = None if "gate" in self.pre else gate
            up = None if "up" in self.pre else up
            eff["gate_scale"], eff["prod"] = op_scales(gate, up, eff.get("mid"))
            mid_shift = self.shifts.get("mid")
            eff["mid_shift"] = None if mid_shift is None else \
                effective_shift(mid_shift.to(device), lam)
            self._cache[key] = eff
        return self._cache[key]

    def factor(self, kind, like):
        """s_eff of one site to multiply `like` by (in like's dtype), or None."""
        if kind not in self.scales:
            return None
        if self.strength.uniform:
            key = ("factor", kind, like.device, like.dtype)  # cast once, not per forward
            if key not in self._cache:
                self._cache[key] = self.effective(like.device)[kind].to(like.dtype)
            return self._cache[key]
        s = self.raw(like.device)[kind]
        return row_factor(s, self.strength.rows(like, self.where), like.dtype)

    def shift(self, kind, like):
        """strength * b of one site to add to `like` (in like's dtype), or None."""
        if kind not in self.shifts:
            return None
        if self.strength.uniform:
            key = ("shift", kind, like.device, like.dtype)
            if key not in self._cache:
                b = self.shifts[kind].to(like.device)
                self._cache[key] = effective_shift(b, self.strength.value).to(like.dtype)
            return self._cache[key]
        b = self.raw_shifts(like.device)[kind]
        return effective_shift(b, self.strength.rows(like, self.where)).to(like.dtype)

    def bias_plus_shift(self, kind, bias, like):
        """A Linear's bias (or None) plus an output site's strength * b, in like's dtype: the
        shift made that Linear's bias (float strength; computed once)."""
        key = ("bias", kind, like.device, like.dtype)
        if key not in self._cache:
            shift = self.shift(kind, like).float()
            self._cache[key] = (shift if bias is None else bias.float() + shift).to(like.dtype)
        return self._cache[key]

    def apply(self, kind, x):
        """x * s_eff + strength * b for one site (each part only where the site has it)."""
        factor, shift = self.factor(kind, x), self.shift(kind, x)
        if factor is not None:
            x = x * factor
        return x if shift is None else x + shift

    def op_args(self, like):
        """(scale, gate_scale, strength, up first) for the op on [..., I] activations.

        A float strength is folded into the s_eff vectors, up x mid into one. A per-sequence
        strength goes to the op with one scale (per_row_scale)."""
        if self.strength.uniform:
            eff = self.effective(like.device)
            return eff["prod"], eff["gate_scale"], None, "up" in self.pre
        raw = self.raw(like.device)
        scale, up_first = per_row_scale(raw.get("up"), raw.get("mid"), "up" in self.pre)
        strength = self.op_strength(like, scale, self.raw_shifts(like.device).get("mid"))
        return scale, None, strength, up_first

    def op_strength(self, like, scale, shift):
        """The per-sequence strength as the op takes it ([B, 1, ...] over like's leading
        dims), or None when the op has neither a scale nor a shift to apply it to."""
        if scale is None and shift is None:
            return None
        return self.strength.rows(like, self.where)[..., 0]

    def mid_shift(self, device):
        """The mid site's shift as the op takes it: strength * b at a float strength, the
        shift itself (with the strength rows) per sequence; None without one."""
        if self.strength.uniform:
            return self.effective(device)["mid_shift"]
        return self.raw_shifts(device).get("mid")

    def folded(self):
        """({kind: s_eff}, {kind: strength * b}) on the CPU, float32: what fold mode bakes into
        the weights (a float strength; fold refuses a per-sequence one first)."""
        lam = self.strength.value
        return ({k: effective_scale(s, lam) for k, s in self.scales.items()},
                {k: effective_shift(b, lam) for k, b in self.shifts.items()})
