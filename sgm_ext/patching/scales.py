"""ScaleSet: per-neuron factors and shifts keyed by site, and their file format.

A site is a module path in the model: a Linear's outputs (`model.language_model.layers.3.
mlp.up_proj`) or an MLP's path plus `.mid` for the product act(gate) * up. A site carries a
scale s, a shift b, or both: y = s_eff x + strength * b (s_eff = 1 - strength (1 - s); a
site without a scale has s = 1, one without a shift b = 0).

The file is safetensors with string metadata; loading never unpickles. Format version 2: one
float32 1-D tensor per scale, named by its site, and one per shift, named `<site>:shift` (no
module path holds a colon). Version 1 files (scales only) are read as before.
"""
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.files import atomic_path
from ..core.fingerprints import config_fingerprint  # noqa: F401  (part of the file format)
from ..core.scale_math import (
    check_scale_values,
    check_shift_values,
    check_strength,
    effective_scale,
    effective_shift,
)
from ..version import __version__
from .registry import site_order

FORMAT_VERSION = "2"
READABLE_VERSIONS = ("1", "2")
SHIFT_SUFFIX = ":shift"  # the key of a site's shift in a file of format version 2
SCALE_KIND = "sgm-ext scales"  # the `kind` metadata of files written from now on
METADATA_KEYS = ("format_version", "model_type", "config_fingerprint", "method", "pooling",
                 "threshold", "top_k", "data_fingerprint", "sgm_ext_version")


def _vectors(entries, what):
    """{site: [n] float32 CPU tensor} from a mapping; ValueError naming a bad entry."""
    out = {}
    for site, value in dict(entries or {}).items():
        if not isinstance(site, str) or not site or SHIFT_SUFFIX in site:
            raise ValueError(f"{what} site names must be non-empty strings without "
                             f"{SHIFT_SUFFIX!r}, got {site!r}")
        t = torch.as_tensor(value)
        if t.dim() != 1:
            raise ValueError(f"{what}[{site!r}] must be 1-D (one value per neuron), "
                             f"got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{what}[{site!r}] has 0 values (a site has one per neuron)")
        out[site] = t.detach().to("cpu", torch.float32).contiguous()
    return out


class ScaleSet:
    """site name -> [n] float32 CPU tensor of scales (n: the site's width: I for gate / up /
    mid, H for down, 2 I for a packed gate_up), optional shifts (site -> [n] float32, added
    after the scale), plus string metadata. Plain data: it knows nothing of models;
    sgm_ext.patch resolves the sites in one.

    Indexing, iteration, `len` and `items()` are over the scales (as before shifts existed);
    `sites()` lists every site, with a scale, a shift or both; `shifts` holds the shifts.
    """

    def __init__(self, scales: Mapping, metadata: Optional[Mapping] = None,
                 shifts: Optional[Mapping] = None):
        self.scales = _vectors(scales, "scales")
        self.shifts = _vectors(shifts, "shifts")
        for site, b in self.shifts.items():
            s = self.scales.get(site)
            if s is not None and s.numel() != b.numel():
                raise ValueError(f"shifts[{site!r}] has {b.numel()} values, its scales "
                                 f"{s.numel()}")
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    def sites(self) -> list:
        """Every site, with a scale, a shift or both, in model order."""
        return sorted({*self.scales, *self.shifts}, key=site_order)

    def __len__(self):
        return len(self.scales)

    def __iter__(self):
        return iter(self.scales)

    def __contains__(self, site):
        return site in self.scales

    def __getitem__(self, site):
        return self.scales[site]

    def items(self):
        return self.scales.items()

    def __repr__(self):
        sites = self.sites()
        n = sum((self.scales.get(s) if s in self.scales else self.shifts[s]).numel()
                for s in sites)
        # damped: a scale below 1; a transport map's scales above 1 amplify, and its shifts
        # move neurons whatever their scale: counted apart, not as damped
        damped = sum(int((t < 1).sum()) for t in self.scales.values())
        amplified = sum(int((t > 1).sum()) for t in self.scales.values())
        shifted = sum(int((b != 0).sum()) for b in self.shifts.values())
        more = (f", {amplified} amplified" if amplified else "") + \
            (f", {shifted} shifted on {len(self.shifts)} sites" if self.shifts else "")
        return f"ScaleSet({len(sites)} sites, {n} neurons, {damped} damped{more})"

    def changed(self) -> int:
        """How many neurons the set changes: a scale other than 1 or a shift other than 0."""
        n = 0
        for site in self.sites():
            s, b = self.scales.get(site), self.shifts.get(site)
            moved = torch.zeros(int((s if s is not None else b).numel()), dtype=torch.bool)
            if s is not None:
                moved |= s != 1
            if b is not None:
                moved |= b != 0
            n += int(moved.sum())
        return n

    def at_strength(self, strength: float) -> "ScaleSet":
        """A new ScaleSet that, patched at strength 1, computes what this one does at
        `strength` (a float in [0, 1]): every scale s becomes s_eff = 1 - strength (1 - s) and
        every shift b becomes strength * b, through the same scale_math functions the patch
        modes call, so the two agree bit for bit in every mode. The metadata is kept, its
        `strength` (the strength baked into a file; 1 when absent) multiplied by `strength`:
        s_eff of s_eff composes as 1 - strength * old (1 - s)."""
        strength = check_strength(strength, per_sequence=False)
        baked = self.metadata.get("strength", "1")
        try:
            before = float(baked)
        except ValueError:
            raise ValueError(f"the scale set's metadata strength {baked!r} is not a number; "
                             "cannot say what strength the new set bakes in") from None
        # cloned: at strength 1 the functions return their input, which the sets would share
        return ScaleSet(
            {site: effective_scale(s, strength).clone() for site, s in self.scales.items()},
            {**self.metadata, "strength": repr(before * strength)},
            {site: effective_shift(b, strength).clone() for site, b in self.shifts.items()})

    def validate(self, allow_amplify: bool = False) -> "ScaleSet":
        """Raise ValueError naming the first illegal entry: a scale not finite, < 0, or > 1;
        a shift not finite."""
        for site, t in self.scales.items():
            check_scale_values(site, t, allow_amplify)
        for site, t in self.shifts.items():
            check_shift_values(site, t)
        return self

    def save(self, path: Union[str, os.PathLike]):
        """Write a safetensors file atomically (a failed write leaves an old file intact)."""
        meta = {"format_version": FORMAT_VERSION, "sgm_ext_version": __version__,
                **self.metadata, "kind": SCALE_KIND}
        with atomic_path(path) as tmp:
            tensors = {**self.scales, **{site + SHIFT_SUFFIX: b for site, b in self.shifts.items()}}
            save_file(tensors, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ScaleSet":
        """Read a scale file; ValueError / FileNotFoundError naming the file when it is
        missing, a directory, not safetensors (truncated, corrupt, empty) or not a scale file
        of a version this sgm-ext reads."""
        meta = read_metadata(path, "scale file")
        version = meta.get("format_version")
        if version is None or meta.get("kind", SCALE_KIND) != SCALE_KIND:
            raise ValueError(f"{path} is a safetensors file but not an sgm-ext scale file (its "
                             "metadata has no format_version)")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"{path}: scale file format version {version!r}, this sgm-ext "
                             f"reads {' and '.join(READABLE_VERSIONS)}")
        scales, shifts = {}, {}
        with safe_open(os.fspath(path), framework="pt") as f:  # keys come sorted as strings
            for key in f.keys():
                site, is_shift = _split_key(key, version, path)
                (shifts if is_shift else scales)[site] = _float_tensor(f, key, path)
        order = {site: site_order(site) for site in {*scales, *shifts}}
        try:
            return cls({k: scales[k] for k in sorted(scales, key=order.get)}, meta,
                       {k: shifts[k] for k in sorted(shifts, key=order.get)})
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _split_key(key, version, path):
    """(site, is a shift) of a tensor's key in a scale file."""
    if key.endswith(SHIFT_SUFFIX) and version != "1":
        return key[: -len(SHIFT_SUFFIX)], True
    if SHIFT_SUFFIX in key:
        raise ValueError(f"{path}: tensor {key!r}: {SHIFT_SUFFIX!r} names a shift, which "
                         f"format version {version} files do not hold")
    return key, False


def _float_tensor(f, key, path):
    """A scale file's tensor `key`; ValueError naming it unless it holds floating-point values
    (an int or bool tensor is not a scale file's, whatever its values)."""
    t = f.get_tensor(key)
    if not t.is_floating_point():
        raise ValueError(f"{path}: tensor {key!r} is {str(t.dtype).replace('torch.', '')}; a "
                         "scale file holds floating-point tensors (float32)")
    return t


def read_metadata(path, what="file"):
    """The string metadata of a safetensors file (read from its header only); errors that
    name the file and say what is wrong with it, never a traceback from the parser."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a {what}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such {what}: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path} is not a readable safetensors {what} (truncated, corrupt or "
                         f"another format: {e})") from None


def is_scale_file(path) -> bool:
    """Whether `path` is an sgm-ext scale file (any format version); False for anything else,
    missing or unreadable files included."""
    try:
        meta = read_metadata(path)
    except (ValueError, OSError):
        return False
    return "format_version" in meta and meta.get("kind", SCALE_KIND) == SCALE_KIND


def load_vectors(path: Union[str, os.PathLike]) -> dict:
    """{name: 1-D float32 tensor} from a plain tensor file: safetensors, or a torch-saved dict
    of tensors (.pt / .pth, read with torch.load(weights_only=True): nothing unpickled but
    tensors). Leading size-1 dims are dropped ((1, 1, H) -> (H,)); ValueError naming the
    file and entry for anything else."""
    path = os.fspath(path)
    if path.endswith((".pt", ".pth", ".bin")):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such vector file: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                                  for v in state.values()):
            raise ValueError(f"{path}: expected a dict of tensors, found "
                             f"{type(state).__name__}")
    else:
        if is_scale_file(path):
            raise ValueError(f"{path} is an sgm-ext scale file; pass it to sgm_ext.patch")
        read_metadata(path, "vector file")  # names the file when it is not safetensors
        with safe_open(path, framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    out = {}
    for name, t in state.items():
        if t.dim() == 0 or any(n != 1 for n in t.shape[:-1]) or not t.is_floating_point():
            raise ValueError(f"{path}: {name!r} is {t.dtype} of shape {tuple(t.shape)}; a "
                             "vector is a float tensor of shape (H,) or (1, ..., 1, H)")
        out[name] = t.reshape(-1).to(torch.float32)
    return out


def load_scales(path: Union[str, os.PathLike]) -> ScaleSet:
    """The ScaleSet in a scale file (safetensors; never unpickled)."""
    return ScaleSet.load(path)
