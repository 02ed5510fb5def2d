"""Layer 1, the ops: the public fused custom ops (custom_ops.py), the backend table and choice
(backends.py), the torch reference backend (reference.py), the loader of the compiled library
sgm_ext._C (compiled.py) and its builder (build.py); the Triton kernels are sgm_ext.kernels.
Importing this package registers the sgm_ext:: custom ops."""
from .custom_ops import DTYPES, act_mul_scale, act_mul_scale_packed, act_scale, gated_up_proj

__all__ = ["DTYPES", "act_mul_scale", "act_mul_scale_packed", "act_scale", "gated_up_proj"]
