"""Profiling rows from a model's own behaviour (what `sgm-ext sample` does, as library calls).

K continuations of every prompt are sampled from the model (efficacy_data.sample_continuations:
seeded per batch, raw or chat format), each is scored by a judge, and each becomes one row:
text = the prompt, response = the continuation, label = score >= threshold, with the score,
the prompt's id and kind and the sample's index. `sgm-ext profile --modality response` pools
over the response tokens of those rows, in the format they were sampled in (the provenance
file beside the rows says which; profile reads it). The efficacy benchmark (bench/
bench_efficacy.py) profiles on such rows: rows about the topic teach the profiler the topic
(`sgm-ext demo --real`), not the model's own toxic behaviour.

    prompts = prompt_records(load_prompts("prompts.jsonl"))   # or efficacy_data.build_prompts
    rows, settings = own_rows(model, tok, prompts, "profanity", k=3, max_new_tokens=16)
    write_rows(rows, "rows.jsonl", settings)                  # + rows.jsonl.provenance.json
"""
import os

from ..core.progress import progress_bar
from ..profile.data import PROVENANCE_SUFFIX, provenance_of
from ..profile.inputs import resolve_format
from .efficacy_data import (
    SAMPLING,
    judge_samples,
    label_rows,
    read_rows,
    rows_digest,
    sample_continuations,
)
from .judges import get_judge

# Fewer rows than this in a class: profile cannot tell the classes apart reliably.
MIN_CLASS_ROWS = 10


def prompt_records(prompts):
    """efficacy_data's prompt dicts [{id, text, kind}] from prompts.Prompt rows (load_prompts):
    id the prompt's row number in its file; kind its label (harmful / benign) when it has one,
    else its category (`all` when none). ValueError for a prompt with an image (sampling
    takes text prompts)."""
    out = []
    for p in prompts:
        if p.image is not None:
            raise ValueError(f"prompt {p.number} has an image; sampling continuations takes "
                             "text prompts only")
        kind = {1: "harmful", 0: "benign"}.get(p.label, p.category)
        out.append({"id": p.number, "text": p.text, "kind": kind})
    return out


def sampling_settings(sampling=None):
    """The generate() settings of a Sampling (options.Sampling: temperature, top_p, top_k), or
    efficacy_data.SAMPLING (the benchmark's) for None."""
    if sampling is None:
        return dict(SAMPLING)
    return {"do_sample": True, "temperature": float(sampling.temperature),
            "top_p": float(sampling.top_p), "top_k": int(sampling.top_k)}


def own_rows(model, processor, prompts, judge="profanity", *, k=3, max_new_tokens=16,
             sampling=None, seed=0, threshold=0.5, fmt="raw", batch_prompts=16, progress=False):
    """(rows, settings): one profiling row per non-empty continuation (efficacy_data.label_rows)
    of k continuations sampled from the model for each prompt ({id, text, kind} dicts), judged
    by `judge` (a name as get_judge takes, a Judge or a callable; harmful at score >=
    threshold); settings: how they were made (judge, threshold, sampling, seed, k,
    max_new_tokens, format, batch size), the provenance write_rows records. The same prompts,
    seed, batch size and settings give the same rows. fmt: raw, chat or auto (chat when the
    processor has a chat template). progress: a progress bar over the prompts."""
    fmt = resolve_format(processor, fmt)
    judge = get_judge(judge, threshold=threshold)
    settings = sampling_settings(sampling)
    texts = [p["text"] for p in prompts]
    bar = progress_bar(len(texts), desc="sampling", unit="prompt", enabled=progress)
    done = [0]

    def advance(n, total):
        bar.update(n - done[0])
        done[0] = n

    try:
        samples = sample_continuations(model, processor, texts, k=k,
                                       max_new_tokens=max_new_tokens, seed=seed,
                                       batch_prompts=batch_prompts, sampling=settings,
                                       progress=advance, fmt=fmt)
    finally:
        bar.close()
    scores = judge_samples(judge, texts, samples)
    rows = label_rows(prompts, samples, scores, threshold)
    return rows, {"judge": judge.name, "threshold": float(threshold), "sampling": settings,
                  "seed": seed, "k": k, "max_new_tokens": max_new_tokens, "format": fmt,
                  "batch_size": batch_prompts, "prompts": len(prompts),
                  "prompt_ids": rows_digest(prompts)}


def row_summary(rows, prompts, k):
    """The counts `sgm-ext sample` prints: rows, toxic rows and their share, prompts with at
    least one toxic continuation, continuations left out for being empty."""
    toxic = sum(r["label"] for r in rows)
    hit = len({r["prompt_id"] for r in rows if r["label"]})
    return {"rows": len(rows), "toxic": toxic, "non_toxic": len(rows) - toxic,
            "toxic_share": toxic / len(rows) if rows else 0.0, "prompts": len(prompts),
            "prompts_with_toxic": hit, "empty": len(prompts) * k - len(rows)}


def class_warning(summary, minimum=MIN_CLASS_ROWS):
    """One line when a class of the rows is empty or has fewer than `minimum` rows (profile
    then cannot, or should not, run on them), saying what to do; None otherwise."""
    small = [(n, name) for n, name in ((summary["toxic"], "toxic"),
                                       (summary["non_toxic"], "non-toxic")) if n < minimum]
    if not small:
        return None
    n, name = min(small)
    what = (f"no {name} rows: profile needs both classes" if n == 0 else
            f"only {n} {name} rows (fewer than {minimum}): too few for profile to separate "
            "the classes")
    lower = "lower" if name == "toxic" else "raise"
    return (f"{what}; sample more prompts or more continuations (--samples), or {lower} "
            "--threshold")



def is_rows_file(path):
    """Whether `path` holds rows write_rows wrote, unchanged since: its provenance file is
    there and the rows' digest is the one it records."""
    info = provenance_of(path)
    if not info or "digest" not in info:
        return False
    try:
        return rows_digest(read_rows(path)) == info["digest"]
    except (OSError, ValueError):
        return False


def is_provenance_file(path):
    """Whether `path` (a `<rows>.provenance.json`) is a provenance record write_rows wrote."""
    if not os.fspath(path).endswith(PROVENANCE_SUFFIX):
        return False
    info = provenance_of(os.fspath(path)[:-len(PROVENANCE_SUFFIX)])
    return bool(info) and "digest" in info
