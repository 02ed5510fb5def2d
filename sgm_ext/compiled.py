"""The `cuda` and `cpu` backends: the compiled library sgm_ext._C (csrc/).

Importing sgm_ext._C registers the C++ op sgm_ext::act_mul_scale_out with a CPU kernel
(vectorized, rows in parallel) and, when built with CUDA, a CUDA kernel; torch dispatches
between them by the tensors' device. A missing or broken library never breaks sgm_ext: this
module warns once and `backend()` raises BackendUnavailable, so the op layer falls back.
"""
import types
import warnings

import torch

from .backends import BackendUnavailable

OP = "sgm_ext::act_mul_scale_out"

try:
    from . import _C  # noqa: F401  (loading the library registers its ops)
    _LOAD_ERROR = None
except Exception as e:  # ImportError when not built; OSError / undefined symbols when broken
    _C = None
    _LOAD_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(f"sgm_ext._C could not be loaded ({_LOAD_ERROR}); the compiled cpu / cuda "
                  "backends are unavailable and sgm-ext falls back to the Triton / torch ones",
                  RuntimeWarning)


def has_kernel(device_type):
    """Whether the library registered a kernel of sgm_ext::act_mul_scale_out for a device type."""
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(OP, device_type.upper())


def backend(device_type):
    """(namespace of the 2-D op functions, device types) of the `cuda` or `cpu` backend."""
    if _C is None:
        raise BackendUnavailable(f"the compiled library sgm_ext._C did not load ({_LOAD_ERROR})")
    if not has_kernel(device_type):
        raise BackendUnavailable(f"sgm_ext._C was built without {device_type.upper()} kernels")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA device")
    # The op overloads themselves are the backend functions (out[R, I] = act(gate * gate_scale)
    # * up * s_eff, as sgm_ext.reference.act_mul_scale): a Python wrapper would cost a call per
    # op. act_mul_scale_alloc is the same on [..., I] into a new tensor, for inference calls.
    # (A library built from older sources lacks it: the op layer then allocates in Python.)
    ops = torch.ops.sgm_ext
    namespace = types.SimpleNamespace(act_mul_scale=ops.act_mul_scale_out.default)
    if hasattr(ops, "_act_mul_scale_alloc"):
        namespace.act_mul_scale_alloc = ops._act_mul_scale_alloc.default
    return namespace, (device_type,)
