"""The MLP registry: find_mlps, site names, the generic rule, errors naming the class."""
import pytest
import torch
from torch import nn

from sgm_ext.patching import registry
from sgm_ext.patching.registry import describe, find_mlps


def _llama(layers=2, bias=False):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                        mlp_bias=bias)
    return T.LlamaForCausalLM(cfg)


def test_find_mlps_llama_sites_and_sizes():
    m = _llama()
    mlps = find_mlps(m)
    assert list(mlps) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    info = mlps["model.layers.1.mlp"]
    assert (info.class_name, info.layout, info.act) == ("LlamaMLP", "gated", "silu")
    assert (info.intermediate_size, info.hidden_size) == (48, 32)
    assert info.sites() == {"model.layers.1.mlp.input": "input",
                            "model.layers.1.mlp.gate_proj": "gate",
                            "model.layers.1.mlp.up_proj": "up",
                            "model.layers.1.mlp.mid": "mid",
                            "model.layers.1.mlp.down_proj": "down"}
    # Every Linear site is a real module path in the model.
    names = dict(m.named_modules())
    for site, kind in info.sites().items():
        if kind not in ("mid", "input"):
            assert isinstance(names[site], nn.Linear)
    assert [info.site_size(k) for k in ("input", "gate", "up", "mid", "down")] == \
        [32, 48, 48, 48, 32]
    # where each kind is observed and what fold writes
    mlp = names["model.layers.1.mlp"]
    assert info.site_module(mlp, "input") == (mlp, True)
    assert info.site_module(mlp, "mid") == (mlp.down_proj, True)
    assert info.site_module(mlp, "up") == (mlp.up_proj, False)
    assert info.fold_points("input") == [("gate_proj", True), ("up_proj", True)]
    assert info.fold_points("mid") == [("down_proj", True)]
    assert info.fold_points("gate") == [("gate_proj", False)]
    assert sorted(info.sites(), key=registry.site_order) == list(info.sites())


def test_phi3_packed_and_clip_non_gated():
    import transformers as T

    phi = T.Phi3ForCausalLM(T.Phi3Config(hidden_size=32, intermediate_size=24, num_hidden_layers=1,
                                         num_attention_heads=4, vocab_size=64, pad_token_id=0,
                                         eos_token_id=1, bos_token_id=1))
    (info,) = find_mlps(phi).values()
    assert info.layout == "packed" and info.intermediate_size == 24
    assert info.site("gate_up") == "model.layers.0.mlp.gate_up_proj"
    assert info.site_size("gate_up") == 48
    assert (info.site("input"), info.site_size("input")) == ("model.layers.0.mlp.input", 32)
    assert info.fold_points("input") == [("gate_up_proj", True)]
    with pytest.raises(ValueError, match="has no 'gate' site"):
        info.site("gate")

    clip = T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=32, intermediate_size=40,
                                                num_hidden_layers=1, num_attention_heads=2,
                                                image_size=28, patch_size=14))
    (info,) = find_mlps(clip).values()
    assert (info.class_name, info.layout, info.act) == ("CLIPMLP", "non_gated", "quick_gelu")
    assert list(info.sites().values()) == ["input", "fc1", "mid"]
    assert info.site_size("input") == 32 and info.fold_points("input") == [("fc1", True)]


class _CustomGated(nn.Module):
    """Not in the table: the generic rule must recognise it."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), \
            nn.Linear(12, 8)
        self.act_fn = nn.GELU(approximate="tanh")


def test_generic_rule_and_nesting():
    outer = nn.ModuleDict({"block": nn.ModuleDict({"ffn": _CustomGated()})})
    mlps = find_mlps(outer)
    assert list(mlps) == ["block.ffn"]
    assert mlps["block.ffn"].act == "gelu_tanh" and mlps["block.ffn"].layout == "gated"


def test_unknown_class_and_activation_errors_name_them():
    class WeirdMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.w1 = nn.Linear(4, 4)

    with pytest.raises(ValueError,
                       match="x.mlp is a WeirdMLP, not an MLP class the sgm-ext registry knows"):
        describe(WeirdMLP(), "x.mlp")

    m = _CustomGated()
    m.act_fn = nn.Tanh()
    with pytest.raises(ValueError, match=r"_CustomGated\.act_fn is Tanh"):
        find_mlps(nn.ModuleDict({"ffn": m}))


@pytest.mark.parametrize("fn,name", [(nn.SiLU(), "silu"), (nn.GELU(), "gelu"),
                                     (nn.ReLU(), "relu"), (torch.nn.functional.silu, "silu")])
def test_activation_name(fn, name):
    assert registry.activation_name(fn) == name


def test_input_norm_names_the_norm_whose_output_the_mlp_receives():
    """registry.input_norm on every test model (Llama's post_attention_layernorm, Gemma 3's
    pre_feedforward_layernorm beside its post_attention_layernorm, the vision towers'): the
    named norm's output is, tensor for tensor, what the MLP receives in a forward."""
    from patch_models import BUILDERS, build

    for name in BUILDERS:
        model, inputs = build(name)
        seen, handles, named = {}, [], {}
        for path in find_mlps(model):
            norm = registry.input_norm(model, path)
            assert norm is not None, f"{name}: no norm found for {path}"
            named[path] = norm
            handles.append(model.get_submodule(path).register_forward_pre_hook(
                lambda m, args, p=path, seen=seen: seen.setdefault(p, []).append(args[0])))
            handles.append(model.get_submodule(norm).register_forward_hook(
                lambda m, args, out, p=path, seen=seen: seen.setdefault(p + "#norm", [])
                .append(out)))
        with torch.no_grad():
            model(**inputs)
        for h in handles:
            h.remove()
        for path in named:
            assert seen.get(path) and len(seen[path]) == len(seen[path + "#norm"]), (name, path)
            assert all(torch.equal(a, b) for a, b in zip(seen[path], seen[path + "#norm"])), \
                (name, path, named[path])
        if name == "gemma3":
            assert named["model.language_model.layers.0.mlp"].endswith(
                "layers.0.pre_feedforward_layernorm")
        if name == "llama":
            assert named["model.layers.1.mlp"] == "model.layers.1.post_attention_layernorm"
