"""Sites of a model to observe, and the hooks that pool their activations per sample.

A site kind ("mid", "gate", ...) expands over the language model's MLPs (the ones whose
activations line up with the input tokens); where a site sits in an MLP is the registry's
answer (MLPInfo.site_point). The pooler reduces each hooked activation [B, T, n] to [B, n]
over the tokens each sample selects.
"""
import contextlib
import math

import torch

from ..patching import registry

POOLINGS = ("mean", "max", "last")


def language_mlps(model):
    """The MLPs of the model's language part (get_decoder()), whose activations line up with
    the input tokens; all MLPs when the model does not say where its decoder is."""
    mlps = registry.find_mlps(model)
    decoder = None
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(Exception):
            decoder = model.get_decoder()
    prefix = next((p for p, m in model.named_modules() if m is decoder), None)
    if not prefix:
        return mlps
    return {p: info for p, info in mlps.items() if p.startswith(prefix + ".")}


def resolve_sites(model, sites=("mid",)):
    """{site name: (MLPInfo, kind)}: kinds ("mid", "gate", ...) expand over the language
    MLPs; full site names (from registry.site_index) are taken as they are."""
    if isinstance(sites, str):
        sites = (sites,)
    lm = language_mlps(model)
    every = registry.site_index(registry.find_mlps(model))
    if not lm:
        raise ValueError(f"no MLP the sgm-ext registry knows in {type(model).__name__}")
    profiled = registry.site_index(lm)
    out = {}
    for entry in sites:
        if entry in every:
            if entry not in profiled:
                info = every[entry][0]
                raise ValueError(f"site {entry!r} is in {info.path} ({info.class_name}), outside "
                                 "the language model: the profiler pools activations per token "
                                 "of the input sequence, which only the language model's MLPs "
                                 "have (`sgm-ext sites --model DIR` lists the sites it can "
                                 "profile)")
            out[entry] = every[entry]
            continue
        kinds = {k for layout in registry.SITE_KINDS.values() for k in layout}
        if entry not in kinds:
            raise ValueError(f"unknown site {entry!r}: give a site kind "
                             f"({', '.join(sorted(kinds))}) or a site name of this model (e.g. "
                             f"{next(iter(registry.site_index(lm)))!r})")
        matched = [info for info in lm.values() if entry in registry.SITE_KINDS[info.layout]]
        if not matched:
            raise ValueError(f"no language-model MLP of {type(model).__name__} has a {entry!r} "
                             "site")
        for info in matched:
            out[info.site(entry)] = (info, entry)
    return out


def site_table(model):
    """Every site of the model's MLPs, in module order: [{"site", "mlp", "mlp_class", "kind",
    "size", "profiled"}]; size: how many values a scale for it has; profiled: whether the
    profiler can observe it (the language model's MLPs, whose activations line up with the
    input tokens). Any site can be patched."""
    lm = language_mlps(model)
    return [{"site": site, "mlp": path, "mlp_class": info.class_name, "kind": kind,
             "size": info.site_size(kind), "profiled": path in lm}
            for path, info in registry.find_mlps(model).items()
            for site, kind in info.sites().items()]


class Pooler:
    """Pools each hooked activation [B, T, n] over the current batch's selected tokens."""

    def __init__(self, pooling):
        self.pooling = pooling
        self.select = None  # [B, T] bool, set before each forward
        self._per_device = {}
        self.out = {}

    def start(self, select):
        self.select, self._per_device, self.out = select, {}, {}

    def _masks(self, device):
        if device not in self._per_device:
            sel = self.select.to(device)
            weights = sel.float() / sel.sum(1, keepdim=True).float()
            last = (sel * torch.arange(1, sel.shape[1] + 1, device=device)).argmax(1)
            self._per_device[device] = (sel, weights, last)
        return self._per_device[device]

    def __call__(self, site, x):
        sel, weights, last = self._masks(x.device)
        if x.dim() != 3 or x.shape[:2] != sel.shape:
            raise RuntimeError(
                f"site {site}: activations of shape {tuple(x.shape)} do not line up with the "
                f"inputs' [batch, tokens] = {tuple(sel.shape)}; only sites on the token "
                "sequence (the language model's MLPs) can be pooled per sample")
        x = x.detach().float()
        if self.pooling == "mean":
            pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
        elif self.pooling == "max":
            pooled = x.masked_fill(~sel.unsqueeze(-1), -math.inf).amax(1)
        else:  # last selected token
            pooled = x[torch.arange(x.shape[0], device=x.device), last]
        self.out[site] = pooled


@contextlib.contextmanager
def pooling_hooks(model, sites, pooler):
    """Within the block, every site of `sites` (resolve_sites) hands its activations to
    `pooler` during the forward; the hooks are removed on leaving."""
    handles = []
    try:
        for site, (info, kind) in sites.items():
            module, reads_input = info.site_module(model.get_submodule(info.path), kind)
            if reads_input:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, site=site: pooler(site, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, site=site: pooler(site, out)))
        yield
    finally:
        for h in handles:
            h.remove()
