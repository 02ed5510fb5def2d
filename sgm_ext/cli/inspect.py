"""`sgm-ext inspect`: check a scale file and print its summary (exit status 1 when a value is
illegal); given a model directory or GGUF file that `sgm-ext export` wrote, say what was folded
into it."""
import os

from ..app.export import read_record
from ..app.export_gguf import read_gguf, record
from ..evaluation.calibrate import calibration_summary
from ..evaluation.report import scale_problems, scale_report
from ..patching.scales import load_scales


def add_inspect(sub):
    p = sub.add_parser("inspect", help="check a scale file and print its summary; or say what "
                       "an exported model has folded in",
                       description="Print a scale file's metadata, per site the damped neurons "
                       "and the scales' range, a histogram of the scales and the damped neurons "
                       "per layer, what `sgm-ext calibrate` measured (for a file it wrote); "
                       "flag illegal values (exit status 1). Given a directory or "
                       "GGUF file written by `sgm-ext export`: the scale file folded into it, "
                       "its hash, the strength and what was rewritten.")
    p.add_argument("path", help="scale file (.safetensors), or an exported directory / .gguf")
    p.set_defaults(func=run_inspect)


def run_inspect(args):
    if os.path.isdir(args.path) or args.path.endswith(".gguf"):
        print(export_report(args.path))
        return 0
    scales = load_scales(args.path)
    if not scales.sites():
        raise ValueError(f"{args.path} holds no sites (an empty scale set)")
    print(scale_report(scales, args.path))
    calibrated = calibration_summary(scales)  # sgm-ext calibrate wrote it: what it measured
    if calibrated:
        print(calibrated)
    problems = scale_problems(scales)
    for line in problems:
        print(f"INVALID: {line}")
    return 1 if problems else 0


def export_report(path):
    """What `sgm-ext export` folded into the directory or GGUF file at `path`."""
    if os.path.isdir(path):
        rec = read_record(path)
        if rec is None:
            raise ValueError(f"{path} is a directory but not one sgm-ext export wrote (no "
                             "sgm_ext_export.json); inspect takes a scale file or an export")
        lines = [f"{path}: exported by sgm-ext {rec['sgm_ext_version']}",
                 f"scales folded in: {rec['scales_file']} (sha256 {rec['scales_sha256']})",
                 f"strength: {rec['strength']:g}",
                 f"sites: {len(rec['sites'])}, damped neurons: "
                 f"{sum(s['damped'] for s in rec['sites'].values())}, shifted sites: "
                 f"{sum(s['shifted'] for s in rec['sites'].values())}",
                 f"tensors rewritten: {len(rec['tensors'])} in "
                 f"{', '.join(rec['weight_files_rewritten'])}"]
        if rec["added_biases"]:
            lines.append(f"biases added (mlp_bias): {len(rec['added_biases'])}")
        lines += [f"  {site}: {s['kind']}, {s['damped']} damped"
                  + (", shifted" if s["shifted"] else "") for site, s in rec["sites"].items()]
        return "\n".join(lines)
    rec = record(read_gguf(path))
    if not rec:
        raise ValueError(f"{path} is a GGUF file sgm-ext export did not write (no "
                         "sgm_ext.export entries)")
    lines = [f"{path}: exported by sgm-ext {rec['sgm_ext_version']}",
             f"scales folded in: {rec['scales_file']} (sha256 {rec['scales_sha256']})",
             f"strength: {rec['strength']}",
             f"tensors rewritten: {len(rec['tensors'])}"]
    return "\n".join(lines + [f"  {line}" for line in rec["tensors"]])
