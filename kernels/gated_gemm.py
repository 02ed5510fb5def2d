"""act((x @ w_gate.T) * gate_scale) * (x @ w_up.T) * s_eff in one kernel.

Each program owns a BLOCK_M x BLOCK_N tile of the [R, I] output. Both products share every
tile of x loaded from memory; the epilogue applies activation, product and scale in
registers, so the gate and up activations ([R, I] each) never reach global memory.
"""
import torch
import triton
import triton.language as tl

from .common import activation, compute_dtype, strength_mode, suppress


@triton.jit
def gated_up_proj_kernel(
    out_ptr, x_ptr, w_gate_ptr, w_up_ptr, scale_ptr, gate_scale_ptr, strength_ptr, strength_value,
    M, N, K, stride_xm, stride_xk, stride_gn, stride_gk, stride_un, stride_uk, stride_om,
    HAS_SCALE: tl.constexpr, HAS_GATE_SCALE: tl.constexpr, STRENGTH_MODE: tl.constexpr,
    ACT: tl.constexpr, COMPUTE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Walk output tiles in column bands GROUP_M tiles tall, so neighbouring programs reuse
    # the same weight tiles from L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_height = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_height
    pid_n = (pid % band) // band_height

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    # 64-bit tile origins (R * H may pass 2**31), 32-bit offsets inside the tile: int64
    # offsets would hide the contiguity the compiler needs for wide, asynchronous loads.
    x_ptrs = (x_ptr + (pid_m * BLOCK_M).to(tl.int64) * stride_xm
              + tl.arange(0, BLOCK_M)[:, None] * stride_xm + ks[None, :] * stride_xk)
    g_ptrs = (w_gate_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_gn
              + tl.arange(0, BLOCK_N)[None, :] * stride_gn + ks[:, None] * stride_gk)
    u_ptrs = (w_up_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_un
              + tl.arange(0, BLOCK_N)[None, :] * stride_un + ks[:, None] * stride_uk)

    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=COMPUTE)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # k * BLOCK_K (not a stepped range variable) keeps the mask's alignment visible to the
        # compiler, which then vectorises the loads and pipelines them through shared memory.
        k_ok = ks < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(g_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        wu = tl.load(u_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc_gate = tl.dot(x, wg, acc_gate, input_precision=DOT_PRECISION, out_dtype=COMPUTE)
        acc_up = tl.dot(x, wu, acc_up, input_precision=DOT_PRECISION, out_dtype=COMPUTE)
        x_ptrs += BLOCK_K * stride_xk
        g_ptrs += BLOCK_K * stride_gk
        u_ptrs += BLOCK_K * stride_uk

    g = acc_gate
    if HAS_GATE_SCALE:
        g = g * tl.load(gate_scale_ptr + cols, mask=col_ok, other=1.0).to(COMPUTE)[None, :]
    h = activation(g, ACT) * acc_up
    scale = 1.0
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=1.0).to(COMPUTE)[None, :]
    strength = 1.0
    if STRENGTH_MODE == 1:
        strength = strength_value
    elif STRENGTH_MODE == 2:
        strength = tl.load(strength_ptr + rows, mask=row_ok, other=1.0).to(COMPUTE)[:, None]
    h = suppress(h, scale, strength, HAS_SCALE, STRENGTH_MODE)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * stride_om + cols[None, :]
    tl.store(out_ptrs, h.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def launch_config(m, dtype):
    """Tile sizes by token count: decode-sized M gets short tiles instead of wasted rows."""
    block_m = 16 if m <= 16 else 64 if m <= 64 else 128
    block_k = 32 if dtype in (torch.float32, torch.float64) else 64
    return dict(BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=block_k, GROUP_M=8,
                num_warps=8 if block_m == 128 else 4, num_stages=3)


def dot_precision(dtype):
    # fp32 inputs get true fp32 products (no silent TF32), matching the torch backend.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def gated_up_proj(out, x, w_gate, w_up, scale, gate_scale, strength, strength_value, act):
    """out[R, I] from x [R, H], w_gate and w_up [I, H] (any strides)."""
    m, k = x.shape
    n = w_gate.shape[0]
    if m == 0 or n == 0:
        return out
    cfg = launch_config(m, x.dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    gated_up_proj_kernel[grid](
        out, x, w_gate, w_up,
        x if scale is None else scale, x if gate_scale is None else gate_scale,
        x if strength is None else strength,
        1.0 if strength_value is None else float(strength_value),
        m, n, k, x.stride(0), x.stride(1), w_gate.stride(0), w_gate.stride(1),
        w_up.stride(0), w_up.stride(1), out.stride(0),
        HAS_SCALE=scale is not None, HAS_GATE_SCALE=gate_scale is not None,
        STRENGTH_MODE=strength_mode(strength, strength_value), ACT=act,
        COMPUTE=compute_dtype(x.dtype), DOT_PRECISION=dot_precision(x.dtype), **cfg,
    )
    return out
