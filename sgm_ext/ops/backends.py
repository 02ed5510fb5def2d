"""Which implementation runs an op: one table of backends, their probes, and the choice.

A backend is a module exposing some of the 2-D op functions (`act_mul_scale`,
`gated_up_proj`; signatures in sgm_ext.reference), and optionally `act_mul_scale_alloc`
(gate, up, scale, gate_scale, act) -> new tensor, for [..., I] inputs (one call instead of
allocating and reshaping in Python), and `act_mul_scale_shift_alloc` (the same plus a
shift). The choice goes by the tensors' device and by what loads here; SGM_EXT_BACKEND=<name>
forces one (an error, never a silent fallback, if it cannot serve the call).
"""
import importlib
import os
import threading
import types
from typing import NamedTuple, Optional

import torch

ENV_VAR = "SGM_EXT_BACKEND"
OPS = ("act_mul_scale", "gated_up_proj")

# Preference by device type: the first available backend that has the op runs it.
PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
DEFAULT_PREFERENCE = ("torch",)


class BackendUnavailable(RuntimeError):
    pass


class BackendInfo(NamedTuple):
    available: bool
    reason: Optional[str]  # why not, when not available
    ops: tuple  # the ops it implements
    devices: tuple  # device types it can run on here
    # cuda / cpu: which sgm_ext._C, in words: "in-package build at PATH", "cached build at
    # PATH" (`sgm-ext build`), or "not built: run `sgm-ext build` ..."; None for the others
    library: Optional[str] = None


def _load_torch():
    return importlib.import_module("sgm_ext.ops.reference"), ("cpu", "cuda", "mps", "xpu")


def _load_triton():
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install
        raise BackendUnavailable(f"triton is not importable ({e})") from None
    kernels = importlib.import_module("sgm_ext.kernels")
    devices = ("cuda",) if torch.cuda.is_available() else ()
    if kernels.INTERPRET:
        devices += ("cpu",)
    if not devices:
        raise BackendUnavailable(
            "no CUDA device (set TRITON_INTERPRET=1 before importing sgm_ext to run the "
            "Triton kernels on CPU tensors under the interpreter)")
    return kernels, devices


def _load_compiled(device_type):
    """The `cuda` or `cpu` backend: the compiled library's op overloads themselves (a Python
    wrapper would cost a call per op). A library built from older sources lacks
    act_mul_scale_alloc: the op layer then allocates in Python."""
    def load():
        compiled = importlib.import_module("sgm_ext.ops.compiled")
        if not compiled.loaded():
            if not compiled.BUILT:  # "not built: run `sgm-ext build` ..."
                raise BackendUnavailable(f"the compiled library sgm_ext._C is "
                                         f"{compiled.describe()}")
            raise BackendUnavailable(f"the compiled library sgm_ext._C did not load "
                                     f"({compiled.LOAD_ERROR})")
        if not compiled.has_kernel(device_type):
            raise BackendUnavailable(f"sgm_ext._C was built without {device_type.upper()} "
                                     "kernels")
        if device_type == "cuda" and not torch.cuda.is_available():
            raise BackendUnavailable("no CUDA device")
        return types.SimpleNamespace(**compiled.ops()), (device_type,)
    return load


_LOADERS = {
    "cuda": _load_compiled("cuda"),
    "triton": _load_triton,
    "cpu": _load_compiled("cpu"),
    "torch": _load_torch,
}
_COMPILED = ("cuda", "cpu")  # the backends of sgm_ext._C
_loaded = {}  # name -> (module, devices) or BackendUnavailable
_lock = threading.Lock()


def _load(name):
    with _lock:
        if name not in _loaded:
            try:
                _loaded[name] = _LOADERS[name]()
            except BackendUnavailable as e:
                _loaded[name] = e
        return _loaded[name]


def backends():
    """{name: BackendInfo} for every backend sgm-ext knows, in preference order; for the
    compiled ones (cuda, cpu) `library` says which sgm_ext._C: in-package build, cached build
    at PATH, or not built."""
    info = {}
    for name in _LOADERS:
        got = _load(name)
        library = importlib.import_module("sgm_ext.ops.compiled").describe() \
            if name in _COMPILED else None
        if isinstance(got, BackendUnavailable):
            info[name] = BackendInfo(False, str(got), (), (), library)
        else:
            module, devices = got
            ops = tuple(op for op in OPS if hasattr(module, op))
            info[name] = BackendInfo(True, None, ops, devices, library)
    return info


_choices = {}  # (op, device type, forced name) -> backend module; every op call looks here


def _chosen(op, device_type):
    forced = os.environ.get(ENV_VAR)
    key = (op, device_type, forced)
    module = _choices.get(key)
    if module is None:
        module = _choices[key] = _select(op, device_type, forced)
    return module


def select(op, device_type):
    """The function that runs `op` on tensors of `device_type`."""
    return getattr(_chosen(op, device_type), op)


def select_alloc(device_type, shift=False):
    """`act_mul_scale_alloc` (shift: `act_mul_scale_shift_alloc`, which takes the shift last)
    of the backend that runs act_mul_scale on `device_type`, or None when that backend has
    none."""
    name = "act_mul_scale_shift_alloc" if shift else "act_mul_scale_alloc"
    return getattr(_chosen("act_mul_scale", device_type), name, None)


def _select(op, device_type, forced):
    if forced:
        if forced not in _LOADERS:
            raise ValueError(f"{ENV_VAR}={forced!r} is not a backend; known: {', '.join(_LOADERS)}")
        got = _load(forced)
        if isinstance(got, BackendUnavailable):
            raise RuntimeError(f"{ENV_VAR}={forced}: backend unavailable: {got}")
        module, devices = got
        if device_type not in devices:
            raise RuntimeError(f"{ENV_VAR}={forced}: backend cannot run on {device_type} tensors "
                               f"(here it runs on: {', '.join(devices) or 'nothing'})")
        if not hasattr(module, op):
            raise RuntimeError(f"{ENV_VAR}={forced}: backend has no {op}")
        return module
    for name in PREFERENCE.get(device_type, DEFAULT_PREFERENCE):
        got = _load(name)
        if not isinstance(got, BackendUnavailable) and device_type in got[1] \
                and hasattr(got[0], op):
            return got[0]
    raise RuntimeError(f"no sgm-ext backend runs {op} on {device_type} tensors")


def selected(op, device_type):
    """The name of the backend `select` picks (for reports and tests)."""
    fn = select(op, device_type)
    for name in _LOADERS:
        got = _load(name)
        if not isinstance(got, BackendUnavailable) and getattr(got[0], op, None) is fn:
            return name
    raise AssertionError("selected function belongs to no backend")
