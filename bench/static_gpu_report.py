"""Static GPU report: compile each Triton kernel ahead of time for sm_80 and sm_90, without a GPU,
and read registers, spill / stack bytes and global load / store widths off the SASS.

The kernels are compiled with the specialisations the JIT would apply to typical arguments
(pointers 16-byte aligned, integers divisible by 16 marked so, integers equal to 1 made
constants) at Llama-7B-like sizes (INTER = 11008), so the SASS is what a GPU would run.

    python bench/static_gpu_report.py [--json report.json] [--archs 80,90]

The CUDA kernels of the compiled library are added by bench/cuda_static.py when it is present.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if __name__ == "__main__":
    # Triton's interpreter replaces JIT functions; this report needs the real compiler. (When a
    # test imports this module for its parsers, the caller's interpreter setting stays.)
    os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sgm_ext.kernels import elementwise, gated_gemm  # noqa: E402
from sgm_ext.kernels.common import STRENGTH_ROWS, TRITON_DTYPES, compute_dtype  # noqa: E402

NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
INTER, H, PREFILL_M = 11008, 4096, 512


class Ptr:
    """A pointer argument of the given torch dtype (assumed 16-byte aligned, as allocations are)."""

    def __init__(self, dtype):
        self.dtype = dtype


def jit_like_source(fn, args):
    """ASTSource for `fn` specialised the way triton.jit specialises these argument values."""
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = args[name]
        if fn.params[i].is_constexpr or (value == 1 and isinstance(value, int)
                                         and not isinstance(value, bool)):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, Ptr):
            signature[name] = "*" + TRITON_DTYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif isinstance(value, int):
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise TypeError(f"{name}: cannot specialise {value!r}")
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def elementwise_variants():
    """(label, fn, args, options): gated in every dtype (every activation in bf16), non-gated."""
    fn = elementwise.act_mul_scale_kernel
    block, num_warps = elementwise.launch_config(INTER)
    cases = [(torch.bfloat16, act, True)
             for act in ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")]
    cases += [(torch.float32, "silu", True), (torch.float16, "silu", True)]
    cases += [(dt, "quick_gelu", False) for dt in (torch.float32, torch.float16, torch.bfloat16)]
    cases = [(*c, False) for c in cases] + [(torch.bfloat16, "silu", True, True)]  # + a shift
    for dtype, act, gated, shifted in cases:
        args = dict(out_ptr=Ptr(dtype), gate_ptr=Ptr(dtype), up_ptr=Ptr(dtype),
                    scale_ptr=Ptr(torch.float32), gate_scale_ptr=Ptr(torch.float32),
                    strength_ptr=Ptr(torch.float32), shift_ptr=Ptr(torch.float32),
                    strength_value=1.0, n_cols=INTER,
                    stride_gate=INTER, stride_up=INTER if gated else 0, stride_out=INTER,
                    HAS_UP=gated, HAS_SCALE=True, HAS_GATE_SCALE=gated, HAS_SHIFT=shifted,
                    STRENGTH_MODE=STRENGTH_ROWS, ACT=act, COMPUTE=compute_dtype(dtype), BLOCK=block)
        label = (f"{'act_mul_scale' if gated else 'act_scale'}[{TRITON_DTYPES[dtype]},{act}"
                 f"{',shift' if shifted else ''}]")
        yield label, "elementwise", fn, args, dict(num_warps=num_warps)


def gemm_variants():
    fn = gated_gemm.gated_up_proj_kernel
    for dtype in (torch.float16, torch.bfloat16):
        for m in (16, PREFILL_M):
            cfg = gated_gemm.launch_config(m, dtype)
            options = dict(num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))
            args = dict(out_ptr=Ptr(dtype), x_ptr=Ptr(dtype), w_gate_ptr=Ptr(dtype),
                        w_up_ptr=Ptr(dtype),
                        scale_ptr=Ptr(torch.float32), gate_scale_ptr=Ptr(torch.float32),
                        strength_ptr=Ptr(torch.float32), strength_value=1.0, M=m, N=INTER, K=H,
                        stride_xm=H, stride_xk=1, stride_gn=H, stride_gk=1, stride_un=H,
                        stride_uk=1,
                        stride_om=INTER, HAS_SCALE=True, HAS_GATE_SCALE=False,
                        STRENGTH_MODE=STRENGTH_ROWS, ACT="silu", COMPUTE=compute_dtype(dtype),
                        DOT_PRECISION=gated_gemm.dot_precision(dtype), **cfg)
            yield f"gated_up_proj[{TRITON_DTYPES[dtype]},M={m}]", "gemm", fn, args, options


_MEM_RE = re.compile(r"\b(LDGSTS|LDG|STG)((?:\.[A-Z0-9_]+)*)(?=\s)")


def access_width(modifiers):
    for bits in ("128", "64"):
        if f".{bits}" in modifiers:
            return int(bits)
    if ".U16" in modifiers or ".S16" in modifiers:
        return 16
    if ".U8" in modifiers or ".S8" in modifiers:
        return 8
    return 32


def sass_memory_ops(sass):
    """{"LDG": {width: count}, "STG": {...}, "LDGSTS": {...}} from SASS text."""
    counts = {}
    for op, mods in _MEM_RE.findall(sass):
        by_width = counts.setdefault(op, {})
        width = access_width(mods)
        by_width[width] = by_width.get(width, 0) + 1
    return counts


def resource_usage(cubin_path):
    out = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", cubin_path],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    return dict(registers=int(m[1]), stack_bytes=int(m[2]), local_bytes=int(m[4]))


def spill_bytes(ptx, tmp):
    """ptxas -v on the PTX: spill stores + loads (bytes)."""
    arch = re.search(r"^\.target (sm_\w+)", ptx, re.M)[1]
    path = os.path.join(tmp, "k.ptx")
    with open(path, "w") as f:
        f.write(ptx)
    log = subprocess.run([os.path.join(NVIDIA_BIN, "ptxas"), "-v", f"--gpu-name={arch}", path,
                          "-o", os.path.join(tmp, "k.o")],
                         capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads",
                        log.stderr + log.stdout)
    return sum(int(a) + int(b) for a, b in spills)


def triton_report(archs=(80, 90)):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, kind, fn, args, options in [*elementwise_variants(), *gemm_variants()]:
            for arch in archs:
                compiled = triton.compile(jit_like_source(fn, args),
                                          target=GPUTarget("cuda", arch, 32), options=options)
                cubin = os.path.join(tmp, "k.cubin")
                with open(cubin, "wb") as f:
                    f.write(compiled.asm["cubin"])
                sass = subprocess.run([os.path.join(NVIDIA_BIN, "cuobjdump"), "-sass", cubin],
                                      capture_output=True, text=True, check=True).stdout
                rows.append(dict(source="triton", kernel=label, kind=kind, arch=f"sm_{arch}",
                                 **resource_usage(cubin), shared_bytes=compiled.metadata.shared,
                                 spill_bytes=spill_bytes(compiled.asm["ptx"], tmp),
                                 memory_ops=sass_memory_ops(sass)))
    return rows


def cuda_report():
    """Rows for the compiled library's CUDA kernels, when bench/cuda_static.py and the library
    exist."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    try:
        import cuda_static
    except ImportError:
        return []
    return cuda_static.cuda_kernel_report()


def format_widths(by_width):
    return " ".join(f"{n}x{w}b" for w, n in sorted(by_width.items(), reverse=True)) or "-"


def markdown(rows):
    lines = ["| kernel | arch | regs | shared B | stack B | local B | spill B | global loads |"
             " global stores | global->shared copies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ops = r.get("memory_ops", {})
        lines.append(f"| {r['kernel']} | {r['arch']} | {r['registers']} | "
                     f"{r.get('shared_bytes', '-')} | "
                     f"{r['stack_bytes']} | "
                     f"{r.get('local_bytes', '-')} | {r.get('spill_bytes', '-')} | "
                     f"{format_widths(ops.get('LDG', {}))} | {format_widths(ops.get('STG', {}))} | "
                     f"{format_widths(ops.get('LDGSTS', {}))} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", help="also write the rows as JSON here")
    p.add_argument("--archs", default="80,90", help="comma-separated SM versions")
    p.add_argument("--no-cuda", action="store_true", help="Triton kernels only")
    a = p.parse_args(argv)
    rows = triton_report(tuple(int(x) for x in a.archs.split(",")))
    if not a.no_cuda:
        rows += cuda_report()
    print(markdown(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
