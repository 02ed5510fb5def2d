"""Exact AUROC of many score columns against one set of binary labels.

Rank (Mann-Whitney) form with ties counted one half (DESIGN.md section 2): per neuron,
    AUROC = U / (n_pos n_neg),  U = sum over positives of (#negatives below + #negatives equal / 2),
which is (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg) with average ranks for ties, and what
sklearn.metrics.roc_auc_score returns.

Float32 scores (what the profiler stores) take the fast path: each value becomes an
order-preserving integer key with the label as its lowest bit, so one plain sort of int64 keys
per neuron (numpy's vectorized sort; no argsort, no gather) puts every tie group's negatives
before its positives. Then, for a positive at sorted position p, p minus the positives before
it counts the negatives below or equal to it, and the sum over positives needs only the sum of
the positives' positions. Neurons with tied values subtract half their tied pairs, found from
the run-lengths of equal keys. Float64 scores, which do not fit a key beside a label bit, go
the general way: argsort, average ranks of runs. Counts and position sums are integers far
below 2**53, so the float64 result is exact up to the final division.
"""
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
            self.flip = np.empty((rows, n), np.int32)
            self.key = np.empty((rows, n), np.int64)
            self.is_pos = np.empty((rows, n), np.int64)
            self.equal = np.empty((rows, n - 1), bool)
        return (self.flip[:rows], self.key[:rows], self.is_pos[:rows], self.equal[:rows])


def _u_float32(x, y, scratch):
    """U of each row of x [c, N] float32 (one neuron a row) against y [N] int64 0/1.
    x is overwritten; -0.0 must have been turned into +0.0 (equal values, equal keys)."""
    rows, n = x.shape
    flip, key, is_pos, equal = scratch.get(rows, n)
    bits = x.view(np.int32)
    # Flip the magnitude bits of negative floats: then signed integer order == float order.
    np.right_shift(bits, 31, out=flip)
    np.bitwise_and(flip, 0x7FFFFFFF, out=flip)
    np.bitwise_xor(bits, flip, out=bits)
    np.left_shift(bits, 1, out=key, dtype=np.int64)
    np.bitwise_or(key, y, out=key)  # the label is the lowest bit: negatives first in a tie
    key.sort(axis=1)
    np.bitwise_and(key, 1, out=is_pos)
    n_pos = int(y.sum())
    # A positive at position p has p - (#positives before it) negatives sorted before it: the
    # negatives below it and all the negatives equal to it.
    u = (is_pos @ np.arange(n, dtype=np.int64)).astype(np.float64) - n_pos * (n_pos - 1) / 2
    np.right_shift(key, 1, out=key)  # the value keys alone
    np.equal(key[:, 1:], key[:, :-1], out=equal)
    tied = equal.any(axis=1)
    if tied.any():
        u[tied] -= _tied_pairs(key[tied], is_pos[tied]) / 2
    return u


def _tied_pairs(value, is_pos):
    """Per row: sum over tie groups of n_pos * n_neg in the group (rows sorted by value)."""
    n = value.shape[1]
    is_neg = 1 - is_pos
    neg_before = np.cumsum(is_neg, axis=1) - is_neg
    new_run = np.ones(value.shape, dtype=bool)
    new_run[:, 1:] = value[:, 1:] != value[:, :-1]
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(n), 0), axis=1)
    # The group's negatives all sort before its positives: each positive sees all of them.
    in_run = neg_before - np.take_along_axis(neg_before, run_start, axis=1)
    return (in_run * is_pos).sum(axis=1).astype(np.float64)


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
            slab += 0.0  # -0.0 becomes +0.0
            x = slab.numpy()

            def block(r, x=x, a=a):
                u = _u_float32(x[r:r + step], y, scratch) if fast else _u_general(x[r:r + step], y)
                out[a + r:a + r + step] = u / (n_pos * (n - n_pos))

            list(pool.map(block, range(0, x.shape[0], step)))  # list(): a block's error raises
    return torch.from_numpy(out)
