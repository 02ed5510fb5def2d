"""Layer 1, the ops: the public fused custom ops (custom_ops.py), the backend table and choice
(backends.py), the torch reference backend (reference.py), the loader of the compiled library
sgm_ext._C (compiled.py) and its builder (build.py); the Triton kernels are sgm_ext.kernels.
Importing this package registers the sgm_ext:: custom ops."""
from . import backends
from .custom_ops import DTYPES, act_mul_scale, act_mul_scale_packed, act_scale, gated_up_proj

__all__ = ["DTYPES", "act_mul_scale", "act_mul_scale_packed", "act_scale", "allocating_op",
           "gated_up_proj"]


def allocating_op(device_type, shift=False):
    """The allocating form of act_mul_scale (gate, up, scale, gate_scale, act; shift: the form
    that takes the shift last) of the backend that runs it on `device_type`, or None when that
    backend has none: what custom_ops.act_mul_scale_prechecked calls in plain inference, for a
    caller (a patched MLP's fast forward) that binds it once and checks the rest itself."""
    return backends.select_alloc(device_type, shift)
