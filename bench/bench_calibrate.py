"""Which patch mode `sgm-ext calibrate` measures in: one calibration step in each mode, on the CPU.

    SGM_EXT_CACHE=DIR python bench/bench_calibrate.py [--rounds 16] [--passages 8] [--write]

A step of evaluation/calibrate.py is a strength change (handle.set_strength) and a perplexity
pass over the passages (generation.passage_nll). Variants, each on its own copy of the model,
patched once at strength 0 as calibrate patches it: "fold" (set_strength folds the scales into
the weights again; the passes then cost what the unpatched model's do) and "fused" (one fused
patch; set_strength only changes the vectors, every MLP forward runs the fused op); "unpatched"
(the pass alone) for scale. Steps alternate between two strengths so every one changes it.
Interleaved round by round (timing.interleaved), medians, and the per-round ratio fused / fold.
The model: SmolLM2-135M-Instruct (sgm_ext.realmodel, float32); the scales: the efficacy
benchmark's published SmolLM2 file (AcT linear maps of 3,000 mid neurons, with shifts); the
passages: the first of the bundled calibration passages.
"""
import argparse
import copy
import os
import statistics
import sys

from bench_patch import THREADS  # noqa: F401  (sets the torch threads)
from timing import command_line, environment, interleaved, medians, timed, write_section

import sgm_ext
from sgm_ext.app import realmodel
from sgm_ext.app.loading import load_model
from sgm_ext.evaluation.calibrate import load_texts
from sgm_ext.evaluation.generation import passage_nll
from sgm_ext.patching.scales import load_scales

HERE = os.path.dirname(os.path.abspath(__file__))
SCALES = os.path.join(HERE, "results", "efficacy-smollm2-135m-instruct-round4-run1.safetensors")
STRENGTHS = (0.25, 0.75)


def step_of(model, processor, texts, handle):
    """A calibration step's callable: the next strength, then the perplexity pass."""
    turn = [0]

    def step():
        if handle is not None:
            handle.set_strength(STRENGTHS[turn[0] % 2])
            turn[0] += 1
        passage_nll(model, processor, texts)
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--passages", type=int, default=8)
    parser.add_argument("--write", action="store_true", help="into bench/RESULTS.md")
    args = parser.parse_args(argv)
    base, processor = load_model(realmodel.checkpoint(), "cpu", "float32")
    scales = load_scales(SCALES)
    texts = load_texts(None)[:args.passages]
    steps, handles = {}, {}
    for variant in ("unpatched", "fold", "fused"):
        model = base if variant == "unpatched" else copy.deepcopy(base)
        handles[variant] = None if variant == "unpatched" else sgm_ext.patch(
            model, scales, mode=variant, strength=0.0, allow_amplify=True)
        steps[variant] = step_of(model, processor, texts, handles[variant])
    refold = [timed(handles["fold"].set_strength, s)[0] for s in STRENGTHS * 4]
    samples = interleaved(steps, rounds=args.rounds, warmup=1, clock="both")
    ratios = [b[0] / a[0] for a, b in zip(samples["fold"], samples["fused"])]
    mid = medians(samples)
    tokens = sum(c for _, c in passage_nll(base, processor, texts))
    lines = [f"`{command_line('bench_calibrate.py', argv if argv is not None else sys.argv[1:])}"
             f"`; {environment()}", "",
             f"SmolLM2-135M-Instruct (float32), {scales!r}, {len(texts)} passages ({tokens} "
             f"predicted tokens) per step, strengths {STRENGTHS[0]} / {STRENGTHS[1]} in turn, "
             f"{args.rounds} rounds interleaved, medians; fold's set_strength alone (re-fold): "
             f"median {statistics.median(refold):.3f} s", "",
             "| variant | step s (wall) | step s (CPU) | fused / fold per round (wall) |",
             "|---|---|---|---|"]
    for variant, (wall, cpu) in mid.items():
        ratio = (f"median {statistics.median(ratios):.3f}, range {min(ratios):.3f}-"
                 f"{max(ratios):.3f}" if variant == "fused" else "")
        lines.append(f"| {variant} | {wall:.3f} | {cpu:.3f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        write_section("bench_calibrate.py", table)


if __name__ == "__main__":
    main()
