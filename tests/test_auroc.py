"""AUROC parity with sklearn.metrics.roc_auc_score (the reference), ties included."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from sgm_ext.profile.auroc import auroc, auroc_p_values, benjamini_hochberg


def _sklearn(scores, labels):
    s = scores.double().numpy()
    return np.array([roc_auc_score(labels.numpy(), s[:, j]) for j in range(s.shape[1])])


def _tied_scores(n, m, dtype, gen):
    """Few distinct values (many ties), constant columns, -0.0 beside +0.0, large magnitudes."""
    x = torch.randint(-3, 4, (n, m), generator=gen).to(dtype) * 0.5
    x[:, 0] = 7.0  # constant neuron
    x[:, 1] = 0.0
    x[::2, 1] = -0.0  # equal to +0.0: one tie group
    x[:, 2] = torch.randn(n, generator=gen).to(dtype) * 1e4  # continuous
    x[:, 3] = -x[:, 2]
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_pos", [1, 3, 150])
def test_auroc_equals_sklearn_with_ties(dtype, n_pos):
    gen = torch.Generator().manual_seed(n_pos)
    n, m = 301, 37
    x = _tied_scores(n, m, dtype, gen)
    labels = torch.zeros(n, dtype=torch.int64)
    labels[torch.randperm(n, generator=gen)[:n_pos]] = 1
    # small blocks: several blocks of neurons, run on worker threads
    got = auroc(x, labels, block_elements=5 * n, threads=2)
    assert got.dtype == torch.float64 and got.shape == (m,)
    np.testing.assert_allclose(got.numpy(), _sklearn(x, labels), rtol=0, atol=1e-9)
    assert got[0] == 0.5  # constant neuron


def test_auroc_continuous_non_contiguous_input():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 513, generator=gen)
    x = base.t()  # [513, 64] non-contiguous view: 513 samples, 64 neurons
    labels = torch.rand(513, generator=gen) < 0.3
    before = base.clone()
    got = auroc(x, labels, block_elements=1000)
    assert torch.equal(base, before)  # the caller's tensor is not written
    np.testing.assert_allclose(got.numpy(), _sklearn(x, labels.long()), rtol=0, atol=1e-9)


def test_auroc_huge_finite_values_are_not_mistaken_for_bad_ones():
    x = torch.full((6, 3), 3e38)  # their sum overflows to inf, each value is finite
    x[1, 0] = -3e38
    labels = torch.tensor([1, 0, 1, 0, 1, 0])
    np.testing.assert_allclose(auroc(x, labels).numpy(), _sklearn(x, labels), rtol=0, atol=1e-9)


def test_auroc_rejects_bad_input():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="both classes"):
        auroc(x, torch.ones(10))
    with pytest.raises(ValueError, match=r"labels\[2\] is 2"):
        auroc(x, torch.tensor([0, 1, 2, 0, 1, 0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match=r"expected \[9, neurons\]"):
        auroc(x, torch.tensor([0, 1] * 4 + [0]))
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match=r"site\[3, 2\] is nan"):
        auroc(x, torch.tensor([0, 1] * 5), name="site")


# ------------------------------------------------------------------ chance: p-values and FDR

@pytest.mark.parametrize(("n_pos", "n_neg"), [(1, 5), (3, 4), (4, 4), (5, 3), (2, 7)])
def test_p_values_equal_the_exact_permutation_null(n_pos, n_neg):
    """P(AUROC >= observed) over every assignment of the labels, counted by brute force."""
    import itertools

    gen = torch.Generator().manual_seed(10 * n_pos + n_neg)
    n = n_pos + n_neg
    scores = torch.randn(n, 6, generator=gen)
    labels = torch.zeros(n, dtype=torch.bool)
    labels[:n_pos] = True
    observed = auroc(scores, labels)
    at_least = torch.zeros(6, dtype=torch.float64)
    splits = list(itertools.combinations(range(n), n_pos))
    for positives in splits:
        perm = torch.zeros(n, dtype=torch.bool)
        perm[list(positives)] = True
        at_least += (auroc(scores, perm) >= observed - 1e-12).double()
    torch.testing.assert_close(auroc_p_values(observed, n_pos, n_neg), at_least / len(splits),
                               rtol=1e-12, atol=0)


def test_p_values_normal_approximation_joins_the_exact_one():
    # beyond EXACT_PAIRS pairs the normal approximation takes over; at the border they agree
    values = torch.tensor([0.5, 0.55, 0.6, 0.7])
    exact = auroc_p_values(values, 50, 50)  # 2500 pairs: exact
    approx = auroc_p_values(values, 50, 51)  # 2550 pairs: normal
    torch.testing.assert_close(approx, exact, rtol=0.05, atol=2e-4)
    assert approx[0] == pytest.approx(0.5, abs=0.01) and (approx.diff() < 0).all()


def test_benjamini_hochberg_on_a_worked_example():
    p = torch.tensor([0.01, 0.04, 0.03, 0.005, 0.2])
    # sorted 0.005 0.01 0.03 0.04 0.2 against 0.01 0.02 0.03 0.04 0.05: the largest k is 4
    assert benjamini_hochberg(p, 0.05).tolist() == [True, True, True, True, False]
    # against 0.005 0.01 0.015 0.02 0.025: k is 2
    assert benjamini_hochberg(p, 0.025).tolist() == [True, False, False, True, False]
    assert not benjamini_hochberg(p, 0.01).any()
    assert not benjamini_hochberg(torch.tensor([0.3, 0.9]), 0.05).any()
