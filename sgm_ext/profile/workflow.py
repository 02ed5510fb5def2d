"""The whole profile workflow `sgm-ext profile` runs, as one library call: responses, the
method's scales, the experts, the shuffled-label noise floor and what the plot shows."""
import dataclasses
import functools
from typing import Optional, Sequence

from ..patching.scales import ScaleSet
from .collect import collect
from .data import Dataset, load_rows
from .directions import DIRECTION_METHODS, check_direction_options, direction_scales
from .expertise import DEFAULT_FDR, Expertise, expertise, shuffled_label_experts
from .inputs import LengthLimit, default_max_length, resolve_format
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
    other neuron unchanged. Methods "safe_vectors", "toxic_direction",
    "toxic_direction_neurons" (directions.py, safe_vectors.py) read the rows' responses token
    by token instead: top_k is their neuron count (default 10), hold_at the safe vectors'
    activation in units of each neuron's RMS (default 10), last_layers the layers the toxic
    direction is subtracted on (default the last quarter). recipe: the recipe's name, recorded
    in the scale file."""
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
    hold_at: Optional[float] = None
    last_layers: Optional[int] = None
    recipe: Optional[str] = None

    @classmethod
    def for_recipe(cls, name, **overrides) -> "ProfileOptions":
        """The options of a peer's recipe (recipes.RECIPES), with `overrides` on top."""
        return cls(**{**recipe(name)[1], "recipe": name, **overrides})

    def check(self) -> None:
        """ValueError naming an option the method does not take (the direction methods')."""
        check_direction_options(self.method, sites=self.sites, pooling=self.pooling,
                                modality=self.modality, top_k=self.top_k, hold_at=self.hold_at,
                                last_layers=self.last_layers, alpha=self.alpha)

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
    A direction method (directions.DIRECTION_METHODS) pools no responses (None) and says what
    it found in `lines`.
    `expertise` (the AUROC per neuron, which the plot shows) is computed when first asked for
    when the method is a transport map, which does not need it."""

    def __init__(self, options, responses, scales, expertise=None, experts=None,
                 noise_floor=None, noise_warnings=None, lines=None):
        self.options = options
        self.responses: Optional[Responses] = responses
        self.scales: ScaleSet = scales
        self.lines: list = lines or []  # what a direction method found, to print
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
    o.check()
    if o.method in DIRECTION_METHODS:
        return _direction_profile(model, data, o, processor)
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
        return Profile(o, responses, _named(scales, o))
    found = expertise(responses)
    selection = o.selection_options()
    scales = found.to_scales(method=o.method, threshold=o.threshold, top_k=o.top_k,
                             strength=o.strength, alpha=o.alpha,
                             allow_amplify=o.allow_amplify, **selection)
    experts = found.experts(o.threshold, o.top_k, **selection)
    floor = shuffled_label_experts(responses, o.threshold, o.top_k, **selection)
    lines = found.noise_warnings(o.threshold, o.top_k, **selection)
    return Profile(o, responses, _named(scales, o), found, experts, floor, lines)


def _named(scales, options):
    """The scale set with its recipe's name in the metadata, when a recipe made it."""
    if options.recipe:
        scales.metadata["recipe"] = options.recipe
    return scales


def _direction_profile(model, data, o, processor):
    """profile_model for a direction method: the rows' responses read token by token (rank 0
    alone under torch.distributed; the other ranks return None)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return None
    if processor is None:
        raise ValueError(f"method {o.method} needs a processor (tokenizer)")
    dataset = data if isinstance(data, Dataset) else \
        load_rows(data, skip_bad_rows=o.skip_bad_rows, max_samples=o.max_samples)
    limit = LengthLimit(default_max_length(model) if o.max_length is None else o.max_length,
                        o.truncate)
    scales, lines = direction_scales(model, processor, dataset, o,
                                     resolve_format(processor, o.input_format), limit)
    return Profile(o, None, scales, lines=lines)
