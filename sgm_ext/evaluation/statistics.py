"""The evaluation's uncertainty: Wilson score intervals of rates, the exact McNemar test of
paired outcomes, and bootstrap intervals of perplexity."""
import math

import torch


def wilson_interval(k, n, z=1.959964):
    """The Wilson score interval (default 95%) of a rate of k in n, or None for n = 0: it keeps
    inside [0, 1] and stays honest at 0 / n and n / n, where the normal one collapses."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half)]


def mcnemar_exact(b, c):
    """Two-sided p-value of the exact McNemar test for b and c discordant pairs (pairs where
    only the first, or only the second, of two paired outcomes is positive): the binomial test
    of min(b, c) in b + c draws at 1/2, doubled, at most 1. Exact at every count (no
    chi-square approximation, no continuity correction); 1.0 when there is no discordant
    pair."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_test(generations, base, run, field, counted):
    """McNemar on the prompts `counted` selects: `field` (harmful / refusal) of run vs base."""
    pairs = [(g[base][field], g[run][field]) for g in generations if counted(g)]
    b = sum(1 for x, y in pairs if x and not y)  # base yes, run no
    c = sum(1 for x, y in pairs if y and not x)
    n = len(pairs)
    return {"vs": base, "n": n, "base_only": b, "run_only": c,
            "difference": None if not n else (sum(y for _, y in pairs) -
                                              sum(x for x, _ in pairs)) / n,
            "p_value": mcnemar_exact(b, c)}


def bootstrap_perplexity(unpatched, patched, resamples=2000, seed=0):
    """95% bootstrap intervals over the reference passages (resampled with replacement, the
    same draw for both states): of each state's perplexity and of the ratio patched /
    unpatched. unpatched, patched: generation.passage_nll parts of the same passages."""
    gen = torch.Generator().manual_seed(seed)
    nll = torch.tensor([[n for n, _ in side] for side in (unpatched, patched)],
                       dtype=torch.float64)
    count = torch.tensor([c for _, c in unpatched], dtype=torch.float64)
    draws = torch.randint(len(count), (resamples, len(count)), generator=gen)
    ppl = torch.exp(nll[:, draws].sum(-1) / count[draws].sum(-1))  # [2, resamples]
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)

    def ci(values):
        return torch.quantile(values, q).tolist()

    return ci(ppl[0]), ci(ppl[1]), ci(ppl[1] / ppl[0])
