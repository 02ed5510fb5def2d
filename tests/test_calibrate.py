"""Calibration: ScaleSet.at_strength against patching at a strength in every mode, the library's
calibrate (its search, its result, the model left as it was) and its bundled passages."""
import hashlib
import json
import math
import os
import re

import pytest
import torch
from _profile_models import NEUTRAL_WORDS, planted_llama, tokenizer
from cli_helpers import BEFORE_LOAD, cli, interrupted_at, refused, snapshot
from patch_models import build, logits, param_hash

import sgm_ext
from sgm_ext.evaluation import calibrate as C
from sgm_ext.patching.handle import handle_of
from sgm_ext.patching.registry import find_mlps
from sgm_ext.patching.scales import ScaleSet

MODES = ("fused", "fold", "hook")


def _maps(model, kind, seed=0, shift=0.5):
    """Random maps on every site of every MLP: "scales" (in [0.1, 1], some 1), "shifts" (normal
    with standard deviation `shift`, some 0), or "act" (AcT-style: scales in [0.2, 1.8], above
    1 too, with shifts)."""
    g = torch.Generator().manual_seed(seed)
    sc, sh = {}, {}
    for info in find_mlps(model).values():
        for site, k in info.sites().items():
            n = info.site_size(k)
            if kind in ("scales", "act"):
                lo, width = (0.1, 0.9) if kind == "scales" else (0.2, 1.6)
                s = torch.rand(n, generator=g) * width + lo
                s[torch.rand(n, generator=g) < 0.3] = 1.0
                sc[site] = s
            if kind in ("shifts", "act"):
                b = torch.randn(n, generator=g) * shift
                b[torch.rand(n, generator=g) < 0.3] = 0.0
                sh[site] = b
    return ScaleSet(sc, {"method": kind, "strength": "1.0"}, shifts=sh)


# ---------------------------------------------------------------- ScaleSet.at_strength

@pytest.mark.parametrize("name", ["llama", "phi3", "llava"])  # bias, packed gate_up, a CLIP tower
@pytest.mark.parametrize("kind", ["scales", "shifts", "act"])
def test_at_strength_patched_at_1_is_the_original_at_that_strength(name, kind):
    # Bit for bit in every mode: at_strength computes s_eff and strength * b with the functions
    # the modes call, and a strength-1 patch applies a set's vectors as they are.
    model, inputs = build(name)
    original = _maps(model, kind)
    amplify = kind == "act"
    before = param_hash(model)
    for strength in (0.3, 0.71875):
        new = original.at_strength(strength)
        for mode in MODES:
            with sgm_ext.patched(model, original, mode=mode, strength=strength,
                                 allow_amplify=amplify):
                want = logits(model, inputs)
            with sgm_ext.patched(model, new, mode=mode, allow_amplify=amplify):
                got = logits(model, inputs)
            assert torch.equal(got, want), (mode, strength)
            assert not torch.equal(got, logits(model, inputs)), (mode, strength)  # it did act
    assert param_hash(model) == before


def test_at_strength_values_and_metadata():
    s = torch.tensor([0.0, 0.25, 1.0, 1.75, 0.5])
    b = torch.tensor([1.0, -2.0, 0.0, 0.5, 3.0])
    original = ScaleSet({"m.layers.0.mlp.mid": s}, {"method": "linear_ot", "strength": "0.5"},
                        shifts={"m.layers.0.mlp.mid": b, "m.layers.0.mlp.down_proj": b[:3]})
    new = original.at_strength(0.4)
    # the formula in float64, written here: within float32 rounding of it
    want = 1 - 0.4 * (1 - s.double())
    assert torch.allclose(new["m.layers.0.mlp.mid"].double(), want, rtol=0, atol=1e-7)
    assert torch.allclose(new.shifts["m.layers.0.mlp.mid"].double(), 0.4 * b.double(), atol=1e-7)
    assert new.shifts["m.layers.0.mlp.down_proj"].tolist() == pytest.approx([0.4, -0.8, 0.0])
    assert new.metadata == {"method": "linear_ot", "strength": repr(0.5 * 0.4)}
    assert original.metadata["strength"] == "0.5"  # the original is not changed
    # strength 1: equal values in tensors of its own; strength 0: the identity
    same = original.at_strength(1.0)
    assert torch.equal(same["m.layers.0.mlp.mid"], s)
    same["m.layers.0.mlp.mid"][0] = 9.0
    assert original["m.layers.0.mlp.mid"][0] == 0.0
    none = original.at_strength(0.0)
    assert torch.equal(none["m.layers.0.mlp.mid"], torch.ones(5))
    assert all(not t.any() for t in none.shifts.values())
    # no strength metadata: 1 before; a strength outside [0, 1] or metadata that is no number
    assert ScaleSet({"a.mid": s}).at_strength(0.25).metadata["strength"] == "0.25"
    with pytest.raises(ValueError, match="strength is 1.5; strength must be in"):
        original.at_strength(1.5)
    with pytest.raises(ValueError, match="metadata strength 'strong' is not a number"):
        ScaleSet({"a.mid": s}, {"strength": "strong"}).at_strength(0.5)


# ---------------------------------------------------------------- calibrate

def _hand_perplexity(model, tok, texts):
    """exp(mean token NLL) over the passages, written here from the definition."""
    total, count = 0.0, 0
    for text in texts:
        ids = tok(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        total -= float(logp.gather(1, ids[0, 1:, None]).sum())
        count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.fixture(scope="module")
def planted():
    """The planted Llama, AcT-style maps on all its sites, and passages it predicts well: its
    own greedy continuations of 10 openers (on random text the maps would not raise its
    perplexity, already near the vocabulary's size), with the perplexity unpatched and the
    ratio at strength 1."""
    model, tok = planted_llama(), tokenizer()
    texts = []
    for i in range(10):
        opener = " ".join(NEUTRAL_WORDS[(7 * i + 3 * j) % len(NEUTRAL_WORDS)] for j in range(3))
        with torch.no_grad():
            ids = model.generate(tok(opener, return_tensors="pt")["input_ids"],
                                 max_new_tokens=12, do_sample=False, pad_token_id=0)
        texts.append(tok.decode(ids[0], skip_special_tokens=True))
    maps = _maps(model, "act", seed=3, shift=1.0)
    base = _hand_perplexity(model, tok, texts)
    with sgm_ext.patched(model, maps, mode="fold", allow_amplify=True):
        full = _hand_perplexity(model, tok, texts) / base
    assert full > 1.1, full  # the maps cost perplexity: there is something to calibrate
    return model, tok, maps, base, full, texts


def _replay(curve, budget, tolerance):
    """The strengths a bisection measures given the ratios the curve recorded (written here)."""
    want, lo, hi = [0.0, 1.0], 0.0, 1.0
    ratios = {p.strength: p.ratio for p in curve}
    if ratios[1.0] <= budget:
        return want
    while hi - lo > tolerance:
        mid = (lo + hi) / 2
        want.append(mid)
        lo, hi = (mid, hi) if ratios[mid] <= budget else (lo, mid)
    return want


@pytest.mark.parametrize("mode", MODES)
def test_calibrate_finds_the_largest_strength_within_the_budget(planted, mode):
    model, tok, maps, base, full, texts = planted
    before = param_hash(model)
    budget = 1 + (full - 1) / 3
    seen = []
    found = C.calibrate(model, tok, maps, texts, max_ppl_ratio=budget, tolerance=1 / 32,
                        allow_amplify=True, mode=mode, progress=seen.append)
    assert seen == found.curve
    assert [p.strength for p in found.curve] == _replay(found.curve, budget, 1 / 32)
    assert found.unpatched_ppl == pytest.approx(base, rel=1e-6)
    # every point's perplexity is the model's at that strength, measured here by hand
    for point in found.curve[1:]:
        with sgm_ext.patched(model, maps, mode=mode, strength=point.strength,
                             allow_amplify=True):
            ppl = _hand_perplexity(model, tok, texts)
        assert point.perplexity == pytest.approx(ppl, rel=1e-5), point
        assert point.ratio == pytest.approx(ppl / base, rel=1e-5)
        assert point.within == (point.ratio <= budget)
    assert 0 < found.strength < 1 and found.ratio <= budget
    over = min(p.strength for p in found.curve if p.strength > found.strength)
    assert not next(p for p in found.curve if p.strength == over).within
    assert over - found.strength <= 1 / 32
    assert found.ppl == next(p.perplexity for p in found.curve if p.strength == found.strength)
    # the model as it was: weights, forwards, no patch marker
    assert param_hash(model) == before and handle_of(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())
    # the new set at strength 1 is the old one at the chosen strength
    ids = tok(texts[0], return_tensors="pt")
    with sgm_ext.patched(model, maps, mode=mode, strength=found.strength, allow_amplify=True):
        want = logits(model, ids)
    with sgm_ext.patched(model, found.scales, mode=mode, allow_amplify=True):
        assert torch.equal(logits(model, ids), want)


def test_calibration_metadata(planted, tmp_path):
    model, tok, maps, _, full, texts = planted
    path = tmp_path / "maps.safetensors"
    maps.save(path)
    found = C.calibrate(model, tok, str(path), texts, max_ppl_ratio=1 + (full - 1) / 2,
                        allow_amplify=True)
    meta = found.scales.metadata
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    assert meta["calibration_texts_sha256"] == digest and meta["calibration_texts_count"] == "10"
    assert float(meta["calibration_strength"]) == found.strength
    assert float(meta["strength"]) == found.strength  # the file's own strength was 1
    assert float(meta["calibration_budget"]) == 1 + (full - 1) / 2
    assert float(meta["calibration_ratio"]) == found.ratio
    assert float(meta["calibration_unpatched_ppl"]) == found.unpatched_ppl
    assert float(meta["calibration_ppl"]) == found.ppl
    assert float(meta["calibration_tolerance"]) == 1 / 64
    assert meta["calibration_source_method"] == "act" and meta["method"] == "act"
    assert meta["calibration_mode"] == "fused" and meta["calibration_max_length"] == "512"
    assert meta["calibration_source"] == str(path)
    assert meta["calibration_source_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    line = C.calibration_summary(found.scales)
    assert line.startswith(f"calibrated: strength {found.strength:g} of the act scales, "
                           f"perplexity ratio {found.ratio:.4f} within the budget"), line
    assert C.calibration_summary(maps) is None


def test_a_budget_that_allows_everything_gives_strength_1(planted):
    model, tok, maps, _, full, texts = planted
    found = C.calibrate(model, tok, maps, texts, max_ppl_ratio=full * 1.01, allow_amplify=True)
    assert found.strength == 1.0 and [p.strength for p in found.curve] == [0.0, 1.0]
    assert found.ratio == pytest.approx(full, rel=1e-5)
    for site in maps.scales:
        assert torch.equal(found.scales[site], maps[site])


def test_a_budget_nothing_fits_gives_strength_0_with_a_warning(planted):
    model, tok, maps, _, _, texts = planted
    with pytest.warns(UserWarning, match="over the budget 1 already at strength 0.25: the "
                      "answer is strength 0"):
        found = C.calibrate(model, tok, maps, texts, max_ppl_ratio=1.0, tolerance=0.25,
                            allow_amplify=True)
    assert found.strength == 0.0 and found.ratio == 1.0
    assert [p.strength for p in found.curve] == [0.0, 1.0, 0.5, 0.25]
    assert all(torch.equal(t, torch.ones_like(t)) for t in found.scales.scales.values())


@pytest.mark.parametrize("mode", ["fold", "fused"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_model_is_restored_on_ctrl_c_and_on_errors(planted, mode, error):
    model, tok, maps, _, full, texts = planted
    before = param_hash(model)

    def stop(point):  # after the measurement at strength 1: the maps are in the model
        if point.strength == 1.0:
            raise error("stop")

    with pytest.raises(error):
        C.calibrate(model, tok, maps, texts, max_ppl_ratio=1.01, allow_amplify=True,
                    mode=mode, progress=stop)
    assert param_hash(model) == before and handle_of(model) is None
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(max_ppl_ratio=0.9), "max_ppl_ratio is 0.9; it must be a number >= 1"),
    (dict(max_ppl_ratio=float("nan")), "max_ppl_ratio is nan"),
    (dict(max_ppl_ratio="1.1"), "max_ppl_ratio is '1.1'"),
    (dict(tolerance=0.0), r"tolerance is 0.0; it must be in \(0, 0.5\]"),
    (dict(tolerance=0.75), "tolerance is 0.75"),
    (dict(texts=["", "  "]), "no texts: every passage given is empty"),
    (dict(allow_amplify=False), "> 1 \\(amplification\\)"),
], ids=["budget below 1", "budget nan", "budget a string", "tolerance 0", "tolerance 0.75",
        "empty texts", "amplified scales"])
def test_bad_arguments_are_refused_with_the_model_untouched(planted, kwargs, message):
    model, tok, maps, _, _, texts = planted
    before = param_hash(model)
    with pytest.raises(ValueError, match=message):
        C.calibrate(model, tok, maps, **{"texts": texts, "allow_amplify": True, **kwargs})
    assert param_hash(model) == before and handle_of(model) is None


def test_texts_files(tmp_path):
    plain = tmp_path / "t.txt"
    plain.write_text("first passage\n\n  \nsecond passage\n")
    assert C.load_texts(plain) == ["first passage", "second passage"]
    rows = tmp_path / "t.jsonl"
    rows.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    assert C.load_texts(rows) == ["one", "two"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "one"}) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl row 2 \(line 2\): not valid JSON"):
        C.load_texts(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(ValueError, match="empty.txt: no texts"):
        C.load_texts(empty)
    with pytest.raises(FileNotFoundError, match="no such texts file: .*missing.txt"):
        C.load_texts(tmp_path / "missing.txt")
    assert C.load_texts(None) == C.load_texts(C.DEFAULT_TEXTS)


# ---------------------------------------------------------------- the bundled passages

def _sentences(path):
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip()]


def test_the_bundled_passages_are_disjoint_from_the_reported_perplexity_text():
    from sgm_ext.evaluation.prompts import BENIGN_TEXT

    passages = C.load_texts(None)
    assert 40 <= len(passages) <= 60
    assert all(len(re.findall(r"[.!?]", p)) >= 2 for p in passages)  # a few sentences each
    ours, theirs = _sentences(C.DEFAULT_TEXTS), _sentences(BENIGN_TEXT)
    assert not set(ours) & set(theirs)

    def runs(sentences, n=6):  # every run of n words
        out = set()
        for s in sentences:
            words = re.findall(r"[a-z']+", s)
            out |= {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
        return out

    assert not runs(ours) & runs(theirs)
    assert os.path.basename(C.DEFAULT_TEXTS) == "calibration.txt"


# ---------------------------------------------------------------- `sgm-ext calibrate`

CURVE_LINE = re.compile(r"strength (\S+) +perplexity (\S+)  ratio (\S+)  (within|over) budget")


@pytest.fixture(scope="module")
def saved(planted, tmp_path_factory):
    """The planted model and its tokenizer in a directory, its maps (with the model's config
    fingerprint, as profile writes it) and the passages as files."""
    from sgm_ext.core.fingerprints import config_fingerprint

    model, tok, maps, _, full, texts = planted
    root = tmp_path_factory.mktemp("calibrate")
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    meta = {**maps.metadata, "model_type": "llama", "method": "linear_ot",  # inspect: > 1 is legal
            "config_fingerprint": config_fingerprint(model.config)}
    ScaleSet(maps.scales, meta, maps.shifts).save(root / "maps.safetensors")
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    return root, full, texts


def _args(root, out, *more, texts=True):
    return ["calibrate", "--model", root / "model", "--scales", root / "maps.safetensors",
            "--out", out, "--allow-amplify", *(["--texts", root / "texts.txt"] if texts else []),
            *more]


def test_cli_writes_the_calibrated_file_and_inspect_shows_it(saved, tmp_path):
    from sgm_ext.app.loading import load_model

    root, full, texts = saved
    budget = 1 + (full - 1) / 3
    out = tmp_path / "calibrated.safetensors"
    rc, printed, err = cli(*_args(root, out, "--max-ppl-ratio", repr(budget), "--tolerance",
                                  "0.03125"))
    assert rc == 0, err[-3000:]
    curve = [(float(m[1]), float(m[3]), m[4]) for m in CURVE_LINE.finditer(printed)]
    assert curve[:2] == [(0.0, 1.0, "within"), (1.0, pytest.approx(full, abs=1e-4), "over")]
    scales = sgm_ext.load_scales(out)
    chosen = float(scales.metadata["calibration_strength"])
    assert f"chosen strength {chosen:g}: perplexity ratio " in printed
    # the printed ratios are rounded: within / over as printed, the exact ratio in the file
    ratio = float(scales.metadata["calibration_ratio"])
    assert 0 < chosen < 1 and ratio <= budget
    assert next(w for s, _, w in curve if s == chosen) == "within"
    assert next(r for s, r, _ in curve if s == chosen) == pytest.approx(ratio, abs=1e-4)
    over = min(s for s, _, _ in curve if s > chosen)
    assert over - chosen <= 0.03125 and next(w for s, _, w in curve if s == over) == "over"
    # the written file at strength 1 is the input at the chosen strength, in a fresh model
    model, tok = load_model(str(root / "model"), "cpu")
    ids = tok(texts[1], return_tensors="pt")
    for mode in MODES:
        with sgm_ext.patched(model, str(root / "maps.safetensors"), mode=mode, strength=chosen,
                             allow_amplify=True):
            want = logits(model, ids)
        with sgm_ext.patched(model, scales, mode=mode, allow_amplify=True):
            assert torch.equal(logits(model, ids), want), mode
    rc, shown, err = cli("inspect", out)
    assert rc == 0, err[-3000:]
    digest = hashlib.sha256(json.dumps(texts).encode()).hexdigest()
    for line in (f"calibration_strength: {chosen!r}", f"calibration_budget: {budget!r}",
                 f"calibration_texts_sha256: {digest}", "calibration_texts_count: 10",
                 "calibration_tolerance: 0.03125", "calibration_source_method: linear_ot",
                 f"calibration_ratio: {ratio!r}", "calibration_unpatched_ppl: ",
                 "calibration_ppl: ", f"strength: {chosen!r}",
                 f"calibrated: strength {chosen:g} of the linear_ot scales, perplexity ratio "):
        assert line in shown, (line, shown)


def test_cli_a_budget_that_allows_everything_gives_strength_1(saved, tmp_path):
    root = saved[0]
    out = tmp_path / "all.safetensors"
    rc, printed, err = cli(*_args(root, out, "--max-ppl-ratio", "1000", texts=False))
    assert rc == 0, err[-3000:]
    assert [m[1] for m in CURVE_LINE.finditer(printed)] == ["0", "1"]
    assert "chosen strength 1: perplexity ratio" in printed
    assert "passages of the bundled calibration.txt" in err
    scales, original = sgm_ext.load_scales(out), sgm_ext.load_scales(root / "maps.safetensors")
    assert scales.metadata["calibration_texts_count"] == str(len(C.load_texts(None)))
    for site in original.sites():
        assert torch.equal(scales.scales.get(site, torch.zeros(0)),
                           original.scales.get(site, torch.zeros(0)))
        assert torch.equal(scales.shifts[site], original.shifts[site])


def _bad_files(root, tmp):
    """Files each refusal below names."""
    from sgm_ext.core.fingerprints import config_fingerprint

    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "bad.jsonl").write_text(json.dumps({"text": "word1"}) + "\n\n{oops\n")
    maps = sgm_ext.load_scales(root / "maps.safetensors")
    other = planted_llama().config
    other.intermediate_size = 96
    ScaleSet(maps.scales, {**maps.metadata, "config_fingerprint": config_fingerprint(other)},
             maps.shifts).save(tmp / "other_model.safetensors")
    site = "model.layers.0.mlp.mid"
    ScaleSet({site: torch.full((48,), 0.5)}).save(tmp / "other_sizes.safetensors")
    (tmp / "notes.txt").write_text("mine\n")


@pytest.mark.parametrize(("change", "message"), [
    ({"--max-ppl-ratio": "0.9"}, "--max-ppl-ratio is 0.9; it must be a number >= 1"),
    ({"--max-ppl-ratio": "ten"}, "argument --max-ppl-ratio: invalid float value: 'ten'"),
    ({"--max-ppl-ratio": "nan"}, "--max-ppl-ratio is nan"),
    ({"--tolerance": "0"}, "--tolerance is 0.0; it must be in (0, 0.5]"),
    ({"--tolerance": "0.6"}, "--tolerance is 0.6; it must be in (0, 0.5]"),
    ({"--max-length": "0"}, "--max-length is 0; it must be >= 1"),
    ({"--texts": "missing.txt"}, "no such texts file: "),
    ({"--texts": "empty.txt"}, "empty.txt: no texts (one passage per non-empty line)"),
    ({"--texts": "bad.jsonl"}, "bad.jsonl row 2 (line 3): not valid JSON"),
    ({"--scales": "other_model.safetensors"},
     "does not fit the model: the scales were made for a model with config fingerprint"),
    ({"--scales": "other_sizes.safetensors"},
     "scales['model.layers.0.mlp.mid'] has 48 values, the model's mid site there has 64"),
    ({"--out": "maps.safetensors"}, "is the input scale file (--scales)"),
    ({"--out": "notes.txt"}, "exists and is not a file sgm-ext wrote; refusing to overwrite"),
    ({"--allow-amplify": None}, "has scales above 1 (they amplify neurons); pass "
     "--allow-amplify"),
], ids=lambda v: str(v))
def test_cli_bad_input_is_one_line_before_the_model_loads(saved, tmp_path, change, message):
    root = saved[0]
    _bad_files(root, tmp_path)
    (tmp_path / "maps.safetensors").write_bytes((root / "maps.safetensors").read_bytes())
    out = tmp_path / "out.safetensors"
    args = ["calibrate", "--model", root / "model", "--scales", tmp_path / "maps.safetensors",
            "--out", out, "--texts", root / "texts.txt", "--allow-amplify"]
    for option, value in change.items():
        if value is None:
            args.remove(option)
        else:
            where = args.index(option) + 1 if option in args else None
            value = value if option[2:] in ("max-ppl-ratio", "tolerance", "max-length") \
                else tmp_path / value
            if where is None:
                args += [option, value]
            else:
                args[where] = value
    refused(args, message, root, tmp_path, env=BEFORE_LOAD)
    assert not out.exists()


def test_cli_ctrl_c_while_calibrating_writes_nothing(saved, tmp_path):
    root = saved[0]
    out = tmp_path / "out.safetensors"
    before = snapshot(root, tmp_path)
    rc, printed, err = interrupted_at("calibrate-step", _args(root, out))
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "error:" in line]
    assert lines == ["sgm-ext calibrate: error: interrupted (Ctrl-C) while calibrating; "
                     "nothing was written"], err
    assert snapshot(root, tmp_path) == before and not out.exists()


def test_ctrl_c_waits_for_the_end_of_a_held_block():
    import signal

    from sgm_ext.core.pause import interrupts_held

    handler = signal.getsignal(signal.SIGINT)
    ran = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_held():
            signal.raise_signal(signal.SIGINT)
            ran.append("to its end")  # not stopped half-way
    assert ran == ["to its end"] and signal.getsignal(signal.SIGINT) is handler
    with interrupts_held():  # no Ctrl-C: nothing raised
        ran.append("again")
    assert ran[-1] == "again" and signal.getsignal(signal.SIGINT) is handler
