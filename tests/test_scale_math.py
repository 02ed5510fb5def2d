"""One form of s_eff everywhere: scale_math.effective_scale, and every backend, mode, the
profiler and interop agreeing with it bit for bit where they promise to."""
import pytest
import torch
from op_cases import rand_scale
from patch_models import build

import sgm_ext
from sgm_ext.core import scale_math
from sgm_ext.patching import interop
from sgm_ext.profile.expertise import Expertise

CPU_BACKENDS = [n for n, i in sgm_ext.backends().items() if i.available and "cpu" in i.devices]
STRENGTHS = [0.0, 0.3, 0.7, 1.0, 1 / 3]


def test_effective_scale_form_and_its_ends(gen):
    scale = rand_scale(1029, gen)
    assert scale_math.effective_scale(scale, None) is scale
    assert scale_math.effective_scale(scale, 1.0) is scale
    assert torch.equal(scale_math.effective_scale(scale, 0.0), torch.ones_like(scale))
    for lam in STRENGTHS:
        st = torch.tensor(lam, dtype=torch.float32)
        want = st * scale + (1 - st)  # the one form, in float32
        assert torch.equal(scale_math.effective_scale(scale, lam), want), lam
        # a tensor holding the same value gives the same bits, per row too
        rows = torch.full((3, 1), lam)
        assert torch.equal(scale_math.effective_scale(scale, rows), want.expand(3, -1)), lam
    # float64 scales keep their dtype and evaluate in it
    s64 = scale.double()
    assert scale_math.effective_scale(s64, 0.3).dtype == torch.float64


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("lam", STRENGTHS)
def test_backends_float_and_per_row_strength_agree_to_the_bit(backend, lam, gen, monkeypatch):
    monkeypatch.setenv("SGM_EXT_BACKEND", backend)
    gate, up = torch.randn(4, 1029, generator=gen), torch.randn(4, 1029, generator=gen)
    scale = rand_scale(1029, gen)
    by_float = sgm_ext.act_mul_scale(gate, up, scale, strength=lam)
    by_rows = sgm_ext.act_mul_scale(gate, up, scale, strength=torch.full((4,), lam))
    # the same op with s_eff computed beforehand by scale_math
    by_eff = sgm_ext.act_mul_scale(gate, up, scale_math.effective_scale(scale, lam))
    assert torch.equal(by_float, by_rows)
    assert torch.equal(by_float, by_eff)


@pytest.mark.parametrize("lam", STRENGTHS)
def test_to_scales_at_a_strength_is_effective_scale_of_the_full_scales(lam):
    auroc = torch.linspace(0.0, 1.0, 101, dtype=torch.float64)
    exp = Expertise({"a.mid": auroc})
    full = exp.to_scales(strength=1.0, selection="threshold")["a.mid"]
    assert torch.equal(exp.to_scales(strength=lam, selection="threshold")["a.mid"],
                       scale_math.effective_scale(full, lam))
    # AurA's alpha for the experts (AUROC > 0.5), 1 for the rest
    want = torch.where(auroc > 0.5, 1.0 - 2.0 * (auroc - 0.5), 1.0).float()
    assert torch.equal(full, want)


def test_from_act_uses_the_same_alpha_and_blend(tmp_path):
    auroc = torch.tensor([0.2, 0.5, 0.6, 0.9, 1.0])
    torch.save({"auroc": auroc}, tmp_path / "m.layers.0.mlp.up_proj.statedict")  # ml-act's
    got = interop.from_act(tmp_path, strength=0.3)["m.layers.0.mlp.up_proj"]  # the run's strength
    alpha = scale_math.method_scales(auroc, auroc > 0.5, "aura")
    assert torch.equal(got, scale_math.effective_scale(alpha, 0.3))


@pytest.mark.parametrize("mode", ["fused", "hook"])
def test_patch_float_and_per_sequence_strength_agree_to_the_bit(mode):
    model, inputs = build("llama")
    model.float()
    sites = {s: torch.rand(n, generator=torch.Generator().manual_seed(i))
             for i, (s, n) in enumerate([("model.layers.0.mlp.mid", 48),
                                         ("model.layers.1.mlp.mid", 48)])}
    lam = 0.3
    batch = inputs["input_ids"].shape[0]
    with torch.no_grad():
        with sgm_ext.patched(model, sites, mode=mode, strength=lam):
            by_float = model(**inputs).logits
        with sgm_ext.patched(model, sites, mode=mode, strength=torch.full((batch,), lam)):
            by_rows = model(**inputs).logits
    assert torch.equal(by_float, by_rows)


def test_strength_checks_name_the_entry():
    with pytest.raises(ValueError, match=r"--strength is 1\.5; --strength must be in \[0, 1\]"):
        scale_math.check_strength(1.5, per_sequence=False, name="--strength")
    with pytest.raises(ValueError, match=r"strength\[1\] is nan"):
        scale_math.check_strength(torch.tensor([0.5, float("nan")]))
    with pytest.raises(TypeError, match="must be a float here"):
        scale_math.check_strength(torch.tensor([0.5]), per_sequence=False)
    with pytest.raises(ValueError, match=r"scales\['s'\]\[2\] is -1\.0"):
        scale_math.check_scale_values("s", torch.tensor([1.0, 0.5, -1.0]))
