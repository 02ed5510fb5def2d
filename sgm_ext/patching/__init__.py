"""Layer 2, patching a model: where sites sit in each architecture (registry.py), the scale
file (scales.py), `patch` and its handle (patch.py), other projects' files (interop.py)."""
from . import interop
from .patcher import PatchHandle, patch, patched, steering, supported_architectures, unpatch

__all__ = ["PatchHandle", "interop", "patch", "patched", "steering", "supported_architectures",
           "unpatch"]
