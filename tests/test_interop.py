"""Readers / writers of apple/ml-aura and apple/ml-act intervention files, on files written
here in those layouts."""
import pickle

import pytest
import torch
from patch_models import build

import sgm_ext
from sgm_ext import interop


def _write_aura(directory, alphas):
    """ml-aura's layout: <dir>/<module name>.statedict = torch.save({"alpha": (1, 1, N)})."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, a in alphas.items():
        torch.save({"alpha": a.reshape(1, 1, -1)}, directory / f"{name}.statedict")


def test_from_aura_reads_alpha_per_module(tmp_path):
    alphas = {"model.layers.0.mlp.up_proj": torch.rand(48),
              "model.layers.1.mlp.down_proj": torch.rand(32)}
    _write_aura(tmp_path / "aura-toxicity-max" / "tiny-llama", alphas)
    scales = interop.from_aura(tmp_path / "aura-toxicity-max")  # finds the one model folder
    assert set(scales) == set(alphas)
    for name, a in alphas.items():
        assert torch.equal(scales[name], a)
        assert scales[name].dtype == torch.float32 and scales[name].dim() == 1


def test_to_aura_round_trip_and_patch(tmp_path):
    model, inputs = build("llama")
    g = torch.Generator().manual_seed(0)
    scales = sgm_ext.ScaleSet({"model.layers.0.mlp.up_proj": torch.rand(48, generator=g),
                               "model.layers.1.mlp.gate_proj": torch.rand(48, generator=g)})
    paths = interop.to_aura(scales, tmp_path)
    assert sorted(p.name for p in paths) == ["model.layers.0.mlp.up_proj.statedict",
                                             "model.layers.1.mlp.gate_proj.statedict"]
    raw = torch.load(paths[0], weights_only=True)
    assert list(raw) == ["alpha"] and raw["alpha"].shape == (1, 1, 48)
    back = interop.from_aura(tmp_path)
    for site in scales:
        assert torch.equal(back[site], scales[site])
    # What AurA does with the file: multiply the module's output by alpha.
    up = model.model.layers[0].mlp.up_proj
    h = up.register_forward_hook(lambda m, a, out: out * raw["alpha"])
    g2 = model.model.layers[1].mlp.gate_proj
    alpha2 = torch.load(paths[1], weights_only=True)["alpha"]
    h2 = g2.register_forward_hook(lambda m, a, out: out * alpha2)
    with torch.no_grad():
        ref = model(**inputs).logits
    h.remove()
    h2.remove()
    with sgm_ext.patched(model, back), torch.no_grad():
        got = model(**inputs).logits
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5


def test_to_aura_refuses_mid_sites(tmp_path):
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.mid' is an MLP's product"):
        interop.to_aura({"model.layers.0.mlp.mid": torch.ones(4)}, tmp_path)
    assert not list(tmp_path.iterdir())


def test_from_aura_maps_legacy_llava_paths(tmp_path):
    """ml-aura-vl hooked transformers 4.x LLaVA paths (language_model.model.layers...)."""
    model, _ = build("llava")
    a = torch.rand(48)
    _write_aura(tmp_path, {"language_model.model.layers.1.mlp.up_proj": a})
    plain = interop.from_aura(tmp_path)
    assert list(plain) == ["language_model.model.layers.1.mlp.up_proj"]
    mapped = interop.from_aura(tmp_path, model=model)
    assert list(mapped) == ["model.language_model.layers.1.mlp.up_proj"]
    assert torch.equal(mapped["model.language_model.layers.1.mlp.up_proj"], a)
    sgm_ext.patch(model, mapped).remove()  # resolves in the model


def test_from_act_converts_auroc_and_strength(tmp_path):
    auroc = torch.tensor([0.2, 0.5, 0.5001, 0.75, 1.0])
    torch.save({"auroc": auroc, "strength": torch.tensor(0.5)},
               tmp_path / "model.layers.0.mlp.up_proj:0.statedict")
    scales = interop.from_act(tmp_path)
    # alpha = 1 - 2 (auroc - 0.5) above 0.5, else 1; then 1 - strength (1 - alpha).
    expected = []
    for a in auroc.tolist():
        alpha = 1 - 2 * (a - 0.5) if a > 0.5 else 1.0
        expected.append(1 - 0.5 * (1 - alpha))
    got = scales["model.layers.0.mlp.up_proj"]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert got[0] == 1.0 and got[1] == 1.0 and abs(got[-1] - 0.5) < 1e-6


def test_readers_never_unpickle(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    with open(tmp_path / "x.mlp.up_proj.statedict", "wb") as f:
        pickle.dump({"alpha": Evil()}, f)
    with pytest.raises(pickle.UnpicklingError):
        interop.from_aura(tmp_path)


def test_reader_errors_name_the_file(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "a.mlp.up_proj.statedict")
    with pytest.raises(ValueError, match=r"a\.mlp\.up_proj\.statedict: expected .*'alpha'"):
        interop.from_aura(tmp_path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: no .statedict files"):
        interop.from_aura(tmp_path / "empty")  # no files, and no single model folder
