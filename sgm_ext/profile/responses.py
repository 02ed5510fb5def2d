"""The response store: pooled neuron responses, one float32 row per sample, that spill to disk.

Collection appends each batch's pooled rows; past a RAM budget every site's rows go to a file
of raw float32 rows (one file per site) and reading a site gives a memory-mapped tensor.
A checkpoint relies on the files being fsynced (`flush`) and cut back to a row count (`reopen`).
"""
import os
import tempfile

import numpy as np
import torch

DEFAULT_RAM_BUDGET = 4 << 30  # bytes of pooled responses kept in RAM before spilling to disk


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
        """[N] int64: 1 toxic, 0 non-toxic."""
        return torch.tensor(self._labels, dtype=torch.int64)

    def label_list(self):
        """The labels as a list of ints (what a checkpoint stores)."""
        return list(self._labels)

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
                raise ValueError(f"batch for {site!r} has shape {tuple(t.shape)}, expected "
                                 f"{(b, n)}")
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

    def reopen(self, rows, labels):
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
