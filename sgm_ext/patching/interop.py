"""Read and write the intervention files of apple/ml-aura and apple/ml-act as ScaleSets.

- ml-aura (and its LLaVA variant) writes one `<module name>.statedict` per hooked module, a
  torch-saved dict {"alpha": tensor of shape (1, 1, N)}: the module's outputs are multiplied
  by alpha.
- ml-act writes one `<module name>.statedict` per hooked module too (its module names may
  carry an output selector, `name:0`), the state dict of the intervention's hook:
  - AurA: {"auroc": (N,)} only; alpha = 1 - 2 (AUROC - 0.5) above 0.5, else 1 (by
    sgm_ext.scale_math, as the profiler makes them). The strength is a setting of the hook
    run, not saved: pass it to from_act, or patch at that strength;
  - mean_ot / gaussian_ot (one hook class, so the files are alike and the method is given):
    {"mu1", "std1"} of the toxic responses, {"mu2", "std2"} of the non-toxic ones, (N,) each;
    gaussian_ot: z' = (std2 / std1)(z - mu1) + mu2, mean_ot: z' = z - mu1 + mu2, on the
    neurons where std1 and std2 exceed std_eps (1e-4), the others unchanged;
  - linear_ot: {"net.w1", "net.b1"}, (1, N) each: z' = w1 z + b1;
  each transport file also holds the source quantiles ("quantiles_dict_src") and the ones
  it masks by ("quantiles_src": [-1e6, 1e6] or "q_all" for every token). Only that "all"
  setting is read; a real quantile mask (transport only where z lies between two quantiles)
  is refused.
  As a ScaleSet: scale s and shift b with z' = s z + b, so patching at strength lambda gives
  ml-act's blend lambda z' + (1 - lambda) z.
  ml-act hooks layer norms by their module paths too (its model configs' `layernorm` /
  `post_layernorm` module lists: `model.layers.3.post_attention_layernorm:0.statedict`). A
  norm whose output is an MLP's input (registry.MLP_INPUT_NORMS: post_attention_layernorm in
  Llama, pre_feedforward_layernorm in Gemma 2 / 3) is that MLP's `input` site; reading or
  writing one needs the model, which says which norm feeds which MLP. Other norms (Gemma's
  post_attention_layernorm and post_feedforward_layernorm normalise the attention's and the
  MLP's outputs before the residual add) are no sgm-ext site and are refused.

Files are read with torch.load(weights_only=True): tensors, lists and strings only, nothing
unpickled.
"""
import os
from pathlib import Path

import torch

from ..core.scale_math import check_strength, effective_scale, effective_shift, method_scales
from .registry import INPUT, MID, MLP_INPUT_NORMS, find_mlps, input_norm, site_kind
from .scales import ScaleSet

ACT_METHODS = ("aura", "mean_ot", "gaussian_ot", "linear_ot")
ACT_SUFFIXES = (".statedict", ".pt", ".pth")
STD_EPS = 1e-4  # ml-act's default std_eps of its Gaussian hooks
_ALL_QUANTILES = 1e6  # ml-act's "q_all" bounds: [-1e6, 1e6]

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


def _norm_sites(model):
    """{norm module path: the `input` site of the MLP it feeds} over the model's MLPs."""
    out = {}
    for path, info in find_mlps(model).items():
        norm = input_norm(model, path)
        if norm is not None:
            out[norm] = info.site(INPUT)
    return out


def _is_norm_name(name):
    return name.rsplit(".", 1)[-1] in MLP_INPUT_NORMS or name.endswith("layernorm")


def _act_sites(files, names, model):
    """{file: site} of ml-act's state files: _rename's paths, and the norms that feed an MLP
    mapped onto its `input` site; ValueError naming the file for a norm that cannot be
    mapped (no model given, or a norm that feeds no MLP)."""
    rename = _rename(names.values(), model)
    norms = _norm_sites(model) if model is not None else {}
    out = {}
    for f in files:
        name = rename[names[f]]
        if name in norms:
            out[f] = norms[name]
        elif _is_norm_name(name):
            if model is None:
                raise ValueError(f"{f}: ml-act hooked the layer norm {name}; pass model= so "
                                 "that it maps onto the input site of the MLP it feeds")
            raise ValueError(f"{f}: the output of {name} is no MLP's input (sgm-ext's "
                             "sites are in the MLPs; the norms that feed one here: "
                             f"{', '.join(list(norms)[:2]) or 'none'} ...)")
        else:
            out[f] = name
    return out


def from_aura(directory, model=None):
    """ScaleSet from ml-aura's `<module>.statedict` files ({"alpha": (1, 1, N)}).

    With `model`, module paths of the transformers 4.x LLaVA layout (ml-aura-vl) that the
    model does not have are mapped onto its 5.x paths, and a norm that feeds an MLP onto that
    MLP's `input` site (as to_aura writes it).
    """
    files = _state_files(directory, (AURA_SUFFIX,))
    sites = _act_sites(files, {f: _module_name(f, (AURA_SUFFIX,)) for f in files}, model)
    scales = {sites[f]: _vector(_load(f, "alpha")["alpha"], f, "alpha") for f in files}
    return ScaleSet(scales, {"method": "aura", "source": f"ml-aura:{os.fspath(directory)}"})


def from_act(directory, threshold=0.5, model=None, *, method="aura", strength=1.0,
             std_eps=STD_EPS):
    """ScaleSet from ml-act's state files of one intervention `method` (see the module
    docstring for each layout): aura ({"auroc"}: scales), mean_ot / gaussian_ot ({"mu1",
    "mu2", "std1", "std2"}: shifts, and scales for gaussian_ot), linear_ot ({"net.w1",
    "net.b1"}: scales and shifts). strength: the hook run's strength, baked in (1.0: patch at
    the strength you want instead). Transport scales may exceed 1: patch them with
    allow_amplify=True. model: maps ml-aura-vl's legacy LLaVA paths and the norms that feed
    an MLP (onto its `input` site); needed for files of such norms."""
    if method not in ACT_METHODS:
        raise ValueError(f"method must be one of {ACT_METHODS}, got {method!r}")
    strength = check_strength(strength, per_sequence=False)
    files = _state_files(directory, ACT_SUFFIXES)
    sites = _act_sites(files, {f: _module_name(f, ACT_SUFFIXES) for f in files}, model)
    scales, shifts = {}, {}
    for f in files:
        site = sites[f]
        if method == "aura":
            auroc = _vector(_load(f, "auroc")["auroc"], f, "auroc")
            alpha = method_scales(auroc, auroc > threshold, "aura")
            scales[site] = effective_scale(alpha, strength)
            continue
        scale, shift = _transport_map(f, method, std_eps)
        if scale is not None:
            scales[site] = effective_scale(scale, strength)
        shifts[site] = effective_shift(shift, strength)
    meta = {"method": method, "source": f"ml-act:{os.fspath(directory)}", "strength": strength}
    if method == "aura":
        meta["threshold"] = threshold
    return ScaleSet(scales, meta, shifts=shifts)


def _transport_map(path, method, std_eps):
    """(scale or None, shift) [N] float32 of one ml-act transport state file."""
    keys = ("net.w1", "net.b1") if method == "linear_ot" else ("mu1", "mu2", "std1", "std2")
    state = _load(path, keys[0])
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path}: a {method} state needs {', '.join(keys)}; missing "
                         f"{', '.join(missing)}")
    _check_all_quantiles(path, state.get("quantiles_src", "q_all"))
    v = {k: _vector(state[k], path, k).double() for k in keys}
    if method == "linear_ot":
        return v["net.w1"].float(), v["net.b1"].float()
    moved = (v["std1"] > std_eps) & (v["std2"] > std_eps)
    ratio = v["std2"] / torch.where(moved, v["std1"], 1.0)
    scale = torch.where(moved, ratio, 1.0) if method == "gaussian_ot" \
        else torch.ones_like(ratio)
    shift = torch.where(moved, v["mu2"] - scale * v["mu1"], 0.0)
    return (scale.float() if method == "gaussian_ot" else None), shift.float()


def _check_all_quantiles(path, quantiles):
    """ValueError unless ml-act's quantile setting transports every token ("q_all")."""
    everything = quantiles == "q_all" or (
        isinstance(quantiles, (list, tuple)) and len(quantiles) == 2
        and all(isinstance(q, (int, float)) for q in quantiles)
        and quantiles[0] <= -_ALL_QUANTILES and quantiles[1] >= _ALL_QUANTILES)
    if not everything:
        shown = quantiles if isinstance(quantiles, str) else type(quantiles).__name__
        raise ValueError(f"{path}: quantiles_src is {shown}: ml-act transports only the values "
                         "inside source quantiles there, a mask sgm-ext does not apply; learn "
                         "the map with quantiles_src q_all")


def to_act(scales, directory, model=None):
    """Write a ScaleSet as ml-act's AurA state files, `<module>.statedict` = {"auroc": (N,)};
    returns the paths written. AUROC = 1 - alpha / 2 inverts ml-act's alpha = 1 - 2 (AUROC -
    0.5) for alpha in [0, 1] (alpha 1 -> 0.5, which ml-act leaves alone). A Linear's site is
    written under its path, an `input` site under the norm that feeds the MLP (needs `model`).
    Refused before anything is written: shifts, scales above 1, `mid` sites (AurA hooks
    modules), `input` sites without the model."""
    if getattr(scales, "shifts", None):
        raise ValueError("ml-act's AurA files hold scales only; this ScaleSet has shifts (e.g. "
                         f"{next(iter(scales.shifts))!r})")
    modules = _module_names(scales, model)
    for site, t in scales.items():
        if (t > 1).any() or (t < 0).any():
            i = int(((t > 1) | (t < 0)).nonzero()[0])
            raise ValueError(f"scales[{site!r}][{i}] is {t[i].item()}: ml-act's AurA files "
                             "hold factors in [0, 1] only")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for site, t in scales.items():
        path = d / (modules[site] + AURA_SUFFIX)
        auroc = 1.0 - t.detach().to(torch.float64) / 2.0
        torch.save({"auroc": auroc.to(torch.float32).clone()}, path)
        written.append(path)
    return written


def _module_names(scales, model):
    """{site: the module whose output it is}: a Linear's site is its path, an `input` site the
    norm that feeds the MLP (by the model); ValueError for a `mid` site (no module's output)
    and for an `input` site without a model or a norm."""
    norms = {} if model is None else {site: norm for norm, site in _norm_sites(model).items()}
    out = {}
    for site in scales:
        kind = site_kind(site)
        if kind == MID:
            raise ValueError(f"site {site!r} is an MLP's product, not a module output; AurA "
                             "files name hooked modules (use the up_proj site instead)")
        if kind == INPUT and site not in norms:
            how = ("pass model= to write it as the norm that feeds that MLP" if model is None
                   else f"{type(model).__name__} has no norm that feeds that MLP")
            raise ValueError(f"site {site!r} is an MLP's input, not a module output; {how}")
        out[site] = norms.get(site, site)
    return out


def to_aura(scales, directory, model=None):
    """Write a ScaleSet as ml-aura's `<module>.statedict` files; returns the paths written.

    AurA hooks module outputs, so a `mid` site (no module of its own) cannot be written:
    move it onto the up_proj site (same effect in a gated MLP) first. An `input` site is
    written as the norm that feeds the MLP (needs `model`).
    """
    modules = _module_names(scales, model)
    if getattr(scales, "shifts", None):
        raise ValueError("AurA files hold scales only; this ScaleSet has shifts (e.g. "
                         f"{next(iter(scales.shifts))!r})")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for site, t in scales.items():
        path = d / (modules[site] + AURA_SUFFIX)
        torch.save({"alpha": t.detach().to(torch.float32).reshape(1, 1, -1).clone()}, path)
        written.append(path)
    return written
