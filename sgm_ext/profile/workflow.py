"""The whole profile workflow `sgm-ext profile` runs, as one library call: responses, the
method's scales, the experts, the shuffled-label noise floor and what the plot shows."""
import dataclasses
import functools
from typing import Optional, Sequence

from ..patching.scales import ScaleSet
from .collect import collect
from .expertise import DEFAULT_FDR, Expertise, expertise, shuffled_label_experts
from .recipes import recipe
from .responses import DEFAULT_RAM_BUDGET, Responses
from .transport import TRANSPORT_METHODS, balance, keep_top_maps, separation, transport_maps


@dataclasses.dataclass
class ProfileOptions:
    """The options of `profile_model`; the defaults are those of `sgm-ext profile`.

    The first group is passed to `collect` (see it), the second says how the scales are made:
    method "aura", "det0", "damp" (scales from the AUROC, Expertise.to_scales) or "mean_ot",
    "gaussian_ot", "linear_ot" (AcT's transport maps, transport_maps); balanced: subsample
    the larger class first (profile.balance); selection, fdr, threshold, top_k: which
    neurons are experts (Expertise.experts); for a transport method, top_k keeps the maps of
    the k neurons whose classes are furthest apart (transport.separation) and leaves every
    other neuron unchanged."""
    # what collect observes, and how
    sites: Sequence[str] = ("mid",)
    pooling: str = "mean"
    modality: str = "sample"
    batch_size: int = 8
    padding_side: Optional[str] = None
    skip_bad_rows: bool = False
    max_samples: Optional[int] = None
    ram_budget: int = DEFAULT_RAM_BUDGET
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 50
    max_length: Optional[int] = None
    truncate: bool = True
    input_format: str = "auto"
    progress: bool = False
    # the scales made from the responses
    method: str = "aura"
    balanced: bool = False
    allow_amplify: bool = False
    selection: str = "fdr"
    fdr: float = DEFAULT_FDR
    threshold: float = 0.5
    top_k: Optional[int] = None
    strength: float = 1.0
    alpha: Optional[float] = None

    @classmethod
    def for_recipe(cls, name, **overrides) -> "ProfileOptions":
        """The options of a peer's recipe (recipes.RECIPES), with `overrides` on top."""
        return cls(**{**recipe(name)[1], **overrides})

    @property
    def transport(self) -> bool:
        return self.method in TRANSPORT_METHODS

    def selection_options(self) -> dict:
        """The keywords of Expertise.experts / noise_warnings and shuffled_label_experts."""
        return dict(selection=self.selection, fdr=self.fdr)


class Profile:
    """What `profile_model` found. scales: the ScaleSet to save or patch with; responses: the
    pooled responses (balanced when asked); experts ({site: bool [neurons]}), noise_floor
    (the experts found with the labels shuffled, one seeded permutation) and noise_warnings
    (lines saying the selection is mostly noise): for the AUROC methods, None for transport.
    `expertise` (the AUROC per neuron, which the plot shows) is computed when first asked for
    when the method is a transport map, which does not need it."""

    def __init__(self, options, responses, scales, expertise=None, experts=None,
                 noise_floor=None, noise_warnings=None):
        self.options = options
        self.responses: Responses = responses
        self.scales: ScaleSet = scales
        self.experts: Optional[dict] = experts
        self.noise_floor: Optional[int] = noise_floor
        self.noise_warnings: Optional[list] = noise_warnings
        if expertise is not None:
            self.__dict__["expertise"] = expertise  # the cached_property's value

    @functools.cached_property
    def expertise(self) -> Expertise:
        return expertise(self.responses)

    @property
    def n_experts(self) -> Optional[int]:
        return None if self.experts is None else sum(int(e.sum()) for e in self.experts.values())

    def rule(self) -> str:
        """The selection in words, e.g. 'AUROC above chance at FDR 0.05 and above 0.5'."""
        o = self.options
        if o.selection == "fdr":
            return f"AUROC above chance at FDR {o.fdr:g} and above {o.threshold:g}"
        return f"AUROC above {o.threshold:g}"


def profile_model(model, data, options: Optional[ProfileOptions] = None, *,
                  processor=None) -> Optional[Profile]:
    """Profile `model` on labelled `data` and make the scales, as `sgm-ext profile` does:
    collect the responses, balance them if asked, then either the transport maps or the
    AUROC per neuron, its scales, experts and noise floor -> Profile; None on ranks other
    than 0 under torch.distributed (rank 0 gathers). data: as `collect` takes it (a path,
    row dicts or a Dataset); options: ProfileOptions (default: the command's defaults)."""
    o = ProfileOptions() if options is None else options
    responses = collect(model, data, processor=processor, sites=o.sites, pooling=o.pooling,
                        modality=o.modality, batch_size=o.batch_size,
                        padding_side=o.padding_side, skip_bad_rows=o.skip_bad_rows,
                        max_samples=o.max_samples, ram_budget=o.ram_budget,
                        checkpoint_dir=o.checkpoint_dir, checkpoint_every=o.checkpoint_every,
                        max_length=o.max_length, truncate=o.truncate,
                        input_format=o.input_format, progress=o.progress)
    if responses is None:
        return None
    if o.balanced:
        responses = balance(responses)
    if o.transport:
        scales = transport_maps(responses, o.method, strength=o.strength,
                                metadata={"balanced": o.balanced})
        if o.top_k is not None:  # only the maps of the neurons whose classes differ most
            scales = keep_top_maps(scales, separation(responses), o.top_k)
        return Profile(o, responses, scales)
    found = expertise(responses)
    selection = o.selection_options()
    scales = found.to_scales(method=o.method, threshold=o.threshold, top_k=o.top_k,
                             strength=o.strength, alpha=o.alpha,
                             allow_amplify=o.allow_amplify, **selection)
    experts = found.experts(o.threshold, o.top_k, **selection)
    floor = shuffled_label_experts(responses, o.threshold, o.top_k, **selection)
    lines = found.noise_warnings(o.threshold, o.top_k, **selection)
    return Profile(o, responses, scales, found, experts, floor, lines)
