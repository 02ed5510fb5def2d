"""Activation transport (AcT): per-neuron affine maps from the toxic to the non-toxic responses.

Rodriguez et al., "Controlling Language and Diffusion Models by Transporting Activations",
ICLR 2025 (arXiv 2410.23054; code: apple/ml-act). Each neuron's pooled responses z are moved
from their toxic distribution (source, label 1) towards the non-toxic one (target, label 0)
by a 1-D map z' = s z + b, which patching applies as y = s_eff z + strength * b: strength
lambda gives lambda z' + (1 - lambda) z, the paper's blend.

- mean_ot: z' = z - mu_t + mu_n (s = 1, b = mu_n - mu_t);
- gaussian_ot: z' = (sd_n / sd_t)(z - mu_t) + mu_n (s = sd_n / sd_t, b = mu_n - s mu_t);
- linear_ot (Linear-AcT): the least-squares line through the per-neuron optimal transport
  pairs, which in 1-D are the sorted source and sorted target samples (equal counts):
  s = sum(dx dy) / sum(dx^2), b = mean_n - s mean_t (dx, dy: the deviations from the means).

As ml-act does, means and (unbiased) standard deviations are computed in float64, and the
Gaussian maps (mean_ot too) leave a neuron unchanged where either class's standard deviation
is at most `std_eps` (1e-4). A linear_ot neuron whose toxic responses are all equal gets the
mean shift (s = 1) instead of a division by zero.
"""
from typing import Optional

import torch

from ..core.scale_math import check_strength, effective_scale, effective_shift
from ..patching.scales import ScaleSet
from .expertise import top_k_over_sites
from .responses import Responses

TRANSPORT_METHODS = ("mean_ot", "gaussian_ot", "linear_ot")
STD_EPS = 1e-4  # ml-act's default std_eps


def check_transport_method(method: str) -> None:
    if method not in TRANSPORT_METHODS:
        raise ValueError(f"transport method must be one of {TRANSPORT_METHODS}, got {method!r}")


def balance(responses: Responses, seed: int = 0) -> Responses:
    """The responses with the larger class subsampled (seeded, data order kept) to the size of
    the smaller one, as ml-act trains its interventions."""
    labels = torch.as_tensor(responses.labels).bool()
    pos, neg = labels.nonzero().flatten(), (~labels).nonzero().flatten()
    if min(len(pos), len(neg)) == 0:
        raise ValueError("balancing needs rows of both labels (toxic and non-toxic)")
    small, large = (pos, neg) if len(pos) <= len(neg) else (neg, pos)
    g = torch.Generator().manual_seed(seed)
    keep = large[torch.randperm(len(large), generator=g)[:len(small)]]
    rows = torch.cat([small, keep]).sort().values
    out = Responses.from_tensors({site: responses[site][rows] for site in responses},
                                 labels[rows].long(), dict(responses.metadata))
    return out


def _gaussian(z_t, z_n, method, std_eps):
    mu_t, mu_n = z_t.mean(0), z_n.mean(0)
    sd_t, sd_n = z_t.std(0), z_n.std(0)
    moved = (sd_t > std_eps) & (sd_n > std_eps)
    scale = sd_n / torch.where(moved, sd_t, 1.0) if method == "gaussian_ot" \
        else torch.ones_like(mu_t)
    scale = torch.where(moved, scale, 1.0)
    shift = torch.where(moved, mu_n - scale * mu_t, 0.0)
    return scale, shift


def _linear(z_t, z_n):
    if len(z_t) != len(z_n):
        raise ValueError(f"linear_ot pairs sorted toxic and non-toxic responses one to one and "
                         f"needs as many of each; got {len(z_t)} toxic and {len(z_n)} non-toxic "
                         "rows (pass balanced=True / --balanced to subsample the larger class)")
    x, y = z_t.sort(0).values, z_n.sort(0).values
    dx, dy = x - x.mean(0), y - y.mean(0)
    var = (dx * dx).sum(0)
    scale = torch.where(var > 0, (dx * dy).sum(0) / torch.where(var > 0, var, 1.0), 1.0)
    return scale, y.mean(0) - scale * x.mean(0)


def transport_maps(responses: Responses, method: str, *, strength: float = 1.0,
                   std_eps: float = STD_EPS, metadata: Optional[dict] = None) -> ScaleSet:
    """ScaleSet with a scale and a shift per neuron of every site of `responses` (the pooled
    responses the profiler collects), fitted by `method`; `strength` is baked in as patching
    at that strength would apply it (s_eff, strength * b). Scales may exceed 1: patch with
    allow_amplify=True."""
    check_transport_method(method)
    strength = check_strength(strength, per_sequence=False)
    labels = torch.as_tensor(responses.labels).bool()
    if labels.all() or not labels.any():
        raise ValueError("transport maps need responses of both labels (toxic and non-toxic)")
    scales, shifts = {}, {}
    for site in responses:
        z = torch.as_tensor(responses[site]).to(torch.float64)
        z_t, z_n = z[labels], z[~labels]
        if method == "linear_ot":
            s, b = _linear(z_t, z_n)
        else:
            s, b = _gaussian(z_t, z_n, method, std_eps)
        s, b = s.to(torch.float32), b.to(torch.float32)
        if method != "mean_ot":
            scales[site] = effective_scale(s, strength)
        shifts[site] = effective_shift(b, strength)
    meta = {k: responses.metadata.get(k, "") for k in
            ("model_type", "config_fingerprint", "pooling", "modality", "input_format",
             "data_fingerprint")}
    meta.update(method=method, strength=strength, n_toxic=int(labels.sum()),
                n_non_toxic=int((~labels).sum()), **(metadata or {}))
    return ScaleSet(scales, meta, shifts=shifts).validate(allow_amplify=True)


def separation(responses: Responses) -> dict:
    """{site: [n] float64}: per neuron, |mean_toxic - mean_non_toxic| over the pooled standard
    deviation (Cohen's d): how far a transport map must move the toxic responses, in units of
    their spread. Neurons that never vary get 0."""
    labels = torch.as_tensor(responses.labels).bool()
    out = {}
    for site in responses:
        z = torch.as_tensor(responses[site]).to(torch.float64)
        z_t, z_n = z[labels], z[~labels]
        sd = ((z_t.var(0) + z_n.var(0)) / 2).sqrt()
        gap = (z_t.mean(0) - z_n.mean(0)).abs()
        out[site] = torch.where(sd > 0, gap / torch.where(sd > 0, sd, 1.0), 0.0)
    return out


def keep_top_maps(maps: ScaleSet, ranking: dict, k: int) -> ScaleSet:
    """`maps` with only the k neurons of highest `ranking` (over all sites) moved: every other
    neuron gets scale 1 and shift 0 (AcT restricted to the neurons that separate the classes
    most, so the rest of the model is left as it was)."""
    kept = top_k_over_sites({site: ranking[site] for site in maps.sites()}, k)
    scales = {site: torch.where(keep, maps.scales[site], 1.0)
              for site, keep in kept.items() if site in maps.scales}
    shifts = {site: torch.where(keep, maps.shifts[site], 0.0)
              for site, keep in kept.items() if site in maps.shifts}
    meta = dict(maps.metadata, top_k=k)
    return ScaleSet(scales, meta, shifts=shifts or None).validate(allow_amplify=True)
