"""`sgm-ext sample`: profiling rows from the model's own behaviour. Its arguments and their
checks, the prompts (a file, or the bundled seeded openers), the provenance record, and the
summary; the library's own_data.own_rows does the work."""
import os
import sys
import warnings

from ..app.loading import check_model_dir, load_model, load_processor
from ..core.files import check_output_file, file_sha256
from ..core.fingerprints import config_fingerprint, weights_fingerprint
from ..evaluation.efficacy_data import build_prompts, write_rows
from ..evaluation.options import Sampling
from ..evaluation.own_data import (
    class_warning,
    is_provenance_file,
    is_rows_file,
    own_rows,
    prompt_records,
    row_summary,
)
from ..evaluation.prompts import load_prompts
from ..profile.data import PROVENANCE_SUFFIX
from ..profile.inputs import resolve_format
from ..version import __version__
from .options import (
    add_device_options,
    add_format_option,
    add_judge_options,
    add_sampling_options,
    check_judge_args,
    check_sampling_args,
    input_format_line,
    judge_from_args,
    positive,
)

BUILTIN = ("sgm-ext's seeded templated sentence openers (efficacy_data.build_prompts: "
           "provoking and benign, written for sgm-ext)")


def add_sample(sub):
    p = sub.add_parser("sample", help="labelled profiling rows from the model's own sampled "
                       "continuations", description="Sample K continuations of every prompt "
                       "from the model, score each with a judge, and write one row per "
                       "continuation (text = the prompt, response = the continuation, label = "
                       "score >= --threshold) for `sgm-ext profile --modality response`, with "
                       "a provenance file beside it (<out>.provenance.json).")
    p.add_argument("--model", required=True, help="model directory (Hugging Face format)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help=".jsonl / .csv prompts as eval reads them (text or prompt; a label or "
                   "category goes into the rows' kind)")
    p.add_argument("--builtin", type=int, default=None, metavar="N",
                   help="instead of --prompts: " + BUILTIN + ", N per template, seeded by "
                   "--seed")
    p.add_argument("--out", required=True, help="rows to write (.jsonl)")
    p.add_argument("--samples", type=int, default=3, metavar="K",
                   help="continuations sampled per prompt (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=16,
                   help="tokens per continuation at most (default 16)")
    add_sampling_options(p)
    p.add_argument("--seed", type=int, default=0,
                   help="torch's seed before each batch (with the batch's index), and the "
                   "built-in prompts' (default 0)")
    add_judge_options(p, what="a continuation is toxic (label 1)")
    add_format_option(p, default="raw")
    p.add_argument("--batch-size", type=int, default=16,
                   help="prompts sampled together (K rows each; the draws depend on it; "
                   "default 16)")
    add_device_options(p)
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing --out that sgm-ext did not write")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_sample)


def check_sample_args(args):
    """Every option checked before the prompts are read or the model loaded."""
    if (args.prompts is None) == (args.builtin is None):
        raise ValueError("give the prompts as --prompts FILE or --builtin N (one of the two)")
    positive(args.builtin, "--builtin")
    positive(args.samples, "--samples")
    positive(args.max_new_tokens, "--max-new-tokens")
    positive(args.batch_size, "--batch-size")
    check_sampling_args(args)
    check_judge_args(args)
    check_output_file(args.out, "--out", ours=is_rows_file, force=args.force)
    check_output_file(args.out + PROVENANCE_SUFFIX, "--out's provenance file",
                      ours=is_provenance_file, force=args.force)
    check_model_dir(args.model)
    if args.input_format == "chat":  # a model without a chat template, refused before it loads
        resolve_format(load_processor(args.model), "chat")


def read_prompts(args):
    """(prompt dicts, what the provenance says of them)."""
    if args.builtin is not None:
        return build_prompts(args.seed, args.builtin), {
            "builtin": {"per_template": args.builtin, "seed": args.seed},
            "prompts_written_for": "sgm-ext (sgm_ext/efficacy_data.py templates)"}
    prompts = prompt_records(load_prompts(args.prompts))
    return prompts, {"prompt_file": os.path.abspath(args.prompts),
                     "prompt_file_sha256": file_sha256(args.prompts)}


def run_sample(args):
    check_sample_args(args)  # all before a long load
    judge = judge_from_args(args)
    prompts, source = read_prompts(args)
    model, processor = load_model(args.model, args.device, args.dtype)
    print(input_format_line(processor, args.input_format), file=sys.stderr)
    rows, settings = own_rows(
        model, processor, prompts, judge, k=args.samples, max_new_tokens=args.max_new_tokens,
        sampling=Sampling(args.temperature, args.top_p, args.top_k), seed=args.seed,
        threshold=args.threshold, fmt=args.input_format, batch_prompts=args.batch_size,
        progress=not args.quiet)
    counts = row_summary(rows, prompts, args.samples)
    provenance = {"command": "sgm-ext sample", "sgm_ext_version": __version__,
                  "model": os.path.abspath(args.model),
                  "config_fingerprint": config_fingerprint(model.config),
                  "weights_fingerprint": weights_fingerprint(model), **settings, **source,
                  "prompts_with_toxic": counts["prompts_with_toxic"]}
    write_rows(rows, args.out, provenance)
    empty = f" ({counts['empty']} empty continuations left out)" if counts["empty"] else ""
    print(f"wrote {args.out}: {counts['rows']} rows from {counts['prompts']} prompts x "
          f"{args.samples} samples{empty}: {counts['toxic']} toxic "
          f"({counts['toxic_share']:.1%}); {counts['prompts_with_toxic']} of "
          f"{counts['prompts']} prompts have >= 1 toxic continuation")
    print(f"wrote {args.out}{PROVENANCE_SUFFIX} (how the rows were made)")
    line = class_warning(counts)
    if line:
        warnings.warn(line, stacklevel=1)
    return 0
