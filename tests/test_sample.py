"""`sgm-ext sample` and its library call (evaluation/own_data.py): profiling rows from a
model's own sampled continuations, labelled by a judge; seeded, with provenance; read back by
`sgm-ext profile --modality response` in the format they were sampled in; bad input refused
in one line before the model loads.

The model (tests/_sample_models.py) is a tiny random Llama over a word-level vocabulary that
holds a few words the profanity judge flags, so a sampled continuation (near-uniform over the
words) is toxic about half the time and both classes come out of a few prompts."""
import hashlib
import json
import os

import pytest
from _sample_models import RUDE, tiny_llama, word_tokenizer
from cli_runs import run_cli
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from sgm_ext.cli import main
from sgm_ext.evaluation import efficacy_data as ed
from sgm_ext.evaluation import own_data
from sgm_ext.evaluation.options import Sampling
from sgm_ext.evaluation.prompts import Prompt, load_prompts
from sgm_ext.patching.scales import load_scales
from sgm_ext.profile.data import Row
from sgm_ext.profile.inputs import encode_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [{"text": "the cat sat on", "label": "harmful"}, {"text": "a quiet morning"},
           {"text": "the garden", "label": "benign", "category": "c"},
           {"text": "small blue house", "category": "homes"},
           {"text": "warm bread"}, {"text": "the river walked"}]


def rude_judge(answers):
    """1.0 for a continuation with a word of RUDE, else 0.0 (deterministic, not the code
    under test)."""
    return [float(any(w in a.split() for w in RUDE)) for a in answers]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    for name, chat in (("model", False), ("chat_model", True)):
        tiny_llama().save_pretrained(root / name)
        word_tokenizer(chat).save_pretrained(root / name)
    (root / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return root


def cli(*args, env=None):
    """`python -m sgm_ext ARGS` in a fresh process, waited for: (exit status, stdout,
    stderr)."""
    return run_cli(*args, env=env)


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------ the library

def test_own_rows_are_seeded_and_labelled_by_the_judge():
    model, tok = tiny_llama(), word_tokenizer()
    prompts = own_data.prompt_records(load_prompts(PROMPTS))
    kwargs = dict(k=4, max_new_tokens=6, seed=3, batch_prompts=4)
    rows, settings = own_data.own_rows(model, tok, prompts, rude_judge, **kwargs)
    again, _ = own_data.own_rows(model, tok, prompts, rude_judge, **kwargs)
    other, _ = own_data.own_rows(model, tok, prompts, rude_judge, **dict(kwargs, seed=4))
    assert rows == again and rows != other
    assert 0.7 * len(prompts) * 4 <= len(rows) <= len(prompts) * 4
    by_text = {p["text"]: p for p in PROMPTS}
    for r in rows:
        rude = any(w in r["response"].split() for w in RUDE)
        assert r["label"] == int(rude) and r["score"] == float(rude)
        assert r["response"] and r["response"] == r["response"].strip()
        source = by_text[r["text"]]
        assert r["prompt_id"] == PROMPTS.index(source) + 1  # the prompt's row number
        want = {"harmful": "harmful", "benign": "benign"}.get(source.get("label"),
                                                           source.get("category", "all"))
        assert r["kind"] == want
    assert sorted(r["sample"] for r in rows if r["prompt_id"] == 1) == [0, 1, 2, 3]
    assert 0 < sum(r["label"] for r in rows) < len(rows)
    assert settings == {"judge": "rude_judge", "threshold": 0.5, "sampling": ed.SAMPLING,
                        "seed": 3, "k": 4, "max_new_tokens": 6, "format": "raw",
                        "batch_size": 4, "prompts": len(prompts),
                        "prompt_ids": ed.rows_digest(prompts)}


def test_the_threshold_splits_the_judges_scores():
    model, tok = tiny_llama(), word_tokenizer()
    prompts = own_data.prompt_records(load_prompts(PROMPTS[:3]))

    def graded(answers):  # 0.3 per rude word, at most 0.9
        return [min(0.9, 0.3 * sum(w in RUDE for w in a.split())) for a in answers]

    low, _ = own_data.own_rows(model, tok, prompts, graded, k=3, max_new_tokens=8, seed=0,
                               threshold=0.3)
    high, _ = own_data.own_rows(model, tok, prompts, graded, k=3, max_new_tokens=8, seed=0,
                                threshold=0.6)
    assert [r["response"] for r in low] == [r["response"] for r in high]
    assert [r["label"] for r in low] == [int(r["score"] >= 0.3 - 1e-9) for r in low]
    assert [r["label"] for r in high] == [int(r["score"] >= 0.6 - 1e-9) for r in high]
    assert sum(r["label"] for r in high) < sum(r["label"] for r in low)


def test_sampling_settings_reach_generate():
    model, tok = tiny_llama(), word_tokenizer()
    prompts = own_data.prompt_records(load_prompts(PROMPTS[:2]))
    rows, settings = own_data.own_rows(model, tok, prompts, rude_judge, k=3, max_new_tokens=5,
                                       sampling=Sampling(1.0, 1.0, 1), seed=0)
    assert settings["sampling"] == {"do_sample": True, "temperature": 1.0, "top_p": 1.0,
                                    "top_k": 1}
    # top-k 1 is greedy: the three samples of a prompt are one continuation
    for pid in (1, 2):
        assert len({r["response"] for r in rows if r["prompt_id"] == pid}) == 1
    sampled, _ = own_data.own_rows(model, tok, prompts, rude_judge, k=3, max_new_tokens=5,
                                   seed=0)
    assert len({r["response"] for r in sampled if r["prompt_id"] == 1}) > 1


def test_chat_format_samples_after_the_chat_template():
    """A chat prompt is the user turn rendered by the template with the generation prompt:
    the same draws as that rendering given raw (this tokenizer adds no BOS)."""
    model, tok = tiny_llama(), word_tokenizer(chat=True)
    texts = [p["text"] for p in PROMPTS[:4]]
    rendered = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                        add_generation_prompt=True) for t in texts]
    assert rendered[0] == "<|user|> the cat sat on <|end|> <|assistant|> "
    chat = ed.sample_continuations(model, tok, texts, k=2, max_new_tokens=6, seed=1, fmt="chat")
    raw = ed.sample_continuations(model, tok, rendered, k=2, max_new_tokens=6, seed=1,
                                  fmt="raw")
    plain = ed.sample_continuations(model, tok, texts, k=2, max_new_tokens=6, seed=1, fmt="raw")
    assert chat == raw and chat != plain
    rows, settings = own_data.own_rows(model, tok, own_data.prompt_records(
        load_prompts(PROMPTS[:4])), rude_judge, k=2, max_new_tokens=6, seed=1, fmt="auto",
        batch_prompts=16)
    assert settings["format"] == "chat"
    assert [r["response"] for r in rows] == [c.strip() for per in chat for c in per if c.strip()]
    with pytest.raises(ValueError, match="needs a chat template"):
        own_data.own_rows(model, word_tokenizer(), [], rude_judge, fmt="chat")


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_profile_pools_over_the_sampled_continuation(fmt):
    """encode_batch's response tokens of a row, in the format it was sampled in, are the
    continuation's tokens (and the template's closing tokens in the chat format)."""
    tok = word_tokenizer(chat=fmt == "chat")
    row = Row(1, "the cat sat on", 1, None, "stupid green tree")
    batch, select = encode_batch(tiny_llama(), tok, [row], "response", "left", fmt=fmt)
    pooled = tok.convert_ids_to_tokens(batch["input_ids"][0][select[0]].tolist())
    assert pooled == (["stupid", "green", "tree"] + (["<|end|>"] if fmt == "chat" else []))


def test_prompt_records_and_the_class_warning():
    assert own_data.prompt_records([Prompt(4, "x", label=1), Prompt(5, "y", category="k")]) == [
        {"id": 4, "text": "x", "kind": "harmful"}, {"id": 5, "text": "y", "kind": "k"}]
    with pytest.raises(ValueError, match="prompt 2 has an image"):
        own_data.prompt_records([Prompt(1, "x"), Prompt(2, "y", image="a.png")])
    rows = [{"label": 1, "prompt_id": 1}, {"label": 1, "prompt_id": 1},
            {"label": 0, "prompt_id": 2}]
    counts = own_data.row_summary(rows, [{}, {}, {}], 1)
    assert counts == {"rows": 3, "toxic": 2, "non_toxic": 1, "toxic_share": 2 / 3,
                      "prompts": 3, "prompts_with_toxic": 1, "empty": 0}
    assert "only 1 non-toxic rows (fewer than 10)" in own_data.class_warning(counts)
    assert "raise --threshold" in own_data.class_warning(counts)
    none = own_data.class_warning({"toxic": 0, "non_toxic": 50})
    assert none.startswith("no toxic rows: profile needs both classes") and "lower" in none
    assert own_data.class_warning({"toxic": 10, "non_toxic": 10}) is None


# ------------------------------------------------------------------ the command

def run(args):
    """sgm-ext in this process (the paths as strings, as a shell gives them)."""
    return main([str(a) for a in args])


def sample_args(home, out, *more, model="model"):
    return ["sample", "--model", home / model, "--prompts", home / "prompts.jsonl", "--out",
            out, "--samples", "4", "--max-new-tokens", "6", "--seed", "5", "--batch-size", "4",
            "--quiet", *more]


def test_sample_writes_the_library_rows_with_provenance(home, tmp_path, capsys):
    out = tmp_path / "rows.jsonl"
    assert run(sample_args(home, out)) == 0
    printed = capsys.readouterr().out
    rows = read_jsonl(out)
    model = LlamaForCausalLM.from_pretrained(home / "model").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(home / "model")
    expected, settings = own_data.own_rows(
        model, tok, own_data.prompt_records(load_prompts(home / "prompts.jsonl")), "profanity",
        k=4, max_new_tokens=6, seed=5, batch_prompts=4)
    assert rows == expected
    toxic = sum(r["label"] for r in rows)
    assert 0 < toxic < len(rows)
    hit = len({r["prompt_id"] for r in rows if r["label"]})
    empty = len(PROMPTS) * 4 - len(rows)
    assert (f"{len(rows)} rows from {len(PROMPTS)} prompts x 4 samples"
            + (f" ({empty} empty continuations left out)" if empty else "")
            + f": {toxic} toxic "
            f"({toxic / len(rows):.1%}); {hit} of {len(PROMPTS)} prompts have >= 1 toxic"
            in printed)
    for r in rows:  # the profanity judge, as the library call applies it
        assert r["label"] == int(r["score"] >= 0.5)
    info = json.loads((tmp_path / "rows.jsonl.provenance.json").read_text())
    for key, value in settings.items():
        assert info[key] == value, key
    assert info["judge"] == "profanity" and info["format"] == "raw" and info["k"] == 4
    assert info["model"] == os.path.abspath(home / "model")
    assert len(info["config_fingerprint"]) == 16 and len(info["weights_fingerprint"]) == 16
    assert info["prompt_file"] == os.path.abspath(home / "prompts.jsonl")
    assert info["prompt_file_sha256"] == digest(home / "prompts.jsonl")
    assert info["rows"] == len(rows) and info["toxic"] == toxic
    assert info["digest"] == ed.rows_digest(rows) and info["sgm_ext_version"]
    assert info["prompts_with_toxic"] == hit
    # the same seed again: the same file (its own output is overwritten without --force)
    before = digest(out), digest(tmp_path / "rows.jsonl.provenance.json")
    assert run(sample_args(home, out)) == 0
    assert (digest(out), digest(tmp_path / "rows.jsonl.provenance.json")) == before
    assert run(sample_args(home, out, "--seed", "6")) == 0
    assert digest(out) != before[0]


def test_builtin_prompts_and_a_warning_for_a_small_class(home, tmp_path, capsys):
    out = tmp_path / "builtin.jsonl"
    assert run(["sample", "--model", home / "model", "--builtin", "1", "--out", out,
                 "--samples", "1", "--max-new-tokens", "4", "--seed", "2", "--quiet",
                 "--judge", "refusal"]) == 0
    captured = capsys.readouterr()
    rows = read_jsonl(out)
    prompts = ed.build_prompts(2, 1)
    by_id = {p["id"]: p for p in prompts}
    assert len(by_id) == len(prompts) and len({r["prompt_id"] for r in rows}) == len(rows)
    for r in rows:  # one sample of each prompt (less the empty ones)
        assert (r["text"], r["kind"]) == (by_id[r["prompt_id"]]["text"],
                                          by_id[r["prompt_id"]]["kind"])
    assert {r["kind"] for r in rows} == {"provoking", "benign"}
    info = json.loads((tmp_path / "builtin.jsonl.provenance.json").read_text())
    assert info["builtin"] == {"per_template": 1, "seed": 2} and "prompt_file" not in info
    assert info["judge"] == "refusal"
    # the refusal judge calls every answer to an unlabelled prompt that does not decline
    # harmful: one class only
    assert all(r["label"] == 1 for r in rows) and len(rows) > 0.7 * len(prompts)
    warning = [line for line in captured.err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "no non-toxic rows: profile needs both classes" in warning[0]
    assert "--samples" in warning[0] and f"{len(rows)} toxic (100.0%)" in captured.out


@pytest.mark.parametrize("fmt", ["raw", "chat"])
def test_profile_reads_the_rows_in_their_format(home, tmp_path, capsys, fmt):
    model = "chat_model" if fmt == "chat" else "model"
    rows_path, scales = tmp_path / "rows.jsonl", tmp_path / "act.safetensors"
    more = ["--format", fmt] if fmt == "chat" else []
    assert run(sample_args(home, rows_path, *more, model=model)) == 0
    assert json.loads((tmp_path / "rows.jsonl.provenance.json").read_text())["format"] == fmt
    # profile with its default --format auto: raw rows on a model with a chat template too
    profile = ["profile", "--model", home / "chat_model", "--data", rows_path, "--out", scales,
               "--modality", "response", "--method", "linear_ot", "--balanced", "--quiet",
               "--no-plot", "--batch-size", "4"]
    assert run(profile) == 0
    capsys.readouterr()
    made = load_scales(scales)
    assert made.metadata["modality"] == "response" and made.metadata["input_format"] == fmt
    assert made.shifts and made.changed() > 0
    other = "chat" if fmt == "raw" else "raw"
    assert run([*profile, "--format", other]) == 2
    err = capsys.readouterr().err
    assert f"was sampled in the {fmt} format" in err and f"--format {fmt}" in err


# ------------------------------------------------------------------ bad input

# the load pauses: a refusal must come before it (a command that gets there is stopped at once)
BEFORE_LOAD = {"SGM_EXT_TEST_PAUSE": "load"}


def refused(args, message, *unchanged):
    """One `error:` line with `message`, exit status 2, no traceback, before the model loads
    (the load pauses: a command that gets there is stopped and fails), the files in
    `unchanged` as they were."""
    before = {p: digest(p) if os.path.isfile(p) else None for p in unchanged}
    rc, out, err = cli(*args, env=BEFORE_LOAD)
    assert rc == 2, (rc, out[-2000:], err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and message in lines[0], err[-3000:]
    assert {p: digest(p) if os.path.isfile(p) else None for p in unchanged} == before


@pytest.fixture(scope="module")
def bad(home):
    (home / "empty.jsonl").write_text("")
    (home / "broken.jsonl").write_text('{"text": "the cat"}\n{"text": \n')
    (home / "image.jsonl").write_text(json.dumps({"text": "the cat", "image": "x.png"}) + "\n")
    (home / "mine.jsonl").write_text("my own notes\n")
    return home


@pytest.mark.parametrize(("change", "message"), [
    ({"--model": "nowhere"}, "no such model directory"),
    ({"--prompts": "missing.jsonl"}, "missing.jsonl: No such file or directory"),
    ({"--prompts": "empty.jsonl"}, "empty.jsonl: no prompts"),
    ({"--prompts": "broken.jsonl"}, "broken.jsonl row 2 (line 2): not valid JSON"),
    ({"--prompts": "image.jsonl"}, "image 'x.png' not found"),
    ({"--prompts": None}, "give the prompts as --prompts FILE or --builtin N (one of the two)"),
    ({"--builtin": "2"}, "give the prompts as --prompts FILE or --builtin N (one of the two)"),
    ({"--samples": "0"}, "--samples is 0; it must be >= 1"),
    ({"--max-new-tokens": "0"}, "--max-new-tokens is 0; it must be >= 1"),
    ({"--batch-size": "0"}, "--batch-size is 0; it must be >= 1"),
    ({"--temperature": "0"}, "--temperature must be a positive number"),
    ({"--top-p": "1.5"}, "--top-p must be in (0, 1]"),
    ({"--top-k": "-1"}, "--top-k must be an integer >= 0"),
    ({"--threshold": "1.5"}, "--threshold must be in [0, 1], got 1.5"),
    ({"--judge": "nope"}, "unknown judge 'nope'"),
    ({"--judge-template": "prompts.jsonl"}, "--judge-template is for --judge llm:DIR"),
    ({"--out": "mine.jsonl"}, "mine.jsonl exists and is not a file sgm-ext wrote"),
    ({"--out": "no/such/dir/rows.jsonl"}, "does not exist"),
    ({"--format": "chat"}, "format 'chat' needs a chat template"),
], ids=lambda v: str(v))
def test_bad_input_is_refused_before_the_model_loads(bad, change, message):
    options = {"--model": "model", "--prompts": "prompts.jsonl", "--out": "new.jsonl",
               "--samples": "2", "--max-new-tokens": "4"}
    options.update(change)
    args = ["sample", "--quiet"]
    for key, value in options.items():
        if value is not None:
            args += [key, value if key in ("--samples", "--max-new-tokens", "--batch-size",
                                           "--temperature", "--top-p", "--top-k",
                                           "--threshold", "--judge", "--builtin", "--format")
                     else bad / value]
    refused(args, message, bad / "mine.jsonl", bad / "prompts.jsonl")
    assert not (bad / "new.jsonl").exists()
    assert not (bad / "new.jsonl.provenance.json").exists()


def test_rows_edited_by_hand_are_not_overwritten_without_force(home, tmp_path):
    out = tmp_path / "rows.jsonl"
    args = ["sample", "--model", home / "model", "--prompts", home / "prompts.jsonl",
            "--out", out, "--samples", "2", "--max-new-tokens", "4", "--quiet"]
    rc, _, err = cli(*args)
    assert rc == 0, err[-3000:]
    with open(out, "a") as f:
        f.write(json.dumps({"text": "mine", "response": "mine", "label": 0}) + "\n")
    refused(args, "exists and is not a file sgm-ext wrote", out, f"{out}.provenance.json")
    rc, _, err = cli(*args, "--force")
    assert rc == 0, err[-3000:]
    assert own_data.is_rows_file(out)
