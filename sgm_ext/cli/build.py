"""`sgm-ext build`: compile sgm_ext._C against the installed torch."""
import sys

from ..ops.build import BuildError
from ..ops.build import build as build_library


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
