"""sgm-ext: fused kernels for neuron-level detoxification (SGM / AurA) of multimodal LLMs.

The public API: the ops (act_mul_scale, ...), `patch` / `unpatch` / `patched` and the
handle, `steering` (vectors added to MLP outputs), ScaleSet and load_scales, the profiler
(`sgm_ext.profile`: collect, expertise, run, Expertise, Responses), the evaluation
(`sgm_ext.evaluate`) and the readers and writers of other projects' files
(`sgm_ext.interop`). docs/ARCHITECTURE.md has the layers.
"""
from . import (  # ops: importing it registers the sgm_ext:: custom ops
           interop,
           ops,
           profile,
)
from .activations import ACTIVATIONS, canonical_activation
from .backends import backends
from .expertise import Expertise
from .ops import act_mul_scale, act_mul_scale_packed, act_scale, gated_up_proj
from .patching import PatchHandle, patch, patched, steering, supported_architectures, unpatch
from .pooling import site_table as sites
from .responses import Responses
from .scales import ScaleSet, load_scales, load_vectors
from .version import __version__

__all__ = ["ACTIVATIONS", "Expertise", "PatchHandle", "Responses", "ScaleSet", "__version__",
           "act_mul_scale", "act_mul_scale_packed", "act_scale", "backends",
           "canonical_activation", "gated_up_proj", "interop", "load_scales", "load_vectors",
           "ops", "patch", "patched", "profile", "sites", "steering", "supported_architectures",
           "unpatch"]
