"""Model calls of the evaluation: greedy (or sampled) generation, perplexity, and patched /
unpatched latency.

Latency: the same prompts generated to exactly the same number of new tokens with and without
the patch, the two interleaved (ABBA order) so that machine noise hits both alike; the ratio is
the median of the per-pair ratios patched / unpatched.
"""
import math
import statistics
import time

import torch

from ..patching.patcher import patch
from ..profile.inputs import collate, encode, input_device, pad_token_id, tokenizer_of


def _generation_kwargs(processor, max_new_tokens, sampling=None):
    if sampling is None:
        return dict(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                    pad_token_id=pad_token_id(processor),
                    temperature=None, top_p=None, top_k=None)
    return dict(max_new_tokens=max_new_tokens, do_sample=True, num_beams=1,
                pad_token_id=pad_token_id(processor), temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k)


@torch.inference_mode()
def generate(model, processor, encodings, max_new_tokens, exact_length=False, sampling=None):
    """[(answer text, new token count)] for encoded prompts, one batch, greedy decoding
    (left padding: every row's answer starts at the same position); exact_length forbids
    stopping early. An answer ends at its first end-of-sequence token. sampling: an
    options.Sampling (temperature, top_p, top_k) to sample instead, from torch's global
    random state (seed it before)."""
    kwargs = _generation_kwargs(processor, max_new_tokens, sampling)
    if exact_length:
        kwargs["min_new_tokens"] = max_new_tokens
    if len(encodings) == 1:
        batch = encodings[0]
    else:
        batch, _ = collate(encodings, kwargs["pad_token_id"], "left")
    device = input_device(model)
    batch = {k: v.to(device) for k, v in batch.items()}
    out = model.generate(**batch, **kwargs)
    eos = getattr(model.generation_config, "eos_token_id", None)
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    tok = tokenizer_of(processor)
    answers = []
    for row in out[:, batch["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        answers.append((tok.decode(row[:end], skip_special_tokens=True).strip(), end))
    return answers


def generate_one(model, processor, inputs, max_new_tokens, exact_length=False):
    """(answer text, new token count) for one encoded prompt."""
    return generate(model, processor, [inputs], max_new_tokens, exact_length)[0]


@torch.inference_mode()
def passage_nll(model, processor, texts, max_length=512):
    """[(summed negative log-likelihood, predicted tokens)] of each passage with two tokens
    or more (the parts perplexity and its bootstrap interval are made of)."""
    tok = tokenizer_of(processor)
    device = input_device(model)
    parts = []
    for text in texts:
        ids = tok(text, return_tensors="pt", truncation=True, max_length=max_length)["input_ids"]
        if ids.shape[1] < 2:
            continue
        ids = ids.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        nll = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        parts.append((nll, ids.shape[1] - 1))
    if not parts:
        raise ValueError("the reference text gives no token to predict")
    return parts


def perplexity_of(parts):
    """exp(mean negative log-likelihood per predicted token) over passage_nll's parts."""
    return math.exp(sum(n for n, _ in parts) / sum(c for _, c in parts))


def measure_latency(model, processor, prompts, scales, *, new_tokens, runs=3, n_prompts=8,
                    mode="fused", strength=1.0, limit=None, fmt="auto", allow_amplify=False):
    """Generation time patched / unpatched, side by side.

    Each of the first n_prompts prompts is generated to exactly new_tokens tokens with and
    without the patch, `runs` times, alternating which goes first; one untimed warm-up each,
    and before every timed generation one untimed token in the same state (steady state, not
    the patch's first call).
    limit, fmt: the inputs.LengthLimit and format the prompts are encoded with;
    allow_amplify: as for patch.
    """
    encoded = [encode(processor, p, limit, fmt) for p in prompts[:n_prompts]]
    times = {"unpatched": [], "patched": []}

    def timed(enc, patched):
        handle = patch(model, scales, mode=mode, strength=strength,
                       allow_amplify=allow_amplify) if patched else None
        try:
            # one untimed token first, in both states: a fresh patch fills its caches (s_eff
            # on the device, in the dtype) on its first call, which is not what a token costs
            generate_one(model, processor, enc, 1, exact_length=True)
            start = time.perf_counter()
            generate_one(model, processor, enc, new_tokens, exact_length=True)
            return time.perf_counter() - start
        finally:
            if handle is not None:
                handle.remove()

    timed(encoded[0], False)
    timed(encoded[0], True)
    for r in range(runs):
        for i, enc in enumerate(encoded):
            order = (False, True) if (r + i) % 2 == 0 else (True, False)
            pair = {p: timed(enc, p) for p in order}
            times["unpatched"].append(pair[False])
            times["patched"].append(pair[True])
    ratios = [p / u for p, u in zip(times["patched"], times["unpatched"])]
    # the spread over the pairs: on a small model or a loaded machine one pair can be off by
    # several percent either way, so a median without its spread would read as a cost
    quartiles = statistics.quantiles(ratios, n=4, method="inclusive") if len(ratios) > 1 \
        else ratios * 3
    return {"ratio": statistics.median(ratios),
            "ratio_range": [min(ratios), max(ratios)],
            "ratio_quartiles": [quartiles[0], quartiles[2]],
            "unpatched_s": statistics.median(times["unpatched"]),
            "patched_s": statistics.median(times["patched"]),
            "pairs": len(ratios), "new_tokens": new_tokens, "mode": mode, "times": times}
