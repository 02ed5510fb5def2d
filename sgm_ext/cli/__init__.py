"""The `sgm-ext` command line: one argparse subcommand per verb, one module per command.

    sgm-ext profile --model DIR --data FILE --out scales.safetensors [options]
    sgm-ext inspect scales.safetensors
    sgm-ext calibrate --model DIR --scales scales.safetensors --out calibrated.safetensors

    sgm-ext sample --model DIR (--prompts FILE | --builtin N) --out rows.jsonl [options]
    sgm-ext eval --model DIR --scales scales.safetensors --prompts FILE [options]
    sgm-ext export --model DIR --scales scales.safetensors --out DIR [--strength S]
    sgm-ext export --gguf MODEL.gguf --scales scales.safetensors --out OUT.gguf
    sgm-ext demo [--fast]

A subcommand is a pair of functions in its module (profile.py, inspect.py, calibrate.py,
sites.py, sample.py, eval.py, export.py, demo.py, build.py, serve.py): `add_<verb>(subparsers)`
declares its arguments and sets `func`, the function that runs it and returns the exit status;
SUBCOMMANDS lists the pairs, and options.py holds the argparse pieces several share. All
argparse code lives in this folder; the library modules never import it.
"""
import argparse
import os
import sys
import warnings

from ..core.pause import interrupted_at_start

try:  # Ctrl-C in the imports: before main()'s handling, one line all the same
    from .build import add_build
    from .calibrate import add_calibrate
    from .demo import add_demo
    from .eval import add_eval
    from .export import add_export
    from .inspect import add_inspect
    from .profile import add_profile
    from .sample import add_sample
    from .serve import add_serve
    from .sites import add_sites
except KeyboardInterrupt:
    interrupted_at_start()

SUBCOMMANDS = [add_profile, add_inspect, add_calibrate, add_sites, add_sample, add_eval,
               add_export, add_demo, add_build, add_serve]


def build_parser():
    parser = argparse.ArgumentParser(prog="sgm-ext", description="Neuron-level "
                                     "detoxification of (multimodal) LLMs: profile, inspect, "
                                     "calibrate, sites, sample, eval, export, demo, build, "
                                     "serve.")
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
    args.run_command = main  # the demo runs its steps as `sgm-ext` commands, through here
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
        except KeyboardInterrupt as e:  # its message (profile's: where it stopped) or none
            print(f"{prog}: error: {str(e) or 'interrupted (Ctrl-C)'}", file=sys.stderr)
            return 130


def _closed_pipe():
    # the reader went away: nothing more to say, and Python must not complain at exit when
    # it flushes stdout into the closed pipe
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141
