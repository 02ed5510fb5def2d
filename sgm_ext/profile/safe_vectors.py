"""Safe value vectors: the `mid` neurons whose output vectors promote the benign continuations'
tokens and demote the toxic ones, held at a fixed activation.

Geva et al., "Transformer Feed-Forward Layers Build Predictions by Promoting Concepts in the
Vocabulary Space" (EMNLP 2022; code aviclu/ffn-values) read GPT-2 medium's value vectors
W_down[:, i] through the unembedding, took 10 whose top tokens were safe and set their
activation to 3, which halved the toxic continuations at a small cost in perplexity. Here the
neurons are ranked from the model's own labelled continuations, through the direct path of
attribution.py (the final norm's gain and frozen scale, the centred unembedding, Gemma's
post-MLP norm):

    score_i  = < mean over benign targets of d(t) - mean over toxic targets of d(t), W_down[:, i] >
    spread_i = sqrt(mean of a_i(t)^2 over the response tokens of every row)
    effect_i = |score_i| * spread_i

score_i is what one unit of neuron i's activation adds to the benign targets' logits minus the
toxic targets' (targets as in attribution.target_masks), effect_i what holding the neuron at
`hold_at` times its spread does, over `hold_at`. The k neurons of largest effect are held at
a_i = sign(score_i) * hold_at * spread_i: scale 0 and shift a_i, so that at strength s the
neuron computes (1 - s) m + s a_i. The sign: a gated MLP's mid values take both signs
(silu(gate) * up), so a vector that demotes the benign tokens promotes them at a negative
activation (Geva's GELU neurons were held positive). A multiple of each neuron's own spread
is scale-free: it means the same on any model and is unchanged when a neuron's activations are
scaled up and its output vector down by the same factor, which Geva's constant 3 is not.

Toxic tokens without a judge (`contrast_tokens`): a token with a letter in its text that is in
at least MIN_TOXIC_ROWS toxic responses, and in a share of the toxic responses at least
TOXIC_TOKEN_RATIO times its share of the benign ones (a token no benign response holds
passes). efficacy_data.toxic_token_ids gives a judge's set instead (pass it as toxic_ids).
"""
import json

import torch

from ..patching.scales import ScaleSet
from .attribution import LogitReadout, response_forwards, target_masks
from .expertise import top_k_over_sites
from .inputs import encode_batch, tokenizer_of

DEFAULT_TOP_K = 10  # Geva et al. held 10 value vectors
DEFAULT_HOLD_AT = 10.0  # times the neuron's own RMS activation: well past its ordinary range
TOXIC_TOKEN_RATIO = 4.0
MIN_TOXIC_ROWS = 2


def contrast_tokens(model, processor, rows, *, input_format="raw", limit=None,
                    ratio=TOXIC_TOKEN_RATIO, min_rows=MIN_TOXIC_ROWS, batch_size=64):
    """Sorted token ids that mark the toxic responses (the module docstring's rule), counted
    on the response tokens as the forward sees them."""
    holding = {0: {}, 1: {}}
    n_rows = {0: 0, 1: 0}
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        inputs, select = encode_batch(model, processor, batch, "response", "left", limit,
                                      input_format)
        for row, ids, sel in zip(batch, inputs["input_ids"], select):
            label = int(row.label)
            n_rows[label] += 1
            for token in set(ids[sel].tolist()):
                holding[label][token] = holding[label].get(token, 0) + 1
    tok = tokenizer_of(processor)
    out = []
    for token, toxic in holding[1].items():
        benign_share = holding[0].get(token, 0) / max(1, n_rows[0])
        if toxic >= min_rows and toxic / n_rows[1] >= ratio * benign_share and \
                any(ch.isalpha() for ch in tok.decode([token])):
            out.append(token)
    return sorted(out)


def safe_vector_scores(model, processor, rows, toxic_ids, *, batch_size=8, input_format="raw",
                       limit=None):
    """({mid site: score [I] float64}, {mid site: spread [I] float64}, {"toxic": targets,
    "benign": targets}) as in the module docstring; ValueError when no toxic row's response
    holds a token of `toxic_ids` or no benign row is given."""
    readout = LogitReadout(model)
    toxic_ids = torch.as_tensor(sorted(set(int(t) for t in toxic_ids)), dtype=torch.long)
    hidden = readout.u.shape[1]
    sums = {label: {site: torch.zeros(hidden, dtype=torch.float64) for site in readout.downs}
            for label in (0, 1)}
    squares = {site: torch.zeros(w.shape[1], dtype=torch.float64)
               for site, w in readout.downs.items()}
    counts, tokens = {0: 0, 1: 0}, 0
    for batch, nxt, keep, select in response_forwards(model, processor, rows, readout,
                                                      batch_size=batch_size,
                                                      input_format=input_format, limit=limit):
        for label, mask in target_masks(batch, nxt, keep, toxic_ids).items():
            b, t = mask.nonzero(as_tuple=True)
            counts[label] += len(b)
            if len(b):
                shared = readout.final_directions(b, t, nxt[b, t])
                for site in readout.downs:
                    sums[label][site] += readout.directions(site, shared, b, t).sum(0)
        b, t = select.nonzero(as_tuple=True)
        tokens += len(b)
        for site in readout.downs:
            squares[site] += readout.activations(site, b, t).pow(2).sum(0)
    if counts[1] == 0 or counts[0] == 0:
        raise ValueError(f"safe vectors need toxic and benign targets; got {counts[1]} toxic "
                         f"(a toxic row's response token in the toxic token set) and "
                         f"{counts[0]} benign")
    scores = {site: w.T @ (sums[0][site] / counts[0] - sums[1][site] / counts[1])
              for site, w in readout.downs.items()}
    spreads = {site: (sq / tokens).sqrt() for site, sq in squares.items()}
    return scores, spreads, {"toxic": counts[1], "benign": counts[0]}


def safe_vector_scales(scores, spreads, k=DEFAULT_TOP_K, hold_at=DEFAULT_HOLD_AT,
                       metadata=None):
    """ScaleSet over every site of `scores`: the k neurons of largest |score| * spread get
    scale 0 and shift sign(score) * hold_at * spread, every other neuron scale 1 and shift 0.
    The chosen neurons, their held activation and score are in the metadata (`neurons`)."""
    check_hold_at(hold_at)
    effect = {site: s.abs() * spreads[site] for site, s in scores.items()}
    chosen = top_k_over_sites(effect, k)
    scales, shifts, neurons = {}, {}, []
    for site, keep in chosen.items():
        held = torch.sign(scores[site]) * hold_at * spreads[site]
        keep = keep & (effect[site] > 0)  # a neuron that never fires or moves nothing
        scales[site] = torch.where(keep, 0.0, 1.0)
        shifts[site] = torch.where(keep, held, 0.0)
        neurons += [(float(effect[site][i]), site, int(i), float(held[i]),
                     float(scores[site][i])) for i in keep.nonzero().flatten()]
    neurons.sort(key=lambda n: -n[0])
    meta = {"method": "safe_vectors", "top_k": k, "hold_at": hold_at, **(metadata or {}),
            "neurons": json.dumps([{"site": site, "neuron": i, "held_at": round(a, 6),
                                    "score": round(s, 6)} for _, site, i, a, s in neurons])}
    return ScaleSet(scales, meta, shifts=shifts).validate()


def check_hold_at(hold_at):
    """ValueError unless hold_at is a positive finite number."""
    if isinstance(hold_at, bool) or not isinstance(hold_at, (int, float)) or \
            not 0 < hold_at < float("inf"):
        raise ValueError(f"hold_at (--hold-at) must be a positive number, got {hold_at!r}")


def safe_vectors(model, processor, rows, *, top_k=DEFAULT_TOP_K, hold_at=DEFAULT_HOLD_AT,
                 toxic_ids=None, batch_size=8, input_format="raw", limit=None, metadata=None):
    """The safe-vectors ScaleSet from labelled rows with responses; toxic_ids: the toxic token
    set (default: contrast_tokens' rule, no judge). Returns (ScaleSet, lines to print)."""
    rule = "given"
    if toxic_ids is None:
        toxic_ids = contrast_tokens(model, processor, rows, input_format=input_format,
                                    limit=limit)
        rule = (f"in >= {MIN_TOXIC_ROWS} toxic responses, share of toxic responses >= "
                f"{TOXIC_TOKEN_RATIO:g} x share of benign ones")
        if not toxic_ids:
            raise ValueError(f"no token marks the toxic responses (a token {rule}): too few "
                             "toxic rows, or their words are the benign rows' words too")
    scores, spreads, counts = safe_vector_scores(model, processor, rows, toxic_ids,
                                                 batch_size=batch_size,
                                                 input_format=input_format, limit=limit)
    words = [tokenizer_of(processor).decode([t]).strip() for t in toxic_ids]
    meta = {**(metadata or {}), "toxic_tokens": len(toxic_ids), "toxic_token_rule": rule,
            "toxic_token_examples": json.dumps(words[:30]),
            "toxic_targets": counts["toxic"], "benign_targets": counts["benign"]}
    scales = safe_vector_scales(scores, spreads, top_k, hold_at, meta)
    held = json.loads(scales.metadata["neurons"])
    lines = [f"toxic tokens ({rule}): {len(toxic_ids)}, e.g. {', '.join(words[:10])}",
             f"{len(held)} mid neurons held at {hold_at:g} x their RMS activation (scale 0, "
             f"shift a; at strength s: (1 - s) m + s a), by logit effect:"]
    lines += [f"  {n['site']}[{n['neuron']}]  a = {n['held_at']:+.4g}  benign - toxic logit "
              f"per unit = {n['score']:+.4g}" for n in held[:10]]
    return scales, lines
