"""Loader of the compiled library sgm_ext._C (csrc/): the library, its load error, its kernels.

Importing sgm_ext._C registers the C++ op sgm_ext::act_mul_scale_out with a CPU kernel
(vectorized, rows in parallel) and, when built with CUDA, a CUDA kernel; torch dispatches
between them by the tensors' device. The library is, in order: the one in the package (built
by `pip install --no-build-isolation` with torch present), else a cached build for this torch
made by `sgm-ext build` (sgm_ext.build.cached_library), else none. Loading never builds,
except with SGM_EXT_BUILD_ON_IMPORT=1: then a missing library is built here (minutes).

This module only loads: sgm_ext.backends decides what that makes available, and says why not.
An install without a library (a pure-Python wheel, SGM_EXT_NO_BUILD=1) is silent; a library
that was built but fails to load warns once.
"""
import importlib.machinery
import importlib.util
import os
import sys
import warnings

import torch

from . import build

OP = "sgm_ext::act_mul_scale_out"
BUILD_ON_IMPORT_ENV = "SGM_EXT_BUILD_ON_IMPORT"
NOT_BUILT = ("not built: run `sgm-ext build` (or pip install with torch present and "
             "--no-build-isolation)")

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # sgm_ext/, where _C lies
# The library file in the package, looked up on disk, not through the import system, so that
# a library that exists but cannot load is still told apart from none at all.
IN_PACKAGE = next((p for p in (os.path.join(_HERE, "_C" + sfx)
                               for sfx in importlib.machinery.EXTENSION_SUFFIXES)
                   if os.path.isfile(p)), None)

_C = None
SOURCE = None  # "in-package" or "cached": where the loaded library came from
PATH = IN_PACKAGE  # the file of the library loaded, or of the last one tried
LOAD_ERROR = None
_errors = []  # (file, error) of every library that was found but did not load


def _error(e):
    return f"{type(e).__name__}: {e}"


def _load_file(path):
    """Import the library at `path` as sgm_ext._C."""
    spec = importlib.util.spec_from_file_location("sgm_ext._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


try:
    from .. import _C  # noqa: F401  (loading the library registers its ops)
    SOURCE, PATH = "in-package", _C.__file__
except Exception as e:  # ImportError when not built; OSError / undefined symbols when broken
    _C = None
    LOAD_ERROR = _error(e)
    if IN_PACKAGE:
        _errors.append((IN_PACKAGE, LOAD_ERROR))

if _C is None:
    try:
        cached = build.cached_library()
    except Exception:  # unreadable sources or cache: as if there were no cached build
        cached = None
    if cached is None and os.environ.get(BUILD_ON_IMPORT_ENV) == "1":
        try:
            cached = build.build(verbose=True)
        except Exception as e:
            LOAD_ERROR = f"{BUILD_ON_IMPORT_ENV}=1 and the build failed: {_error(e)}"
            _errors.append((None, LOAD_ERROR))
    if cached is not None:
        PATH = cached
        try:
            _C = _load_file(cached)
            SOURCE, LOAD_ERROR = "cached", None
        except Exception as e:
            LOAD_ERROR = _error(e)
            _errors.append((cached, LOAD_ERROR))

# The allocating ops' shape functions, so torch.compile can trace the patched MLP's fast
# forward, which calls them directly: a new contiguous tensor of gate's shape, dtype, device.
if _C is not None and hasattr(torch.ops.sgm_ext, "_act_mul_scale_alloc"):
    torch.library.register_fake("sgm_ext::_act_mul_scale_alloc")(
        lambda gate, up, scale, gate_scale, act: gate.new_empty(gate.shape))
if _C is not None and hasattr(torch.ops.sgm_ext, "_act_mul_scale_shift_alloc"):
    torch.library.register_fake("sgm_ext::_act_mul_scale_shift_alloc")(
        lambda gate, up, scale, gate_scale, act, shift: gate.new_empty(gate.shape))

# Whether a built library file was found (in the package or in the cache).
BUILT = bool(_C is not None or any(path for path, _ in _errors))
if _C is None and _errors:
    warnings.warn(f"sgm_ext._C could not be loaded ({LOAD_ERROR}); the compiled cpu / cuda "
                  "backends are unavailable and sgm-ext falls back to the Triton / torch ones "
                  "(`sgm-ext build` builds the library for this torch)", RuntimeWarning,
                  stacklevel=2)


def loaded():
    """Whether the library loaded."""
    return _C is not None


def library_path():
    """The file of the loaded library, or None."""
    return None if _C is None else _C.__file__


def describe():
    """Which library this is, in words: 'in-package build at PATH', 'cached build at PATH',
    'built at PATH but did not load (ERROR)', or NOT_BUILT ('not built: run `sgm-ext build`
    ...')."""
    if _C is not None:
        return f"{SOURCE} build at {library_path()}"
    if BUILT:
        return f"built at {PATH} but did not load ({LOAD_ERROR})"
    if _errors:  # SGM_EXT_BUILD_ON_IMPORT=1 and the build failed
        return f"not built ({LOAD_ERROR})"
    return NOT_BUILT


def has_kernel(device_type):
    """Whether the library registered a kernel of sgm_ext::act_mul_scale_out for a device type."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, device_type.upper())


def ops():
    """{name: op overload} of the library's functions: `act_mul_scale` (out[R, I] =
    act(gate * gate_scale) * up * s_eff, as sgm_ext.reference.act_mul_scale) and, in a
    library built from current sources, `act_mul_scale_alloc` (the same on [..., I] into a new
    tensor, for inference calls) and `act_mul_scale_shift_alloc` (that with a shift, last).
    Empty when the library did not load."""
    if _C is None:
        return {}
    found = {"act_mul_scale": torch.ops.sgm_ext.act_mul_scale_out.default}
    if hasattr(torch.ops.sgm_ext, "_act_mul_scale_alloc"):
        found["act_mul_scale_alloc"] = torch.ops.sgm_ext._act_mul_scale_alloc.default
    if hasattr(torch.ops.sgm_ext, "_act_mul_scale_shift_alloc"):  # built with shifts
        found["act_mul_scale_shift_alloc"] = torch.ops.sgm_ext._act_mul_scale_shift_alloc.default
    return found
