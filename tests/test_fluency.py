"""The fluency of generated text (evaluation/fluency.py): the degenerate rule on written
examples of both sides, the continuations' negative log-likelihood against a one-at-a-time
float64 reference (batched with padding, prompts of different lengths, an empty continuation),
and the figures in eval's report."""
import math

import pytest
import torch
from _profile_models import planted_llama, tokenizer

from sgm_ext.evaluation.evaluate import evaluate
from sgm_ext.evaluation.fluency import continuation_nll, fluency_summary, is_degenerate
from sgm_ext.evaluation.prompts import Prompt
from sgm_ext.patching.scales import ScaleSet, config_fingerprint
from sgm_ext.profile.inputs import encode

FLUENT = [
    "You are a complete idiot and I never want to see you again.",
    "she said, walking back to the car with the groceries.",
    "a, b, c and d are the four options on the list.",
    "1. Preheat the oven. 2. Mix the flour and the eggs.",
    "Hello there!",  # short: not judged
    "",
    "the cat sat on the mat while the dog slept by the door",
]
DEGENERATE = [
    "the the the the the the",
    "I am a I am a I am a I am a",
    "!!!!!!!!!!",
    "You are aaaaaaaaaaa",
    ", , , , , , ,",
    "idiot idiot idiot idiot, you idiot idiot",
    "go go go go go go go away",
]


@pytest.mark.parametrize("text", FLUENT)
def test_fluent_text_is_not_degenerate(text):
    assert not is_degenerate(text)


@pytest.mark.parametrize("text", DEGENERATE)
def test_loops_and_collapse_are_degenerate(text):
    assert is_degenerate(text)


def _reference_nll(model, tok, prompt, text):
    """The continuation's summed NLL from one unpadded float64 forward."""
    p = tok(prompt, return_tensors="pt")["input_ids"]
    c = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = torch.cat([p, c], 1)
    m64 = model.to(torch.float64)
    try:
        with torch.no_grad():
            logits = m64(input_ids=ids).logits[0]
    finally:
        model.to(torch.float32)
    logp = torch.log_softmax(logits, -1)
    n = p.shape[1]
    return -sum(float(logp[n - 1 + j, c[0, j]]) for j in range(c.shape[1])), c.shape[1]


def test_continuation_nll_matches_a_float64_reference_under_padding():
    model, tok = planted_llama(seed=4).eval(), tokenizer()
    prompts = ["word1 word2", "word3", "word4 word5 word6 word7 word8", "word2 word9"]
    texts = ["word3 word4 word5", "word1", "", "word6 word6 word7 word8 word9"]
    encodings = [encode(tok, Prompt(i + 1, p), None, "raw") for i, p in enumerate(prompts)]
    got = continuation_nll(model, tok, encodings, texts, batch_size=3)
    assert len(got) == 4 and got[2] == (0.0, 0)
    for (nll, m), prompt, text in zip(got, prompts, texts):
        if not text:
            continue
        want, n = _reference_nll(model, tok, prompt, text)
        assert m == n and m > 0
        assert math.isclose(nll, want, rel_tol=1e-5, abs_tol=1e-4), (prompt, nll, want)


def test_fluency_summary_counts():
    texts = ["the the the the", "", "a fine sentence it is"]
    out = fluency_summary(texts, [(4.0, 4), (0.0, 0), (6.0, 5)])
    assert out["degenerate"] == 1 and out["empty"] == 1 and out["continuations"] == 3
    assert math.isclose(out["continuation_ppl"], math.exp(10.0 / 9))
    assert math.isclose(out["degenerate_share"], 1 / 3)


def test_eval_reports_the_answers_fluency_per_run():
    model, tok = planted_llama(seed=0).eval(), tokenizer()
    n = model.config.intermediate_size
    scales = ScaleSet({f"model.layers.{i}.mlp.mid": torch.zeros(n) for i in range(2)},
                      {"config_fingerprint": config_fingerprint(model.config)})
    report, generations = evaluate(model, tok, scales, ["word1 word2", "word3 word4 word5"],
                                   judge="refusal", max_new_tokens=4, latency_runs=0,
                                   samples=2, input_format="raw", progress=False)
    for run in ("unpatched", "patched"):
        f = report["runs"][run]["fluency"]
        assert f["continuations"] == 4
        texts = [s["answer"] for g in generations for s in g[run]["samples"]]
        assert f["degenerate"] == sum(map(is_degenerate, texts))
    assert report["runs"]["unpatched"]["continuation_ppl_ratio"] == 1.0
    ratio = report["runs"]["patched"]["continuation_ppl_ratio"]
    base = report["runs"]["unpatched"]["fluency"]["continuation_ppl"]
    assert ratio == pytest.approx(report["runs"]["patched"]["fluency"]["continuation_ppl"] /
                                  base)
    from sgm_ext.evaluation.report import summary_table

    assert "degenerate answers" in summary_table(report)
