"""ScaleSet: per-neuron suppression factors keyed by site, and their file format.

A site is a module path in the model: a Linear's outputs (`model.language_model.layers.3.
mlp.up_proj`) or an MLP's path plus `.mid` for the product act(gate) * up. The file is
safetensors (one float32 1-D tensor per site) with string metadata; loading never unpickles.
"""
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Optional, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .files import atomic_path
from .scale_math import check_scale_values
from .version import __version__

FORMAT_VERSION = "1"
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
        meta = {"format_version": FORMAT_VERSION, "sgm_ext_version": __version__, **self.metadata}
        with atomic_path(path) as tmp:
            save_file(dict(self.scales), tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "ScaleSet":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            version = meta.get("format_version")
            if version != FORMAT_VERSION:
                raise ValueError(f"{path}: scale file format version {version!r}, this sgm-ext "
                                 f"reads {FORMAT_VERSION!r}")
            return cls({k: f.get_tensor(k) for k in f.keys()}, meta)


def load_scales(path: Union[str, os.PathLike]) -> ScaleSet:
    """The ScaleSet in a scale file (safetensors; never unpickled)."""
    return ScaleSet.load(path)


def _sizes(config, prefix=""):
    """The size fields of a HF config and its sub-configs, flattened."""
    out = {}
    d = config if isinstance(config, dict) else config.to_dict()
    for key, value in sorted(d.items()):
        if isinstance(value, dict):
            out.update(_sizes(value, f"{prefix}{key}."))
        elif key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "vocab_size", "num_attention_heads", "num_key_value_heads"):
            out[prefix + key] = value
    return out


def config_fingerprint(config):
    """A short hash of a model config's sizes: scale files made for another model differ."""
    blob = json.dumps(_sizes(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


