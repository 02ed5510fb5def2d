"""AcT's transport maps (mean_ot, gaussian_ot, linear_ot) from pooled responses, class
balancing, amplifying AurA scales, and `sgm-ext profile --method ...`; the expected maps are
written here with numpy from the paper's formulas."""
import json

import numpy as np
import pytest
import torch
from _profile_models import planted_llama, planted_rows, tokenizer

from sgm_ext import profile as P
from sgm_ext.cli import main
from sgm_ext.patching.scales import load_scales


def _responses(gen, n_toxic=30, n_non_toxic=30, n=9):
    """Two sites of random responses with class-dependent means and spreads; neuron 0 of the
    first site is constant in the toxic class (no spread to rescale)."""
    labels = torch.tensor([1] * n_toxic + [0] * n_non_toxic)
    perm = torch.randperm(len(labels), generator=gen)
    labels = labels[perm]
    tensors = {}
    for k, site in enumerate(["m.layers.0.mlp.mid", "m.layers.1.mlp.down_proj"]):
        z = torch.randn(len(labels), n + k, generator=gen, dtype=torch.float64)
        z = torch.where(labels[:, None].bool(), 2.0 * z + 1.5, 0.5 * z - 0.3)
        if k == 0:
            z[labels.bool(), 0] = 0.7
        tensors[site] = z.float()
    return P.Responses.from_tensors(tensors, labels, {"pooling": "mean"})


def _numpy_maps(z, labels, method):
    """(scale, shift) per neuron from the formulas, float64 numpy."""
    z = z.double().numpy()
    t, n = z[labels == 1], z[labels == 0]
    if method == "linear_ot":
        scale, shift = [], []
        for j in range(z.shape[1]):
            x, y = np.sort(t[:, j]), np.sort(n[:, j])
            if np.ptp(x) == 0:
                scale.append(1.0)
                shift.append(y.mean() - x.mean())
            else:
                w, b = np.polyfit(x, y, 1)  # least squares on the sorted (transport) pairs
                scale.append(w)
                shift.append(b)
        return np.array(scale), np.array(shift)
    sd_t, sd_n = t.std(0, ddof=1), n.std(0, ddof=1)
    moved = (sd_t > 1e-4) & (sd_n > 1e-4)
    s = np.where(moved, sd_n / np.where(moved, sd_t, 1), 1.0) if method == "gaussian_ot" \
        else np.ones(z.shape[1])
    return s, np.where(moved, n.mean(0) - s * t.mean(0), 0.0)


@pytest.mark.parametrize("method", ["mean_ot", "gaussian_ot", "linear_ot"])
@pytest.mark.parametrize("strength", [1.0, 0.4])
def test_transport_maps_match_the_formulas(method, strength, gen):
    r = _responses(gen)
    maps = P.transport_maps(r, method, strength=strength)
    labels = r.labels.numpy()
    for site in r:
        s, b = _numpy_maps(r[site], labels, method)
        s_eff = strength * s + (1 - strength)
        if method == "mean_ot":
            assert site not in maps.scales  # shifts only
        else:
            np.testing.assert_allclose(maps.scales[site].numpy(), s_eff, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(maps.shifts[site].numpy(), strength * b, rtol=1e-5,
                                   atol=1e-6)
    assert maps.metadata["method"] == method and maps.metadata["n_toxic"] == "30"
    # a constant toxic neuron: the Gaussian maps leave it alone, linear_ot shifts its mean
    mid = maps.shifts["m.layers.0.mlp.mid"]
    if method == "linear_ot":
        assert maps.scales["m.layers.0.mlp.mid"][0] == 1.0 and mid[0] != 0
    else:
        assert mid[0] == 0


def test_a_transported_toxic_class_has_the_non_toxic_statistics(gen):
    # what the maps are for: the toxic responses after the full map look non-toxic
    r = _responses(gen)
    labels = r.labels.bool()
    for method in ("mean_ot", "gaussian_ot"):
        maps = P.transport_maps(r, method)
        site = "m.layers.1.mlp.down_proj"
        z = r[site].double()
        s = maps.scales[site].double() if site in maps.scales else 1.0
        moved = z[labels] * s + maps.shifts[site].double()
        torch.testing.assert_close(moved.mean(0), z[~labels].mean(0), atol=1e-5, rtol=1e-5)
        if method == "gaussian_ot":
            torch.testing.assert_close(moved.std(0), z[~labels].std(0), atol=1e-5, rtol=1e-5)


def test_linear_ot_needs_equal_counts_and_balance_gives_them(gen):
    r = _responses(gen, n_toxic=20, n_non_toxic=33)
    with pytest.raises(ValueError, match="20 toxic and 33 non-toxic rows.*--balanced"):
        P.transport_maps(r, "linear_ot")
    b = P.balance(r, seed=3)
    labels, kept = r.labels, b.labels
    assert int(kept.sum()) == int((kept == 0).sum()) == 20
    # every toxic row kept, in data order; the non-toxic ones a subset, in data order
    site = "m.layers.0.mlp.mid"
    rows = [int((r[site] == row).all(1).nonzero()[0]) for row in b[site]]
    assert rows == sorted(rows) and all(labels[i] == kept[k] for k, i in enumerate(rows))
    assert {i for i in rows if labels[i] == 1} == set(labels.nonzero().flatten().tolist())
    assert torch.equal(P.balance(r, seed=3)[site], b[site])  # seeded
    assert not torch.equal(P.balance(r, seed=4)[site], b[site])
    P.transport_maps(b, "linear_ot")  # now fits


def test_unknown_method_and_one_class_are_refused(gen):
    r = _responses(gen)
    with pytest.raises(ValueError, match="transport method must be one of"):
        P.transport_maps(r, "affine")
    one = P.Responses.from_tensors({"a.mid": torch.randn(4, 3)}, torch.ones(4))
    with pytest.raises(ValueError, match="both labels"):
        P.transport_maps(one, "mean_ot")


def test_aura_with_threshold_0_3_amplifies_only_when_allowed():
    # ml-aura-vl's rule: AurA's alpha for every neuron with AUROC above 0.3, so the ones
    # between 0.3 and 0.5 get alpha = 1 - 2 (AUROC - 0.5) > 1
    auroc = torch.tensor([0.2, 0.35, 0.5, 0.8], dtype=torch.float64)
    e = P.Expertise({"m.layers.0.mlp.mid": auroc})
    with pytest.raises(ValueError, match=r"\]\[1\] is 1.29.*allow_amplify"):
        e.to_scales(threshold=0.3, selection="threshold")
    s = e.to_scales(threshold=0.3, selection="threshold", allow_amplify=True)
    expected = torch.tensor([1.0, 1.3, 1.0, 0.4])
    torch.testing.assert_close(s["m.layers.0.mlp.mid"], expected)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("act")
    model, tok = planted_llama(), tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = planted_rows(n_per_class=12)[:-3]  # 11 toxic, 10 non-toxic
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, tok, rows


@pytest.mark.parametrize("method", ["gaussian_ot", "linear_ot"])
def test_profile_command_writes_the_transport_maps(saved, method, capsys):
    root, model, tok, rows = saved
    out = root / f"{method}.safetensors"
    args = ["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
            "--out", str(out), "--method", method, "--sites", "mid", "down",
            "--batch-size", "5", "--quiet", "--no-plot"]
    if method == "linear_ot":
        assert main(args) == 2
        err = capsys.readouterr().err  # refused before the model loads (issue 27, item 6)
        assert "needs as many toxic as non-toxic rows, got 11 and 10; pass --balanced" in err
    assert main(args + ["--balanced"]) == 0
    out_text = capsys.readouterr().out
    assert f"({method}: " in out_text and "from 20 samples (10 toxic)" in out_text
    got = load_scales(out)
    responses = P.balance(P.collect(model, rows, processor=tok, batch_size=5,
                                    sites=["mid", "down"]))
    assert set(got.shifts) == set(responses.neurons) and len(got.shifts) == 4
    for site in responses:
        s, b = _numpy_maps(responses[site], responses.labels.numpy(), method)
        np.testing.assert_allclose(got.scales[site].numpy(), s, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.shifts[site].numpy(), b, rtol=1e-4, atol=1e-5)
    assert got.metadata["method"] == method and got.metadata["balanced"] == "True"


def test_profile_top_k_keeps_the_maps_of_the_most_separated_neurons(saved, capsys):
    root, model, tok, rows = saved
    out = root / "top.safetensors"
    assert main(["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
                 "--out", str(out), "--method", "linear_ot", "--balanced", "--top-k", "7",
                 "--sites", "mid", "down", "--batch-size", "5", "--quiet", "--no-plot"]) == 0
    assert "the maps of the top 7 neurons only: 7 neurons moved" in capsys.readouterr().out
    got = load_scales(out)
    responses = P.balance(P.collect(model, rows, processor=tok, batch_size=5,
                                    sites=["mid", "down"]))
    labels = responses.labels.numpy().astype(bool)
    # Cohen's d per neuron over every site (numpy), the 7 largest keep their maps
    d = {}
    for site in responses:
        z = responses[site].numpy().astype(np.float64)
        sd = np.sqrt((z[labels].var(0, ddof=1) + z[~labels].var(0, ddof=1)) / 2)
        d[site] = np.where(sd > 0, np.abs(z[labels].mean(0) - z[~labels].mean(0)) /
                           np.where(sd > 0, sd, 1), 0)
    cut = np.sort(np.concatenate(list(d.values())))[-7]
    for site in responses:
        keep = d[site] >= cut
        s, b = _numpy_maps(responses[site], responses.labels.numpy(), "linear_ot")
        np.testing.assert_allclose(got.scales[site].numpy(), np.where(keep, s, 1.0),
                                   rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got.shifts[site].numpy(), np.where(keep, b, 0.0),
                                   rtol=1e-4, atol=1e-5)
    assert got.changed() == 7 and got.metadata["top_k"] == "7"


def test_inspect_shows_shifts_and_accepts_transport_scales_above_1(tmp_path, gen, capsys):
    path = tmp_path / "maps.safetensors"
    P.transport_maps(_responses(gen), "gaussian_ot").save(path)
    assert main(["inspect", str(path)]) == 0  # std ratios above 1 are no error here
    text = capsys.readouterr().out
    assert "site (shifts)" in text and "m.layers.1.mlp.down_proj" in text
    P.transport_maps(_responses(gen), "mean_ot").save(path)  # shifts only
    assert main(["inspect", str(path)]) == 0
    assert "scales (all sites)" not in capsys.readouterr().out
