"""`sgm-ext calibrate`: its arguments and their checks (all before the model loads: the scale
file is checked against the model's config on a weightless skeleton), the curve printed as it
is measured, and the calibrated scale file written; evaluation/calibrate.py does the work."""
import os
import sys

from ..app.loading import check_device, check_max_length, check_model_dir, load_model
from ..core.files import check_output_file
from ..evaluation.calibrate import (
    DEFAULT_BUDGET,
    DEFAULT_MAX_LENGTH,
    DEFAULT_MODE,
    DEFAULT_TEXTS,
    DEFAULT_TOLERANCE,
    calibrate,
    check_budget,
    check_tolerance,
    load_texts,
)
from ..patching.patcher import MODES, check_scales
from ..patching.scales import is_scale_file
from ..serving.settings import skeleton
from .eval import checked_scales
from .options import add_device_options, positive


def add_calibrate(sub):
    p = sub.add_parser("calibrate", help="the largest strength of a scale file within a "
                       "perplexity budget on benign text, written as a new scale file",
                       description="Measure the model's perplexity on benign passages "
                       "unpatched, then with the scale file at strength 1 and, when that is "
                       "over the budget, at the strengths a bisection picks; write the scale "
                       "file at the largest strength within the budget (patched at strength 1 "
                       "it computes what the input does at that strength). Toxicity is never "
                       "looked at. Nothing is written on any error or Ctrl-C.")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.add_argument("--scales", required=True, help="scale file to calibrate (.safetensors)")
    p.add_argument("--out", required=True, help="the calibrated scale file to write; an "
                   "existing one only if sgm-ext wrote it (or --force), never --scales itself")
    p.add_argument("--max-ppl-ratio", type=float, default=DEFAULT_BUDGET, metavar="R",
                   help="the fluency budget: perplexity on the passages at most R times the "
                   f"unpatched model's (default {DEFAULT_BUDGET}: +10%%)")
    p.add_argument("--texts", default=None, metavar="FILE",
                   help="benign passages: a text file (one passage per non-empty line) or "
                   ".jsonl with `text` (by extension); default: sgm-ext's bundled calibration "
                   f"passages ({os.path.basename(DEFAULT_TEXTS)}, not the text eval and the "
                   "efficacy benchmark report perplexity on)")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE, metavar="T",
                   help="the bisection stops when the strengths within and over the budget are "
                   f"at most T apart, in (0, 0.5] (default 1/64 = {DEFAULT_TOLERANCE})")
    p.add_argument("--allow-amplify", action="store_true",
                   help="accept scales above 1 (AcT's transport maps, ml-aura-vl's rule)")
    p.add_argument("--max-length", type=int, default=DEFAULT_MAX_LENGTH,
                   help=f"tokens per passage at most (default {DEFAULT_MAX_LENGTH}); longer "
                   "ones are cut")
    p.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help=f"the patch mode measured in (default {DEFAULT_MODE}, as eval's; fold "
                   "folds the scales into the weights again for each strength)")
    add_device_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out that sgm-ext did not write")
    p.set_defaults(func=run_calibrate)


def check_calibrate_args(args):
    """The options, the output path, the scale file (values and against the model's config)
    and the texts, all before the model's weights load; returns the texts."""
    check_budget(args.max_ppl_ratio, "--max-ppl-ratio")
    check_tolerance(args.tolerance, "--tolerance")
    positive(args.max_length, "--max-length")
    if os.path.exists(args.out) and os.path.exists(args.scales) \
            and os.path.samefile(args.out, args.scales):
        raise ValueError(f"--out {args.out} is the input scale file (--scales); write the "
                         "calibrated file beside it")
    check_output_file(args.out, "--out", ours=is_scale_file, force=args.force)
    check_model_dir(args.model)
    check_max_length(args.model, args.max_length)
    check_device(args.device)
    scales = checked_scales(args.scales, args.allow_amplify)
    texts = load_texts(args.texts)
    check_for_model(args.model, args.scales, scales, args.allow_amplify)
    return texts


def check_for_model(model_dir, path, scales, allow_amplify):
    """The scale file against the model's config (fingerprint, sites, sizes), on a skeleton of
    the model without weights: a file made for another model is refused before a load."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    try:
        check_scales(skeleton(config), scales, allow_amplify=allow_amplify)
    except ValueError as e:
        raise ValueError(f"{path} does not fit the model: {e}") from None


def run_calibrate(args):
    texts = check_calibrate_args(args)
    model, processor = load_model(args.model, args.device, args.dtype)
    where = args.texts or f"the bundled {os.path.basename(DEFAULT_TEXTS)}"
    print(f"calibrating {args.scales} on {len(texts)} passages of {where}: the largest "
          f"strength with perplexity ratio <= {args.max_ppl_ratio:g}, to {args.tolerance:g} "
          f"(mode {args.mode}); strength 0 is the unpatched model", file=sys.stderr)
    try:
        found = calibrate(model, processor, args.scales, texts,
                          max_ppl_ratio=args.max_ppl_ratio, tolerance=args.tolerance,
                          allow_amplify=args.allow_amplify, max_length=args.max_length,
                          mode=args.mode, progress=lambda point: print(point, flush=True))
    except KeyboardInterrupt:
        raise KeyboardInterrupt("interrupted (Ctrl-C) while calibrating; nothing was "
                                "written") from None
    found.scales.save(args.out)
    print(f"chosen strength {found.strength:g}: perplexity ratio {found.ratio:.4f} <= "
          f"{found.budget:g} ({found.unpatched_ppl:.4f} -> {found.ppl:.4f}), "
          f"{len(found.curve)} points measured")
    print(f"wrote {args.out}: {found.scales!r}, {args.scales} at strength {found.strength:g} "
          "(patch it at strength 1)")
    return 0
