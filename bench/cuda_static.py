"""Static report of the CUDA kernels in the built sgm_ext._C, read with cuobjdump (no GPU needed).

One row per kernel per GPU architecture: registers, stack bytes, local (spill) bytes, and the
global loads / stores in its SASS counted by opcode, e.g. {"LDG.E.128": 2, "STG.E.128": 1}.
A 16-byte access is LDG.E.128 / STG.E.128 (a .CONSTANT suffix marks a read-only-cache load).

    python bench/cuda_static.py [--summary] [path/to/_C.so]
"""
import glob
import os
import re
import shutil
import subprocess
import sys

_ARCH = re.compile(r"^arch = (sm_\d+)", re.M)
_RES = re.compile(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)")
_SASS_FUNCTION = re.compile(r"^\s*Function : (\S+)", re.M)
# The opcode of a global load / store, after an optional predicate: "@!P0 LDG.E.128 R4, ..."
_GLOBAL_ACCESS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?((?:LDG|STG)(?:\.[A-Z0-9_]+)*)")


def find_cuobjdump():
    """cuobjdump from the Triton wheel (always there beside torch), the toolkit, or PATH."""
    candidates = []
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                       "bin", "cuobjdump"))
    except ImportError:
        pass
    for root in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if root:
            candidates.append(os.path.join(root, "bin", "cuobjdump"))
    candidates.append(shutil.which("cuobjdump"))
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("cuobjdump not found (looked in the triton wheel, CUDA_HOME, PATH)")


def built_library():
    """Path of the built sgm_ext._C shared library."""
    import importlib.util

    spec = importlib.util.find_spec("sgm_ext._C")
    if spec is None or not spec.origin:
        here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "sgm_ext")
        found = glob.glob(os.path.join(here, "_C*.so"))
        if not found:
            raise FileNotFoundError("sgm_ext._C is not built")
        return found[0]
    return spec.origin


def demangle(names):
    """C++ names demangled with c++filt when it is installed, else as they are."""
    tool = shutil.which("c++filt")
    if not tool or not names:
        return dict(zip(names, names))
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else dict(zip(names, names))


def _per_arch(text):
    """Split cuobjdump output into (arch, section text) for each embedded cubin."""
    marks = list(_ARCH.finditer(text))
    return [(m.group(1), text[m.start(): marks[i + 1].start() if i + 1 < len(marks) else len(text)])
            for i, m in enumerate(marks)]


def cuda_kernel_report(so_path=None):
    """One dict per kernel per architecture of the library's embedded cubins."""
    so_path = so_path or built_library()
    tool = find_cuobjdump()

    def run(flag):
        return subprocess.run([tool, flag, so_path], capture_output=True, text=True,
                              check=True).stdout

    rows = {}
    for arch, section in _per_arch(run("-res-usage")):
        for name, reg, stack, local in _RES.findall(section):
            rows[(name, arch)] = dict(kernel=name, arch=arch, registers=int(reg),
                                      stack_bytes=int(stack), spill_bytes=int(local),
                                      global_access={})
    for arch, section in _per_arch(run("-sass")):
        functions = list(_SASS_FUNCTION.finditer(section))
        for i, f in enumerate(functions):
            end = functions[i + 1].start() if i + 1 < len(functions) else len(section)
            counts = {}
            for op in _GLOBAL_ACCESS.findall(section[f.end():end]):
                counts[op] = counts.get(op, 0) + 1
            row = rows.get((f.group(1), arch))
            if row is not None:
                row["global_access"] = dict(sorted(counts.items()))
    names = demangle(sorted({name for name, _ in rows}))
    report = []
    for (name, _arch), row in sorted(rows.items(), key=lambda kv: (kv[0][1], names[kv[0][0]])):
        row["mangled"] = name
        row["kernel"] = names[name]
        report.append(row)
    return report


_ACTS = ("silu", "gelu", "gelu_tanh", "quick_gelu", "relu")  # the order of sgm_ext::Act


def short_name(kernel):
    """'act_mul_scale_kernel<BFloat16, float, silu, 8>': no namespaces, no parameter list."""
    name = kernel[: kernel.rindex(">") + 1] if ">" in kernel else kernel.split("(", 1)[0]
    for prefix in ("void ", "sgm_ext::", "(anonymous namespace)::", "c10::"):
        name = name.replace(prefix, "")
    return re.sub(r"\(Act\)(\d)", lambda m: _ACTS[int(m.group(1))], name)


def format_table(report):
    lines = [f"{'arch':7} {'kernel':58} {'regs':>4} {'stack':>5} {'spill':>5}  "
             "global loads / stores"]
    for r in report:
        access = ", ".join(f"{k} x{v}" for k, v in r["global_access"].items())
        lines.append(f"{r['arch']:7} {short_name(r['kernel']):58} {r['registers']:4d} "
                     f"{r['stack_bytes']:5d} {r['spill_bytes']:5d}  {access}")
    return "\n".join(lines)


def format_summary(report):
    """Markdown: one line per arch x data type x path, the activations folded together."""
    groups = {}
    for r in report:
        dtype, _, act, vec = [p.strip() for p in
                              short_name(r["kernel"]).split("<", 1)[1].rstrip(">").split(",")]
        groups.setdefault((r["arch"], dtype, int(vec)), []).append(r)
    lines = ["| arch | data | path | kernels | registers | stack B | spill B | "
             "global access (silu) |",
             "|---|---|---|---|---|---|---|---|"]
    for (arch, dtype, vec), rows in sorted(groups.items()):
        regs = sorted(r["registers"] for r in rows)
        silu = next((r for r in rows if ", silu," in short_name(r["kernel"])), rows[0])
        access = ", ".join(f"{k} x{v}" for k, v in silu["global_access"].items())
        path = f"{vec} x {dtype} (16 B)" if vec > 1 else "scalar"
        lines.append(f"| {arch} | {dtype} | {path} | {len(rows)} | {regs[0]}-{regs[-1]} | "
                     f"{max(r['stack_bytes'] for r in rows)} | "
                     f"{max(r['spill_bytes'] for r in rows)} | "
                     f"{access} |")
    return "\n".join(lines)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--summary"]
    report = cuda_kernel_report(args[0] if args else None)
    print(format_summary(report) if "--summary" in sys.argv else format_table(report))
