"""`sgm-ext export`: a detoxed checkpoint for any engine: a Hugging Face model directory
(app/export.py) or a GGUF file for llama.cpp / Ollama / LM Studio (app/export_gguf.py), with a
scale file folded into the weights at one strength."""
from ..app.export import export_model
from ..app.export_gguf import TYPES, export_gguf
from .options import checked_scales, fraction


def add_export(sub):
    p = sub.add_parser("export", help="write a model with the scales folded into its weights "
                       "(a Hugging Face directory, or a GGUF file)",
                       description="Fold a scale file into a model's weights at one strength "
                       "and write the result as a new model that runs in any engine without "
                       "sgm-ext: --model DIR writes a Hugging Face directory, --gguf FILE a GGUF "
                       "file. Nothing is written on any error.")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model directory (Hugging Face format, safetensors)")
    source.add_argument("--gguf", help="GGUF file (architecture llama (Mistral's files too), "
                        "qwen2, qwen3, gemma2, gemma3)")
    p.add_argument("--scales", required=True, help="scale file (.safetensors)")
    p.add_argument("--out", required=True, help="the directory (--model) or GGUF file (--gguf) "
                   "to write; an existing one only if sgm-ext export wrote it")
    p.add_argument("--strength", type=fraction, default=1.0,
                   help="the strength folded in, in [0, 1] (default 1)")
    p.add_argument("--allow-amplify", action="store_true",
                   help="accept scales above 1 (amplification)")
    p.add_argument("--gguf-type", choices=TYPES, default="same",
                   help="--gguf: the type of the rewritten tensors: same (default: each keeps "
                   "its type and size, its rows' block scales multiplied), f16, f32")
    p.add_argument("--control-vector", metavar="OUT.gguf",
                   help="--gguf: write the mid / down shifts as this llama.cpp control-vector "
                   "file (run with --control-vector OUT.gguf; llama, qwen2, qwen3) instead of "
                   "as bias tensors in the model file")
    p.set_defaults(func=run_export)


def run_export(args):
    checked_scales(args.scales, args.allow_amplify, "export them")  # before any model loads
    if args.gguf is not None:
        rec = export_gguf(args.gguf, args.scales, args.out, args.strength, args.allow_amplify,
                          args.gguf_type, args.control_vector)
        print(f"wrote {args.out}: {args.gguf} with {args.scales} folded in at strength "
              f"{args.strength:g}; {len(rec['tensors'])} tensors rewritten:")
        for line in rec["tensors"]:
            print(f"  {line}")
        if args.control_vector is not None:
            print(f"wrote {args.control_vector}: the mid / down shifts as a llama.cpp control "
                  f"vector ({', '.join(rec['control_vector'])}); run the model with "
                  f"--control-vector {args.control_vector}")
        return 0
    if args.gguf_type != "same" or args.control_vector is not None:
        raise ValueError("--gguf-type and --control-vector apply to --gguf only")
    rec = export_model(args.model, args.scales, args.out, args.strength, args.allow_amplify)
    print(f"wrote {args.out}: {args.model} with {args.scales} folded in at strength "
          f"{args.strength:g}; {len(rec['sites'])} sites, {len(rec['tensors'])} tensors in "
          f"{len(rec['weight_files_rewritten'])} weight files rewritten"
          + (f", {len(rec['added_biases'])} biases added (mlp_bias)" if rec["added_biases"]
             else "") + "; every other file copied")
    return 0
