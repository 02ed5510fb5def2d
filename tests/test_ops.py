"""The public ops on every backend that runs on CPU here, against float64 references."""
import os

import pytest
import torch
from op_cases import (
    GEMM_VARIANTS,
    VARIANTS,
    rand,
    rand_scale,
    rand_strength,
    variant_id,
)
from reference64 import assert_matches, expected

import sgm_ext
from sgm_ext.ops.backends import select, selected

CPU_BACKENDS = [n for n, i in sgm_ext.backends().items() if i.available and "cpu" in i.devices]
GEMM_BACKENDS = [n for n in CPU_BACKENDS if "gated_up_proj" in sgm_ext.backends()[n].ops]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTS = sgm_ext.ACTIVATIONS


def test_backends_expected_here_are_present():
    # The matrices below run on whatever backends load; make sure that is not silently less
    # than it should be (conftest turns the Triton interpreter on).
    info = sgm_ext.backends()
    assert set(info) == {"cuda", "triton", "cpu", "torch"}
    assert "torch" in CPU_BACKENDS
    assert "triton" in CPU_BACKENDS, info["triton"].reason
    if os.environ.get("CI") == "true":  # CI builds sgm_ext._C: its CPU kernels must load there
        assert "cpu" in CPU_BACKENDS, info["cpu"].reason
    assert set(info["torch"].ops) == {"act_mul_scale", "gated_up_proj"}
    for name, i in info.items():
        assert i.available or i.reason, f"{name} unavailable without a reason"


@pytest.fixture(params=CPU_BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SGM_EXT_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_mul_scale_matches_float64(backend, dtype, act, variant, gen):
    lead, n, layout, has_scale, has_gs, st_kind = variant
    scale = rand_scale(n, gen) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen)) if has_gs else None
    strength = rand_strength(st_kind, lead, gen)
    if layout == "packed":
        gate_up = rand((*lead, 2 * n), dtype, "contiguous", gen)
        out = sgm_ext.act_mul_scale_packed(gate_up, scale, act=act, gate_scale=gate_scale,
                                           strength=strength)
        gate, up = gate_up[..., :n], gate_up[..., n:]
    else:
        gate, up = rand((*lead, n), dtype, layout, gen), rand((*lead, n), dtype, layout, gen)
        out = sgm_ext.act_mul_scale(gate, up, scale, act=act, gate_scale=gate_scale,
                                    strength=strength)
    assert out.dtype == dtype
    assert_matches(out, expected(gate, up, act, scale, gate_scale, strength))


@pytest.mark.parametrize("variant", [((7,), 37, "contiguous", True, False, None),
                                     ((3, 5), 1029, "strided", True, False, "rows"),
                                     ((2, 3, 4), 130, "transposed", False, False, 0.4),
                                     ((2, 3), 130, "contiguous", True, False, 0.25)],
                         ids=variant_id)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_scale_matches_float64(backend, dtype, act, variant, gen):
    lead, n, layout, has_scale, _, st_kind = variant
    x = rand((*lead, n), dtype, layout, gen)
    scale = rand_scale(n, gen) if has_scale else None
    strength = rand_strength(st_kind, lead, gen)
    out = sgm_ext.act_scale(x, scale, act=act, strength=strength)
    assert_matches(out, expected(x, None, act, scale, None, strength))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "non_gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_writes_every_output_element(backend, dtype, gated, gen):
    # Call the backend on a NaN-poisoned output: any element it skips stays NaN.
    rows, n = 5, 1029
    gate, up = rand((rows, n), dtype, "strided", gen), rand((rows, n), dtype, "strided", gen)
    scale, strength = rand_scale(n, gen), torch.rand(rows, generator=gen)
    out = torch.full((rows, n), float("nan"), dtype=dtype)
    fn = select("act_mul_scale", "cpu")
    fn(out, gate, up if gated else None, scale, None, strength, None, "silu")
    assert_matches(out, expected(gate, up if gated else None, "silu", scale, None, strength))


def test_gated_up_proj_writes_every_output_element(gen):
    for name in GEMM_BACKENDS:
        os.environ["SGM_EXT_BACKEND"] = name
        try:
            fn = select("gated_up_proj", "cpu")
        finally:
            del os.environ["SGM_EXT_BACKEND"]
        x = torch.randn(19, 40, generator=gen)
        wg, wu = torch.randn(70, 40, generator=gen) / 6, torch.randn(70, 40, generator=gen) / 6
        out = torch.full((19, 70), float("nan"))
        fn(out, x, wg, wu, None, None, None, None, "gelu")
        assert_matches(out, expected(x.double() @ wg.double().T, x.double() @ wu.double().T,
                                     "gelu"),
                       atol=1e-4, rtol=1e-4)




# Not generated: triton x bf16, whose tl.dot the Triton interpreter computes wrongly (DESIGN.md
# 5); the bf16 kernel is checked by the static GPU report only.
GEMM_CASES = [(name, dtype) for name in GEMM_BACKENDS for dtype in DTYPES
              if not (name == "triton" and dtype == torch.bfloat16)]


@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=lambda v: f"{v[0]}-H{v[1]}-I{v[2]}-{v[3]}")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize(("name", "dtype"), GEMM_CASES, ids=str)
def test_gated_up_proj_matches_float64(name, dtype, act, variant, gen, monkeypatch):
    monkeypatch.setenv("SGM_EXT_BACKEND", name)
    lead, h, n, layout, w_transposed, has_scale, has_gs, st_kind = variant
    x = rand((*lead, h), dtype, layout, gen)
    if w_transposed:
        wg = (torch.randn(h, n, generator=gen) / h ** 0.5).to(dtype).T
        wu = (torch.randn(h, n, generator=gen) / h ** 0.5).to(dtype).T
    else:
        wg = (torch.randn(n, h, generator=gen) / h ** 0.5).to(dtype)
        wu = (torch.randn(n, h, generator=gen) / h ** 0.5).to(dtype)
    scale = rand_scale(n, gen) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen)) if has_gs else None
    strength = rand_strength(st_kind, lead, gen)
    out = sgm_ext.gated_up_proj(x, wg, wu, scale, act=act, gate_scale=gate_scale, strength=strength)
    x64 = x.double()
    ref = expected(x64 @ wg.double().T, x64 @ wu.double().T, act, scale, gate_scale, strength)
    # fp32 accumulation over H terms on top of the output rounding
    assert_matches(out, ref, atol=1e-4, rtol=1e-4 if dtype == torch.float32 else None)


# ------------------------------------------------------------------ strength semantics

def test_strength_edge_values_are_exact(backend, gen):
    gate, up = torch.randn(4, 6, 50, generator=gen), torch.randn(4, 6, 50, generator=gen)
    scale = rand_scale(50, gen)
    plain = sgm_ext.act_mul_scale(gate, up)
    # strength 0 is a no-op and strength 1 is the scale itself, bit for bit
    assert torch.equal(sgm_ext.act_mul_scale(gate, up, scale, strength=0.0), plain)
    assert torch.equal(sgm_ext.act_mul_scale(gate, up, scale, strength=1.0),
                       sgm_ext.act_mul_scale(gate, up, scale))
    # scale 1 everywhere changes nothing
    assert torch.equal(sgm_ext.act_mul_scale(gate, up, torch.ones(50)), plain)
    # the public op maps strength 1.0 to "no strength" before any kernel; the kernels must
    # give the scale bit for bit when they are handed a strength of exactly 1 themselves
    fn = select("act_mul_scale", "cpu")
    g2, u2 = gate.reshape(-1, 50), up.reshape(-1, 50)
    by_value, by_rows, unscaled = (torch.full((24, 50), float("nan")) for _ in range(3))
    fn(by_value, g2, u2, scale, None, None, 1.0, "silu")
    fn(by_rows, g2, u2, scale, None, torch.ones(24), None, "silu")
    fn(unscaled, g2, u2, scale, None, None, None, "silu")
    assert torch.equal(by_value, unscaled) and torch.equal(by_rows, unscaled)


def test_per_sequence_strength_equals_uniform_strength(backend, gen):
    # Sequence b of a batch with per-sequence strengths is bit for bit sequence b of the same
    # batch run at strength[b] for all. (Same shapes on both sides: torch's own CPU math may
    # differ in the last bit between a vector body and its scalar tail.)
    gate, up = torch.randn(3, 5, 50, generator=gen), torch.randn(3, 5, 50, generator=gen)
    scale = rand_scale(50, gen)
    strengths = [0.0, 0.35, 1.0]
    batched = sgm_ext.act_mul_scale(gate, up, scale, strength=torch.tensor(strengths)[:, None])
    for b, st in enumerate(strengths):
        uniform = sgm_ext.act_mul_scale(gate, up, scale, strength=st)
        assert torch.equal(batched[b], uniform[b]), f"sequence {b} (strength {st})"


def test_empty_input(backend):
    out = sgm_ext.act_mul_scale(torch.empty(0, 8), torch.empty(0, 8), torch.ones(8))
    assert out.shape == (0, 8)


# ------------------------------------------------------------------ gradients

def _grad_inputs(gen, lead=(2, 3), n=5):
    # keep |gate| away from 0, where relu's derivative jumps
    g = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    g = g.sign() * (0.1 + g.abs())
    up = torch.randn(*lead, n, generator=gen, dtype=torch.float64)
    scale = 0.1 + 0.8 * torch.rand(n, generator=gen, dtype=torch.float64)
    gate_scale = 0.5 + torch.rand(n, generator=gen, dtype=torch.float64)
    strength = torch.rand(lead[0], 1, generator=gen, dtype=torch.float64)
    return [t.requires_grad_() for t in (g, up, scale, gate_scale, strength)]


@pytest.mark.parametrize("act", ACTS)
def test_act_mul_scale_gradcheck(backend, act, gen):
    g, up, scale, gs, st = _grad_inputs(gen)
    assert torch.autograd.gradcheck(
        lambda g, u, s, gs, st: sgm_ext.act_mul_scale(g, u, s, act=act, gate_scale=gs, strength=st),
        (g, up, scale, gs, st))
    assert torch.autograd.gradcheck(
        lambda g, u, s: sgm_ext.act_mul_scale(g, u, s, act=act, strength=0.6), (g, up, scale))


def test_packed_and_non_gated_gradcheck(backend, gen):
    g, up, scale, gs, st = _grad_inputs(gen)
    gate_up = torch.cat([g, up], -1).detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, s, gs, st: sgm_ext.act_mul_scale_packed(x, s, act="gelu_tanh", gate_scale=gs,
                                                          strength=st),
        (gate_up, scale, gs, st))
    assert torch.autograd.gradcheck(
        lambda x, s, st: sgm_ext.act_scale(x, s, act="quick_gelu", strength=st), (g, scale, st))
    assert torch.autograd.gradcheck(lambda x, s: sgm_ext.act_scale(x, s, act="gelu"), (g, scale))


@pytest.mark.parametrize("name", GEMM_BACKENDS)
def test_gated_up_proj_gradcheck(name, gen, monkeypatch):
    monkeypatch.setenv("SGM_EXT_BACKEND", name)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(2, 3, 4, **f64).requires_grad_()
    wg, wu = torch.randn(5, 4, **f64).requires_grad_(), torch.randn(5, 4, **f64).requires_grad_()
    _, _, scale, gs, st = _grad_inputs(gen)
    assert torch.autograd.gradcheck(
        lambda x, wg, wu, s, gs, st: sgm_ext.gated_up_proj(x, wg, wu, s, act="silu", gate_scale=gs,
                                                           strength=st),
        (x, wg, wu, scale, gs, st))


# ------------------------------------------------------------------ torch.library contracts

def _opcheck_cases(dtype):
    g = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    u = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    s = torch.rand(6, requires_grad=True)
    st = torch.rand(6, requires_grad=True)
    x = torch.randn(2, 3, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    ops = torch.ops.sgm_ext
    return [
        (ops.act_mul_scale.default, (g, u, s, st, None, None, "silu")),
        (ops.act_mul_scale.default, (g, u, s, None, st, None, "gelu")),
        (ops.act_mul_scale.default, (g, u, s, None, None, 0.5, "relu")),
        (ops.act_mul_scale_packed.default,
         (torch.randn(2, 3, 12, dtype=dtype, requires_grad=True), s, None, None, None,
          "gelu_tanh")),
        (ops.act_scale.default, (g, s, torch.rand(6, requires_grad=True), None, "quick_gelu")),
        (ops.gated_up_proj.default,
         (x, w, w.detach().clone().requires_grad_(), s, st, None, 0.3, "silu")),
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(backend, dtype):
    has_gemm = "gated_up_proj" in sgm_ext.backends()[backend].ops
    for op, args in _opcheck_cases(dtype):
        if op is torch.ops.sgm_ext.gated_up_proj.default and not has_gemm:
            continue  # a forced backend without the op refuses it (tested below)
        torch.library.opcheck(op, args)


def _compile_cases(gen):
    g, u = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    s, gs = rand_scale(24, gen), 0.5 + rand_scale(24, gen)
    st = torch.rand(2, 1, generator=gen)
    x, w1, w2 = torch.randn(2, 5, 16, generator=gen), torch.randn(24, 16, generator=gen), \
        torch.randn(24, 16, generator=gen)
    return {
        "act_mul_scale": (lambda g, u, s, gs, st: sgm_ext.act_mul_scale(
            g, u, s, act="gelu_pytorch_tanh", gate_scale=gs, strength=st), (g, u, s, gs, st)),
        "act_mul_scale_packed": (lambda gu, s: sgm_ext.act_mul_scale_packed(gu, s, strength=0.5),
                                 (torch.cat([g, u], -1), s)),
        "act_scale": (lambda x, s, st: sgm_ext.act_scale(x, s, act="quick_gelu", strength=st),
                      (g, s, st)),
        "gated_up_proj": (lambda x, a, b, s: sgm_ext.gated_up_proj(x, a, b, s, act="swish"),
                          (x, w1, w2, s)),
    }


@pytest.mark.parametrize("op", ["act_mul_scale", "act_mul_scale_packed", "act_scale",
                                "gated_up_proj"])
def test_torch_compile_fullgraph(op, gen):
    fn, args = _compile_cases(gen)[op]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    # a graph around the op: the op must not break it
    assert torch.equal(compiled(*args), fn(*args))
    leaves = [a.detach().requires_grad_() for a in args]
    compiled(*leaves).square().sum().backward()
    eager = [a.detach().requires_grad_() for a in args]
    fn(*eager).square().sum().backward()
    # float32 gradients: the compiled backward's GEMMs may sum in another order than eager's
    # (gated_up_proj's weight grads: seen 2.9e-5 relative on one element of fresh inputs), so
    # the tolerance is float32 GEMM rounding, not assert_close's elementwise default
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ bad input

def _bad_calls():
    g, u, s = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.rand(8)
    x, w = torch.randn(3, 4), torch.randn(8, 4)
    return [
        (lambda: sgm_ext.act_mul_scale(g, u, act="swishy"), ValueError,
         "unknown activation 'swishy'"),
        (lambda: sgm_ext.act_mul_scale(g, u[..., :7]), ValueError, "up has shape"),
        (lambda: sgm_ext.act_mul_scale(g, u.half()), ValueError, "up is torch.float16"),
        (lambda: sgm_ext.act_mul_scale(g, u, s[:7]), ValueError, r"scale has shape \(7,\)"),
        (lambda: sgm_ext.act_mul_scale(g, u, s.half()), TypeError, "scale must be float32"),
        (lambda: sgm_ext.act_mul_scale(g, u, gate_scale=torch.rand(2, 8)), ValueError,
         "gate_scale has shape"),
        (lambda: sgm_ext.act_mul_scale(g.long(), u.long()), TypeError,
         "gate has dtype torch.int64"),
        (lambda: sgm_ext.act_mul_scale(g, u, s, strength=torch.rand(3)), ValueError,
         "does not broadcast"),
        (lambda: sgm_ext.act_mul_scale(g, u, s, strength="high"), TypeError, "strength must be"),
        (lambda: sgm_ext.act_mul_scale_packed(torch.randn(2, 9)), ValueError,
         "packed layout needs 2"),
        (lambda: sgm_ext.act_scale(g, s[:3], act="gelu"), ValueError, "scale has shape"),
        (lambda: sgm_ext.gated_up_proj(x, w[:, :3], w), ValueError, "w_gate has shape"),
        (lambda: sgm_ext.gated_up_proj(x, w, w[:7]), ValueError, "w_up has shape"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_clear_error(case):
    call, exc, message = _bad_calls()[case]
    with pytest.raises(exc, match=message):
        call()


def test_forced_backend_errors(monkeypatch):
    g = torch.randn(2, 8)
    monkeypatch.setenv("SGM_EXT_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="'nonsense' is not a backend"):
        sgm_ext.act_mul_scale(g, g)
    monkeypatch.setenv("SGM_EXT_BACKEND", "cuda")  # no GPU here: unavailable, named in the error
    with pytest.raises(RuntimeError, match="SGM_EXT_BACKEND=cuda"):
        sgm_ext.act_mul_scale(g, g)
    for name in CPU_BACKENDS:
        if "gated_up_proj" not in sgm_ext.backends()[name].ops:
            monkeypatch.setenv("SGM_EXT_BACKEND", name)
            with pytest.raises(RuntimeError,
                               match=f"SGM_EXT_BACKEND={name}: backend has no gated_up_proj"):
                sgm_ext.gated_up_proj(g, torch.randn(3, 8), torch.randn(3, 8))


def test_default_choice_on_cpu_never_picks_the_interpreter():
    expected_name = "cpu" if "cpu" in CPU_BACKENDS else "torch"
    assert selected("act_mul_scale", "cpu") == expected_name
    assert selected("gated_up_proj", "cpu") == "torch"


def test_inference_fast_path_equals_the_registered_op(backend, gen):
    # Without grad the public ops call their implementation directly; through the dispatcher
    # (grad enabled on a requires-grad input) the result must be the same bits.
    gate, up = torch.randn(3, 5, 40, generator=gen), torch.randn(3, 5, 40, generator=gen)
    scale = rand_scale(40, gen)
    with torch.no_grad():
        fast = sgm_ext.act_mul_scale(gate, up, scale, strength=0.5)
    via_op = sgm_ext.act_mul_scale(gate.requires_grad_(), up, scale, strength=0.5)
    assert via_op.grad_fn is not None and fast.grad_fn is None
    assert torch.equal(fast, via_op.detach())


# ------------------------------------------------------------------ shifts (affine sites)

def rand_shift(n, gen):
    b = torch.randn(n, generator=gen)
    b[0] = 0.0
    return b


# (leading dims, I, layout, scale?, gate_scale?, strength) with a shift on every one
SHIFT_VARIANTS = VARIANTS + [
    ((3, 5), 130, "contiguous", False, False, "rows"),  # a shift alone, per-row strength
    ((7,), 37, "strided", False, True, 0.4),
]


@pytest.mark.parametrize("variant", SHIFT_VARIANTS, ids=variant_id)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_matches_float64(backend, dtype, act, variant, gen):
    lead, n, layout, has_scale, has_gs, st_kind = variant
    scale = rand_scale(n, gen) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen)) if has_gs else None
    shift = rand_shift(n, gen)
    strength = rand_strength(st_kind, lead, gen)
    kw = dict(act=act, gate_scale=gate_scale, strength=strength, shift=shift)
    if layout == "packed":
        gate_up = rand((*lead, 2 * n), dtype, "contiguous", gen)
        out = sgm_ext.act_mul_scale_packed(gate_up, scale, **kw)
        gate, up = gate_up[..., :n], gate_up[..., n:]
    else:
        gate, up = rand((*lead, n), dtype, layout, gen), rand((*lead, n), dtype, layout, gen)
        out = sgm_ext.act_mul_scale(gate, up, scale, **kw)
    assert out.dtype == dtype
    assert_matches(out, expected(gate, up, act, scale, gate_scale, strength, shift))
    if gate_scale is None:  # the non-gated op on the gate input
        x_out = sgm_ext.act_scale(gate, scale, act=act, strength=strength, shift=shift)
        assert_matches(x_out, expected(gate, None, act, scale, None, strength, shift))


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "non_gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_with_a_shift_writes_every_output_element(backend, dtype, gated, gen):
    rows, n = 5, 1029
    gate, up = rand((rows, n), dtype, "padded", gen), rand((rows, n), dtype, "padded", gen)
    scale, strength, shift = rand_scale(n, gen), torch.rand(rows, generator=gen), \
        rand_shift(n, gen)
    fn = select("act_mul_scale", "cpu")
    for st, sv in ((strength, None), (None, 0.7), (None, None)):
        out = torch.full((rows, n), float("nan"), dtype=dtype)
        fn(out, gate, up if gated else None, scale, None, st, sv, "silu", shift)
        assert_matches(out, expected(gate, up if gated else None, "silu", scale, None,
                                     st if st is not None else sv, shift))


def test_shift_strength_edges_and_per_sequence_are_exact(backend, gen):
    gate, up = torch.randn(3, 5, 50, generator=gen), torch.randn(3, 5, 50, generator=gen)
    scale, shift = rand_scale(50, gen), rand_shift(50, gen)
    plain = sgm_ext.act_mul_scale(gate, up)
    assert torch.equal(sgm_ext.act_mul_scale(gate, up, scale, strength=0.0, shift=shift), plain)
    assert torch.equal(sgm_ext.act_mul_scale(gate, up, scale, strength=1.0, shift=shift),
                       sgm_ext.act_mul_scale(gate, up, scale, shift=shift))
    strengths = [0.0, 0.35, 1.0]
    batched = sgm_ext.act_mul_scale(gate, up, scale, shift=shift,
                                    strength=torch.tensor(strengths)[:, None])
    for b, st in enumerate(strengths):
        uniform = sgm_ext.act_mul_scale(gate, up, scale, strength=st, shift=shift)
        assert torch.equal(batched[b], uniform[b]), f"sequence {b} (strength {st})"


def test_shift_gradcheck(backend, gen):
    g, up, scale, gs, st = _grad_inputs(gen)
    shift = torch.randn(5, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g, u, s, gs, st, b: sgm_ext.act_mul_scale(g, u, s, act="silu", gate_scale=gs,
                                                         strength=st, shift=b),
        (g, up, scale, gs, st, shift))
    assert torch.autograd.gradcheck(
        lambda g, u, b: sgm_ext.act_mul_scale(g, u, act="gelu", strength=0.6, shift=b),
        (g, up, shift))
    gate_up = torch.cat([g, up], -1).detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, st, b: sgm_ext.act_mul_scale_packed(x, act="relu", strength=st, shift=b),
        (gate_up, st, shift))
    assert torch.autograd.gradcheck(
        lambda x, s, b: sgm_ext.act_scale(x, s, act="quick_gelu", shift=b), (g, scale, shift))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_shift_opcheck(backend, dtype):
    g = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    u = torch.randn(2, 3, 6, dtype=dtype, requires_grad=True)
    s, b = torch.rand(6, requires_grad=True), torch.randn(6, requires_grad=True)
    rows = torch.rand(6, requires_grad=True)
    ops = torch.ops.sgm_ext
    for op, args in [
        (ops.act_mul_scale.default, (g, u, s, None, rows, None, "silu", b)),
        (ops.act_mul_scale.default, (g, u, None, None, None, 0.5, "gelu", b)),
        (ops.act_mul_scale_packed.default,
         (torch.randn(2, 3, 12, dtype=dtype, requires_grad=True), s, None, None, None, "relu", b)),
        (ops.act_scale.default, (g, s, rows, None, "quick_gelu", b)),
    ]:
        torch.library.opcheck(op, args)


def test_shift_torch_compile_fullgraph(gen):
    g, u = torch.randn(2, 5, 24, generator=gen), torch.randn(2, 5, 24, generator=gen)
    s, b, st = rand_scale(24, gen), rand_shift(24, gen), torch.rand(2, 1, generator=gen)

    def fn(g, u, s, b, st):
        return sgm_ext.act_mul_scale(g, u, s, act="silu", strength=st, shift=b) + \
            sgm_ext.act_scale(g, None, act="gelu", shift=b)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    args = (g, u, s, b, st)
    assert torch.equal(compiled(*args), fn(*args))
    leaves = [a.detach().requires_grad_() for a in args]
    compiled(*leaves).square().sum().backward()
    eager = [a.detach().requires_grad_() for a in args]
    fn(*eager).square().sum().backward()
    for a, e in zip(leaves, eager):
        torch.testing.assert_close(a.grad, e.grad)


def test_bad_shift_is_named():
    g = torch.randn(2, 8)
    with pytest.raises(ValueError, match=r"shift has shape \(7,\)"):
        sgm_ext.act_mul_scale(g, g, shift=torch.zeros(7))
    with pytest.raises(TypeError, match="shift must be float32"):
        sgm_ext.act_scale(g, act="silu", shift=torch.zeros(8, dtype=torch.float16))
