"""Benchmarks of sgm_ext.patch: per MLP and end to end, every mode beside the unpatched model.

    pytest bench/bench_patch.py --benchmark-only          # pytest-benchmark groups
    python bench/bench_patch.py                           # interleaved end-to-end ratios and
                                                          # dispatched ops per MLP forward

Modes: "unpatched" (the HF module), "hook" (AurA-style forward hooks on gate, up and down),
"fold" (scales in the weights), "fused" (sgm_ext op in a swapped forward). The scale set puts
scales on the gate, up and down sites of every MLP (what the AurA hooks touch), 10% of the
neurons damped. Per-MLP sizes are Llama-7B's (hidden 4096, intermediate 11008); the end-to-end
model is a ~100M-parameter Llama decoding 64 tokens greedily.
"""
import argparse
import os
import sys

import pytest
import torch
from timing import medians, timed  # bench/ is on sys.path (script or pytest)
from torch.utils._python_dispatch import TorchDispatchMode

import sgm_ext
from sgm_ext.registry import find_mlps

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
        from sgm_ext import realmodel
        from sgm_ext.loading import load_model

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
    root = llama_mlp(torch.float32, hidden, inter)
    scales = scales_for(root, sites=sites)
    handle = patch_mode(root, scales, mode)
    x = torch.randn(1, tokens, hidden)
    with torch.inference_mode():
        root["mlp"](x)  # warm the scale caches
        with CountOps() as c:
            root["mlp"](x)
    if handle:
        handle.remove()
    return c.ops


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

def interleaved_e2e(rounds, sites=SITES, real=False):
    """Greedy decode of 64 tokens by four copies of one model, one per mode, interleaved
    step by step (the order rotating each step): a slow second on the shared machine then
    hits every mode alike. Tokens/s from the summed step times, median over rounds; the
    decoded tokens of fold and fused must equal those of the hook reference."""
    import copy

    from transformers import DynamicCache

    base, prompt = e2e_model(real)
    scales = scales_for(base, sites=sites)
    models = {m: copy.deepcopy(base) for m in MODES}
    handles = [patch_mode(models[m], scales, m) for m in MODES]

    def step_logits(model, ids, cache):
        return model(input_ids=ids, past_key_values=cache, use_cache=True).logits[:, -1]

    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    with torch.inference_mode():
        for r in range(rounds + 1):
            ids = {m: prompt for m in MODES}
            caches = {m: DynamicCache(config=models[m].config) for m in MODES}
            tokens = {m: [] for m in MODES}
            w_sum, c_sum = dict.fromkeys(MODES, 0.0), dict.fromkeys(MODES, 0.0)
            for step in range(NEW_TOKENS):
                order = MODES[step % len(MODES):] + MODES[:step % len(MODES)]
                for m in order:
                    w, c, out = timed(step_logits, models[m], ids[m], caches[m])
                    nxt = out.argmax(-1, keepdim=True)
                    ids[m] = nxt
                    tokens[m].append(int(nxt))
                    w_sum[m] += w
                    c_sum[m] += c
            for m in ("fold", "fused"):
                assert tokens[m] == tokens["hook"], f"{m} decoded other tokens than hook"
            if r:  # round 0 warms up
                for m in MODES:
                    wall[m].append(w_sum[m])
                    cpu[m].append(c_sum[m])
    for h in handles:
        if h:
            h.remove()
    params = sum(p.numel() for p in base.parameters())
    med_w, med_c = medians(wall), medians(cpu)
    name = "SmolLM2-135M-Instruct (pretrained)" if real else "Llama (random weights)"
    print(f"\n{name}, {params / 1e6:.1f}M params, greedy decode {NEW_TOKENS} tokens after a "
          f"{prompt.shape[1]}-token prompt, batch 1, {torch.get_num_threads()} thread(s), modes "
          f"interleaved per step, median of {rounds} rounds, scales on {', '.join(sites)}")
    print("| mode | tokens/s (wall) | ratio to unpatched | tokens/s (CPU time) | ratio |")
    print("|---|---|---|---|---|")
    for m in MODES:
        print(f"| {m} | {NEW_TOKENS / med_w[m]:.1f} | {med_w['unpatched'] / med_w[m]:.3f} | "
              f"{NEW_TOKENS / med_c[m]:.1f} | {med_c['unpatched'] / med_c[m]:.3f} |")


def interleaved_mlp(rounds, tokens, dtype):
    root = llama_mlp(dtype)
    scales = scales_for(root)
    x = torch.randn(1, tokens, H7B, dtype=dtype)
    cpu = {m: [] for m in MODES}
    with torch.inference_mode():
        for r in range(rounds + 1):
            for mode in MODES:
                handle = patch_mode(root, scales, mode)
                _, c, _ = timed(root["mlp"], x)
                if handle:
                    handle.remove()
                if r:
                    cpu[mode].append(c)
    med = medians(cpu)
    cells = " | ".join(f"{med[m] * 1e3:.2f} ms ({med['unpatched'] / med[m]:.3f})" for m in MODES)
    print(f"| {tokens} | {str(dtype)[6:]} | {cells} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--real", action="store_true",
                   help="end to end on the pretrained SmolLM2-135M-Instruct (sgm_ext.realmodel) "
                   "instead of the random ~100M Llama")
    p.add_argument("--sites", default=",".join(SITES),
                   help="site kinds that get scales in the end-to-end run (default gate,up,down)")
    args = p.parse_args(argv)
    print("Ops dispatched per LlamaMLP forward (T = 1; an sgm_ext op counts once), and of them "
          "the ones that run a kernel (views and allocations excluded):")
    print("| sites | mode | dispatched | kernels | which |\n|---|---|---|---|---|")
    for sites in (SITES, ("mid",)):
        for mode in MODES:
            ops = ops_per_forward(mode, sites)
            kernels = [op for op in ops if op not in NO_KERNEL]
            print(f"| {', '.join(sites)} | {mode} | {len(ops)} | {len(kernels)} | "
                  f"{' '.join(kernels)} |")
    if not args.skip_mlp:
        print("\nPer MLP, Llama-7B sizes (4096 x 11008), batch 1: median CPU time "
              "(ratio to unpatched)")
        print("| tokens | dtype | " + " | ".join(MODES) + " |\n|---|---|" + "---|" * len(MODES))
        for tokens, rounds in ((1, 20 * args.rounds), (512, args.rounds)):
            for dtype in (torch.float32, torch.bfloat16):
                interleaved_mlp(rounds, tokens, dtype)
    if not args.skip_e2e:
        interleaved_e2e(args.rounds, tuple(args.sites.split(",")), real=args.real)


if __name__ == "__main__":
    sys.exit(main())
