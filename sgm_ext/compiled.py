"""Loader of the compiled library sgm_ext._C (csrc/): the library, its load error, its kernels.

Importing sgm_ext._C registers the C++ op sgm_ext::act_mul_scale_out with a CPU kernel
(vectorized, rows in parallel) and, when built with CUDA, a CUDA kernel; torch dispatches
between them by the tensors' device. This module only loads: sgm_ext.backends decides what
that makes available, and says why not. An install without the library (SGM_EXT_NO_BUILD=1)
is silent; a library that was built but fails to load warns once.
"""
import importlib.machinery
import os
import warnings

import torch

OP = "sgm_ext::act_mul_scale_out"

# Whether a built library file sits in the package (looked up on disk, not through the import
# system, so that a library that exists but cannot load is still told apart from none at all).
BUILT = any(os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_C" + sfx))
            for sfx in importlib.machinery.EXTENSION_SUFFIXES)
try:
    from . import _C  # noqa: F401  (loading the library registers its ops)
    LOAD_ERROR = None
except Exception as e:  # ImportError when not built; OSError / undefined symbols when broken
    _C = None
    LOAD_ERROR = f"{type(e).__name__}: {e}"
    if BUILT:
        warnings.warn(f"sgm_ext._C could not be loaded ({LOAD_ERROR}); the compiled cpu / cuda "
                      "backends are unavailable and sgm-ext falls back to the Triton / torch "
                      "ones", RuntimeWarning, stacklevel=2)


def loaded():
    """Whether the library loaded."""
    return _C is not None


def library_path():
    """The file of the loaded library, or None."""
    return None if _C is None else _C.__file__


def has_kernel(device_type):
    """Whether the library registered a kernel of sgm_ext::act_mul_scale_out for a device type."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, device_type.upper())


def ops():
    """{name: op overload} of the library's functions: `act_mul_scale` (out[R, I] =
    act(gate * gate_scale) * up * s_eff, as sgm_ext.reference.act_mul_scale) and, in a
    library built from current sources, `act_mul_scale_alloc` (the same on [..., I] into a new
    tensor, for inference calls). Empty when the library did not load."""
    if _C is None:
        return {}
    found = {"act_mul_scale": torch.ops.sgm_ext.act_mul_scale_out.default}
    if hasattr(torch.ops.sgm_ext, "_act_mul_scale_alloc"):
        found["act_mul_scale_alloc"] = torch.ops.sgm_ext._act_mul_scale_alloc.default
    return found
