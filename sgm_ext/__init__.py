"""sgm-ext: fused kernels for neuron-level detoxification (SGM / AurA) of multimodal LLMs.

The public API: the ops (act_mul_scale, ...), `patch` / `unpatch` / `patched` and the
handle, `steering` (vectors added to MLP outputs), ScaleSet and load_scales, the profiler
(`sgm_ext.profile`: collect, expertise, run, Expertise, Responses), the evaluation
(`sgm_ext.evaluation`) and the readers and writers of other projects' files
(`sgm_ext.interop`). One folder per layer; docs/ARCHITECTURE.md has them.
"""
import importlib

from .core.pause import interrupted_at_start, pause_point

try:  # Ctrl-C in these imports (torch's, transformers'): one line as the command
    pause_point("imports")
    from . import ops, profile  # ops: importing it registers the sgm_ext:: custom ops
    from .core import old_paths
    from .core.activations import ACTIVATIONS, canonical_activation
    from .ops import act_mul_scale, act_mul_scale_packed, act_scale, gated_up_proj
    from .ops.backends import backends
    from .patching import (
        PatchHandle,
        interop,
        patch,
        patched,
        steering,
        supported_architectures,
        unpatch,
    )
    from .patching.scales import ScaleSet, load_scales, load_vectors
    from .profile.expertise import Expertise
    from .profile.pooling import site_table as sites
    from .profile.responses import Responses
    from .version import __version__
except KeyboardInterrupt:
    interrupted_at_start()

old_paths.install()  # sgm_ext.evaluate, sgm_ext.report, ... : the flat layout's module paths

__all__ = ["ACTIVATIONS", "Expertise", "PatchHandle", "Responses", "ScaleSet", "__version__",
           "act_mul_scale", "act_mul_scale_packed", "act_scale", "backends",
           "canonical_activation", "gated_up_proj", "interop", "load_scales", "load_vectors",
           "ops", "patch", "patched", "profile", "sites", "steering", "supported_architectures",
           "unpatch"]


def __getattr__(name):
    """sgm_ext.report, sgm_ext.evaluate, ... (the flat layout's modules) without importing
    them at `import sgm_ext` (evaluation and serving stay unloaded until used)."""
    target = old_paths.new_path(f"{__name__}.{name}")
    if target is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module(target)
