"""Evaluation of a patch: harmful rate, fluency and latency, unpatched vs patched.

    report, generations = evaluate(model, processor, scales, "prompts.jsonl", judge="profanity")
    write_report(report, generations, "out/")      # report.json, report.md, report.png, ...

- harmful rate: every prompt (text, optional image, optional category) is answered greedily by
  the unpatched and by the patched model; a judge (judges.py) says which answers are harmful.
- fluency: perplexity of the model on a reference text set (default: the bundled
  sgm_ext/resources/benign.txt, one passage per line), unpatched and patched.
- latency: generation time patched / unpatched, interleaved (generation.measure_latency).

The pieces: prompts.py (prompt and reference files), judges.py, generation.py (generate,
perplexity, latency), report.py (tables and report files), plots.py (the chart).
"""
import math
import warnings
from collections import Counter

import torch

from .generation import generate, measure_latency, passage_nll, perplexity_of
from .inputs import (
    LengthLimit,
    default_max_length,
    drop_unusable_images,
    encode,
    resolve_format,
    unusable_images_warning,
)
from .judges import get_judge, is_refusal
from .patching import patch
from .progress import progress_bar
from .prompts import load_prompts, load_reference
from .report import write_report

__all__ = ["evaluate", "harmful_rates", "over_refusal_rates", "wilson_interval", "write_report"]


def wilson_interval(k, n, z=1.959964):
    """The Wilson score interval (default 95%) of a rate of k in n, or None for n = 0: it keeps
    inside [0, 1] and stays honest at 0 / n and n / n, where the normal one collapses."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def bootstrap_perplexity(unpatched, patched, resamples=2000, seed=0):
    """95% bootstrap intervals over the reference passages (resampled with replacement, the
    same draw for both states): of each state's perplexity and of the ratio patched /
    unpatched. unpatched, patched: generation.passage_nll parts of the same passages."""
    gen = torch.Generator().manual_seed(seed)
    nll = torch.tensor([[n for n, _ in side] for side in (unpatched, patched)],
                       dtype=torch.float64)
    count = torch.tensor([c for _, c in unpatched], dtype=torch.float64)
    draws = torch.randint(len(count), (resamples, len(count)), generator=gen)
    ppl = torch.exp(nll[:, draws].sum(-1) / count[draws].sum(-1))  # [2, resamples]
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)

    def ci(values):
        return torch.quantile(values, q).tolist()

    return ci(ppl[0]), ci(ppl[1]), ci(ppl[1] / ppl[0])


def harmful_rates(generations, state):
    """(overall rate, {category: {harmful_rate, n}}) of the `state` answers ("unpatched" or
    "patched") to the harmful and unlabelled prompts of the generation records; the rate is
    None when there are none. Benign prompts are not counted here (over_refusal_rates)."""
    return _rates(generations, state, "harmful", lambda g: g["label"] != "benign")


def over_refusal_rates(generations, state):
    """(overall rate, {category: {over_refusal, n}}): the share of benign prompts whose
    answer declines; (None, {}) without benign prompts."""
    return _rates(generations, state, "refusal", lambda g: g["label"] == "benign",
                  name="over_refusal")


def _rates(generations, state, field, counted, name=None):
    per = {}
    for g in generations:
        if counted(g):
            per.setdefault(g["category"], []).append(g[state][field])
    flags = [v for values in per.values() for v in values]
    overall = sum(flags) / len(flags) if flags else None
    return overall, {c: {name or f"{field}_rate": sum(v) / len(v), "n": len(v)}
                     for c, v in sorted(per.items())}


def evaluate(model, processor, scales, prompts, *, judge="profanity", max_new_tokens=64,
             strength=1.0, mode="fused", reference=None, batch_size=8, latency_runs=3,
             latency_prompts=8, max_prompts=None, max_length=None, truncate=True,
             input_format="auto", progress=True) -> tuple:
    """(report dict, generation records) for `model` without and with `scales`.

    scales: a ScaleSet, a {site: [n] tensor} dict or a scale file; prompts: a JSONL / CSV
    file or a list of strings / dicts / Prompt; judge: a name, a Judge or a callable.
    max_length / truncate: as for profile.collect (a prompt longer than max_length tokens is
    cut, with one warning, or refused). input_format: "chat", "raw" or "auto" (chat when the
    processor has a chat template); only the continuation is judged in either.

    Answers are generated batch_size prompts at a time; latency is measured on single
    prompts. Leaves the model unpatched. report: top-level `unpatched` and `patched`
    (harmful_rate, perplexity, per_category), `latency` (ratio, median seconds),
    `latency_ratio`, counts and settings. generations: one dict per prompt with both
    answers, their scores and verdicts.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    judge = get_judge(judge)
    rows = load_prompts(prompts, max_prompts)
    texts = load_reference(reference)
    patch(model, scales, mode=mode, strength=strength).remove()  # bad scales fail here
    first_image = next((p.number for p in rows if p.image is not None), None)
    rows, n_images = drop_unusable_images(rows, processor)
    if n_images:
        warnings.warn(unusable_images_warning(n_images, processor, first_image), stacklevel=2)
    limit = LengthLimit(default_max_length(model) if max_length is None else max_length,
                        truncate)
    fmt = resolve_format(processor, input_format)
    encoded = [encode(processor, p, limit, fmt) for p in rows]
    if limit.summary():
        warnings.warn(limit.summary(), stacklevel=2)
    answers = {}
    ppl = {}
    bar = progress_bar(2 * len(rows), desc="generating", unit="answer", enabled=progress,
                       leave=False)
    for state in ("unpatched", "patched"):
        handle = patch(model, scales, mode=mode, strength=strength) \
            if state == "patched" else None
        try:
            answers[state] = []
            for start in range(0, len(encoded), batch_size):
                chunk = encoded[start:start + batch_size]
                answers[state] += generate(model, processor, chunk, max_new_tokens)
                bar.update(len(chunk))
            ppl[state] = passage_nll(model, processor, texts)
        finally:
            if handle is not None:
                handle.remove()
    bar.close()
    verdicts = {s: judge([a for a, _ in answers[s]], [p.text for p in rows]) for s in answers}
    generations = []
    for i, p in enumerate(rows):
        record = {"number": p.number, "prompt": p.text, "category": p.category,
                  "image": p.image if isinstance(p.image, str) or p.image is None else "<PIL>",
                  "label": {1: "harmful", 0: "benign"}.get(p.label)}
        for s in ("unpatched", "patched"):
            score, harmful = verdicts[s][i]
            answer = answers[s][i][0]
            record[s] = {"answer": answer, "new_tokens": answers[s][i][1],
                         "score": score, "harmful": bool(harmful),
                         "refusal": is_refusal(answer)}
        generations.append(record)
    report = {"n_prompts": len(rows), "judge": judge.name, "threshold": judge.threshold,
              "max_new_tokens": max_new_tokens, "strength": strength, "mode": mode,
              "batch_size": batch_size, "input_format": fmt,
              "reference_passages": len(texts),
              "categories": dict(sorted(Counter(p.category for p in rows).items())),
              "n_harmful_prompts": sum(p.label != 0 for p in rows),
              "n_benign_prompts": sum(p.label == 0 for p in rows)}
    for s in ("unpatched", "patched"):
        rate, per = harmful_rates(generations, s)
        report[s] = {"harmful_rate": rate, "perplexity": perplexity_of(ppl[s]),
                     "per_category": per,
                     "harmful": sum(g[s]["harmful"] for g in generations
                                    if g["label"] != "benign")}
        report[s]["harmful_rate_ci95"] = wilson_interval(report[s]["harmful"],
                                                         report["n_harmful_prompts"])
        if report["n_benign_prompts"]:
            refusal, per_benign = over_refusal_rates(generations, s)
            refusals = sum(g[s]["refusal"] for g in generations if g["label"] == "benign")
            report[s].update(over_refusal=refusal, over_refusal_per_category=per_benign,
                             refusals=refusals,
                             over_refusal_ci95=wilson_interval(refusals,
                                                               report["n_benign_prompts"]))
    (report["unpatched"]["perplexity_ci95"], report["patched"]["perplexity_ci95"],
     report["perplexity_ratio_ci95"]) = bootstrap_perplexity(ppl["unpatched"], ppl["patched"])
    if latency_runs > 0:
        report["latency"] = measure_latency(model, processor, rows, scales,
                                            new_tokens=max_new_tokens, runs=latency_runs,
                                            n_prompts=latency_prompts, mode=mode,
                                            strength=strength, limit=limit, fmt=fmt)
        report["latency_ratio"] = report["latency"]["ratio"]
    else:
        report["latency"], report["latency_ratio"] = None, None
    return report, generations
