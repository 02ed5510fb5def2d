"""The profiler on tiny real transformers models: planted experts, pooling and masks,
modalities, spilling, resume, expertise files and scale methods."""
import os

import numpy as np
import pytest
import torch
from _profile_models import VOCAB, planted_llama, planted_rows, planted_sites, tokenizer
from PIL import Image
from sklearn.metrics import roc_auc_score
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

import sgm_ext
from sgm_ext import profile as P
from sgm_ext.profile.expertise import shuffled_label_experts


@pytest.fixture(scope="module")
def planted():
    return planted_llama(), tokenizer(), planted_rows()


def _full_mid(model, layers_path, layer, inputs):
    """The whole mid activation [1, T, I] of one layer for one unpadded input (reference)."""
    got = {}
    down = layers_path[layer].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, args: got.update(x=args[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    return got["x"].double()


# ------------------------------------------------------------------ planted experts

def test_planted_experts_recovered_and_scaled(planted):
    model, tok, rows = planted
    responses = P.collect(model, rows, processor=tok, batch_size=8)
    assert len(responses) == len(rows)
    exp = P.expertise(responses)
    # the AUROC of each site's neurons is sklearn's on the collected responses
    y = responses.labels.numpy()
    for site in exp.auroc:
        ref = [roc_auc_score(y, responses[site][:, j].double().numpy()) for j in range(64)]
        np.testing.assert_allclose(exp.auroc[site].numpy(), ref, rtol=0, atol=1e-9)
    scales = exp.to_scales(method="aura", threshold=0.8)
    found = {site: set((t < 1).nonzero().flatten().tolist()) for site, t in scales.items()}
    for site, truth in planted_sites().items():
        hit = len(found[site] & truth)
        assert hit / max(len(found[site]), 1) >= 0.9, (site, found[site], truth)  # precision
        assert hit / len(truth) >= 0.9, (site, found[site], truth)  # recall
        a = exp.auroc[site]
        expert = a > 0.8
        expected = torch.where(expert, 1 - 2 * (a - 0.5), torch.ones_like(a)).float()
        torch.testing.assert_close(scales[site], expected, rtol=0, atol=1e-7)
    half = exp.to_scales(method="aura", threshold=0.8, strength=0.5)
    for site in scales:
        torch.testing.assert_close(half[site], 1 - 0.5 * (1 - scales[site]), rtol=0, atol=1e-7)

    # Patched with the scales, the last layer's MLP output is down_proj(mid * scale): the
    # planted neurons' contribution is cut as the formula says.
    site = "model.layers.1.mlp.mid"
    mlp = model.model.layers[1].mlp
    inputs = tok(rows[0]["text"], return_tensors="pt")
    mid = _full_mid(model, model.model.layers, 1, inputs).float()
    expected = mlp.down_proj(mid * scales[site])
    out = {}
    h = mlp.register_forward_hook(lambda m, a, o: out.update(y=o.detach().clone()))
    try:
        with sgm_ext.patched(model, scales, mode="hook"), torch.no_grad():
            model(**inputs)
    finally:
        h.remove()
    torch.testing.assert_close(out["y"], expected, rtol=1e-5, atol=1e-5)
    assert (mlp.down_proj(mid) - expected).abs().max() > 1e-2  # the scales did change it


def test_bf16_model_recovers_planted_experts(planted):
    model = planted_llama().to(torch.bfloat16)
    _, tok, rows = planted
    exp = P.run(model, rows, processor=tok, batch_size=16)
    chosen = exp.experts(threshold=0.8)
    for site, truth in planted_sites().items():
        assert set(chosen[site].nonzero().flatten().tolist()) == truth


# ------------------------------------------------------------------ pooling and masks

@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_pooling_masks_padding(planted, padding_side):
    model, tok, rows = planted
    rows = rows[:7]  # lengths differ: every batch of 3 is padded
    site = "model.layers.1.mlp.mid"
    refs = []
    for row in rows:
        mid = _full_mid(model, model.model.layers, 1, tok(row["text"], return_tensors="pt"))[0]
        refs.append({"mean": mid.mean(0), "max": mid.max(0).values, "last": mid[-1]})
    for pooling in P.POOLINGS:
        r = P.collect(model, rows, processor=tok, sites=[site], pooling=pooling, batch_size=3,
                      padding_side=padding_side)
        expected = torch.stack([ref[pooling] for ref in refs]).float()
        torch.testing.assert_close(r[site], expected, rtol=1e-4, atol=1e-5)


def test_site_kinds_and_names(planted):
    model, tok, rows = planted
    r = P.collect(model, rows[:4], processor=tok,
                  sites=("gate", "down", "model.layers.0.mlp.up_proj"))
    assert r.neurons == {"model.layers.0.mlp.gate_proj": 64, "model.layers.1.mlp.gate_proj": 64,
                         "model.layers.0.mlp.down_proj": 32, "model.layers.1.mlp.down_proj": 32,
                         "model.layers.0.mlp.up_proj": 64}
    inputs = tok(rows[0]["text"], return_tensors="pt")
    with torch.no_grad():
        x = model.model.embed_tokens(inputs["input_ids"])
        up = model.model.layers[0].mlp.up_proj(model.model.layers[0].post_attention_layernorm(x))
    torch.testing.assert_close(r["model.layers.0.mlp.up_proj"][0], up[0].mean(0),
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="unknown site 'neuron'"):
        P.collect(model, rows, processor=tok, sites=("neuron",))
    with pytest.raises(ValueError, match="pooling must be one of"):
        P.collect(model, rows, processor=tok, pooling="median")
    with pytest.raises(ValueError, match="modality must be one of"):
        P.collect(model, rows, processor=tok, modality="audio")


def test_response_modality_pools_the_reply_only(planted):
    model, _, _ = planted
    tok = tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} </s> "
                         "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    rows = [{"text": "word1 word2 tox1", "response": "word3 tox2 word4 word5", "label": 1},
            {"text": "word7", "response": "word8 word9", "label": 0},
            {"text": "word1 word3 word5 word7 word9", "response": "word11", "label": 0}]
    site = "model.layers.0.mlp.mid"
    r = P.collect(model, rows, processor=tok, sites=[site], modality="response", batch_size=3,
                  padding_side="left")
    for i, row in enumerate(rows):
        # the template renders "user <text> </s> assistant <response> </s>": the tokens after
        # the prompt are the response's words and the closing "</s>"
        full = tok(f"user {row['text']} </s> assistant {row['response']} </s>",
                   return_tensors="pt", add_special_tokens=False)
        mid = _full_mid(model, model.model.layers, 0, full)[0]
        n_reply = len(row["response"].split()) + 1
        torch.testing.assert_close(r[site][i], mid[-n_reply:].mean(0).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="row 1: modality='response' needs a response"):
        P.collect(model, [{"text": "word1", "label": 1}], processor=tok, modality="response")
    # "all" pools every token the model reads: the template, the prompt and the response
    every = P.collect(model, rows, processor=tok, sites=[site], modality="all", batch_size=3,
                      padding_side="left")
    raw = P.collect(model, rows, processor=tok, sites=[site], modality="all", batch_size=3,
                    input_format="raw")
    for i, row in enumerate(rows):
        full = tok(f"user {row['text']} </s> assistant {row['response']} </s>",
                   return_tensors="pt", add_special_tokens=False)
        mid = _full_mid(model, model.model.layers, 0, full)[0]
        torch.testing.assert_close(every[site][i], mid.mean(0).float(), rtol=1e-4, atol=1e-5)
        plain = tok(f"{row['text']} {row['response']}", return_tensors="pt")
        mid = _full_mid(model, model.model.layers, 0, plain)[0]
        torch.testing.assert_close(raw[site][i], mid.mean(0).float(), rtol=1e-4, atol=1e-5)


def _tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=28, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=len(VOCAB))
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=VOCAB["<image>"],
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config).eval()
    images = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer(), patch_size=14,
                               vision_feature_select_strategy="default", image_token="<image>",
                               num_additional_image_tokens=1)
    return model, processor


def test_image_and_text_modalities_on_llava(tmp_path):
    model, processor = _tiny_llava()
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (90, 90, 90)]
    rows = []
    for i, color in enumerate(colors):
        Image.new("RGB", (30 + 7 * i, 28), color).save(tmp_path / f"im{i}.png")
        rows.append({"text": " ".join(["word1", "tox2", "word3"][: i + 1]),
                     "image": str(tmp_path / f"im{i}.png"), "label": i % 2})
    rows.append({"text": "word5 word6", "label": 1})  # text-only row in the same batch
    # only the language model's MLPs are profiled by default (the CLIP tower's are not)
    assert P.resolve_sites(model).keys() == {"model.language_model.layers.0.mlp.mid",
                                             "model.language_model.layers.1.mlp.mid"}
    site = "model.language_model.layers.1.mlp.mid"
    layers = model.model.language_model.layers
    got = {m: P.collect(model, rows[:4] if m == "image" else rows, processor=processor,
                        sites=[site], modality=m, batch_size=5 if m != "image" else 4)
           for m in ("all", "image", "text")}
    for i, row in enumerate(rows):
        image = Image.open(row["image"]).convert("RGB") if "image" in row else None
        text = ("<image>\n" if image else "") + row["text"]
        enc = processor(text=[text], images=[image] if image else None, return_tensors="pt")
        mid = _full_mid(model, layers, 1, enc)[0]
        is_image = enc["input_ids"][0] == VOCAB["<image>"]
        assert is_image.sum() == (4 if image else 0)
        torch.testing.assert_close(got["all"][site][i], mid.mean(0).float(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got["text"][site][i], mid[~is_image].mean(0).float(),
                                   rtol=1e-4, atol=1e-5)
        if image:
            torch.testing.assert_close(got["image"][site][i], mid[is_image].mean(0).float(),
                                       rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="row 5 has no tokens to pool for modality='image'"):
        P.collect(model, rows, processor=processor, sites=[site], modality="image")


# ------------------------------------------------------------------ memory, resume

def test_spill_to_disk_gives_the_same_responses(planted, tmp_path):
    model, tok, rows = planted
    plain = P.collect(model, rows, processor=tok, batch_size=8)
    assert not plain.spilled
    spill = tmp_path / "spill"
    small = P.collect(model, rows, processor=tok, batch_size=8, ram_budget=4096,
                      spill_dir=str(spill))
    assert small.spilled and len(os.listdir(spill)) == 2  # one raw file per site
    one_batch = 8 * (64 + 64) * 4
    assert small._ram_bytes <= 4096 + one_batch  # never more than the budget plus a batch
    for site in plain:
        assert torch.equal(small[site], plain[site])
    for name in os.listdir(spill):  # read back from the files: 48 rows x 64 float32 each
        assert os.path.getsize(spill / name) == len(rows) * 64 * 4
    assert torch.equal(P.expertise(small).auroc[site], P.expertise(plain).auroc[site])


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_equals_plain_run(planted, tmp_path):
    model, tok, rows = planted
    plain = P.collect(model, rows, processor=tok, batch_size=5)
    ckpt = str(tmp_path / "ckpt")
    calls = {"n": 0}

    def stop_at_seventh(module, args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise _Interrupt()

    h = model.model.register_forward_pre_hook(stop_at_seventh)
    try:
        with pytest.raises(_Interrupt):
            P.collect(model, rows, processor=tok, batch_size=5, checkpoint_dir=ckpt,
                      checkpoint_every=2)
        calls["n"] = 0
        resumed = P.collect(model, rows, processor=tok, batch_size=5, checkpoint_dir=ckpt,
                            checkpoint_every=2)
    finally:
        h.remove()
    # 10 batches: 6 ran, the last checkpoint was after 6, so the rerun does batches 7 to 10
    assert calls["n"] == 4
    assert resumed.labels.tolist() == plain.labels.tolist()
    for site in plain:
        assert torch.equal(resumed[site], plain[site])
    with pytest.raises(ValueError, match="differs in: pooling"):
        P.collect(model, rows, processor=tok, batch_size=5, checkpoint_dir=ckpt, pooling="max")


# ------------------------------------------------------------------ expertise and scales

def test_expertise_from_mapping_save_load_and_scale_methods(tmp_path):
    auroc_values = {"a.mid": torch.tensor([0.9, 0.5, 0.7, 0.2], dtype=torch.float64),
                    "b.mid": torch.tensor([0.95, 0.6], dtype=torch.float64)}
    exp = P.Expertise(auroc_values, {"model_type": "llama", "pooling": "max"})
    exp.save(tmp_path / "e.safetensors")
    back = P.Expertise.load(tmp_path / "e.safetensors")
    assert back.metadata == exp.metadata
    for site in auroc_values:
        assert torch.equal(back.auroc[site], auroc_values[site])

    with pytest.raises(ValueError, match="does not say how many toxic and non-toxic rows"):
        exp.to_scales()  # the default fdr selection needs the sample counts

    def aura_rule(**options):  # AurA's plain threshold selection
        return exp.to_scales(selection="threshold", **options)

    s = aura_rule()  # aura, threshold 0.5
    torch.testing.assert_close(s["a.mid"], torch.tensor([0.2, 1.0, 0.6, 1.0]))
    torch.testing.assert_close(s["b.mid"], torch.tensor([0.1, 0.8]))
    assert s.metadata["method"] == "aura" and s.metadata["pooling"] == "max"
    s = aura_rule(top_k=2)  # the two highest over both sites: b[0] and a[0]
    torch.testing.assert_close(s["a.mid"], torch.tensor([0.2, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(s["b.mid"], torch.tensor([0.1, 1.0]))
    s = aura_rule(method="det0", top_k=3, strength=0.5)
    torch.testing.assert_close(s["a.mid"], torch.tensor([0.5, 1.0, 0.5, 1.0]))
    torch.testing.assert_close(s["b.mid"], torch.tensor([0.5, 1.0]))
    s = aura_rule(method="damp", alpha=0.25, threshold=0.65)
    torch.testing.assert_close(s["a.mid"], torch.tensor([0.25, 1.0, 0.25, 1.0]))
    assert aura_rule(strength=0.0)["a.mid"].eq(1).all()  # strength 0 is a no-op
    for kwargs, msg in [({"method": "zero"}, "method must be one of"),
                        ({"strength": 1.5}, "strength must be in"),
                        ({"method": "damp"}, "needs alpha"),
                        ({"alpha": 0.3}, "alpha is for method 'damp' only"),
                        ({"top_k": -1}, "top_k must be")]:
        with pytest.raises(ValueError, match=msg):
            aura_rule(**kwargs)

    x = {"s": torch.tensor([[1.0, 3.0], [2.0, 3.0], [3.0, 3.0]])}
    e = P.expertise(x, torch.tensor([0, 1, 1]))
    torch.testing.assert_close(e.auroc["s"], torch.tensor([1.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="labels are needed"):
        P.expertise(x)


def test_accelerate_offloaded_model_gives_the_same_responses(planted, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, rows = planted
    model.save_pretrained(tmp_path / "m")
    # layer 1 and the embedding live on disk: accelerate hooks load them for each forward
    device_map = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    offloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m", device_map=device_map,
                                                     offload_folder=str(tmp_path / "off"))
    assert offloaded.model.layers[1].mlp.down_proj.weight.device.type == "meta"
    got = P.collect(offloaded, rows[:10], processor=tok, batch_size=4)
    ref = P.collect(model, rows[:10], processor=tok, batch_size=4)
    for site in ref:
        torch.testing.assert_close(got[site], ref[site], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["Qwen2", "Gemma", "Phi3"])
def test_other_registry_architectures(planted, arch):
    import transformers

    _, tok, rows = planted
    config = getattr(transformers, f"{arch}Config")(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, vocab_size=64, pad_token_id=0)
    torch.manual_seed(0)
    model = getattr(transformers, f"{arch}ForCausalLM")(config).eval()
    kinds = ("mid", "gate_up") if arch == "Phi3" else ("mid", "up")
    r = P.collect(model, rows[:5], processor=tok, sites=kinds, batch_size=5, padding_side="left")
    mlp = model.model.layers[1].mlp
    second = "gate_up_proj" if arch == "Phi3" else "up_proj"
    assert r.neurons["model.layers.1.mlp.mid"] == 48
    assert r.neurons[f"model.layers.1.mlp.{second}"] == (96 if arch == "Phi3" else 48)
    for i, row in enumerate(rows[:5]):
        got = {}
        hooks = [mlp.down_proj.register_forward_pre_hook(
                     lambda m, a, got=got: got.update(mid=a[0][0])),
                 getattr(mlp, second).register_forward_hook(
                     lambda m, a, o, got=got: got.update(lin=o[0]))]
        with torch.no_grad():
            model(**tok(row["text"], return_tensors="pt"))
        for h in hooks:
            h.remove()
        torch.testing.assert_close(r["model.layers.1.mlp.mid"][i], got["mid"].mean(0),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(r[f"model.layers.1.mlp.{second}"][i], got["lin"].mean(0),
                                   rtol=1e-4, atol=1e-5)


def test_modality_image_skips_rows_without_an_image_when_asked(tmp_path):
    model, processor = _tiny_llava()
    Image.new("RGB", (30, 28), (200, 10, 10)).save(tmp_path / "im.png")
    rows = [{"text": "word1 tox2", "image": str(tmp_path / "im.png"), "label": i % 2}
            for i in range(4)]
    rows.insert(2, {"text": "word5 word6", "label": 1})  # row 3: no image
    site = "model.language_model.layers.1.mlp.mid"
    with pytest.raises(ValueError, match="row 3 has no tokens to pool for modality='image': "
                       "it has no image .1 rows have none; --skip-bad-rows skips them"):
        P.collect(model, rows, processor=processor, sites=[site], modality="image")
    with pytest.warns(UserWarning, match=r"skipped 1 rows without an image .modality 'image'; "
                      r"the first: row 3\)"):
        got = P.collect(model, rows, processor=processor, sites=[site], modality="image",
                        skip_bad_rows=True)
    assert len(got) == 4 and got.labels.tolist() == [0, 1, 0, 1]


# ------------------------------------------------------------------ selection against chance

def test_fdr_selection_finds_the_planted_neurons_and_nothing_on_shuffled_labels(planted):
    model, tok, rows = planted
    responses = P.collect(model, rows, processor=tok, batch_size=8)
    exp = P.expertise(responses)
    chosen = exp.experts()  # the default: fdr 0.05, AUROC > 0.5
    found = {(s, int(i)) for s, c in chosen.items() for i in c.nonzero().flatten()}
    truth = {(s, i) for s, idx in planted_sites().items() for i in idx}
    assert len(found & truth) / len(found) >= 0.9 and len(found & truth) / len(truth) >= 0.9
    # AurA's plain rule takes about half of all neurons with these 48 rows
    aura = sum(int(c.sum()) for c in exp.experts(selection="threshold").values())
    assert aura > 30
    # shuffled labels: at most the FDR level's share of the neurons, reproducible by seed
    total = sum(a.numel() for a in exp.auroc.values())
    floors = [shuffled_label_experts(responses, seed=s) for s in (0, 1, 2, 0)]
    assert all(f <= 0.05 * total for f in floors) and floors[0] == floors[3]
    assert shuffled_label_experts(responses, selection="threshold", seed=0) > 30
    scales = exp.to_scales()
    assert scales.metadata["selection"] == "fdr" and scales.metadata["fdr"] == "0.05"
    with pytest.raises(ValueError, match="fdr must be a level in"):
        exp.experts(fdr=0.0)
    with pytest.raises(ValueError, match="selection must be one of"):
        exp.experts(selection="aura")


# ------------------------------------------------------------------ input format and pooled tokens

TEMPLATE = ("{% for m in messages %}word1 word2 word3 {{ m['content'] }} word4"
            "{% endfor %}{% if add_generation_prompt %} word5{% endif %}")


def test_chat_format_pools_over_the_row_not_the_template(planted):
    model, _, rows = planted
    tok = tokenizer()
    tok.chat_template = TEMPLATE  # a constant "system prompt" around every row
    site = "model.layers.1.mlp.mid"
    layers = model.model.layers
    sample = P.collect(model, rows[:6], processor=tok, sites=[site], batch_size=3)
    every = P.collect(model, rows[:6], processor=tok, sites=[site], batch_size=3,
                      modality="all")
    raw = P.collect(model, rows[:6], processor=tok, sites=[site], batch_size=3,
                    input_format="raw")
    assert sample.metadata["modality"] == "sample" and sample.metadata["input_format"] == "chat"
    for i, row in enumerate(rows[:6]):
        n = len(row["text"].split())
        templated = tok(f"word1 word2 word3 {row['text']} word4 word5", return_tensors="pt")
        mid = _full_mid(model, layers, 1, templated)[0]
        torch.testing.assert_close(sample[site][i], mid[3:3 + n].mean(0).float(),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(every[site][i], mid.mean(0).float(), rtol=1e-4, atol=1e-5)
        plain = _full_mid(model, layers, 1, tok(row["text"], return_tensors="pt"))[0]
        torch.testing.assert_close(raw[site][i], plain.mean(0).float(), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="format 'chat' needs a chat template"):
        P.collect(model, rows[:2], processor=tokenizer(), input_format="chat")
    with pytest.raises(ValueError, match="format must be one of"):
        P.collect(model, rows[:2], processor=tok, input_format="markdown")
