"""Argparse pieces more than one command uses: value types (sizes, fractions), the input and
length options of profile and eval, and the check of counts given on the command line."""
import argparse
import re

from ..core.scale_math import check_fraction
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
    p.add_argument("--format", choices=FORMATS, default="auto", dest="input_format",
                   help="chat: through the chat template; raw: the text as it is (continuation "
                   "prompts, AurA's recipe); auto (default): chat when the model has a template")


def add_length_options(p):
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per row at most (default: the model's context length, at "
                   "most 4096); longer text rows are cut, with one warning that counts them")
    p.add_argument("--no-truncate", action="store_true",
                   help="refuse rows longer than --max-length instead of cutting them")


def input_format_line(processor, chosen):
    """What --format does with this model, said before a long run."""
    fmt = resolve_format(processor, chosen)
    how = ("rows go through the model's chat template as a user turn; --format raw for plain "
           "text" if fmt == "chat" else "rows are the model's input as they are (no chat "
           "template)")
    return f"input format: {fmt} ({how})"
