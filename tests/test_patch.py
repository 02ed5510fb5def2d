"""sgm_ext.patch on tiny models of the real transformers classes: fused / fold against the
hook reference, strength, unpatch, per-sequence strength, quantized / LoRA / accelerate,
torch.compile, and bad input leaving the model untouched."""
import warnings

import pytest
import torch
from patch_models import BUILDERS, B, build, logits, param_hash, python_calls, rel
from torch import nn

import sgm_ext
from sgm_ext.patching import fused as fused_mod
from sgm_ext.patching.handle import HANDLE_ATTR
from sgm_ext.patching.registry import find_mlps
from sgm_ext.patching.scales import ScaleSet, config_fingerprint

MODELS = list(BUILDERS)
MULTIMODAL_TEXT_ROOTS = ("language_model", "text_model")


# ---------------------------------------------------------------- helpers

def _scales(model, seed=0, only_text=False):
    """Random scales on every site of every MLP (every site kind); some neurons exactly 1."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    mlps = find_mlps(model)
    if only_text:
        text = [p for p in mlps if any(r in p for r in MULTIMODAL_TEXT_ROOTS)]
        mlps = {p: mlps[p] for p in (text or list(mlps))}
    for info in mlps.values():
        for site, kind in info.sites().items():
            n = info.site_size(kind)
            s = torch.rand(n, generator=g) * 0.9 + 0.1
            s[torch.rand(n, generator=g) < 0.3] = 1.0
            out[site] = s
    return out


def _module_state(model):
    """What a patch could leave behind: instance forwards, hooks, markers (transformers
    installs hooks of its own, so compare against a snapshot rather than against none)."""
    return {name: (m.__dict__.get("forward"), m.__dict__.get("_old_forward"),
                   tuple(m._forward_hooks.values()), tuple(m._forward_pre_hooks.values()),
                   m.__dict__.get(HANDLE_ATTR))
            for name, m in model.named_modules()}


def _no_patch_left(model, snapshot):
    now = _module_state(model)
    for name, state in snapshot.items():
        assert now[name] == state, f"{name}: forward / hooks / marker differ after unpatch"
    for name, m in model.named_modules():
        assert HANDLE_ATTR not in m.__dict__, f"{name} still marked patched"


def _greedy(model, inputs, n=4):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, min_new_tokens=n,
                             pad_token_id=0)
    return out[:, inputs["input_ids"].shape[1]:]


def _one(inputs, i):
    """Sequence i of a batch: every tensor's first dim holds B equal chunks."""
    out = {}
    for k, t in inputs.items():
        n = t.shape[0] // B
        out[k] = t[i * n:(i + 1) * n]
    return out


# ---------------------------------------------------------------- per model

@pytest.mark.parametrize("name", MODELS)
def test_fused_and_fold_match_hook_reference(name):
    model, inputs = build(name)
    scales = _scales(model)
    kinds = {k for i in find_mlps(model).values() for k in i.sites().values()}
    assert kinds >= {"mid"} and len(kinds) >= 2  # every site kind of the model's layouts
    base = logits(model, inputs)
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
        ref_tokens = _greedy(model, inputs)
    assert rel(ref, base) > 1e-3  # the scales do change the output
    for mode in ("fused", "fold"):
        with sgm_ext.patched(model, scales, mode=mode):
            got = logits(model, inputs)
            tokens = _greedy(model, inputs)
        assert rel(got, ref) < 1e-5, mode
        assert torch.equal(tokens, ref_tokens), mode


@pytest.mark.parametrize("name", MODELS)
def test_strength_zero_and_unpatch_are_exact(name):
    model, inputs = build(name)
    scales = _scales(model, seed=1)
    base = logits(model, inputs)
    before, snapshot = param_hash(model), _module_state(model)
    for mode in ("fused", "fold", "hook"):
        handle = sgm_ext.patch(model, scales, mode=mode, strength=0.0)
        assert torch.equal(logits(model, inputs), base), mode
        handle.set_strength(0.7)
        assert not torch.equal(logits(model, inputs), base), mode
        sgm_ext.unpatch(model)
        assert torch.equal(logits(model, inputs), base), mode
        assert param_hash(model) == before, mode
        _no_patch_left(model, snapshot)


@pytest.mark.parametrize("name", MODELS)
def test_per_sequence_strength_equals_each_sequence_alone(name):
    model, inputs = build(name)
    scales = _scales(model, seed=2, only_text=True)
    strengths = torch.tensor([0.25, 1.0])
    alone = []
    with sgm_ext.patched(model, scales, mode="hook") as h:
        for i in range(B):
            h.set_strength(float(strengths[i]))
            alone.append(logits(model, _one(inputs, i)))
    alone = torch.cat(alone)
    for mode in ("fused", "hook"):
        with sgm_ext.patched(model, scales, mode=mode, strength=strengths[:, None]):
            batched = logits(model, inputs)
        assert rel(batched, alone) < 1e-5, mode


# ---------------------------------------------------------------- the math, written out

def _one_mlp(layout):
    """One MLP of a real transformers class with biases where the class has them, in a
    ModuleDict so its sites are named "mlp.*"; and its float64 forward written out by hand."""
    import transformers as T

    torch.manual_seed(0)
    if layout == "gated":
        mlp = T.models.llama.modeling_llama.LlamaMLP(
            T.LlamaConfig(hidden_size=16, intermediate_size=24, mlp_bias=True,
                          num_attention_heads=2))
    elif layout == "packed":
        mlp = T.models.phi3.modeling_phi3.Phi3MLP(
            T.Phi3Config(hidden_size=16, intermediate_size=24))
    else:
        mlp = T.models.clip.modeling_clip.CLIPMLP(
            T.CLIPVisionConfig(hidden_size=16, intermediate_size=24, hidden_act="gelu",
                               num_attention_heads=2))
    return nn.ModuleDict({"mlp": mlp.eval()})


def _formula(mlp, layout, s, x):
    """y of the MLP with scales s[kind] (1-D) applied, in float64, from the weights."""
    def lin(m, h):
        y = h @ m.weight.double().T
        return y if m.bias is None else y + m.bias.double()

    one = lambda k, n: s[k].double() if k in s else torch.ones(n, dtype=torch.float64)  # noqa
    x = x.double() * one("input", 16)  # the MLP's input site
    if layout == "gated":
        g = lin(mlp.gate_proj, x) * one("gate", 24)
        h = torch.nn.functional.silu(g) * lin(mlp.up_proj, x) * one("up", 24) * one("mid", 24)
        return lin(mlp.down_proj, h) * one("down", 16)
    if layout == "packed":
        gu = lin(mlp.gate_up_proj, x) * one("gate_up", 48)
        h = torch.nn.functional.silu(gu[..., :24]) * gu[..., 24:] * one("mid", 24)
        return lin(mlp.down_proj, h) * one("down", 16)
    a = lin(mlp.fc1, x) * one("fc1", 24)
    return lin(mlp.fc2, torch.nn.functional.gelu(a) * one("mid", 24))


@pytest.mark.parametrize("layout", ["gated", "packed", "non_gated"])
def test_every_mode_computes_the_written_out_formula(layout):
    root = _one_mlp(layout)
    (info,) = find_mlps(root).values()
    g = torch.Generator().manual_seed(1)
    kinds = info.sites()
    scales = {site: torch.rand(info.site_size(k), generator=g) for site, k in kinds.items()}
    by_kind = {kinds[site]: v for site, v in scales.items()}
    x = torch.randn(3, 5, 16, generator=g).transpose(0, 1)  # non-contiguous [5, 3, 16]
    want = _formula(root["mlp"], layout, by_kind, x)
    lam = 0.6
    want_half = _formula(root["mlp"], layout, {k: 1 - lam * (1 - v) for k, v in by_kind.items()},
                         x)
    for mode in ("hook", "fused", "fold"):
        with sgm_ext.patched(root, scales, mode=mode) as h, torch.no_grad():
            assert rel(root["mlp"](x).double(), want) < 1e-5, mode
            h.set_strength(lam)
            assert rel(root["mlp"](x).double(), want_half) < 1e-5, mode


# ---------------------------------------------------------------- strength semantics

def test_strength_interpolates_per_site():
    """s_eff = 1 - strength (1 - s) on each site: fused at strength 0.4 equals hook with the
    effective scales written out at strength 1."""
    model, inputs = build("llama")
    scales = _scales(model, seed=3)
    eff = {k: 1 - 0.4 * (1 - v) for k, v in scales.items()}
    with sgm_ext.patched(model, eff, mode="hook"):
        ref = logits(model, inputs)
    for mode in ("fused", "fold", "hook"):
        with sgm_ext.patched(model, scales, mode=mode, strength=0.4):
            assert rel(logits(model, inputs), ref) < 1e-5, mode


def test_per_sequence_strength_on_a_vision_tower_with_the_batch_first():
    """LLaVA's CLIP tower runs one image per sequence: [B, patches, dim], so per-sequence
    strength applies there too."""
    model, inputs = build("llava")
    scales = _scales(model, seed=12)
    assert any("vision_tower" in site for site in scales)
    alone = []
    with sgm_ext.patched(model, scales, mode="hook") as h:
        for i, lam in enumerate((0.5, 0.0)):
            h.set_strength(lam)
            alone.append(logits(model, _one(inputs, i)))
    with sgm_ext.patched(model, scales, strength=torch.tensor([0.5, 0.0])):
        assert rel(logits(model, inputs), torch.cat(alone)) < 1e-5


def test_fused_forward_takes_one_input():
    model, inputs = build("mistral")
    with sgm_ext.patched(model, _scales(model)):
        with pytest.raises(TypeError, match=r"model\.layers\.0\.mlp: the fused MistralMLP "
                                            r"forward takes one input"):
            model.model.layers[0].mlp(torch.randn(1, 2, 32), torch.randn(1))


def test_per_sequence_strength_needs_the_batch_first():
    model, inputs = build("qwen2_vl")  # vision activations are [patches, dim]: no batch dim
    with sgm_ext.patched(model, _scales(model), strength=torch.tensor([0.5, 1.0])):
        with pytest.raises(ValueError, match=r"visual\.blocks\.0\.mlp: per-sequence strength"):
            logits(model, inputs)


def test_scale_file_path_and_fingerprint():
    model, inputs = build("mistral")
    scales = ScaleSet(_scales(model), {"config_fingerprint": config_fingerprint(model.config),
                                       "model_type": "mistral"})
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
    import os
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.safetensors")
        scales.save(path)
        with sgm_ext.patched(model, path):
            assert rel(logits(model, inputs), ref) < 1e-5


def test_supported_architectures_lists_the_issue_classes():
    archs = sgm_ext.supported_architectures()
    for cls in ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen2_5_VLMLP", "Qwen3MLP",
                "Qwen3VLTextMLP", "GemmaMLP", "Gemma2MLP", "Gemma3MLP", "Phi3MLP",
                "MllamaTextMLP", "Llama4TextMLP", "CLIPMLP", "SiglipMLP", "InternVLVisionMLP",
                "Idefics3VisionMLP", "SmolVLMVisionMLP"):
        assert cls in archs
    assert archs["Phi3MLP"] == "packed" and archs["CLIPMLP"] == "non_gated"


# ---------------------------------------------------------------- wrapped sub-modules

def _quantized_llama():
    model, inputs = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    return q, inputs


def test_dynamic_quantized_linear_fused_matches_hook_and_fold_refuses():
    model, inputs = _quantized_llama()
    up = model.model.layers[0].mlp.up_proj
    assert type(up).__module__.startswith("torch.ao.nn.quantized.dynamic")
    scales = _scales(model, seed=4)
    base, snapshot = logits(model, inputs), _module_state(model)
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
    with sgm_ext.patched(model, scales, mode="fused"):
        assert rel(logits(model, inputs), ref) < 1e-5
    with pytest.raises(ValueError, match=r"fold mode cannot fold scales into "
                                         r"model\.layers\.0\.mlp\.gate_proj.*use mode='fused'"):
        sgm_ext.patch(model, scales, mode="fold")
    assert torch.equal(logits(model, inputs), base)
    _no_patch_left(model, snapshot)


def _lora_llama():
    from peft import LoraConfig, get_peft_model

    model, inputs = build("llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"],
                     init_lora_weights=False)  # random B: the adapters change the output
    return get_peft_model(model, cfg).eval(), inputs


@pytest.mark.parametrize("mode", ["fused", "fold"])
def test_peft_lora_matches_hook_and_unpatches_exactly(mode):
    model, inputs = _lora_llama()
    scales = _scales(model.get_base_model(), seed=5)
    base = logits(model, inputs)
    before = param_hash(model)
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
    with sgm_ext.patched(model, scales, mode=mode):
        assert rel(logits(model, inputs), ref) < 1e-5
    assert torch.equal(logits(model, inputs), base)
    assert param_hash(model) == before


def _counting_hook():
    """An accelerate ModelHook class counting the forwards it wraps (Count.calls)."""
    from accelerate.hooks import ModelHook

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    return Count


def test_accelerate_hook_on_the_mlp_keeps_running():
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    Count = _counting_hook()
    model, inputs = build("llama")
    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, Count())
    wrapper, snapshot = mlp.__dict__["forward"], _module_state(model)
    scales = _scales(model, seed=6)
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
    with sgm_ext.patched(model, scales, mode="fused"):
        Count.calls = 0
        assert rel(logits(model, inputs), ref) < 1e-5
        assert Count.calls == 1
    assert mlp.__dict__["forward"] is wrapper  # accelerate's wrapper is back, untouched
    _no_patch_left(model, snapshot)
    remove_hook_from_module(mlp)


def test_gated_up_proj_dispatch(monkeypatch):
    """The GEMM path is chosen only for CUDA fp16 / bf16 plain Linears without bias; it cannot
    run here, so its numerics are checked by forcing the choice on CPU (torch backend)."""
    gate, up = nn.Linear(8, 6, bias=False), nn.Linear(8, 6, bias=False)
    x = torch.randn(2, 8)
    assert not fused_mod._use_gated_up_proj(gate, up, x)  # CPU
    cuda_like = torch.empty(2, 8, dtype=torch.bfloat16, device="meta")
    assert not fused_mod._use_gated_up_proj(gate, up, cuda_like)  # not CUDA

    model, inputs = build("mistral")
    scales = _scales(model, seed=7)
    with sgm_ext.patched(model, scales, mode="hook"):
        ref = logits(model, inputs)
    calls = []
    real = sgm_ext.ops.gated_up_proj

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(fused_mod, "_use_gated_up_proj", lambda g, u, x: True)
    monkeypatch.setattr(fused_mod.ops, "gated_up_proj", spy)
    with sgm_ext.patched(model, scales, mode="fused"):
        assert rel(logits(model, inputs), ref) < 1e-5
    assert len(calls) == 2  # one per layer


def test_torch_compile_matches_eager():
    model, inputs = build("llama")
    scales = _scales(model, seed=8)
    with sgm_ext.patched(model, scales, mode="fused"):
        eager = logits(model, inputs)
        compiled = torch.compile(model.forward)
        with torch.no_grad():
            got = compiled(**inputs).logits
    assert rel(got, eager) < 1e-5
    # The fused MLP alone compiles into one graph (no graph break around the custom op).
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 32)
    with sgm_ext.patched(model, scales, mode="fused", strength=torch.tensor([0.3, 1.0])):
        eager = mlp(x)
        torch._dynamo.reset()
        got = torch.compile(mlp, fullgraph=True)(x)
    assert rel(got, eager) < 1e-5


# ---------------------------------------------------------------- bad input

def _bad_cases(model):
    good = _scales(model, seed=9)
    site = "model.layers.1.mlp.up_proj"
    fp = ScaleSet(good, {"config_fingerprint": "0123456789abcdef", "model_type": "llava"})
    return [
        ({**good, "model.layers.1.mlp.up_prj": torch.ones(48)}, {},
         r"unknown site 'model\.layers\.1\.mlp\.up_prj': model\.layers\.1\.mlp is a "
         r"LlamaMLP whose sites are .*mlp\.up_proj"),
        ({**good, "model.layer.1.mlp.up_proj": torch.ones(48)}, {},
         r"no such module in the model; did you mean 'model\.layers\.1\.mlp\.up_proj'"),
        ({**good, "model.layers.1.self_attn.q_proj": torch.ones(32)}, {},
         r"model\.layers\.1\.self_attn is a LlamaAttention, not an MLP class"),
        ({**good, "model.layers.1.mlp.fc1": torch.ones(48)}, {},
         r"unknown site 'model\.layers\.1\.mlp\.fc1': .* is a LlamaMLP whose sites"),
        ({**good, site: torch.ones(47)}, {}, r"scales\['model\.layers\.1\.mlp\.up_proj'\] has 47"),
        ({**good, site: torch.tensor([1.0] * 40 + [float("nan")] * 8)}, {},
         r"up_proj'\]\[40\] is nan"),
        ({**good, site: torch.tensor([1.0] * 47 + [-0.5])}, {}, r"up_proj'\]\[47\] is -0\.5"),
        ({**good, site: torch.tensor([1.0] * 47 + [1.5])}, {},
         r"up_proj'\]\[47\] is 1\.5.*allow_amplify"),
        (fp, {}, r"made for a model with config fingerprint 0123456789abcdef \(llava\)"),
        (good, {"mode": "fold", "strength": torch.tensor([0.5, 1.0])},
         r"fold mode .* per-sequence"),
        (good, {"strength": 1.5}, r"strength is 1\.5"),
        (good, {"mode": "magic"}, r"mode 'magic'"),
        ({}, {}, r"empty"),
    ]


def test_bad_input_is_refused_and_the_model_is_untouched(tmp_path):
    model, inputs = build("llama")
    base, before, snapshot = logits(model, inputs), param_hash(model), _module_state(model)
    other = build("llava")[0]  # a scale file made for another model, read from disk
    other_file = ScaleSet(_scales(other), {"config_fingerprint": config_fingerprint(other.config),
                                           "model_type": "llava"}).save(tmp_path / "llava.st")
    cases = _bad_cases(model) + [(other_file, {}, r"made for a model .* \(llava\); this "
                                                  r"model's is [0-9a-f]{16} \(llama\)")]
    for scales, kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            sgm_ext.patch(model, scales, **kwargs)
        assert param_hash(model) == before
        assert torch.equal(logits(model, inputs), base)
        _no_patch_left(model, snapshot)


def test_amplification_with_the_flag_and_double_patch():
    model, inputs = build("llama")
    scales = _scales(model, seed=10)
    scales["model.layers.0.mlp.mid"][0] = 2.0
    handle = sgm_ext.patch(model, scales, mode="fold", allow_amplify=True)
    patched_logits, patched_hash = logits(model, inputs), param_hash(model)
    with pytest.raises(ValueError, match="already patched"):
        sgm_ext.patch(model, _scales(model, seed=11), mode="fused")
    with pytest.raises(ValueError, match="already patched"):  # a sub-model of a patched one
        sgm_ext.patch(model.model, {"layers.0.mlp.mid": torch.ones(48)})
    assert torch.equal(logits(model, inputs), patched_logits)
    assert param_hash(model) == patched_hash
    handle.remove()
    with pytest.raises(ValueError, match="not patched"):
        sgm_ext.unpatch(model)


def test_unknown_mlp_class_is_named():
    class MyFFN(nn.Module):
        def __init__(self):
            super().__init__()
            self.w_in, self.w_out = nn.Linear(4, 8), nn.Linear(8, 4)

        def forward(self, x):
            return self.w_out(torch.relu(self.w_in(x)))

    model = nn.Sequential(MyFFN())
    snapshot = _module_state(model)
    with pytest.raises(ValueError, match=r"0 is a MyFFN, not an MLP class the sgm-ext registry"):
        sgm_ext.patch(model, {"0.w_in": torch.ones(8)})
    _no_patch_left(model, snapshot)


# ---------------------------------------------------------------- deepcopy and pickling

def _leftovers(model):
    """By module: the types of instance forwards and hooks, and whether it is marked (a deep
    copy's objects are not the original's, so compare types with an unpatched copy)."""
    return {name: ({a: type(m.__dict__[a]) for a in ("forward", "_old_forward")
                    if a in m.__dict__},
                   [type(h) for h in m._forward_hooks.values()],
                   [type(h) for h in m._forward_pre_hooks.values()],
                   HANDLE_ATTR in m.__dict__)
            for name, m in model.named_modules()}


def _marked(model):
    return {name: m.__dict__[HANDLE_ATTR] for name, m in model.named_modules()
            if HANDLE_ATTR in m.__dict__}


@pytest.mark.parametrize("mode", ["fused", "fold", "hook"])
def test_deepcopy_of_a_patched_model_is_an_independent_patched_model(mode):
    import copy

    model, inputs = build("llava")  # Llama MLPs and CLIP MLPs: gated and non-gated
    scales = _scales(model, seed=13)
    base, before, snapshot = logits(model, inputs), param_hash(model), _module_state(model)
    clean = copy.deepcopy(model)  # after a forward: transformers adds hooks of its own then
    handle = sgm_ext.patch(model, scales, mode=mode)
    patched, patched_hash, marks = logits(model, inputs), param_hash(model), _marked(model)
    assert not torch.equal(patched, base)

    dup = copy.deepcopy(model)
    dup_handle = dup.__dict__[HANDLE_ATTR]  # what sgm_ext.unpatch(dup) removes
    assert dup_handle is not handle and dup_handle.model is dup and dup_handle.active
    assert set(_marked(dup)) == set(marks)
    assert all(h is dup_handle for h in _marked(dup).values())
    assert torch.equal(logits(dup, inputs), patched)
    assert param_hash(dup) == patched_hash

    dup_handle.set_strength(0.5)  # the strength of one does not change the other
    half = logits(dup, inputs)
    assert not torch.equal(half, patched)
    assert torch.equal(logits(model, inputs), patched)
    handle.set_strength(0.25)
    assert torch.equal(logits(dup, inputs), half)
    handle.set_strength(0.5)
    assert torch.equal(logits(model, inputs), half)
    handle.set_strength(1.0)
    assert torch.equal(logits(model, inputs), patched)

    sgm_ext.unpatch(dup)  # restores the copy exactly, leaves the original patched
    assert not dup_handle.active
    assert param_hash(dup) == param_hash(clean)
    assert _leftovers(dup) == _leftovers(clean)
    assert torch.equal(logits(dup, inputs), base)
    assert handle.active and _marked(model) == marks
    assert param_hash(model) == patched_hash
    assert torch.equal(logits(model, inputs), patched)

    again = copy.deepcopy(model)  # the other order: the original's remove() first
    handle.remove()
    assert param_hash(model) == before
    assert torch.equal(logits(model, inputs), base)
    _no_patch_left(model, snapshot)
    assert torch.equal(logits(again, inputs), patched)
    again.__dict__[HANDLE_ATTR].remove()
    assert param_hash(again) == before and _leftovers(again) == _leftovers(clean)

    for m in (model, dup, again):  # every one can be patched again
        with sgm_ext.patched(m, scales, mode=mode):
            assert torch.equal(logits(m, inputs), patched)
        assert torch.equal(logits(m, inputs), base)


def test_deepcopy_keeps_an_accelerate_hook_on_the_mlp():
    import copy

    from accelerate.hooks import add_hook_to_module

    Count = _counting_hook()
    model, inputs = build("llama")
    mlp = model.model.layers[0].mlp
    add_hook_to_module(mlp, Count())
    base = logits(model, inputs)
    handle = sgm_ext.patch(model, _scales(model, seed=14), mode="fused")
    patched = logits(model, inputs)
    dup = copy.deepcopy(model)
    dup_mlp = dup.model.layers[0].mlp
    fused = dup_mlp.__dict__["_old_forward"]
    assert isinstance(fused, fused_mod.Fused) and fused.module is dup_mlp
    Count.calls = 0
    assert torch.equal(logits(dup, inputs), patched)
    assert Count.calls == 1  # the copy's accelerate wrapper runs around the copy's fused forward
    sgm_ext.unpatch(dup)
    assert dup_mlp.__dict__["_old_forward"].__self__ is dup_mlp  # the class forward, bound
    assert dup_mlp.__dict__["forward"].args == (dup_mlp,)  # the copy's accelerate wrapper
    assert torch.equal(logits(dup, inputs), base)
    assert isinstance(mlp.__dict__["_old_forward"], fused_mod.Fused)
    assert torch.equal(logits(model, inputs), patched)
    handle.remove()
    assert mlp.__dict__["_old_forward"].__self__ is mlp
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("mode", ["fused", "fold", "hook"])
def test_a_patched_model_is_not_pickled_but_its_state_dict_saves(mode, tmp_path):
    import copy
    import io
    import pickle
    import zipfile

    model, inputs = build("llama")
    fresh = copy.deepcopy(model)
    base = logits(model, inputs)
    handle = sgm_ext.patch(model, _scales(model, seed=15), mode=mode)
    patched, patched_hash, marks = logits(model, inputs), param_hash(model), _marked(model)
    message = (r"a model patched by sgm-ext cannot be pickled .*remove the patch first "
               r"\(handle\.remove\(\) / sgm_ext\.unpatch\(model\)\), save, and patch again")
    path = tmp_path / "model.pt"
    for save in (lambda: pickle.dumps(model), lambda: torch.save(model, io.BytesIO()),
                 lambda: torch.save(model, path), lambda: pickle.dumps(handle)):
        with pytest.raises(TypeError, match=message):
            save()
        assert handle.active and _marked(model) == marks
        assert param_hash(model) == patched_hash
        assert torch.equal(logits(model, inputs), patched)
    assert not any(n.endswith("data.pkl") for n in zipfile.ZipFile(path).namelist())

    torch.save(model.state_dict(), tmp_path / "state.pt")  # works while patched
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    fresh.load_state_dict(state)  # fold: the folded weights; else the model's own
    assert torch.equal(logits(fresh, inputs), patched if mode == "fold" else base)
    handle.remove()
    assert torch.equal(logits(model, inputs), base)
    pickle.loads(pickle.dumps(model))  # unpatched, it pickles as before


# ---------------------------------------------------------------- the fast float-strength forward


@pytest.mark.parametrize("sites", [("mid",), ("gate", "up", "down")])
def test_fused_decode_forward_runs_no_more_python_than_the_unpatched_one(sites):
    """At decode sizes the cost of a patched MLP is the Python it runs (every line runs cold
    between weight streams; bench/RESULTS.md, Patch): a float-strength fused forward runs no
    more Python functions than the unpatched forward it replaces, and fewer than hook mode."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site(k): torch.rand(info.site_size(k)) for k in sites}
    x = torch.randn(1, 1, 16)
    with torch.inference_mode():
        root["mlp"](x)
        plain = python_calls(root["mlp"], x)
        counts = {}
        for mode in ("fused", "hook"):
            with sgm_ext.patched(root, scales, mode=mode):
                root["mlp"](x)  # the first call makes the per-strength state
                counts[mode] = python_calls(root["mlp"], x)
    assert len(counts["fused"]) <= len(plain), (counts["fused"], plain)
    assert len(counts["fused"]) < len(counts["hook"]), (counts["fused"], counts["hook"])


@pytest.mark.parametrize("layout", ["gated", "packed"])
def test_fast_forward_equals_the_general_forward_and_follows_the_strength(layout):
    """The fast forward (from the second call at a float strength) gives bitwise what the
    general forward gives, and every strength change takes effect at once: per-sequence
    strength, strength 0 (the original forward exactly), a new float."""
    root = _one_mlp(layout)
    (info,) = find_mlps(root).values()
    g = torch.Generator().manual_seed(5)
    kinds = info.sites()
    scales = {site: torch.rand(info.site_size(k), generator=g) for site, k in kinds.items()}
    by_kind = {kinds[site]: v for site, v in scales.items()}
    x = torch.randn(2, 3, 16, generator=g)
    mlp = root["mlp"]
    with torch.no_grad():
        plain = mlp(x)
        with sgm_ext.patched(root, scales) as h:
            fused = mlp.forward
            first = mlp(x)
            assert fused.fast, "the first call at a float strength makes the fast state"
            assert torch.equal(mlp(x), first)
            assert rel(first.double(), _formula(mlp, layout, by_kind, x)) < 1e-5
            h.set_strength(torch.tensor([1.0, 0.0]))
            per_seq = mlp(x)
            assert not fused.fast
            assert rel(per_seq[0], first[0]) < 1e-6 and rel(per_seq[1], plain[1]) < 1e-6
            h.set_strength(0.0)
            assert torch.equal(mlp(x), plain) and torch.equal(mlp(x), plain)
            h.set_strength(0.5)
            half = {k: 1 - 0.5 * (1 - v) for k, v in by_kind.items()}
            for _ in range(2):
                assert rel(mlp(x).double(), _formula(mlp, layout, half, x)) < 1e-5
            assert fused.fast


def test_fast_forward_follows_a_model_moved_to_another_dtype():
    """The fast state is made for one device and dtype; after model.to(...) the next call
    makes it again (here float64, with a down scale, whose factor is cast to the new dtype)."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site(k): torch.rand(info.site_size(k)) for k in ("mid", "down")}
    x = torch.randn(4, 16)
    with sgm_ext.patched(root, scales), torch.no_grad():
        root["mlp"](x), root["mlp"](x)
        root.double()
        xd = x.double()
        got = [root["mlp"](xd) for _ in range(2)]
    with sgm_ext.patched(root, scales, mode="hook"), torch.no_grad():
        want = root["mlp"](xd)
    for y in got:
        assert y.dtype == torch.float64 and rel(y, want) < 1e-12


def test_deepcopy_made_after_fast_calls_uses_its_own_modules():
    """A copy of a model whose fast state exists refers to the copy's sub-modules."""
    import copy

    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site("mid"): torch.rand(info.site_size("mid"))}
    x = torch.randn(4, 16)
    with sgm_ext.patched(root, scales), torch.no_grad():
        before = [root["mlp"](x) for _ in range(2)][-1]
        dup = copy.deepcopy(root)
        dup["mlp"].down_proj.weight.zero_()
        dup["mlp"].down_proj.bias.zero_()
        assert torch.equal(dup["mlp"](x), torch.zeros_like(before))
        assert torch.equal(root["mlp"](x), before)


def test_fast_forward_compiles_into_one_graph():
    """torch.compile(fullgraph=True) of an MLP whose fast state exists traces the fast forward
    (the allocating op's fake kernel gives its shape) and matches eager."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site(k): torch.rand(info.site_size(k)) for k in ("gate", "mid", "down")}
    x = torch.randn(2, 5, 16)
    with sgm_ext.patched(root, scales), torch.no_grad():
        eager = [root["mlp"](x) for _ in range(2)][-1]
        assert root["mlp"].forward.fast
        torch._dynamo.reset()
        got = torch.compile(root["mlp"], fullgraph=True)(x)
    assert rel(got, eager) < 1e-6


def test_fast_forward_gradients_equal_hook_mode():
    """With gradients on (a trainable model), the fused forward at a float strength takes the
    autograd op, also after the fast state exists: the gradients equal hook mode's."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site(k): torch.rand(info.site_size(k)) for k in ("up", "mid", "down")}
    x = torch.randn(3, 16)
    grads = {}
    for mode in ("hook", "fused"):
        with sgm_ext.patched(root, scales, mode=mode):
            with torch.no_grad():
                root["mlp"](x)  # the fast state is made here
            root.zero_grad()
            root["mlp"](x).square().sum().backward()
            grads[mode] = {n: p.grad.clone() for n, p in root.named_parameters()}
    for name, g in grads["hook"].items():
        assert g.abs().max() > 0 and rel(grads["fused"][name], g) < 1e-5, name


def test_fast_forward_remakes_its_state_for_another_device():
    """A state made for another device than the activations' (the model was moved after it was
    made; the allocating op itself does not compare devices) is not used: the forward makes the
    state again and answers as before. Here the state is marked as made for the meta device."""
    root = _one_mlp("gated")
    (info,) = find_mlps(root).values()
    scales = {info.site("mid"): torch.rand(info.site_size("mid"))}
    x = torch.randn(4, 16)
    with sgm_ext.patched(root, scales), torch.no_grad():
        want = [root["mlp"](x) for _ in range(2)][-1]
        fused = root["mlp"].forward
        state = list(fused.fast)
        scale_at = next(i for i, v in enumerate(state) if isinstance(v, torch.Tensor))
        state[0], state[scale_at] = torch.device("meta"), torch.full_like(state[scale_at], 2.0**99)
        fused.fast = tuple(state)
        assert torch.equal(root["mlp"](x), want)
        assert fused.fast and fused.fast[0] == torch.device("cpu")
        assert torch.equal(root["mlp"](x), want)
