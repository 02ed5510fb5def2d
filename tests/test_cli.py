"""`sgm-ext profile` / `inspect` on a saved tiny model; 2 processes under torchrun."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from _profile_models import planted_llama, planted_rows, planted_sites, tokenizer
from cli_runs import HANG_S, ROOT

from sgm_ext import profile as P
from sgm_ext.cli import main
from sgm_ext.patching.scales import load_scales


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model, tok = planted_llama(), tokenizer()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rows = planted_rows()
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model, tok, rows


def test_profile_writes_scales_table_and_plot(saved, capsys):
    root, model, tok, rows = saved
    out = root / "scales.safetensors"
    rc = main(["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
               "--out", str(out), "--threshold", "0.8", "--batch-size", "6", "--quiet",
               "--expertise-out", str(root / "auroc.safetensors")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "total experts: 9 of 128" in text
    assert "    1  mid            64        5     1.0000  model.layers.1.mlp.mid" in text
    with open(root / "scales.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    scales = load_scales(out)
    for site, truth in planted_sites().items():
        assert set((scales[site] < 1).nonzero().flatten().tolist()) == truth
    # the same numbers as the Python API on the same model and rows
    api = P.run(model, rows, processor=tok, batch_size=6).to_scales(threshold=0.8)
    for site in api.scales:
        assert torch.equal(scales[site], api[site])
    assert scales.metadata["threshold"] == "0.8" and scales.metadata["model_type"] == "llama"
    assert P.Expertise.load(root / "auroc.safetensors").auroc.keys() == api.scales.keys()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "ScaleSet(2 sites, 128 neurons, 9 damped)" in text
    assert "      64       5  0.0000" in text and "method: aura" in text


def _header_and_data(path):
    """A safetensors file as (its header, parsed; the bytes of its tensors)."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + size]), raw[8 + size:]


@pytest.mark.parametrize("argv, options", [
    (["--threshold", "0.8", "--top-k", "7", "--method", "damp", "--alpha", "0.25"],
     dict(threshold=0.8, top_k=7, method="damp", alpha=0.25)),
    (["--selection", "threshold", "--threshold", "0.3", "--allow-amplify", "--strength", "0.5"],
     dict(selection="threshold", threshold=0.3, allow_amplify=True, strength=0.5)),
    (["--method", "mean_ot", "--balanced", "--pooling", "max"],
     dict(method="mean_ot", balanced=True, pooling="max")),
])
def test_profile_model_writes_the_command_lines_scale_file(saved, tmp_path, capsys, argv,
                                                           options):
    # sgm_ext.profile.profile_model is the workflow `sgm-ext profile` runs: the same options
    # give the same scale file, its header equal and its tensor bytes identical (the header's
    # keys are written in a random order by safetensors, so two runs of the command differ there)
    root, model, tok, rows = saved
    cli_out, api_out = tmp_path / "cli.safetensors", tmp_path / "api.safetensors"
    rc = main(["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
               "--out", str(cli_out), "--batch-size", "6", "--quiet", "--no-plot", *argv])
    assert rc == 0
    printed = capsys.readouterr().out
    found = P.profile_model(model, str(root / "data.jsonl"),
                            P.ProfileOptions(batch_size=6, **options), processor=tok)
    found.scales.save(api_out)
    assert _header_and_data(api_out) == _header_and_data(cli_out)
    cli, api = load_scales(cli_out), load_scales(api_out)
    assert cli.metadata == api.metadata and cli.scales.keys() == api.scales.keys()
    for site in cli.scales:
        assert torch.equal(cli[site], api[site])
    if found.noise_floor is not None:  # the AUROC methods: the counts the command printed
        assert (f"experts ({found.rule()}): {found.n_experts}; with the labels shuffled (the "
                f"noise floor, one permutation): {found.noise_floor}") in printed
    else:
        assert "(mean_ot: 128 neurons moved)" in printed and found.experts is None


def test_profile_bad_row_stops_or_is_skipped(saved, capsys):
    root = saved[0]
    data = root / "bad.csv"
    data.write_text("text,label\nword1 tox1,toxic\nword2,0\nword3,maybe\nword4 word5,1\nword6,0\n")
    args = ["profile", "--model", str(root / "model"), "--data", str(data),
            "--out", str(root / "bad.safetensors"), "--quiet", "--no-plot"]
    assert main(args) == 2
    assert "row 3 (line 4): unknown label 'maybe'" in capsys.readouterr().err
    assert not (root / "bad.safetensors").exists()
    assert main(args + ["--skip-bad-rows"]) == 0
    captured = capsys.readouterr()
    assert "skipped 1 bad rows (first: row 3" in captured.err
    assert "from 4 samples (2 toxic)" in captured.out


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_write_the_plain_run_scale_file(saved, tmp_path):
    root = saved[0]
    common = ["--model", str(root / "model"), "--data", str(root / "data.jsonl"),
              "--batch-size", "5", "--selection", "threshold", "--threshold", "0.6", "--quiet",
              "--no-plot"]
    single = tmp_path / "single.safetensors"
    assert main(["profile", *common, "--out", str(single)]) == 0
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    two = tmp_path / "two.safetensors"
    proc = subprocess.run(
        [torchrun, "--nnodes=1", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={_free_port()}", "-m", "sgm_ext", "profile", *common, "--out", str(two),
         "--checkpoint-dir", str(tmp_path / "ckpt")],
        env=env, capture_output=True, text=True, timeout=HANG_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # 48 rows in batches of 5: 10 batches, dealt out 5 to each rank
    for rank in (0, 1):
        with open(tmp_path / "ckpt" / f"rank{rank}" / "state.json") as f:
            assert json.load(f)["batches_done"] == 5
    a, b = load_scales(single), load_scales(two)
    assert a.scales.keys() == b.scales.keys() and a.metadata == b.metadata
    for site in a.scales:
        assert torch.equal(a[site], b[site])
    # AurA's threshold rule at 0.6 takes noise too (the default fdr selection: the 9 planted)
    assert sum(int((t < 1).sum()) for t in b.scales.values()) > 9


# Each recipe against the flags that spell it out, written here by hand from the peers' own
# settings (not read from RECIPES): the same scale file either way.
RECIPE_FLAGS = {
    "aura": ["--sites", "up", "down", "--pooling", "max", "--modality", "all",
             "--selection", "threshold", "--threshold", "0.5"],
    "aura-vl": ["--sites", "up", "--pooling", "mean", "--modality", "all", "--selection",
                "threshold", "--threshold", "0.3", "--allow-amplify"],
    "act-linear": ["--sites", "gate", "up", "down", "--pooling", "mean", "--modality", "all",
                   "--method", "linear_ot", "--balanced", "--allow-amplify"],
    "act-gaussian": ["--sites", "gate", "up", "down", "--pooling", "mean", "--modality", "all",
                     "--method", "gaussian_ot", "--balanced", "--allow-amplify"],
    "act-input": ["--sites", "input", "--pooling", "mean", "--modality", "all", "--method",
                  "linear_ot", "--balanced", "--allow-amplify"],
    "aura-input": ["--sites", "input", "--pooling", "max", "--modality", "all", "--selection",
                   "threshold", "--threshold", "0.5"],
}


@pytest.mark.parametrize("name", sorted(RECIPE_FLAGS))
def test_recipe_sets_the_options_it_names(saved, tmp_path, capsys, name):
    root = saved[0]
    common = ["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
              "--batch-size", "6", "--quiet", "--no-plot"]
    by_name, by_flags = tmp_path / "recipe.safetensors", tmp_path / "flags.safetensors"
    assert main([*common, "--out", str(by_name), "--recipe", name]) == 0
    printed = capsys.readouterr().out
    assert f"recipe {name}:" in printed and "sets sites=" in printed
    assert main([*common, "--out", str(by_flags), *RECIPE_FLAGS[name]]) == 0
    a, b = load_scales(by_name), load_scales(by_flags)
    assert a.metadata.pop("recipe") == name and "recipe" not in b.metadata
    assert a.metadata == b.metadata and a.scales.keys() == b.scales.keys()
    assert a.scales  # something was written to compare
    for site in a.scales:
        assert torch.equal(a[site], b[site])
        assert torch.equal(a.shifts.get(site, torch.zeros(0)), b.shifts.get(site, torch.zeros(0)))
    kinds = {site.rsplit(".", 1)[1] for site in a.scales}
    assert kinds == {"aura": {"up_proj", "down_proj"}, "aura-vl": {"up_proj"},
                     "act-input": {"input"}, "aura-input": {"input"}}.get(
        name, {"gate_proj", "up_proj", "down_proj"})


def test_recipe_act_top_sets_the_options_it_names(saved, tmp_path, capsys):
    """act-top pools over responses: rows whose response is the planted sentence."""
    root = saved[0]
    data = tmp_path / "responses.jsonl"
    data.write_text("".join(json.dumps({"text": "word0 word1", "response": r["text"],
                                        "label": r["label"]}) + "\n" for r in saved[3]))
    common = ["profile", "--model", str(root / "model"), "--data", str(data), "--batch-size",
              "6", "--quiet", "--no-plot", "--top-k", "9"]
    by_name, by_flags = tmp_path / "recipe.safetensors", tmp_path / "flags.safetensors"
    assert main([*common, "--out", str(by_name), "--recipe", "act-top"]) == 0
    printed = capsys.readouterr().out
    assert "recipe act-top:" in printed and "yours kept: --top-k 9" in printed
    assert main([*common, "--out", str(by_flags), "--sites", "mid", "--pooling", "mean",
                 "--modality", "response", "--method", "linear_ot", "--balanced",
                 "--allow-amplify"]) == 0
    a, b = load_scales(by_name), load_scales(by_flags)
    assert a.metadata.pop("recipe") == "act-top"
    assert a.metadata == b.metadata and a.metadata["modality"] == "response"
    assert a.changed() == 9
    for site in a.scales:
        assert torch.equal(a[site], b[site]) and torch.equal(a.shifts[site], b.shifts[site])


def test_recipe_keeps_an_option_the_user_set(saved, tmp_path, capsys):
    root = saved[0]
    out = tmp_path / "s.safetensors"
    assert main(["profile", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
                 "--batch-size", "6", "--quiet", "--no-plot", "--out", str(out), "--recipe",
                 "aura", "--threshold", "0.8"]) == 0
    assert "yours kept: --threshold 0.8" in capsys.readouterr().out
    scales = load_scales(out)
    assert scales.metadata["threshold"] == "0.8" and scales.metadata["pooling"] == "max"


def _subcommands():
    import argparse

    from sgm_ext.cli import build_parser

    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_of_every_command_is_described_with_its_default():
    """Issue 32 item 5: `--help` of each command describes every option, and an option with
    a default value says it (flags excepted: off unless given)."""
    import argparse

    missing, no_default = [], []
    for name, parser in _subcommands().items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            option = f"{name} {'/'.join(action.option_strings) or action.dest}"
            text = (action.help or "") % {"default": action.default}
            if not text.strip():
                missing.append(option)
            elif action.default not in (None, False) and action.nargs != 0 \
                    and "default" not in text:
                no_default.append(f"{option} (default {action.default!r})")
    assert not missing, f"options without a description: {missing}"
    assert not no_default, f"options whose help does not state their default: {no_default}"


def test_sample_help_describes_device_dtype_and_the_batch_size_default():
    res = subprocess.run([sys.executable, "-m", "sgm_ext", "sample", "--help"],
                         capture_output=True, text=True, cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    text = " ".join(res.stdout.split())
    assert "--batch-size BATCH_SIZE prompts sampled together" in text and "default 16)" in text
    assert "--device DEVICE auto (default: the GPU if there is one, else the CPU)" in text
    assert "--dtype {auto,float32,bfloat16,float16} the weights' dtype" in text
