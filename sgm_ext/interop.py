"""Read and write the intervention files of apple/ml-aura and apple/ml-act as ScaleSets.

- ml-aura (and its LLaVA variant) writes one `<module name>.statedict` per hooked module, a
  torch-saved dict {"alpha": tensor of shape (1, 1, N)}: the module's outputs are multiplied
  by alpha.
- ml-act's AurA hook keeps {"auroc": (N,), "strength": scalar} per module; alpha follows from
  the AUROC: 1 - 2 (AUROC - 0.5) above the threshold (0.5), else 1, then the strength:
  1 - strength (1 - alpha) (both by sgm_ext.scale_math, as the profiler makes them). Its
  module names may carry an output selector (`name:0`).

Files are read with torch.load(weights_only=True): tensors only, nothing unpickled.
"""
import os
from pathlib import Path

import torch

from .registry import MID
from .scale_math import check_strength, effective_scale, method_scales
from .scales import ScaleSet

AURA_SUFFIX = ".statedict"
# transformers 4.x module paths of LLaVA-style models (what ml-aura-vl hooked) -> 5.x paths.
_LEGACY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head", "lm_head"),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def _state_files(directory, suffixes):
    """The state files in `directory`, or in its only sub-directory (ml-aura's <tag>/<model>/)."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"{d}: not a directory")
    files = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(suffixes))
    if not files:
        subs = [p for p in d.iterdir() if p.is_dir()]
        if len(subs) == 1:
            return _state_files(subs[0], suffixes)
        raise FileNotFoundError(f"{d}: no {' / '.join(suffixes)} files")
    return files


def _module_name(path, suffixes):
    name = path.name
    for s in suffixes:
        if name.endswith(s):
            name = name[: -len(s)]
            break
    return name.split(":")[0]  # ml-act's output selector


def _load(path, key):
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or key not in state:
        raise ValueError(f"{path}: expected a state dict with key {key!r}, found "
                         f"{sorted(state) if isinstance(state, dict) else type(state).__name__}")
    return state


def _vector(t, path, key):
    t = torch.as_tensor(t)
    if t.dim() == 0 or any(n != 1 for n in t.shape[:-1]):
        raise ValueError(f"{path}: {key} has shape {tuple(t.shape)}, expected (N,) or (1, 1, N)")
    return t.reshape(-1).to(torch.float32)


def _rename(names, model):
    """Map ml-aura-vl's legacy LLaVA module paths onto the model's, where the model lacks them."""
    if model is None:
        return {n: n for n in names}
    modules = {name for name, _ in model.named_modules()}
    out = {}
    for n in names:
        new = n
        if n not in modules:
            for old, repl in _LEGACY_PREFIXES:
                if n.startswith(old) and repl + n[len(old):] in modules:
                    new = repl + n[len(old):]
                    break
        out[n] = new
    return out


def from_aura(directory, model=None):
    """ScaleSet from ml-aura's `<module>.statedict` files ({"alpha": (1, 1, N)}).

    With `model`, module paths of the transformers 4.x LLaVA layout (ml-aura-vl) that the
    model does not have are mapped onto its 5.x paths.
    """
    files = _state_files(directory, (AURA_SUFFIX,))
    names = {f: _module_name(f, (AURA_SUFFIX,)) for f in files}
    rename = _rename(names.values(), model)
    scales = {rename[names[f]]: _vector(_load(f, "alpha")["alpha"], f, "alpha") for f in files}
    return ScaleSet(scales, {"method": "aura", "source": f"ml-aura:{os.fspath(directory)}"})


def from_act(directory, threshold=0.5, model=None):
    """ScaleSet from ml-act's AurA state files ({"auroc": (N,), "strength": scalar})."""
    suffixes = (AURA_SUFFIX, ".pt", ".pth")
    files = _state_files(directory, suffixes)
    names = {f: _module_name(f, suffixes) for f in files}
    rename = _rename(names.values(), model)
    scales = {}
    for f in files:
        state = _load(f, "auroc")
        auroc = _vector(state["auroc"], f, "auroc")
        strength = check_strength(float(state.get("strength", 1.0)), per_sequence=False,
                                  name=f"{f}: strength")
        alpha = method_scales(auroc, auroc > threshold, "aura")
        scales[rename[names[f]]] = effective_scale(alpha, strength)
    return ScaleSet(scales, {"method": "aura", "threshold": threshold,
                             "source": f"ml-act:{os.fspath(directory)}"})


def to_aura(scales, directory):
    """Write a ScaleSet as ml-aura's `<site>.statedict` files; returns the paths written.

    AurA hooks module outputs, so a `mid` site (no module of its own) cannot be written:
    move it onto the up_proj site (same effect in a gated MLP) first.
    """
    for site in scales:
        if site == MID or site.endswith("." + MID):
            raise ValueError(f"site {site!r} is an MLP's product, not a module output; AurA "
                             "files name hooked modules (use the up_proj site instead)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for site, t in scales.items():
        path = d / (site + AURA_SUFFIX)
        torch.save({"alpha": t.detach().to(torch.float32).reshape(1, 1, -1).clone()}, path)
        written.append(path)
    return written
