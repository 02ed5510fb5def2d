"""Bad input through the command line, as a user runs it: one line on stderr naming the bad
entry, a non-zero exit status, no traceback, and the model directory, the scale file and the
output directory exactly as they were. Also what a user expects beside (sites, inspect)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _profile_models import planted_llama, planted_rows, tokenizer
from cli_helpers import BEFORE_LOAD, ROOT, cli, interrupted_at, refused, snapshot
from cli_runs import HANG_S, run_process

from sgm_ext.app import synthetic
from sgm_ext.patching.scales import ScaleSet, load_scales


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    for name, seed in (("model", 0), ("other_model", 1)):
        model, tok = planted_llama(seed=seed), tokenizer()
        if seed:  # same config, other weights
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn_like(p))
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = planted_rows()
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc, out, err = cli("profile", "--model", root / "model", "--data", root / "data.jsonl",
                       "--out", root / "scales.safetensors", "--quiet", "--no-plot",
                       "--threshold", "0.8")
    assert rc == 0, out[-3000:] + err[-3000:]
    (root / "prompts.jsonl").write_text(json.dumps({"text": "word1 word2"}) + "\n")
    (root / "notes.txt").write_text("my notes\n")
    return root


def profile_args(home, out=None, **options):
    """profile on the saved model and data; --out last (default home/new.safetensors)."""
    args = ["profile", "--model", home / "model", "--data", home / "data.jsonl", "--quiet",
            "--no-plot"]
    for key, value in options.items():
        args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [value])
    return args + ["--out", out or home / "new.safetensors"]


# ------------------------------------------------------------------ silent wrong results

def test_a_checkpoint_of_another_model_is_not_resumed(home, tmp_path):
    ckpt, out = tmp_path / "ckpt", tmp_path / "a.safetensors"
    rc, _, err = cli(*profile_args(home, out, checkpoint_dir=ckpt))
    assert rc == 0, err
    args = ["profile", "--model", home / "other_model", "--data", home / "data.jsonl",
            "--quiet", "--no-plot", "--checkpoint-dir", ckpt, "--out", tmp_path / "b.safetensors"]
    refused(args, "differs in: the model's weights", ckpt, out, home / "other_model")
    assert not (tmp_path / "b.safetensors").exists()


def test_out_never_overwrites_model_weights_or_a_foreign_file(home, tmp_path):
    model = home / "model"
    refused(profile_args(home, model / "model.safetensors"),
            "is a weight file name in a model directory", model)
    refused(profile_args(home, model / "model.safetensors", force=True),
            "is a weight file name in a model directory", model)
    refused(profile_args(home, home / "notes.txt"),
            "exists and is not a file sgm-ext wrote; refusing to overwrite it (pass --force",
            home / "notes.txt")
    refused(profile_args(home, tmp_path), "is a directory; give a file name", tmp_path)
    refused(profile_args(home, tmp_path / "missing" / "s.safetensors"), "does not exist",
            tmp_path)
    refused(profile_args(home, expertise_out=home / "notes.txt"),
            "--expertise-out", home / "notes.txt")
    # an sgm-ext scale file may be rewritten, and --force writes over a foreign file
    forced = tmp_path / "forced.safetensors"
    forced.write_text("not a scale file")
    rc, _, err = cli(*profile_args(home, forced, force=True))
    assert rc == 0, err
    rc, _, err = cli(*profile_args(home, forced))
    assert rc == 0, err


def test_long_rows_are_cut_with_one_warning_or_refused(home, tmp_path):
    data = tmp_path / "long.jsonl"
    rows = planted_rows()[:8]
    rows[3]["text"] = " ".join(["word1"] * 300)
    rows[5]["text"] = " ".join(["tox1"] * 200)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["profile", "--model", home / "model", "--data", data, "--quiet", "--no-plot",
            "--out", tmp_path / "s.safetensors", "--max-length", "16"]
    rc, _, err = cli(*args)
    assert rc == 0, err
    warned = [line for line in err.splitlines() if "were cut" in line]
    assert len(warned) == 1 and "2 rows were longer than 16 tokens" in warned[0]
    assert "(the first: row 4)" in warned[0]
    refused(args + ["--no-truncate", "--out", tmp_path / "t.safetensors"],
            "row 4 has 300 tokens, more than the maximum length 16 (--no-truncate)", home)


# ------------------------------------------------------------------ checked before the model runs

@pytest.mark.parametrize(("options", "message"), [
    ({"method": "damp"}, "method 'damp' needs alpha in [0, 1]"),
    ({"alpha": "0.3"}, "alpha is for method 'damp' only"),
    ({"top_k": "-1"}, "--top-k is -1; it must be >= 0"),
    ({"checkpoint_every": "0"}, "--checkpoint-every is 0; it must be >= 1"),
    ({"batch_size": "0"}, "--batch-size is 0; it must be >= 1"),
    ({"max_length": "0"}, "--max-length is 0; it must be >= 1"),
    ({"device": "cuda"}, "--device cuda: no CUDA GPU is visible here"),
    ({"sites": "neuron"}, "unknown site 'neuron'"),
], ids=lambda v: str(v))
def test_profile_options_are_refused_before_any_work(home, options, message):
    if options.get("device") == "cuda" and torch.cuda.is_available():
        options = {"device": f"cuda:{torch.cuda.device_count()}"}
        message = "CUDA device(s)"
    refused(profile_args(home, **options), message, home)
    assert not (home / "new.safetensors").exists()


def test_data_with_one_class_is_refused_before_the_model_loads(home, tmp_path):
    data = tmp_path / "one.jsonl"
    data.write_text("".join(json.dumps({"text": f"word{i}", "label": 0}) + "\n"
                            for i in range(5)))
    args = profile_args(home)
    args[args.index("--data") + 1] = data
    refused(args, "one.jsonl: AUROC needs both classes; got 0 positive (toxic) and 5 negative",
            home)


def test_vision_tower_sites_are_refused_before_the_forward(tmp_path):
    vocab = synthetic.vocabulary()
    processor = synthetic.build_processor(vocab)
    model, _ = synthetic.build_model(vocab, processor.tokenizer, bigram_steps=1)
    model.save_pretrained(tmp_path / "llava")
    processor.save_pretrained(tmp_path / "llava")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "please describe the cook", "label": i % 2})
                            + "\n" for i in range(4)))
    site = "model.vision_tower.encoder.layers.0.mlp.mid"
    refused(["profile", "--model", tmp_path / "llava", "--data", data, "--quiet", "--no-plot",
             "--out", tmp_path / "s.safetensors", "--sites", site],
            f"site '{site}' is in model.vision_tower", tmp_path)
    rc, out, err = cli("sites", "--model", tmp_path / "llava")
    assert rc == 0, err
    assert "model.language_model.layers.0.mlp.mid" in out
    line = next(r for r in out.splitlines() if r.startswith(site))
    assert line.split()[1] == "mid" and line.split()[3] == "no", line
    assert " can be profiled (the language model's)" in out


@pytest.mark.parametrize(("options", "message"), [
    (["--latency-prompts", "0"], "--latency-prompts is 0; it must be >= 1"),
    (["--latency-runs", "-1"], "--latency-runs is -1; it must be >= 0"),
    (["--threshold", "7"], "--threshold must be in [0, 1], got 7.0"),
    (["--strength", "1.5"], "--strength is 1.5; --strength must be in [0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens is 0; it must be >= 1"),
    (["--judge", "hf:MODEL"], "is a LlamaForCausalLM checkpoint, not a text classifier"),
], ids=lambda v: str(v))
def test_eval_options_are_refused_before_any_work(home, tmp_path, options, message):
    options = [f"hf:{home / 'model'}" if o == "hf:MODEL" else o for o in options]
    out = tmp_path / "report"
    refused(["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
             "--prompts", home / "prompts.jsonl", "--out", out, "--quiet", *options],
            message, home)
    assert not out.exists()


def test_eval_out_that_is_a_file_is_refused(home):
    refused(["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
             "--prompts", home / "prompts.jsonl", "--out", home / "notes.txt"],
            "is a file; eval writes a directory of report files", home)


def test_eval_conditions_and_their_files_are_checked_before_any_work(home, tmp_path):
    empty, latin1 = tmp_path / "empty.txt", tmp_path / "latin1.txt"
    empty.write_text("  \n")
    latin1.write_bytes(b"caf\xe9 {prompt}")
    nocap, textcap = tmp_path / "nocap.jsonl", tmp_path / "textcap.jsonl"
    nocap.write_text(json.dumps({"question": "2 + 2 ="}) + "\n")
    textcap.write_text(json.dumps({"question": "capital of France?", "answer": "Paris"}) + "\n")
    out = tmp_path / "report"
    for options, message in (
            (["--conditions", "unpatched,sgm**"], "unknown condition 'sgm**'"),
            (["--conditions", "sgm,patched"], "name each condition once"),
            (["--jailbreak", empty], f"--jailbreak {empty}: the file is empty"),
            (["--jailbreak", latin1], f"--jailbreak {latin1}: not UTF-8 text"),
            (["--safety-prompt", tmp_path / "nope.txt"],
             f"--safety-prompt {tmp_path / 'nope.txt'}: No such file or directory"),
            (["--judge-template", latin1], "--judge-template is for --judge llm:DIR"),
            (["--judge", f"llm:{home / 'model'}", "--judge-template", empty],
             "no {answer} placeholder"),
            (["--capability", nocap], f"{nocap} row 1 (line 1): no reference `answer`"),
            (["--capability", textcap, "--capability-scoring", "choice"],
             "choice scoring needs letter references (A-J), got 'Paris'")):
        refused(["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
                 "--prompts", home / "prompts.jsonl", "--out", out, "--quiet", *options],
                message, home, tmp_path)
        assert not out.exists()


def test_eval_benchmark_data_is_checked_before_any_work(home, tmp_path):
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "readme.txt").write_text("not a benchmark\n")
    mmsb = tmp_path / "MM-SafetyBench" / "data" / "processed_questions"
    mmsb.mkdir(parents=True)
    (mmsb / "01-Illegal_Activitiy.json").write_text('{"0": {"Question": ')
    rtp = tmp_path / "rtp"
    rtp.mkdir()
    (rtp / "prompts.jsonl").write_text('{"prompt": {"text": "a", "toxicity": 0.1}}\n[1]\n')
    out = tmp_path / "report"
    base = ["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
            "--out", out, "--quiet"]
    for options, message in (
            (["--data", unknown], f"{unknown}: benchmark layout not recognised"),
            (["--data", tmp_path / "MM-SafetyBench"],
             f"{mmsb / '01-Illegal_Activitiy.json'}: not JSON (Expecting value at line 1)"),
            (["--data", rtp], f"{rtp / 'prompts.jsonl'}: line 2: no 'prompt' object"),
            (["--data", rtp, "--subset", "hard"], "--subset 'hard': realtoxicityprompts has "
             "the subsets all, challenging"),
            (["--data", unknown, "--benchmark", "vlguard"], "test.json: No such file"),
            (["--data", rtp, "--prompts", home / "prompts.jsonl"], "one of the two"),
            (["--prompts", home / "prompts.jsonl", "--subset", "SD"],
             "--benchmark and --subset go with --data DIR")):
        refused(base + options, message, home, tmp_path)
        assert not out.exists()


# ------------------------------------------------------------------ one line, never a traceback

@pytest.mark.parametrize("content", [b"", b"not safetensors at all", "truncated"], ids=str)
def test_unreadable_scale_files_are_named(home, tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    if content == "truncated":
        content = (home / "scales.safetensors").read_bytes()[:100]
    bad.write_bytes(content)
    for args in (["inspect", bad],
                 ["eval", "--model", home / "model", "--scales", bad, "--prompts",
                  home / "prompts.jsonl", "--out", tmp_path / "r"]):
        refused(args, f"{bad} is not a readable safetensors scale file", home, bad)


def test_inspect_on_a_directory_an_empty_set_and_a_missing_file(home, tmp_path):
    refused(["inspect", tmp_path], "is a directory but not one sgm-ext export wrote (no "
            "sgm_ext_export.json); inspect takes a scale file or an export", tmp_path)
    refused(["inspect", tmp_path / "nope.safetensors"], "no such scale file", tmp_path)
    empty = tmp_path / "empty.safetensors"
    ScaleSet({}).save(empty)
    refused(["inspect", empty], "holds no sites (an empty scale set)", empty)


# The command line with every network connection refused and reported (exit status 99): a
# test that nothing is downloaded or asked of the Hub, whatever the machine's speed.
NO_NETWORK = ("import os, sys\n"
              "def no_network(event, args):\n"
              "    if event in ('socket.connect', 'socket.getaddrinfo'):\n"
              "        print('error: the command used the network:', event, args, "
              "file=sys.stderr, flush=True)\n"
              "        os._exit(99)\n"
              "sys.addaudithook(no_network)\n"
              "from sgm_ext.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")


def test_missing_model_directory_is_named_at_once_and_nothing_is_downloaded(home, tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")
    for args, message in (
            (["profile", "--model", "does_not_exist_relative", "--data", home / "data.jsonl",
              "--out", tmp_path / "s.safetensors"],
             "no such model directory: does_not_exist_relative"),
            (["sites", "--model", "does_not_exist_relative"], "no such model directory")):
        rc, _, err = run_process([sys.executable, "-c", NO_NETWORK, *args], env=env)
        assert rc == 2 and "the command used the network" not in err, err[-3000:]
        lines = [line for line in err.splitlines() if "error:" in line]
        assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert os.listdir(tmp_path) == []


def test_a_scale_key_without_dots_is_named_as_the_unknown_site(home, tmp_path):
    scales = tmp_path / "foo.safetensors"
    ScaleSet({"foo": torch.ones(64)}).save(scales)
    refused(["eval", "--model", home / "model", "--scales", scales, "--prompts",
             home / "prompts.jsonl", "--out", tmp_path / "r", "--judge", "refusal", "--quiet"],
            "unknown site 'foo': no such module in the model", home, scales)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("bad", ["size", "nan"])
def test_a_bad_shift_is_named_and_nothing_is_written(home, tmp_path, bad):
    """A scale file whose shift has the wrong size or a NaN (format 2): eval names the entry on
    one line before any work, and the model, the file and --out stay as they were."""
    hidden = 32  # the planted Llama's
    shift = torch.ones(hidden + 1) if bad == "size" else torch.tensor([float("nan")] + [0.0] * 31)
    scales = tmp_path / "shifted.safetensors"
    ScaleSet({}, shifts={"model.layers.0.mlp.down_proj": shift}).save(scales)
    message = ("shifts['model.layers.0.mlp.down_proj'] has 33 values" if bad == "size" else
               "shifts['model.layers.0.mlp.down_proj'][0] is nan")
    refused(["eval", "--model", home / "model", "--scales", scales, "--prompts",
             home / "prompts.jsonl", "--out", tmp_path / "r", "--judge", "refusal", "--quiet"],
            message, home, scales)
    assert not (tmp_path / "r").exists()


def test_non_utf8_rows_are_named_or_skipped_and_a_bom_is_accepted(home, tmp_path):
    rows = planted_rows()[:8]
    data = tmp_path / "latin1.jsonl"
    lines = [json.dumps(r).encode() for r in rows]
    lines[2] = json.dumps({"text": "caf_", "label": 0}).encode().replace(b"_", b"\xe9")
    data.write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")  # a BOM, and one bad row
    args = ["profile", "--model", home / "model", "--data", data, "--quiet", "--no-plot",
            "--out", tmp_path / "s.safetensors"]
    refused(args, "latin1.jsonl row 3 (line 3): not valid UTF-8 (byte 0xe9", home)
    rc, out, err = cli(*args, "--skip-bad-rows")
    assert rc == 0, err
    assert "skipped 1 bad rows (first: row 3: not valid UTF-8" in err
    assert "from 7 samples" in out


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    many = tmp_path / "many.safetensors"  # more output than a pipe buffers (64 KB)
    ScaleSet({f"model.layers.{i}.mlp.mid": torch.rand(8) for i in range(3000)}).save(many)
    proc = subprocess.Popen([sys.executable, "-m", "sgm_ext", "inspect", many],
                            stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=HANG_S) == 141
    assert "Traceback" not in err and "Broken pipe" not in err, err


def test_ctrl_c_during_profile_says_how_to_resume(home, tmp_path):
    """Interrupted once the second checkpoint is written (the program says so: no timing)."""
    ckpt = tmp_path / "ckpt"
    args = profile_args(home, tmp_path / "s.safetensors", batch_size="1",
                        checkpoint_dir=ckpt, checkpoint_every="2")
    rc, _, err = interrupted_at("checkpoint", args)
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "profile: error: interrupted at batch 2 of 48; rerun the same " \
        f"command to resume from the checkpoint in {ckpt} (after batch 2)" in lines[0], err
    assert (ckpt / "state.json").exists() and not (tmp_path / "s.safetensors").exists()
    rc, out, err = cli(*args)  # and it does resume
    assert rc == 0 and "from 48 samples" in out, err[-3000:]


def test_ctrl_c_before_the_first_checkpoint_does_not_advise_resuming(home, tmp_path):
    ckpt = tmp_path / "ck5"
    args = profile_args(home, tmp_path / "s.safetensors", batch_size="1",
                        checkpoint_dir=ckpt, checkpoint_every="10")
    rc, _, err = interrupted_at("batch", args)  # after batch 1, before the first checkpoint
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "interrupted at batch 1 of 48; nothing was saved yet (the " \
        "first checkpoint comes after batch 10)" in lines[0], err
    assert "resume" not in err and not ckpt.exists()


@pytest.mark.parametrize("command", ["profile", "eval"])
def test_ctrl_c_while_the_model_loads_says_so(home, tmp_path, command):
    args = profile_args(home, tmp_path / "s.safetensors") if command == "profile" else [
        "eval", "--model", home / "model", "--scales", home / "scales.safetensors",
        "--prompts", home / "prompts.jsonl", "--out", tmp_path / "r", "--quiet"]
    before = snapshot(home, tmp_path)
    rc, _, err = interrupted_at("load", args)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"sgm-ext {command}: error: interrupted "
                                                   "(Ctrl-C) while loading the model from"), err
    assert snapshot(home, tmp_path) == before


@pytest.mark.parametrize("command", [("-m", "sgm_ext"), (
    "-c", "import sys; sys.argv[0] = 'sgm-ext'; from sgm_ext.cli import main; sys.exit(main())")],
    ids=["python -m sgm_ext", "the sgm-ext script"])
def test_ctrl_c_during_the_start_up_imports_says_so(home, command):
    rc, out, err = interrupted_at("imports", ["inspect", home / "scales.safetensors"], command)
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == ["sgm-ext: error: interrupted (Ctrl-C) while starting, before the command "
                     "ran"], err


# ------------------------------------------------------------------ what a user expects

def test_a_text_only_model_warns_about_images_and_refuses_modality_image(home, tmp_path):
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 0, 0)).save(tmp_path / "red.png")
    rows = planted_rows()[:8]
    for r in rows[:3]:
        r["image"] = "red.png"
    data = tmp_path / "with_images.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["profile", "--model", home / "model", "--data", data, "--quiet", "--no-plot",
            "--out", tmp_path / "s.safetensors"]
    rc, _, err = cli(*args)
    assert rc == 0, err
    assert "warning: 3 rows have an image, but the processor" in err
    assert "takes text only: their images are ignored (the first: row 1)" in err
    refused(args + ["--modality", "image"], "modality 'image' needs a processor that takes "
            "images", home)


def test_inspect_flags_illegal_scales_and_shows_the_histogram(home, tmp_path):
    rc, out, err = cli("inspect", home / "scales.safetensors")
    assert rc == 0, err
    assert "scales (all sites):" in out and "1 (untouched)" in out and "damped per layer:" in out
    assert "INVALID" not in out
    bad = tmp_path / "bad_values.safetensors"
    ScaleSet({"model.layers.0.mlp.mid": torch.tensor([0.5, float("nan"), -1.0, 2.0])}).save(bad)
    rc, out, err = cli("inspect", bad)
    assert rc == 1, (out, err)
    assert "INVALID: model.layers.0.mlp.mid: 1 not finite, 1 negative, 1 above 1" in out


def test_profile_warns_when_the_selection_is_noise(home, tmp_path):
    data = tmp_path / "shuffled.jsonl"
    rows = planted_rows()
    labels = [r["label"] for r in rows]
    gen = torch.Generator().manual_seed(3)
    order = torch.randperm(len(rows), generator=gen).tolist()
    data.write_text("".join(json.dumps({"text": r["text"], "label": labels[j]}) + "\n"
                            for r, j in zip(rows, order)))
    args = ["profile", "--model", home / "model", "--data", data, "--quiet", "--no-plot",
            "--out", tmp_path / "s.safetensors"]
    rc, out, err = cli(*args, "--selection", "threshold")  # AurA's rule takes half the model
    assert rc == 0, err
    assert "pass the threshold 0.5: most are sampling noise" in err
    rc, out, err = cli(*args)  # the default fdr selection finds nothing on noise
    assert rc == 0, err
    assert "experts (AUROC above chance at FDR 0.05 and above 0.5): 0; with the labels " \
        "shuffled (the noise floor, one permutation): 0" in out
    # the planted model on its real labels at a strict threshold: no noise warning
    rc, _, err = cli(*profile_args(home, tmp_path / "t.safetensors", threshold="0.8"))
    assert rc == 0 and "warning" not in err, err


def test_inspect_lists_sites_in_model_order(tmp_path):
    names = [f"model.layers.{i}.mlp.{k}" for i in range(12) for k in ("up_proj", "mid")]
    path = tmp_path / "s.safetensors"
    ScaleSet({n: torch.ones(4) for n in names}).save(path)
    rc, out, err = cli("inspect", path)
    assert rc == 0, err
    listed = [line.split()[-1] for line in out.splitlines() if line.strip().endswith(
        ("up_proj", "mid")) and line.split()[-1].startswith("model.layers.")]
    assert listed == names  # layers.2 before layers.10, up_proj before mid


# ------------------------------------------------------------------ issue 27

def _raw_scale_file(path, tensors):
    """A scale file's bytes as a hand-made or foreign writer would leave them (ScaleSet itself
    refuses or converts what these tests need)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata={"format_version": "2", "kind": "sgm-ext scales"})
    return path


@pytest.mark.parametrize(("tensors", "message"), [
    ({"model.layers.0.mlp.mid": torch.ones(0)},
     "scales['model.layers.0.mlp.mid'] has 0 values"),
    ({"model.layers.0.mlp.mid": torch.ones(64),
      "model.layers.0.mlp.down_proj:shift": torch.ones(0)},
     "shifts['model.layers.0.mlp.down_proj'] has 0 values"),
    ({"model.layers.0.mlp.mid": torch.ones(64, dtype=torch.int64)},
     "tensor 'model.layers.0.mlp.mid' is int64; a scale file holds floating-point tensors"),
    ({"model.layers.0.mlp.mid": torch.ones(64, dtype=torch.bool)},
     "tensor 'model.layers.0.mlp.mid' is bool"),
], ids=["zero-length scale", "zero-length shift", "int64", "bool"])
def test_empty_or_non_float_scale_tensors_are_refused(home, tmp_path, tensors, message):
    """Issue 27 items 1 and 11: inspect and eval (patch reads the file the same way)."""
    bad = _raw_scale_file(tmp_path / "bad.safetensors", tensors)
    refused(["inspect", bad], message, bad)
    refused(["eval", "--model", home / "model", "--scales", bad, "--prompts",
             home / "prompts.jsonl", "--out", tmp_path / "r", "--quiet"], message, home, bad,
            env=BEFORE_LOAD)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_corrupt_weight_file_is_named(home, tmp_path, damage):
    """Issue 27 item 3: profile, eval, sites and serve name the file before loading."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(home / "model", model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"x" * 4000)
    message = f"{weights}: the model's weight file is truncated or not safetensors"
    for args in (["profile", "--model", model, "--data", home / "data.jsonl", "--out",
                  tmp_path / "s.safetensors", "--quiet", "--no-plot"],
                 ["eval", "--model", model, "--scales", home / "scales.safetensors",
                  "--prompts", home / "prompts.jsonl", "--out", tmp_path / "r", "--quiet"],
                 ["sites", "--model", model],
                 ["serve", "--model", model, "--scales", home / "scales.safetensors"]):
        refused(args, message, model, home, tmp_path, env=BEFORE_LOAD)


def test_eval_allow_amplify(home, tmp_path):
    """Issue 27 item 4: scales above 1 need --allow-amplify, refused before loading without."""
    amplified = tmp_path / "amp.safetensors"
    scales = load_scales(home / "scales.safetensors")
    site = scales.sites()[0]
    up = scales[site].clone()
    up[0] = 1.5
    ScaleSet({**dict(scales.items()), site: up}, scales.metadata).save(amplified)
    args = ["eval", "--model", home / "model", "--scales", amplified, "--prompts",
            home / "prompts.jsonl", "--out", tmp_path / "r", "--quiet", "--max-new-tokens", "2",
            "--latency-runs", "0", "--judge", "refusal"]
    refused(args, f"scales[{site!r}] has scales above 1 (they amplify neurons); pass "
            "--allow-amplify", home, amplified, env=BEFORE_LOAD)
    assert not (tmp_path / "r").exists()
    rc, out, err = cli(*args, "--allow-amplify")
    assert rc == 0, err[-3000:]
    assert (tmp_path / "r" / "report.json").exists()


def test_a_checkpoint_dir_that_is_a_file_is_refused_before_loading(home, tmp_path):
    """Issue 27 item 5."""
    refused(profile_args(home, tmp_path / "s.safetensors", checkpoint_dir=home / "notes.txt"),
            f"--checkpoint-dir {home / 'notes.txt'} exists and is not a directory", home,
            tmp_path, env=BEFORE_LOAD)
    refused(profile_args(home, tmp_path / "s.safetensors",
                         checkpoint_dir=home / "notes.txt" / "ck"),
            "is not a directory", home, tmp_path, env=BEFORE_LOAD)


def test_unequal_classes_for_linear_ot_are_refused_before_loading(home, tmp_path):
    """Issue 27 item 6."""
    data = tmp_path / "uneven.jsonl"
    rows = planted_rows()[:11]  # 6 toxic, 5 not
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = profile_args(home, tmp_path / "s.safetensors", method="linear_ot")
    args[args.index("--data") + 1] = data
    refused(args, "--method linear_ot needs as many toxic as non-toxic rows, got 6 and 5; pass "
            "--balanced", home, tmp_path, env=BEFORE_LOAD)


def test_modality_response_without_responses_is_refused_before_loading(home, tmp_path):
    """Issue 27 item 8."""
    refused(profile_args(home, tmp_path / "s.safetensors", modality="response"),
            "data.jsonl row 1 has no `response`; --modality response", home, tmp_path,
            env=BEFORE_LOAD)


def test_a_bad_judge_is_named_with_what_it_returned(home, tmp_path):
    """Issue 27 item 9: the library's evaluate with a callable judge, in a fresh process."""
    script = f"""
import sgm_ext.evaluate as ev
from sgm_ext.app.loading import load_model
model, processor = load_model({str(home / 'model')!r}, 'cpu')
def strings(answers):
    return ['harmful'] * len(answers)
def short(answers):
    return [0.5] * (len(answers) + 1)
for judge in (strings, short):
    try:
        ev.evaluate(model, processor, {str(home / 'scales.safetensors')!r},
                    {str(home / 'prompts.jsonl')!r}, judge=judge, max_new_tokens=2,
                    latency_runs=0, progress=False)
    except ValueError as e:
        print('ValueError:', e)
"""
    rc, out, err = run_process([sys.executable, "-c", script])
    assert rc == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0].startswith("ValueError: judge 'strings' (CallableJudge) returned str "
                               "'harmful' for answer 0; a judge returns a score in [0, 1] or "
                               "a bool"), lines
    assert lines[1].startswith("ValueError: judge 'short' (CallableJudge) returned 2 verdicts "
                               "for 1 answers: [0.5, 0.5]"), lines


def test_max_length_above_the_context_is_refused_before_loading(home, tmp_path):
    """Issue 27 item 10 (the planted Llama's context: 2048)."""
    message = "--max-length 100000000 is above the model's context length 2048"
    refused(profile_args(home, tmp_path / "s.safetensors", max_length="100000000"), message,
            home, tmp_path, env=BEFORE_LOAD)
    refused(["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
             "--prompts", home / "prompts.jsonl", "--out", tmp_path / "r", "--quiet",
             "--max-length", "100000000"], message, home, tmp_path, env=BEFORE_LOAD)


def test_the_real_demo_has_its_own_default_directory(home, tmp_path):
    """Issue 27 item 12: `demo --real` (here on the planted model standing in for SmolLM2's
    converted checkpoint) leaves the toy demo's sgm-ext-demo/ as it was."""
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(home / "model", cache / "smollm2-135m-instruct")
    toy = tmp_path / "sgm-ext-demo"
    toy.mkdir()
    shutil.copy(home / "scales.safetensors", toy / "scales.safetensors")
    (toy / "report.md").write_text("the toy's report\n")
    before = snapshot(toy)
    rows = tmp_path / "rows.jsonl"  # the recipe pools over responses: the planted sentences
    rows.write_text("".join(json.dumps({"text": "word0", "response": r["text"], "label":
                                        r["label"]}) + "\n" for r in planted_rows()))
    rc, out, err = cli("demo", "--real", "--data", rows, "--prompts",
                       home / "prompts.jsonl", "--max-new-tokens", "2", "--latency-runs", "0",
                       "--judge", "refusal", cwd=tmp_path, env={"SGM_EXT_CACHE": str(cache)})
    assert rc == 0, err[-3000:]
    assert snapshot(toy) == before
    assert (tmp_path / "sgm-ext-demo-real" / "scales.safetensors").exists()
    assert "files in sgm-ext-demo-real" in out
    rc, out, _ = cli("demo", "--help")
    assert "with --real sgm-ext-demo-real" in " ".join(out.split())


# ---------------------------------------------------------------- issue 32

def test_prompt_files_without_a_label_column_are_sampled_and_evaluated(home, tmp_path):
    """Item 3: README says a prompt's label is optional; a CSV whose header has text (or
    prompt) alone is read by sample and eval. Profiling rows still need their label."""
    texts = ["word1 word2 word3", "word4 tox1 word5", "word6 word7"]
    for column in ("text", "prompt"):
        prompts = tmp_path / f"{column}only.csv"
        prompts.write_text(f"{column}\n" + "".join(f"{t}\n" for t in texts))
        rows = tmp_path / f"{column}_rows.jsonl"
        rc, out, err = cli("sample", "--model", home / "model", "--prompts", prompts, "--out",
                           rows, "--samples", "2", "--max-new-tokens", "2", "--quiet")
        assert rc == 0, err[-3000:]
        written = [json.loads(line) for line in rows.open()]
        assert sorted({r["text"] for r in written}) == sorted(texts)
        report_dir = tmp_path / f"{column}_report"
        rc, out, err = cli("eval", "--model", home / "model", "--scales",
                           home / "scales.safetensors", "--prompts", prompts, "--out",
                           report_dir, "--max-new-tokens", "2", "--latency-runs", "0",
                           "--quiet")
        assert rc == 0, err[-3000:]
        report = json.loads((report_dir / "report.json").read_text())
        assert [g["prompt"] for g in report["generations"]] == texts
        assert report["n_harmful_prompts"] == len(texts)  # unlabelled: counted as harmful
    refused(profile_args(home, tmp_path / "s.safetensors", data=tmp_path / "textonly.csv"),
            "textonly.csv: the header has no label column", home, env=BEFORE_LOAD)


def test_a_missing_prompt_or_data_file_is_named_on_one_line(home, tmp_path):
    """Item 5: every file of prompts, rows or passages that is not there is named, before the
    model loads, on one line without `[Errno 2]`; nothing is written."""
    missing = tmp_path / "nope.jsonl"
    evaluate = ["eval", "--model", home / "model", "--scales", home / "scales.safetensors",
                "--out", tmp_path / "report", "--quiet"]
    for args in (
            ["sample", "--model", home / "model", "--prompts", missing, "--out",
             tmp_path / "rows.jsonl"],
            evaluate + ["--prompts", missing],
            evaluate + ["--prompts", home / "prompts.jsonl", "--capability", missing],
            evaluate + ["--prompts", home / "prompts.jsonl", "--reference", missing],
            profile_args(home, tmp_path / "s.safetensors", data=missing),
            profile_args(home, tmp_path / "s.safetensors", data=tmp_path / "nope.csv")):
        name = missing if missing in args else tmp_path / "nope.csv"
        # reference passages are read by prompts.load_reference, whose words calibrate shares
        message = f"no such reference text file: {name}" if "--reference" in args else \
            f"{name}: No such file or directory"
        err = refused(args, message, home, tmp_path, env=BEFORE_LOAD)
        assert "Errno" not in err, err
        assert os.listdir(tmp_path) == []
    refused(evaluate + ["--prompts", tmp_path], f"{tmp_path}: unknown data file type", home,
            env=BEFORE_LOAD)
    folder = tmp_path / "prompts.jsonl"
    folder.mkdir()
    refused(evaluate + ["--prompts", folder], f"{folder}: Is a directory", home, env=BEFORE_LOAD)


def test_inspect_counts_damped_amplified_and_shifted_apart(tmp_path):
    """Item 5: a transport map's scales above 1 are amplified, not damped; its shifts are
    counted as the neurons they move."""
    scales = torch.ones(10)
    scales[[0, 1, 2]] = torch.tensor([0.0, 0.5, 0.99])  # 3 damped
    scales[[7, 8]] = torch.tensor([1.01, 3.0])  # 2 amplified
    shifts = torch.zeros(10)
    shifts[[1, 4, 5, 9]] = torch.tensor([0.1, -2.0, 1e-3, 5.0])  # 4 shifted
    path = tmp_path / "map.safetensors"
    ScaleSet({"model.layers.0.mlp.mid": scales, "model.layers.1.mlp.mid": torch.ones(10)},
             {"method": "linear_ot"}, shifts={"model.layers.0.mlp.mid": shifts}).save(path)
    rc, out, err = cli("inspect", path)
    assert rc == 0, err[-3000:]
    lines = out.splitlines()
    assert lines[0] == (f"{path}: ScaleSet(2 sites, 20 neurons, 3 damped, 2 amplified, 4 "
                        "shifted on 1 sites)"), lines[0]
    header = next(line for line in lines if line.split()[:2] == ["neurons", "damped"])
    assert header.split()[2] == "amplif."
    row = next(line for line in lines if line.endswith("  model.layers.0.mlp.mid"))
    assert row.split()[:3] == ["10", "3", "2"], row
    per_layer = lines[lines.index("damped per layer:") + 2]
    assert per_layer.split() == ["0", "mid", "3"], per_layer
    # a damping file says nothing of amplification
    ScaleSet({"model.layers.0.mlp.mid": scales.clamp(max=1)}).save(tmp_path / "damp.safetensors")
    rc, out, _ = cli("inspect", tmp_path / "damp.safetensors")
    assert out.splitlines()[0].endswith(": ScaleSet(1 sites, 10 neurons, 3 damped)"), out


# ---------------------------------------------------------------- sgm-ext export

def export_args(home, out, scales=None, *more):
    return ["export", "--model", home / "model", "--scales",
            scales or home / "scales.safetensors", "--out", out, *more]


def test_export_refuses_its_input_and_foreign_outputs(home, tmp_path):
    for out, message in ((home / "model", "is (or contains, or lies inside) the input"),
                         (home / "model" / "sub", "is (or contains, or lies inside) the input"),
                         (home / "notes.txt", "exists and is not a file sgm-ext export wrote"),
                         (home / "other_model",
                          "exists and is not a directory sgm-ext export wrote"),
                         (tmp_path / "no" / "out", "does not exist")):
        refused(export_args(home, out), message, home, tmp_path)
    assert os.listdir(tmp_path) == []


def test_export_refuses_scales_that_do_not_fit_and_leaves_nothing(home, tmp_path):
    scales = load_scales(home / "scales.safetensors")
    site = scales.sites()[0]
    cases = {"unknown": (ScaleSet({site.replace("layers.0", "layers.9"): scales[site]},
                                  scales.metadata), "unknown site"),
             "fingerprint": (ScaleSet(dict(scales.items()), {**scales.metadata,
                                      "config_fingerprint": "0123456789abcdef"}),
                             "config fingerprint 0123456789abcdef"),
             "amplify": (ScaleSet({site: torch.full_like(scales[site], 1.5)}, scales.metadata),
                         "pass --allow-amplify to export them")}
    for name, (bad, _) in cases.items():
        bad.save(tmp_path / f"{name}.safetensors")
    files = sorted(os.listdir(tmp_path))
    for name, (_, message) in cases.items():
        refused(export_args(home, tmp_path / "out", tmp_path / f"{name}.safetensors"), message,
                home, tmp_path)
        assert sorted(os.listdir(tmp_path)) == files
    rc, out, err = cli(*export_args(home, tmp_path / "out", tmp_path / "amplify.safetensors",
                                    "--allow-amplify"))
    assert rc == 0 and "wrote" in out, err[-3000:]
    assert sorted(os.listdir(tmp_path)) == sorted(files + ["out"])


def test_export_refuses_what_needs_no_weights_before_the_model_loads(home, tmp_path):
    """Another model's scale file, amplification without the flag (named as the command's
    --allow-amplify, not the library's allow_amplify=True) and an output directory that cannot
    be written: refused while the load is paused (BEFORE_LOAD), the temporary name unsaid."""
    scales = load_scales(home / "scales.safetensors")
    site = scales.sites()[0]
    ScaleSet(dict(scales.items()), {**scales.metadata, "config_fingerprint":
                                    "0123456789abcdef"}).save(tmp_path / "other.safetensors")
    ScaleSet({site: torch.full_like(scales[site], 1.5)}, scales.metadata).save(
        tmp_path / "amplify.safetensors")
    for scale_file, message in (("other.safetensors", "config fingerprint 0123456789abcdef"),
                                ("amplify.safetensors", "pass --allow-amplify to export them")):
        err = refused(export_args(home, tmp_path / "out", tmp_path / scale_file), message,
                      home, tmp_path, env=BEFORE_LOAD)
        assert "allow_amplify=True" not in err
    err = refused(export_args(home, "/proc/detoxed"), "cannot write /proc/detoxed", home,
                  env=BEFORE_LOAD)
    assert ".tmp-" not in err and ".export-" not in err
    assert sorted(os.listdir(tmp_path)) == ["amplify.safetensors", "other.safetensors"]


def test_export_refuses_a_shift_where_no_bias_can_go(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    model = MistralForCausalLM(MistralConfig(hidden_size=32, intermediate_size=48,
                                             num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2, vocab_size=64))
    model.save_pretrained(tmp_path / "mistral")
    ScaleSet({}, shifts={"model.layers.0.mlp.down_proj": torch.ones(32)}).save(
        tmp_path / "shift.safetensors")
    args = ["export", "--model", tmp_path / "mistral", "--scales", tmp_path / "shift.safetensors",
            "--out", tmp_path / "out"]
    refused(args, "cannot export the shift of site model.layers.0.mlp.down_proj", tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["mistral", "shift.safetensors"]


def test_ctrl_c_during_export_leaves_no_output(home, tmp_path):
    rc, _, err = interrupted_at("export-shard", export_args(home, tmp_path / "out"))
    assert rc == 130, err[-3000:]
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


def _gguf_copy(tmp_path, name, change):
    """A copy of SmolLM2's GGUF with `change(reader)` applied in place."""
    import shutil

    gguf = pytest.importorskip("gguf")
    from sgm_ext.app import realmodel

    path = tmp_path / name
    shutil.copyfile(realmodel.gguf_path(), path)
    reader = gguf.GGUFReader(path, mode="r+")
    change(reader)
    reader.data.flush()
    return path


def _as_mamba(reader):
    reader.fields["general.architecture"].parts[-1][:] = np.frombuffer(b"mamba", np.uint8)


def _gate_as_i8(reader):  # same bytes (576 x 1536 Q4_1 = 576 x 1152 I8), a type not handled
    field = next(t.field for t in reader.tensors if t.name == "blk.0.ffn_gate.weight")
    field.parts[3][:] = [1152, 576]
    field.parts[4][:] = 24  # GGML_TYPE_I8


def _as_qwen2(reader):  # same length as "llama": the entries keep their llama. prefix
    reader.fields["general.architecture"].parts[-1][:] = np.frombuffer(b"qwen2", np.uint8)


def _truncated(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 5000)
    return path


def _gemma3_metadata_only(path):
    """A GGUF file of architecture gemma3 with metadata only (no tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_export_gguf_refuses_what_it_cannot_handle(tmp_path):
    gguf_scales = tmp_path / "s.safetensors"
    ScaleSet({"model.layers.0.mlp.gate_proj": torch.rand(1536)}).save(gguf_scales)
    mamba = _gguf_copy(tmp_path, "mamba.gguf", _as_mamba)
    i8 = _gguf_copy(tmp_path, "i8.gguf", _gate_as_i8)
    files = sorted(os.listdir(tmp_path))
    for source, scales, out, message in (
            (mamba, gguf_scales, tmp_path / "o.gguf", "GGUF architecture 'mamba' is not one"),
            (i8, gguf_scales, tmp_path / "o.gguf",
             "tensor blk.0.ffn_gate.weight is I8, a type export cannot dequantize"),
            (i8, gguf_scales, i8, "is (or contains, or lies inside) the input"),
            (i8, gguf_scales, tmp_path / "s.safetensors", "exists and is not a file")):
        refused(["export", "--gguf", source, "--scales", scales, "--out", out], message,
                tmp_path)
        assert sorted(os.listdir(tmp_path)) == files


def test_export_gguf_refuses_before_loading(tmp_path):
    """Refusals that need only the file's metadata and the scale file: before the model loads
    (the command pauses at its load: a later refusal would time out)."""
    rand, down, mid = torch.rand(1536), torch.randn(576), torch.randn(1536)
    files = {
        "other": ScaleSet({"model.layers.0.mlp.gate_proj": rand},
                          {"config_fingerprint": "0123456789abcdef", "model_type": "qwen2"}),
        "amplify": ScaleSet({"model.layers.3.mlp.up_proj": rand + 0.5}),
        "shift": ScaleSet({}, shifts={"model.layers.1.mlp.down_proj": down}),
        "mid0": ScaleSet({}, shifts={"model.layers.0.mlp.mid": mid}),
        "gate_shift": ScaleSet({}, shifts={"model.layers.2.mlp.gate_proj": mid}),
    }
    for name, scales in files.items():
        scales.save(tmp_path / f"{name}.safetensors")
    source = _gguf_copy(tmp_path, "smollm2.gguf", lambda reader: None)
    qwen2 = _gguf_copy(tmp_path, "qwen2.gguf", _as_qwen2)
    truncated = _truncated(_gguf_copy(tmp_path, "truncated.gguf", lambda reader: None))
    gemma3 = _gemma3_metadata_only(tmp_path / "gemma3.gguf")
    listing = sorted(os.listdir(tmp_path))
    cv = ["--control-vector", tmp_path / "cv.gguf"]
    for gguf_file, scales, more, message in (
            (source, "other", [], "the scales were made for a model with config fingerprint "
             "0123456789abcdef (qwen2); "),
            (source, "amplify", [], "has scales above 1 (they amplify neurons); pass "
             "--allow-amplify to export them"),
            (truncated, "shift", [], f"{truncated} is truncated: its tensor data ends at byte"),
            (qwen2, "shift", [], "cannot export the shift of site model.layers.1.mlp.down_proj "
             "to GGUF: llama.cpp's qwen2 graph reads no feed-forward bias tensors; its mid / "
             "down shifts can go in a control vector"),
            (gemma3, "shift", cv, "as a control vector for a gemma3 GGUF: its feed-forward "
             "output goes through a post-feed-forward norm"),
            (source, "mid0", cv, "llama.cpp adds no control vector to layer 0"),
            (source, "gate_shift", cv, "--control-vector: the scale file has no mid or down "
             "shift")):
        refused(["export", "--gguf", gguf_file, "--scales", tmp_path / f"{scales}.safetensors",
                 "--out", tmp_path / "o.gguf", *more], message, tmp_path, env=BEFORE_LOAD)
        assert sorted(os.listdir(tmp_path)) == listing
