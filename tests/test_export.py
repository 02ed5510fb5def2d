"""`sgm-ext export --model`: the exported directory, loaded by plain transformers, computes what
the model patched in fold mode computes (bitwise, in float32 and in bf16: the same products
rounded once to the stored dtype); strength 0 exports the input's weights; shards, dtypes and
every other file keep their layout; provenance is recorded and `sgm-ext inspect` shows it."""
import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from _profile_models import planted_llama
from cli_runs import HANG_S
from patch_models import build, logits
from safetensors import safe_open

import sgm_ext
from sgm_ext.app.export import SIDECAR, export_model
from sgm_ext.patching.registry import find_mlps
from sgm_ext.patching.scales import ScaleSet, config_fingerprint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STRENGTH = 0.7


def random_scales(model, seed, shifts_on=()):
    """Scales in [0, 1) on every site of every MLP (vision towers included); shifts (normal)
    on the sites of the kinds in `shifts_on`."""
    g = torch.Generator().manual_seed(seed)
    scales, shifts = {}, {}
    for info in find_mlps(model).values():
        for site, kind in info.sites().items():
            scales[site] = torch.rand(info.site_size(kind), generator=g)
            if kind in shifts_on:
                shifts[site] = torch.randn(info.site_size(kind), generator=g)
    return ScaleSet(scales, {"config_fingerprint": config_fingerprint(model.config)},
                    shifts=shifts)


def tensors(path):
    """{key: tensor} of every safetensors file in a directory."""
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def saved(tmp_path, name, model, **kw):
    path = tmp_path / name
    model.save_pretrained(path, **kw)
    return path


@pytest.mark.parametrize(("name", "shifts_on"), [
    ("llama", ("down", "mid", "input")),  # mlp_bias=True: shifts go into the biases it has
    ("mistral", ()),
    ("qwen3", ()),
    ("gemma3", ()),  # SigLIP vision-tower sites too
    ("llava", ()),  # CLIP vision-tower sites too
    ("qwen2_5_vl", ("fc1",)),  # Qwen2-VL-style vision MLPs (biases) take shifts
])
def test_export_computes_what_fold_mode_computes(tmp_path, name, shifts_on):
    model, inputs = build(name)
    src = saved(tmp_path, "model", model)
    scales = random_scales(model, 1, shifts_on)
    scales.save(tmp_path / "s.safetensors")
    if name in ("gemma3", "llava", "qwen2_5_vl"):
        assert any("vision" in site or "visual" in site for site in scales.sites())
    record = export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)

    reference = type(model).from_pretrained(src).eval()
    sgm_ext.patch(reference, scales, mode="fold", strength=STRENGTH)
    exported = type(model).from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(exported, inputs), logits(reference, inputs))
    # every site folded; the untouched tensors are the input's, bit for bit
    assert set(record["sites"]) == set(scales.sites())
    before, after = tensors(src), tensors(tmp_path / "out")
    assert set(before) == set(after)
    untouched = [k for k in before if k not in record["tensors"]]
    assert untouched and all(torch.equal(before[k], after[k]) for k in untouched)
    assert all(not torch.equal(before[k], after[k]) for k in record["tensors"]
               if k.endswith(".weight"))
    assert sha(src / "generation_config.json") == sha(tmp_path / "out" / "generation_config.json")


def test_strength_zero_exports_the_input(tmp_path):
    model, inputs = build("gemma3")
    src = saved(tmp_path, "model", model)
    random_scales(model, 2).save(tmp_path / "s.safetensors")
    export_model(src, tmp_path / "s.safetensors", tmp_path / "out", 0.0)
    before, after = tensors(src), tensors(tmp_path / "out")
    assert set(before) == set(after)
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype
               for k in before)
    exported = type(model).from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(exported, inputs), logits(model, inputs))


def _bf16_sharded(tmp_path):
    model = planted_llama().to(torch.bfloat16)
    src = saved(tmp_path, "model", model, max_shard_size="20KB")
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}\n')
    g = torch.Generator().manual_seed(3)
    n, h = model.config.intermediate_size, model.config.hidden_size
    scales = ScaleSet({"model.layers.0.mlp.mid": torch.rand(n, generator=g),
                       "model.layers.1.mlp.up_proj": torch.rand(n, generator=g)},
                      {"config_fingerprint": config_fingerprint(model.config)},
                      shifts={"model.layers.1.mlp.down_proj": torch.randn(h, generator=g)})
    scales.save(tmp_path / "s.safetensors")
    return model, src, scales


def test_sharded_bf16_with_a_shift_keeps_layout_and_dtype_and_gains_mlp_bias(tmp_path):
    model, src, scales = _bf16_sharded(tmp_path)
    shards = sorted(n for n in os.listdir(src) if n.endswith(".safetensors"))
    assert len(shards) > 1 and not model.config.mlp_bias
    record = export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)
    out = tmp_path / "out"
    assert sorted(n for n in os.listdir(out) if n.endswith(".safetensors")) == shards
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_bias"] is True
    assert config["sgm_ext_export"]["scales_sha256"] == sha(tmp_path / "s.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    old = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    added = {f"model.layers.{i}.mlp.{p}.bias" for i in (0, 1)
             for p in ("gate_proj", "up_proj", "down_proj")}
    assert set(index) == set(old) | added and set(record["added_biases"]) == added
    after = tensors(out)
    assert all(t.dtype == torch.bfloat16 for t in after.values())
    assert sha(src / "tokenizer_config.json") == sha(out / "tokenizer_config.json")

    ids = torch.tensor([[2, 5, 9, 13, 40, 7]])
    reference = type(model).from_pretrained(src, dtype="auto").eval()
    sgm_ext.patch(reference, scales, mode="fold", strength=STRENGTH)
    exported = type(model).from_pretrained(out, dtype="auto").eval()
    assert exported.dtype == torch.bfloat16
    assert torch.equal(logits(exported, {"input_ids": ids}),
                       logits(reference, {"input_ids": ids}))
    # the shift changed the output: a bias that is not all zeros
    assert after["model.layers.1.mlp.down_proj.bias"].abs().max() > 0
    assert after["model.layers.0.mlp.down_proj.bias"].abs().max() == 0


def test_an_input_shift_gains_the_first_projections_biases(tmp_path):
    """A shift on an MLP's input site enters the gate and up biases as W b: a bf16 Llama
    without biases exports with mlp_bias on (down's bias added as zeros), computing bitwise
    what fold mode computes; scales on the input site multiply gate's and up's columns."""
    model = planted_llama().to(torch.bfloat16)
    src = saved(tmp_path, "model", model)
    g = torch.Generator().manual_seed(5)
    h = model.config.hidden_size
    scales = ScaleSet({"model.layers.0.mlp.input": torch.rand(h, generator=g)},
                      {"config_fingerprint": config_fingerprint(model.config)},
                      shifts={"model.layers.0.mlp.input": torch.randn(h, generator=g)})
    scales.save(tmp_path / "s.safetensors")
    record = export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)
    mlp = "model.layers.0.mlp"
    assert record["sites"] == {f"{mlp}.input": {"kind": "input", "damped": h,
                                                "shifted": True}}
    assert sorted(record["tensors"]) == [f"{mlp}.gate_proj.weight", f"{mlp}.up_proj.weight"]
    assert sorted(record["added_biases"]) == [f"model.layers.{i}.mlp.{p}.bias" for i in (0, 1)
                                              for p in ("down_proj", "gate_proj", "up_proj")]
    after = tensors(tmp_path / "out")
    assert after[f"{mlp}.gate_proj.bias"].abs().max() > 0
    assert after[f"{mlp}.up_proj.bias"].abs().max() > 0
    assert after[f"{mlp}.down_proj.bias"].abs().max() == 0
    ids = {"input_ids": torch.tensor([[2, 5, 9, 13, 40, 7]])}
    reference = type(model).from_pretrained(src, dtype="auto").eval()
    sgm_ext.patch(reference, scales, mode="fold", strength=STRENGTH)
    exported = type(model).from_pretrained(tmp_path / "out", dtype="auto").eval()
    assert torch.equal(logits(exported, ids), logits(reference, ids))


def test_an_input_shift_on_a_model_without_mlp_bias_is_refused_naming_the_site(tmp_path):
    model, _ = build("mistral")
    src = saved(tmp_path, "model", model)
    ScaleSet({}, shifts={"model.layers.1.mlp.input": torch.ones(32)}).save(
        tmp_path / "s.safetensors")
    with pytest.raises(ValueError, match=r"cannot export the shift of site "
                                         r"model\.layers\.1\.mlp\.input: model\.layers\.1\.mlp\."
                                         r"gate_proj has no bias and MistralConfig"):
        export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shifted", [False, True])
def test_one_file_checkpoint_with_and_without_shifts(tmp_path, shifted):
    """A checkpoint of one model.safetensors (no index, as SmolLM2's): the shifts' biases go
    into that file, no index is made, and the export computes what fold mode computes."""
    model, _, scales = _bf16_sharded(tmp_path)
    src = saved(tmp_path, "single", model)
    assert sorted(n for n in os.listdir(src) if "safetensors" in n) == ["model.safetensors"]
    if not shifted:
        scales = ScaleSet(dict(scales.items()), scales.metadata)
        scales.save(tmp_path / "s.safetensors")
    record = export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)
    out = tmp_path / "out"
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]
    assert json.loads((out / "config.json").read_text()).get("mlp_bias", False) is shifted
    assert bool(record["added_biases"]) is shifted
    assert ("model.layers.1.mlp.down_proj.bias" in tensors(out)) is shifted
    ids = {"input_ids": torch.tensor([[2, 5, 9, 13, 40, 7]])}
    reference = type(model).from_pretrained(src, dtype="auto").eval()
    sgm_ext.patch(reference, scales, mode="fold", strength=STRENGTH)
    exported = type(model).from_pretrained(out, dtype="auto").eval()
    assert torch.equal(logits(exported, ids), logits(reference, ids))


def test_the_export_is_readable_as_the_umask_says(tmp_path):
    """Files 0666 and directories 0777 less the umask, as cp would make them (the temporary
    directory's 0700 / mkstemp's 0600 would keep a serving container out)."""
    _, src, _ = _bf16_sharded(tmp_path)
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("x\n")
    old = os.umask(0o022)
    try:
        export_model(src, tmp_path / "s.safetensors", tmp_path / "out", STRENGTH)
    finally:
        os.umask(old)
    out = tmp_path / "out"
    modes = {p: os.stat(os.path.join(d, p)).st_mode & 0o777
             for d, dirs, files in os.walk(out) for p in dirs + files}
    modes["."] = os.stat(out).st_mode & 0o777
    assert modes["."] == 0o755 and modes["extra"] == 0o755
    assert all(m == 0o644 for p, m in modes.items() if p not in (".", "extra")), modes


def test_plain_transformers_loads_it_without_sgm_ext_and_inspect_says_what_was_folded(
        tmp_path):
    model, src, scales = _bf16_sharded(tmp_path)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    res = subprocess.run([sys.executable, "-m", "sgm_ext", "export", "--model", src, "--scales",
                          tmp_path / "s.safetensors", "--out", tmp_path / "out", "--strength",
                          str(STRENGTH)], capture_output=True, text=True, cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "wrote" in res.stdout and "biases added" in res.stdout
    script = (  # sgm_ext cannot be imported in this process
        "import sys; sys.modules['sgm_ext'] = None\n"
        "import torch, transformers\n"
        f"m = transformers.AutoModelForCausalLM.from_pretrained({str(tmp_path / 'out')!r}, "
        "dtype='auto').eval()\n"
        "with torch.no_grad():\n"
        "    out = m(input_ids=torch.tensor([[2, 5, 9, 13, 40, 7]])).logits\n"
        f"torch.save(out, {str(tmp_path / 'logits.pt')!r})\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    reference = type(model).from_pretrained(src, dtype="auto").eval()
    sgm_ext.patch(reference, scales, mode="fold", strength=STRENGTH)
    assert torch.equal(torch.load(tmp_path / "logits.pt"),
                       logits(reference, {"input_ids": torch.tensor([[2, 5, 9, 13, 40, 7]])}))

    res = subprocess.run([sys.executable, "-m", "sgm_ext", "inspect", tmp_path / "out"],
                         capture_output=True, text=True, cwd=ROOT, timeout=HANG_S)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sha(tmp_path / "s.safetensors") in res.stdout and "strength: 0.7" in res.stdout
    assert "model.layers.1.mlp.down_proj: down, 0 damped, shifted" in res.stdout


def test_an_earlier_export_is_replaced_and_nothing_is_left_beside(tmp_path):
    model, src, scales = _bf16_sharded(tmp_path)
    export_model(src, tmp_path / "s.safetensors", tmp_path / "out", 1.0)
    first = tensors(tmp_path / "out")
    record = export_model(src, tmp_path / "s.safetensors", tmp_path / "out", 0.5)
    assert json.loads((tmp_path / "out" / SIDECAR).read_text())["strength"] == 0.5
    assert record["strength"] == 0.5
    assert not torch.equal(first["model.layers.1.mlp.up_proj.weight"],
                           tensors(tmp_path / "out")["model.layers.1.mlp.up_proj.weight"])
    assert sorted(os.listdir(tmp_path)) == ["model", "out", "s.safetensors"]
