"""Benchmarks of affine sites (AcT's transport maps): sgm-ext's modes beside a peer-style hook.

    python bench/bench_affine.py [--rounds 5] [--sites down|mid|gate,up,down] [--write]

Variants: "unpatched" (the HF module); "act hook" (a Python forward hook per module doing what
apple/ml-act's Gaussian transport hook does, written here from its formula: pick the
transported neurons, (std2 / std1)(z - mu1) + mu2, blend with the strength, write back); and
sgm-ext's "hook", "fold" and "fused" modes patched with the same maps read by
sgm_ext.patching.interop.from_act from ml-act-layout state files. Per MLP (LlamaMLP, 2048 x 5632 by
default: a 1B-class model) and end to end (bench_patch.py's ~100M Llama decoding 64 tokens
greedily, variants interleaved step by step). The maps are on the down projections (the
output of every MLP) or, with --sites mid, on its product (the peer hooks the down
projection's input there); --sites gate,up,down puts them where ml-act does for Llama.
"""
import argparse
import copy
import sys
import tempfile
from pathlib import Path

import torch
from bench_patch import (  # sets the torch threads
    E2E,
    NEW_TOKENS,
    decode_round,
    e2e_model,
    llama_mlp,
)
from timing import command_line, environment, medians, timed, write_section

import sgm_ext
from sgm_ext.patching.registry import find_mlps

VARIANTS = ("unpatched", "act hook", "hook", "fold", "fused")
STRENGTH = 0.8
STD_EPS = 1e-4  # ml-act's default


def act_states(model, kinds, seed=0):
    """{module name: ml-act Gaussian transport state} for every MLP of the model and site kind:
    mu / std of the toxic (1) and non-toxic (2) responses, for a projection's output or the
    down projection's input (kind "mid"; named by the MLP's site, as sgm-ext names it)."""
    g = torch.Generator().manual_seed(seed)
    states = {}
    for info in find_mlps(model).values():
        for kind in kinds:
            n = info.site_size(kind)
            states[info.site(kind)] = {
                "mu1": torch.randn(n, generator=g) * 0.05,
                "mu2": torch.randn(n, generator=g) * 0.05,
                "std1": 0.5 + torch.rand(n, generator=g), "std2": 0.5 + torch.rand(n, generator=g),
                "quantiles_src": [-1e6, 1e6]}
    return states


def scales_from(states):
    """The ScaleSet of the states, through ml-act's file layout and sgm_ext.interop."""
    with tempfile.TemporaryDirectory() as d:
        for name, state in states.items():
            torch.save(state, Path(d) / f"{name}.statedict")
        return sgm_ext.patching.interop.from_act(d, method="gaussian_ot")


class ActGaussianHook:
    """The peer's forward (act/hooks/transport.py, GaussianOTHook), from its formula: on the
    neurons with both stds above std_eps, z_ot = (std2 / std1)(z - mu1) + mu2, then
    strength z_ot + (1 - strength) z, written back into the output in place."""

    def __init__(self, state, strength, dtype):
        self.mask = (state["std1"] > STD_EPS) & (state["std2"] > STD_EPS)
        self.mu1 = state["mu1"][self.mask].to(dtype)
        self.mu2 = state["mu2"][self.mask].to(dtype)
        self.ratio = (state["std2"][self.mask] / state["std1"][self.mask]).to(dtype)
        self.strength = strength

    def transport(self, z):
        flat = z.view(-1, z.shape[-1])
        zm = flat[:, self.mask]
        z_ot = self.ratio * (zm - self.mu1) + self.mu2
        flat[:, self.mask] = self.strength * z_ot + (1 - self.strength) * zm
        return z

    def __call__(self, module, args, output):  # forward hook: the module's output
        return self.transport(output)

    def pre(self, module, args):  # forward pre-hook: the module's input (the mid site)
        return (self.transport(args[0].clone()), *args[1:])


def add_act_hooks(model, states, dtype):
    """The peer's hooks: on each down projection's output, or on its input for a mid site
    (`<mlp>.mid`: the input of the Llama MLP's down_proj)."""
    modules = dict(model.named_modules())
    handles = []
    for site, state in states.items():
        hook = ActGaussianHook(state, STRENGTH, dtype)
        if site.endswith(".mid"):
            down = modules[site[: -len(".mid")] + ".down_proj"]
            handles.append(down.register_forward_pre_hook(hook.pre))
        else:
            handles.append(modules[site].register_forward_hook(hook))
    return handles


def prepare(base, kinds, dtype):
    """{variant: model copy}, each with its intervention; and what removes them."""
    states = act_states(base, kinds)
    scales = scales_from(states)
    models = {v: copy.deepcopy(base) for v in VARIANTS}
    undo = add_act_hooks(models["act hook"], states, dtype)
    for v in ("hook", "fold", "fused"):
        undo.append(sgm_ext.patch(models[v], scales, mode=v, strength=STRENGTH,
                                  allow_amplify=True))
    return models, undo


def remove(undo):
    for h in undo:
        h.remove()


def mlp_row(tokens, dtype, rounds, kinds, hidden, inter):
    """One row of the per-MLP table: median CPU time per variant, modes in turn."""
    root = llama_mlp(dtype, hidden, inter)
    models, undo = prepare(root, kinds, dtype)
    del root
    x = torch.randn(1, tokens, hidden, dtype=dtype)
    cpu = {v: [] for v in VARIANTS}
    with torch.inference_mode():
        outs = {v: models[v]["mlp"](x) for v in VARIANTS}  # first calls fill the caches
        ref = outs["act hook"].float()
        for v in ("hook", "fold", "fused"):
            err = ((outs[v].float() - ref).abs().max() / ref.abs().max()).item()
            assert err < (1e-4 if dtype == torch.float32 else 3e-2), (v, err)
        for _ in range(rounds):
            for v in VARIANTS:
                cpu[v].append(timed(models[v]["mlp"], x)[1])
    remove(undo)
    med = medians(cpu)
    cells = " | ".join(f"{med[v] * 1e3:.3f} ms ({med['unpatched'] / med[v]:.3f})"
                       for v in VARIANTS)
    return f"| {tokens} | {str(dtype)[6:]} | {cells} |"


def e2e_table(rounds, kinds):
    base, prompt = e2e_model()
    models, undo = prepare(base, kinds, torch.float32)
    wall = {v: [] for v in VARIANTS}
    cpu = {v: [] for v in VARIANTS}
    agree = {}
    with torch.inference_mode():
        for r in range(rounds + 1):
            w_sum, c_sum, tokens = decode_round(models, prompt, VARIANTS)
            agree = {v: tokens[v] == tokens["act hook"] for v in VARIANTS}
            if r:  # round 0 warms up
                for v in VARIANTS:
                    wall[v].append(w_sum[v])
                    cpu[v].append(c_sum[v])
    remove(undo)
    med_w, med_c = medians(wall), medians(cpu)
    params = sum(p.numel() for p in base.parameters())
    lines = [f"Llama (random weights, {E2E['num_hidden_layers']} layers), {params / 1e6:.1f}M "
             f"params, greedy decode {NEW_TOKENS} tokens, batch 1, variants interleaved per "
             f"step, median of {rounds} rounds (range of the wall ratio over the rounds); "
             f"Gaussian transport maps on every MLP's {', '.join(kinds)} sites, strength "
             f"{STRENGTH}",
             "",
             "| variant | tokens/s (wall) | ratio to unpatched | range | tokens/s (CPU time) | "
             "ratio | same tokens as act hook |",
             "|---|---|---|---|---|---|---|"]
    for v in VARIANTS:
        per_round = [u / t for u, t in zip(wall["unpatched"], wall[v])]
        lines.append(f"| {v} | {NEW_TOKENS / med_w[v]:.1f} | {med_w['unpatched'] / med_w[v]:.3f}"
                     f" | {min(per_round):.3f}-{max(per_round):.3f} | "
                     f"{NEW_TOKENS / med_c[v]:.1f} | {med_c['unpatched'] / med_c[v]:.3f} | "
                     f"{'yes' if agree[v] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sites", default="down",
                   help="site kinds with maps, comma-separated: down (default), mid, or "
                   "gate,up,down (ml-act's default sites for Llama)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5632)
    p.add_argument("--skip-mlp", action="store_true")
    p.add_argument("--skip-e2e", action="store_true")
    p.add_argument("--write", action="store_true",
                   help="put each table into its section of bench/RESULTS.md")
    args = p.parse_args(argv)
    sections = {}

    def section(name, body):
        text = f"`{command_line('bench_affine.py', argv)}`; {environment()}\n\n{body}"
        print(f"\n{text}")
        sections[f"bench_affine.py {name} {args.sites}"] = text

    if not args.skip_mlp:
        kinds = args.sites.split(",")
        rows = [mlp_row(tokens, dtype, rounds, kinds, args.hidden, args.inter)
                for tokens, rounds in ((1, 20 * args.rounds), (128, args.rounds))
                for dtype in (torch.float32, torch.bfloat16)]
        section("mlp", f"Per LlamaMLP {args.hidden} x {args.inter}, batch 1, Gaussian transport "
                f"on the {args.sites} site: median CPU time (ratio to unpatched)\n\n"
                "| tokens | dtype | " + " | ".join(VARIANTS) + " |\n|---|---|"
                + "---|" * len(VARIANTS) + "\n" + "\n".join(rows))
    if not args.skip_e2e:
        section("e2e", e2e_table(args.rounds, args.sites.split(",")))
    if args.write:
        for name, text in sections.items():
            write_section(name, text)


if __name__ == "__main__":
    sys.exit(main())
