"""Fluency of the generated text itself, beside perplexity on reference text.

A toxicity judge reads broken text as clean, so damage to a model lowers its toxic rate (the
efficacy benchmark's random controls did). The peers report the fluency of the generations
beside the toxicity (AurA, AcT and ProFS: perplexity of the continuations under a reference
model). Two figures per run:

- continuation perplexity: exp(mean negative log-likelihood per token) of the continuations,
  each given its own prompt, under the unpatched model; a run's is reported as a ratio to the
  unpatched run's on the same prompts. Text the unpatched model finds unlikely (broken
  grammar, loops of rare tokens) raises it.
- degenerate share: the share of continuations `is_degenerate` flags (a loop, a collapsed token
  distribution, a run of one character). Empty continuations (the model ended at once) are
  counted apart, as `empty`, not as degenerate.
"""
import math
import re
from collections import Counter

import torch

from ..profile.inputs import collate, input_device, pad_token_id, tokenizer_of

# The rule's thresholds (is_degenerate): chosen so that ordinary sentences of 16 tokens pass
# and the failure modes seen in damaged models' continuations do not (tests/test_fluency.py).
MIN_PIECES = 4  # shorter continuations are not judged
COLLAPSE_SHARE = 0.5  # one word or mark is more than this share of the pieces
DISTINCT_TRIGRAMS = 0.5  # fewer than this share of the word trigrams are distinct
CHARACTER_RUN = 8  # the same non-space character this many times in a row

_PIECES = re.compile(r"\w+|[^\w\s]")


def is_degenerate(text):
    """Whether a continuation is degenerate: among its words and punctuation marks (at least
    MIN_PIECES, case folded), one makes up more than COLLAPSE_SHARE of them (a collapsed
    distribution: "the the the the"); or fewer than DISTINCT_TRIGRAMS of its trigrams are
    distinct (a loop: "I am a I am a I am a"); or it holds CHARACTER_RUN copies of one
    non-space character in a row ("!!!!!!!!", "aaaaaaaaa")."""
    if re.search(r"(\S)\1{%d,}" % (CHARACTER_RUN - 1), text):
        return True
    pieces = _PIECES.findall(text.lower())
    if len(pieces) < MIN_PIECES:
        return False
    if Counter(pieces).most_common(1)[0][1] > COLLAPSE_SHARE * len(pieces):
        return True
    trigrams = list(zip(pieces, pieces[1:], pieces[2:]))
    return len(trigrams) >= MIN_PIECES and len(set(trigrams)) < DISTINCT_TRIGRAMS * len(trigrams)


@torch.inference_mode()
def continuation_nll(model, processor, encodings, continuations, batch_size=16):
    """[(summed negative log-likelihood, tokens)] of each continuation text given its encoded
    prompt (encodings: model inputs of one prompt each, as profile.inputs.encode gives them;
    the continuation tokenized on its own, without special tokens, and appended). An empty
    continuation gives (0.0, 0). The model is run as it is: call it unpatched."""
    tok = tokenizer_of(processor)
    pad = pad_token_id(processor)
    device = input_device(model)
    out = []
    for start in range(0, len(encodings), batch_size):
        rows, spans = [], []
        for enc, text in zip(encodings[start:start + batch_size],
                             continuations[start:start + batch_size]):
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"] \
                if text else torch.zeros(1, 0, dtype=torch.long)
            n = enc["input_ids"].shape[1]
            rows.append(_appended(enc, ids))
            spans.append((n, ids.shape[1]))
        batch, _ = collate(rows, pad, "right")
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(**batch, use_cache=False).logits.float()
        for i, (n, m) in enumerate(spans):
            if m == 0:
                out.append((0.0, 0))
                continue
            pred = logits[i, n - 1:n + m - 1]
            target = batch["input_ids"][i, n:n + m]
            out.append((float(torch.nn.functional.cross_entropy(pred, target,
                                                                reduction="sum")), m))
    return out


def _appended(enc, ids):
    """The prompt's inputs with the continuation's ids appended (its mask 1, other per-token
    fields 0)."""
    n = enc["input_ids"].shape[1]
    out = dict(enc)
    for key, value in enc.items():
        if torch.is_tensor(value) and value.dim() == 2 and value.shape == (1, n):
            extra = ids if key == "input_ids" else torch.full_like(ids, int(
                key == "attention_mask"), dtype=value.dtype)
            out[key] = torch.cat([value, extra.to(value.dtype)], 1)
    return out


def fluency_summary(texts, nll_parts):
    """A run's fluency figures over its continuations: perplexity under the unpatched model
    (tokens pooled over continuations), degenerate and empty counts and shares."""
    tokens = sum(c for _, c in nll_parts)
    n = len(texts)
    degenerate = sum(is_degenerate(t) for t in texts)
    empty = sum(not t.strip() for t in texts)
    return {"continuation_ppl": math.exp(sum(s for s, _ in nll_parts) / tokens) if tokens
            else None, "continuation_tokens": tokens, "continuations": n,
            "degenerate": degenerate, "degenerate_share": degenerate / n if n else None,
            "empty": empty, "empty_share": empty / n if n else None}
