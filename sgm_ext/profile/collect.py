"""Collection: forward passes over labelled rows, pooled responses of every site into a store.

Runs checkpoint every few batches and resume at the batch where they stopped; under torch
distributed the batches are dealt out to the ranks and rank 0 gathers the responses.
"""
import inspect
import json
import math
import os
import warnings
from typing import Optional

import torch

from ..core.files import write_json
from ..core.fingerprints import config_fingerprint, processor_fingerprint, weights_fingerprint
from ..core.pause import pause_point
from ..core.progress import progress_bar
from .data import Dataset, load_rows
from .inputs import (
    MODALITIES,
    LengthLimit,
    default_max_length,
    drop_unusable_images,
    encode_batch,
    input_device,
    resolve_format,
    takes_images,
    tokenizer_of,
    unusable_images_warning,
)
from .pooling import POOLINGS, Pooler, pooling_hooks, resolve_sites
from .responses import DEFAULT_RAM_BUDGET, Responses

CHECKPOINT_STATE = "state.json"


def collect(model, data, *, processor=None, sites=("mid",), pooling="mean", modality=None,
            batch_size=8, padding_side=None, skip_bad_rows=False, max_samples=None,
            ram_budget=DEFAULT_RAM_BUDGET, spill_dir=None, checkpoint_dir=None,
            checkpoint_every=50, max_length=None, truncate=True, input_format="auto",
            progress=False) -> Optional[Responses]:
    """Pooled responses of `model`'s neurons to every row of `data` -> Responses.

    The result maps each site to a [N, neurons] float32 tensor (one row per data row, in data
    order) and carries the labels [N].

    data: a JSONL / CSV path, an iterable of row dicts, or a data.Dataset. processor: the
    tokenizer or multimodal processor that prepares the rows. sites: site kinds ("mid",
    "gate", "up", "down", "gate_up", "fc1", "input": the MLP's input) over the language
    model's MLPs, or full site names. pooling: "mean", "max" or "last" over the sample's
    selected tokens, padding never included. modality: None / "sample" (the row's own
    tokens: its text and image tokens, not the chat template's), "all" (every token),
    "text", "image" (the sample's text / image tokens) or "response" (the tokens of the
    row's `response`, after the chat prompt).
    input_format: "chat" (the chat template), "raw" (the text as it is), "auto" (chat when the
    processor has a template). padding_side: "left" / "right"; default the tokenizer's.

    ram_budget: bytes of responses kept in RAM before they spill to memory-mapped files in
    spill_dir (default a temporary directory). checkpoint_dir: responses and progress are
    saved there every `checkpoint_every` batches; a call with the same arguments continues
    from it, and gives the result an uninterrupted run gives.

    max_length: tokens per row at most (default: the model's context length, at most
    inputs.LENGTH_CAP); a longer text-only row is cut to it (one warning counts them) or, with
    truncate=False, refused by row number. Rows with an image and a text-only processor: the
    images are ignored with a warning (refused for modality "image", where rows without an
    image are refused too, or with skip_bad_rows skipped and counted).

    Under torch.distributed (e.g. torchrun) batch b is run by rank b % world_size; rank 0
    gathers and returns all responses, the other ranks return None.
    """
    modality = "sample" if modality is None else modality
    padding_side = _check_options(processor, pooling, modality, batch_size, padding_side,
                                  checkpoint_every)
    dataset = data if isinstance(data, Dataset) else \
        load_rows(data, skip_bad_rows=skip_bad_rows, max_samples=max_samples)
    dataset = _check_images(dataset, processor, modality, skip_bad_rows)
    fmt = resolve_format(processor, input_format)
    limit = LengthLimit(default_max_length(model) if max_length is None else max_length,
                        truncate)
    site_map = resolve_sites(model, sites)
    neurons = {site: info.site_size(kind) for site, (info, kind) in site_map.items()}
    rank, world = _dist()
    n_batches = math.ceil(len(dataset.rows) / batch_size)
    mine = [b for b in range(n_batches) if b % world == rank]
    signature = _run_signature(model, dataset, site_map, pooling, modality, batch_size,
                               padding_side, world)
    signature.update(max_length=limit.max_length, truncate=limit.truncate, input_format=fmt)
    if checkpoint_dir is not None:  # hashing the weights is for resuming only
        signature.update(weights_fingerprint=weights_fingerprint(model),
                         processor_fingerprint=processor_fingerprint(processor))

    checkpoint = None
    local_dir = spill_dir
    if checkpoint_dir is not None:
        local_dir = os.path.join(checkpoint_dir, f"rank{rank}") if world > 1 else checkpoint_dir
        checkpoint = _Checkpoint(local_dir, checkpoint_dir, signature, checkpoint_every)
    store = Responses(neurons, ram_budget=ram_budget, spill_dir=local_dir)
    done = checkpoint.resume(store) if checkpoint else 0  # of my batches
    if checkpoint is None and local_dir is not None:
        store.reopen(0, [])  # leftovers of an earlier run in the same directory

    _run_batches(model, processor, dataset.rows, mine, done, store, site_map, pooling, modality,
                 batch_size, padding_side, limit, fmt, checkpoint, progress and rank == 0)
    if limit.summary():
        warnings.warn(limit.summary(), stacklevel=2)
    if world > 1:
        store = _gather(store, dataset.rows, batch_size, n_batches, rank, world, ram_budget,
                        spill_dir)
        if store is None:
            return None
    store.metadata = {key: signature[key] for key in
                      ("model_type", "config_fingerprint", "data_fingerprint", "pooling",
                       "modality", "input_format")}
    return store


def _check_options(processor, pooling, modality, batch_size, padding_side, checkpoint_every):
    """ValueError for a bad option; returns the padding side to use."""
    if processor is None:
        raise ValueError("collect needs a processor (tokenizer or multimodal processor)")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}")
    padding_side = padding_side or getattr(tokenizer_of(processor), "padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side


def _check_images(dataset, processor, modality, skip_bad_rows):
    """The rows as the processor and modality can take them (see collect)."""
    rows = dataset.rows
    with_image = [r for r in rows if r.image is not None]
    if with_image and not takes_images(processor):
        if modality == "image":
            raise ValueError(f"modality 'image' needs a processor that takes images; "
                             f"{type(processor).__name__} takes text only")
        rows, n = drop_unusable_images(rows, processor)
        warnings.warn(unusable_images_warning(n, processor, with_image[0].number), stacklevel=3)
        return dataset._replace(rows=rows)
    if modality == "image" and len(with_image) < len(rows):
        without = [r for r in rows if r.image is None]
        if not skip_bad_rows:
            raise ValueError(f"row {without[0].number} has no tokens to pool for "
                             f"modality='image': it has no image ({len(without)} rows have "
                             "none; --skip-bad-rows skips them)")
        skipped = [(r.number, "no image (modality 'image')") for r in without]
        warnings.warn(f"skipped {len(without)} rows without an image (modality 'image'; the "
                      f"first: row {without[0].number})", stacklevel=3)
        return dataset._replace(rows=with_image, skipped=dataset.skipped + skipped)
    return dataset


def _dist():
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_signature(model, dataset, sites, pooling, modality, batch_size, padding_side,
                   world):
    """What the collected responses depend on: the data's content and the options (collect
    adds the weights' and the processor's fingerprints when it checkpoints); a checkpoint
    resumes only when it is equal."""
    return {"model_type": str(getattr(model.config, "model_type", "")),
            "config_fingerprint": config_fingerprint(model.config),
            "data_fingerprint": dataset.fingerprint(), "rows": len(dataset.rows),
            "sites": list(sites), "pooling": pooling, "modality": modality,
            "batch_size": batch_size, "padding_side": padding_side, "world_size": world}


# What a mismatch of a signature entry means, for the message that refuses to resume.
_SIGNATURE_WORDS = {"weights_fingerprint": "the model's weights",
                    "processor_fingerprint": "the processor (tokenizer, chat template, images)",
                    "config_fingerprint": "the model's sizes", "data_fingerprint": "the data",
                    "rows": "the number of rows", "world_size": "the number of processes"}


class ProfileInterrupted(KeyboardInterrupt):
    """Ctrl-C during collection; the message says where it stopped and how to resume."""


class _Checkpoint:
    """A rank's progress in its directory: the state file beside the store's spill files."""

    def __init__(self, directory, user_dir, signature, every):
        self.state_path = os.path.join(directory, CHECKPOINT_STATE)
        self.user_dir, self.signature, self.every = user_dir, signature, every
        self.saved = 0  # batches done at the last saved state

    def resume(self, store):
        """Cut the store back to the last saved state; returns the batches done (0: none)."""
        if not os.path.exists(self.state_path):
            store.reopen(0, [])  # leftovers of an earlier run in the same directory
            return 0
        with open(self.state_path) as f:
            state = json.load(f)
        if state["signature"] != self.signature:
            diff = [_SIGNATURE_WORDS.get(k, k) for k in self.signature
                    if state["signature"].get(k) != self.signature[k]]
            raise ValueError(f"checkpoint {self.user_dir} is from another run (differs in: "
                             f"{', '.join(diff)}); use another directory or delete it")
        store.reopen(state["rows_done"], state["labels"])
        self.saved = state["batches_done"]
        return self.saved

    def maybe_save(self, store, batches_done, last):
        if batches_done % self.every == 0 or last:
            store.flush()
            write_json(self.state_path, {"signature": self.signature,
                                         "batches_done": batches_done, "rows_done": len(store),
                                         "labels": store.label_list()})
            self.saved = batches_done
            return True
        return False


def _forward_kwargs(model):
    kwargs = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kwargs["logits_to_keep"] = 1  # the logits are not needed: compute the fewest
    return kwargs


def _run_batches(model, processor, rows, batches, done, store, site_map, pooling, modality,
                 batch_size, padding_side, limit, fmt, checkpoint, progress):
    """Forward `batches` (indices into rows, batch_size each) from the done-th on, appending
    the pooled responses to the store and checkpointing as it goes. Ctrl-C raises
    ProfileInterrupted saying where it stopped and how to resume."""
    pooler = Pooler(pooling)
    device = input_device(model)
    forward_kwargs = _forward_kwargs(model)
    bar = progress_bar(len(batches), desc="profile", unit="batch", enabled=progress,
                       initial=done)
    try:
        with pooling_hooks(model, site_map, pooler), torch.inference_mode():
            k = done
            for k in range(done, len(batches)):
                batch_rows = rows[batches[k] * batch_size:(batches[k] + 1) * batch_size]
                inputs, select = encode_batch(model, processor, batch_rows, modality,
                                              padding_side, limit, fmt)
                pooler.start(select)
                model(**{key: v.to(device) for key, v in inputs.items()}, **forward_kwargs)
                missing = set(site_map) - set(pooler.out)
                if missing:
                    raise RuntimeError(f"sites not reached by the forward: {sorted(missing)[:3]}")
                store.append(pooler.out, [r.label for r in batch_rows])
                pooler.out = {}
                bar.update(1)
                if checkpoint is not None and checkpoint.maybe_save(store, k + 1,
                                                                    k + 1 == len(batches)):
                    pause_point("checkpoint")  # tests interrupt here (core/pause.py)
                pause_point("batch")
    except KeyboardInterrupt:
        where = f"interrupted at batch {k + 1} of {len(batches)}"
        if checkpoint is None:
            raise ProfileInterrupted(f"{where}; nothing was saved (a --checkpoint-dir saves "
                                     "progress to resume from)") from None
        if not checkpoint.saved:  # no state written yet, by this run or an earlier one
            raise ProfileInterrupted(f"{where}; nothing was saved yet (the first checkpoint "
                                     f"comes after batch {min(checkpoint.every, len(batches))}"
                                     ")") from None
        raise ProfileInterrupted(f"{where}; rerun the same command to resume from the "
                                 f"checkpoint in {checkpoint.user_dir} (after batch "
                                 f"{checkpoint.saved})") from None
    finally:
        bar.close()


def _gather(store, rows, batch_size, n_batches, rank, world, ram_budget, spill_dir):
    """Rank 0 receives every rank's rows and puts them back in data order."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [min(batch_size, len(rows) - b * batch_size) for b in range(n_batches)]
    per_rank = [sum(sizes[b] for b in range(r, n_batches, world)) for r in range(world)]
    longest = max(per_rank)
    out = Responses(store.neurons, ram_budget=ram_budget, spill_dir=spill_dir) if rank == 0 \
        else None
    parts = {}
    for site, n in store.neurons.items():
        local = torch.zeros(longest, n, device=device)
        local[:len(store)] = store[site].to(device)
        gathered = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
        dist.gather(local, gathered, dst=0)
        if rank == 0:
            parts[site] = [g.cpu() for g in gathered]
    if rank != 0:
        return None
    offsets = [0] * world
    for b in range(n_batches):
        r, size = b % world, sizes[b]
        out.append({site: parts[site][r][offsets[r]:offsets[r] + size] for site in parts},
                   [row.label for row in rows[b * batch_size:b * batch_size + size]])
        offsets[r] += size
    return out
