"""Benchmarks of sgm_ext.patch: per MLP and end to end, every mode beside the unpatched model.

    pytest bench/bench_patch.py --benchmark-only          # pytest-benchmark groups
    python bench/bench_patch.py                           # interleaved end-to-end ratios and
                                                          # dispatched ops per MLP forward

Modes: "unpatched" (the HF module), "hook" (AurA-style forward hooks on gate, up and down),
"fold" (scales in the weights), "fused" (sgm_ext op in a swapped forward). The scale set puts
scales on the gate, up and down sites of every MLP (what the AurA hooks touch), 10% of the
neurons damped; `--sites input` puts them on the MLPs' inputs instead (AcT's layer-norm
outputs: the fused forward's one extra pass over x), and the ops table has that row too.
Per-MLP sizes are Llama-7B's (hidden 4096, intermediate 11008); the end-to-end model is a
~100M-parameter Llama decoding 64 tokens greedily.
"""
import argparse
import os
import sys

import pytest
import torch

# bench/ is on sys.path (script or pytest)
from timing import command_line, environment, medians, timed, write_section
from torch.utils._python_dispatch import TorchDispatchMode

import sgm_ext
from sgm_ext.patching.registry import find_mlps

MODES = ("unpatched", "hook", "fold", "fused")
SITES = ("gate", "up", "down")
H7B, I7B = 4096, 11008
E2E = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
           num_key_value_heads=12, vocab_size=8192, tie_word_embeddings=False)
PROMPT, NEW_TOKENS = 16, 64
# One thread by default: on a shared 2-core machine two OpenMP threads slow a GEMV tenfold
# whenever another process holds a core, which swamps every ratio.
THREADS = int(os.environ.get("SGM_BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def scales_for(model, seed=0, sites=SITES):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for info in find_mlps(model).values():
        for kind in sites:
            n = info.site_size(kind)
            s = torch.ones(n)
            damp = torch.rand(n, generator=g) < 0.1
            s[damp] = torch.rand(int(damp.sum()), generator=g)
            out[info.site(kind)] = s
    return out


def patch_mode(model, scales, mode):
    return None if mode == "unpatched" else sgm_ext.patch(model, scales, mode=mode)


def llama_mlp(dtype, hidden=H7B, inter=I7B):
    """A LlamaMLP inside a one-module wrapper, so that its site names are those of a model."""
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=hidden, intermediate_size=inter)
    torch.manual_seed(0)
    mlp = T.models.llama.modeling_llama.LlamaMLP(cfg).to(dtype).eval()
    return torch.nn.ModuleDict({"mlp": mlp})


def e2e_model(real=False):
    """(model, prompt ids [1, PROMPT]): the random ~100M Llama, or with `real` the pretrained
    SmolLM2-135M-Instruct (sgm_ext.realmodel) and a chat prompt."""
    import transformers as T

    if real:
        from sgm_ext.app import realmodel
        from sgm_ext.app.loading import load_model

        model, tok = load_model(realmodel.checkpoint(), "cpu", "float32")
        text = tok.apply_chat_template([{"role": "user", "content": "Tell me about the sea."}],
                                       tokenize=False, add_generation_prompt=True)
        return model, tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(**E2E)).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, E2E["vocab_size"], (1, PROMPT), generator=g)
    return model, prompt


def decode(model, prompt):
    with torch.inference_mode():
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)


# Ops that only make views or allocate: no kernel runs for them.
NO_KERNEL = {"view", "reshape", "_unsafe_view", "as_strided", "expand", "t", "transpose",
             "unsqueeze", "squeeze", "slice", "select", "split", "chunk", "alias", "detach",
             "empty", "empty_like", "empty_strided", "new_empty"}


class CountOps(TorchDispatchMode):
    """Counts the ops dispatched below autograd: on GPU each is (at least) one kernel launch;
    a custom op (sgm_ext::*) counts once, as its fused kernel does."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket.__name__))
        return func(*args, **(kwargs or {}))


def ops_per_forward(mode, sites=SITES, hidden=256, inter=688, tokens=1):
    """(ops dispatched, Python function calls) of one MLP forward in `mode`."""
    root = llama_mlp(torch.float32, hidden, inter)
    scales = scales_for(root, sites=sites)
    handle = patch_mode(root, scales, mode)
    x = torch.randn(1, tokens, hidden)
    calls = []
    with torch.inference_mode():
        root["mlp"](x)  # warm the scale caches
        with CountOps() as c:
            root["mlp"](x)
        sys.setprofile(lambda frame, event, arg: calls.append(1) if event == "call" else None)
        try:
            root["mlp"](x)
        finally:
            sys.setprofile(None)
    if handle:
        handle.remove()
    return c.ops, len(calls)


# ---------------------------------------------------------------- pytest-benchmark

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tokens", [1, 512], ids=["decode", "prefill512"])
@pytest.mark.parametrize("mode", MODES)
def test_mlp(benchmark, mode, tokens, dtype):
    benchmark.group = f"LlamaMLP 4096x11008 {tokens} tok {str(dtype)[6:]}"
    root = llama_mlp(dtype)
    handle = patch_mode(root, scales_for(root), mode)
    x = torch.randn(1, tokens, H7B, dtype=dtype)
    mlp = root["mlp"]
    with torch.inference_mode():
        rounds = 20 if tokens == 1 else 3
        benchmark.pedantic(mlp, args=(x,), rounds=rounds, iterations=1, warmup_rounds=1)
    if handle:
        handle.remove()


@pytest.mark.parametrize("mode", MODES)
def test_e2e_decode(benchmark, mode):
    benchmark.group = f"Llama ~100M greedy decode {NEW_TOKENS} tokens"
    model, prompt = e2e_model()
    handle = patch_mode(model, scales_for(model), mode)
    benchmark.pedantic(decode, args=(model, prompt), rounds=3, iterations=1, warmup_rounds=1)
    if handle:
        handle.remove()


# ---------------------------------------------------------------- interleaved script

def decode_round(models, prompt, names=MODES):
    """Greedy decode of NEW_TOKENS by every model named (one per mode or variant), interleaved
    step by step with the order rotating each step, so a slow second of the shared machine
    hits every one alike: ({name: summed wall s}, {name: summed CPU s}, {name: tokens})."""
    from transformers import DynamicCache

    ids = dict.fromkeys(names, prompt)
    caches = {m: DynamicCache(config=models[m].config) for m in names}
    tokens = {m: [] for m in names}
    wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for step in range(NEW_TOKENS):
        for m in names[step % len(names):] + names[:step % len(names)]:
            w, c, out = timed(lambda m=m: models[m](input_ids=ids[m], past_key_values=caches[m],
                                                    use_cache=True).logits[:, -1])
            ids[m] = out.argmax(-1, keepdim=True)
            tokens[m].append(int(ids[m]))
            wall[m] += w
            cpu[m] += c
    return wall, cpu, tokens


def mlp_call_times(models, prompt):
    """Per-call profile inside the decode loop: one more round with a clock around every MLP
    forward (the same pre- and post-hook on the MLP module in every mode, so their cost is
    alike): {mode: [microseconds per MLP call]}. Between two calls of one MLP the step streams
    the other layers' weights, so these are the cold-cache costs a decode step pays."""
    import time

    times = {m: [] for m in MODES}
    handles = []
    for m in MODES:
        for info in find_mlps(models[m]).values():
            module = models[m].get_submodule(info.path)
            started = {}
            handles.append(module.register_forward_pre_hook(
                lambda mod, args, started=started: started.__setitem__(0, time.perf_counter())))
            handles.append(module.register_forward_hook(
                lambda mod, args, out, started=started, log=times[m]:
                log.append((time.perf_counter() - started[0]) * 1e6)))
    try:
        decode_round(models, prompt)
    finally:
        for h in handles:
            h.remove()
    return times


def interleaved_e2e(rounds, sites=SITES, real=False):
    """The end-to-end table: four copies of one model, one per mode, each patched once and
    warmed up by round 0; tokens/s from the summed step times, median over rounds; then the
    per-call profile of the MLP forwards. Returns the table's text."""
    import copy
    import statistics

    base, prompt = e2e_model(real)
    scales = scales_for(base, sites=sites)
    models = {m: copy.deepcopy(base) for m in MODES}
    handles = [patch_mode(models[m], scales, m) for m in MODES]
    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    with torch.inference_mode():
        for r in range(rounds + 1):
            w_sum, c_sum, tokens = decode_round(models, prompt)
            for m in ("fold", "fused"):
                assert tokens[m] == tokens["hook"], f"{m} decoded other tokens than hook"
            if r:  # round 0 warms up
                for m in MODES:
                    wall[m].append(w_sum[m])
                    cpu[m].append(c_sum[m])
        calls = mlp_call_times(models, prompt)
    for h in handles:
        if h:
            h.remove()
    params = sum(p.numel() for p in base.parameters())
    med_w, med_c = medians(wall), medians(cpu)
    med_call = {m: statistics.median(t) for m, t in calls.items()}
    name = "SmolLM2-135M-Instruct (pretrained)" if real else "Llama (random weights)"
    lines = [f"{name}, {params / 1e6:.1f}M params, greedy decode {NEW_TOKENS} tokens after a "
             f"{prompt.shape[1]}-token prompt, batch 1, modes interleaved per step, median of "
             f"{rounds} rounds (range of the wall ratio over the rounds), scales on "
             f"{', '.join(sites)}; MLP call: median time of one MLP forward inside the decode "
             f"loop ({len(calls['unpatched'])} calls, one more round with a clock on every MLP)",
             "",
             "| mode | tokens/s (wall) | ratio to unpatched | range | tokens/s (CPU time) | ratio "
             "| MLP call us | minus unpatched us |",
             "|---|---|---|---|---|---|---|---|"]
    for m in MODES:
        per_round = [u / t for u, t in zip(wall["unpatched"], wall[m])]
        lines.append(f"| {m} | {NEW_TOKENS / med_w[m]:.1f} | {med_w['unpatched'] / med_w[m]:.3f} "
                     f"| {min(per_round):.3f}-{max(per_round):.3f} | {NEW_TOKENS / med_c[m]:.1f} "
                     f"| {med_c['unpatched'] / med_c[m]:.3f} | {med_call[m]:.1f} | "
                     f"{med_call[m] - med_call['unpatched']:+.1f} |")
    return "\n".join(lines)


def interleaved_mlp(rounds, tokens, dtype):
    """One row of the per-MLP table: a copy of the MLP per mode, each patched once and called
    once before timing (the scale caches fill on the first call), then the modes in turn."""
    import copy

    root = llama_mlp(dtype)
    scales = scales_for(root)
    x = torch.randn(1, tokens, H7B, dtype=dtype)
    roots = {m: copy.deepcopy(root) for m in MODES}
    del root
    handles = [patch_mode(roots[m], scales, m) for m in MODES]
    cpu = {m: [] for m in MODES}
    with torch.inference_mode():
        for m in MODES:
            roots[m]["mlp"](x)
        for r in range(rounds):  # the order rotates each round, as in decode_round
            for m in MODES[r % len(MODES):] + MODES[:r % len(MODES)]:
                cpu[m].append(timed(roots[m]["mlp"], x)[1])
    for h in handles:
        if h:
            h.remove()
    med = medians(cpu)
    cells = " | ".join(f"{med[m] * 1e3:.2f} ms ({med['unpatched'] / med[m]:.3f})" for m in MODES)
    return f"| {tokens} | {str(dtype)[6:]} | {cells} |"


def ops_table():
    lines = ["| sites | mode | Python calls | dispatched | kernels | which |",
             "|---|---|---|---|---|---|"]
    for sites in (SITES, ("mid",), ("input",)):
        for mode in MODES:
            ops, calls = ops_per_forward(mode, sites)
            kernels = [op for op in ops if op not in NO_KERNEL]
            lines.append(f"| {', '.join(sites)} | {mode} | {calls} | {len(ops)} | "
                         f"{len(kernels)} | {' '.join(kernels)} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--real", action="store_true",
                   help="end to end on the pretrained SmolLM2-135M-Instruct (sgm_ext.realmodel) "
                   "instead of the random ~100M Llama")
    p.add_argument("--sites", default=",".join(SITES),
                   help="site kinds that get scales in the end-to-end run (default gate,up,down)")
    p.add_argument("--write", action="store_true",
                   help="put each table into its section of bench/RESULTS.md")
    args = p.parse_args(argv)
    sections = {}

    def section(name, body):
        text = f"`{command_line('bench_patch.py', argv)}`; {environment()}\n\n{body}"
        print(f"\n{text}")
        sections[f"bench_patch.py {name}"] = text

    section("ops", "Per LlamaMLP forward at T = 1, after a first call: the Python functions it "
            "calls (sys.setprofile), the ops it dispatches (an sgm_ext op counts once) and of "
            "them the ones that run a kernel (views and allocations excluded):\n\n"
            + ops_table())
    if not args.skip_mlp:
        rows = [interleaved_mlp(rounds, tokens, dtype)
                for tokens, rounds in ((1, 20 * args.rounds), (512, args.rounds))
                for dtype in (torch.float32, torch.bfloat16)]
        section("mlp", "Per MLP, Llama-7B sizes (4096 x 11008), batch 1: median CPU time "
                "(ratio to unpatched)\n\n| tokens | dtype | " + " | ".join(MODES)
                + " |\n|---|---|" + "---|" * len(MODES) + "\n" + "\n".join(rows))
    if not args.skip_e2e:
        section(("real " if args.real else "e2e ") + args.sites,
                interleaved_e2e(args.rounds, tuple(args.sites.split(",")), real=args.real))
    if args.write:
        for name, text in sections.items():
            write_section(name, text)


if __name__ == "__main__":
    sys.exit(main())
