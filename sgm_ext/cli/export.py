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
    source.add_argument("--gguf", help="GGUF file (llama, mistral, qwen2, qwen3, gemma2, "
                        "gemma3)")
    p.add_argument("--scales", required=True, help="scale file (.safetensors)")
    p.add_argument("--out", required=True, help="the directory (--model) or GGUF file (--gguf) "
                   "to write; an existing one only if sgm-ext export wrote it")
    p.add_argument("--strength", type=fraction, default=1.0,
                   help="the strength folded in, in [0, 1] (default 1)")
    p.add_argument("--allow-amplify", action="store_true",
                   help="accept scales above 1 (amplification)")
    p.add_argument("--gguf-type", choices=TYPES, default="same",
                   help="--gguf: the type of the rewritten tensors: same (default: the input's "
                   "where the gguf package can quantize it, else F16), f16, f32")
    p.set_defaults(func=run_export)


def run_export(args):
    # the scale file and its values checked here, in the command's words (--allow-amplify),
    # before either export loads anything
    checked_scales(args.scales, args.allow_amplify, "export")
    if args.gguf is not None:
        rec = export_gguf(args.gguf, args.scales, args.out, args.strength, args.allow_amplify,
                          args.gguf_type)
        print(f"wrote {args.out}: {args.gguf} with {args.scales} folded in at strength "
              f"{args.strength:g}; {len(rec['tensors'])} tensors rewritten:")
        for line in rec["tensors"]:
            print(f"  {line}")
        return 0
    if args.gguf_type != "same":
        raise ValueError("--gguf-type applies to --gguf only")
    rec = export_model(args.model, args.scales, args.out, args.strength, args.allow_amplify)
    print(f"wrote {args.out}: {args.model} with {args.scales} folded in at strength "
          f"{args.strength:g}; {len(rec['sites'])} sites, {len(rec['tensors'])} tensors in "
          f"{len(rec['weight_files_rewritten'])} weight files rewritten"
          + (f", {len(rec['added_biases'])} biases added (mlp_bias)" if rec["added_biases"]
             else "") + "; every other file copied")
    return 0
