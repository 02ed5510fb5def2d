"""vLLM offline throughput with sgm-ext scales, variants side by side in one run.

    .venv-vllm/bin/python bench/bench_vllm.py [--model tiny|100m] [--prompts N] [--tokens N]
                                              [--rounds N] [--write]

Variants, each an LLM alive for the whole run, called round-robin (bench/timing.py) with the
same N greedy requests of N new tokens (ignore_eos):
  unpatched            vLLM as it comes (torch.compile on)
  sgm                  the plugin, one strength for all (compile on)
  sgm per-request      the plugin with per_request; the requests mix strengths 1 / 0.5 / 0 / unset
  unpatched eager      enforce_eager: the baseline of the hook
  hook eager           what a user writes by hand: a forward hook on each MLP's act_fn that
                       multiplies by s_eff; hooks need enforce_eager (under compile vLLM's
                       graph ignores them)
Ratios are tokens/s of a variant over its baseline (unpatched, or unpatched eager for the
hook), from the median round. --write puts the table into bench/RESULTS.md between this
script's markers, with the machine, versions, load average and date.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model (the hook)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
# vLLM's workers unpickle add_hooks by module name: let them import this file as bench_vllm
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))

import torch  # noqa: E402
from timing import command_line, environment, interleaved, write_section  # noqa: E402

MODELS = {  # Llama configs; "100m": 97.5M parameters, the CPU decode benchmark's size
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, head_dim=32, vocab_size=512),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=8192),
}
DAMPED = 0.1  # fraction of each layer's mid neurons scaled to 0 (SGM-like sparsity)


def make_model(root, name):
    from transformers import LlamaConfig, LlamaForCausalLM

    from sgm_ext import ScaleSet
    from sgm_ext.app.synthetic import random_scales

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODELS[name], max_position_embeddings=512,
                                         tie_word_embeddings=False)).eval()
    model.save_pretrained(os.path.join(root, "model"))
    scales = random_scales(model, ("mid",), fraction=DAMPED, top=0.0)
    path = os.path.join(root, "scales.safetensors")
    ScaleSet(scales).save(path)
    return os.path.join(root, "model"), path, scales


def add_hooks(model, scales):
    """The by-hand intervention (runs in the worker): output of each act_fn times its scale."""
    hooked = 0
    for name, module in model.named_modules():
        site = name + ".mid"  # vLLM's Llama module paths are Hugging Face's
        if site in scales:
            s = scales[site].to(next(model.parameters()).device)
            module.act_fn.register_forward_hook(lambda m, a, out, s=s: out * s.to(out.dtype))
            hooked += 1
    return hooked


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=MODELS, default="tiny")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", action="store_true", help="update bench/RESULTS.md")
    args = p.parse_args(argv)

    from vllm import LLM, SamplingParams

    root = tempfile.mkdtemp(prefix="bench-vllm-")
    model_dir, scale_file, scales = make_model(root, args.model)
    vocab = MODELS[args.model]["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    prompts = [{"prompt_token_ids": torch.randint(3, vocab, (args.prompt_len,),
                                                  generator=gen).tolist()}
               for _ in range(args.prompts)]
    mixed = [None if i % 4 == 3 else {"sgm_strength": (1.0, 0.5, 0.0)[i % 4]}
             for i in range(args.prompts)]

    def params(extra=None):
        return SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True,
                              extra_args=extra)

    base = dict(model=model_dir, dtype="float32", max_model_len=512, seed=0,
                skip_tokenizer_init=True, max_num_seqs=args.prompts)
    variants = {
        "unpatched": (dict(base), [params()] * args.prompts),
        "sgm": (dict(base, additional_config={"sgm_ext": {"scales": scale_file}}),
                [params()] * args.prompts),
        "sgm per-request": (dict(base, additional_config={"sgm_ext": {
            "scales": scale_file, "per_request": True}}), [params(e) for e in mixed]),
        "unpatched eager": (dict(base, enforce_eager=True), [params()] * args.prompts),
        "hook eager": (dict(base, enforce_eager=True), [params()] * args.prompts),
    }
    llms = {}
    started = time.perf_counter()
    for name, (options, _) in variants.items():
        llms[name] = LLM(**options)
    import functools

    import bench_vllm  # this file under its module name, so that pickle can name add_hooks

    hooked = llms["hook eager"].apply_model(functools.partial(bench_vllm.add_hooks,
                                                              scales=scales))
    assert hooked == [len(scales)], hooked
    print(f"{len(llms)} engines up in {time.perf_counter() - started:.0f} s", file=sys.stderr)

    def generate(name):
        return lambda: llms[name].generate(prompts, variants[name][1], use_tqdm=False)

    samples = interleaved({name: generate(name) for name in variants}, rounds=args.rounds,
                          warmup=1)
    tokens = args.prompts * args.tokens
    rate = {name: tokens / statistics.median(s) for name, s in samples.items()}
    baseline = {"unpatched": "unpatched", "sgm": "unpatched", "sgm per-request": "unpatched",
                "unpatched eager": "unpatched eager", "hook eager": "unpatched eager"}
    spread = {name: (tokens / max(s), tokens / min(s)) for name, s in samples.items()}
    lines = [f"| variant | tokens/s (median of {args.rounds}) | range | ratio to |",
             "|---|---|---|---|"]
    for name in variants:
        ratio = rate[name] / rate[baseline[name]]
        lines.append(f"| {name} | {rate[name]:.0f} | {spread[name][0]:.0f}-"
                     f"{spread[name][1]:.0f} | {ratio:.3f} x {baseline[name]} |")
    table = "\n".join(lines)
    command = command_line("bench_vllm.py", argv if argv is not None else sys.argv[1:])
    header = (f"`{command}` ({args.model} Llama, {args.prompts} prompts x {args.tokens} new "
              f"tokens, prompt {args.prompt_len} tokens, float32); {environment()}")
    print(header)
    print(table)
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()
    if args.write:
        write_section(f"bench_vllm.py {args.model}", header + "\n\n" + table)


if __name__ == "__main__":
    main()
