"""Exact AUROC of many score columns against one set of binary labels.

Rank (Mann-Whitney) form with ties counted one half (DESIGN.md section 2): per neuron,
    AUROC = U / (n_pos n_neg),  U = sum over positives of (#negatives below + #negatives equal / 2),
which is (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg) with average ranks for ties, and what
sklearn.metrics.roc_auc_score returns.

Float32 scores (what the profiler stores) take the fast path: each value becomes a float64
key carrying the label in its lowest mantissa bit, so one plain sort per neuron (numpy's
vectorized sort; no argsort, no gather) orders values and keeps the labels beside them.
Then, for a positive at sorted position p, p minus the positives before it counts the
negatives sorted before it, and the sum over positives needs only the sum of the positives'
positions. Neurons where a positive equals a negative get a correction from the run-lengths
of equal values. Float64 scores, which leave no spare bit, go the general way: argsort,
average ranks of runs. Counts and position sums are integers far below 2**53, so the
float64 result is exact up to the final division.
"""
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Neurons go to the worker threads in blocks of BLOCK_ELEMENTS values; each thread keeps
# scratch arrays of a block's size (~30 bytes an element, 2**20 -> ~30 MB a thread) and
# reuses them: fresh large arrays cost a page fault per 4 KB, more than the work on them.
BLOCK_ELEMENTS = 1 << 20
# The [N, M] scores are transposed to one-neuron-a-row slabs of this many values (float32:
# 128 MB) by torch; large slabs transpose several times faster than block-sized pieces.
SLAB_ELEMENTS = 1 << 25


def check_labels(labels):
    """labels as a 1-D bool numpy array; ValueError unless both classes are present."""
    y = torch.as_tensor(labels).cpu()
    if y.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(y.shape)}")
    if y.dtype != torch.bool:
        bad = (y != 0) & (y != 1)
        if bad.any():
            i = int(bad.nonzero()[0])
            raise ValueError(f"labels[{i}] is {y[i].item()}; labels must be 0 or 1")
        y = y != 0
    n_pos = int(y.sum())
    if n_pos == 0 or n_pos == y.numel():
        raise ValueError(f"AUROC needs both classes; got {n_pos} positive (toxic) and "
                         f"{y.numel() - n_pos} negative samples")
    return y.numpy()


class _Scratch(threading.local):
    """Per-thread work arrays for _u_float32, grown on demand and reused across blocks."""
    shape = (0, 0)

    def get(self, rows, n):
        if self.shape[0] < rows or self.shape[1] != n:
            self.shape = (rows, n)
            self.key = np.empty((rows, n), np.float64)
            self.is_pos = np.empty((rows, n), np.int64)
            self.equal = np.empty((rows, n - 1), bool)
        return self.key[:rows], self.is_pos[:rows], self.equal[:rows]


def _u_float32(x, y, scratch):
    """U of each row of x [c, N] float32 (finite, no -0.0; one neuron a row) against y [N]
    int64 0/1.

    Key: the value in float64 (exact) with the label in the lowest mantissa bit. Distinct
    float32 values stay 2**29 float64 steps apart, so the bit only orders equal values: it
    moves a positive away from zero, after its tied negatives when the value is >= 0 and
    before them when it is < 0."""
    rows, n = x.shape
    key, is_pos, equal = scratch.get(rows, n)
    np.copyto(key, x)
    bits = key.view(np.int64)
    np.bitwise_or(bits, y, out=bits)
    key.sort(axis=1)
    np.bitwise_and(bits, 1, out=is_pos)
    n_pos = int(y.sum())
    # A positive at position p has p - (#positives before it) negatives sorted before it: all
    # negatives below it, and those equal to it when they sort first.
    u = (is_pos @ np.arange(n, dtype=np.int64)).astype(np.float64) - n_pos * (n_pos - 1) / 2
    np.right_shift(bits, 1, out=bits)  # drop the label: equal values, equal integers
    np.equal(bits[:, 1:], bits[:, :-1], out=equal)
    tied = equal.any(axis=1)
    if tied.any():
        u[tied] -= _signed_tied_pairs(bits[tied], is_pos[tied], equal[tied]) / 2
    return u


def _signed_tied_pairs(value, is_pos, equal):
    """Per row: sum over groups of equal values of n_pos * n_neg in the group, + for values
    >= 0 (negatives sorted first: counted whole, so half is taken back) and - for values < 0
    (positives first: not counted, half is added)."""
    rows, n = value.shape
    new_run = np.ones((rows, n), dtype=bool)
    new_run[:, 1:] = ~equal
    run = np.cumsum(new_run.ravel()) - 1  # a run id for every element, over all rows
    size = np.bincount(run)
    pos = np.bincount(run, weights=is_pos.ravel())
    starts = np.flatnonzero(new_run.ravel())
    sign = np.where(value.ravel()[starts] >= 0, 1.0, -1.0)
    return np.bincount(starts // n, weights=sign * pos * (size - pos), minlength=rows)


def _u_general(x, y):
    """U for any float dtype (float64 here): argsort, average 1-based ranks of equal runs."""
    n = x.shape[1]
    order = np.argsort(x, axis=1, kind="stable")
    value = np.take_along_axis(x, order, axis=1)
    pos = np.arange(n)
    new_run = np.ones(value.shape, dtype=bool)
    new_run[:, 1:] = value[:, 1:] != value[:, :-1]
    end_run = np.ones(value.shape, dtype=bool)
    end_run[:, :-1] = new_run[:, 1:]
    first = np.maximum.accumulate(np.where(new_run, pos, 0), axis=1)
    last = np.minimum.accumulate(np.where(end_run, pos, n - 1)[:, ::-1], axis=1)[:, ::-1]
    twice_rank = first + last + 2  # 2 x the average 1-based rank of the run
    n_pos = int(y.sum())
    r_pos = (twice_rank * y[order]).sum(axis=1).astype(np.float64) / 2
    return r_pos - n_pos * (n_pos + 1) / 2


def auroc(scores, labels, *, name="scores", block_elements=BLOCK_ELEMENTS,
          slab_elements=SLAB_ELEMENTS, threads=None):
    """AUROC of every column of `scores` [N, M] (N samples, M neurons) -> float64 tensor [M].

    `scores` may be any [N, M] tensor, a memory-mapped one included: it is read in slabs of
    columns and never written. NaN or infinite scores raise ValueError naming the first bad
    entry (`name` says which tensor it is). A constant column gets 0.5.
    """
    y = check_labels(labels).astype(np.int64)
    if scores.dim() != 2 or scores.shape[0] != y.size:
        raise ValueError(f"{name}: expected [{y.size}, neurons] (one row per label), "
                         f"got shape {tuple(scores.shape)}")
    n, m = scores.shape
    n_pos = int(y.sum())
    fast = scores.dtype in (torch.float32, torch.float16, torch.bfloat16) or \
        not torch.is_floating_point(scores) and scores.dtype.itemsize <= 2
    dtype = torch.float32 if fast else torch.float64
    step = max(1, block_elements // n)
    slab_cols = max(step, slab_elements // n // step * step)
    out = np.empty(m, dtype=np.float64)
    scratch = _Scratch()
    threads = threads or min(torch.get_num_threads(), os.cpu_count() or 1)
    with ThreadPoolExecutor(threads) as pool:
        for a in range(0, m, slab_cols):
            cols = scores[:, a:a + slab_cols]
            slab = torch.empty((cols.shape[1], n), dtype=dtype)  # our copy: the blocks write it
            slab.copy_(cols.t())
            # A sum is finite when every value is (a cheap pass); look closer only when not,
            # as large finite values can overflow it.
            if not torch.isfinite(slab.sum()):
                bad = ~torch.isfinite(slab)
                if bad.any():
                    col, row = (int(i) for i in bad.nonzero()[0])
                    raise ValueError(f"{name}[{row}, {a + col}] is {slab[col, row].item()}: "
                                     "responses must be finite")
            slab += 0.0  # -0.0 becomes +0.0: one key for one value
            x = slab.numpy()

            def block(r, x=x, a=a):
                u = _u_float32(x[r:r + step], y, scratch) if fast else _u_general(x[r:r + step], y)
                out[a + r:a + r + step] = u / (n_pos * (n - n_pos))

            list(pool.map(block, range(0, x.shape[0], step)))  # list(): a block's error raises
    return torch.from_numpy(out)


# ------------------------------------------------------------------ chance: p-values, FDR

# Up to this many positive x negative pairs the null distribution of U is computed exactly.
EXACT_PAIRS = 2500


def auroc_p_values(values, n_pos, n_neg):
    """One-sided p-values of AUROCs against chance: P(AUROC >= observed) when the labels are
    exchangeable (toxic and non-toxic rows alike for that neuron). values: AUROCs [...]
    (float64). AUROC = U / (n_pos n_neg) with Mann-Whitney's U; under the null U has the
    distribution of the number of (positive, negative) pairs in order over all orderings,
    computed exactly up to EXACT_PAIRS pairs (the Gaussian binomial coefficient's terms),
    beyond by the normal approximation with continuity correction. Ties are not corrected
    for: they only narrow U's spread, so the p-values err on the large (safe) side."""
    a = torch.as_tensor(values, dtype=torch.float64)
    pairs = n_pos * n_neg
    u = a * pairs
    if pairs <= EXACT_PAIRS:
        tail = torch.from_numpy(_exact_upper_tail(n_pos, n_neg))  # P(U >= k), k = 0..pairs
        k = torch.ceil(u - 1e-9).clamp(0, pairs).long()
        return tail[k]
    sd = math.sqrt(pairs * (n_pos + n_neg + 1) / 12.0)
    z = (u - pairs / 2.0 - 0.5) / sd
    return 0.5 * torch.erfc(z / math.sqrt(2.0))


def _exact_upper_tail(m, n):
    """P(U >= k) for k = 0 .. m n under the null: the coefficients of prod_{i=1..m}
    (1 - q^(n+i)) / (1 - q^i) count the orderings with U = k (exact integers)."""
    counts = [1] + [0] * (m * n)
    for i in range(1, m + 1):
        for k in range(m * n, n + i - 1, -1):  # times (1 - q^(n+i))
            counts[k] -= counts[k - n - i]
        for k in range(i, m * n + 1):  # divided by (1 - q^i)
            counts[k] += counts[k - i]
    total = math.comb(m + n, m)
    tail, running = [0.0] * (m * n + 1), 0
    for k in range(m * n, -1, -1):
        running += counts[k]
        tail[k] = running / total
    return np.array(tail)


def benjamini_hochberg(p_values, q):
    """bool mask of the same shape: the discoveries of the Benjamini-Hochberg procedure at
    false discovery rate q over all the p-values given (the largest k with p_(k) <= q k / M,
    and every p at most p_(k))."""
    p = torch.as_tensor(p_values, dtype=torch.float64)
    flat = p.reshape(-1)
    order = torch.sort(flat).values
    m = flat.numel()
    below = order <= q * torch.arange(1, m + 1, dtype=torch.float64) / m
    if not below.any():
        return torch.zeros_like(p, dtype=torch.bool)
    cut = order[int(below.nonzero().max())]
    return p <= cut
