"""The `sgm-ext` command line: one argparse subcommand per verb.

    sgm-ext profile --model DIR --data FILE --out scales.safetensors [options]
    sgm-ext inspect scales.safetensors

A subcommand is a pair of functions: `add_<verb>(subparsers)` declares its arguments and sets
`func`, the function that runs it and returns the exit status. New verbs (eval, demo) add
their pair to SUBCOMMANDS.
"""
import argparse
import os
import re
import sys

from . import profile as prof
from .registry import SITE_KINDS

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(text):
    """'512M', '4G', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def _fraction(text):
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


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
    p.add_argument("--pooling", choices=prof.POOLINGS, default="mean")
    p.add_argument("--modality", choices=prof.MODALITIES, default="all",
                   help="pool over all tokens, image tokens, text tokens or the response")
    p.add_argument("--method", choices=prof.METHODS, default="aura")
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
    p.add_argument("--ram-budget", type=_bytes, default=prof.DEFAULT_RAM_BUDGET,
                   help="responses kept in RAM before spilling to disk (default 4G)")
    p.add_argument("--checkpoint-dir", default=None,
                   help="save progress here; rerunning the same command resumes")
    p.add_argument("--checkpoint-every", type=int, default=50, help="batches between checkpoints")
    p.add_argument("--expertise-out", default=None,
                   help="also write the per-neuron AUROC (safetensors) here")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_profile)


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


def load_model(path, device="auto", dtype="auto", local_rank=0, world=1):
    """A model and its processor from a Hugging Face directory (no download)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    if getattr(config, "vision_config", None) is not None:
        from transformers import AutoModelForImageTextToText as auto_class
    else:
        from transformers import AutoModelForCausalLM as auto_class
    cuda = torch.cuda.is_available()
    kwargs = {}
    if device == "auto":
        if cuda and world > 1:
            torch.cuda.set_device(local_rank)
            kwargs["device_map"] = {"": local_rank}
        elif cuda:
            kwargs["device_map"] = "auto"
    else:
        kwargs["device_map"] = {"": device}
    on_gpu = "device_map" in kwargs and kwargs["device_map"] != {"": "cpu"}
    kwargs["dtype"] = (dtype if dtype != "auto" else ("auto" if on_gpu else "float32"))
    if kwargs["dtype"] != "auto":
        kwargs["dtype"] = getattr(torch, kwargs["dtype"])
    model = auto_class.from_pretrained(path, **kwargs).eval()
    return model, load_processor(path)


def load_processor(path):
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(path)
    except Exception:  # text-only checkpoints may have no processor config
        return AutoTokenizer.from_pretrained(path)


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
    from .data import load_rows

    say = print if rank == 0 else (lambda *a, **k: None)
    dataset = load_rows(args.data, skip_bad_rows=args.skip_bad_rows, max_samples=args.max_samples)
    if dataset.skipped:
        say(f"skipped {len(dataset.skipped)} bad rows (first: row {dataset.skipped[0][0]}: "
            f"{dataset.skipped[0][1]})", file=sys.stderr)
    model, processor = load_model(args.model, args.device, args.dtype, local_rank, world)
    responses = prof.collect(model, dataset, processor=processor, sites=args.sites,
                             pooling=args.pooling, modality=args.modality,
                             batch_size=args.batch_size, padding_side=args.padding_side,
                             ram_budget=args.ram_budget, checkpoint_dir=args.checkpoint_dir,
                             checkpoint_every=args.checkpoint_every, progress=not args.quiet)
    if responses is None:  # a rank other than 0: rank 0 writes
        return 0
    expertise = prof.expertise(responses)
    scales = expertise.to_scales(method=args.method, threshold=args.threshold, top_k=args.top_k,
                                 strength=args.strength, alpha=args.alpha)
    scales.save(args.out)
    if args.expertise_out:
        expertise.save(args.expertise_out)
    print(summary_table(expertise, scales, args.threshold, args.top_k))
    print(f"wrote {args.out}: {scales!r} from {len(responses)} samples "
          f"({expertise.metadata['n_toxic']} toxic)")
    if not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        plot(expertise, scales, png)
        print(f"wrote {png}")
    return 0


def _layer(site):
    """Layer number in a site name (the first `.N.` after 'layers' / 'layer' / 'h'), or None."""
    m = re.search(r"\.(?:layers|layer|h|blocks)\.(\d+)\.", "." + site)
    return int(m.group(1)) if m else None


def _kind(site):
    return site.rsplit(".", 1)[-1]


def summary_table(expertise, scales, threshold, top_k, strongest=10):
    """Experts per site (layer, kind) and the strongest neurons, as text."""
    experts = expertise.experts(threshold, top_k)
    lines = [f"{'layer':>5}  {'site':<8} {'neurons':>8} {'experts':>8} {'max AUROC':>10}  path"]
    for site, a in expertise.auroc.items():
        layer = _layer(site)
        lines.append(f"{'-' if layer is None else layer:>5}  {_kind(site):<8} {a.numel():>8} "
                     f"{int(experts[site].sum()):>8} {float(a.max()):>10.4f}  {site}")
    total = sum(int(e.sum()) for e in experts.values())
    lines.append(f"total experts: {total} of {sum(a.numel() for a in expertise.auroc.values())}")
    ranked = sorted(((float(a[i]), site, int(i)) for site, a in expertise.auroc.items()
                     for i in a.topk(min(strongest, a.numel())).indices), reverse=True)[:strongest]
    lines.append(f"strongest neurons:\n{'AUROC':>8} {'scale':>7}  site[neuron]")
    lines += [f"{v:>8.4f} {float(scales[site][i]):>7.4f}  {site}[{i}]" for v, site, i in ranked]
    return "\n".join(lines)


def plot(expertise, scales, path):
    """PNG: histogram of all AUROCs, and damped neurons per layer and site kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import torch

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = torch.cat(list(expertise.auroc.values())).numpy()
    left.hist(values, bins=50, range=(0, 1), color="#4477aa")
    left.set_yscale("log")
    left.set(xlabel="AUROC (toxic vs non-toxic)", ylabel="neurons", title="Expertise")
    per_kind = {}
    for site, s in scales.items():
        layer = _layer(site)
        per_kind.setdefault(_kind(site), {})[layer if layer is not None else -1] = int((s < 1).sum())
    width = 0.8 / max(len(per_kind), 1)
    for j, (kind, counts) in enumerate(sorted(per_kind.items())):
        layers = sorted(counts)
        right.bar([x + j * width for x in layers], [counts[x] for x in layers], width, label=kind)
    right.set(xlabel="layer", ylabel="experts (scale < 1)", title="Experts per layer")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------ inspect

def add_inspect(sub):
    p = sub.add_parser("inspect", help="print a scale file's summary")
    p.add_argument("path", help="scale file (.safetensors)")
    p.set_defaults(func=run_inspect)


def run_inspect(args):
    from .scales import load_scales

    scales = load_scales(args.path)
    print(f"{args.path}: {scales!r}")
    for key, value in sorted(scales.metadata.items()):
        print(f"  {key}: {value}")
    print(f"{'neurons':>8} {'damped':>7} {'min':>7} {'mean':>7}  site")
    for site, s in scales.items():
        print(f"{s.numel():>8} {int((s != 1).sum()):>7} {float(s.min()):>7.4f} "
              f"{float(s.mean()):>7.4f}  {site}")
    return 0


# ------------------------------------------------------------------------ entry point

from .demo import add_demo  # noqa: E402
from .evaluate import add_eval  # noqa: E402

SUBCOMMANDS = [add_profile, add_inspect, add_eval, add_demo]


def build_parser():
    parser = argparse.ArgumentParser(prog="sgm-ext", description="Neuron-level detoxification "
                                     "of (multimodal) LLMs: profile, inspect, eval, demo.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad input: a message, not a traceback
        print(f"sgm-ext {args.command}: error: {e}", file=sys.stderr)
        return 2
