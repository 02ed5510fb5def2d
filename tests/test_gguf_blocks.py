"""Rows of GGUF tensors scaled in their own type (app/gguf_blocks.py), checked against the gguf
package's own decoding (gguf.quants.dequantize), never against the code under test.

The bound asserted (the module's): a block decodes as d * a + dmin * b (b = 0 for the types
without a min), d and dmin f16 numbers at the byte offsets of llama.cpp's block structs
(ggml/src/ggml-common.h; restated below as the test's own table). Scaled by f, the block holds
f16(d f) and f16(dmin f), each within 2^-11 of the exact product (relative), so every value is
within 2^-11 |f| (|d a| + |dmin b|) of f times the old value, plus float32 rounding in the gguf
package's decoding (2^-20 relative, slack), plus 2^-25 (|a| + |b|) where a product falls below
f16's normal range (real files' small scales). The test gets a and b by decoding each block with
(d, dmin) set to (1, 0) and (0, 1). F16 / BF16 / F32 rows: within 2^-11 / 2^-8 / 2^-24 of f x
(rounded once from float32). Rows not touched keep their bytes; only the scale bytes change; a
factor 0 decodes to an exactly zero row; the rounding is real (some error > 0: a test of the
bound, not of equality).

Blocks: gguf.quants.quantize where the package can quantize the type (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, TQ1_0, TQ2_0, BF16), else random bytes with valid f16 scales (the K and IQ types), and the
tensors of the real models' GGUF files, one tensor of each type they hold.
"""
import os

import numpy as np
import pytest

from sgm_ext.app import realmodel
from sgm_ext.app.gguf_blocks import RESCALED, scale_rows
from sgm_ext.app.gguf_file import read_metadata

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# type -> (offset of d, offset of dmin / m or None): ggml-common.h's block_* structs
SCALES_AT = {
    "Q4_0": (0, None), "Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "Q8_0": (0, None),
    "Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208, None),
    "IQ2_XXS": (0, None), "IQ2_XS": (0, None), "IQ2_S": (0, None), "IQ3_XXS": (0, None),
    "IQ3_S": (0, None), "IQ1_S": (0, None), "IQ4_NL": (0, None), "IQ4_XS": (0, None),
    "TQ1_0": (52, None), "TQ2_0": (64, None),
}
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0")
U = 2.0 ** -11  # f16's unit roundoff
SLACK = 2.0 ** -20  # float32 rounding in the package's decoding of both sides
TINY = 2.0 ** -25  # f16's rounding below its normal range (half its smallest subnormal)
ROWS, BLOCKS = 6, 3


def _f16(values):
    return np.asarray(values, np.float16).view(np.uint8).reshape(*np.shape(values), 2)


def _iq1m_set_scale(blocks, d):
    """IQ1_M's f16 scale sits in the top nibbles of its four u16 at byte 48 (nibble k in the
    k-th): write d there."""
    s = blocks[..., 48:56].copy().view("<u2")
    bits = np.asarray(d, np.float16).view(np.uint16)
    for k in range(4):
        s[..., k] = (s[..., k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
    blocks[..., 48:56] = s.view(np.uint8)


def make_rows(type_name, rng):
    """[ROWS, row bytes] of `type_name`: quantized by the gguf package where it can, else
    random bytes with f16 scales in [2^-7, 1] (normal numbers after any factor >= 2^-6)."""
    qtype = T[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    if type_name in QUANTIZABLE + ("BF16", "F16", "F32"):
        x = rng.standard_normal((ROWS, BLOCKS * max(block, 32))).astype(np.float32)
        return np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    raw = rng.integers(0, 256, (ROWS, BLOCKS, size), dtype=np.uint8)
    d = rng.uniform(2.0 ** -7, 1.0, (ROWS, BLOCKS))
    if type_name == "IQ1_M":
        _iq1m_set_scale(raw, d)
    else:
        for at in SCALES_AT[type_name]:
            if at is not None:
                raw[..., at:at + 2] = _f16(d * rng.uniform(0.5, 1.0, d.shape))
    return raw.reshape(ROWS, -1)


def decoded(rows, type_name):
    return gguf.quants.dequantize(np.ascontiguousarray(rows), T[type_name]).astype(np.float64)


def _iq1m_scale(blocks):
    s = blocks[..., 48:56].copy().view("<u2").astype(np.uint16)
    bits = sum(((s[..., k] >> 12) & 0xF) << (4 * k) for k in range(4)).astype(np.uint16)
    return bits.view(np.float16).astype(np.float64)


def terms(rows, type_name):
    """(|d a|, |dmin b|, |a| + |b|) per value: a and b by decoding each block with (d, dmin)
    set to (1, 0) and (0, 1); float types: (|x|, 0, 1)."""
    if type_name in ("F32", "F16", "BF16"):
        x = np.abs(decoded(rows, type_name))
        return x, 0.0, np.ones_like(x)
    block, size = gguf.GGML_QUANT_SIZES[T[type_name]]
    blocks = rows.reshape(len(rows), -1, size)

    def with_scales(d_value, m_value):
        out = blocks.copy()
        if type_name == "IQ1_M":
            _iq1m_set_scale(out, np.full(out.shape[:2], d_value))
        else:
            d_at, m_at = SCALES_AT[type_name]
            out[..., d_at:d_at + 2] = _f16(np.full(out.shape[:2], d_value))
            if m_at is not None:
                out[..., m_at:m_at + 2] = _f16(np.full(out.shape[:2], m_value))
        return np.abs(decoded(out.reshape(rows.shape), type_name))

    def per_value(at):
        v = _iq1m_scale(blocks) if at == "iq1m" else \
            blocks[..., at:at + 2].copy().view(np.float16)[..., 0].astype(np.float64)
        return np.repeat(np.abs(v), block, axis=-1)

    d_at, m_at = SCALES_AT.get(type_name, ("iq1m", None))
    a = with_scales(1.0, 0.0)
    b = with_scales(0.0, 1.0) if m_at is not None else 0.0
    dmin = per_value(m_at) if m_at is not None else 0.0
    return per_value(d_at) * a, dmin * b, a + b


def check_scaled(rows, type_name, factors, touched):
    """Scale rows `touched` by `factors`; assert the bound, the untouched bytes and rows,
    exact zeros for a zero factor."""
    new = rows.copy()
    new[touched] = scale_rows(rows[touched], type_name, factors, "t", touched)
    assert new.dtype == np.uint8 and new.shape == rows.shape  # same type, same size
    others = np.setdiff1d(np.arange(len(rows)), touched)
    assert np.array_equal(new[others], rows[others])
    before, after = decoded(rows[touched], type_name), decoded(new[touched], type_name)
    f = np.abs(factors.astype(np.float64))[:, None]
    da, mb, ab = terms(rows[touched], type_name)
    err = np.abs(after - f * before)
    unit = {"BF16": 2.0 ** -8, "F32": 2.0 ** -24}.get(type_name, U)
    bound = (unit + SLACK) * f * (da + mb) + TINY * ab * (type_name not in ("F32", "BF16"))
    assert (err <= bound).all(), (type_name, float((err / np.maximum(bound, 1e-300)).max()))
    zero = factors == 0
    assert (after[zero] == 0).all()
    if type_name in SCALES_AT:  # only the scale bytes of the touched rows' blocks change
        size = gguf.GGML_QUANT_SIZES[T[type_name]][1]
        keep = np.ones(size, bool)
        for at in SCALES_AT[type_name]:
            if at is not None:
                keep[at:at + 2] = False
        a = rows[touched].reshape(len(touched), -1, size)[..., keep]
        b = new[touched].reshape(len(touched), -1, size)[..., keep]
        assert np.array_equal(a, b), type_name
    return err


@pytest.mark.parametrize("type_name", RESCALED)
def test_every_rescaled_type_is_within_the_f16_bound(type_name):
    rng = np.random.default_rng(sorted(RESCALED).index(type_name))
    rows = make_rows(type_name, rng)
    touched = np.array([0, 2, 3, 5])
    factors = np.array([0.37, 0.0, 2.0 ** -6, 0.9], np.float32)
    err = check_scaled(rows, type_name, factors, touched)
    if type_name != "F32":  # the rounding is real: a test of the bound, not of equality
        assert err.max() > 0


def test_the_test_blocks_cover_every_type_the_llamacpp_source_lists():
    # every type with an f16 scale in ggml-common.h is rescaled; the others are refused
    assert set(RESCALED) == set(SCALES_AT) | {"IQ1_M", "F32", "F16", "BF16"}


@pytest.mark.parametrize("type_name", ["MXFP4", "NVFP4", "Q8_K", "I8"])
def test_types_without_an_f16_scale_are_refused_naming_the_type(type_name):
    size = gguf.GGML_QUANT_SIZES[T[type_name]][1]
    with pytest.raises(ValueError, match=f"tensor blk.1.ffn_up.weight is {type_name}: "):
        scale_rows(np.zeros((1, 4 * size), np.uint8), type_name, np.ones(1, np.float32),
                   "blk.1.ffn_up.weight", np.array([7]))


def test_a_scale_past_f16_is_refused_naming_tensor_and_row():
    rows = np.ascontiguousarray(gguf.quants.quantize(
        np.full((2, 32), 60000.0 * 127, np.float32), T.Q8_0)).view(np.uint8)
    with pytest.raises(ValueError, match=r"tensor blk.3.ffn_down.weight: a block scale of "
                                         r"row 41 .* beyond f16's largest number"):
        scale_rows(rows, "Q8_0", np.array([1.0, 2.0], np.float32), "blk.3.ffn_down.weight",
                   np.array([40, 41]))


def _real_file(name):
    """The GGUF file of a real model, or a skip saying why not (scripts/setup.sh installs both
    models' packages, so in CI a missing one fails)."""
    try:
        return realmodel.gguf_path(name)
    except FileNotFoundError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{name}'s GGUF file is not installed ({e})")


@pytest.mark.parametrize("name", list(realmodel.MODELS))
def test_each_type_in_the_real_files_is_within_the_bound(name):
    path = _real_file(name)
    meta = read_metadata(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    types = {}
    for t in meta.tensors:
        if len(t.dims) == 2 and t.type_name not in types:
            types[t.type_name] = t
    assert types, name
    rng = np.random.default_rng(0)
    for type_name, t in types.items():
        start = meta.data_offset + t.offset
        rows = np.array(raw[start:start + t.nbytes].reshape(t.rows, -1)[:64])
        touched = np.sort(rng.choice(len(rows), 24, replace=False))
        factors = rng.uniform(0.05, 1.0, len(touched)).astype(np.float32)
        factors[:3] = 0.0
        check_scaled(rows, type_name, factors, touched)
