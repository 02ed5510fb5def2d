"""The ops and a patched model on a CUDA GPU: every backend that runs there (the compiled `cuda`
kernels, Triton compiled for the GPU, torch) against the float64 references of test_ops.

CI has no GPU, so this whole file is skipped there. On a GPU machine scripts/test.sh (through
scripts/run_tests.sh) runs it in a pytest run of its own with the Triton interpreter off and
SGM_EXT_GPU_RUN=1, under which conftest.py turns every skip into a failure: nothing in it may
skip there (no GPU, a backend missing), and the backends it needs are asserted present.
scripts/gpu_check.sh runs it too, beside the GPU benchmarks.
"""
import importlib
import os

import pytest
import torch
from op_cases import (
    GEMM_VARIANTS,
    VARIANTS,
    check_alloc_op,
    rand,
    rand_scale,
    rand_strength,
    variant_id,
)
from reference64 import assert_matches, expected

import sgm_ext
from sgm_ext.ops.backends import select, selected

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")

DEV = "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_BACKENDS = [n for n, i in sgm_ext.backends().items() if i.available and DEV in i.devices]


def test_gpu_backends_present():
    info = sgm_ext.backends()
    assert os.environ.get("TRITON_INTERPRET") != "1", "run with TRITON_INTERPRET=0 on a GPU"
    assert "cuda" in GPU_BACKENDS, info["cuda"].reason  # sgm_ext._C built with its CUDA part
    assert "triton" in GPU_BACKENDS, info["triton"].reason
    assert "torch" in GPU_BACKENDS
    assert info["triton"].devices == ("cuda",)  # compiled for the GPU, not interpreted
    # the default choice on CUDA tensors: the compiled kernels, Triton for the fused GEMM
    assert selected("act_mul_scale", DEV) == "cuda"
    assert selected("gated_up_proj", DEV) == "triton"


@pytest.fixture(params=GPU_BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SGM_EXT_BACKEND", request.param)
    return request.param


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("act", sgm_ext.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_mul_scale_matches_float64(backend, dtype, act, variant, gen):
    lead, n, layout, has_scale, has_gs, st_kind = variant
    scale = rand_scale(n, gen, device=DEV) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen, device=DEV)) if has_gs else None
    strength = rand_strength(st_kind, lead, gen, device=DEV)
    if layout == "packed":
        gate_up = rand((*lead, 2 * n), dtype, "contiguous", gen, DEV)
        out = sgm_ext.act_mul_scale_packed(gate_up, scale, act=act, gate_scale=gate_scale,
                                           strength=strength)
        gate, up = gate_up[..., :n], gate_up[..., n:]
    else:
        gate = rand((*lead, n), dtype, layout, gen, DEV)
        up = rand((*lead, n), dtype, layout, gen, DEV)
        out = sgm_ext.act_mul_scale(gate, up, scale, act=act, gate_scale=gate_scale,
                                    strength=strength)
    assert out.device.type == DEV and out.dtype == dtype
    assert_matches(out, expected(gate, up, act, scale, gate_scale, strength))


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shift_matches_float64(backend, dtype, variant, gen):
    # an affine site's shift (AcT): out = act(g gs) u s_eff + strength shift, every layout
    lead, n, layout, has_scale, has_gs, st_kind = variant
    scale = rand_scale(n, gen, device=DEV) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen, device=DEV)) if has_gs else None
    shift = torch.randn(n, generator=gen).to(DEV)
    strength = rand_strength(st_kind, lead, gen, device=DEV)
    kw = dict(act="silu", gate_scale=gate_scale, strength=strength, shift=shift)
    if layout == "packed":
        gate_up = rand((*lead, 2 * n), dtype, "contiguous", gen, DEV)
        out = sgm_ext.act_mul_scale_packed(gate_up, scale, **kw)
        gate, up = gate_up[..., :n], gate_up[..., n:]
    else:
        gate = rand((*lead, n), dtype, layout, gen, DEV)
        up = rand((*lead, n), dtype, layout, gen, DEV)
        out = sgm_ext.act_mul_scale(gate, up, scale, **kw)
    assert out.device.type == DEV and out.dtype == dtype
    assert_matches(out, expected(gate, up, "silu", scale, gate_scale, strength, shift))
    x_out = sgm_ext.act_scale(gate, scale, act="gelu", strength=strength, shift=shift)
    assert_matches(x_out, expected(gate, None, "gelu", scale, None, strength, shift))


@pytest.mark.parametrize("act", sgm_ext.ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_act_scale_matches_float64(backend, dtype, act, gen):
    for lead, n, layout, st_kind in [((7,), 37, "contiguous", None),
                                     ((3, 5), 1029, "strided", "rows"),
                                     ((2, 3, 4), 130, "transposed", 0.4)]:
        x = rand((*lead, n), dtype, layout, gen, DEV)
        scale = rand_scale(n, gen, device=DEV)
        strength = rand_strength(st_kind, lead, gen, device=DEV)
        assert_matches(sgm_ext.act_scale(x, scale, act=act, strength=strength),
                       expected(x, None, act, scale, None, strength))


@pytest.mark.parametrize("shape", [(5, 1029), (3, 11008), (2, 8), (1, 7)], ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "strided", "padded"])
@pytest.mark.parametrize("gated", [True, False], ids=["gated", "non_gated"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backend_writes_every_output_element(backend, dtype, gated, layout, shape, gen):
    # NaN-poisoned output: an element the kernel skips (vector body, scalar tail, unaligned
    # path) stays NaN. 11008 rows are 16-byte aligned in every dtype; 1029 and 7 are not.
    # "padded" ([R, 1040][:, :1029], the output too): every row starts aligned, every row
    # stride is a multiple of the vector and the width is not, so the CUDA kernel takes its
    # vector path and then the ragged tail, which no other layout reaches (the kernel goes
    # scalar when any stride, the output's included, is not a multiple of the vector); the
    # padding past the width must stay NaN.
    rows, n = shape
    gate, up = rand(shape, dtype, layout, gen, DEV), rand(shape, dtype, layout, gen, DEV)
    scale, strength = rand_scale(n, gen, device=DEV), torch.rand(rows, generator=gen).to(DEV)
    width = gate.stride(0) if layout == "padded" else n
    out_buf = torch.full((rows, width), float("nan"), dtype=dtype, device=DEV)
    out = out_buf[:, :n]
    select("act_mul_scale", DEV)(out, gate, up if gated else None, scale, None, strength, None,
                                 "silu")
    assert_matches(out, expected(gate, up if gated else None, "silu", scale, None, strength))
    assert out_buf[:, n:].isnan().all()


def test_output_rounds_to_nearest_even(backend, gen):
    # On the GPU both kernels store fp32 results with round-to-nearest-even (the interpreter
    # truncates): the output must equal the float64 reference rounded through fp32.
    for dtype in (torch.float16, torch.bfloat16):
        gate = rand((64, 1029), dtype, "contiguous", gen, DEV)
        up = rand((64, 1029), dtype, "contiguous", gen, DEV)
        scale = rand_scale(1029, gen, device=DEV)
        out = sgm_ext.act_mul_scale(gate, up, scale)
        want = expected(gate, up, "silu", scale).float().to(dtype)
        # fp32 math differs from float64 in the last fp32 bits, which can flip a rounding
        # tie-break; anything more than one output ulp apart would be truncation or worse
        mismatch = (out != want).float().mean().item()
        assert mismatch < 0.01, f"{dtype}: {mismatch:.2%} of outputs differ from round-to-nearest"


@pytest.mark.parametrize("variant", GEMM_VARIANTS, ids=lambda v: f"{v[0]}-H{v[1]}-I{v[2]}-{v[3]}")
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gated_up_proj_matches_float64(dtype, act, variant, gen):
    # Triton compiled for the GPU: bf16 dots are checked here (the interpreter gets them wrong)
    lead, h, n, layout, w_transposed, has_scale, has_gs, st_kind = variant
    x = rand((*lead, h), dtype, layout, gen, DEV)
    shape = (h, n) if w_transposed else (n, h)
    wg, wu = ((torch.randn(shape, generator=gen) / h ** 0.5).to(DEV, dtype) for _ in range(2))
    if w_transposed:
        wg, wu = wg.T, wu.T
    scale = rand_scale(n, gen, device=DEV) if has_scale else None
    gate_scale = (0.5 + rand_scale(n, gen, device=DEV)) if has_gs else None
    strength = rand_strength(st_kind, lead, gen, device=DEV)
    out = sgm_ext.gated_up_proj(x, wg, wu, scale, act=act, gate_scale=gate_scale, strength=strength)
    x64 = x.double()
    ref = expected(x64 @ wg.double().T, x64 @ wu.double().T, act, scale, gate_scale, strength)
    assert_matches(out, ref, atol=1e-4, rtol=1e-4 if dtype == torch.float32 else None)


@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gated_up_proj_at_llama_sizes(dtype, tokens, gen):
    # Llama-7B's MLP widths, with many K tiles: the accumulation must stay fp32.
    h, n = 4096, 11008
    x = torch.randn(tokens, h, generator=gen).to(DEV, dtype)
    wg, wu = ((torch.randn(n, h, generator=gen) / h ** 0.5).to(DEV, dtype) for _ in range(2))
    scale = rand_scale(n, gen, device=DEV)
    out = sgm_ext.gated_up_proj(x, wg, wu, scale)
    x64 = x.double()
    ref = expected(x64 @ wg.double().T, x64 @ wu.double().T, "silu", scale)
    assert_matches(out, ref, atol=1e-3)


def test_gradcheck_on_gpu(backend, gen):
    f64 = dict(dtype=torch.float64, device=DEV)
    g = torch.randn(2, 3, 5, generator=gen).to(**f64)
    g = (g.sign() * (0.1 + g.abs())).requires_grad_()
    up = torch.randn(2, 3, 5, generator=gen).to(**f64).requires_grad_()
    scale = (0.1 + 0.8 * torch.rand(5, generator=gen)).to(**f64).requires_grad_()
    st = torch.rand(2, 1, generator=gen).to(**f64).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda g, u, s, st: sgm_ext.act_mul_scale(g, u, s, act="gelu_tanh", strength=st),
        (g, up, scale, st))


def test_torch_compile_fullgraph_on_gpu(gen):
    g, u = (torch.randn(2, 5, 24, generator=gen).to(DEV) for _ in range(2))
    s = rand_scale(24, gen, device=DEV)
    x, w1, w2 = (torch.randn(*shape, generator=gen).to(DEV, torch.bfloat16)
                 for shape in ((2, 5, 16), (24, 16), (24, 16)))
    cases = [(lambda g, u, s: sgm_ext.act_mul_scale(g, u, s, strength=0.5) * 2, (g, u, s)),
             (lambda x, a, b, s: sgm_ext.gated_up_proj(x, a, b, s) + 1, (x, w1, w2, s))]
    for fn, args in cases:
        torch._dynamo.reset()
        assert torch.equal(torch.compile(fn, fullgraph=True)(*args), fn(*args))


# Only the pairs that exist (cuda and torch have no gated_up_proj): in the GPU run a skip is a
# failure (conftest.py), so no case may be generated that cannot run.
GRAPH_CASES = [(b, op) for b in GPU_BACKENDS for op in ("act_mul_scale", "gated_up_proj")
               if op in sgm_ext.backends()[b].ops]


@pytest.mark.parametrize("backend, op", GRAPH_CASES)
def test_cuda_graph_capture(backend, op, gen, monkeypatch):
    # Capture runs on a side stream and fails on any host synchronisation: the kernels must
    # launch on the current stream and never sync. Replays with new inputs must follow them.
    monkeypatch.setenv("SGM_EXT_BACKEND", backend)
    if op == "act_mul_scale":
        a, b = (torch.randn(16, 1029, generator=gen).to(DEV, torch.bfloat16) for _ in range(2))
        s = rand_scale(1029, gen, device=DEV)
        st = torch.rand(16, generator=gen).to(DEV)  # one strength per row

        def fn():
            return sgm_ext.act_mul_scale(a, b, s, strength=st)
    else:
        a = torch.randn(16, 96, generator=gen).to(DEV, torch.bfloat16)
        b = (torch.randn(2, 200, 96, generator=gen) / 10).to(DEV, torch.bfloat16)
        s = rand_scale(200, gen, device=DEV)

        def fn():
            return sgm_ext.gated_up_proj(a, b[0], b[1], s, strength=0.7)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fn()  # warm-up (compiles the Triton kernel) off the default stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = fn()
    for _ in range(2):
        a.copy_(torch.randn(a.shape, generator=gen).to(DEV, a.dtype))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            assert torch.equal(captured, fn())


@pytest.mark.parametrize("layout", ["contiguous", "strided", "padded", "transposed", "packed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_alloc_op_on_gpu(dtype, layout, gen):
    # The compiled allocating op (ops.act_mul_scale_prechecked's fast path) on CUDA tensors.
    check_alloc_op((2, 3), 1029, layout, dtype, gen, DEV)


# ---------------------------------------------------------------- a patched model on the GPU

def _llama(dtype):
    import transformers as T

    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    return T.LlamaForCausalLM(cfg).to(DEV, dtype).eval()


def _mid_scales(model, gen):
    from sgm_ext.patching.registry import find_mlps

    out = {}
    for info in find_mlps(model).values():
        for site, kind in info.sites().items():
            if kind == "mid":
                s = torch.rand(info.site_size(kind), generator=gen) * 0.9 + 0.1
                s[torch.rand(len(s), generator=gen) < 0.3] = 1.0
                out[site] = s
    return out


@pytest.mark.parametrize("gated_up_proj", [False, True], ids=["two_gemms", "gated_up_proj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_patched_model_on_gpu_matches_hook_reference(dtype, gated_up_proj, gen, monkeypatch):
    # With SGM_EXT_GATED_UP_PROJ on, bf16 Linears take the one-kernel GEMM (fp32 ones never).
    monkeypatch.setattr(importlib.import_module("sgm_ext.patching"), "GATED_UP_PROJ", gated_up_proj)
    model = _llama(dtype)
    scales = _mid_scales(model, gen)
    ids = torch.randint(3, 128, (3, 21), generator=gen).to(DEV)
    logits = {}
    for mode in ("hook", "fused", "fold"):
        with sgm_ext.patched(model, scales, mode=mode), torch.no_grad():
            logits[mode] = model(ids).logits.double()
    with torch.no_grad():
        plain = model(ids).logits.double()
    # bf16: different rounding points (one GEMM vs two, fold rounds the weights) move logits
    # by a few bf16 ulps of the largest logit
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    # As test_patch's CPU twin: the scales move the logits by more than 1e-3, and by more than
    # the tolerance below, or a mode that applied no scales at all would pass it (they move
    # them by 0.08-0.16 on this model, fp32 and bf16 alike).
    effect = _rel(logits["hook"], plain)
    assert effect > max(1e-3, tol), f"the scales moved the logits by only {effect:.3g}"
    for mode in ("fused", "fold"):
        rel = _rel(logits[mode], logits["hook"])
        assert rel < tol, f"{mode}: {rel:.3g}"
        if dtype == torch.float32:  # as the twin's equal greedy tokens (bf16 rounding may flip)
            assert torch.equal(logits[mode].argmax(-1), logits["hook"].argmax(-1)), mode


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()
