"""Serving a scale file in vLLM: the settings, the checks made before a server starts, and the
modules that replace pieces of vLLM's gated MLPs. Nothing here imports vLLM
(sgm_ext.vllm_plugin wires these into it).

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
import hashlib
import json
import math
import os
from typing import NamedTuple, Optional

import torch
from torch import nn

from ..core.scale_math import check_scale_values, check_strength, effective_scale
from ..ops import custom_ops as ops
from ..patching.patcher import check_scales
from ..patching.scales import load_scales
from ..patching.strength import op_scales, per_row_scale, row_factor
from ..profile.pooling import language_mlps

SETTINGS_KEY = "sgm_ext"  # additional_config={"sgm_ext": {...}}
REQUEST_KEY = "sgm_strength"  # SamplingParams(extra_args={"sgm_strength": x}), vllm_xargs
REQUEST_PLACE = f"vllm_xargs.{REQUEST_KEY}"  # where an OpenAI request sets it
REQUEST_PREFIX = "sgm_"  # request keys with it are sgm-ext's: unknown ones are refused
STRENGTH_RANGE = "a number in [0, 1] (0: the unchanged model, 1: the full scales)"
OPTIONS = {  # option -> (type, what it is)
    "scales": (str, "path of the scale file"),
    "strength": (float, "strength in [0, 1] for every request (default 1)"),
    "per_request": (bool, f"let each request set its own strength (extra_args {REQUEST_KEY!r})"),
    "allow_amplify": (bool, "accept scales above 1"),
    "scales_sha256": (str, "the file's content hash (set at start-up; part of vLLM's compile "
                           "cache key)"),
}
# vLLM activation module class -> sgm_ext activation name (GeluAndMul: by its `approximate`)
ACTIVATIONS = {"SiluAndMul": "silu", ("GeluAndMul", "none"): "gelu",
               ("GeluAndMul", "tanh"): "gelu_tanh"}


class Settings(NamedTuple):
    scales: str
    strength: float = 1.0
    per_request: bool = False
    allow_amplify: bool = False
    scales_sha256: Optional[str] = None


KIND_NAMES = {str: "a string", float: "a number", bool: "true or false"}


def shown(value) -> str:
    """A value as a JSON client wrote it (true, null, "abc", {...}), cut to 60 characters."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def checked_strength(value, name: str = REQUEST_KEY) -> float:
    """A strength from a request or a setting: a number in [0, 1], as a float. One-line
    ValueError naming `name` and the range otherwise (booleans, null, strings, objects, NaN,
    inf included): the message an HTTP client or a command-line user reads."""
    number = (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))
    if not number or not 0.0 <= value <= 1.0:
        what = (" (a JSON boolean)" if isinstance(value, bool) else
                " (a string)" if isinstance(value, str) else
                " (an object)" if isinstance(value, dict) else
                " (a list)" if isinstance(value, (list, tuple)) else "")
        raise ValueError(f"{name} is {shown(value)}{what}; it must be {STRENGTH_RANGE}")
    return float(value)


def misplaced_keys(keys, where: str, strength_here: bool = False) -> Optional[str]:
    """The refusal of the first sgm-ext key (sgm_*) among `keys` that the server never reads
    in that place (`where`: "the request body", "vllm_xargs", ...), or None. strength_here:
    `where` is the place of sgm_strength (vllm_xargs, extra_args)."""
    for key in keys:
        if isinstance(key, str) and key.lower().startswith(REQUEST_PREFIX) \
                and not (key == REQUEST_KEY and strength_here):
            return (f"{where} has {key!r}, which this server never reads: the strength of a "
                    f"request goes in {REQUEST_PLACE} ({STRENGTH_RANGE})")
    return None


# keys whose values are free-form (JSON schemas, tool definitions, user metadata): their own
# keys are not request options, so they are not searched for sgm_* keys
FREE_FORM = frozenset({"response_format", "tools", "functions", "structured_outputs",
                       "guided_json", "json_schema", "metadata", "logit_bias", "messages",
                       "input", "prompt", "chat_template_kwargs", "mm_processor_kwargs"})


def request_body_problem(body) -> Optional[str]:
    """What is wrong with the sgm-ext part of a JSON request body (an OpenAI completion, chat
    or responses request), as one line for the client, or None: an sgm_* key anywhere but
    vllm_xargs.sgm_strength (top level, misspelt, nested option objects), or a strength that
    is not a number in [0, 1] as the client wrote it (true / false, null, a string, an object:
    vLLM would turn true into 1 before the plugin sees it)."""
    if not isinstance(body, dict):
        return None
    todo = [(body, "the request body")]
    while todo:
        obj, where = todo.pop(0)
        problem = misplaced_keys(obj, where, strength_here=where == "vllm_xargs")
        if problem:
            return problem
        for key, value in obj.items():
            if isinstance(value, dict) and key not in FREE_FORM:
                todo.append((value, key if where == "the request body" else f"{where}.{key}"))
    xargs = body.get("vllm_xargs")
    if isinstance(xargs, dict) and REQUEST_KEY in xargs:
        try:
            checked_strength(xargs[REQUEST_KEY], REQUEST_PLACE)
        except ValueError as e:
            return str(e)
    return None


def read_settings(additional_config) -> Optional[Settings]:
    """The sgm_ext entry of vLLM's additional_config as Settings (None when there is none);
    ValueError naming the bad option."""
    if not isinstance(additional_config, dict) or additional_config.get(SETTINGS_KEY) is None:
        return None
    entry = additional_config[SETTINGS_KEY]
    if not isinstance(entry, dict):
        raise ValueError(f"additional_config[{SETTINGS_KEY!r}] must be an object of options "
                         f"({', '.join(OPTIONS)}), got {type(entry).__name__}")
    unknown = sorted(set(entry) - set(OPTIONS))
    if unknown:
        raise ValueError(f"additional_config[{SETTINGS_KEY!r}]: unknown option {unknown[0]!r}; "
                         f"the options are {', '.join(OPTIONS)}")
    if not entry.get("scales"):
        raise ValueError(f"additional_config[{SETTINGS_KEY!r}] has no 'scales' (the path of "
                         "the scale file)")
    for key, value in entry.items():
        kind = OPTIONS[key][0]
        ok = (isinstance(value, (int, float)) and not isinstance(value, bool)) if kind is float \
            else isinstance(value, kind)
        if not ok:
            raise ValueError(f"additional_config[{SETTINGS_KEY!r}][{key!r}] is "
                             f"{shown(value)}; it must be {KIND_NAMES[kind]} "
                             f"({OPTIONS[key][1]})")
    strength = checked_strength(entry.get("strength", 1.0),
                                f"additional_config[{SETTINGS_KEY!r}]['strength']")
    return Settings(os.path.abspath(os.path.expanduser(entry["scales"])), strength,
                    entry.get("per_request", False), entry.get("allow_amplify", False),
                    entry.get("scales_sha256"))


def request_strength(extra_args, settings: Settings) -> Optional[float]:
    """The strength a request asks for (None: the server's), checked; ValueError naming it."""
    if not extra_args:
        return None
    problem = misplaced_keys(extra_args, "extra_args (vllm_xargs)", strength_here=True)
    if problem:
        raise ValueError(problem)
    if REQUEST_KEY not in extra_args:
        return None
    value = extra_args[REQUEST_KEY]
    if not settings.per_request:
        raise ValueError(f"{REQUEST_KEY}: this server serves one strength for all requests "
                         f"({settings.strength}); start it with per_request to let requests "
                         "choose")
    return checked_strength(value, REQUEST_KEY)


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _signature(path):
    """(size, mtime, inode) of a file, None when it is gone: a change of the file, cheaply."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns, st.st_ino


def file_state(path, sha256) -> str:
    """The scale file on disk against the one a server loaded (its content hash):
    "as loaded", "changed" or "missing" (deleted or unreadable)."""
    try:
        return "as loaded" if file_sha256(path) == sha256 else "changed"
    except OSError:
        return "missing"


KEEPS_LOADED = ("a running server keeps the scales it loaded at start-up: restart it to serve "
                "the file as it is now")


class ScaleFileWatch:
    """The scale file a server loaded: news() says, once per change, when the file on disk
    stops being that file (replaced, rewritten, deleted). One os.stat per call; the file is
    hashed only when its size, time or inode moved."""

    def __init__(self, path, sha256, signature=...):
        self.path, self.sha256 = path, sha256
        # the file's signature when it was hashed (None: unknown, hash at the first news())
        self._seen = _signature(path) if signature is ... else signature
        self._state = "as loaded"

    def news(self) -> Optional[str]:
        """A warning when the file changed since the last call (or start-up), else None."""
        signature = _signature(self.path)
        if signature is not None and signature == self._seen:
            return None
        self._seen = signature
        state = "missing" if signature is None else file_state(self.path, self.sha256)
        if state == self._state:
            return None
        self._state = state
        if state == "as loaded":
            return f"sgm-ext: {self.path} is again the file this server loaded"
        what = ("was deleted (or cannot be read)" if state == "missing" else
                "changed on disk")
        return (f"sgm-ext: {self.path} {what} since the server started (loaded: sha256 "
                f"{self.sha256[:16]}...); {KEEPS_LOADED}")


def skeleton(hf_config):
    """The Hugging Face model of a config on the meta device (no weights, no memory): what
    the scale file's site names refer to."""
    import transformers

    auto = (transformers.AutoModelForImageTextToText
            if getattr(hf_config, "vision_config", None) is not None
            else transformers.AutoModelForCausalLM)
    with torch.device("meta"):
        return auto.from_config(hf_config)


AMPLIFY_SETTING = f'"allow_amplify": true in additional_config[{SETTINGS_KEY!r}]'
AMPLIFY_FLAG = "--allow-amplify"  # sgm-ext serve's


def check_amplification(scales, allow_amplify: bool, option: str = AMPLIFY_SETTING):
    """The value checks of a ScaleSet (scale_math.check_scale_values, same order), with the
    refusal of scales above 1 naming `option`, the way the user asks for amplification:
    AMPLIFY_FLAG for `sgm-ext serve`, AMPLIFY_SETTING (the default) for vLLM's own entry
    points. ValueError, one line."""
    for site, t in scales.scales.items():
        check_scale_values(site, t, allow_amplify=True)  # not finite, negative
        if not allow_amplify and (t > 1).any():
            i = int((t > 1).nonzero()[0])
            raise ValueError(f"scales[{site!r}][{i}] is {t[i].item():g}, above 1 "
                             f"(amplification): serve it with {option} if that is intended")


def check_for_serving(hf_config, settings: Settings, *,
                      amplify_option: str = AMPLIFY_SETTING) -> list:
    """The targets of the scale file (patching.check_scales: one per MLP), after the checks of
    sgm_ext.patch (file, values, config fingerprint, site names, sizes) and those of serving:
    only the language model's gated MLPs are served. Raises naming the first bad entry;
    amplify_option: how the caller's user allows scales above 1 (`sgm-ext serve` passes
    AMPLIFY_FLAG)."""
    scales = load_scales(settings.scales)
    check_amplification(scales, settings.allow_amplify, amplify_option)
    model = skeleton(hf_config)
    targets = check_scales(model, scales, allow_amplify=settings.allow_amplify)
    shifted = [t.info.site(k) for t in targets for k in t.shifts]
    if shifted:
        raise ValueError(f"vLLM serving takes scales only; the scale file has shifts (e.g. "
                         f"{shifted[0]!r}): serve them with transformers and sgm_ext.patch")
    lm_paths = set(language_mlps(model))
    refused = [site for t in targets if t.info.path not in lm_paths or t.info.layout != "gated"
               for site in sorted(t.info.site(k) for k in t.scales)]
    if refused:
        raise ValueError(f"vLLM serving patches the language model's gated MLPs only; "
                         f"{len(refused)} site(s) cannot be served: {', '.join(refused[:4])}"
                         f"{' ...' if len(refused) > 4 else ''} (vision towers: patch them with "
                         "sgm_ext.patch in transformers)")
    return targets


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

