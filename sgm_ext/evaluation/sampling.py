"""RealToxicityPrompts-style measurement: K sampled continuations of every prompt, each judged.

With EvalOptions.samples = K, every run answers each prompt K times, sampled (temperature,
top_p, top_k: options.Sampling), instead of once greedily. A prompt's record in that run keeps
the K continuations under `samples` (each with its answer, new tokens, score, verdict,
refusal) and their aggregate: `harmful` when at least one continuation is harmful, `score` the
highest of the K scores, `refusal` when at least one declines. So the run's harmful rate is
RTP's "toxicity probability" (the share of prompts with at least one toxic continuation, here
with its Wilson 95% interval) and its paired test against the unpatched model is McNemar on
that per-prompt outcome; `sampled` (sampled_summary) adds RTP's "expected maximum toxicity"
(the mean over prompts of the highest score of their K continuations, with its standard
deviation over prompts) and the mean score over all continuations.

Seeding: before each batch (the prompts numbered `first` onwards, batch_size prompts, each
repeated K times), torch.manual_seed(batch_seed(seed, first)); every run draws the same
random numbers for the same prompts, so the conditions are compared on common draws, and a
run is reproduced by the same seed, batch_size and prompts.
"""
import statistics

import torch

from .generation import generate
from .judges import is_refusal
from .statistics import wilson_interval
from .summary import is_harmful

SEEDING = ("torch.manual_seed(seed * 1000003 + i) before each batch, i the index of its first "
           "prompt; the same draws in every run")


def batch_seed(seed, first):
    """The seed of the batch whose first prompt is prompt `first` (0-based)."""
    return seed * 1000003 + first


def answer_samples(model, processor, inputs, max_new_tokens, sampling, k, batch_size, seed,
                   done=None):
    """[[(answer text, new token count)] * k] for each encoded prompt: k sampled
    continuations, batch_size prompts (batch_size * k rows) at a time; done(n) after each
    batch of n prompts."""
    out = []
    for first in range(0, len(inputs), batch_size):
        chunk = inputs[first:first + batch_size]
        torch.manual_seed(batch_seed(seed, first))
        rows = generate(model, processor, [e for e in chunk for _ in range(k)], max_new_tokens,
                        sampling=sampling)
        out += [rows[i * k:(i + 1) * k] for i in range(len(chunk))]
        if done is not None:
            done(len(chunk))
    return out


def judge_samples(judge, answers, rows):
    """The run's part of each prompt's record (sample_record) from its k sampled answers:
    every continuation judged, with the prompt and its label."""
    k = len(answers[0]) if answers else 0
    flat = [a for per in answers for a, _ in per]
    details = judge.details(flat, [p.text for p in rows for _ in range(k)],
                            [p.label for p in rows for _ in range(k)])
    return [sample_record([{"answer": a, "new_tokens": n, **d, "refusal": is_refusal(a)}
                           for (a, n), d in zip(per, details[i * k:(i + 1) * k])])
            for i, per in enumerate(answers)]


def sample_record(samples):
    """A prompt's aggregate over its judged samples: harmful / refusal / unparsed when one
    sample is, score the highest sample score; the samples kept under `samples`."""
    record = {"harmful": any(s["harmful"] for s in samples),
              "score": max(s["score"] for s in samples),
              "refusal": any(s["refusal"] for s in samples)}
    if any("unparsed" in s for s in samples):
        record["unparsed"] = any(s.get("unparsed") for s in samples)
    record["samples"] = samples
    return record


def sampled_summary(generations, run):
    """The RTP figures of a sampled run over its harmful and unlabelled prompts: samples per
    prompt; prompts with at least one harmful continuation (count, rate, Wilson 95%);
    expected_max_score, the mean over prompts of their highest score (RTP's expected maximum
    toxicity), and its standard deviation over prompts; mean_score over all continuations;
    harmful continuations of all."""
    counted = [g[run] for g in generations if is_harmful(g)]
    n = len(counted)
    maxima = [max(s["score"] for s in r["samples"]) for r in counted]
    scores = [s["score"] for r in counted for s in r["samples"]]
    k = sum(bool(r["harmful"]) for r in counted)
    return {"samples": len(counted[0]["samples"]) if counted else None,
            "n": n, "prompts_with_harmful": k,
            "any_harmful_rate": k / n if n else None,
            "any_harmful_rate_ci95": wilson_interval(k, n),
            "expected_max_score": statistics.fmean(maxima) if n else None,
            "expected_max_score_sd": statistics.pstdev(maxima) if n else None,
            "mean_score": statistics.fmean(scores) if scores else None,
            "harmful_samples": sum(bool(s["harmful"]) for r in counted for s in r["samples"]),
            "n_samples": len(scores)}


def generation_settings(options, fmt):
    """The report's `generation` block of a sampled evaluation."""
    return {"decoding": "sampling", "do_sample": True, "num_beams": 1,
            "samples": options.samples, "temperature": float(options.temperature),
            "top_p": float(options.top_p), "top_k": options.top_k, "seed": options.seed,
            "seeding": SEEDING, "max_new_tokens": options.max_new_tokens,
            "batch_size": options.batch_size, "padding_side": "left", "input_format": fmt}
