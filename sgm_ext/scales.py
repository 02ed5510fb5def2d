"""ScaleSet: per-neuron suppression factors keyed by site, and their file format.

A site is a module path in the model: a Linear's outputs (`model.language_model.layers.3.
mlp.up_proj`) or an MLP's path plus `.mid` for the product act(gate) * up. The file is
safetensors (one float32 1-D tensor per site) with string metadata; loading never unpickles.
"""
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_path
from .fingerprints import config_fingerprint  # noqa: F401  (part of the file format)
from .registry import site_order
from .scale_math import check_scale_values
from .version import __version__

FORMAT_VERSION = "1"
SCALE_KIND = "sgm-ext scales"  # the `kind` metadata of files written from now on
METADATA_KEYS = ("format_version", "model_type", "config_fingerprint", "method", "pooling",
                 "threshold", "top_k", "data_fingerprint", "sgm_ext_version")


class ScaleSet:
    """site name -> [n] float32 CPU tensor of scales (n: the site's width: I for gate / up /
    mid, H for down, 2 I for a packed gate_up), plus string metadata. Plain data: it knows
    nothing of models; sgm_ext.patch resolves the sites in one."""

    def __init__(self, scales: Mapping, metadata: Optional[Mapping] = None):
        self.scales = {}
        for site, value in dict(scales).items():
            if not isinstance(site, str) or not site:
                raise ValueError(f"scale site names must be non-empty strings, got {site!r}")
            t = torch.as_tensor(value)
            if t.dim() != 1:
                raise ValueError(f"scales[{site!r}] must be 1-D (one value per neuron), "
                                 f"got shape {tuple(t.shape)}")
            self.scales[site] = t.detach().to("cpu", torch.float32).contiguous()
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

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
        n = sum(t.numel() for t in self.scales.values())
        damped = sum(int((t != 1).sum()) for t in self.scales.values())
        return f"ScaleSet({len(self)} sites, {n} neurons, {damped} damped)"

    def validate(self, allow_amplify: bool = False) -> "ScaleSet":
        """Raise ValueError naming the first illegal entry: not finite, < 0, or > 1."""
        for site, t in self.scales.items():
            check_scale_values(site, t, allow_amplify)
        return self

    def save(self, path: Union[str, os.PathLike]):
        """Write a safetensors file atomically (a failed write leaves an old file intact)."""
        meta = {"format_version": FORMAT_VERSION, "sgm_ext_version": __version__,
                **self.metadata, "kind": SCALE_KIND}
        with atomic_path(path) as tmp:
            save_file(dict(self.scales), tmp, metadata=meta)
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
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: scale file format version {version!r}, this sgm-ext "
                             f"reads {FORMAT_VERSION!r}")
        with safe_open(os.fspath(path), framework="pt") as f:  # keys come sorted as strings
            return cls({k: f.get_tensor(k) for k in sorted(f.keys(), key=site_order)}, meta)


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


def load_scales(path: Union[str, os.PathLike]) -> ScaleSet:
    """The ScaleSet in a scale file (safetensors; never unpickled)."""
    return ScaleSet.load(path)
