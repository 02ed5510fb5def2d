"""Argparse pieces more than one command uses: value types (sizes, fractions), the input and
length options of profile and eval, the judge and sampling options of eval and sample, and
the check of counts given on the command line."""
import argparse
import re

from ..core.scale_math import check_fraction
from ..evaluation.judges import get_judge, read_template
from ..evaluation.options import check_sampling
from ..patching.scales import load_scales
from ..profile.inputs import FORMATS, resolve_format

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def size(text):
    """An argparse type: '512M', '4G', '1000' -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 512M, 4G)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])


def fraction(text):
    """An argparse type: a number in [0, 1] (checked by scale_math, as the library does)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    try:
        return check_fraction(value, "the value")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive(value, option, zero=False):
    """ValueError naming `option` when a count given is below 1 (below 0 with zero=True)."""
    if value is not None and (value < 0 or (value == 0 and not zero)):
        raise ValueError(f"{option} is {value}; it must be {'>= 0' if zero else '>= 1'}")


def add_input_options(p):
    """Options of how rows become model inputs, shared by profile and eval."""
    add_length_options(p)
    add_format_option(p)


def add_format_option(p, default="auto"):
    p.add_argument("--format", choices=FORMATS, default=default, dest="input_format",
                   help="chat: through the chat template; raw: the text as it is (continuation "
                   "prompts, AurA's recipe); auto: chat when the model has a template "
                   f"(default {default})")


def add_length_options(p):
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per row at most (default: the model's context length, at "
                   "most 4096); longer text rows are cut, with one warning that counts them")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse rows longer than --max-length instead of cutting them")


DEVICE_HELP = ("auto (default: the GPU if there is one, else the CPU), cpu, cuda, cuda:N")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def add_device_options(p, device_help=DEVICE_HELP):
    """--device and --dtype (profile, sample, eval): where the model runs and in what."""
    p.add_argument("--device", default="auto", help=device_help)
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="the weights' dtype; auto (default): the checkpoint's on a GPU, "
                   "float32 on the CPU")


def input_format_line(processor, chosen):
    """What --format does with this model, said before a long run."""
    fmt = resolve_format(processor, chosen)
    how = ("rows go through the model's chat template as a user turn; --format raw for plain "
           "text" if fmt == "chat" else "rows are the model's input as they are (no chat "
           "template)")
    return f"input format: {fmt} ({how})"


def add_judge_options(p, threshold=0.5, what="harmful"):
    """--judge, --harmful-labels, --threshold, --judge-template (eval, demo, sample)."""
    p.add_argument("--judge", default="profanity",
                   help="profanity (default), jigsaw (a BiLSTM trained on the Jigsaw toxic "
                   "comments; pip install --no-deps toxic-comment-classifier==0.3.0), refusal, "
                   "hf:DIR (a local text classifier) or llm:DIR (a local chat model asked for "
                   "safe / unsafe)")
    p.add_argument("--harmful-labels", default=None,
                   help="for hf:DIR: comma-separated label names that mean harmful")
    p.add_argument("--threshold", type=float, default=threshold,
                   help=f"{what} when the judge's score >= this (default {threshold})")
    p.add_argument("--judge-template", default=None, metavar="FILE",
                   help="for llm:DIR: the judge prompt, with {prompt} and {answer} (default: a "
                   "built-in Llama Guard style prompt asking for safe / unsafe)")


def check_judge_args(args):
    """The judge options checked before any model loads (the judge itself is made later)."""
    check_fraction(args.threshold, "--threshold")
    if args.judge_template:
        if not args.judge.startswith("llm:"):
            raise ValueError(f"--judge-template is for --judge llm:DIR, not {args.judge!r}")
        read_template(args.judge_template)


def judge_from_args(args):
    labels = args.harmful_labels.split(",") if args.harmful_labels else None
    template = read_template(args.judge_template) if args.judge_template else None
    return get_judge(args.judge, threshold=args.threshold, harmful_labels=labels,
                     template=template)


def add_sampling_options(p, when=""):
    """--temperature, --top-p, --top-k (eval --samples, sample); `when`: what the help says
    they go with."""
    p.add_argument("--temperature", type=float, default=1.0,
                   help=f"{when}softmax temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.9,
                   help=f"{when}nucleus sampling's p (default 0.9)")
    p.add_argument("--top-k", type=int, default=0,
                   help=f"{when}keep the k likeliest tokens (default 0: no cut)")


def check_sampling_args(args):
    check_sampling(args.temperature, args.top_p, args.top_k,
                   ("--temperature", "--top-p", "--top-k"))


def checked_scales(path, allow_amplify, use="evaluate them"):
    """The scale file, its values checked before the model loads (scales above 1 need
    --allow-amplify: the command's flag named, not the library's argument)."""
    scales = load_scales(path)
    amplified = next((site for site, s in scales.items() if bool((s > 1).any())), None)
    if amplified is not None and not allow_amplify:
        raise ValueError(f"{path}: scales[{amplified!r}] has scales above 1 (they amplify "
                         f"neurons); pass --allow-amplify to {use}")
    try:
        return scales.validate(allow_amplify)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
