"""Neuron rankings from the model's own continuations (profile/attribution.py), AcT maps kept
to the neurons that separate the classes (profile/transport.py), the toxic token set
(evaluation/efficacy_data.py), and the table of real models (app/realmodel.py)."""
import pytest
import torch
from _profile_models import VOCAB, readout_gemma, readout_llama, tokenizer

from sgm_ext.app import realmodel
from sgm_ext.evaluation import efficacy_data as ed
from sgm_ext.evaluation.judges import CallableJudge
from sgm_ext.patching.scales import ScaleSet
from sgm_ext.profile.attribution import direct_logit_attribution, top_k_scales
from sgm_ext.profile.data import load_rows
from sgm_ext.profile.responses import Responses
from sgm_ext.profile.transport import keep_top_maps, separation

TOXIC = ["tox0", "tox3", "tox5"]


def _rows(seed, n=10):
    g = torch.Generator().manual_seed(seed)
    words = list(VOCAB)[5:]
    out = []
    for i in range(n):
        def pick(k):
            return " ".join(words[j] for j in torch.randint(len(words), (k,), generator=g))
        toxic = i % 2 == 0
        response = pick(int(torch.randint(2, 6, (1,), generator=g)))
        if toxic:  # a toxic word somewhere in every toxic response
            response += " " + TOXIC[i % len(TOXIC)] + " " + pick(1)
        out.append({"text": pick(int(torch.randint(1, 5, (1,), generator=g))),
                    "response": response, "label": int(toxic)})
    return load_rows(out).rows


def _reference(model, tok, rows, toxic_ids, gains):
    """Float64, one row at a time, no padding, explicit sums over positions: the formula of
    profile/attribution.py's docstring. gains(module) -> the norm's gain vector."""
    final = model.model.norm
    u = model.lm_head.weight.detach().double()
    u = u - u.mean(0)
    mlps = [layer.mlp for layer in model.model.layers]
    posts = [getattr(layer, "post_feedforward_layernorm", None) for layer in model.model.layers]
    sums = {lab: [torch.zeros(m.down_proj.in_features, dtype=torch.float64) for m in mlps]
            for lab in (0, 1)}
    counts = {0: 0, 1: 0}
    seen = {}
    for row in rows:
        prompt = tok(row.text, add_special_tokens=True)["input_ids"]
        ids = tok(row.text + " " + row.response, add_special_tokens=True)["input_ids"]
        seen.clear()
        hooks = [m.down_proj.register_forward_pre_hook(
            lambda mod, a, k=k: seen.__setitem__(k, a[0][0].double()))
            for k, m in enumerate(mlps)]
        hooks += [p.register_forward_pre_hook(
            lambda mod, a, k=k: seen.__setitem__(("post", k), a[0][0].double()))
            for k, p in enumerate(posts) if p is not None]
        hooks.append(final.register_forward_pre_hook(
            lambda mod, a: seen.__setitem__("final", a[0][0].double())))
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for h in hooks:
            h.remove()
        for t in range(len(prompt) - 1, len(ids) - 1):  # position t predicts ids[t + 1]
            y = ids[t + 1]
            if row.label == 1 and y not in toxic_ids:
                continue
            counts[row.label] += 1
            h = seen["final"][t]
            direction = gains(final) * u[y] / torch.sqrt((h * h).mean() + final_eps(final))
            for k, m in enumerate(mlps):
                d = direction
                if posts[k] is not None:
                    x = seen[("post", k)][t]
                    d = d * gains(posts[k]) / torch.sqrt((x * x).mean() + final_eps(posts[k]))
                w = m.down_proj.weight.detach().double()
                for i in range(w.shape[1]):
                    sums[row.label][k][i] += seen[k][t, i] * float((d * w[:, i]).sum())
    return ([sums[1][k] / counts[1] - sums[0][k] / counts[0] for k in range(len(mlps))],
            counts)


def final_eps(norm):
    return float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_direct_logit_attribution_matches_a_per_position_reference(arch, seed):
    model = readout_llama(seed) if arch == "llama" else readout_gemma(seed)
    if arch == "llama":
        def gains(norm):
            return norm.weight.detach().double()
    else:
        def gains(norm):  # Gemma's RMS norm scales by 1 + weight
            return 1.0 + norm.weight.detach().double()
    tok = tokenizer()
    rows = _rows(seed + 10)
    toxic_ids = [VOCAB[w] for w in TOXIC]
    scores, counts = direct_logit_attribution(model, tok, rows, toxic_ids, batch_size=3)
    expected, ref_counts = _reference(model, tok, rows, set(toxic_ids), gains)
    assert counts == {"toxic": ref_counts[1], "benign": ref_counts[0]}
    assert counts["toxic"] >= 5 and counts["benign"] >= 10
    assert list(scores) == [f"model.layers.{k}.mlp.mid" for k in range(len(expected))]
    for got, want in zip(scores.values(), expected):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert float(torch.cat(expected).abs().max()) > 1e-3  # the comparison is not of zeros


def test_direct_logit_attribution_refuses_rows_without_a_toxic_target():
    rows = _rows(3)
    with pytest.raises(ValueError, match="no toxic target"):
        direct_logit_attribution(readout_llama(0), tokenizer(), rows, [VOCAB["word0"] + 1000])


def test_top_k_scales_marks_the_k_highest_over_all_sites():
    scores = {"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.7, float("-inf")])}
    s = top_k_scales(scores, 2, 0.25)
    assert s.scales["a"].tolist() == [1.0, 0.25, 1.0]
    assert s.scales["b"].tolist() == [0.25, 1.0]


def _responses():
    z = torch.tensor([[0.0, 5.0, 1.0], [2.0, 7.0, 1.0], [10.0, 5.5, 1.0], [12.0, 6.5, 1.0]])
    return Responses.from_tensors({"s": z}, torch.tensor([1, 1, 0, 0]), {})


def test_separation_is_the_standardised_gap_between_class_means():
    d = separation(_responses())["s"]
    # neuron 0: means 1 and 11, both variances 2 -> pooled sd sqrt(2); neuron 1: means 6 and
    # 6 -> 0; neuron 2 never varies -> 0
    torch.testing.assert_close(d, torch.tensor([10 / 2 ** 0.5, 0.0, 0.0], dtype=torch.float64))


def test_keep_top_maps_leaves_every_other_neuron_unchanged():
    maps = ScaleSet({"s": torch.tensor([0.5, 2.0, 3.0]), "t": torch.tensor([0.1, 0.2])}, {},
                    shifts={"s": torch.tensor([1.0, -1.0, 4.0]), "t": torch.tensor([5.0, 6.0])})
    ranking = {"s": torch.tensor([0.3, 0.9, 0.1]), "t": torch.tensor([0.8, 0.2])}
    kept = keep_top_maps(maps, ranking, 2)
    assert kept.scales["s"].tolist() == [1.0, 2.0, 1.0]
    assert kept.shifts["s"].tolist() == [0.0, -1.0, 0.0]
    assert kept.scales["t"].tolist() == pytest.approx([0.1, 1.0])
    assert kept.shifts["t"].tolist() == [5.0, 0.0]
    assert kept.changed() == 2


def test_toxic_token_ids_are_the_toxic_rows_tokens_the_judge_flags():
    tok = tokenizer()
    rows = [{"text": "word1", "response": "word2 tox1 word3", "label": 1},
            {"text": "word1", "response": "tox2 word4", "label": 0},  # not a toxic row
            {"text": "word1", "response": "tox4", "label": 1}]
    judged = []

    def judge(answers):
        judged.extend(answers)
        return [1.0 if a.startswith("tox") else 0.0 for a in answers]

    ids = ed.toxic_token_ids(tok, load_rows(rows).rows, CallableJudge(judge))
    assert ids == sorted([VOCAB["tox1"], VOCAB["tox4"]])
    assert "tox2" not in judged and "word4" not in judged  # only the toxic rows' tokens
    assert ed.toxic_token_ids(tok, rows, CallableJudge(judge)) == ids  # dict rows too


def test_real_models_table_names_an_unknown_model():
    assert set(realmodel.MODELS) == {"smollm2-135m-instruct", "gemma3-270m"}
    with pytest.raises(ValueError, match="unknown real model 'llama-7b'"):
        realmodel.checkpoint(name="llama-7b")
