"""Expertise: the AUROC of every neuron for toxic vs non-toxic, and the scales it gives.

    expertise = expertise(responses)                   # exact AUROC per neuron (auroc.py)
    scales = expertise.to_scales(method="aura")        # a ScaleSet (scale_math does the math)
"""
import math
from collections.abc import Mapping
from typing import Optional

import torch

from ..core import scale_math
from ..core.files import atomic_path
from ..patching.registry import site_order
from ..patching.scales import ScaleSet, read_metadata
from .auroc import auroc, auroc_p_values, benjamini_hochberg, check_labels
from .responses import Responses

EXPERTISE_KIND = "sgm-ext expertise"  # the file's `kind` metadata
SELECTIONS = ("fdr", "threshold")
DEFAULT_FDR = 0.05


def top_k_over_sites(values: Mapping, k: int) -> dict:
    """site -> bool [neurons]: True for the k highest values over all sites together (ties
    broken by site order, then neuron index); every neuron when k exceeds their count."""
    flat = torch.cat([v.flatten().double() for v in values.values()])
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    out, start = {}, 0
    for site, v in values.items():
        out[site] = keep[start:start + v.numel()].reshape(v.shape)
        start += v.numel()
    return out


class Expertise:
    """AUROC per neuron per site (site -> float64 [neurons]) and how it was measured."""

    def __init__(self, auroc_by_site: Mapping, metadata: Optional[Mapping] = None):
        self.auroc = {site: torch.as_tensor(a, dtype=torch.float64) for site, a in
                      dict(auroc_by_site).items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    def __repr__(self):
        n = sum(a.numel() for a in self.auroc.values())
        return f"Expertise({len(self.auroc)} sites, {n} neurons)"

    def experts(self, threshold: float = 0.5, top_k: Optional[int] = None, *,
                selection: str = "fdr", fdr: float = DEFAULT_FDR) -> dict:
        """site -> bool [neurons]: the expert neurons.

        selection "fdr" (the default): AUROC above chance beyond what the sample counts
        allow by luck: the one-sided p-values of auroc.auroc_p_values (n_toxic x n_non_toxic
        rows, from the metadata), Benjamini-Hochberg at false discovery rate `fdr` over all
        neurons of all sites, and AUROC > threshold. "threshold": AurA's plain rule, AUROC >
        threshold alone (at 0.5, about half the neurons of any model pass it by chance).
        top_k: then only the top_k highest over all sites (ties broken by site order, then
        neuron index).
        """
        check_selection(selection, fdr)
        chosen = {site: a > threshold for site, a in self.auroc.items()}
        if selection == "fdr":
            self._and_over_sites(chosen, benjamini_hochberg(self.p_values(), fdr))
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 0:
                raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
            for site, keep in top_k_over_sites(self.auroc, top_k).items():
                chosen[site] &= keep
        return chosen

    def _and_over_sites(self, chosen, flat):
        """chosen[site] &= the site's part of `flat` (bool [all neurons], sites in order)."""
        start = 0
        for site, a in self.auroc.items():
            chosen[site] &= flat[start:start + a.numel()]
            start += a.numel()

    def sample_counts(self):
        """(toxic rows, non-toxic rows) the AUROCs were measured on; ValueError if unknown."""
        try:
            return int(self.metadata["n_toxic"]), int(self.metadata["n_non_toxic"])
        except (KeyError, ValueError):
            raise ValueError("this Expertise does not say how many toxic and non-toxic rows it "
                             "was measured on (metadata n_toxic / n_non_toxic), which the "
                             "'fdr' selection needs; use selection='threshold'") from None

    def p_values(self):
        """[all neurons] float64: the one-sided p-value of each AUROC (sites in order)."""
        n_pos, n_neg = self.sample_counts()
        return auroc_p_values(torch.cat(list(self.auroc.values())), n_pos, n_neg)

    def noise_warnings(self, threshold: float = 0.5, top_k: Optional[int] = None, *,
                       selection: str = "fdr", fdr: float = DEFAULT_FDR) -> list:
        """Lines that warn when the selection is mostly noise: no neuron's AUROC beats chance
        at false discovery rate `fdr` for these sample counts (auroc_p_values and
        Benjamini-Hochberg, as the fdr selection), or a large share of all neurons is
        selected (AurA's threshold rule on noise passes about half). Under random labels an
        AUROC of n_pos x n_neg rows has mean 0.5 and standard deviation
        sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)) (Mann-Whitney)."""
        try:
            n_pos, n_neg = self.sample_counts()
        except ValueError:
            return []
        neurons = sum(a.numel() for a in self.auroc.values())
        if not (n_pos and n_neg and neurons):
            return []
        lines = []
        p = self.p_values()
        if not benjamini_hochberg(p, fdr).any():
            best = max(float(a.max()) for a in self.auroc.values())
            lines.append(f"no neuron separates toxic from non-toxic rows better than chance at "
                         f"false discovery rate {fdr:g}: with {n_pos} toxic / {n_neg} non-toxic "
                         f"rows the best AUROC ({best:.3f}, p = {float(p.min()):.2g}) is what "
                         f"{neurons} neurons reach by luck; these scales would damp noise "
                         "(more labelled rows help)")
        chosen = sum(int(e.sum()) for e in self.experts(threshold, top_k, selection=selection,
                                                          fdr=fdr).values())
        if chosen > 0.4 * neurons:
            sd = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
            lines.append(f"{chosen} of {neurons} neurons ({100 * chosen / neurons:.0f}%) pass "
                         f"the threshold {threshold}: most are sampling noise (with these row "
                         f"counts an AUROC spreads by about +-{2 * sd:.3f} around 0.5 by "
                         "chance); raise --threshold or keep the strongest with --top-k")
        return lines

    def to_scales(self, method: str = "aura", threshold: float = 0.5, top_k: Optional[int] = None,
                  strength: float = 1.0, alpha: Optional[float] = None, *,
                  selection: str = "fdr", fdr: float = DEFAULT_FDR,
                  allow_amplify: bool = False) -> ScaleSet:
        """ScaleSet of per-neuron factors, [neurons] float32 per site (DESIGN.md section 2).

        aura: alpha = 1 - 2 (AUROC - 0.5) for experts; det0: alpha = 0 for experts; damp:
        alpha = `alpha` (in [0, 1]) for experts. Experts: as `experts` selects them (by
        default AUROC significantly above chance at false discovery rate `fdr`, and above
        threshold), among the top_k highest if top_k is given. Everyone else gets 1. strength
        lambda in [0, 1] blends: s_eff = 1 - lambda (1 - alpha), as patching at that strength
        does (bit for bit: the same scale_math.effective_scale on the float32 alphas).
        allow_amplify: accept experts with AUROC below 0.5, whose aura alpha is above 1 (a
        threshold under 0.5 with selection "threshold", as ml-aura-vl's 0.3).
        """
        scale_math.check_method(method, alpha)
        strength = scale_math.check_strength(strength, per_sequence=False)
        threshold = scale_math.check_fraction(threshold, "threshold")
        scales = {}
        for site, chosen in self.experts(threshold, top_k, selection=selection,
                                         fdr=fdr).items():
            factor = scale_math.method_scales(self.auroc[site], chosen, method, alpha)
            scales[site] = scale_math.effective_scale(factor, strength)
        meta = {k: self.metadata.get(k, "") for k in ("model_type", "config_fingerprint",
                                                      "pooling", "modality", "input_format",
                                                      "data_fingerprint")}
        meta.update(method=method, threshold=threshold, top_k="" if top_k is None else top_k,
                    strength=strength, selection=selection)
        if selection == "fdr":
            meta["fdr"] = fdr
        if alpha is not None:
            meta["alpha"] = alpha
        return ScaleSet(scales, meta).validate(allow_amplify=allow_amplify)

    def save(self, path):
        """safetensors, written atomically: one float64 AUROC tensor per site, metadata as
        strings."""
        from safetensors.torch import save_file

        with atomic_path(path) as tmp:
            save_file({s: a.contiguous() for s, a in self.auroc.items()}, tmp,
                      metadata={"kind": EXPERTISE_KIND, **self.metadata})
        return path

    @classmethod
    def load(cls, path):
        from safetensors import safe_open

        meta = read_metadata(path, "expertise file")
        if meta.pop("kind", None) != EXPERTISE_KIND:
            raise ValueError(f"{path} is not an sgm-ext expertise file")
        with safe_open(str(path), framework="pt") as f:
            return cls({k: f.get_tensor(k) for k in sorted(f.keys(), key=site_order)}, meta)


def check_selection(selection, fdr):
    """ValueError unless selection is one of SELECTIONS and fdr a level in (0, 1)."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if isinstance(fdr, bool) or not isinstance(fdr, (int, float)) or not 0.0 < fdr < 1.0:
        raise ValueError(f"fdr must be a level in (0, 1), got {fdr!r}")


def shuffled_label_experts(responses, threshold=0.5, top_k=None, *, selection="fdr",
                           fdr=DEFAULT_FDR, seed=0) -> int:
    """How many experts the same selection finds when the labels are shuffled (one seeded
    permutation): the noise floor to read the real count against."""
    labels = responses.labels
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    shuffled = expertise(responses, labels[perm])
    chosen = shuffled.experts(threshold, top_k, selection=selection, fdr=fdr)
    return sum(int(c.sum()) for c in chosen.values())


def is_expertise_file(path) -> bool:
    """Whether `path` is an expertise file sgm-ext wrote (False for anything else)."""
    try:
        return read_metadata(path).get("kind") == EXPERTISE_KIND
    except (ValueError, OSError):
        return False


def expertise(responses, labels=None) -> Expertise:
    """Exact AUROC (ties averaged) of every neuron of every site -> Expertise.

    responses: a Responses (its labels are used when `labels` is None) or a mapping
    site -> [N, neurons] tensor with labels [N] (1 toxic, 0 non-toxic).
    """
    if labels is None:
        if not isinstance(responses, Responses):
            raise ValueError("labels are needed with a plain mapping of responses")
        labels = responses.labels
    y = check_labels(labels)
    meta = dict(getattr(responses, "metadata", {}))
    meta.update(n_toxic=int(y.sum()), n_non_toxic=int((~y).sum()))
    result = {}
    for site in responses:
        result[site] = auroc(responses[site], torch.from_numpy(y), name=f"responses[{site!r}]")
    return Expertise(result, meta)
