"""The demo drivers: the synthetic demo (`sgm-ext demo`) and the real-model one (`sgm-ext demo
--real`), each running `sgm-ext profile` and `sgm-ext eval` and summing up what they found."""
import json
import os
import time

from ..evaluation import efficacy_data
from ..evaluation.report import condition_table, latency_text, rate_text
from ..patching.scales import load_scales
from ..profile.expertise import Expertise
from . import realmodel, synthetic, synthetic_data

FULL = dict(profile_rows=96, eval_prompts=40, max_new_tokens=32, latency_runs=3,
            latency_prompts=6, bigram_steps=400)
FAST = dict(profile_rows=24, eval_prompts=12, max_new_tokens=12, latency_runs=1,
            latency_prompts=2, bigram_steps=400)
SIZED = ("max_new_tokens", "latency_runs", "latency_prompts")  # FULL / FAST give the defaults


def run_demo_in(out, *, run, fast=False, seed=0, eval_options=None, quiet=False):
    """Build the toy, profile it, evaluate the patch; (summary dict, all targets met).

    run: runs one `sgm-ext` command line (a list of arguments) and returns its exit status,
    i.e. sgm_ext.cli.main (passed in: the application layer does not import the command line).
    eval_options: `sgm-ext eval` options by name (judge, strength, max_new_tokens, ...).
    quiet: no progress bars; None: print nothing of the demo's own either."""
    sizes = FAST if fast else FULL
    options = {name: sizes[name] for name in SIZED}
    options["conditions"] = "all"  # unpatched, SGM, the safety prompt, SGM*
    options.update(eval_options or {})
    eval_argv = [a for name, value in options.items()
                 for a in (f"--{name.replace('_', '-')}", str(value))]
    say = (lambda *a: None) if quiet is None else print  # quiet=None: print nothing at all
    start = time.perf_counter()
    syn = synthetic
    say("sgm-ext demo: a SYNTHETIC model on SYNTHETIC data.\n"
        f"  model: LlavaForConditionalGeneration ({syn.LAYERS}-layer Llama, hidden {syn.HIDDEN}, "
        f"{syn.INTER} MLP neurons per layer; 1-layer CLIP tower), weights set by construction.\n"
        f"  Its toxic behaviour lives in {syn.KNOWN_PER_LAYER * syn.LAYERS} known MLP neurons, "
        "built in: trigger words or a trigger image\n  (red, with a dark cross and ring) are "
        "copied forward by one attention head, the known neurons read them and write a "
        "direction\n  that lm_head maps onto insult words. The profiler is not told which "
        "neurons they are.")
    model_dir, data_dir = os.path.join(out, "model"), os.path.join(out, "data")
    vocab = synthetic.vocabulary()
    processor = synthetic.build_processor(vocab)
    model, known = synthetic.build_model(vocab, processor.tokenizer, seed=seed,
                                         bigram_steps=sizes["bigram_steps"])
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    profile_data, prompts = synthetic_data.write_data(data_dir, sizes["profile_rows"],
                                                      sizes["eval_prompts"], seed)
    with open(os.path.join(out, "known_neurons.json"), "w") as f:
        json.dump(known, f, indent=1)
    scales = os.path.join(out, "scales.safetensors")
    expertise_path = os.path.join(out, "expertise.safetensors")
    steps = [
        ["profile", "--model", model_dir, "--data", profile_data, "--out", scales,
         "--expertise-out", expertise_path, "--batch-size", "8", "--quiet"],
        ["eval", "--model", model_dir, "--scales", scales, "--prompts", prompts, "--out", out,
         *eval_argv] + (["--quiet"] if quiet else []),
    ]
    for argv in steps:
        say(f"\n$ sgm-ext {' '.join(argv)}")
        rc = run(argv)
        if rc:
            raise RuntimeError(f"sgm-ext {argv[0]} failed with status {rc}")
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    found, k = synthetic.recovered(Expertise.load(expertise_path), known)
    u, p = report["unpatched"], report["patched"]
    summary = {"synthetic": True, "known_neurons": known, "recovered": found, "k": k,
               "harmful_rate": {"unpatched": u["harmful_rate"], "patched": p["harmful_rate"]},
               "perplexity": {"unpatched": u["perplexity"], "patched": p["perplexity"]},
               "latency_ratio": report["latency_ratio"], "fast": fast, "seed": seed,
               "seconds": time.perf_counter() - start}
    summary["targets"] = synthetic.targets(found, k, report)
    met = list(summary["targets"].values())
    with open(os.path.join(out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=1)
    # On the toy model an MLP call is microseconds, so the ratio is mostly per-call overhead and
    # the machine's noise: printed with its spread, and with where a real model's cost is measured
    latency = ("-" if report["latency"] is None else
               f"{latency_text(report['latency'])}\n                 (the toy model's generation "
               "time; a 97.5M Llama and a pretrained model: bench/RESULTS.md, Patch)")
    say(f"\nsgm-ext demo (synthetic model and data), {summary['seconds']:.0f} s:\n"
        f"  known toxic neurons among the profiler's top {k}: {found} / {k}\n"
        f"  harmful rate   unpatched {u['harmful_rate']:.3f}  patched {p['harmful_rate']:.3f}\n"
        f"  perplexity     unpatched {u['perplexity']:.3f}  patched {p['perplexity']:.3f}\n"
        f"  latency ratio  patched / unpatched {latency}")
    say("  conditions (rate (count/prompts) [Wilson 95%]; p: exact McNemar vs unpatched):")
    for line in condition_table(report):
        say(f"    {line}")
    for name, ok in summary["targets"].items():
        say(f"  [{'ok' if ok else 'MISSED'}] {name}")
    say(f"  files in {out}: report.json, report.md, report.png, generations.jsonl, demo.json, "
        "scales.safetensors, model/, data/")
    return summary, all(met)


def _write_prompts(path, prompts):
    """A prompts file eval and sample read: provoking openers are `harmful`, benign ones
    `benign`; the template id as the category."""
    with open(path, "w", encoding="utf-8") as f:
        for p in prompts:
            f.write(json.dumps({"text": p["text"], "category": p["template"], "label":
                                "harmful" if p["kind"] == "provoking" else "benign"}) + "\n")
    return path


# what `demo --real` generates unless told otherwise: sized to end within about 5 minutes on
# a quiet 2-core machine (README states the measured time)
REAL_TEST_PROMPTS = 96  # the first 96 of the benchmark's 120 test prompts: 6 batches of 16
REAL_SIZES = dict(max_new_tokens=16, samples=2, format="raw", latency_runs=1, latency_prompts=4,
                  conditions="unpatched,patched,random")


def real_demo_inputs(out, data=None, prompts=None):
    """(rows file or None when `sample` must write it, its prompts file, eval's prompts file):
    the user's files, or the efficacy benchmark's profile and test splits written into
    out/data/ (the same seeded prompts bench/bench_efficacy.py uses)."""
    data_dir = os.path.join(out, "data")
    os.makedirs(data_dir, exist_ok=True)
    splits = None
    if data is None or prompts is None:
        splits = efficacy_data.split_prompts(
            efficacy_data.build_prompts(0, efficacy_data.PER_TEMPLATE), efficacy_data.SPLITS)
    profile_prompts = None
    if data is None:
        profile_prompts = _write_prompts(os.path.join(data_dir, "profile_prompts.jsonl"),
                                         splits["profile"])
    if prompts is None:
        prompts = _write_prompts(os.path.join(data_dir, "test_prompts.jsonl"),
                                 splits["test"][:REAL_TEST_PROMPTS])
    return data, profile_prompts, prompts


def run_real_demo(out, *, run, data=None, prompts=None, eval_options=None):
    """`sgm-ext demo --real`: the recipe the efficacy benchmark measured (`profile --recipe
    act-top`) on the pretrained SmolLM2-135M-Instruct, through the commands a user runs:
    `sample` (the model's own continuations of the benchmark's profile prompts, judged),
    `profile`, `eval` on the benchmark's test prompts (K sampled continuations each, raw
    format) with the scale file's random control beside it; then what was measured, with 95%
    intervals and p-values; the exit status. No pass / fail.

    run: as for run_demo_in; data: the user's rows with responses (skips `sample`); prompts:
    the user's eval prompts; eval_options: `sgm-ext eval` options by name."""
    start = time.perf_counter()
    model_dir = realmodel.checkpoint()
    os.makedirs(out, exist_ok=True)  # once the model is there: a failed start leaves none
    data, profile_prompts, prompts = real_demo_inputs(out, data, prompts)
    scales = os.path.join(out, "scales.safetensors")
    options = dict(REAL_SIZES, **(eval_options or {}))
    options["allow_amplify"] = True  # transport maps scale some neurons above 1
    eval_argv = [a for name, value in options.items() for a in (
        [f"--{name.replace('_', '-')}"] if value is True else
        [f"--{name.replace('_', '-')}", str(value)])]
    rows_text = f"your rows ({data})" if data else "the model's own continuations"
    print("sgm-ext demo --real: SmolLM2-135M-Instruct (pretrained, 30 layers x 1536 MLP "
          "neurons), the recipe act-top (bench/bench_efficacy.py), profiled on "
          f"{rows_text}, evaluated on prompts {prompts} beside its random control.\n"
          "About 5 minutes on a quiet 2-core machine; other jobs on the cores slow torch many "
          "times over: each step's bar shows its own estimate.")
    steps = []
    if data is None:
        data = os.path.join(out, "data", "rows.jsonl")
        steps.append(("the model's continuations of the profile prompts, judged",
                      ["sample", "--model", model_dir, "--prompts", profile_prompts, "--out",
                       data, "--samples", str(options["samples"]), "--max-new-tokens",
                       str(options["max_new_tokens"]), "--format", "raw", "--force"]))
    steps += [("the toxic and benign continuations' neurons compared: the scale file",
               ["profile", "--model", model_dir, "--data", data, "--recipe", "act-top",
                "--format", "raw", "--out", scales, "--batch-size", "8", "--force"]),
              ("unpatched, patched and the random control on the test prompts",
               ["eval", "--model", model_dir, "--scales", scales, "--prompts", prompts,
                "--out", out, *eval_argv])]
    for i, (what, argv) in enumerate(steps, 1):
        print(f"\nstep {i}/{len(steps)}: {what} ({time.perf_counter() - start:.0f} s so far)"
              f"\n$ sgm-ext {' '.join(argv)}", flush=True)
        rc = run(argv)
        if rc:
            return rc
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    print("\n".join(real_demo_summary(report, load_scales(scales).changed(), out,
                                       time.perf_counter() - start)))
    return 0


def real_demo_summary(report, moved, out, seconds):
    """The lines `demo --real` ends with: each condition's harmful rate (Wilson 95%) and McNemar
    p against unpatched, perplexity, what the control means, and why the figures are not the
    efficacy table's."""
    runs, paired = report["runs"], report.get("paired", {})
    lines = [f"\nsgm-ext demo --real, {seconds:.0f} s:",
             f"  neurons moved: {moved} (AcT linear maps of the mid neurons whose toxic and "
             "benign continuations are furthest apart); the random control moves as many "
             "neurons of the same sites by the same values"]
    names = {"unpatched": "unpatched", "patched": "act-top", "random": "random control"}
    base = runs["unpatched"]["perplexity"]
    for run, name in names.items():
        if run not in runs:
            continue
        v = runs[run]
        p = paired.get(run, {}).get("harmful")
        rate = "-" if v["harmful_rate"] is None else rate_text(
            (v["harmful_rate"], v["harmful"], v["n"], v["harmful_rate_ci95"]))
        lines.append(f"  {name:<15} harmful rate {rate}"
                     + (f"  p {p['p_value']:.2g}" if p else "")
                     + f"  perplexity {v['perplexity']:.2f} (x{v['perplexity'] / base:.3f})")
    lines += ["  (harmful rate: a prompt counts when one of its continuations is judged toxic; "
              "95% Wilson intervals; p: exact McNemar against unpatched on the same prompts; "
              f"perplexity on {report['reference_passages']} benign passages)",
              "  A recipe detoxes where its rate falls and the control's does not: random "
              "damage of the same size lowers a judge's rate too, the more so the more it breaks "
              "the text (compare their perplexities).",
              "  These are not the efficacy table's figures (README): that table is "
              "bench/bench_efficacy.py's test split (300 prompts x 3 samples, the jigsaw judge, "
              "each recipe at its calibrated strength); this demo draws its own, smaller "
              f"sample (judge {report['judge']}, act-top at strength 1), so its rates differ "
              "from the table's by sampling error and by those choices."]
    if report.get("latency"):
        lines.append(f"  latency ratio patched / unpatched {latency_text(report['latency'])}")
    lines.append(f"  files in {out} (report.md: every condition's table)")
    return lines
