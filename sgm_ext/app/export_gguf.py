"""`sgm-ext export --gguf`: a GGUF file (llama.cpp, Ollama, LM Studio) with a scale file folded
into its feed-forward tensors at one strength.

The scale file's sites are those of the Hugging Face model transformers builds from the GGUF
(as `realmodel` does); they are checked as `patch` checks them, on that model built on the meta
device from the file's metadata, and mapped to the file's tensor names by the `gguf` package's
own name table (gguf.get_tensor_name_map): gate / up / down sites scale rows of `ffn_gate` /
`ffn_up` / `ffn_down`, mid sites columns of `ffn_down` (GGUF's innermost dimension). A touched
tensor is dequantized to float32 (as transformers' GGUF reader does), multiplied in float32 as
fold mode multiplies, and written in its own type where the `gguf` package can quantize it
(`--gguf-type same`), else as F16; or as F16 / F32 on request. Every other tensor's data and
every metadata entry are copied byte for byte; the file gains `sgm_ext.export.*` entries: the
scale file's hash, the strength, the version and each rewritten tensor's types.
"""
import os
import struct

from ..core.files import atomic_path, file_sha256
from ..core.pause import pause_point
from ..core.scale_math import check_fraction
from ..patching.patcher import check_scales
from ..patching.scales import load_scales
from ..patching.strength import ScalesAtStrength, Strength
from ..version import __version__
from .export import check_export_out

# GGUF architectures whose feed-forward is the registry's gated layout in both transformers'
# GGUF reader and llama.cpp (separate ffn_gate / ffn_up / ffn_down tensors).
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3")
TYPES = ("same", "f16", "f32")
KEY = "sgm_ext.export."
_STRING, _ARRAY = 8, 9  # GGUF value types


def _gguf():
    try:
        import gguf
    except ImportError:
        raise FileNotFoundError("exporting a GGUF file needs the gguf package: pip install "
                                "gguf") from None
    return gguf


def read_gguf(path):
    """A GGUFReader of `path`; ValueError / FileNotFoundError naming it when it is not one."""
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError, KeyError, IndexError) as e:
        raise ValueError(f"{path} is not a readable GGUF file ({e})") from None
    if reader.byte_order != "I":
        raise ValueError(f"{path} is a GGUF file of the other byte order; export reads files "
                         "of this machine's byte order only")
    return reader


def field_text(reader, key):
    """A string metadata entry of a GGUF file, or None."""
    field = reader.fields.get(key)
    return None if field is None else bytes(field.parts[-1]).decode("utf-8")


def record(reader):
    """{key without the prefix: value} of the sgm_ext.export.* entries of a GGUF (or {})."""
    out = {}
    for key, field in reader.fields.items():
        if key.startswith(KEY):
            out[key[len(KEY):]] = field.contents()
    return out


def is_export_gguf(path):
    """Whether `path` is a GGUF file sgm-ext export wrote."""
    try:
        return bool(record(read_gguf(path)))
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


def plan(reader, path, scales, strength, allow_amplify):
    """{GGUF tensor name: [(axis 0 rows | 1 columns, index, factors)]}: the scales at
    `strength` on the file's tensors; every check made before anything is written."""
    gguf = _gguf()
    arch = field_text(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not one export handles "
                         f"(it handles {', '.join(ARCHITECTURES)})")
    targets = check_scales(_hf_model(path), scales, allow_amplify=allow_amplify)
    inputs = [t.info.site("input") for t in targets if "input" in t.kinds()]
    if inputs:
        raise ValueError(f"cannot export the MLP input site {inputs[0]} to GGUF: export --gguf "
                         "does not fold input sites; use export --model or sgm_ext.patch")
    blocks = int(reader.fields[f"{arch}.block_count"].contents())
    arch_id = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(arch_id, blocks)
    tensors = {t.name: t for t in reader.tensors}
    edits = {}
    for t in targets:
        at = ScalesAtStrength(t.scales, t.shifts, Strength(strength), t.info.path)
        eff, shifts = at.folded()
        for kind, b in shifts.items():
            if b.any():
                raise ValueError(f"cannot export the shift of site {t.info.site(kind)} to GGUF: "
                                 f"llama.cpp's {arch} feed-forward tensors take no bias; export "
                                 "the scales without shifts, or use patch / sgm-ext serve")
        for kind, e in eff.items():  # the order fold mode multiplies in
            idx = (e != 1.0).nonzero().flatten()
            if idx.numel() == 0:
                continue
            attr, reads_input = t.info.site_point(kind)
            name = names.get_name(f"{t.info.path}.{attr}.weight", try_suffixes=(".weight",))
            if name not in tensors:
                raise ValueError(f"site {t.info.site(kind)}: the GGUF file has no tensor "
                                 f"{name or t.info.path + '.' + attr} to fold it into")
            edits.setdefault(name, []).append((1 if reads_input else 0, idx.numpy(),
                                               e[idx].numpy()))
    for name in edits:
        _check_type(tensors[name], path)
    return edits


def _check_type(tensor, path):
    """ValueError naming the tensor's type unless the gguf package can dequantize it."""
    gguf = _gguf()
    try:
        gguf.quants.dequantize(tensor.data[:1], tensor.tensor_type)
    except (NotImplementedError, ValueError) as e:
        raise ValueError(f"{path}: tensor {tensor.name} is {tensor.tensor_type.name}, a type "
                         f"export cannot dequantize ({e})") from None


def folded_tensor(tensor, edits, out_type):
    """(bytes, GGML type, numpy shape in GGUF's element order) of one touched tensor: its
    values dequantized, scaled as fold mode scales them (float32), written in `out_type`."""
    import numpy as np

    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    w = np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    for axis, idx, factors in edits:
        if axis == 0:
            w[idx, :] = w[idx, :] * factors[:, None]
        else:
            w[:, idx] = w[:, idx] * factors[None, :]
    want = {"f16": T.F16, "f32": T.F32}.get(out_type, tensor.tensor_type)
    try:
        data = gguf.quants.quantize(w, want)
    except NotImplementedError:  # the gguf package dequantizes this type but cannot write it
        want = T.F16
        data = gguf.quants.quantize(w, want)
    return np.ascontiguousarray(data).tobytes(), want


def _string(text):
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _kv(key, value):
    """One GGUF metadata entry: a string, or an array of strings."""
    if isinstance(value, str):
        return _string(key) + struct.pack("<I", _STRING) + _string(value)
    return (_string(key) + struct.pack("<II", _ARRAY, _STRING) + struct.pack("<Q", len(value))
            + b"".join(_string(v) for v in value))


def _metadata_bytes(reader):
    """The original metadata entries' bytes (an earlier export's sgm_ext entries left out) and
    how many there are."""
    raw = reader.data
    start = 24  # magic, version, tensor count, entry count
    end = reader.tensors[0].field.offset if reader.tensors else reader.data_offset
    kept, count = [], 0
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        size = sum(int(p.nbytes) for p in field.parts)
        if not key.startswith(KEY):
            kept.append(bytes(raw[field.offset: field.offset + size]))
            count += 1
    if sum(map(len, kept)) > end - start:
        raise ValueError("the GGUF file's metadata does not add up")
    return b"".join(kept), count


def _tensor_info(tensor, ggml_type, offset):
    dims = [int(d) for d in tensor.field.parts[3]]
    return (_string(tensor.name) + struct.pack("<I", len(dims)) +
            struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", int(ggml_type), offset))


def _pad(n, align):
    return (-n) % align


def write_gguf(reader, out, edits, out_type, extra):
    """Write the file: header, metadata (+ `extra`, the sgm_ext entries), tensor infos, data
    aligned as the input's; touched tensors folded, the rest copied. Returns
    {tensor name: (type in, type out)}."""
    align = reader.alignment
    datas, types, changed = [], [], {}
    for t in reader.tensors:  # the touched tensors' new bytes first: infos need their sizes
        if t.name in edits:
            pause_point("export-gguf-tensor")
            data, ggml_type = folded_tensor(t, edits[t.name], out_type)
            changed[t.name] = (t.tensor_type.name, ggml_type.name)
        else:
            data, ggml_type = None, t.tensor_type
        datas.append(data)
        types.append(ggml_type)
    extra = dict(extra, tensors=[f"{n} {a} -> {b}" for n, (a, b) in changed.items()])
    meta, count = _metadata_bytes(reader)
    meta += b"".join(_kv(KEY + k, v) for k, v in extra.items())
    count += len(extra)
    infos, offset = [], 0
    for t, data, ggml_type in zip(reader.tensors, datas, types):
        infos.append(_tensor_info(t, ggml_type, offset))
        size = len(data) if data is not None else t.n_bytes
        offset += size + _pad(size, align)
    raw = reader.data
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        head = bytes(raw[:8]) + struct.pack("<QQ", len(reader.tensors), count)
        f.write(head + meta + b"".join(infos))
        f.write(b"\0" * _pad(f.tell(), align))
        for t, data in zip(reader.tensors, datas):
            f.write(data if data is not None else
                    raw[t.data_offset: t.data_offset + t.n_bytes].tobytes())
            f.write(b"\0" * _pad(f.tell(), align))
        pause_point("export-rename")
    return changed


def export_gguf(path, scales_path, out, strength=1.0, allow_amplify=False, out_type="same"):
    """Write OUT, a GGUF file: `path` with the scales folded in at `strength`. Returns the
    record written into it ({"tensors": ["name TYPE_IN -> TYPE_OUT", ...], ...}). Raises
    before writing on any bad input; an error or Ctrl-C leaves no OUT and no temporary file."""
    path, out = os.fspath(path), os.fspath(out)
    if out_type not in TYPES:
        raise ValueError(f"--gguf-type {out_type!r}: choose one of {', '.join(TYPES)}")
    strength = check_fraction(strength, "--strength")
    reader = read_gguf(path)
    check_export_out(out, path, lambda p: os.path.isfile(p) and is_export_gguf(p))
    scales = load_scales(scales_path)
    edits = plan(reader, path, scales, strength, allow_amplify)
    extra = {"sgm_ext_version": __version__, "strength": repr(strength),
             "scales_file": os.path.basename(os.fspath(scales_path)),
             "scales_sha256": file_sha256(scales_path),
             "method": scales.metadata.get("method", "")}
    changed = write_gguf(reader, out, edits, out_type, extra)
    return dict(extra, tensors=[f"{n} {a} -> {b}" for n, (a, b) in changed.items()])
