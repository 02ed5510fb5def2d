"""Calibration: the largest strength of a scale file whose perplexity on benign text stays
within a budget (`sgm-ext calibrate`, as a library call). It never looks at toxicity.

The strength lambda in [0, 1] blends a scale file in (s_eff = 1 - lambda (1 - s), shifts
lambda b); lambda 0 is the unpatched model. Calibration measures the perplexity of the model
on benign passages (generation.passage_nll) unpatched, then at strength 1; when that is within
`max_ppl_ratio` times the unpatched perplexity, the answer is 1. Otherwise it bisects [0, 1]:
lo starts at 0 (the unpatched model, within any budget >= 1), hi at 1 (over it); the midpoint's
ratio moves lo or hi there, until hi - lo <= tolerance. The answer is lo: a strength measured
within the budget, the largest of those measured, with hi <= lo + tolerance measured over it.

The assumption: perplexity grows with the strength. Then the answer is within `tolerance` of
the largest strength within the budget. Without it, bisection still returns a strength it
measured within the budget, but a larger one may exist between the points it did not measure.
When even the first step above 0 is over the budget the answer is 0 (the scale file at strength
0 changes nothing), with a warning.

The curve (every strength measured, in order, with its perplexity and ratio) goes to
`progress` as it is measured, and into the result. The model is patched once (`mode`, at
strength 0: the unpatched model exactly) and the strength changed between measurements; it is
unpatched on return, on any error and on Ctrl-C, exactly as it was (patch and unpatch are
bit-exact; the changes of weights are held from Ctrl-C: core/pause.interrupts_held).
"""
import hashlib
import json
import math
import os
import warnings
from typing import Callable, List, NamedTuple, Optional, Union

from ..core.files import file_sha256
from ..core.pause import interrupts_held, pause_point
from ..patching.patcher import patch
from ..patching.scales import ScaleSet, load_scales
from .generation import passage_nll, perplexity_of
from .prompts import load_reference

DEFAULT_TEXTS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "resources",
                             "calibration.txt")
DEFAULT_BUDGET = 1.10
DEFAULT_TOLERANCE = 1 / 64
DEFAULT_MAX_LENGTH = 512  # tokens per passage, as generation.passage_nll
# fused, as patch and eval default to: on the CPU a calibration step (set_strength, then the
# passages) is no slower fused than folded again (bench/bench_calibrate.py, bench/RESULTS.md),
# and fused mode writes no weights and serves quantized, LoRA and offloaded Linears
DEFAULT_MODE = "fused"
META = "calibration_"  # the prefix of the metadata calibration adds


class CalibrationPoint(NamedTuple):
    """One measurement: the strength, the perplexity there, its ratio to the unpatched
    perplexity, and whether that is within the budget."""
    strength: float
    perplexity: float
    ratio: float
    within: bool

    def __str__(self):
        return (f"strength {self.strength:<9g} perplexity {self.perplexity:.4f}  ratio "
                f"{self.ratio:.4f}  {'within' if self.within else 'over'} budget")


class Calibration(NamedTuple):
    """What calibrate found: `strength` (the answer), `ratio` and `ppl` (its perplexity ratio and
    perplexity), `unpatched_ppl`, `curve` (every CalibrationPoint measured, in order, the
    unpatched model first as strength 0), `scales` (the input at that strength, for patching
    at strength 1, with the calibration in its metadata), `budget`, `tolerance`."""
    strength: float
    ratio: float
    ppl: float
    unpatched_ppl: float
    curve: List[CalibrationPoint]
    scales: ScaleSet
    budget: float
    tolerance: float


def check_budget(value, name="max_ppl_ratio") -> float:
    """The perplexity budget: a number >= 1 (the patched perplexity over the unpatched one at
    most); ValueError naming it otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 1:
        raise ValueError(f"{name} is {value!r}; it must be a number >= 1 (the patched model's "
                         "perplexity over the unpatched one at most, e.g. 1.10 for +10%)")
    return float(value)


def check_tolerance(value, name="tolerance") -> float:
    """The bisection's tolerance in strength: a number in (0, 0.5]; ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not 0 < value <= 0.5:
        raise ValueError(f"{name} is {value!r}; it must be in (0, 0.5] (how close in strength "
                         "the bisection gets, e.g. 1/64 = 0.015625)")
    return float(value)


def load_texts(texts=None) -> list:
    """The benign passages: None (the bundled calibration passages), a list of strings, or a
    file: plain text (one passage per non-empty line) or JSONL with `text` (.jsonl / .json /
    .ndjson), read by prompts.load_reference: errors name the file, and a bad JSONL row's
    line."""
    if texts is None:
        texts = DEFAULT_TEXTS
    elif not isinstance(texts, (str, os.PathLike)):
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a path or a list of strings")
    return load_reference(texts, what="texts")


def texts_digest(texts) -> str:
    """sha256 (hex) of the passages as a JSON list of strings (UTF-8): two runs on the same
    passages in the same order record the same digest."""
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode("utf-8")).hexdigest()


def calibrate(model, processor, scales: Union[ScaleSet, str, os.PathLike], texts=None, *,
              max_ppl_ratio: float = DEFAULT_BUDGET, tolerance: float = DEFAULT_TOLERANCE,
              allow_amplify: bool = False, max_length: int = DEFAULT_MAX_LENGTH,
              mode: str = DEFAULT_MODE,
              progress: Optional[Callable[[CalibrationPoint], None]] = None) -> Calibration:
    """The largest strength of `scales` (a ScaleSet or a scale file) whose perplexity on
    `texts` (see load_texts; default the bundled calibration passages) is at most
    `max_ppl_ratio` times the unpatched model's, to `tolerance` in strength (see the module's
    docstring for the search and its assumption). progress: called with each CalibrationPoint
    as it is measured (`progress=print` prints the curve). max_length: tokens per passage.
    mode: the patch mode measured in (fold, fused or hook). Returns a Calibration; the model is
    left exactly as it was."""
    budget = check_budget(max_ppl_ratio)
    tolerance = check_tolerance(tolerance)
    source = load_scales(scales) if isinstance(scales, (str, os.PathLike)) else scales
    if not isinstance(source, ScaleSet):
        raise TypeError(f"scales must be a ScaleSet or a path, got {type(source).__name__}")
    origin = {}
    if isinstance(scales, (str, os.PathLike)):  # which file, recorded in the result's metadata
        origin = {META + "source": os.path.abspath(scales),
                  META + "source_sha256": file_sha256(scales)}
    texts = load_texts(texts)
    curve = []
    with interrupts_held():
        handle = patch(model, source, mode=mode, strength=0.0, allow_amplify=allow_amplify)
    try:
        base = perplexity_of(passage_nll(model, processor, texts, max_length))

        def measure(strength):
            if strength:
                with interrupts_held():
                    handle.set_strength(strength)
                pause_point("calibrate-step")  # tests send Ctrl-C here (core/pause.py)
                ppl = perplexity_of(passage_nll(model, processor, texts, max_length))
            else:
                ppl = base
            ratio = ppl / base
            point = CalibrationPoint(strength, ppl, ratio, ratio <= budget)
            curve.append(point)
            if progress is not None:
                progress(point)
            return point

        chosen = _search(measure, tolerance)
    finally:
        with interrupts_held():
            handle.remove()
    if chosen.strength == 0.0:
        over = min(p.strength for p in curve if not p.within)
        warnings.warn(f"the perplexity ratio is over the budget {budget:g} already at strength "
                      f"{over:g}: the answer is strength 0 (the scale file changes nothing); "
                      "raise the budget or use another scale file", stacklevel=2)
    calibrated = calibrated_scales(source, chosen, base, budget, tolerance, texts, max_length,
                                   mode)
    calibrated.metadata.update(origin)
    return Calibration(chosen.strength, chosen.ratio, chosen.perplexity, base, curve,
                       calibrated, budget, tolerance)


def _search(measure, tolerance):
    """Strength 0 (the unpatched model), 1, then bisection between the largest strength within
    the budget and the smallest over it: the CalibrationPoint of the answer."""
    lo = measure(0.0)
    hi = measure(1.0)
    if hi.within:
        return hi
    while hi.strength - lo.strength > tolerance:
        mid = measure((lo.strength + hi.strength) / 2)
        if mid.within:
            lo = mid
        else:
            hi = mid
    return lo


def calibrated_scales(source, chosen, base, budget, tolerance, texts,
                      max_length=DEFAULT_MAX_LENGTH, mode=DEFAULT_MODE):
    """The source at the chosen CalibrationPoint's strength, with the calibration recorded in
    its metadata (base: the unpatched perplexity). What calibrate returns as `scales`; public so
    that a stopped benchmark resumed from its recorded points rebuilds the same file."""
    scales = source.at_strength(chosen.strength)
    scales.metadata.update({
        META + "strength": repr(chosen.strength), META + "budget": repr(budget),
        META + "ratio": repr(chosen.ratio), META + "unpatched_ppl": repr(base),
        META + "ppl": repr(chosen.perplexity), META + "tolerance": repr(tolerance),
        META + "texts_sha256": texts_digest(texts), META + "texts_count": str(len(texts)),
        META + "max_length": str(max_length), META + "mode": mode,
        META + "source_method": source.metadata.get("method", "")})
    return scales


def calibration_summary(scales: ScaleSet) -> Optional[str]:
    """One line saying what a calibrated scale file's metadata records, or None for a file
    calibrate did not write."""
    meta = scales.metadata
    if META + "strength" not in meta:
        return None
    return (f"calibrated: strength {float(meta[META + 'strength']):g} of the "
            f"{meta.get(META + 'source_method') or '?'} scales, perplexity ratio "
            f"{float(meta[META + 'ratio']):.4f} within the budget "
            f"{float(meta[META + 'budget']):g} ({float(meta[META + 'unpatched_ppl']):.4f} -> "
            f"{float(meta[META + 'ppl']):.4f} on {meta.get(META + 'texts_count')} passages, "
            f"sha256 {meta.get(META + 'texts_sha256', '')[:16]}...)")
