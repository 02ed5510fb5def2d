"""The recipes that read the model's own continuations token by token: safe value vectors
(profile/safe_vectors.py), the toxicity probe, its direction shift and its neurons
(profile/directions.py), their random controls (evaluation/efficacy_data.py), and
`sgm-ext profile --recipe` for them and for act-input / aura-input, in a fresh process."""
import json

import pytest
import torch
from _profile_models import (
    VOCAB,
    planted_llama,
    planted_rows,
    readout_gemma,
    readout_llama,
    tokenizer,
)
from cli_helpers import BEFORE_LOAD, cli, refused

import sgm_ext
from sgm_ext.evaluation import efficacy_data as ed
from sgm_ext.patching.scales import ScaleSet, load_scales
from sgm_ext.profile import ProfileOptions, profile_model
from sgm_ext.profile.data import load_rows
from sgm_ext.profile.directions import (
    direction_neuron_scales,
    final_hidden_states,
    fit_probe,
    toxic_direction,
)
from sgm_ext.profile.safe_vectors import contrast_tokens, safe_vector_scales, safe_vector_scores

TOXIC = ["tox0", "tox3", "tox5"]


def _rows(seed, n=12):
    """Rows with responses: every toxic response holds a word of TOXIC."""
    g = torch.Generator().manual_seed(seed)
    words = [w for w in list(VOCAB)[5:] if not w.startswith("tox")]

    def pick(k):
        return " ".join(words[j] for j in torch.randint(len(words), (k,), generator=g))
    out = []
    for i in range(n):
        toxic = i % 2 == 0
        response = pick(int(torch.randint(2, 6, (1,), generator=g)))
        if toxic:
            response += " " + TOXIC[i % len(TOXIC)] + " " + pick(1)
        out.append({"text": pick(int(torch.randint(1, 4, (1,), generator=g))),
                    "response": response, "label": int(toxic)})
    return load_rows(out).rows


# ------------------------------------------------------------------ the probe

def test_probe_recovers_a_planted_direction_and_is_sklearns_fit():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(0)
    truth = torch.randn(12, generator=g, dtype=torch.float64)
    truth /= truth.norm()
    y = (torch.arange(600) % 3 == 0).long()  # a third toxic: the class weights matter
    x = 2 * torch.randn(600, 12, generator=g, dtype=torch.float64) + 5 + 3 * y[:, None] * truth
    w, accuracy = fit_probe(x, y)
    assert float(w @ truth) > 0.95 and abs(float(w.norm()) - 1) < 1e-12
    assert accuracy > 0.7
    # sklearn's L2 logistic regression, C = 1, balanced classes, on the RMS-scaled features
    centred = x - x.mean(0)
    z = (centred / centred.pow(2).mean().sqrt()).numpy()
    ref = LogisticRegression(C=1.0, class_weight="balanced", solver="newton-cholesky",
                             tol=1e-12, max_iter=1000).fit(z, y.numpy())
    coef = torch.tensor(ref.coef_[0], dtype=torch.float64)
    torch.testing.assert_close(w, coef / coef.norm(), rtol=0, atol=1e-7)
    assert accuracy == pytest.approx(ref.score(z, y.numpy()))
    with pytest.raises(ValueError, match="both labels"):
        fit_probe(x, torch.zeros(600))


# ------------------------------------------------------------------ safe value vectors

def _reference_scores(model, tok, rows, toxic_ids):
    """Float64, one row at a time, no padding: the safe-vector score and spread of
    profile/safe_vectors.py's docstring (Llama: no post-MLP norm)."""
    u = model.lm_head.weight.detach().double()
    u = u - u.mean(0)
    gain = model.model.norm.weight.detach().double()
    eps = model.config.rms_norm_eps
    mlps = [layer.mlp for layer in model.model.layers]
    sums = {lab: torch.zeros(u.shape[1], dtype=torch.float64) for lab in (0, 1)}
    counts, squares, tokens = {0: 0, 1: 0}, [0.0] * len(mlps), 0
    seen = {}
    hooks = [m.down_proj.register_forward_pre_hook(
        lambda mod, a, k=k: seen.__setitem__(k, a[0][0].double())) for k, m in enumerate(mlps)]
    hooks.append(model.model.norm.register_forward_pre_hook(
        lambda mod, a: seen.__setitem__("final", a[0][0].double())))
    for row in rows:
        prompt = tok(row.text)["input_ids"]
        ids = tok(row.text + " " + row.response)["input_ids"]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
        for k in range(len(mlps)):
            squares[k] = squares[k] + seen[k][len(prompt):].pow(2).sum(0)
        tokens += len(ids) - len(prompt)
        for t in range(len(prompt) - 1, len(ids) - 1):
            y = ids[t + 1]
            if row.label == 1 and y not in toxic_ids:
                continue
            h = seen["final"][t]
            sums[row.label] += gain * u[y] / torch.sqrt((h * h).mean() + eps)
            counts[row.label] += 1
    for h in hooks:
        h.remove()
    direction = sums[0] / counts[0] - sums[1] / counts[1]
    return ([m.down_proj.weight.detach().double().T @ direction for m in mlps],
            [(s / tokens).sqrt() for s in squares])


def test_safe_vector_scores_match_a_per_position_reference_and_find_a_planted_vector():
    model, tok, rows = readout_llama(0), tokenizer(), _rows(4)
    toxic_ids = {VOCAB[w] for w in TOXIC}
    # neuron 7 of layer 2 writes the benign tokens' mean unembedding minus the toxic ones'
    u = model.lm_head.weight.detach()
    benign_ids = [VOCAB[w] for r in rows if r.label == 0 for w in r.response.split()]
    planted = u[benign_ids].mean(0) - u[sorted(toxic_ids)].mean(0)
    for sign in (1.0, -1.0):
        with torch.no_grad():
            model.model.layers[2].mlp.down_proj.weight[:, 7] = sign * 2 * planted / planted.norm()
        scores, spreads, counts = safe_vector_scores(model, tok, rows, sorted(toxic_ids),
                                                     batch_size=5)
        want_scores, want_spreads = _reference_scores(model, tok, rows, toxic_ids)
        sites = [f"model.layers.{k}.mlp.mid" for k in range(3)]
        assert list(scores) == sites and counts["toxic"] >= 6
        for site, want, spread in zip(sites, want_scores, want_spreads):
            torch.testing.assert_close(scores[site], want, rtol=1e-4, atol=1e-7)
            torch.testing.assert_close(spreads[site], spread, rtol=1e-4, atol=1e-7)
        scales = safe_vector_scales(scores, spreads, k=3, hold_at=10.0)
        first = json.loads(scales.metadata["neurons"])[0]
        assert (first["site"], first["neuron"]) == ("model.layers.2.mlp.mid", 7)
        held = float(scales.shifts["model.layers.2.mlp.mid"][7])
        # held on the side where it promotes the benign tokens: negative for the negated vector
        assert held == pytest.approx(sign * 10 * float(want_spreads[2][7]), rel=1e-5)
        assert float(scales.scales["model.layers.2.mlp.mid"][7]) == 0.0


def test_safe_vector_scales_by_hand():
    scores = {"a": torch.tensor([0.5, -2.0, 0.1]), "b": torch.tensor([1.0, 0.0])}
    spreads = {"a": torch.tensor([1.0, 1.0, 100.0]), "b": torch.tensor([3.0, 5.0])}
    # effects |score| * spread: a [0.5, 2, 10], b [3, 0]
    s = safe_vector_scales(scores, spreads, k=2, hold_at=2.0)
    assert s.scales["a"].tolist() == [1, 1, 0] and s.scales["b"].tolist() == [0, 1]
    assert s.shifts["a"].tolist() == [0, 0, 200] and s.shifts["b"].tolist() == [6, 0]
    s = safe_vector_scales(scores, spreads, k=5, hold_at=2.0)  # b[1] moves nothing: never held
    assert s.shifts["a"].tolist() == [2, -2, 200] and s.shifts["b"].tolist() == [6, 0]
    assert s.changed() == 4 and s.metadata["hold_at"] == "2.0" and s.metadata["top_k"] == "5"
    assert [n["neuron"] for n in json.loads(s.metadata["neurons"])] == [2, 0, 1, 0]
    # strength s: (1 - s) m + s a, through the file's own at_strength
    half = s.at_strength(0.5)
    assert half.scales["a"].tolist() == [0.5, 0.5, 0.5] and half.shifts["a"][2] == 100
    with pytest.raises(ValueError, match="hold_at"):
        safe_vector_scales(scores, spreads, k=2, hold_at=0.0)


def test_contrast_tokens_mark_the_toxic_responses_words():
    toxic = [("tox3 word1", "word1 tox1 word5"), ("tox3", "tox1 word3 word5"),
             ("word9", "tox2 word2")]
    benign = [("word9", "word4 word6")] * 8 + [("word9", "word5 word2"), ("word9", "word2")]
    rows = load_rows([{"text": t, "response": r, "label": 1} for t, r in toxic] +
                     [{"text": t, "response": r, "label": 0} for t, r in benign]).rows
    # tox1: 2 of 3 toxic responses, no benign one; word5: 2/3 >= 4 x 1/10; tox2: one row only;
    # word2: 1/3 < 4 x 2/10; tox3 is in the prompts only
    ids = contrast_tokens(planted_llama(), tokenizer(), rows)
    assert ids == sorted([VOCAB["tox1"], VOCAB["word5"]])
    assert contrast_tokens(planted_llama(), tokenizer(), rows, ratio=7.0) == [VOCAB["tox1"]]


# ------------------------------------------------------------------ the direction and its neurons

def _class_projection(x, labels, w):
    toxic = labels.bool()
    return float(x[toxic].mean(0) @ w), float(x[~toxic].mean(0) @ w)


def test_direction_shift_moves_the_toxic_mean_onto_the_benign_mean():
    model, tok, rows = readout_llama(1), tokenizer(), _rows(5, n=16)
    x, labels, _ = final_hidden_states(model, tok, rows, batch_size=5)
    w, _ = fit_probe(x, labels)
    toxic_before, benign_before = _class_projection(x, labels, w)
    scales, lines = toxic_direction(model, tok, rows, "toxic_direction", last_layers=1,
                                    batch_size=5)
    gap = toxic_before - benign_before
    assert gap > 0 and float(scales.metadata["gap"]) == pytest.approx(gap, rel=1e-6)
    shift = scales.shifts["model.layers.2.mlp.down_proj"].double()
    torch.testing.assert_close(shift, -gap * w, rtol=1e-5, atol=1e-6)
    assert scales.metadata["layers"] == "2" and "direct" in scales.metadata["shift_through"]
    with sgm_ext.patch(model, scales, mode="hook"):
        after, _, _ = final_hidden_states(model, tok, rows, batch_size=5)
    torch.testing.assert_close(after - x, shift.expand_as(x), rtol=1e-4, atol=1e-4)
    assert _class_projection(after, labels, w)[0] == pytest.approx(benign_before, abs=1e-3)
    # on more layers the shifts share the move: their sum is -gap w
    three, _ = toxic_direction(model, tok, rows, "toxic_direction", last_layers=3, batch_size=5)
    total = sum(b.double() for b in three.shifts.values())
    torch.testing.assert_close(total, -gap * w, rtol=1e-5, atol=1e-5)
    assert three.metadata["layers"] == "0,1,2" and float(three.metadata["probe_accuracy"]) > 0.5


def test_direction_shift_goes_through_gemmas_post_feedforward_norm():
    model, tok, rows = readout_gemma(2), tokenizer(), _rows(6, n=16)
    x, labels, _ = final_hidden_states(model, tok, rows, batch_size=5)
    w, _ = fit_probe(x, labels)
    toxic_before, benign_before = _class_projection(x, labels, w)
    scales, _ = toxic_direction(model, tok, rows, "toxic_direction", last_layers=1, batch_size=5)
    assert "post_feedforward_layernorm" in scales.metadata["shift_through"]
    with sgm_ext.patch(model, scales, mode="hook"):
        after, _, _ = final_hidden_states(model, tok, rows, batch_size=5)
    toxic_after, _ = _class_projection(after, labels, w)
    # first order only: the toxic mean moves most of the way, not exactly
    gap = toxic_before - benign_before
    assert abs(toxic_after - benign_before) < 0.35 * gap


def test_direction_neurons_are_the_output_vectors_closest_to_the_direction():
    model = readout_llama(3, layers=2)
    w = torch.randn(32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    w /= w.norm()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[:, 7] = (3 * w).float()
        model.model.layers[0].mlp.down_proj.weight[:, 9] = (-3 * w).float()  # writes -w
        model.model.layers[0].mlp.down_proj.weight[:, 2] = (2 * w).float()
        model.model.layers[0].mlp.down_proj.weight[0, 2] += 1.0  # close, not parallel
    s = direction_neuron_scales(model, w, 2)
    chosen = [(n["site"], n["neuron"]) for n in json.loads(s.metadata["neurons"])]
    assert chosen == [("model.layers.1.mlp.mid", 7), ("model.layers.0.mlp.mid", 2)]
    assert s.changed() == 2 and float(s.scales["model.layers.0.mlp.mid"][9]) == 1.0
    # Gemma: read through the post-MLP norm's gain (1 + weight)
    gemma = readout_gemma(4)
    gain = 1 + gemma.model.layers[1].post_feedforward_layernorm.weight.detach().double()
    with torch.no_grad():
        gemma.model.layers[1].mlp.down_proj.weight[:, 5] = (w / gain).float()
    s = direction_neuron_scales(gemma, w, 1)
    assert json.loads(s.metadata["neurons"])[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert float(s.scales["model.layers.1.mlp.mid"][5]) == 0.0


def test_options_a_direction_method_does_not_take_are_refused():
    rows = [r._asdict() for r in _rows(7)]
    for options, message in ((dict(method="toxic_direction", sites=("down",), top_k=3),
                              "top_k (--top-k) is for the neuron methods"),
                             (dict(method="aura", hold_at=3.0), "hold_at (--hold-at) is for"),
                             (dict(method="safe_vectors", sites=("up",)),
                              "works on the mid sites"),
                             (dict(method="safe_vectors", modality="all"),
                              "modality (--modality) is all")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            profile_model(readout_llama(0), rows, ProfileOptions(**{"modality": "response",
                                                             **options}), processor=tokenizer())


# ------------------------------------------------------------------ random controls

def test_random_direction_control_keeps_each_shifts_norm_in_one_random_direction():
    w = torch.randn(32, generator=torch.Generator().manual_seed(1))
    scales = ScaleSet({}, {"method": "toxic_direction"},
                      shifts={"l.1.mlp.down_proj": -2 * w / w.norm(),
                              "l.2.mlp.down_proj": -3 * w / w.norm()})
    control = ed.matched_control(scales, seed=5)
    a, b = control.shifts["l.1.mlp.down_proj"], control.shifts["l.2.mlp.down_proj"]
    assert float(a.norm()) == pytest.approx(2) and float(b.norm()) == pytest.approx(3)
    assert float(a @ b) / 6 == pytest.approx(1.0, abs=1e-6)  # one direction
    assert abs(float(a @ w) / (2 * float(w.norm()))) < 0.5  # not the probe's
    assert control.metadata["control"] == "random direction of the same norm"
    again = ed.random_direction_control(scales, seed=5)
    assert torch.equal(again.shifts["l.1.mlp.down_proj"], a)


def test_random_control_holds_random_mid_neurons_at_the_same_activations():
    scores = {"m.0.mid": torch.linspace(-1, 1, 40), "m.1.mid": torch.linspace(1, -1, 40)}
    spreads = {site: torch.arange(1.0, 41.0) for site in scores}
    held = safe_vector_scales(scores, spreads, k=4, hold_at=10.0)
    control = ed.matched_control(held, seed=0)
    pairs = {(float(s), float(b)) for site in held.sites()
             for s, b in zip(held.scales[site], held.shifts[site]) if s != 1}
    moved = {(float(s), float(b)) for site in control.sites()
             for s, b in zip(control.scales[site], control.shifts[site]) if s != 1}
    assert len(pairs) == 4 and moved == pairs  # scale 0 and the same held values
    assert control.changed() == 4
    positions = {(site, int(i)) for site in control.sites()
                 for i in (control.scales[site] == 0).nonzero().flatten()}
    assert positions != {(site, int(i)) for site in held.sites()
                         for i in (held.scales[site] == 0).nonzero().flatten()}


def test_random_control_of_input_site_maps_moves_them_to_random_units():
    g = torch.Generator().manual_seed(2)
    sites = ("model.layers.0.mlp.input", "model.layers.1.mlp.input")
    maps = ScaleSet({s: torch.rand(32, generator=g) + 0.5 for s in sites}, {"method": "linear_ot"},
                    shifts={s: torch.randn(32, generator=g) for s in sites})
    control = ed.matched_control(maps, seed=3)
    before = sorted((float(maps.scales[s][i]), float(maps.shifts[s][i]))
                    for s in sites for i in range(32))
    after = sorted((float(control.scales[s][i]), float(control.shifts[s][i]))
                   for s in sites for i in range(32))
    assert before == after and not torch.equal(control.scales[sites[0]], maps.scales[sites[0]])


# ------------------------------------------------------------------ the command line

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    model, tok = planted_llama(), tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    data = root / "own.jsonl"  # the model's "continuations": the planted sentences
    data.write_text("".join(json.dumps({"text": "word0 word1", "response": r["text"],
                                        "label": r["label"]}) + "\n" for r in planted_rows()))
    return root


def _profile(root, out, *more, env=None):
    return cli("profile", "--model", root / "model", "--data", root / "own.jsonl", "--out", out,
               "--format", "raw", "--batch-size", "6", "--quiet", "--no-plot", *more, env=env)


@pytest.mark.parametrize("name, printed, changed", [
    ("safe-vectors", "10 mid neurons held at 10 x their RMS activation", 10),
    ("toxic-direction", "shift -", 32),
    ("toxic-direction-neurons", "10 mid neurons damped (scale 0)", 10),
])
def test_profile_recipe_in_a_fresh_process(saved, tmp_path, name, printed, changed):
    out = tmp_path / "s.safetensors"
    rc, stdout, stderr = _profile(saved, out, "--recipe", name)
    assert rc == 0, stderr[-3000:]
    assert f"recipe {name}:" in stdout and "sets sites=" in stdout and printed in stdout
    scales = load_scales(out)
    meta = scales.metadata
    assert meta["recipe"] == name and meta["method"] == name.replace("-", "_")
    assert scales.changed() == changed and meta["n_toxic"] == "24"
    if name == "safe-vectors":
        assert meta["top_k"] == "10" and meta["hold_at"] == "10.0"
        assert len(json.loads(meta["neurons"])) == 10 and int(meta["toxic_tokens"]) >= 8
    else:
        assert float(meta["probe_accuracy"]) == 1.0  # the planted classes separate
    if name == "toxic-direction":
        assert meta["layers"] == "1" and list(scales.shifts) == ["model.layers.1.mlp.down_proj"]


def test_profile_recipe_options_the_user_sets_win(saved, tmp_path):
    out = tmp_path / "s.safetensors"
    rc, stdout, stderr = _profile(saved, out, "--recipe", "safe-vectors", "--top-k", "3",
                                  "--hold-at", "4", "--strength", "0.5")
    assert rc == 0, stderr[-3000:]
    assert "yours kept: --top-k 3, --hold-at 4.0" in stdout
    scales = load_scales(out)
    assert scales.changed() == 3 and scales.metadata["strength"] == "0.5"
    site, neuron = next((s, int(i)) for s in scales.sites()
                        for i in (scales.scales[s] != 1).nonzero().flatten())
    assert float(scales.scales[site][neuron]) == 0.5  # (1 - s) m + s a at s = 0.5
    rc, stdout, stderr = _profile(saved, out, "--recipe", "toxic-direction", "--last-layers",
                                  "2", "--force")
    assert rc == 0, stderr[-3000:]
    assert load_scales(out).metadata["layers"] == "0,1"


def test_profile_recipe_bad_options_are_refused(saved, tmp_path):
    out = tmp_path / "s.safetensors"
    common = ["profile", "--model", saved / "model", "--data", saved / "own.jsonl", "--out",
              out, "--quiet", "--no-plot"]
    for more, message in (
            (["--recipe", "toxic-direction", "--top-k", "3"],
             "top_k (--top-k) is for the neuron methods, not toxic_direction"),
            (["--recipe", "safe-vectors", "--sites", "up"],
             "method safe_vectors works on the mid sites; sites (--sites) is up"),
            (["--recipe", "safe-vectors", "--hold-at", "-1"], "must be a positive number"),
            (["--method", "aura", "--hold-at", "3"], "hold_at (--hold-at) is for method "
             "safe_vectors, not aura"),
            (["--recipe", "toxic-direction", "--expertise-out", tmp_path / "e.safetensors"],
             "method toxic_direction measures no AUROC")):
        refused([*common, *more], message, tmp_path, env=BEFORE_LOAD)
    no_response = tmp_path / "rows.jsonl"
    no_response.write_text('{"text": "word1 tox1", "label": 1}\n{"text": "word2", "label": 0}\n')
    refused(["profile", "--model", saved / "model", "--data", no_response, "--out", out,
             "--recipe", "toxic-direction-neurons"], "row 1 has no `response`", tmp_path,
            env=BEFORE_LOAD)
    # the layer count is the model's: refused after it loads, nothing written
    refused([*common, "--recipe", "toxic-direction", "--last-layers", "5"],
            "last_layers (--last-layers) is 5; the model has 2 layers", tmp_path)
