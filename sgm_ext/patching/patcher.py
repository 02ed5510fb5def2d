"""Apply a ScaleSet to a model: `patch(model, scales, mode=...)`, `patched`, `steering`,
`unpatch`, and `check_scales`, which resolves and validates scales against a model.

Three ways to do the same math on each site, y = s_eff x + strength * b with s_eff = 1 -
strength (1 - scale) and b the site's shift (0 where it has none):
- "fused" (fused.py): the MLP's forward is swapped for one that calls the MLP's own
  sub-modules (so quantized Linears, PEFT LoRA layers and accelerate hooks keep working) and
  sgm_ext.ops for the activation x product x scale (SGM_EXT_GATED_UP_PROJ=1: see fused.py).
- "fold" (fold.py): the scales are multiplied into the weights (rows of the Linear a site is
  the output of, columns of the down / fc2 Linear for `mid`, columns of the first projections
  for `input`), the shifts into the biases (a bias is created where there is none; a `mid`
  shift b enters the down bias as W_down b, an `input` shift the first projections' as W b);
  the touched slices are saved first and copied back on unpatch, so restoring is bit-exact (a
  created bias is removed again).
- "hook" (hooks.py): forward hooks on the sub-modules that change their outputs (multiply,
  then add), and a forward pre-hook on the MLP for its `input` site, as AurA and ml-act do it;
  the reference the other two are tested against.
The strength, one float or one per sequence, becomes what each mode applies in one place:
strength.py (ScalesAtStrength).

Everything is validated before the model is touched: on any error the model is unchanged
and the message names the offending entry. The forward swap keeps parameters and state_dict
keys as they are (an instance attribute shadows the class's forward; unpatch deletes it).

What remove() undoes is plain data on the handle (handle.py: swapped forwards, hook objects,
saved weight slices, marked modules), never closures: copy.deepcopy of a patched model maps
all of it onto the copy, which is then an independent patched model with a handle of its own.
Pickling a patched model (pickle, torch.save(model)) is refused with a message saying what to
do; torch.save(model.state_dict()) works as for any model.
"""
import contextlib
import difflib
import os
from collections.abc import Mapping
from typing import NamedTuple, Union

import torch
from torch import nn

from .fold import NEEDS_ONE_STRENGTH, fold_plan
from .handle import PatchHandle, handle_of
from .registry import REGISTRY, describe, find_mlps, site_index
from .scales import ScaleSet, config_fingerprint, load_scales, load_vectors
from .strength import Strength

MODES = ("fused", "fold", "hook")


def supported_architectures() -> dict:
    """{MLP class name: layout} of the registry table. Any other module with gate_proj /
    up_proj / down_proj Linears and an act_fn is covered by the generic gated rule."""
    return {name: layout.kind for name, layout in REGISTRY.items()}


# ---------------------------------------------------------------- resolving scales to MLPs

class _Target(NamedTuple):
    info: object  # registry.MLPInfo
    module: nn.Module
    scales: dict  # site kind -> float32 CPU tensor
    shifts: dict  # site kind -> float32 CPU tensor (sites with an added shift)

    def kinds(self):
        """The site kinds this MLP changes, with a scale, a shift or both."""
        return list(dict.fromkeys([*self.scales, *self.shifts]))


def as_scaleset(scales):
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


def check_fingerprint(config, scales):
    """ValueError unless the scale file was made for a model of this config's sizes (a file
    without a recorded fingerprint passes). Cheap: callers run it on a config read from
    config.json, before the weights load."""
    if config is not None:
        check_config_fingerprint(scales, config_fingerprint(config),
                                 getattr(config, "model_type", "?"))


def check_config_fingerprint(scales, have, model_type, what="this model's"):
    """ValueError unless the scale file's config fingerprint (where it records one) is `have`,
    the fingerprint of a model of `model_type` (`what`: whose it is, for the message)."""
    want = scales.metadata.get("config_fingerprint")
    if want and want != have:
        made_for = scales.metadata.get("model_type", "another model")
        raise ValueError(f"the scales were made for a model with config fingerprint {want} "
                         f"({made_for}); {what} is {have} ({model_type})")


# ---------------------------------------------------------------- public API

def patch(model: nn.Module, scales: Union[ScaleSet, Mapping, str, os.PathLike], *,
          mode: str = "fused", strength: Union[float, torch.Tensor] = 1.0,
          allow_amplify: bool = False) -> "PatchHandle":
    """Apply per-neuron scales to a model; returns a PatchHandle.

    scales: a ScaleSet, a dict {site: [n] tensor} (n: the site's width, I, or H for the
    `input` and `down` sites) or a path to a scale file. mode: "fused", "fold" or "hook".
    strength: a float in [0, 1] or one per sequence ([B] / [B, 1] tensor; the activations'
    first dim is the batch). Scales above 1 (amplification) need allow_amplify=True. On any
    error the model is left untouched.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
    strength = Strength(strength)
    if mode == "fold":
        strength.require_uniform(NEEDS_ONE_STRENGTH)
    root = _unwrap(model)
    if type(root).__module__.startswith("vllm."):
        raise ValueError("this is a model vLLM runs: vLLM models are patched when they load, "
                         "through the sgm_ext plugin (additional_config={'sgm_ext': {'scales': "
                         "...}}); a change made after start-up would be ignored by its compiled "
                         "graphs")
    for path, m in root.named_modules():
        existing = handle_of(m)
        if existing is not None:
            where = f"the model's {path}" if path else "the model"
            raise ValueError(f"{where} is already patched ({existing!r}); call "
                             "unpatch / handle.remove() first")
    targets = check_scales(root, scales, allow_amplify=allow_amplify)
    handle = PatchHandle(model, root, targets, mode, strength)
    if mode == "fold":
        fold_plan(targets, strength)  # every Linear foldable? raises before anything changes
    handle.apply()
    return handle


def check_scales(model: nn.Module, scales: Union[ScaleSet, Mapping, str, os.PathLike], *,
                 allow_amplify: bool = False) -> list:
    """Check scales against a model without changing it, as patch does: values, the config
    fingerprint, every site and its size. Returns the targets, one per MLP (info: its
    registry.MLPInfo, module, scales: {site kind: tensor}); raises naming the first bad
    entry. A model built on the meta device is enough (no weights are read)."""
    scales = as_scaleset(scales)
    if not scales.sites():
        raise ValueError("the scale set is empty: nothing to patch")
    scales.validate(allow_amplify=allow_amplify)
    root = _unwrap(model)
    check_fingerprint(getattr(root, "config", None), scales)
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
    handle = handle_of(_unwrap(model))
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
