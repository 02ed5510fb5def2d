"""The modules that replace pieces of vLLM's gated MLPs when a scale file is served, and the
patching of a vLLM model with them (the settings and start-up checks: settings.py). Nothing
here imports vLLM (vllm_plugin.py wires these into it).

vLLM's gated MLPs (LlamaMLP, Qwen2MLP, Gemma3MLP, ..., also the language models of LLaVA,
Qwen2-VL, Qwen2.5-VL and InternVL) compute, on each tensor-parallel rank r of tp:
    gate_up, _ = gate_up_proj(x)   # [T, 2 I/tp]: [gate slice | up slice], neurons r I/tp ...
    h = act_fn(gate_up)            # SiluAndMul / GeluAndMul: act(gate) * up, [T, I/tp]
    y, _ = down_proj(h)            # [T, H], all-reduced over the ranks
so the gate, up and mid sites act inside act_fn, on this rank's slice of the neurons (one
sgm_ext op on the packed input, as vLLM's own silu_and_mul), and a down site on y, which every
rank holds whole. Tokens are flattened: a per-request strength is one value per token row.

Buffers never change address after the model is patched: torch.compile lifts them as graph
inputs and CUDA graphs read them where they are, so a strength changes in place (set_strength,
the per-token strength rows) and is seen by graphs captured before.
"""

import torch
from torch import nn

from ..core.scale_math import check_strength, effective_scale
from ..ops import custom_ops as ops
from ..patching.strength import op_scales, per_row_scale, row_factor
from .settings import ACTIVATIONS, Settings

# ------------------------------------------------------------------ the modules vLLM runs

def _buffer(module, name, value, device):
    """A float32 buffer of its own (a copy: set_strength writes into some of them)."""
    module.register_buffer(name, None if value is None else
                           value.to(device, torch.float32, copy=True).contiguous(),
                           persistent=False)


class ScaledActAndMul(nn.Module):
    """vLLM's act_fn with the gate, up and mid scales of this rank's neurons:
    act(gate * s_gate) * up * s_up * s_mid on the packed [T, 2 I/tp] input, s = s_eff.

    One strength for all (token_strength None): the s_eff vectors are kept ready (gate_eff,
    prod_eff = s_up * s_mid) and the forward is one op. Per-request: token_strength is the
    model's [max tokens] strength per token row, filled before each step."""

    def __init__(self, original, act, scales, neurons, strength, token_strength, device):
        super().__init__()
        self.original = original  # vLLM's activation module (describe, and its name)
        self.act = act
        raw = {kind: scales[kind][neurons] for kind in ("gate", "up", "mid") if kind in scales}
        for kind in ("gate", "up", "mid"):
            _buffer(self, f"raw_{kind}", raw.get(kind), device)
        self.register_buffer("token_strength", token_strength, persistent=False)
        _buffer(self, "gate_eff", raw.get("gate"), device)
        _buffer(self, "prod_eff", raw.get("up", raw.get("mid")), device)
        self.set_strength(strength)

    @torch.no_grad()
    def set_strength(self, value: float):
        """In place: graphs captured before see it."""
        gate, prod = op_scales(*(None if s is None else effective_scale(s, value)
                                 for s in (self.raw_gate, self.raw_up, self.raw_mid)))
        if gate is not None:
            self.gate_eff.copy_(gate)
        if prod is not None:
            self.prod_eff.copy_(prod)

    def forward(self, x):
        d = x.shape[-1] // 2
        gate, up = x[..., :d], x[..., d:]
        if self.token_strength is None:
            return ops.act_mul_scale_prechecked(gate, up, self.prod_eff, self.gate_eff, self.act)
        # as sgm_ext.patch does per sequence: gate (and up beside mid) first, the op takes
        # one scale with the strength per row
        strength = self.token_strength[: x.shape[0]]
        rows = strength[:, None]
        if self.raw_gate is not None:
            gate = gate * row_factor(self.raw_gate, rows, gate.dtype)
        scale, up_first = per_row_scale(self.raw_up, self.raw_mid)
        if up_first:
            up = up * row_factor(self.raw_up, rows, up.dtype)
        return ops.act_mul_scale(gate, up, scale, act=self.act,
                                 strength=None if scale is None else strength)


class ScaledDownProj(nn.Module):
    """vLLM's down_proj with a down site: its output [T, H] (whole on every rank) times s_eff."""

    def __init__(self, inner, scale, strength, token_strength, dtype, device):
        super().__init__()
        self.inner = inner
        _buffer(self, "raw", scale, device)
        self.register_buffer("token_strength", token_strength, persistent=False)
        self.register_buffer("factor", torch.empty(scale.numel(), dtype=dtype, device=device),
                             persistent=False)  # s_eff in the output's dtype
        self.set_strength(strength)

    @torch.no_grad()
    def set_strength(self, value: float):
        self.factor.copy_(effective_scale(self.raw, value))

    def forward(self, x):
        result = self.inner(x)
        out = result[0] if isinstance(result, tuple) else result
        if self.token_strength is None:
            out = out * self.factor
        else:
            rows = self.token_strength[: out.shape[0], None]
            out = out * row_factor(self.raw, rows, out.dtype)
        return (out, *result[1:]) if isinstance(result, tuple) else out


# ------------------------------------------------------------------ patching a vLLM model

def activation_of(module):
    """The sgm_ext activation name of vLLM's act_fn module, or None."""
    name = type(module).__name__
    return ACTIVATIONS.get(name) or ACTIVATIONS.get((name, getattr(module, "approximate", None)))


def vllm_path(hf_path, mapper):
    """A Hugging Face MLP path in vLLM's module tree, by the model's own weight-name mapper."""
    probe = f"{hf_path}.down_proj.weight"
    if mapper is not None:
        probe = mapper(probe) or probe
    return probe[: -len(".down_proj.weight")]


class ServedModel:
    """What serving left in a vLLM model: the patched modules, the strengths, a summary."""

    def __init__(self, settings, modules, token_strength, lines):
        self.settings = settings
        self.modules = modules
        self.token_strength = token_strength  # [max tokens] or None
        self.default = settings.strength  # of requests that set none, per-request mode
        self.lines = lines  # (Hugging Face site, vLLM module, neurons on this rank)

    def set_strength(self, value: float) -> float:
        value = check_strength(value, per_sequence=False)
        self.default = value
        if self.token_strength is None:
            for m in self.modules:
                m.set_strength(value)
        else:
            self.token_strength.fill_(value)
        return value

    def fill_token_strengths(self, strengths, counts):
        """Before a step: request i's strength (None: the default) on its counts[i] rows."""
        import numpy as np

        values = np.asarray([self.default if s is None else s for s in strengths],
                            dtype=np.float32)
        rows = np.repeat(values, np.asarray(counts, dtype=np.int64))
        n = rows.shape[0]
        self.token_strength[:n].copy_(torch.from_numpy(rows), non_blocking=True)
        self.token_strength[n:].fill_(self.default)  # padded rows (CUDA-graph batch sizes)


def patch_vllm_model(model, targets, settings: Settings, *, mapper=None, max_tokens=0,
                     dtype=torch.float32) -> ServedModel:
    """Replace act_fn (and down_proj for down sites) of the vLLM MLPs of `targets` (from
    check_for_serving). Everything is checked before anything changes: a model is
    patched whole or not at all. mapper: the model's Hugging Face -> vLLM name function.
    max_tokens: the per-token strength rows for per-request strength (0: off)."""
    modules = dict(model.named_modules())
    found = []
    for target in targets:
        hf_path, scales = target.info.path, target.scales
        path = vllm_path(hf_path, mapper)
        mlp = modules.get(path)
        if mlp is None:
            parent = modules.get(path.rpartition(".")[0])
            if "PPMissing" in type(parent).__name__ or "PPMissing" in type(mlp).__name__:
                continue  # pipeline parallel: the layer lives on another rank
            raise ValueError(f"sites of {hf_path}: vLLM's {type(model).__name__} has no module "
                             f"{path}")
        parts = [getattr(mlp, a, None) for a in ("gate_up_proj", "act_fn", "down_proj")]
        act = activation_of(parts[1]) if parts[1] is not None else None
        if None in parts[:1] + parts[2:] or act is None:
            raise ValueError(f"sites of {hf_path}: vLLM's {path} ({type(mlp).__name__}, "
                             f"act_fn {type(parts[1]).__name__}) is not a gated MLP sgm-ext "
                             "serves (gate_up_proj, SiluAndMul / GeluAndMul, down_proj)")
        gate_up = parts[0]
        rank, size = getattr(gate_up, "tp_rank", 0), getattr(gate_up, "tp_size", 1)
        local = gate_up.output_size_per_partition // 2
        for kind, value in scales.items():
            want = getattr(parts[2], "output_size", None) if kind == "down" else local * size
            if want is not None and value.numel() != want:
                raise ValueError(f"scales of {hf_path} ({kind}): {value.numel()} values, "
                                 f"vLLM's {path} has {want}")
        found.append((target, path, mlp, act, slice(rank * local, (rank + 1) * local)))
    device = next(model.parameters()).device
    token_strength = (torch.full((max_tokens,), settings.strength, dtype=torch.float32,
                                 device=device) if max_tokens else None)
    patched, lines = [], []
    for target, path, mlp, act, neurons in found:
        scales = target.scales
        if any(k in scales for k in ("gate", "up", "mid")):
            mlp.act_fn = ScaledActAndMul(mlp.act_fn, act, scales, neurons, settings.strength,
                                         token_strength, device)
            patched.append(mlp.act_fn)
        if "down" in scales:
            mlp.down_proj = ScaledDownProj(mlp.down_proj, scales["down"], settings.strength,
                                           token_strength, dtype, device)
            patched.append(mlp.down_proj)
        lines += [(target.info.site(k), path,
                   scales[k].numel() if k == "down" else neurons.stop - neurons.start)
                  for k in sorted(scales)]
    return ServedModel(settings, patched, token_strength, lines)


def is_served(module) -> bool:
    return isinstance(module, (ScaledActAndMul, ScaledDownProj))

