"""A GGUF file's header, metadata and tensor table, read from its bytes (the layout of
llama.cpp's docs/gguf.md: magic, version, tensor count, entry count; the entries; the tensor
infos; the data, aligned to general.alignment) without the gguf package's GGUFReader, which
makes a numpy array of every element of every array entry (SmolLM2's 49,152 tokens and 48,900
merges: seconds). Here an array of strings is skipped by its lengths, so the checks that need
only the metadata (the architecture, the scale file's config fingerprint, a truncated file)
come before anything slow, and the export writes its file from this table and the bytes.
"""
import mmap
import os
import struct
from typing import NamedTuple

from ..core.fingerprints import config_fingerprint

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9  # GGUF value types
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}
# HF config size -> the GGUF key (after "<arch>.") transformers' GGUF reader reads it from
# (transformers.integrations.ggml.GGUF_CONFIG_MAPPING: the same for every architecture export
# handles); vocab_size falls back on the token list's length, as there.
CONFIG_KEYS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
               "num_hidden_layers": "block_count", "num_attention_heads": "attention.head_count",
               "num_key_value_heads": "attention.head_count_kv", "vocab_size": "vocab_size"}


class Strings(NamedTuple):
    """An array entry of strings, read as its length only."""
    count: int


class Tensor(NamedTuple):
    name: str
    dims: tuple  # GGUF order: ne0 (a row's length) first
    type_name: str  # GGML type (gguf.GGMLQuantizationType name)
    offset: int  # from the start of the data section
    nbytes: int

    @property
    def rows(self):
        """How many rows (of dims[0] values) the tensor has."""
        n = 1
        for d in self.dims[1:]:
            n *= d
        return n


class GGUFMeta(NamedTuple):
    path: str
    fields: dict  # key -> value (int / float / bool / str / list of numbers / Strings)
    spans: dict  # key -> (start, end) byte range of the whole entry
    tensors: list  # [Tensor], in the file's order
    alignment: int
    data_offset: int  # where the data section starts
    header_end: int  # where the tensor infos end


class _Cursor:
    def __init__(self, buf, path):
        self.buf, self.at, self.path = buf, 0, path

    def take(self, fmt):
        size = struct.calcsize(fmt)
        if self.at + size > len(self.buf):
            raise ValueError(f"{self.path} is truncated: its metadata runs past the end of the "
                             f"file ({len(self.buf)} bytes)")
        value = struct.unpack_from(fmt, self.buf, self.at)
        self.at += size
        return value[0] if len(value) == 1 else value

    def string(self):
        n = self.take("<Q")
        if self.at + n > len(self.buf):
            self.take(f"<{n}s")  # the truncation message
        raw = bytes(self.buf[self.at:self.at + n])
        self.at += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype):
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            itype, n = self.take("<I"), self.take("<Q")
            if itype == STRING:
                for _ in range(n):
                    length = self.take("<Q")
                    self.at += length  # the string's bytes, skipped
                if self.at > len(self.buf):
                    self.take("<B")  # the truncation message
                return Strings(n)
            return [self.value(itype) for _ in range(n)]
        if vtype not in _SCALAR:
            raise ValueError(f"{self.path} is not a readable GGUF file (value type {vtype})")
        return self.take(_SCALAR[vtype])


def _type_table():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return {int(t): (t.name, GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
            if t in GGML_QUANT_SIZES}


def _read(buf, path):
    cur = _Cursor(buf, path)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with GGUF)")
    cur.at = 4
    version = cur.take("<I")
    if version > 0xFFFF:  # 2 or 3 written big-endian
        raise ValueError(f"{path} is a GGUF file of the other byte order; export reads files "
                         "of this machine's byte order only")
    n_tensors, n_fields = cur.take("<Q"), cur.take("<Q")
    fields, spans = {}, {}
    for _ in range(n_fields):
        start = cur.at
        key = cur.string()
        fields[key] = cur.value(cur.take("<I"))
        spans[key] = (start, cur.at)
    types = _type_table()
    tensors = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = tuple(cur.take("<Q") for _ in range(cur.take("<I")))
        type_id, offset = cur.take("<I"), cur.take("<Q")
        if type_id not in types:
            raise ValueError(f"{path}: tensor {name} has GGML type {type_id}, which the gguf "
                             "package does not know")
        type_name, (block, size) = types[type_id]
        count = 1
        for d in dims:
            count *= d
        tensors.append(Tensor(name, dims, type_name, offset, count // block * size))
    alignment = int(fields.get("general.alignment", 32))
    data_offset = cur.at + (-cur.at) % alignment
    return GGUFMeta(path, fields, spans, tensors, alignment, data_offset, cur.at)


def read_metadata(path):
    """GGUFMeta of `path`; ValueError naming the file when it is not a GGUF file or is
    truncated (its tensors' data ends past the file's end), FileNotFoundError if missing."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ValueError(f"{path} is not a GGUF file ({size} bytes)" if size < 4 or
                             f.read(4) != MAGIC else f"{path} is truncated: {size} bytes")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf, memoryview(buf) as view:
            meta = _read(view, path)
    end = max((meta.data_offset + t.offset + t.nbytes for t in meta.tensors), default=0)
    if end > size:
        last = max(meta.tensors, key=lambda t: t.offset + t.nbytes)
        raise ValueError(f"{path} is truncated: its tensor data ends at byte {end} (tensor "
                         f"{last.name}), the file has {size} bytes")
    return meta


def architecture(meta):
    """The general.architecture entry (a string), or None."""
    arch = meta.fields.get("general.architecture")
    return arch if isinstance(arch, str) else None


def config_sizes(meta):
    """The sizes of the Hugging Face config transformers' GGUF reader makes of this file (the
    ones core/fingerprints.py hashes: model_type, hidden_size, ...), or None where one is
    missing or not a number (the full check on the model then decides)."""
    arch = architecture(meta)
    model_type = {"gemma3": "gemma3_text"}.get(arch, arch)
    if arch == "llama" and meta.fields.get("general.name") == "mistral":
        model_type = "mistral"  # as transformers' reader renames it
    sizes = {"model_type": model_type}
    for hf, key in CONFIG_KEYS.items():
        value = meta.fields.get(f"{arch}.{key}")
        if value is None and hf == "vocab_size":
            tokens = meta.fields.get("tokenizer.ggml.tokens")
            value = tokens.count if isinstance(tokens, Strings) else None
        if isinstance(value, bool) or not isinstance(value, int):
            return None
        sizes[hf] = value
    return sizes


def gguf_config_fingerprint(meta):
    """The config fingerprint (core/fingerprints.config_fingerprint) of the model this GGUF
    file holds, from its metadata alone; None when config_sizes cannot tell."""
    sizes = config_sizes(meta)
    return None if sizes is None else config_fingerprint(sizes)
