"""`sgm-ext profile`: its arguments, their checks, and the printing and writing around the
library's profile workflow (sgm_ext.profile.profile_model), which does the work."""
import os
import sys
import warnings

from ..app.loading import check_device, check_max_length, check_model_dir, load_model
from ..core.files import check_output_file
from ..core.scale_math import METHODS, check_method
from ..evaluation.plots import expertise_plot
from ..evaluation.report import expertise_table
from ..patching.registry import SITE_KINDS
from ..patching.scales import is_scale_file
from ..profile.auroc import check_labels
from ..profile.data import load_rows, recorded_format
from ..profile.directions import DIRECTION_METHODS, check_direction_options
from ..profile.expertise import DEFAULT_FDR, SELECTIONS, check_selection, is_expertise_file
from ..profile.inputs import MODALITIES
from ..profile.pooling import POOLINGS
from ..profile.recipes import RECIPES, describe, recipe
from ..profile.responses import DEFAULT_RAM_BUDGET
from ..profile.transport import TRANSPORT_METHODS
from ..profile.workflow import ProfileOptions, profile_model
from .options import (
    add_device_options,
    add_input_options,
    fraction,
    input_format_line,
    positive,
    size,
)

POOLED = {"sample": "each row's own tokens: its text and image, not the chat template's",
          "all": "every token, the chat template's and a row's response included",
          "text": "each row's text tokens", "image": "each row's image tokens",
          "response": "each row's response tokens"}


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
    p.add_argument("--pooling", choices=POOLINGS, default="mean",
                   help="how a neuron's values over a row's tokens become one response: mean "
                   "(default; the SGM authors' code), max (AurA), last (the last token's)")
    p.add_argument("--modality", choices=MODALITIES, default="sample",
                   help="the tokens pooled: sample (default: the row's own text and image "
                   "tokens, not the chat template's), all, text, image, response")
    p.add_argument("--recipe", choices=tuple(RECIPES), default=None,
                   help="a peer's recipe by name: every option it sets (sites, pooling, "
                   "modality, method, selection, threshold, balancing, amplification), printed; "
                   "an option you give another value than its default wins. "
                   + "; ".join(f"{name}: {text.split(':')[0]}" for name, (text, _)
                               in RECIPES.items()))
    add_method_options(p)
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows in one forward pass (default 8)")
    add_device_options(p, "auto (default: GPU(s) if any, device_map='auto', one GPU per rank "
                       "under torchrun; else the CPU), cpu, cuda, cuda:N")
    p.add_argument("--max-samples", type=int, default=None,
                   help="profile the first N good rows only (default: every row)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip rows with empty text, unknown label or missing image (counted)")
    p.add_argument("--padding-side", choices=("left", "right"), default=None,
                   help="where a batch's shorter rows are padded (default: the tokenizer's "
                   "side); padding is masked out of the pooling either way")
    p.add_argument("--ram-budget", type=size, default=DEFAULT_RAM_BUDGET,
                   help="responses kept in RAM before spilling to disk (default 4G)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save progress here; rerunning the same command resumes")
    p.add_argument("--checkpoint-every", type=int, default=50,
                   help="batches between checkpoints (default 50)")
    p.add_argument("--expertise-out", default=None,
                   help="also write the per-neuron AUROC (safetensors) here")
    add_input_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out / --expertise-out that sgm-ext did not "
                   "write (never a model's weight file)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_profile)


def add_method_options(p):
    """How the scales are made from the responses: ProfileOptions' second group."""
    p.add_argument("--method", choices=METHODS + TRANSPORT_METHODS + DIRECTION_METHODS,
                   default="aura",
                   help="aura (default), det0, damp: scales from the AUROC; mean_ot, "
                   "gaussian_ot, linear_ot: AcT's transport maps (scales and shifts) from the "
                   "responses (Rodriguez et al., ICLR 2025); their scales may exceed 1, so "
                   "patch them with allow_amplify=True; safe_vectors, toxic_direction, "
                   "toxic_direction_neurons: from the rows' responses token by token (the "
                   "recipes safe-vectors, toxic-direction, toxic-direction-neurons)")
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
    p.add_argument("--threshold", type=fraction, default=0.5,
                   help="experts have AUROC above this (default 0.5)")
    p.add_argument("--top-k", type=int, default=None, help="keep only the k best experts; with "
                   "a transport method, only the maps of the k neurons whose classes are "
                   "furthest apart (Cohen's d), every other neuron unchanged; with "
                   "safe_vectors / toxic_direction_neurons, the number of neurons (default 10)")
    p.add_argument("--hold-at", type=float, default=None, metavar="A",
                   help="method safe_vectors: hold each chosen neuron at A times its own RMS "
                   "activation over the rows' response tokens, signed to promote the benign "
                   "tokens (default 10; scale 0 and shift a, so strength s gives "
                   "(1 - s) m + s a)")
    p.add_argument("--last-layers", type=int, default=None, metavar="L",
                   help="method toxic_direction: subtract the direction on the down sites of "
                   "the last L layers (default: the last quarter, rounded up)")
    p.add_argument("--strength", type=fraction, default=1.0,
                   help="lambda in [0, 1], written into the scales: 1 - lambda (1 - alpha) "
                   "(default 1: the full scales)")
    p.add_argument("--alpha", type=fraction, default=None, help="the factor of method damp")


def profile_options(args) -> ProfileOptions:
    """The library's options from the parsed command line."""
    return ProfileOptions(
        sites=args.sites, pooling=args.pooling, modality=args.modality,
        batch_size=args.batch_size, padding_side=args.padding_side,
        skip_bad_rows=args.skip_bad_rows, max_samples=args.max_samples,
        ram_budget=args.ram_budget, checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every, max_length=args.max_length,
        truncate=not args.no_truncate, input_format=args.input_format,
        progress=not args.quiet, method=args.method, balanced=args.balanced,
        allow_amplify=args.allow_amplify, selection=args.selection, fdr=args.fdr,
        threshold=args.threshold, top_k=args.top_k, strength=args.strength, alpha=args.alpha,
        hold_at=args.hold_at, last_layers=args.last_layers, recipe=args.recipe)


def apply_recipe(args, say=print):
    """--recipe NAME: set the recipe's options on `args`, except those given another value
    than the command's default (the user's choice wins), and print what was set."""
    if not args.recipe:
        return
    defaults = ProfileOptions()
    kept = []
    for key, value in recipe(args.recipe)[1].items():
        given = getattr(args, key)
        if (tuple(given) if isinstance(given, list) else given) == getattr(defaults, key):
            setattr(args, key, list(value) if isinstance(value, tuple) else value)
        else:
            kept.append(f"--{key.replace('_', '-')} {given}")
    say(describe(args.recipe) + (f"\n  yours kept: {', '.join(kept)}" if kept else ""))


def apply_recorded_format(args, say=print):
    """Rows `sgm-ext sample` wrote are profiled in the format they were sampled in (their
    provenance file says which): --format auto takes it, another --format is refused."""
    fmt = recorded_format(args.data)
    if fmt is None or args.input_format == fmt:
        return
    if args.input_format != "auto":
        raise ValueError(f"{args.data} was sampled in the {fmt} format (its provenance file "
                         f"says so); profile it with --format {fmt} (or auto), the format its "
                         "responses were generated in")
    args.input_format = fmt
    say(f"--format {fmt}: {args.data} was sampled in it (its provenance file)",
        file=sys.stderr)


def check_profile_args(args):
    """Every option checked before the data is read or the model loaded."""
    check_direction_options(args.method, sites=args.sites, pooling=args.pooling,
                            modality=args.modality, top_k=args.top_k, hold_at=args.hold_at,
                            last_layers=args.last_layers, alpha=args.alpha)
    if args.method in TRANSPORT_METHODS:
        if args.alpha is not None:
            raise ValueError(f"--alpha is for method damp only (method is {args.method})")
    elif args.method in DIRECTION_METHODS:
        if args.expertise_out:
            raise ValueError(f"--expertise-out: method {args.method} measures no AUROC")
    else:
        check_method(args.method, args.alpha)
    check_selection(args.selection, args.fdr)
    positive(args.top_k, "--top-k", zero=True)
    for option in ("batch_size", "checkpoint_every", "max_samples", "max_length"):
        positive(getattr(args, option), "--" + option.replace("_", "-"))
    check_output_file(args.out, "--out", ours=is_scale_file, force=args.force)
    if args.expertise_out:
        check_output_file(args.expertise_out, "--expertise-out", ours=is_expertise_file,
                          force=args.force)
    if os.path.abspath(args.out) == os.path.abspath(args.expertise_out or ""):
        raise ValueError("--out and --expertise-out name the same file")
    if args.checkpoint_dir:
        check_checkpoint_dir(args.checkpoint_dir)
    check_model_dir(args.model)
    check_max_length(args.model, args.max_length)
    check_device(args.device)


def check_checkpoint_dir(path):
    """ValueError unless --checkpoint-dir is a directory, or one that can be made (its nearest
    existing parent a writable directory)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--checkpoint-dir {path} exists and is not a directory")
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--checkpoint-dir {path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--checkpoint-dir {path}: {parent} is not writable")


def check_rows(args, rows):
    """What the options need of the rows, before the model loads: both classes; as many of
    each for linear_ot (unless --balanced); a response in every row for --modality response."""
    labels = [r.label for r in rows]
    try:
        check_labels(labels)
    except ValueError as e:
        raise ValueError(f"{args.data}: {e}") from None
    toxic = sum(1 for v in labels if v == 1)
    if args.method == "linear_ot" and not args.balanced and 2 * toxic != len(labels):
        raise ValueError(f"{args.data}: --method linear_ot needs as many toxic as non-toxic "
                         f"rows, got {toxic} and {len(labels) - toxic}; pass --balanced to "
                         "subsample the larger class")
    if args.modality == "response":
        missing = next((r for r in rows if not r.response), None)
        if missing is not None:
            raise ValueError(f"{args.data} row {missing.number} has no `response`; --modality "
                             "response pools the tokens of each row's response")


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
    apply_recipe(args, say)
    check_profile_args(args)
    apply_recorded_format(args, say)
    dataset = load_rows(args.data, skip_bad_rows=args.skip_bad_rows, max_samples=args.max_samples)
    if dataset.skipped:
        say(f"skipped {len(dataset.skipped)} bad rows (first: row {dataset.skipped[0][0]}: "
            f"{dataset.skipped[0][1]})", file=sys.stderr)
    check_rows(args, dataset.rows)
    model, processor = load_model(args.model, args.device, args.dtype, local_rank, world)
    say(input_format_line(processor, args.input_format), file=sys.stderr)
    say(f"pooling: {args.pooling} over {POOLED[args.modality]} (--modality)", file=sys.stderr)
    found = profile_model(model, dataset, profile_options(args), processor=processor)
    if found is None:  # a rank other than 0: rank 0 writes
        return 0
    if found.options.transport:
        return _write_transport(args, found)
    if found.options.method in DIRECTION_METHODS:
        return _write_direction(args, found)
    found.scales.save(args.out)
    if args.expertise_out:
        found.expertise.save(args.expertise_out)
    print(expertise_table(found.expertise, found.scales, found.experts))
    print(f"experts ({found.rule()}): {found.n_experts}; with the labels shuffled (the noise "
          f"floor, one permutation): {found.noise_floor}")
    for line in found.noise_warnings:
        warnings.warn(line, stacklevel=1)
    print(f"wrote {args.out}: {found.scales!r} from {len(found.responses)} samples "
          f"({found.expertise.metadata['n_toxic']} toxic)")
    if not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        expertise_plot(found.expertise, found.scales, png, threshold=args.threshold)
        print(f"wrote {png}")
    return 0


def _write_transport(args, found):
    """profile --method mean_ot | gaussian_ot | linear_ot: the transport maps' scale file."""
    scales = found.scales
    scales.save(args.out)
    if args.expertise_out:
        found.expertise.save(args.expertise_out)
    amplified = sum(int((s > 1).sum()) for s in scales.scales.values())
    kept = f", the maps of the top {args.top_k} neurons only" if args.top_k is not None else ""
    print(f"wrote {args.out}: {scales!r} ({args.method}{kept}: {scales.changed()} neurons "
          f"moved) from {len(found.responses)} samples ({scales.metadata['n_toxic']} toxic); "
          f"{amplified} scales above 1: patch with allow_amplify=True")
    return 0


def _write_direction(args, found):
    """profile --method safe_vectors | toxic_direction | toxic_direction_neurons: what the
    method found (its lines) and the scale file."""
    scales = found.scales
    scales.save(args.out)
    for line in found.lines:
        print(line)
    meta = scales.metadata
    print(f"wrote {args.out}: {scales!r} ({args.method}: {scales.changed()} neurons changed) "
          f"from {int(meta['n_toxic']) + int(meta['n_non_toxic'])} rows ({meta['n_toxic']} "
          f"toxic); `sgm-ext calibrate` sets its strength for a fluency budget")
    return 0
