"""act_mul_scale on every backend that runs here, beside the eager chain F.silu(g) * u * s and
the same chain under torch.compile.

    pytest bench/bench_ops.py --benchmark-only     # pytest-benchmark, one group per shape
    python bench/bench_ops.py [--quick]            # interleaved ratios as a markdown table

Shapes [T, I]: T tokens in 1, 16, 512, 2048; I in 11008 (Llama-7B), 14336 (Llama-3-8B);
fp32 and bf16. The scale is float32 for the op (its contract) and in the data type for the
chains (what a user multiplies by). The backends run through the public op (dispatch, output
allocation and all), forced one at a time with SGM_EXT_BACKEND. Each variant carries the bytes
it moves (each input read once, each output written once) and its kernel launches.
"""
import argparse
import os
import sys

import pytest
import torch
import torch.nn.functional as F

# bench/ is on sys.path (script or pytest)
from timing import command_line, environment, interleaved, medians, write_section

import sgm_ext

TOKENS = (1, 16, 512, 2048)
WIDTHS = (11008, 14336)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# One thread by default (SGM_BENCH_THREADS=0: torch's default): on a shared 2-core machine an
# OpenMP region stalls a whole scheduler slice whenever another process holds a core, which
# swamps every ratio; the kernels are bound by memory, not by cores.
THREADS = int(os.environ.get("SGM_BENCH_THREADS", "1")) or torch.get_num_threads()
torch.set_num_threads(THREADS)


def chain(g, u, s):
    return F.silu(g) * u * s


def compiled_for_case():
    """A compiled chain of its own for one shape / dtype case, dynamo's caches reset first: one
    compiled function for all 16 cases hits dynamo's recompile limit (8) and then runs the
    rest eagerly, silently. fullgraph: a graph break is an error, not a partly eager chain."""
    torch._dynamo.reset()
    _graphs_before[0] = _graph_count()
    return torch.compile(chain, dynamic=False, fullgraph=True)


def _graph_count():
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


_graphs_before = [0]  # the graph count when the last case's chain was made


def check_compiled():
    """Raise unless exactly one graph was compiled since compiled_for_case: a compiled variant
    that ran eagerly (or recompiled) must not be reported as compiled."""
    graphs = _graph_count() - _graphs_before[0]
    if graphs != 1:
        raise RuntimeError(f"the compiled chain made {graphs} graphs for one case (expected 1): "
                           "its timings would not be of one compiled kernel")


def backends_here():
    """The backends that run act_mul_scale on DEVICE (the Triton interpreter excluded)."""
    return [name for name, info in sgm_ext.backends().items()
            if info.available and DEVICE in info.devices and "act_mul_scale" in info.ops
            and not (name == "triton" and DEVICE == "cpu")]


def variants():
    """The chains, the op on each backend, and the compiled library's kernel called directly
    ("_C direct": no Python op layer, to show what that layer costs at small T; "_C reused out":
    the same into one output tensor allocated once, so the difference from "_C direct" is what
    allocating and first touching a fresh output costs)."""
    names = ["eager", "compiled"] + backends_here()
    if DEVICE in names:  # the compiled backend of this device loaded
        names += ["_C direct", "_C reused out"]
    return names


def traffic(variant, t, i, dtype):
    """(bytes moved, kernel launches) of one call: each input read once, each output written
    once."""
    e = torch.empty((), dtype=dtype).element_size()
    n = t * i
    if variant == "eager":  # silu: g -> a; a * u -> b; b * s -> out
        return 2 * n * e + 3 * n * e + (2 * n + i) * e, 3
    if variant == "compiled":  # one generated loop: g, u, s in, out out
        return (3 * n + i) * e, 1
    return 3 * n * e + 4 * i, 1  # the op: g, u, float32 scale in, out out


def inputs(t, i, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(t, i, generator=gen).to(DEVICE, dtype)
    u = torch.randn(t, i, generator=gen).to(DEVICE, dtype)
    s = torch.rand(i, generator=gen).to(DEVICE)
    return g, u, s


def runner(variant, g, u, s):
    """A no-argument callable that runs `variant` once (and waits for the device)."""
    s_data = s.to(g.dtype)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    if variant == "eager":
        def fn():
            return chain(g, u, s_data)
    elif variant == "compiled":
        compiled = compiled_for_case()

        def fn():
            return compiled(g, u, s_data)
    elif variant == "_C direct":
        def fn():
            out = torch.empty_like(g)
            torch.ops.sgm_ext.act_mul_scale_out(out, g, u, s, None, None, None, "silu")
            return out
    elif variant == "_C reused out":
        reused = torch.empty_like(g)

        def fn():
            torch.ops.sgm_ext.act_mul_scale_out(reused, g, u, s, None, None, None, "silu")
            return reused
    else:
        def fn():
            old = os.environ.get("SGM_EXT_BACKEND")
            os.environ["SGM_EXT_BACKEND"] = variant
            try:
                return sgm_ext.act_mul_scale(g, u, s)
            finally:
                if old is None:
                    os.environ.pop("SGM_EXT_BACKEND")
                else:
                    os.environ["SGM_EXT_BACKEND"] = old

    def run():
        out = fn()
        sync()
        return out
    return run


# ------------------------------------------------------------------ pytest-benchmark

@pytest.mark.parametrize("variant", variants())
@pytest.mark.parametrize("i", WIDTHS)
@pytest.mark.parametrize("t", TOKENS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_act_mul_scale(benchmark, dtype, t, i, variant):
    g, u, s = inputs(t, i, DTYPES[dtype])
    run = runner(variant, g, u, s)
    run()  # compile / warm up outside the timing
    if variant == "compiled":
        check_compiled()
    nbytes, launches = traffic(variant, t, i, DTYPES[dtype])
    benchmark.group = f"act_mul_scale {dtype} [{t}, {i}] {DEVICE}"
    benchmark.extra_info.update(bytes=nbytes, launches=launches, threads=THREADS)
    benchmark(run)


# ------------------------------------------------------------------ interleaved ratios

def table(tokens=TOKENS, widths=WIDTHS, min_time=0.3):
    names = variants()
    head = ["dtype", "[T, I]"] + [f"{n} ms" for n in names] + \
        [f"eager / {n}" for n in names[1:]] + [f"compiled / {n}" for n in names[2:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for dtype_name, dtype in DTYPES.items():
        for t in tokens:
            for i in widths:
                g, u, s = inputs(t, i, dtype)
                # two untimed calls each, then at least 5 and at most 200 rounds, min_time long
                runs = {n: runner(n, g, u, s) for n in names}
                samples = interleaved(runs, warmup=2, min_time=min_time, min_reps=5,
                                      max_reps=200)
                check_compiled()  # after every call of this case: still one graph
                med = medians(samples)
                row = [dtype_name, f"[{t}, {i}]"] + [f"{med[n] * 1e3:.3g}" for n in names]
                row += [f"{med['eager'] / med[n]:.2f}" for n in names[1:]]
                row += [f"{med['compiled'] / med[n]:.2f}" for n in names[2:]]
                lines.append("| " + " | ".join(row) + " |")
                print(lines[-1], flush=True)
    return "\n".join(lines)


def traffic_table(t=2048, i=11008):
    lines = ["| variant | dtype | bytes moved at [%d, %d] | kernel launches |" % (t, i),
             "|---|---|---|---|"]
    for dtype_name, dtype in DTYPES.items():
        for n in ("eager", "compiled", "op (any backend)"):
            nbytes, launches = traffic(n.split()[0], t, i, dtype)
            lines.append(f"| {n} | {dtype_name} | {nbytes / 1e6:.1f} MB | {launches} |")
    return "\n".join(lines)


def mlp_traffic_table(t=2048, hidden=4096, inter=11008):
    """Bytes of the [T, I] intermediates of one bf16 LlamaMLP forward per variant (weights and x
    are read alike by all and left out): passes over [T, I] x T I x 2 bytes."""
    n = t * inter
    rows = [("unpatched: GEMMs write g, u; silu(g) -> a; a * u -> h; down reads h", 8, 2),
            ("hook (AurA style: a hook scales up_proj's output)", 10, 3),
            ("fused: GEMMs write g, u; act_mul_scale reads them, writes h", 6, 1),
            ("fused GEMM epilogue (gated_up_proj): only h is written", 2, 0)]
    lines = [f"| bf16 LlamaMLP {hidden} x {inter}, T = {t} | [T, I] passes | bytes | saved vs "
             "unpatched | elementwise launches |", "|---|---|---|---|---|"]
    for label, passes, launches in rows:
        saved = (8 - passes) * n * 2
        lines.append(f"| {label} | {passes} N | {passes * n * 2 / 1e6:.1f} MB | "
                     f"{saved / 1e6:+.1f} MB | {launches} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="only [2048, 11008]")
    parser.add_argument("--min-time", type=float, default=0.3,
                        help="seconds of interleaved calls per shape (more: steadier medians)")
    parser.add_argument("--write", action="store_true",
                        help="put the tables into their section of bench/RESULTS.md")
    args = parser.parse_args()
    header = f"`{command_line('bench_ops.py', sys.argv[1:])}` on {DEVICE}; {environment()}"
    print(header)
    ratios = table((2048,), (11008,), args.min_time) if args.quick else \
        table(min_time=args.min_time)
    text = (f"{header}\n\n{ratios}\n\nBytes and launches per call:\n\n{traffic_table()}\n\n"
            f"Bytes of one MLP's intermediates (N = T x I elements; counted, not timed):\n\n"
            f"{mlp_traffic_table()}")
    print(f"\n{traffic_table()}\n\n{mlp_traffic_table()}")
    if args.write:
        write_section(f"bench_ops.py {'quick' if args.quick else 'full'} {DEVICE}", text)
