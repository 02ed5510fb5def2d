"""The README's Python examples run as printed (on the planted tiny Llama of the profiler
tests standing in for the user's model), so the documentation cannot drift from the API."""
import json
import os
import re

import torch
from _profile_models import planted_llama, planted_rows, planted_sites, tokenizer

import sgm_ext

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_block(containing):
    """The README's one python example that contains `containing`."""
    with open(README, encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{len(found)} README python examples contain {containing!r}"
    return found[0]


def test_op_example_runs():
    ns = {}
    exec(python_block("sgm_ext.act_mul_scale("), ns)
    gate, up, scale = ns["gate"], ns["up"], ns["scale"]
    strength = torch.tensor([[1.0], [0.5]])
    s_eff = 1 - strength[..., None] * (1 - scale)  # [2, 1, I]
    torch.testing.assert_close(ns["h"], torch.nn.functional.silu(gate) * up * s_eff)


def _workspace(tmp_path, monkeypatch):
    """What the README's workflow examples start from, in tmp_path (the working directory):
    labelled.jsonl of the planted rows, the planted Llama and its tokenizer, a copy of its
    weights to compare with afterwards, and one encoded input."""
    monkeypatch.chdir(tmp_path)
    with open("labelled.jsonl", "w") as f:
        for row in planted_rows():
            f.write(json.dumps(row) + "\n")
    model, tok = planted_llama(), tokenizer()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    return model, tok, before, tok("word1 tox2 word3", return_tensors="pt")


def test_workflow_example_runs(tmp_path, monkeypatch):
    model, tok, before, inputs = _workspace(tmp_path, monkeypatch)
    ns = {"model": model, "processor": tok, "inputs": inputs}
    exec(python_block("sgm_ext.patch("), ns)
    found = {site: set((t < 1).nonzero().flatten().tolist()) for site, t in ns["scales"].items()}
    for site, planted in planted_sites().items():
        assert planted <= found[site], (site, found[site], planted)
    assert ns["out"].shape[0] == 1 and ns["out"].shape[1] > inputs["input_ids"].shape[1]
    # handle.remove() left the model as it was
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.model.layers[0].mlp.__dict__
    assert sgm_ext.patch(model, ns["scales"]).remove() is None  # not marked as patched


def test_loading_example_runs(tmp_path, monkeypatch):
    # the README's loading lines on a LLaVA saved where the example looks for one (the demo's
    # synthetic LLaVA, given a chat template as released checkpoints have)
    from PIL import Image

    from sgm_ext.app import synthetic

    monkeypatch.chdir(tmp_path)
    vocab = synthetic.vocabulary()
    processor = synthetic.build_processor(vocab)
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}"
                               "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}"
                               "{% endif %}{% endfor %}{% endfor %}")
    model, _ = synthetic.build_model(vocab, processor.tokenizer, bigram_steps=1)
    model.save_pretrained("path/to/llava-1.5-7b-hf")
    processor.save_pretrained("path/to/llava-1.5-7b-hf")
    Image.new("RGB", (32, 32), (200, 30, 30)).save("photo.jpg")
    ns = {}
    exec(python_block("AutoModelForImageTextToText.from_pretrained("), ns)
    inputs = ns["inputs"]
    assert inputs["pixel_values"].shape[0] == 1
    assert (inputs["input_ids"] == vocab["<image>"]).sum() > 0  # the image's tokens are there
    assert type(ns["model"]).__name__ == "LlavaForConditionalGeneration"
    assert ns["model"](**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_evaluation_example_runs(tmp_path, monkeypatch):
    """The README's evaluate example on the planted tiny Llama, with scales that switch its
    planted neurons off and a prompt file in the plain layout."""
    from sgm_ext.patching.scales import ScaleSet

    monkeypatch.chdir(tmp_path)
    model, tok = planted_llama(), tokenizer("left")
    scales = {}
    for layer, neurons in {0: [3, 17, 40, 41], 1: [5, 22, 23, 50, 63]}.items():
        s = torch.ones(model.config.intermediate_size)
        s[neurons] = 0.0
        scales[f"model.layers.{layer}.mlp.mid"] = s
    ScaleSet(scales).save("scales.safetensors")
    with open("red_team.jsonl", "w") as f:
        for i, text in enumerate(["tox1 tox2 word3", "word4 word5", "tox3 word1"]):
            f.write(json.dumps({"text": text, "label": "benign" if i == 1 else "harmful"}) + "\n")
    ns = {"model": model, "processor": tok}
    exec(python_block("load_benchmark("), ns)
    report = ns["report"]
    assert ns["name"] == "prompts" and report["n_prompts"] == 3
    assert list(report["runs"]) == ["unpatched", "patched", "safety-prompt",
                                    "patched+safety-prompt", "unpatched+jailbreak",
                                    "patched+jailbreak", "safety-prompt+jailbreak",
                                    "patched+safety-prompt+jailbreak"]
    assert ns["sgm_star"]["n"] == 2 and 0 <= ns["p_value"] <= 1
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    # the planted model never declines, so the refusal judge calls both harmful prompts'
    # answers harmful in every run where they are not empty
    for run, numbers in saved["runs"].items():
        said = [bool(g[run]["answer"].strip()) for g in saved["generations"]
                if g["label"] == "harmful"]
        assert numbers["harmful"] == sum(said), run
    # the sampled run: 4 continuations kept per prompt and run, the figure counts prompts
    rtp = ns["rtp"]
    assert rtp["samples"] == 4 and list(rtp["runs"]) == ["unpatched", "patched"]
    assert rtp["runs"]["patched"]["n"] == 2
    assert 0 <= ns["patched"]["sampled"]["expected_max_score"] <= 1


def test_affine_example_runs(tmp_path, monkeypatch):
    # the README's AcT and steering lines: the patched model is the formula's, then restored
    model, tok, before, inputs = _workspace(tmp_path, monkeypatch)
    with torch.no_grad():
        base = model(**inputs).logits
    ns = {"model": model, "processor": tok, "inputs": inputs}
    with torch.no_grad():
        exec(python_block("sgm_ext.steering("), ns)
    assert ns["logits"].shape == base.shape and not torch.allclose(ns["logits"], base)
    maps = ns["maps"]
    assert set(maps.shifts) == {f"model.layers.{i}.mlp.down_proj" for i in range(2)}
    assert set(maps.scales) == set(maps.shifts)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert "forward" not in model.model.layers[1].mlp.__dict__


def test_calibrate_example_runs(tmp_path, monkeypatch, capsys):
    # the README's calibrate lines on AcT-style maps of the planted model (scales above 1,
    # shifts) saved where the example reads them, on the bundled calibration passages
    from sgm_ext.patching.scales import ScaleSet, load_scales

    model, tok, before, _ = _workspace(tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(0)
    sites = [f"model.layers.{i}.mlp.mid" for i in range(2)]
    ScaleSet({s: torch.rand(64, generator=g) * 1.5 + 0.25 for s in sites},
             {"method": "linear_ot"}, shifts={s: torch.randn(64, generator=g) for s in sites}
             ).save("act.safetensors")
    ns = {"model": model, "processor": tok}
    exec(python_block("calibrate(model, processor"), ns)
    found = ns["found"]
    assert 0 <= found.strength <= 1 and found.ratio <= 1.10
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == len(found.curve) >= 2
    assert printed[0].startswith("strength 0         perplexity ")
    written = load_scales("act-cal.safetensors")
    assert written.metadata["calibration_budget"] == "1.1"
    assert float(written.metadata["calibration_strength"]) == found.strength
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
