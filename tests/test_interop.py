"""Readers / writers of apple/ml-aura and apple/ml-act intervention files, on files written
here in those layouts."""
import pickle

import pytest
import torch
from patch_models import build

import sgm_ext
from sgm_ext.patching import interop


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


def test_from_act_converts_auroc_with_the_runs_strength(tmp_path):
    # ml-act's AurA state holds the AUROC only; the strength is the hook run's setting
    auroc = torch.tensor([0.2, 0.5, 0.5001, 0.75, 1.0])
    torch.save({"auroc": auroc}, tmp_path / "model.layers.0.mlp.up_proj:0.statedict")
    scales = interop.from_act(tmp_path, strength=0.5)
    # alpha = 1 - 2 (auroc - 0.5) above 0.5, else 1; then 1 - strength (1 - alpha).
    expected = []
    for a in auroc.tolist():
        alpha = 1 - 2 * (a - 0.5) if a > 0.5 else 1.0
        expected.append(1 - 0.5 * (1 - alpha))
    got = scales["model.layers.0.mlp.up_proj"]
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)
    assert got[0] == 1.0 and got[1] == 1.0 and abs(got[-1] - 0.5) < 1e-6
    full = interop.from_act(tmp_path)["model.layers.0.mlp.up_proj"]
    assert abs(full[-1]) < 1e-6 and scales.metadata["strength"] == "0.5"


# ml-act's transport hooks (act/hooks/transport.py), as their state files hold them: a
# Gaussian one per module for mean_ot and gaussian_ot, a linear one for linear_ot; the source
# quantiles beside the maps, and quantiles_src [-1e6, 1e6] for the "q_all" setting.

def _quantiles(n, g):
    lo, hi = torch.randn(n, generator=g) - 3, torch.randn(n, generator=g) + 3
    return {"q_0_100": [lo, hi], "q_1_99": [lo * 0.9, hi * 0.9]}


def _write_act_transport(directory, method, sizes, g, quantiles_src=(-1e6, 1e6)):
    """{module: state} written as <module>:0.statedict in ml-act's layout; std 0 at neuron 1
    of each Gaussian state (a neuron ml-act leaves alone)."""
    directory.mkdir(parents=True, exist_ok=True)
    states = {}
    for name, n in sizes.items():
        if method == "linear_ot":
            state = {"net.w1": (0.5 + torch.rand(1, n, generator=g)),
                     "net.b1": torch.randn(1, n, generator=g) * 0.3}
        else:
            state = {"mu1": torch.randn(n, generator=g) * 0.3,
                     "mu2": torch.randn(n, generator=g) * 0.3,
                     "std1": 0.5 + torch.rand(n, generator=g),
                     "std2": 0.5 + torch.rand(n, generator=g)}
            state["std1"][1] = 0.0
        state.update(quantiles_dict_src=_quantiles(n, g), quantiles_src=list(quantiles_src))
        torch.save(state, directory / f"{name}:0.statedict")
        states[name] = state
    return states


def _act_hook(state, method, strength):
    """ml-act's transport forward on a module output z [B, T, N], from the paper's formula:
    z' on the transported neurons, then strength z' + (1 - strength) z."""
    def hook(module, args, z):
        if method == "linear_ot":
            z_ot = z * state["net.w1"] + state["net.b1"]
            return strength * z_ot + (1 - strength) * z
        mask = (state["std1"] > 1e-4) & (state["std2"] > 1e-4)
        mu1, mu2 = state["mu1"][mask], state["mu2"][mask]
        zm = z[..., mask]
        if method == "mean_ot":
            z_ot = zm - mu1 + mu2
        else:
            z_ot = (state["std2"][mask] / state["std1"][mask]) * (zm - mu1) + mu2
        out = z.clone()
        out[..., mask] = strength * z_ot + (1 - strength) * zm
        return out
    return hook


@pytest.mark.parametrize("method", ["mean_ot", "gaussian_ot", "linear_ot"])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_from_act_transport_files_patch_as_ml_acts_hooks(tmp_path, method, strength):
    model, inputs = build("llama")
    g = torch.Generator().manual_seed(11)
    sizes = {"model.layers.0.mlp.down_proj": 32, "model.layers.1.mlp.up_proj": 48}
    states = _write_act_transport(tmp_path / method, method, sizes, g)
    scales = interop.from_act(tmp_path / method, method=method)
    assert set(scales.shifts) == set(sizes)
    assert set(scales.scales) == (set() if method == "mean_ot" else set(sizes))
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_act_hook(state, method, strength))
               for name, state in states.items()]
    with torch.no_grad():
        ref = model(**inputs).logits
    for h in handles:
        h.remove()
    with torch.no_grad():
        base = model(**inputs).logits
    assert ((ref - base).abs().max() / base.abs().max()) > 1e-3
    for mode in ("hook", "fused", "fold"):
        with sgm_ext.patched(model, scales, mode=mode, strength=strength,
                             allow_amplify=True), torch.no_grad():
            got = model(**inputs).logits
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5, mode
        if mode == "hook" and method == "linear_ot" and strength == 1.0:
            assert torch.equal(got, ref)  # the same math: z * w1 + b1


def test_from_act_refuses_quantile_masks_and_missing_buffers(tmp_path):
    g = torch.Generator().manual_seed(12)
    q = _quantiles(32, g)["q_1_99"]
    _write_act_transport(tmp_path / "q", "gaussian_ot", {"model.layers.0.mlp.down_proj": 32}, g,
                         quantiles_src=[t.view(1, -1) for t in q])
    with pytest.raises(ValueError, match="quantiles_src is list: ml-act transports only"):
        interop.from_act(tmp_path / "q", method="gaussian_ot")
    (tmp_path / "m").mkdir()
    torch.save({"mu1": torch.zeros(3), "std1": torch.ones(3)}, tmp_path / "m" / "a.statedict")
    with pytest.raises(ValueError, match="missing mu2, std2"):
        interop.from_act(tmp_path / "m", method="mean_ot")
    with pytest.raises(ValueError, match="method must be one of"):
        interop.from_act(tmp_path / "m", method="steer")


def test_to_act_writes_auroc_files_that_ml_acts_rule_reads_back(tmp_path):
    model, inputs = build("llama")
    g = torch.Generator().manual_seed(13)
    s = torch.rand(48, generator=g)
    s[:5] = 1.0
    scales = sgm_ext.ScaleSet({"model.layers.1.mlp.up_proj": s})
    (path,) = interop.to_act(scales, tmp_path)
    assert path.name == "model.layers.1.mlp.up_proj.statedict"
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["auroc"] and raw["auroc"].shape == (48,)
    auroc = raw["auroc"]
    # ml-act's AurA rule (act/hooks/aura_hook.py): 1 - 2 (auroc - 0.5) where auroc > 0.5
    alpha = torch.where(auroc > 0.5, 1 - 2 * (auroc - 0.5), torch.ones_like(auroc))
    torch.testing.assert_close(alpha, s, atol=1e-6, rtol=0)
    assert torch.equal(alpha[:5], torch.ones(5))
    back = interop.from_act(tmp_path)
    torch.testing.assert_close(back["model.layers.1.mlp.up_proj"], s, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("scales", "message"), [
    (sgm_ext.ScaleSet({}, shifts={"m.layers.0.mlp.down_proj": torch.ones(3)}), "has shifts"),
    (sgm_ext.ScaleSet({"m.layers.0.mlp.up_proj": torch.tensor([0.5, 1.2])}),
     r"\]\[1\] is 1.2.*\[0, 1\]"),
    (sgm_ext.ScaleSet({"m.layers.0.mlp.mid": torch.ones(3)}), "is an MLP's product"),
])
def test_to_act_refuses_what_its_files_cannot_hold(tmp_path, scales, message):
    with pytest.raises(ValueError, match=message):
        interop.to_act(scales, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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


# ml-act's layer-norm hooks (its model configs' `layernorm` / `post_layernorm` module lists):
# the state file of the norm whose output an MLP receives is that MLP's input site.

@pytest.mark.parametrize("method", ["linear_ot", "gaussian_ot"])
def test_from_act_maps_the_norm_that_feeds_the_mlp_onto_its_input_site(tmp_path, method):
    model, inputs = build("llama")
    g = torch.Generator().manual_seed(14)
    sizes = {f"model.layers.{i}.post_attention_layernorm": 32 for i in (0, 1)}
    states = _write_act_transport(tmp_path / method, method, sizes, g)
    scales = interop.from_act(tmp_path / method, model=model, method=method)
    assert set(scales.shifts) == {"model.layers.0.mlp.input", "model.layers.1.mlp.input"}
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(_act_hook(state, method, 0.8))
               for name, state in states.items()]  # ml-act's hook on the norm's output
    with torch.no_grad():
        ref = model(**inputs).logits
    for h in handles:
        h.remove()
    for mode in ("hook", "fused", "fold"):
        with sgm_ext.patched(model, scales, mode=mode, strength=0.8,
                             allow_amplify=True), torch.no_grad():
            got = model(**inputs).logits
        assert ((got - ref).abs().max() / ref.abs().max()) < 1e-5, mode
    with pytest.raises(ValueError, match=r"post_attention_layernorm:0\.statedict: ml-act "
                       r"hooked the layer norm model\.layers\.0\.post_attention_layernorm; "
                       r"pass model="):
        interop.from_act(tmp_path / method, method=method)


def test_gemma_norms_map_only_where_they_feed_the_mlp(tmp_path):
    """Gemma 3's MLP reads pre_feedforward_layernorm; its post_attention_layernorm (on the
    attention's output, before the residual add) is no MLP's input: refused, naming the
    file."""
    model, _ = build("gemma3")
    layer = "model.language_model.layers.1"
    (tmp_path / "pre").mkdir()
    torch.save({"auroc": torch.rand(32)}, tmp_path / "pre" / f"{layer}.pre_feedforward_"
               "layernorm:0.statedict")
    scales = interop.from_act(tmp_path / "pre", model=model)
    assert list(scales) == [f"{layer}.mlp.input"]
    (tmp_path / "post").mkdir()
    torch.save({"auroc": torch.rand(32)}, tmp_path / "post" / f"{layer}.post_attention_"
               "layernorm:0.statedict")
    with pytest.raises(ValueError, match=r"post_attention_layernorm:0\.statedict: the output "
                       r"of model\.language_model\.layers\.1\.post_attention_layernorm is no "
                       r"MLP's input"):
        interop.from_act(tmp_path / "post", model=model)


def test_input_sites_round_trip_as_the_norms_files(tmp_path):
    model, _ = build("llama")
    g = torch.Generator().manual_seed(15)
    s = torch.rand(32, generator=g)
    scales = sgm_ext.ScaleSet({"model.layers.1.mlp.input": s})
    with pytest.raises(ValueError, match=r"site 'model\.layers\.1\.mlp\.input' is an MLP's "
                       r"input, not a module output; pass model="):
        interop.to_act(scales, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    (path,) = interop.to_act(scales, tmp_path / "act", model=model)
    assert path.name == "model.layers.1.post_attention_layernorm.statedict"
    back = interop.from_act(tmp_path / "act", model=model)
    torch.testing.assert_close(back["model.layers.1.mlp.input"], s, atol=1e-6, rtol=0)
    (path,) = interop.to_aura(scales, tmp_path / "aura", model=model)
    assert path.name == "model.layers.1.post_attention_layernorm.statedict"
    assert torch.equal(interop.from_aura(tmp_path / "aura", model=model)[
        "model.layers.1.mlp.input"], s)
