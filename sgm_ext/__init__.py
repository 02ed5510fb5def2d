"""sgm-ext: fused kernels for neuron-level detoxification (SGM / AurA) of multimodal LLMs."""
__version__ = "0.1.0"

from . import ops  # noqa: E402  (registers the sgm_ext:: custom ops)
from .activations import ACTIVATIONS, canonical_activation  # noqa: E402
from .backends import backends  # noqa: E402
from .ops import act_mul_scale, act_mul_scale_packed, act_scale, gated_up_proj  # noqa: E402
from .scales import ScaleSet, load_scales  # noqa: E402

__all__ = ["ACTIVATIONS", "act_mul_scale", "act_mul_scale_packed", "act_scale", "backends",
           "canonical_activation", "gated_up_proj", "load_scales", "ops", "ScaleSet", "__version__"]

from . import interop  # noqa: E402
from .patch import PatchHandle, patch, patched, supported_architectures, unpatch  # noqa: E402

__all__ += ["interop", "PatchHandle", "patch", "patched", "supported_architectures", "unpatch"]

from . import profile  # noqa: E402  (the profiler: collect, expertise, run)
from .profile import Expertise, Responses  # noqa: E402

__all__ += ["Expertise", "profile", "Responses"]
