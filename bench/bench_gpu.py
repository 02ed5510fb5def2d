"""GPU benchmarks: the fused GEMM and patched MLPs / models on a CUDA device, every variant
interleaved call by call (so clock and thermal drift hit all alike), medians of GPU time.

    python bench/bench_gpu.py [--rounds N] [--quick]

--quick: 5 rounds instead of 20 (3 decodes per mode instead of 5), the same sections and sizes,
for scripts/gpu_check.sh (sized for about 2 minutes on an H100; not yet timed on one). Each
section prints the seconds it took.

1. gated_up_proj (Triton, one kernel) against what it replaces: two cuBLAS GEMMs and the
   elementwise op (cuda backend) or the eager chain, Llama-7B widths, bf16.
2. One LlamaMLP at Llama-7B widths in bf16: unpatched, hook (AurA-style), fold, fused (two
   cuBLAS GEMMs + act_mul_scale, the default), and fused through gated_up_proj
   (SGM_EXT_GATED_UP_PROJ=1).
3. Greedy decode of a Llama in bf16 with scales on every MLP's `mid` site, per mode.
"""
import argparse
import copy
import importlib
import sys
import time

import torch
import torch.nn.functional as F
from bench_patch import (  # bench/ is on sys.path as a script
    H7B,
    I7B,
    llama_mlp,
    scales_for,
)
from timing import interleaved, medians

import sgm_ext
from sgm_ext.patching import patch as patch_module

DEV = "cuda"


class with_gated_up_proj:
    """Fused mode through the one-kernel GEMM (SGM_EXT_GATED_UP_PROJ=1) while inside."""

    def __enter__(self):
        self.saved = patch_module.GATED_UP_PROJ
        patch_module.GATED_UP_PROJ = True

    def __exit__(self, *exc):
        patch_module.GATED_UP_PROJ = self.saved


def gemm_inputs():
    """(generator, w_gate, w_up, scale) at Llama-7B widths, bf16 weights, on the GPU."""
    g = torch.Generator().manual_seed(0)
    wg, wu = ((torch.randn(I7B, H7B, generator=g) / 64).to(DEV, torch.bfloat16) for _ in range(2))
    return g, wg, wu, torch.rand(I7B, generator=g).to(DEV)


def bench_gemm(rounds):
    print("\n## gated_up_proj vs two GEMMs + elementwise, bf16, H 4096, I 11008 (ms; ratio = "
          "two GEMMs + act_mul_scale over gated_up_proj)")
    print("| T | gated_up_proj | 2 GEMMs + act_mul_scale | 2 GEMMs + eager chain | "
          "2 GEMMs only | ratio |\n|---|---|---|---|---|---|")
    g, wg, wu, s = gemm_inputs()
    s_bf = s.to(torch.bfloat16)
    for t in (1, 16, 128, 512, 2048):
        x = torch.randn(t, H7B, generator=g).to(DEV, torch.bfloat16)
        fns = {
            "fused": lambda x=x: sgm_ext.gated_up_proj(x, wg, wu, s),
            "op": lambda x=x: sgm_ext.act_mul_scale(F.linear(x, wg), F.linear(x, wu), s),
            "eager": lambda x=x: F.silu(F.linear(x, wg)) * F.linear(x, wu) * s_bf,
            "gemms": lambda x=x: (F.linear(x, wg), F.linear(x, wu)),
        }
        with torch.inference_mode():
            ms = medians(interleaved(fns, rounds=rounds, warmup=3, clock="cuda"))
        print(f"| {t} | {ms['fused']:.4f} | {ms['op']:.4f} | {ms['eager']:.4f} | "
              f"{ms['gemms']:.4f} | {ms['op'] / ms['fused']:.2f} |", flush=True)


MLP_MODES = ("unpatched", "hook", "fold", "fused", "fused gated_up_proj")


def bench_mlp(rounds):
    print("\n## One LlamaMLP, 4096 x 11008, bf16, scales on `mid` (ms per forward; "
          "ratio = unpatched / mode; patch and unpatch outside the timing)")
    print("| T | " + " | ".join(MLP_MODES) + " |\n|---|" + "---|" * len(MLP_MODES))
    root = llama_mlp(torch.bfloat16).to(DEV)
    scales = scales_for(root, sites=("mid",))
    for t in (1, 16, 512, 2048):
        x = torch.randn(1, t, H7B, device=DEV, dtype=torch.bfloat16)
        times = {m: [] for m in MLP_MODES}
        with torch.inference_mode():
            for r in range(rounds + 1):
                for mode in MLP_MODES:
                    handle = (None if mode == "unpatched"
                              else sgm_ext.patch(root, scales, mode=mode.split()[0]))
                    ctx = with_gated_up_proj() if mode == "fused gated_up_proj" else None
                    if ctx:
                        ctx.__enter__()
                    ms = medians(interleaved({mode: lambda x=x: root["mlp"](x)},
                                             rounds=10 if r else 1, warmup=2, clock="cuda"))[mode]
                    if ctx:
                        ctx.__exit__()
                    if handle:
                        handle.remove()
                    if r:
                        times[mode].append(ms)
        med = medians(times)
        print(f"| {t} | " + " | ".join(f"{med[m]:.4f} ({med['unpatched'] / med[m]:.3f})"
                                       for m in MLP_MODES) + " |", flush=True)


def bench_decode(rounds, name, cfg, new_tokens=64):
    import transformers as T

    torch.manual_seed(0)
    with torch.device(DEV):  # initialised on the GPU: the CPU is slow at 1.88B parameters
        base = T.LlamaForCausalLM(T.LlamaConfig(**cfg))
    base = base.to(torch.bfloat16).eval()
    params = sum(p.numel() for p in base.parameters())
    scales = scales_for(base, sites=("mid",))
    prompt = torch.randint(3, cfg["vocab_size"], (1, 16),
                           generator=torch.Generator().manual_seed(1)).to(DEV)
    models = {m: copy.deepcopy(base) for m in MLP_MODES}
    handles = [None if m == "unpatched" else sgm_ext.patch(models[m], scales, mode=m.split()[0])
               for m in MLP_MODES]
    tokens = {}

    def decode(mode):
        def run():
            ctx = with_gated_up_proj() if mode == "fused gated_up_proj" else None
            if ctx:
                ctx.__enter__()
            out = models[mode].generate(prompt, attention_mask=torch.ones_like(prompt),
                                        do_sample=False, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, pad_token_id=0)
            if ctx:
                ctx.__exit__()
            tokens[mode] = out[0, prompt.shape[1]:].tolist()
        return run

    with torch.inference_mode():
        ms = medians(interleaved({m: decode(m) for m in MLP_MODES}, rounds=rounds, warmup=1,
                                 clock="cuda"))
    for h in handles:
        if h:
            h.remove()
    same = {m: tokens[m] == tokens["hook"] for m in ("fold", "fused", "fused gated_up_proj")}
    print(f"\n## Greedy decode, {name} ({params / 1e6:.0f}M params), bf16, batch 1, "
          f"{new_tokens} tokens, median of {rounds} (tokens/s; ratio to unpatched)")
    print(f"tokens equal to hook's: {same}")
    print("| mode | tokens/s | ratio |\n|---|---|---|")
    for m in MLP_MODES:
        print(f"| {m} | {new_tokens / ms[m] * 1e3:.1f} | {ms['unpatched'] / ms[m]:.3f} |")


def sweep_tiles(rounds):
    """gated_up_proj under other tile shapes (kernels.gated_gemm.launch_config), bf16, against
    two cuBLAS GEMMs + act_mul_scale: whether any tiling of the kernel beats cuBLAS here."""
    gemm = importlib.import_module("sgm_ext.kernels.gated_gemm")
    default = gemm.launch_config
    configs = [dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=w, num_stages=st)
               for bm, bn, bk, w, st in [(16, 32, 128, 4, 4), (16, 64, 128, 4, 4),
                                         (16, 16, 256, 4, 3), (64, 64, 64, 4, 4),
                                         (64, 128, 64, 8, 3), (128, 128, 64, 8, 3),
                                         (128, 128, 64, 8, 4), (128, 64, 64, 4, 4),
                                         (128, 256, 64, 8, 3)]]
    g, wg, wu, s = gemm_inputs()
    print("\n## gated_up_proj tile sweep, bf16, H 4096, I 11008: ms (two GEMMs + act_mul_scale "
          "over it); BLOCK_M x BLOCK_N x BLOCK_K / warps / stages")
    print("| T | default | " + " | ".join(
        f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}/{c['num_warps']}/{c['num_stages']}"
        for c in configs) + " |\n|---|---|" + "---|" * len(configs))
    for t in (1, 16, 512, 2048):
        x = torch.randn(t, H7B, generator=g).to(DEV, torch.bfloat16)
        cells = []
        with torch.inference_mode():
            op = {"op": lambda x=x: sgm_ext.act_mul_scale(F.linear(x, wg), F.linear(x, wu), s)}
            base = medians(interleaved(op, rounds=rounds, warmup=3, clock="cuda"))["op"]
            for cfg in [None] + configs:
                gemm.launch_config = default if cfg is None else (lambda m, d, c=cfg: dict(c))
                try:
                    fused = {"k": lambda x=x: sgm_ext.gated_up_proj(x, wg, wu, s)}
                    ms = medians(interleaved(fused, rounds=rounds, warmup=3, clock="cuda"))["k"]
                    cells.append(f"{ms:.4f} ({base / ms:.2f})")
                except Exception as e:  # e.g. out of shared memory for the tile
                    cells.append(type(e).__name__)
                finally:
                    gemm.launch_config = default
        print(f"| {t} | " + " | ".join(cells) + " |", flush=True)


SMALL = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
             num_key_value_heads=12, vocab_size=8192)
WIDE = dict(hidden_size=H7B, intermediate_size=I7B, num_hidden_layers=8, num_attention_heads=32,
            num_key_value_heads=32, vocab_size=32000)


def timed_section(fn, *args):
    start = time.perf_counter()
    fn(*args)
    print(f"({fn.__name__}: {time.perf_counter() - start:.0f} s)", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=None, help="default 20, 5 with --quick")
    p.add_argument("--quick", action="store_true", help="fewer rounds, same sections and sizes")
    p.add_argument("--sweep", action="store_true", help="only the gated_up_proj tile sweep")
    args = p.parse_args(argv)
    rounds = args.rounds or (5 if args.quick else 20)
    if not torch.cuda.is_available():
        print("bench_gpu.py: torch sees no CUDA GPU here; these benchmarks need one",
              file=sys.stderr)
        return 2
    if args.sweep:
        return sweep_tiles(rounds * 2)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, backends: "
          f"act_mul_scale -> {sgm_ext.backends().get('cuda').available and 'cuda'}, "
          f"{rounds} rounds")
    timed_section(bench_gemm, rounds * 5)
    timed_section(bench_mlp, rounds)
    timed_section(bench_decode, max(3, rounds // 4), "Llama 12 x 768", SMALL)
    timed_section(bench_decode, max(3, rounds // 4), "Llama-7B widths, 8 layers", WIDE)


if __name__ == "__main__":
    sys.exit(main())
