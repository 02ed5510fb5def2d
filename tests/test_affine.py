"""Affine sites (y = s_eff x + strength * b): the scale file's shifts, and every patch mode
against forward hooks written here from the formula."""

import pytest
import torch
from patch_models import build, logits, param_hash, python_calls, rel
from safetensors.torch import save_file

import sgm_ext
from sgm_ext.patching.registry import find_mlps
from sgm_ext.patching.scales import ScaleSet

# Where each site kind sits, written out: (sub-module, the site is its input).
WHERE = {"gate": ("gate_proj", False), "up": ("up_proj", False), "down": ("down_proj", False),
         "gate_up": ("gate_up_proj", False), "fc1": ("fc1", False)}
MODELS = ["llama", "mistral", "phi3", "llava"]  # bias / no bias, packed gate_up, a CLIP tower


def _where(info, kind):
    if kind == "mid":  # the input of the down projection
        return ("down_proj" if "down" in info.sites().values() else "fc2"), True
    if kind == "input":  # the MLP's own input: a pre-hook on the MLP module
        return "", True
    return WHERE[kind]


def _affine(model, seed=0, only_text=False, kinds=None, scales=True):
    """Random scales (some 1) and shifts (some 0) on every site (or those of `kinds`)."""
    g = torch.Generator().manual_seed(seed)
    sc, sh = {}, {}
    for path, info in find_mlps(model).items():
        if only_text and "vision" in path:
            continue
        for site, kind in info.sites().items():
            if kinds is not None and kind not in kinds:
                continue
            n = info.site_size(kind)
            if scales:
                s = torch.rand(n, generator=g) * 0.9 + 0.1
                s[torch.rand(n, generator=g) < 0.3] = 1.0
                sc[site] = s
            b = torch.randn(n, generator=g) * 0.5
            b[torch.rand(n, generator=g) < 0.3] = 0.0
            sh[site] = b
    return ScaleSet(sc, shifts=sh)


def _hand_hooks(model, scaleset, strength):
    """Forward hooks from the formula, y = (strength s + 1 - strength) x + strength b, per
    site; strength a float or a [B] tensor (one per sequence). Returns the hook handles."""
    handles = []
    modules = dict(model.named_modules())
    for path, info in find_mlps(model).items():
        for site, kind in info.sites().items():
            s, b = scaleset.scales.get(site), scaleset.shifts.get(site)
            if s is None and b is None:
                continue
            attr, is_input = _where(info, kind)

            def change(x, s=s, b=b):
                lam = strength
                if isinstance(lam, torch.Tensor):
                    lam = lam.view(-1, *([1] * (x.dim() - 1)))
                if s is not None:
                    x = x * (lam * s + (1 - lam))
                return x if b is None else x + lam * b

            sub = modules[f"{path}.{attr}" if attr else path]
            if is_input:
                handles.append(sub.register_forward_pre_hook(
                    lambda m, args, f=change: (f(args[0]), *args[1:])))
            else:
                handles.append(sub.register_forward_hook(lambda m, a, out, f=change: f(out)))
    return handles


def _by_hand(model, inputs, scaleset, strength):
    handles = _hand_hooks(model, scaleset, strength)
    try:
        return logits(model, inputs)
    finally:
        for h in handles:
            h.remove()


# ---------------------------------------------------------------- the file format

def test_shifts_round_trip_through_the_file(tmp_path):
    sc = {"m.layers.0.mlp.up_proj": torch.rand(5), "m.layers.0.mlp.mid": torch.rand(5)}
    sh = {"m.layers.0.mlp.mid": torch.randn(5), "m.layers.0.mlp.down_proj": torch.randn(3)}
    path = ScaleSet(sc, {"method": "mean_ot"}, shifts=sh).save(tmp_path / "s.safetensors")
    got = sgm_ext.load_scales(path)
    assert got.metadata["format_version"] == "2" and got.metadata["method"] == "mean_ot"
    assert set(got.scales) == set(sc) and set(got.shifts) == set(sh)
    for k in sc:
        assert torch.equal(got.scales[k], sc[k])
    for k in sh:
        assert torch.equal(got.shifts[k], sh[k])
    assert got.sites() == ["m.layers.0.mlp.up_proj", "m.layers.0.mlp.mid",
                           "m.layers.0.mlp.down_proj"]
    assert repr(got).startswith("ScaleSet(3 sites, 13 neurons, ")
    assert "8 shifted on 2 sites" in repr(got)


def test_a_format_1_file_is_still_read(tmp_path):
    path = tmp_path / "v1.safetensors"
    s = torch.rand(7)
    save_file({"m.layers.1.mlp.up_proj": s}, path,
              metadata={"format_version": "1", "kind": "sgm-ext scales", "method": "aura"})
    got = sgm_ext.load_scales(path)
    assert torch.equal(got["m.layers.1.mlp.up_proj"], s) and got.shifts == {}
    # a shift key is not a version 1 site: named, not read as a scale
    save_file({"m.up_proj:shift": s}, path, metadata={"format_version": "1"})
    with pytest.raises(ValueError, match="'m.up_proj:shift'.*format version 1"):
        sgm_ext.load_scales(path)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: ScaleSet({}, shifts={"a.b": torch.zeros(2, 3)}), r"shifts\['a.b'\] must be 1-D"),
    (lambda: ScaleSet({"a.b": torch.ones(3)}, shifts={"a.b": torch.zeros(4)}),
     r"shifts\['a.b'\] has 4 values, its scales 3"),
    (lambda: ScaleSet({}, shifts={"a.b": torch.tensor([0.0, float("nan")])}).validate(),
     r"shifts\['a.b'\]\[1\] is nan: shifts must be finite"),
    (lambda: ScaleSet({}, shifts={"a.b:shift": torch.zeros(2)}), "without ':shift'"),
])
def test_bad_shifts_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("edit", "message"), [
    (lambda sh, site: sh.__setitem__(site, torch.zeros(3)), "has 3 values, the model's"),
    (lambda sh, site: sh[site].__setitem__(2, float("inf")), r"\]\[2\] is inf"),
    (lambda sh, site: sh.__setitem__("model.layers.0.mlp.upp_proj", torch.zeros(48)),
     "unknown site 'model.layers.0.mlp.upp_proj'"),
])
def test_bad_shifts_leave_the_model_untouched(edit, message):
    model, inputs = build("mistral")
    ss = _affine(model)
    site = next(iter(ss.shifts))
    edit(ss.shifts, site)
    before, base = param_hash(model), logits(model, inputs)
    for mode in ("fused", "fold", "hook"):
        with pytest.raises(ValueError, match=message):
            sgm_ext.patch(model, ss, mode=mode)
        assert param_hash(model) == before and torch.equal(logits(model, inputs), base)


# ---------------------------------------------------------------- the patch modes

@pytest.mark.parametrize("name", MODELS)
def test_hook_mode_is_the_formula_bit_for_bit(name):
    model, inputs = build(name)
    ss = _affine(model)
    base = logits(model, inputs)
    for strength in (1.0, 0.35):
        want = _by_hand(model, inputs, ss, strength)
        assert rel(want, base) > 1e-3  # the shifts do change the output
        with sgm_ext.patched(model, ss, mode="hook", strength=strength):
            assert torch.equal(logits(model, inputs), want), strength


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["fused", "fold"])
def test_fused_and_fold_match_the_formula(name, mode):
    model, inputs = build(name)
    ss = _affine(model, seed=1)
    for strength in (1.0, 0.6):
        want = _by_hand(model, inputs, ss, strength)
        with sgm_ext.patched(model, ss, mode=mode, strength=strength):
            assert rel(logits(model, inputs), want) < 1e-5, strength


@pytest.mark.parametrize("kinds", [{"mid"}, {"down"}, {"gate"}, {"up"}, {"mid", "up"},
                                   {"input"}, {"input", "gate", "mid"}],
                         ids=lambda k: "+".join(sorted(k)))
@pytest.mark.parametrize("scales", [True, False], ids=["scale+shift", "shift"])
def test_each_site_kind_alone_matches_the_formula(kinds, scales):
    model, inputs = build("llama")
    ss = _affine(model, seed=2, kinds=kinds, scales=scales)
    want = _by_hand(model, inputs, ss, 0.8)
    for mode in ("fused", "fold", "hook"):
        with sgm_ext.patched(model, ss, mode=mode, strength=0.8):
            assert rel(logits(model, inputs), want) < 1e-5, mode


@pytest.mark.parametrize("name", ["mistral", "phi3"])
@pytest.mark.parametrize("mode", ["fused", "hook"])
def test_per_sequence_strength_with_shifts(name, mode):
    model, inputs = build(name)
    ss = _affine(model, seed=3, only_text=True)
    strength = torch.tensor([0.25, 1.0])
    want = _by_hand(model, inputs, ss, strength)
    with sgm_ext.patched(model, ss, mode=mode, strength=strength):
        assert rel(logits(model, inputs), want) < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral", "llava"])
def test_strength_zero_and_unpatch_are_exact_with_shifts(name):
    model, inputs = build(name)
    ss = _affine(model, seed=4)
    base, before = logits(model, inputs), param_hash(model)
    biases = {p: m.bias is None for p, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    for mode in ("fused", "fold", "hook"):
        handle = sgm_ext.patch(model, ss, mode=mode, strength=0.0)
        assert torch.equal(logits(model, inputs), base), mode
        handle.set_strength(1.0)
        assert rel(logits(model, inputs), base) > 1e-3, mode
        handle.remove()
        assert torch.equal(logits(model, inputs), base), mode
        assert param_hash(model) == before, mode
        assert biases == {p: m.bias is None for p, m in model.named_modules()
                          if isinstance(m, torch.nn.Linear)}, mode


def test_fold_creates_a_bias_and_refolds_with_the_strength():
    model, inputs = build("mistral")  # Linears without bias
    ss = _affine(model, seed=5, kinds={"mid", "down"})
    down = model.model.layers[0].mlp.down_proj
    assert down.bias is None
    with sgm_ext.patched(model, ss, mode="fold", strength=1.0) as handle:
        assert isinstance(down.bias, torch.nn.Parameter)
        for strength in (0.3, 1.0):
            handle.set_strength(strength)
            want = _by_hand_after_unfold(model, inputs, ss, strength, handle)
            assert rel(logits(model, inputs), want) < 1e-5, strength
    assert down.bias is None and "model.layers.0.mlp.down_proj.bias" not in model.state_dict()


def _by_hand_after_unfold(model, inputs, ss, strength, handle):
    """The formula's logits on the unfolded model, then fold again at `strength`."""
    handle.set_strength(0.0)
    want = _by_hand(model, inputs, ss, strength)
    handle.set_strength(strength)
    return want


# ---------------------------------------------------------------- the fused forward's fast path

def _one_mlp(layout):
    """One MLP of a real transformers class in a ModuleDict (sites named "mlp.*")."""
    import transformers as T

    torch.manual_seed(0)
    if layout == "gated":  # Mistral's MLP: Linears without bias
        mlp = T.models.mistral.modeling_mistral.MistralMLP(
            T.MistralConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2))
    else:
        mlp = T.models.phi3.modeling_phi3.Phi3MLP(
            T.Phi3Config(hidden_size=16, intermediate_size=24))
    return torch.nn.ModuleDict({"mlp": mlp.eval()})


def _aten_ops(fn, *args):
    """The aten ops fn(*args) runs, by name ("aten.linear+bias": a linear with a bias)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket)
            if name == "aten.linear":  # with or without a bias
                name += "+bias" if len(args) > 2 and args[2] is not None else ""
            self.names.append(name)
            return func(*args, **(kwargs or {}))

    with Record() as rec:
        fn(*args)
    return rec.names


SHIFTED = [({"mid"}, set()), ({"down"}, set()), ({"mid", "down"}, {"up"}),
           ({"mid", "down"}, {"mid", "down"}), ({"gate", "up"}, set()),
           ({"gate", "up", "down"}, {"gate", "up", "down"}),  # ml-act's Llama sites
           ({"input"}, {"input"}), ({"input", "mid", "down"}, {"input", "gate", "up", "down"})]


@pytest.mark.parametrize("layout", ["gated", "packed"])
@pytest.mark.parametrize(("shifted", "scaled"), SHIFTED,
                         ids=lambda k: "+".join(sorted(k)) or "none")
def test_fast_forward_with_shifts_equals_the_formula_and_runs_no_more_python(layout, shifted,
                                                                             scaled):
    """Shifts keep the float-strength fast forward: bitwise what the general forward gives
    (its first call), the formula's output, and no more Python functions than the unpatched
    MLP (the last case: scales and shifts on gate, up and down, ml-act's Llama sites)."""
    root = _one_mlp(layout)
    (info,) = find_mlps(root).values()
    sites = {k: site for site, k in info.sites().items()}
    if layout == "packed":  # the packed layout's gate and up sites are one, gate_up
        scaled = {"gate_up" if k in ("gate", "up") else k for k in scaled}
        shifted = {"gate_up" if k in ("gate", "up") else k for k in shifted}
    g = torch.Generator().manual_seed(6)
    ss = ScaleSet({sites[k]: torch.rand(info.site_size(k), generator=g) for k in scaled},
                  shifts={sites[k]: torch.randn(info.site_size(k), generator=g)
                          for k in shifted})
    x = torch.randn(1, 1, 16, generator=g)
    mlp = root["mlp"]
    with torch.inference_mode():
        plain_calls = python_calls(mlp, x)
        handles = _hand_hooks(root, ss, 0.7)
        want = mlp(x)
        for h in handles:
            h.remove()
        with sgm_ext.patched(root, ss, strength=0.7):
            first = mlp(x)  # the general forward, which makes the fast state
            assert mlp.forward.fast, "mid / down shifts keep the fast forward"
            fast = mlp(x)
            calls = python_calls(mlp, x)
    assert torch.equal(fast, first)
    assert rel(fast, want) < 1e-5
    assert len(calls) <= len(plain_calls), (calls, plain_calls)


def test_a_down_shift_is_the_down_projections_bias_add():
    """Without a down scale, a down shift costs no pass over [T, H]: the down projection runs
    as a linear with a bias (the GEMM adds it), and nothing is added after it."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    site = info.site("down")
    ss = ScaleSet({}, shifts={site: torch.randn(16)})
    x = torch.randn(3, 5, 16)
    with torch.inference_mode():
        plain = _aten_ops(root["mlp"], x)
        with sgm_ext.patched(root, ss, strength=0.5):
            root["mlp"](x)
            patched = _aten_ops(root["mlp"], x)
    assert plain[-1] == "aten.linear" and patched[-1] == "aten.linear+bias", patched
    assert "aten.add" not in patched and "aten.mul" not in patched, patched


# ---------------------------------------------------------------- steering vectors

def test_steering_vectors_from_a_plain_tensor_file(tmp_path):
    from safetensors.torch import save_file as save_tensors

    model, inputs = build("mistral")
    g = torch.Generator().manual_seed(7)
    v0, v1 = torch.randn(32, generator=g), torch.randn(1, 1, 32, generator=g)
    path = tmp_path / "vectors.safetensors"
    save_tensors({"model.layers.0.mlp": v0, "model.layers.1.mlp.down_proj": v1}, path)
    base = logits(model, inputs)
    # the written-out ActAdd hook: the MLP's output plus strength * v
    handles = [model.model.layers[i].mlp.register_forward_hook(
        lambda m, a, out, v=v: out + 0.5 * v.reshape(-1)) for i, v in ((0, v0), (1, v1))]
    want = logits(model, inputs)
    for h in handles:
        h.remove()
    assert rel(want, base) > 1e-3
    for mode in ("fused", "fold", "hook"):
        with sgm_ext.steering(model, path, mode=mode, strength=0.5) as handle:
            assert handle.sites == ("model.layers.0.mlp.down_proj",
                                    "model.layers.1.mlp.down_proj")
            assert rel(logits(model, inputs), want) < 1e-5, mode
        assert torch.equal(logits(model, inputs), base), mode
    torch.save({"model.layers.1.mlp": v0.clone()}, tmp_path / "v.pt")  # a torch-saved dict
    with sgm_ext.steering(model, tmp_path / "v.pt", mode="hook"):
        assert not torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize(("vectors", "message"), [
    ({"model.layers.0.mlp.up_proj": torch.zeros(48)}, "is on a up site; steering vectors"),
    ({"model.layers.0.mlp": torch.zeros(31)}, r"shifts\['model.layers.0.mlp.down_proj'\] has 31"),
    ({"model.layers.9.mlp": torch.zeros(32)}, "unknown site 'model.layers.9.mlp'"),
])
def test_bad_steering_vectors_are_named(vectors, message):
    model, inputs = build("mistral")
    before = param_hash(model)
    with pytest.raises(ValueError, match=message):
        sgm_ext.steering(model, vectors)
    assert param_hash(model) == before
    assert sgm_ext.patching.handle.HANDLE_ATTR not in model.__dict__


def test_a_vector_file_that_is_not_one_is_named(tmp_path):
    bad = tmp_path / "m.safetensors"
    ScaleSet({"a.b": torch.ones(2)}).save(bad)
    with pytest.raises(ValueError, match="is an sgm-ext scale file"):
        sgm_ext.load_vectors(bad)
    torch.save({"v": torch.zeros(2, 3)}, tmp_path / "w.pt")
    with pytest.raises(ValueError, match=r"'v' is torch.float32 of shape \(2, 3\)"):
        sgm_ext.load_vectors(tmp_path / "w.pt")


def test_shifts_on_lora_layers_fuse_and_fold_refuses_them():
    from peft import LoraConfig, get_peft_model

    model, inputs = build("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["up_proj", "down_proj"],
                     init_lora_weights=False)  # random B: the adapters change the output
    model = get_peft_model(model, cfg).eval()
    ss = _affine(model.get_base_model(), seed=8, kinds={"mid", "down"})
    base, before = logits(model, inputs), param_hash(model)
    want = _by_hand(model.get_base_model(), inputs, ss, 0.7)
    with sgm_ext.patched(model, ss, mode="fused", strength=0.7):
        assert rel(logits(model, inputs), want) < 1e-5
    with pytest.raises(ValueError, match=r"fold the shift of model\.layers\.0\.mlp\.mid into "
                       r"model\.layers\.0\.mlp\.down_proj, a LoRA layer"):
        sgm_ext.patch(model, ss, mode="fold")
    assert torch.equal(logits(model, inputs), base) and param_hash(model) == before


@pytest.mark.parametrize("kinds", [{"mid", "down"}, {"gate", "up", "mid", "down"},
                                   {"input", "mid", "down"}],
                         ids=["fast forward", "general forward", "input site"])
@pytest.mark.parametrize("strength", [0.7, "per sequence"])
def test_a_fused_mlp_with_shifts_compiles_into_one_graph(strength, kinds):
    model, inputs = build("mistral")
    ss = _affine(model, seed=9, kinds=kinds)
    lam = torch.tensor([0.3, 1.0]) if strength == "per sequence" else strength
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        handles = _hand_hooks(model, ss, lam)
        want = mlp(x)
        for h in handles:
            h.remove()
        with sgm_ext.patched(model, ss, mode="fused", strength=lam):
            eager = mlp(x)
            mlp(x)  # a float strength: the fast forward from the second call
            torch._dynamo.reset()
            got = torch.compile(mlp, fullgraph=True)(x)
    assert rel(got, eager) < 1e-5 and rel(eager, want) < 1e-5


@pytest.mark.parametrize("layout", ["gated", "packed"])
def test_fast_forward_with_gate_up_shifts_follows_a_model_moved_to_another_dtype(layout):
    root = _one_mlp(layout)
    (info,) = find_mlps(root).values()
    g = torch.Generator().manual_seed(10)
    kinds = [k for k in info.sites().values() if k != "mid"]  # input, gate, up / gate_up, down
    ss = ScaleSet({info.site(k): 0.5 + torch.rand(info.site_size(k), generator=g)
                   for k in kinds},
                  shifts={info.site(k): torch.randn(info.site_size(k), generator=g)
                          for k in kinds})
    mlp = root["mlp"]
    x = torch.randn(2, 3, 16, generator=g)
    with torch.no_grad(), sgm_ext.patched(root, ss, strength=0.6, allow_amplify=True):
        mlp(x)
        mlp(x)
        assert mlp.forward.fast
        root.double()
        got = mlp(x.double())  # the fast state was made for float32
        assert got.dtype == torch.float64
    with torch.no_grad():
        handles = _hand_hooks(root, ss, 0.6)
        want = mlp(x.double())
        for h in handles:
            h.remove()
    assert rel(got, want) < 1e-6  # the vectors are float32
