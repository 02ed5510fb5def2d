"""`sgm-ext inspect`: check a scale file and print its summary (exit status 1 when a value is
illegal)."""
from ..evaluation.report import scale_problems, scale_report
from ..patching.scales import load_scales


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

