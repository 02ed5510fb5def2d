"""Triton kernels of sgm-ext, installed as `sgm_ext.kernels`.

They know nothing of models: 2-D views in, a preallocated output written. Under
TRITON_INTERPRET=1 (set before this package is imported: `triton.jit` reads it at decoration
time) they run on CPU tensors, which is how they are tested on machines without a GPU.
"""
import os

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

from .elementwise import act_mul_scale  # noqa: E402
from .gated_gemm import gated_up_proj  # noqa: E402

__all__ = ["INTERPRET", "act_mul_scale", "gated_up_proj"]
