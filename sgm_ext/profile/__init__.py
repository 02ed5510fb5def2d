"""The profiler: neuron responses to labelled data, their expertise (AUROC), and scales.

    responses = collect(model, data, processor=proc)       # forward passes with hooks
    expertise = expertise(responses, responses.labels)     # exact AUROC per neuron
    scales = expertise.to_scales(method="aura")            # a ScaleSet for sgm_ext.patch

`run` does the first two in one call; `profile_model(model, data, ProfileOptions(...))` the
whole workflow of `sgm-ext profile` (scales, experts, the shuffled-label noise floor).
Formulas: DESIGN.md section 2. The pieces live in their own modules; this one is the
profiler's public face:

- collect.py: the forward passes, checkpoints and torch.distributed;
- responses.py: the store of pooled responses (spills to memory-mapped files);
- pooling.py: which sites are observed, and the pooling hooks;
- inputs.py: chat template, image tokens, batching;
- expertise.py: AUROC per neuron (auroc.py) and the scales it gives (scale_math.py);
- transport.py: AcT's transport maps (mean_ot, gaussian_ot, linear_ot) from the responses;
- attribution.py: neurons ranked by their direct effect on the logits (and by gradients);
- safe_vectors.py, directions.py: safe value vectors, the toxicity probe, its direction and
  its neurons: the methods that read the rows' responses token by token;
- workflow.py: the command line's profile workflow as one call (profile_model);
- recipes.py: the peers' recipes by name (RECIPES; ProfileOptions.for_recipe).
"""
from ..core.scale_math import METHODS
from .collect import collect
from .expertise import Expertise, expertise
from .inputs import MODALITIES
from .pooling import POOLINGS, language_mlps, resolve_sites
from .recipes import RECIPES
from .responses import DEFAULT_RAM_BUDGET, Responses
from .transport import TRANSPORT_METHODS, balance, transport_maps
from .workflow import Profile, ProfileOptions, profile_model

__all__ = ["DEFAULT_RAM_BUDGET", "METHODS", "MODALITIES", "POOLINGS", "TRANSPORT_METHODS",
           "RECIPES", "Expertise", "Profile", "ProfileOptions", "Responses", "balance", "collect",
           "expertise", "language_mlps", "profile_model", "resolve_sites", "run",
           "transport_maps"]


def run(model, data, *, processor=None, **collect_options):
    """collect then expertise -> Expertise (AUROC [neurons] float64 per site); None on ranks
    other than 0 under torch.distributed. collect_options: those of `collect`."""
    responses = collect(model, data, processor=processor, **collect_options)
    return None if responses is None else expertise(responses)
