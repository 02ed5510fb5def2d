"""Serving a scale file in vLLM, before any model runs: the settings (vLLM's
additional_config), a request's strength and the checks of a request's body, the scale file's
content hash and its watch, and the checks made before a server starts. No vLLM import."""
import json
import math
import os
from typing import NamedTuple, Optional

import torch

from ..core.files import file_sha256
from ..core.scale_math import check_scale_values
from ..patching.patcher import check_scales
from ..patching.scales import load_scales
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
    inputs = [t.info.site(k) for t in targets for k in t.scales if k == "input"]
    if inputs:
        raise ValueError(f"vLLM serving does not serve MLP input sites (e.g. {inputs[0]!r}): "
                         "serve them with transformers and sgm_ext.patch, or serve a model "
                         "that sgm-ext export --model folded them into")
    return targets
