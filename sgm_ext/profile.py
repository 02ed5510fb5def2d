"""The profiler: neuron responses to labelled data, their expertise (AUROC), and scales.

    responses = collect(model, data, processor=proc)       # forward passes with hooks
    expertise = expertise(responses, responses.labels)     # exact AUROC per neuron
    scales = expertise.to_scales(method="aura")            # a ScaleSet for sgm_ext.patch

`run` does the first two in one call. Formulas: DESIGN.md section 2.

Collection keeps only pooled values (one float32 per sample and neuron): hooks pool each
site's activations over the selected tokens during the forward, the batch's pooled rows are
appended to a `Responses` store that spills to memory-mapped files past a RAM budget. Runs
checkpoint every few batches and resume at the batch where they stopped; under torch
distributed the batches are dealt out to the ranks and rank 0 gathers the responses.
"""
import contextlib
import inspect
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

from . import registry
from .auroc import auroc, check_labels
from .data import load_rows
from .scales import ScaleSet, config_fingerprint

POOLINGS = ("mean", "max", "last")
MODALITIES = ("all", "text", "image", "response")
METHODS = ("aura", "det0", "damp")
DEFAULT_RAM_BUDGET = 4 << 30  # bytes of pooled responses kept in RAM before spilling to disk
_STATE = "state.json"


# ------------------------------------------------------------------------ response store

class Responses:
    """Pooled responses: site -> [N, neurons] float32 (one row per sample), and labels [N].

    Rows arrive in batches (`append`). They stay in RAM as float32 chunks until the chunks
    pass `ram_budget` bytes; then every site's chunks go to a file of raw float32 rows in
    `spill_dir` (one file per site), and reading a site gives a memory-mapped tensor.
    """

    def __init__(self, neurons, *, ram_budget=DEFAULT_RAM_BUDGET, spill_dir=None):
        self.neurons = dict(neurons)  # site -> neurons, in hook order
        self.ram_budget = ram_budget
        self._dir = spill_dir
        self._tmp = None  # TemporaryDirectory when no spill_dir was given
        self._chunks = {site: [] for site in self.neurons}
        self._ram_bytes = 0
        self._rows_on_disk = 0
        self._labels = []
        self.metadata = {}  # pooling, modality, model_type, ... (strings)

    @classmethod
    def from_tensors(cls, tensors, labels, metadata=None):
        """A store over existing [N, neurons] tensors (no copy)."""
        tensors = dict(tensors)
        self = cls({site: t.shape[1] for site, t in tensors.items()}, ram_budget=None)
        for site, t in tensors.items():
            if t.dim() != 2 or t.shape[0] != len(labels):
                raise ValueError(f"responses[{site!r}] has shape {tuple(t.shape)}; expected "
                                 f"[{len(labels)}, neurons] (one row per label)")
            self._chunks[site] = [t]
        self._labels = [int(v) for v in torch.as_tensor(labels).tolist()]
        self.metadata = dict(metadata or {})
        return self

    # -- reading
    def __len__(self):
        return len(self._labels)

    def __iter__(self):
        return iter(self.neurons)

    def __contains__(self, site):
        return site in self.neurons

    @property
    def sites(self):
        return tuple(self.neurons)

    @property
    def labels(self):
        return torch.tensor(self._labels, dtype=torch.int64)

    @property
    def spilled(self):
        """Whether some rows live in files on disk."""
        return self._rows_on_disk > 0

    @property
    def spill_dir(self):
        return self._dir

    def __getitem__(self, site):
        if site not in self.neurons:
            raise KeyError(f"no site {site!r}; sites: {', '.join(self.neurons)}")
        if self.spilled:
            self.flush()
            return self._mapped(site)
        chunks = self._chunks[site]
        if len(chunks) > 1:
            chunks[:] = [torch.cat(chunks)]
        return chunks[0] if chunks else torch.empty(0, self.neurons[site])

    def items(self):
        return ((site, self[site]) for site in self.neurons)

    def _file(self, i):
        return os.path.join(self._dir, f"site{i:05d}.f32")

    def _mapped(self, site):
        i = list(self.neurons).index(site)
        shape = (self._rows_on_disk, self.neurons[site])
        # copy-on-write map: a tensor view of the file that never writes to it
        return torch.from_numpy(np.memmap(self._file(i), np.float32, "c", shape=shape))

    # -- writing
    def append(self, pooled, labels):
        """Add one batch: pooled site -> [b, neurons] tensor, labels [b]."""
        b = len(labels)
        for site, n in self.neurons.items():
            t = pooled[site].detach().to("cpu", torch.float32)
            if t.shape != (b, n):
                raise ValueError(f"batch for {site!r} has shape {tuple(t.shape)}, expected {(b, n)}")
            self._chunks[site].append(t)
            self._ram_bytes += t.numel() * 4
        self._labels.extend(int(v) for v in labels)
        if self.ram_budget is not None and self._ram_bytes > self.ram_budget:
            self.flush()

    def flush(self):
        """Move the rows held in RAM to the spill files (fsynced: a checkpoint relies on it)."""
        if self._dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="sgm-ext-responses-")
            self._dir = self._tmp.name
        os.makedirs(self._dir, exist_ok=True)
        n_ram = len(self._labels) - self._rows_on_disk
        for i, site in enumerate(self.neurons):
            chunks = self._chunks[site]
            if sum(c.shape[0] for c in chunks) != n_ram:
                raise RuntimeError("responses out of step with labels (internal error)")
            with open(self._file(i), "ab") as f:
                for c in chunks:
                    f.write(c.contiguous().numpy().tobytes())
                f.flush()
                os.fsync(f.fileno())
            chunks.clear()
        self._rows_on_disk = len(self._labels)
        self._ram_bytes = 0

    def _reopen(self, rows, labels):
        """Continue after `rows` rows in the spill files (a checkpoint; 0: start afresh).
        Rows written after the checkpoint, or by an earlier run, are cut off."""
        for i, site in enumerate(self.neurons):
            path = self._file(i)
            size = rows * self.neurons[site] * 4
            if not os.path.exists(path):
                if rows:
                    raise ValueError(f"checkpoint file {path} is missing")
                continue
            if os.path.getsize(path) < size:
                raise ValueError(f"checkpoint file {path} is shorter than its state says")
            with open(path, "r+b") as f:
                f.truncate(size)
        self._rows_on_disk = rows
        self._labels = list(labels)


# ------------------------------------------------------------------------ sites and hooks

def language_mlps(model):
    """The MLPs of the model's language part (get_decoder()), whose activations line up with
    the input tokens; all MLPs when the model does not say where its decoder is."""
    mlps = registry.find_mlps(model)
    decoder = None
    if hasattr(model, "get_decoder"):
        with contextlib.suppress(Exception):
            decoder = model.get_decoder()
    prefix = next((p for p, m in model.named_modules() if m is decoder), None)
    if not prefix:
        return mlps
    return {p: info for p, info in mlps.items() if p.startswith(prefix + ".")}


def resolve_sites(model, sites=("mid",)):
    """{site name: (MLPInfo, kind)}: kinds ("mid", "gate", ...) expand over the language
    MLPs; full site names (from registry.site_index) are taken as they are."""
    if isinstance(sites, str):
        sites = (sites,)
    lm = language_mlps(model)
    every = registry.site_index(registry.find_mlps(model))
    if not lm:
        raise ValueError(f"no MLP the sgm-ext registry knows in {type(model).__name__}")
    out = {}
    for entry in sites:
        if entry in every:
            out[entry] = every[entry]
            continue
        kinds = {k for layout in registry.SITE_KINDS.values() for k in layout}
        if entry not in kinds:
            raise ValueError(f"unknown site {entry!r}: give a site kind ({', '.join(sorted(kinds))})"
                             " or a site name of this model (e.g. "
                             f"{next(iter(registry.site_index(lm)))!r})")
        matched = [info for info in lm.values() if entry in registry.SITE_KINDS[info.layout]]
        if not matched:
            raise ValueError(f"no language-model MLP of {type(model).__name__} has a {entry!r} site")
        for info in matched:
            out[info.site(entry)] = (info, entry)
    return out


def _hook_point(model, info, kind):
    """(module, is_pre_hook): mid is the input of the down / fc2 Linear, the rest outputs."""
    mlp = model.get_submodule(info.path)
    if kind == registry.MID:
        out_role = "down" if "down" in info.roles else "fc2"
        return getattr(mlp, info.roles[out_role]), True
    return getattr(mlp, info.roles[kind]), False


class _Pooler:
    """Pools each hooked activation [B, T, n] over the current batch's selected tokens."""

    def __init__(self, pooling):
        self.pooling = pooling
        self.select = None  # [B, T] bool, set before each forward
        self._per_device = {}
        self.out = {}

    def start(self, select):
        self.select, self._per_device, self.out = select, {}, {}

    def _masks(self, device):
        if device not in self._per_device:
            sel = self.select.to(device)
            weights = sel.float() / sel.sum(1, keepdim=True).float()
            last = (sel * torch.arange(1, sel.shape[1] + 1, device=device)).argmax(1)
            self._per_device[device] = (sel, weights, last)
        return self._per_device[device]

    def __call__(self, site, x):
        sel, weights, last = self._masks(x.device)
        if x.dim() != 3 or x.shape[:2] != sel.shape:
            raise RuntimeError(
                f"site {site}: activations of shape {tuple(x.shape)} do not line up with the "
                f"inputs' [batch, tokens] = {tuple(sel.shape)}; only sites on the token "
                "sequence (the language model's MLPs) can be pooled per sample")
        x = x.detach().float()
        if self.pooling == "mean":
            pooled = torch.bmm(weights.unsqueeze(1), x).squeeze(1)
        elif self.pooling == "max":
            pooled = x.masked_fill(~sel.unsqueeze(-1), -math.inf).amax(1)
        else:  # last selected token
            pooled = x[torch.arange(x.shape[0], device=x.device), last]
        self.out[site] = pooled


@contextlib.contextmanager
def _hooks(model, sites, pooler):
    handles = []
    try:
        for site, (info, kind) in sites.items():
            module, pre = _hook_point(model, info, kind)
            if pre:
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, site=site: pooler(site, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda m, args, out, site=site: pooler(site, out)))
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------ inputs

def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def _chat_template_owner(processor):
    for owner in (processor, _tokenizer(processor)):
        if getattr(owner, "chat_template", None):
            return owner
    return None


def _prompt_text(processor, row, with_response):
    """(text, from_template) for one row: the chat template's rendering when there is one."""
    owner = _chat_template_owner(processor)
    response = row.response if with_response else None
    if owner is None:
        text = row.text
        token = getattr(processor, "image_token", None)
        if row.image is not None and token and token not in text:
            text = f"{token}\n{text}"
        return (f"{text} {response}" if response else text), False
    if owner is processor and processor is not _tokenizer(processor):  # multimodal: typed content
        content = ([{"type": "image"}] if row.image is not None else []) + \
            [{"type": "text", "text": row.text}]
        messages = [{"role": "user", "content": content}]
        if response:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": response}]})
    else:
        messages = [{"role": "user", "content": row.text}]
        if response:
            messages.append({"role": "assistant", "content": response})
    text = owner.apply_chat_template(messages, tokenize=False,
                                     add_generation_prompt=not response)
    return text, True


def _encode_one(processor, row, with_response, image):
    text, templated = _prompt_text(processor, row, with_response)
    kwargs = {"return_tensors": "pt", "add_special_tokens": not templated}
    if image is not None:
        enc = processor(text=[text], images=[image], **kwargs)
    elif processor is not _tokenizer(processor):
        enc = processor(text=[text], **kwargs)
    else:
        enc = processor(text, **kwargs)
    return dict(enc)


def _load_image(image):
    if image is None:
        return None
    if isinstance(image, str):
        from PIL import Image

        with Image.open(image) as im:
            return im.convert("RGB")
    return image.convert("RGB")


def _image_token_id(model):
    config = model.config
    for key in ("image_token_id", "image_token_index"):
        for cfg in (config, getattr(config, "text_config", None)):
            value = getattr(cfg, key, None)
            if isinstance(value, int):
                return value
    return None


# Processor outputs that are never one value per token, whatever their shape happens to be.
_NOT_PER_TOKEN = {"pixel_values", "pixel_attention_mask", "image_grid_thw", "video_grid_thw",
                  "image_sizes", "pixel_values_videos"}


def _collate(encodings, pad_id, padding_side):
    """Pad the per-sample token tensors [1, T_i, ...] to one length; concatenate the others
    (pixel values, image grids), which rows without an image do not have."""
    lengths = [e["input_ids"].shape[1] for e in encodings]
    longest = max(lengths)
    batch = {}
    for key in dict.fromkeys(k for e in encodings for k in e):
        parts = [e.get(key) for e in encodings]
        if key not in _NOT_PER_TOKEN and all(torch.is_tensor(p) and p.dim() >= 2 and
                                             p.shape[:2] == (1, n) for p, n in zip(parts, lengths)):
            fill = pad_id if key == "input_ids" else 0
            padded = []
            for p, n in zip(parts, lengths):
                pad = p.new_full((1, longest - n, *p.shape[2:]), fill)
                padded.append(torch.cat([pad, p] if padding_side == "left" else [p, pad], 1))
            batch[key] = torch.cat(padded)
        elif all(p is None or torch.is_tensor(p) for p in parts):
            batch[key] = torch.cat([p for p in parts if p is not None])
        else:
            raise ValueError(f"cannot batch the processor output {key!r}")
    return batch, lengths


def _encode_batch(model, processor, rows, modality, padding_side):
    """(inputs, select [B, T] bool): the model inputs and the tokens each sample pools over."""
    images = [_load_image(r.image) for r in rows]
    with_response = modality == "response"
    encodings = [_encode_one(processor, r, with_response, im) for r, im in zip(rows, images)]
    tok = _tokenizer(processor)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    batch, lengths = _collate(encodings, pad_id, padding_side)
    if "attention_mask" not in batch:
        raise ValueError("the processor gives no attention_mask; sgm-ext needs it to mask padding")
    select = batch["attention_mask"].bool()
    ids = batch["input_ids"]
    if modality in ("image", "text"):
        image_id = _image_token_id(model)
        if image_id is None:
            raise ValueError(f"modality={modality!r} needs the model config's image token id "
                             f"(image_token_id); {type(model.config).__name__} has none")
        is_image = ids == image_id
        select = select & is_image if modality == "image" else select & ~is_image
    elif modality == "response":
        longest = ids.shape[1]
        for i, (row, n, im) in enumerate(zip(rows, lengths, images)):
            if not row.response:
                raise ValueError(f"row {row.number}: modality='response' needs a response in "
                                 "every row")
            prompt_len = _encode_one(processor, row, False, im)["input_ids"].shape[1]
            start = longest - n if padding_side == "left" else 0
            select[i, start:start + min(prompt_len, n)] = False
    empty = (select.sum(1) == 0).nonzero()
    if len(empty):
        row = rows[int(empty[0])]
        raise ValueError(f"row {row.number} has no tokens to pool for modality={modality!r}")
    return batch, select


def _input_device(model):
    """Where the inputs go: the input embedding's device; with accelerate offloading (weights
    on "meta") the device its hook runs the module on."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if weight is not None else next(model.parameters()).device
    if device.type == "meta":
        device = torch.device(getattr(getattr(emb, "_hf_hook", None), "execution_device", None)
                              or "cpu")
    return device


# ------------------------------------------------------------------------ collect

def _dist():
    """(rank, world size) of an initialized torch.distributed group, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _run_signature(model, dataset, sites, pooling, modality, batch_size, padding_side, world):
    return {"model_type": str(getattr(model.config, "model_type", "")),
            "config_fingerprint": config_fingerprint(model.config),
            "data_fingerprint": dataset.fingerprint(), "rows": len(dataset.rows),
            "sites": list(sites), "pooling": pooling, "modality": modality,
            "batch_size": batch_size, "padding_side": padding_side, "world_size": world}


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def collect(model, data, *, processor=None, sites=("mid",), pooling="mean", modality=None,
            batch_size=8, padding_side=None, skip_bad_rows=False, max_samples=None,
            ram_budget=DEFAULT_RAM_BUDGET, spill_dir=None, checkpoint_dir=None,
            checkpoint_every=50, progress=False):
    """Pooled responses of `model`'s neurons to every row of `data`.

    data: a JSONL / CSV path, an iterable of row dicts, or a data.Dataset. processor: the
    tokenizer or multimodal processor that prepares the rows. sites: site kinds ("mid",
    "gate", "up", "down", "gate_up", "fc1") over the language model's MLPs, or full site
    names. pooling: "mean", "max" or "last" over the sample's selected tokens, padding never
    included. modality: None / "all", "text", "image" (tokens equal to the config's image
    token id, or all others) or "response" (the tokens of the row's `response`, after the
    chat prompt). padding_side: "left" / "right"; default the tokenizer's.

    ram_budget: bytes of responses kept in RAM before they spill to memory-mapped files in
    spill_dir (default a temporary directory). checkpoint_dir: responses and progress are
    saved there every `checkpoint_every` batches; a call with the same arguments continues
    from it, and gives the result an uninterrupted run gives.

    Under torch.distributed (e.g. torchrun) batch b is run by rank b % world_size; rank 0
    gathers and returns all responses, the other ranks return None.
    """
    if processor is None:
        raise ValueError("collect needs a processor (tokenizer or multimodal processor)")
    modality = "all" if modality is None else modality
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}, got {modality!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    padding_side = padding_side or getattr(_tokenizer(processor), "padding_side", "right")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    dataset = data if hasattr(data, "rows") and hasattr(data, "skipped") else \
        load_rows(data, skip_bad_rows=skip_bad_rows, max_samples=max_samples)
    site_map = resolve_sites(model, sites)
    neurons = {site: info.site_size(kind) for site, (info, kind) in site_map.items()}
    rank, world = _dist()
    rows = dataset.rows
    n_batches = math.ceil(len(rows) / batch_size)
    mine = [b for b in range(n_batches) if b % world == rank]
    signature = _run_signature(model, dataset, site_map, pooling, modality, batch_size,
                               padding_side, world)

    local_dir = spill_dir
    if checkpoint_dir is not None:
        local_dir = os.path.join(checkpoint_dir, f"rank{rank}") if world > 1 else checkpoint_dir
    store = Responses(neurons, ram_budget=ram_budget, spill_dir=local_dir)
    done = 0  # of my batches
    state_path = os.path.join(local_dir, _STATE) if checkpoint_dir is not None else None
    if state_path and os.path.exists(state_path):
        with open(state_path) as f:
            state = json.load(f)
        if state["signature"] != signature:
            diff = [k for k in signature if state["signature"].get(k) != signature[k]]
            raise ValueError(f"checkpoint {checkpoint_dir} is from another run (differs in: "
                             f"{', '.join(diff)}); use another directory or delete it")
        done = state["batches_done"]
        store._reopen(state["rows_done"], state["labels"])
    elif local_dir is not None:
        store._reopen(0, [])  # leftovers of an earlier run in the same directory

    pooler = _Pooler(pooling)
    device = _input_device(model)
    forward_kwargs = {"use_cache": False}
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:  # the logits are not needed: compute the fewest
        forward_kwargs["logits_to_keep"] = 1
    bar = _progress(len(mine), done, progress and rank == 0)
    try:
        with _hooks(model, site_map, pooler), torch.inference_mode():
            for k in range(done, len(mine)):
                b = mine[k]
                batch_rows = rows[b * batch_size:(b + 1) * batch_size]
                inputs, select = _encode_batch(model, processor, batch_rows, modality,
                                               padding_side)
                pooler.start(select)
                model(**{key: v.to(device) for key, v in inputs.items()}, **forward_kwargs)
                missing = set(neurons) - set(pooler.out)
                if missing:
                    raise RuntimeError(f"sites not reached by the forward: {sorted(missing)[:3]}")
                store.append(pooler.out, [r.label for r in batch_rows])
                pooler.out = {}
                bar.update(1)
                if state_path and ((k + 1) % checkpoint_every == 0 or k + 1 == len(mine)):
                    store.flush()
                    _write_json(state_path, {"signature": signature, "batches_done": k + 1,
                                             "rows_done": len(store), "labels": store._labels})
    finally:
        bar.close()
    meta = {"model_type": signature["model_type"],
            "config_fingerprint": signature["config_fingerprint"],
            "data_fingerprint": signature["data_fingerprint"], "pooling": pooling,
            "modality": modality}
    if world > 1:
        store = _gather(store, rows, batch_size, n_batches, rank, world, ram_budget, spill_dir)
        if store is None:
            return None
    store.metadata = meta
    return store


def _progress(total, initial, enabled):
    if enabled:
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, unit="batch", desc="profile", file=sys.stderr)

    class _Quiet:
        def update(self, n):
            pass

        def close(self):
            pass

    return _Quiet()


def _gather(store, rows, batch_size, n_batches, rank, world, ram_budget, spill_dir):
    """Rank 0 receives every rank's rows and puts them back in data order."""
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) \
        if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [min(batch_size, len(rows) - b * batch_size) for b in range(n_batches)]
    per_rank = [sum(sizes[b] for b in range(r, n_batches, world)) for r in range(world)]
    longest = max(per_rank)
    out = Responses(store.neurons, ram_budget=ram_budget, spill_dir=spill_dir) if rank == 0 else None
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


# ------------------------------------------------------------------------ expertise and scales

class Expertise:
    """AUROC per neuron per site (site -> float64 [neurons]) and how it was measured."""

    def __init__(self, auroc_by_site, metadata=None):
        self.auroc = {site: torch.as_tensor(a, dtype=torch.float64) for site, a in
                      dict(auroc_by_site).items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    def __repr__(self):
        n = sum(a.numel() for a in self.auroc.values())
        return f"Expertise({len(self.auroc)} sites, {n} neurons)"

    def experts(self, threshold=0.5, top_k=None):
        """site -> bool [neurons]: AUROC > threshold, and among the top_k highest over all
        sites when top_k is given (ties broken by site order, then neuron index)."""
        chosen = {site: a > threshold for site, a in self.auroc.items()}
        if top_k is not None:
            if not isinstance(top_k, int) or top_k < 0:
                raise ValueError(f"top_k must be a non-negative integer, got {top_k!r}")
            flat = torch.cat([a for a in self.auroc.values()])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            order = torch.sort(flat, descending=True, stable=True).indices[:top_k]
            keep[order] = True
            start = 0
            for site, a in self.auroc.items():
                chosen[site] &= keep[start:start + a.numel()]
                start += a.numel()
        return chosen

    def to_scales(self, method="aura", threshold=0.5, top_k=None, strength=1.0, alpha=None):
        """ScaleSet of per-neuron factors (DESIGN.md section 2).

        aura: alpha = 1 - 2 (AUROC - 0.5) for experts; det0: alpha = 0 for experts; damp:
        alpha = `alpha` (in [0, 1]) for experts. Experts: AUROC > threshold, and among the
        top_k highest over the whole model if top_k is given. Everyone else gets 1. strength
        lambda in [0, 1] blends: 1 - lambda (1 - alpha).
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
            raise ValueError(f"strength must be in [0, 1], got {strength!r}")
        if method == "damp":
            if alpha is None or not (0.0 <= alpha <= 1.0):
                raise ValueError(f"method 'damp' needs alpha in [0, 1], got {alpha!r}")
        elif alpha is not None:
            raise ValueError(f"alpha is for method 'damp' only (method is {method!r})")
        if not (isinstance(threshold, (int, float)) and 0.0 <= threshold <= 1.0):
            raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")
        scales = {}
        for site, chosen in self.experts(threshold, top_k).items():
            a = self.auroc[site]
            if method == "aura":
                value = 1.0 - 2.0 * (a - 0.5)
            else:
                value = torch.full_like(a, 0.0 if method == "det0" else float(alpha))
            factor = torch.where(chosen, value, torch.ones_like(a))
            scales[site] = (1.0 - strength * (1.0 - factor)).float()
        meta = {k: self.metadata.get(k, "") for k in ("model_type", "config_fingerprint",
                                                      "pooling", "modality", "data_fingerprint")}
        meta.update(method=method, threshold=threshold, top_k="" if top_k is None else top_k,
                    strength=strength)
        if alpha is not None:
            meta["alpha"] = alpha
        return ScaleSet(scales, meta).validate()

    def save(self, path):
        """safetensors: one float64 AUROC tensor per site, metadata as strings."""
        from safetensors.torch import save_file

        save_file({s: a.contiguous() for s, a in self.auroc.items()}, str(path),
                  metadata={"kind": "sgm-ext expertise", **self.metadata})
        return path

    @classmethod
    def load(cls, path):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.pop("kind", None) != "sgm-ext expertise":
                raise ValueError(f"{path} is not an sgm-ext expertise file")
            return cls({k: f.get_tensor(k) for k in f.keys()}, meta)


def expertise(responses, labels=None):
    """Exact AUROC (ties averaged) of every neuron of every site -> Expertise.

    responses: a Responses (its labels are used when `labels` is None) or a mapping
    site -> [N, neurons] tensor with labels [N] (1 toxic, 0 non-toxic).
    """
    if labels is None:
        if not isinstance(responses, Responses):
            raise ValueError("labels are needed with a plain mapping of responses")
        labels = responses.labels
    y = check_labels(labels)
    meta = dict(getattr(responses, "metadata", {}))
    meta.update(n_toxic=int(y.sum()), n_non_toxic=int((~y).sum()))
    result = {}
    for site in responses:
        result[site] = auroc(responses[site], torch.from_numpy(y), name=f"responses[{site!r}]")
    return Expertise(result, meta)


def run(model, data, *, processor=None, **collect_options):
    """collect then expertise; None on ranks other than 0 under torch.distributed."""
    responses = collect(model, data, processor=processor, **collect_options)
    return None if responses is None else expertise(responses)
