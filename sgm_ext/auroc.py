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
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

# Elements per block of neurons. A block's keys and temporaries take ~40 bytes an element, so
# 2**21 keeps each worker near 100 MB however many neurons a site has.
BLOCK_ELEMENTS = 1 << 21


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


def _u_float32(x, y, key):
    """U of each row of x [c, N] float32 (one neuron a row) against y [N] int64 0/1.

    `key` is a scratch int64 array of x's shape; x is overwritten."""
    n = x.shape[1]
    x += np.float32(0)  # -0.0 becomes +0.0: equal values must get equal keys
    bits = x.view(np.int32)
    # Flip the magnitude bits of negative floats: then signed integer order == float order.
    flip = np.right_shift(bits, 31)
    np.bitwise_and(flip, 0x7FFFFFFF, out=flip)
    np.bitwise_xor(bits, flip, out=bits)
    key[...] = bits
    np.left_shift(key, 1, out=key)
    np.bitwise_or(key, y, out=key)
    key.sort(axis=1)
    is_pos = key & 1
    n_pos = int(y.sum())
    # A positive at position p has p - (#positives before it) negatives sorted before it: the
    # negatives below it and all the negatives equal to it.
    u = (is_pos @ np.arange(n, dtype=np.int64)).astype(np.float64) - n_pos * (n_pos - 1) / 2
    np.right_shift(key, 1, out=key)  # the value keys alone
    tied = (key[:, 1:] == key[:, :-1]).any(axis=1)
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


def auroc(scores, labels, *, name="scores", block_elements=BLOCK_ELEMENTS, threads=None):
    """AUROC of every column of `scores` [N, M] (N samples, M neurons) -> float64 tensor [M].

    `scores` may be any [N, M] tensor, a memory-mapped one included: it is read in blocks of
    columns. NaN or infinite scores raise ValueError naming the first bad entry (`name` says
    which tensor it is). A constant column gets 0.5.
    """
    y = check_labels(labels).astype(np.int64)
    if scores.dim() != 2 or scores.shape[0] != y.size:
        raise ValueError(f"{name}: expected [{y.size}, neurons] (one row per label), "
                         f"got shape {tuple(scores.shape)}")
    n, m = scores.shape
    n_pos = int(y.sum())
    fast = scores.dtype in (torch.float32, torch.float16, torch.bfloat16) or \
        not torch.is_floating_point(scores) and scores.dtype.itemsize <= 2
    step = max(1, block_elements // n)
    out = np.empty(m, dtype=np.float64)

    def block(a):
        chunk = scores[:, a:a + step].to("cpu", torch.float32 if fast else torch.float64)
        bad = ~torch.isfinite(chunk)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}[{row}, {a + col}] is {chunk[row, col].item()}: responses "
                             "must be finite")
        x = np.array(chunk.numpy().T, order="C")  # one neuron a row; a copy, as the fast path writes it
        u = _u_float32(x, y, np.empty(x.shape, np.int64)) if fast else _u_general(x, y)
        out[a:a + step] = u / (n_pos * (n - n_pos))

    threads = threads or min(torch.get_num_threads(), os.cpu_count() or 1)
    starts = range(0, m, step)
    if threads > 1 and len(starts) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(block, starts))  # list() re-raises a block's error here
    else:
        for a in starts:
            block(a)
    return torch.from_numpy(out)
