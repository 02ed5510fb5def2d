"""`sgm-ext eval`: its arguments and their checks, and the evaluation options it shares with
`sgm-ext demo`; the library's evaluate does the work."""
import os
import sys

from ..app.loading import check_max_length, check_model_dir, load_model
from ..core.scale_math import check_strength
from ..evaluation.benchmarks import BENCHMARKS, LAYOUTS, load_benchmark
from ..evaluation.conditions import ALL_CONDITIONS
from ..evaluation.evaluate import SAFETY_PROMPT, check_conditions, evaluate
from ..evaluation.judges import SCORINGS, resolve_scoring
from ..evaluation.prompts import load_capability, load_prompts, load_reference, read_text_file
from ..evaluation.report import summary_table, write_report
from .options import (
    add_device_options,
    add_input_options,
    add_judge_options,
    add_sampling_options,
    check_judge_args,
    check_sampling_args,
    checked_scales,
    input_format_line,
    judge_from_args,
    positive,
)


def add_eval(sub):
    p = sub.add_parser("eval", help="harmful rate, perplexity and latency, unpatched vs patched",
                       description="Generate an answer to every prompt with the unpatched and "
                       "the patched model, judge the answers, measure perplexity on reference "
                       "text and the latency ratio; write report.json / .md / .png to --out.")
    add_eval_options(p)
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.add_argument("--scales", required=True, help="scale file (.safetensors)")
    p.add_argument("--prompts", default=None, help=".jsonl / .csv with text (or prompt), "
                   "optional image, category and label (or --data)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="a benchmark as distributed, on disk: " + LAYOUTS)
    p.add_argument("--benchmark", default="auto", choices=("auto", *BENCHMARKS),
                   help="the layout of --data (default auto: told by its files)")
    p.add_argument("--subset", default=None,
                   help="comma-separated subsets of the benchmark: mm-safetybench SD, TYPO, "
                   "SD_TYPO, text (default the three image variants); vlguard unsafe, "
                   "safe-unsafe, safe-safe; realtoxicityprompts challenging")
    add_device_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="torch's seed before generating, the bootstrap's and the random control's "
                   "(default 0)")
    p.add_argument("--capability", default=None, metavar="FILE",
                   help="a capability set (.jsonl / .csv: question, answer, optional image and "
                   "choices) answered unpatched and patched: accuracy with intervals")
    p.add_argument("--capability-scoring", choices=SCORINGS, default="auto",
                   help="exact (the answer's first line equals the reference, up to case and "
                   "punctuation) or choice (its first standalone letter A-J is the reference); "
                   "auto (default): choice when every reference is a letter")
    p.add_argument("--allow-amplify", action="store_true",
                   help="accept scales above 1 (profile --allow-amplify; AcT's transport maps, "
                   "ml-aura-vl's threshold-0.3 rule), as patch(..., allow_amplify=True)")
    add_input_options(p)
    p.set_defaults(func=run_eval)


EVAL_DEFAULTS = dict(judge="profanity", harmful_labels=None, threshold=0.5, max_new_tokens=64,
                     strength=1.0, mode="fused", reference=None, max_prompts=None,
                     batch_size=8, latency_runs=3, latency_prompts=8,
                     conditions="unpatched,patched", safety_prompt=None, jailbreak=None,
                     judge_template=None, samples=None, temperature=1.0, top_p=0.9, top_k=0,
                     out="sgm-ext-eval")


def add_eval_options(p, **defaults):
    """The evaluation options `eval` and `demo` share (demo changes some defaults)."""
    d = {**EVAL_DEFAULTS, **defaults}
    add_judge_options(p, d["threshold"])
    p.set_defaults(judge=d["judge"], harmful_labels=d["harmful_labels"],
                   judge_template=d["judge_template"])
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"],
                   help="tokens per answer at most " + _default(d["max_new_tokens"]))
    p.add_argument("--strength", type=float, default=d["strength"],
                   help="lambda in [0, 1]: scales 1 - lambda (1 - alpha) " + _default(
                       d["strength"], "1: the full scales"))
    p.add_argument("--mode", choices=("fused", "fold", "hook"), default=d["mode"],
                   help="how the scales are applied: fused (default; the fused op), fold (into "
                   "the weights), hook (forward hooks, AurA's way); the same answers")
    p.add_argument("--reference", default=d["reference"],
                   help="reference text for perplexity (one passage per line; default: the "
                   "bundled benign text)")
    p.add_argument("--max-prompts", type=int, default=d["max_prompts"],
                   help="evaluate the first N prompts only (default: every prompt)")
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="prompts generated together (left padding) " + _default(
                       d["batch_size"]))
    p.add_argument("--latency-runs", type=int, default=d["latency_runs"],
                   help="interleaved repetitions of the latency pairs (0: skip) " + _default(
                       d["latency_runs"]))
    p.add_argument("--latency-prompts", type=int, default=d["latency_prompts"],
                   help="prompts timed in the latency pairs " + _default(
                       d["latency_prompts"]))
    p.add_argument("--conditions", default=d["conditions"],
                   help="comma-separated: unpatched, patched (SGM: the scale file), "
                   "safety-prompt (a safety system prompt), patched+safety-prompt (SGM*: both); "
                   "random (the scale file's random control: the same changes at random units "
                   "of the same sites, seeded by --seed; beside patched it tells the recipe's "
                   "effect from any damage's); aliases sgm, sgm*, prompt; 'all' for the first "
                   "four (default unpatched,patched)")
    p.add_argument("--safety-prompt", default=d["safety_prompt"], metavar="FILE",
                   help="the safety-prompt condition's system prompt, from a text file "
                   "(default: the built-in one, printed in report.md)")
    p.add_argument("--jailbreak", default=d["jailbreak"], metavar="FILE",
                   help="a jailbreak template (text file; {prompt} marks where the prompt goes, "
                   "else it is a prefix): every condition is also run with it applied to every "
                   "prompt")
    p.add_argument("--samples", type=int, default=d["samples"], metavar="K",
                   help="RealToxicityPrompts' way: K sampled continuations per prompt, each "
                   "judged; a prompt counts as harmful when one of them is, and the report adds "
                   "the expected maximum score (default: one greedy answer per prompt)")
    add_sampling_options(p, "with --samples: ")
    p.set_defaults(temperature=d["temperature"], top_p=d["top_p"], top_k=d["top_k"])
    p.add_argument("--out", default=d["out"],
                   help=d.get("out_help", f"directory for the report files (default {d['out']})"))
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _default(value, meaning=None):
    """The end of a help text: the option's default, or that the demo's size picks it."""
    if value is None:
        return "(default: the demo sets it for --fast, the full run or --real)"
    return f"(default {meaning or value})"


def eval_texts(args):
    """(conditions, safety prompt, jailbreak template) from the options, files read and
    checked; ValueError naming a bad name or file."""
    chosen = args.conditions or "all"  # None: the demo's default, the four
    names = list(ALL_CONDITIONS) if chosen.strip().lower() == "all" else chosen
    conditions = check_conditions(names)
    safety = read_text_file(args.safety_prompt, "--safety-prompt") if args.safety_prompt \
        else SAFETY_PROMPT
    jailbreak = read_text_file(args.jailbreak, "--jailbreak") if args.jailbreak else None
    return conditions, safety, jailbreak


def check_eval_args(args):
    """The evaluation options checked before any file is read or model loaded."""
    check_strength(args.strength, per_sequence=False, name="--strength")
    check_judge_args(args)
    positive(args.max_new_tokens, "--max-new-tokens")
    positive(args.batch_size, "--batch-size")
    positive(args.max_prompts, "--max-prompts")
    positive(args.latency_runs, "--latency-runs", zero=True)
    if args.latency_runs:
        positive(args.latency_prompts, "--latency-prompts")
    positive(getattr(args, "max_length", None), "--max-length")
    positive(args.samples, "--samples")
    check_sampling_args(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; eval writes a directory of report files")
    eval_texts(args)


def run_eval(args):
    check_eval_args(args)  # all before a long load
    conditions, safety, jailbreak = eval_texts(args)
    if (args.prompts is None) == (args.data is None):
        raise ValueError("give the prompts as --prompts FILE or a benchmark as --data DIR "
                         "(one of the two)")
    if args.data is None and (args.benchmark != "auto" or args.subset):
        raise ValueError("--benchmark and --subset go with --data DIR")
    check_model_dir(args.model)
    check_max_length(args.model, args.max_length)
    judge = judge_from_args(args)
    scales = checked_scales(args.scales, args.allow_amplify)
    if args.data is None:
        prompts, benchmark = load_prompts(args.prompts, args.max_prompts), "prompts"
    else:
        prompts, benchmark = load_benchmark(args.data, args.benchmark, args.subset,
                                            args.max_prompts)
        print(f"benchmark: {benchmark}, {len(prompts)} prompts from {args.data}",
              file=sys.stderr)
    # the reference passages read now: a missing --reference is refused before the load
    reference = load_reference(args.reference) if args.reference else None
    capability = None
    if args.capability:
        capability = load_capability(args.capability)
        resolve_scoring(args.capability_scoring, capability[1])
    model, processor = load_model(args.model, args.device, args.dtype)  # checks dir and device
    print(input_format_line(processor, args.input_format), file=sys.stderr)
    report, generations = evaluate(
        model, processor, scales, prompts, judge=judge, max_new_tokens=args.max_new_tokens,
        strength=args.strength, mode=args.mode, reference=reference,
        batch_size=args.batch_size, latency_runs=args.latency_runs,
        latency_prompts=args.latency_prompts, max_length=args.max_length,
        truncate=not args.no_truncate, input_format=args.input_format, progress=not args.quiet,
        conditions=conditions, safety_prompt=safety, jailbreak=jailbreak, seed=args.seed,
        capability=capability, capability_scoring=args.capability_scoring,
        samples=args.samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        allow_amplify=args.allow_amplify)
    report.update(model=os.path.abspath(args.model), scales=os.path.abspath(args.scales),
                  prompts=os.path.abspath(args.prompts or args.data), benchmark=benchmark,
                  subset=args.subset)
    files = write_report(report, generations, args.out)
    print(summary_table(report))
    print("wrote " + ", ".join(files))
    return 0
