"""Layer 2, patching a model: where sites sit in each architecture (registry.py), the scale
file (scales.py), `patch` and the checks of scales against a model (patcher.py), its handle
(handle.py), the three modes (fused.py, fold.py, hooks.py), scales at a strength (strength.py),
other projects' files (interop.py)."""
from . import interop
from .patcher import PatchHandle, patch, patched, steering, supported_architectures, unpatch

__all__ = ["PatchHandle", "interop", "patch", "patched", "steering", "supported_architectures",
           "unpatch"]
