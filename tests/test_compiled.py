"""The compiled library sgm_ext._C: its CPU kernel's vector / tail / unaligned paths, the
per-element functions of the CUDA kernel run on the host, the op registration, the static
report of its CUDA kernels, and the fallback when the library is missing.

With CI=true a library that is missing or built without its CUDA part fails these tests
instead of skipping them.
"""
import os
import subprocess
import sys

import pytest
import torch
from cli_runs import HANG_S
from op_cases import check_alloc_op, rand_scale
from reference64 import ACT64, assert_matches, expected

import sgm_ext
from sgm_ext.ops import compiled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import cuda_static  # noqa: E402

IN_CI = os.environ.get("CI") == "true"
OP = "sgm_ext::act_mul_scale_out"
ACTS = tuple(ACT64)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def require(cuda=False):
    """Skip (fail in CI) when the library, or its CUDA part, is not built."""
    missing = None
    if not compiled.loaded():
        missing = f"sgm_ext._C did not load: {compiled.LOAD_ERROR}"
    elif cuda and not compiled.has_kernel("cuda"):
        missing = "sgm_ext._C was built without its CUDA kernels"
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(missing)


def poisoned(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


def run_cpu(gate, up=None, scale=None, gate_scale=None, strength=None, strength_value=None,
            act="silu", out=None):
    """The cpu backend's 2-D function on a NaN-poisoned output."""
    out = poisoned(gate.shape, gate.dtype) if out is None else out
    torch.ops.sgm_ext.act_mul_scale_out(out, gate, up, scale, gate_scale, strength, strength_value,
                                        act)
    return out


# ------------------------------------------------------------------ build and registration

def test_library_has_cpu_and_cuda_kernels():
    require(cuda=True)
    for key in ("CPU", "CUDA"):
        for op in (OP, "sgm_ext::_act_mul_scale_alloc"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(op, key), (op, key)
    assert torch._C._dispatch_has_kernel_for_dispatch_key("sgm_ext::_act_mul_scale_host", "CPU")
    info = sgm_ext.backends()
    assert info["cpu"].available and info["cpu"].devices == ("cpu",), info["cpu"]
    if not torch.cuda.is_available():
        assert not info["cuda"].available and info["cuda"].reason == "no CUDA device"


def test_missing_library_warns_once_and_falls_back():
    # A fresh interpreter in which importing sgm_ext._C fails: sgm_ext still imports, the
    # cpu / cuda backends report why they are out, the ops run on the torch backend, and the
    # warning comes exactly once.
    script = r"""
import sys, warnings
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "sgm_ext._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, sgm_ext
    from sgm_ext.ops.backends import selected
    info = sgm_ext.backends()
    sgm_ext.backends()
    out = sgm_ext.act_mul_scale(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
ours = [w for w in caught if "sgm_ext._C" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert not info["cpu"].available and "blocked for the test" in info["cpu"].reason, info["cpu"]
assert not info["cuda"].available
assert selected("act_mul_scale", "cpu") == "torch"
assert torch.allclose(out, torch.nn.functional.silu(torch.ones(2, 3)))
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "SGM_EXT_BACKEND"}
    env["TRITON_INTERPRET"] = "0"
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


def test_install_without_the_library_is_silent(tmp_path):
    # SGM_EXT_NO_BUILD=1 installs no sgm_ext._C: importing sgm_ext then warns about nothing
    # (a warning is for a library that exists but fails to load, above), and the backends
    # say it is not built. The package is copied without the library file and imported first.
    import shutil

    package = tmp_path / "sgm_ext"
    shutil.copytree(os.path.join(ROOT, "sgm_ext"), package,
                    ignore=shutil.ignore_patterns("_C*", "__pycache__"))
    shutil.copytree(os.path.join(ROOT, "kernels"), package / "kernels",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = r"""
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import torch, sgm_ext
    info = sgm_ext.backends()
    out = sgm_ext.act_mul_scale(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3))
assert sgm_ext.__file__.startswith(sys.argv[1]), sgm_ext.__file__
ours = [str(w.message) for w in caught if "sgm_ext" in str(w.message)]
assert not ours, ours
assert not info["cpu"].available and "not built" in info["cpu"].reason, info["cpu"]
assert torch.allclose(out, torch.nn.functional.silu(torch.ones(2, 3)))
print("ok")
"""
    # -S: no site processing, so the editable install's finder (which would find the built
    # library of this checkout) is not installed; the packages come from PYTHONPATH instead
    import sysconfig

    env = {k: v for k, v in os.environ.items() if k != "SGM_EXT_BACKEND"}
    env.update(TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([str(tmp_path), sysconfig.get_paths()["purelib"]]))
    res = subprocess.run([sys.executable, "-S", "-c", "import sys\n" + script, str(tmp_path)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG_S)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ------------------------------------------------------------------ the per-element functions

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_per_element_functions_on_host(act, dtype, gen):
    # _act_mul_scale_host evaluates act_mul_scale.h's __host__ __device__ functions one
    # element at a time: the CUDA kernel's math, compiled for the CPU.
    require()
    rows, n = 4, 129
    gate = torch.cat([torch.linspace(-30, 30, n, dtype=torch.float64)[None],
                      3 * torch.randn(rows - 1, n, generator=gen, dtype=torch.float64)]).to(dtype)
    up = torch.randn(rows, n, generator=gen, dtype=torch.float64).to(dtype)
    vec_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.rand(n, generator=gen, dtype=torch.float64).to(vec_dtype)
    gate_scale = (0.5 + torch.rand(n, generator=gen, dtype=torch.float64)).to(vec_dtype)
    strength = torch.rand(rows, generator=gen, dtype=torch.float64).to(vec_dtype)
    host = torch.ops.sgm_ext._act_mul_scale_host
    cases = [
        ((up, scale, gate_scale, strength, None),
         expected(gate, up, act, scale, gate_scale, strength)),
        ((up, scale, None, None, 0.3), expected(gate, up, act, scale, strength=0.3)),
        ((None, scale, None, None, None), expected(gate, None, act, scale)),
        ((up, None, None, None, None), expected(gate, up, act)),
    ]
    for args, ref in cases:
        assert_matches(host(gate, *args, act), ref)
    shift = torch.randn(n, generator=gen, dtype=torch.float64).to(vec_dtype)  # affine sites
    shifted = [
        ((up, scale, gate_scale, strength, None),
         expected(gate, up, act, scale, gate_scale, strength, shift)),
        ((up, None, None, None, 0.3), expected(gate, up, act, strength=0.3, shift=shift)),
        ((None, scale, None, None, None), expected(gate, None, act, scale, shift=shift)),
    ]
    for args, ref in shifted:
        assert_matches(host(gate, *args, act, shift), ref)


def test_strength_endpoints_are_exact_on_host(gen):
    require()
    gate, up = torch.randn(3, 40, generator=gen), torch.randn(3, 40, generator=gen)
    scale = torch.rand(40, generator=gen)
    host = torch.ops.sgm_ext._act_mul_scale_host
    no_strength = host(gate, up, scale, None, None, None, "silu")
    assert torch.equal(host(gate, up, scale, None, torch.ones(3), None, "silu"), no_strength)
    assert torch.equal(host(gate, up, scale, None, None, 1.0, "silu"), no_strength)
    assert torch.equal(host(gate, up, scale, None, torch.zeros(3), None, "silu"),
                       host(gate, up, None, None, None, None, "silu"))


# ------------------------------------------------------------------ the CPU kernel's paths

# Lengths around the vector width (16 fp32 lanes x 2 per step with AVX-512, 8 x 2 with AVX2):
# tail only, exact steps, steps plus a tail.
LENGTHS = [1, 7, 31, 32, 33, 64, 97]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", LENGTHS)
def test_cpu_kernel_vector_body_and_tail(n, dtype, gen):
    require()
    rows = 3
    gate = torch.randn(rows, n, generator=gen).to(dtype)
    up = torch.randn(rows, n, generator=gen).to(dtype)
    scale, gate_scale = torch.rand(n, generator=gen), 0.5 + torch.rand(n, generator=gen)
    strength = torch.rand(rows, generator=gen)
    for act in ACTS:
        assert_matches(run_cpu(gate, up, scale, gate_scale, strength, act=act),
                       expected(gate, up, act, scale, gate_scale, strength))
    assert_matches(run_cpu(gate, None, scale, strength_value=0.6, act="gelu"),
                   expected(gate, None, "gelu", scale, strength=0.6))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpu_kernel_unaligned_and_strided_views(dtype, gen):
    # Offset views (pointers off any 16-byte boundary), padded rows, a strided output whose
    # padding must stay untouched.
    require()
    rows, n = 5, 45
    base = torch.randn(rows, n + 9, generator=gen).to(dtype)
    gate = base[:, 1:1 + n]
    up = torch.randn(rows, n + 5, generator=gen).to(dtype)[:, 3:3 + n]
    scale = torch.rand(n + 1, generator=gen)[1:]
    gate_scale = (0.5 + torch.rand(2 * n, generator=gen))[::2]  # non-contiguous vector
    out_buf = poisoned((rows, n + 6), dtype)
    out = out_buf[:, 2:2 + n]
    run_cpu(gate, up, scale, gate_scale, act="gelu_tanh", out=out)
    assert_matches(out, expected(gate, up, "gelu_tanh", scale, gate_scale))
    assert out_buf[:, :2].isnan().all() and out_buf[:, 2 + n:].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 33, 50])
def test_cpu_packed_layout(n, dtype, gen, monkeypatch):
    # [..., 2I]: up starts I elements after gate, so with odd I the two halves have
    # different alignments.
    require()
    monkeypatch.setenv("SGM_EXT_BACKEND", "cpu")
    gate_up = torch.randn(2, 3, 2 * n, generator=gen).to(dtype)
    scale = torch.rand(n, generator=gen)
    out = sgm_ext.act_mul_scale_packed(gate_up, scale, act="quick_gelu", strength=0.25)
    assert_matches(out, expected(gate_up[..., :n], gate_up[..., n:], "quick_gelu", scale,
                                 strength=0.25))


def test_cpu_kernel_many_rows_in_parallel(gen):
    # Enough rows for at::parallel_for to split them over threads; every row written.
    require()
    gate = torch.randn(4099, 37, generator=gen)
    up = torch.randn(4099, 37, generator=gen)
    strength = torch.rand(4099, generator=gen)
    scale = torch.rand(37, generator=gen)
    assert_matches(run_cpu(gate, up, scale, strength=strength),
                   expected(gate, up, "silu", scale, strength=strength))


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_cpu_kernel_other_capabilities(capability, gen):
    # The variant compiled for each CPU capability; ATEN_CPU_CAPABILITY lowers the one torch
    # (and so sgm_ext) runs with, and must be set before torch is imported.
    require()
    script = r"""
import sys, torch
sys.path.insert(0, "tests")
from reference64 import ACT64, assert_matches, expected
from sgm_ext.ops import compiled
cap = torch.backends.cpu.get_cpu_capability()
assert cap == sys.argv[1].upper(), cap
g = torch.Generator().manual_seed(int(sys.argv[2]))
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n in (5, 16, 67):
        gate = torch.randn(3, n, generator=g).to(dtype)
        up = torch.randn(3, n, generator=g).to(dtype)
        scale, st = torch.rand(n, generator=g), torch.rand(3, generator=g)
        b = torch.randn(n, generator=g)
        for act in ACT64:
            out = torch.full((3, n), float("nan"), dtype=dtype)
            torch.ops.sgm_ext.act_mul_scale_out(out, gate, up, scale, None, st, None, act)
            assert_matches(out, expected(gate, up, act, scale, strength=st))
            torch.ops.sgm_ext.act_mul_scale_out(out, gate, up, scale, None, st, None, act, b)
            assert_matches(out, expected(gate, up, act, scale, strength=st, shift=b))
print("ok")
"""
    if capability != "default" and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip(f"this CPU has no {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability, TRITON_INTERPRET="0")
    seed = str(int(torch.randint(2**31, (1,), generator=gen)))
    res = subprocess.run([sys.executable, "-c", script, capability, seed],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-3000:]


# ------------------------------------------------------------------ the inference fast path

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "padded", "transposed", "packed"])
@pytest.mark.parametrize("lead", [(5,), (2, 3), (2, 1, 3)], ids=str)
def test_alloc_op_on_any_layout(lead, layout, dtype, gen):
    require()
    check_alloc_op(lead, 37, layout, dtype, gen)


def test_alloc_op_rejects_mismatched_up():
    require()
    with pytest.raises(RuntimeError, match=r"up has shape \[3, 7\], gate has shape \[3, 8\]"):
        torch.ops.sgm_ext._act_mul_scale_alloc(torch.randn(3, 8), torch.randn(3, 7), None, None,
                                              "silu")


def test_prechecked_takes_the_compiled_fast_path_only_for_plain_inference(gen, monkeypatch):
    # Plain inference: one call of the compiled allocating op. With gradients flowing the
    # public op runs (the fast path has no autograd), and its gradients are right.
    require()
    from sgm_ext.ops import backends as backends_module
    from sgm_ext.ops import custom_ops as ops
    calls = []
    select_alloc = backends_module.select_alloc

    def spy(device_type):
        fn = select_alloc(device_type)
        return None if fn is None else (lambda *a: calls.append(a) or fn(*a))
    monkeypatch.setattr(backends_module, "select_alloc", spy)
    gate, up = torch.randn(2, 3, 19, generator=gen), torch.randn(2, 3, 19, generator=gen)
    scale = rand_scale(19, gen)
    with torch.no_grad():
        out = ops.act_mul_scale_prechecked(gate, up, scale, None, "silu")
    assert len(calls) == 1
    assert_matches(out, expected(gate, up, "silu", scale))
    gate.requires_grad_(True)
    out = ops.act_mul_scale_prechecked(gate, up, scale, None, "silu")
    assert len(calls) == 1 and out.requires_grad
    out.sum().backward()
    g64 = gate.detach().double().requires_grad_(True)
    expected(g64, up, "silu", scale).sum().backward()
    assert torch.allclose(gate.grad.double(), g64.grad, atol=1e-5, rtol=1e-5)
    monkeypatch.setenv("SGM_EXT_BACKEND", "torch")  # a backend without the allocating op
    with torch.no_grad():
        out = ops.act_mul_scale_prechecked(gate, up, scale, None, "silu")
    assert len(calls) == 1
    assert_matches(out, expected(gate, up, "silu", scale))


# ------------------------------------------------------------------ bad input

@pytest.mark.parametrize("case, message", [
    ("scale_shape", "scale has shape"),
    ("scale_dtype", "scale must be float32"),
    ("up_dtype", "up is"),
    ("strength_shape", "strength has shape"),
    ("act", "unknown activation 'swish'"),
    ("column_stride", "gate must have unit column stride"),
])
def test_bad_input_names_the_entry_and_writes_nothing(case, message):
    require()
    gate, up, scale = torch.randn(3, 8), torch.randn(3, 8), torch.rand(8)
    args = dict(gate=gate, up=up, scale=scale, act="silu")
    if case == "scale_shape":
        args["scale"] = torch.rand(7)
    elif case == "scale_dtype":
        args["scale"] = torch.rand(8, dtype=torch.float16)
    elif case == "up_dtype":
        args["up"] = up.half()
    elif case == "strength_shape":
        args["strength"] = torch.rand(4)
    elif case == "act":
        args["act"] = "swish"  # aliases are resolved in Python; the library takes canonical names
    elif case == "column_stride":
        args["gate"] = torch.randn(8, 3).T
    out = poisoned((3, 8), torch.float32)
    with pytest.raises(RuntimeError, match=message):
        run_cpu(out=out, **args)
    assert out.isnan().all()


# ------------------------------------------------------------- static report of the CUDA kernels

def test_cuda_static_report():
    require(cuda=True)
    report = cuda_static.cuda_kernel_report(compiled.library_path())
    archs = sorted({r["arch"] for r in report})
    wanted = os.environ.get("SGM_EXT_CUDA_ARCHS", "8.0;9.0")
    assert archs == sorted(f"sm_{a.strip().replace('.', '')}" for a in wanted.split(";")), archs
    for arch in archs:
        names = [cuda_static.short_name(r["kernel"]) for r in report if r["arch"] == arch]
        # every data type x activation, each with a 16-byte-vector and a scalar instance
        assert len(names) == len(set(names)) == 4 * len(ACTS) * 2, names
    for r in report:
        name = cuda_static.short_name(r["kernel"])
        where = f"{r['arch']} {name}"
        assert r["stack_bytes"] == 0 and r["spill_bytes"] == 0, where
        assert 0 < r["registers"] <= 128, where
        vec = int(name.rsplit(",", 1)[1].rstrip(">"))
        wide_loads = sum(n for op, n in r["global_access"].items() if op.startswith("LDG.E.128"))
        wide_stores = sum(n for op, n in r["global_access"].items() if op.startswith("STG.E.128"))
        if vec > 1:  # gate, up, scale, gate_scale: 16-byte loads; out: 16-byte stores
            assert wide_loads >= 4 and wide_stores >= 1, (where, r["global_access"])
        else:
            assert wide_loads == wide_stores == 0, (where, r["global_access"])
