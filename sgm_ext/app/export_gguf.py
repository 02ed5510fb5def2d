"""`sgm-ext export --gguf`: a GGUF file (llama.cpp, Ollama, LM Studio) with a scale file folded
into its feed-forward tensors at one strength.

The scale file's sites are those of the Hugging Face model transformers builds from the GGUF
(as `realmodel` does); they are checked as `patch` checks them, on that model built on the meta
device from the file's metadata, and mapped to the file's tensor names by the `gguf` package's
own name table (gguf.get_tensor_name_map). Every site scales whole rows of a GGUF matrix (a row
is one output unit; its inputs are GGUF's innermost dimension): gate / up / down sites the rows
of ffn_gate / ffn_up / ffn_down, mid sites the rows of ffn_up (mid = act(gate) * up: scaling
up's rows scales mid; ffn_down's columns would cut across its quantization blocks).

--gguf-type same (the default): each touched row is multiplied in the tensor's own type by its
block scales (gguf_blocks.py: the types, where each keeps its f16 scales, the bound; every type
and size kept, the quantized integers untouched). f16 / f32: a touched tensor is dequantized
(as transformers' GGUF reader does), its rows multiplied in float32 as fold mode multiplies,
and written in that type. Shifts: bias tensors or a control-vector file (gguf_shifts.py).
Every other tensor's data and every metadata entry are copied byte for byte; the file gains
`sgm_ext.export.*` entries: the scale file's hash, the strength, the version and each rewritten
tensor's types.

Checks, cheapest first, all before anything is written: the file's header and tensor table
(gguf_file.py: not GGUF, truncated, architecture), the outputs, the scale file against the
metadata's config fingerprint and the architecture's shifts, then the sites on the meta model.
"""
import contextlib
import os
import struct
from typing import NamedTuple

import numpy as np

from ..core.files import atomic_path, file_sha256
from ..core.pause import pause_point
from ..core.scale_math import check_fraction
from ..patching.patcher import check_config_fingerprint, check_scales
from ..patching.scales import load_scales
from ..patching.strength import ScalesAtStrength, Strength
from ..version import __version__
from .export import check_export_out
from .gguf_blocks import FLOAT_TYPES, scale_rows, why_not_rescaled
from .gguf_file import STRING, architecture, gguf_config_fingerprint, read_metadata
from .gguf_shifts import check_shifts, mlp_biases

# GGUF architectures whose feed-forward is the registry's gated layout in both transformers'
# GGUF reader and llama.cpp (separate ffn_gate / ffn_up / ffn_down tensors). Mistral's files
# are `llama` (transformers reads them as Mistral when general.name says so).
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")
TYPES = ("same", "f16", "f32")
KEY = "sgm_ext.export."
_ARRAY = 9


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FileNotFoundError("exporting a GGUF file needs the gguf package: pip install "
                                "gguf") from None
    return gguf


def read_gguf(path):
    """A GGUFReader of `path`; ValueError / FileNotFoundError naming it when it is not one
    (a truncated file said so, from gguf_file's checks)."""
    gguf = _gguf()
    path = os.fspath(path)
    read_metadata(path)
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None


def field_text(reader, key):
    """A string metadata entry of a GGUF file, or None."""
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[-1]).decode("utf-8")


def record(reader):
    """{key without the prefix: value} of the sgm_ext.export.* entries of a GGUF (or {})."""
    return {key[len(KEY):]: field.contents() for key, field in reader.fields.items()
            if key.startswith(KEY)}


def is_export_gguf(path):
    """Whether `path` is a GGUF file sgm-ext export wrote (control vectors included)."""
    try:
        return any(key.startswith(KEY) for key in read_metadata(path).fields)
    except (ValueError, OSError):
        return False


def _hf_model(path):
    """The transformers model of a GGUF file's config, on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder, name = os.path.split(os.path.abspath(path))
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_source(path):
    """The GGUF file's metadata (gguf_file.GGUFMeta), its architecture checked."""
    meta = read_metadata(path)
    arch = architecture(meta)
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not one export handles "
                         f"(it handles {', '.join(ARCHITECTURES)})")
    return meta


def check_scales_fit(meta, scales, strength, control_vector):
    """The checks of the scale file that need only the metadata: its config fingerprint
    against the one the file's metadata gives, its shifts against the architecture."""
    have = gguf_config_fingerprint(meta)
    if have is not None:
        check_config_fingerprint(scales, have, architecture(meta), f"{meta.path}'s")
    check_shifts(architecture(meta), scales.shifts, strength, control_vector)
    if control_vector and not (strength and any(
            bool(b.any()) and site.rsplit(".", 1)[-1] in ("mid", "down_proj")
            for site, b in scales.shifts.items())):
        raise ValueError("--control-vector: the scale file has no mid or down shift to write "
                         "(at this strength); llama.cpp refuses a control vector without one")


class GGUFPlan(NamedTuple):
    rows: dict  # weight tensor -> [(row indices, float32 factors)], in the order fold applies
    biases: dict  # bias tensor -> float64 values (new, or replacing the file's)
    directions: dict  # layer -> float64 [hidden]: the control vector


class _Tensors:
    """The file's tensors by name, their bytes (rows) and dequantized values on demand."""

    def __init__(self, meta):
        self.meta, self.by_name = meta, {t.name: t for t in meta.tensors}
        self.raw = np.memmap(meta.path, dtype=np.uint8, mode="r")

    def rows(self, name):
        t = self.by_name[name]
        start = self.meta.data_offset + t.offset
        return self.raw[start:start + t.nbytes].reshape(t.rows, -1)

    def values(self, name):
        """float64 values [rows, dims[0]] (1-D tensors: [dims[0]]), as the gguf package reads."""
        gguf, t = _gguf(), self.by_name[name]
        qtype = gguf.GGMLQuantizationType[t.type_name]
        try:
            w = gguf.quants.dequantize(np.array(self.rows(name)), qtype)
        except NotImplementedError:
            raise ValueError(f"{self.meta.path}: tensor {name} is {t.type_name}, a type export "
                             "cannot dequantize") from None
        return w.astype(np.float64).reshape(t.dims[::-1])


def bias_of(weight_name):
    """The bias tensor's name beside a weight tensor's (blk.N.ffn_up.weight -> .bias)."""
    return weight_name[:-len("weight")] + "bias"


def plan(meta, scales, strength, allow_amplify, control_vector=False):
    """GGUFPlan: the scales and shifts at `strength` on the file's tensors; every check made
    before anything is written."""
    gguf, arch = _gguf(), architecture(meta)
    pause_point("load")  # tests: every refusal that needs no model comes before this
    targets = check_scales(_hf_model(meta.path), scales, allow_amplify=allow_amplify)
    inputs = [t.info.site("input") for t in targets if "input" in t.kinds()]
    if inputs:
        raise ValueError(f"cannot export the MLP input site {inputs[0]} to GGUF: export --gguf "
                         "does not fold input sites; use export --model or sgm_ext.patch")
    blocks = int(meta.fields[f"{arch}.block_count"])
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, blocks)
    tensors = _Tensors(meta)
    out = GGUFPlan({}, {}, {})
    for t in targets:
        info = t.info

        def weight(role, path=info.path, roles=info.roles):
            name = names.get_name(f"{path}.{roles[role]}.weight", try_suffixes=(".weight",))
            if name not in tensors.by_name:
                raise ValueError(f"{meta.path}: no tensor {name or path + '.' + roles[role]} "
                                 f"to fold the scales of {path} into")
            return name

        eff, shifts = ScalesAtStrength(t.scales, t.shifts, Strength(strength),
                                       info.path).folded()
        for kind, e in eff.items():  # the order fold mode multiplies in
            idx = (e != 1.0).nonzero().flatten()
            if idx.numel():
                role = "up" if kind == "mid" else kind
                out.rows.setdefault(weight(role), []).append((idx.numpy(), e[idx].numpy()))
        existing = {role: (tensors.values(bias_of(weight(role)))
                           if bias_of(weight(role)) in tensors.by_name else None)
                    for role in ("gate", "up", "down")}
        biases, direction = mlp_biases(eff, shifts, existing,
                                       lambda: tensors.values(weight("down")), control_vector)
        for role, value in biases.items():
            out.biases[bias_of(weight(role))] = value
        if direction is not None:
            out.directions[int(weight("down").split(".")[1])] = direction
    return out


def check_types(meta, gguf_plan, out_type):
    """ValueError naming the first touched tensor whose type the export cannot write."""
    gguf, by_name = _gguf(), {t.name: t for t in meta.tensors}
    for name in gguf_plan.rows:
        type_name = by_name[name].type_name
        qtype = gguf.GGMLQuantizationType[type_name]
        try:  # one block of zeros: whether the gguf package decodes the type at all
            gguf.quants.dequantize(np.zeros((1, gguf.GGML_QUANT_SIZES[qtype][1]), np.uint8),
                                   qtype)
        except NotImplementedError:
            raise ValueError(f"{meta.path}: tensor {name} is {type_name}, a type export cannot "
                             "dequantize") from None
        if out_type == "same" and why_not_rescaled(type_name):
            raise ValueError(f"{meta.path}: tensor {name} is {type_name}: "
                             f"{why_not_rescaled(type_name)}; export it with --gguf-type f16 "
                             "or f32")
    for name in gguf_plan.biases:
        if name in by_name and by_name[name].type_name not in FLOAT_TYPES:
            raise ValueError(f"{meta.path}: bias tensor {name} is {by_name[name].type_name}; "
                             "export rewrites F32 / F16 / BF16 biases only")


def rewritten(tensors, name, edits, out_type):
    """(bytes, type name) of one touched weight: rows rescaled in its own type (`same`), or
    dequantized, multiplied in float32 as fold mode multiplies, written as F16 / F32."""
    gguf, t = _gguf(), tensors.by_name[name]
    rows = np.array(tensors.rows(name))
    if out_type == "same" and t.type_name not in FLOAT_TYPES:
        total = np.ones(t.rows)  # a row's factors multiplied first: one f16 rounding per scale
        for idx, factors in edits:
            total[idx] *= factors.astype(np.float64)
        idx = np.nonzero(total != 1.0)[0]
        rows[idx] = scale_rows(rows[idx], t.type_name, total[idx], name, idx)
        return rows.tobytes(), t.type_name
    if out_type == "same":  # float rows: multiplied in float32 one site after another, as fold
        for idx, factors in edits:
            rows[idx] = scale_rows(rows[idx], t.type_name, factors, name, idx)
        return rows.tobytes(), t.type_name
    w = tensors.values(name).astype(np.float32).reshape(t.rows, -1)
    for idx, factors in edits:
        w[idx] = w[idx] * factors[:, None]
    want = {"f16": "F16", "f32": "F32"}[out_type]
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[want]).tobytes(), want


def _bias_bytes(tensors, name, value):
    gguf = _gguf()
    type_name = tensors.by_name[name].type_name if name in tensors.by_name else "F32"
    data = gguf.quants.quantize(value.astype(np.float32), gguf.GGMLQuantizationType[type_name])
    return np.ascontiguousarray(data).tobytes(), type_name


def _string(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, value):
    """One GGUF metadata entry: a string, or an array of strings."""
    if isinstance(value, str):
        return _string(key) + struct.pack("<I", STRING) + _string(value)
    return (_string(key) + struct.pack("<II", _ARRAY, STRING) + struct.pack("<Q", len(value))
            + b"".join(_string(v) for v in value))


def _tensor_info(name, dims, type_name, offset):
    type_id = int(_gguf().GGMLQuantizationType[type_name])
    return (_string(name) + struct.pack("<I", len(dims)) +
            struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", type_id, offset))


def _pad(n, align):
    return (-n) % align


def write_gguf(meta, out, gguf_plan, out_type, extra):
    """Write the file: header, metadata (an earlier export's sgm_ext entries left out, `extra`
    added), tensor infos, data aligned as the input's; the file's tensors in its order, the
    touched ones rewritten, then the new bias tensors. Returns the record's tensor lines."""
    tensors = _Tensors(meta)
    entries = [(t.name, t.dims, t.type_name, None) for t in meta.tensors]
    entries += [(name, (len(v),), "F32", None) for name, v in gguf_plan.biases.items()
                if name not in tensors.by_name]
    lines, datas = [], []
    for name, dims, type_name, _ in entries:
        data = None
        if name in gguf_plan.rows:
            pause_point("export-gguf-tensor")
            data, new_type = rewritten(tensors, name, gguf_plan.rows[name], out_type)
            lines.append(f"{name} {type_name} -> {new_type}")
            type_name = new_type
        elif name in gguf_plan.biases:
            data, type_name = _bias_bytes(tensors, name, gguf_plan.biases[name])
            lines.append(f"{name} {'rewritten' if name in tensors.by_name else 'added'} "
                         f"{type_name}")
        datas.append((name, dims, type_name, data))
    extra = dict(extra, tensors=lines)
    kept = [key for key in meta.fields if not key.startswith(KEY)]
    raw, align = tensors.raw, meta.alignment
    head = bytes(raw[:8]) + struct.pack("<QQ", len(datas), len(kept) + len(extra))
    head += b"".join(bytes(raw[slice(*meta.spans[key])]) for key in kept)
    head += b"".join(_kv(KEY + k, v) for k, v in extra.items())
    offset = 0
    for name, dims, type_name, data in datas:
        head += _tensor_info(name, dims, type_name, offset)
        size = len(data) if data is not None else tensors.by_name[name].nbytes
        offset += size + _pad(size, align)
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(head + b"\0" * _pad(len(head), align))
        for name, _, _, data in datas:
            if data is None:
                t = tensors.by_name[name]
                start = meta.data_offset + t.offset
                data = raw[start:start + t.nbytes]
            f.write(data)
            f.write(b"\0" * _pad(len(data), align))
        pause_point("export-rename")
    return lines


def write_control_vector(tmp, arch, directions, extra):
    """Write a llama.cpp control-vector file at `tmp`: F32 tensors direction.N (N the 0-based
    layer) and the entries llama.cpp's cvector-generator writes (controlvector.model_hint,
    controlvector.layer_count), with the export's record."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(tmp, arch="controlvector")
    writer.add_string("controlvector.model_hint", arch)
    writer.add_int32("controlvector.layer_count", len(directions))
    for key, value in extra.items():
        writer.add_string(KEY + key, value)
    for layer in sorted(directions):
        writer.add_tensor(f"direction.{layer}", directions[layer].astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(path, scales_path, out, strength=1.0, allow_amplify=False, out_type="same",
                control_vector=None):
    """Write OUT, a GGUF file: `path` with the scales folded in at `strength` (and the mid /
    down shifts in the control-vector file `control_vector`, when given). Returns the record
    written into it ({"tensors": ["name TYPE_IN -> TYPE_OUT", ...], ...}). Raises before
    writing on any bad input; an error or Ctrl-C leaves no OUT and no temporary file."""
    path, out = os.fspath(path), os.fspath(out)
    if out_type not in TYPES:
        raise ValueError(f"--gguf-type {out_type!r}: choose one of {', '.join(TYPES)}")
    strength = check_fraction(strength, "--strength")
    meta = check_source(path)
    check_export_out(out, path, lambda p: os.path.isfile(p) and is_export_gguf(p))
    if control_vector is not None:
        control_vector = os.fspath(control_vector)
        if os.path.abspath(control_vector) == os.path.abspath(out):
            raise ValueError(f"--control-vector {control_vector} is the --out file")
        check_export_out(control_vector, path, lambda p: os.path.isfile(p) and is_export_gguf(p))
    scales = load_scales(scales_path)
    check_scales_fit(meta, scales, strength, control_vector is not None)
    gguf_plan = plan(meta, scales, strength, allow_amplify, control_vector is not None)
    check_types(meta, gguf_plan, out_type)
    extra = {"sgm_ext_version": __version__, "strength": repr(strength),
             "scales_file": os.path.basename(os.fspath(scales_path)),
             "scales_sha256": file_sha256(scales_path),
             "method": scales.metadata.get("method", "")}
    with (atomic_path(control_vector) if control_vector is not None
          else contextlib.nullcontext()) as cv_tmp:  # renamed after OUT is, or not at all
        if cv_tmp is not None:
            write_control_vector(cv_tmp, architecture(meta), gguf_plan.directions, extra)
        lines = write_gguf(meta, out, gguf_plan, out_type, extra)
    rec = dict(extra, tensors=lines)
    if control_vector is not None:
        rec["control_vector"] = [f"direction.{n}" for n in sorted(gguf_plan.directions)]
    return rec
