"""EvalOptions: every setting of an evaluation but the model, the scales and the prompts.

    evaluate(model, processor, scales, prompts, judge="refusal", max_new_tokens=16)
    evaluate(model, processor, scales, prompts, EvalOptions(judge="refusal", samples=25))
    evaluate(model, processor, scales, prompts, options, seed=1)   # keywords override

The keywords of evaluate() are the fields of EvalOptions; given both, the keywords replace
those fields of the options (dataclasses.replace). An unknown keyword is a TypeError that
names it.
"""
import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

from .conditions import DEFAULT_CONDITIONS, SAFETY_PROMPT, check_conditions


class Sampling(NamedTuple):
    """The settings of sampled decoding (generation.generate): softmax temperature, nucleus
    mass (1.0: off) and top-k cut (0: off)."""
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0


def check_sampling(temperature, top_p, top_k, names=("temperature", "top_p", "top_k")):
    """ValueError naming the setting (by `names`: the keywords, or the command line's flags)
    unless temperature > 0 (finite), 0 < top_p <= 1 and top_k an integer >= 0."""
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"{names[0]} must be a positive number, got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and not isinstance(top_p, bool) and 0 < top_p <= 1):
        raise ValueError(f"{names[1]} must be in (0, 1], got {top_p!r}")
    if not (isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0):
        raise ValueError(f"{names[2]} must be an integer >= 0 (0: no top-k cut), got {top_k!r}")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
    """The settings of evaluate(), by group.

    Judging: judge (a name: profanity, jigsaw, refusal, hf:DIR, llm:DIR; a judges.Judge or a
    callable). Patch: strength, mode (fused, fold, hook),
    allow_amplify (accept scales above 1, as patch does). Conditions: conditions (names of
    conditions.CONDITIONS, aliases sgm, sgm*, prompt; a list or "a,b"), safety_prompt (the
    prompt defense's system prompt), jailbreak (a template applied to every prompt,
    conditions.apply_jailbreak, in a second run of every condition; None: no attack).

    Generation: max_new_tokens; batch_size (prompts generated at a time); max_prompts (the
    first N only); max_length / truncate (as for profile.collect: a longer prompt is cut,
    with one warning, or refused); input_format (chat, raw, or auto: chat when the processor
    has a chat template; only the continuation is judged in either); seed (torch's seed
    before generating, the sampling's and the bootstrap's).

    Sampling, RealToxicityPrompts-style: samples (K: None, the default, answers each prompt
    once, greedily; K draws K continuations of each prompt, sampled with temperature, top_p
    and top_k (0: no top-k cut), and judges each; a prompt counts as harmful when one of its
    K continuations is). The defaults are RealToxicityPrompts': nucleus sampling, p = 0.9,
    temperature 1 (with its K = 25 and 20 tokens).

    Measurement: reference (fluency text: a file or passages; default the bundled
    benign.txt), latency_runs / latency_prompts (generation.measure_latency; 0 runs: no
    latency), capability (a capability set: a file, or (rows, references)) and
    capability_scoring (exact, choice, auto). progress: a progress bar.
    """
    # judging
    judge: Any = "profanity"
    # the patch
    strength: float = 1.0
    mode: str = "fused"
    allow_amplify: bool = False
    # conditions and attack
    conditions: Any = DEFAULT_CONDITIONS
    safety_prompt: str = SAFETY_PROMPT
    jailbreak: str | None = None
    # generation
    max_new_tokens: int = 64
    batch_size: int = 8
    max_prompts: int | None = None
    max_length: int | None = None
    truncate: bool = True
    input_format: str = "auto"
    seed: int = 0
    # sampling (samples=None: one greedy answer per prompt)
    samples: int | None = None
    temperature: float = 1.0
    top_p: float = 0.9
    top_k: int = 0
    # measurement
    reference: Any = None
    latency_runs: int = 3
    latency_prompts: int = 8
    capability: Any = None
    capability_scoring: str = "auto"
    progress: bool = True

    def __post_init__(self):
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        check_conditions(self.conditions)
        if self.jailbreak is not None and not str(self.jailbreak).strip():
            raise ValueError("the jailbreak template is empty")
        if self.safety_prompt is None or not str(self.safety_prompt).strip():
            raise ValueError("the safety prompt is empty")
        if self.samples is not None and not _positive_int(self.samples):
            raise ValueError(f"samples must be a positive integer or None, got {self.samples!r}")
        check_sampling(self.temperature, self.top_p, self.top_k)

    @property
    def sampling(self):
        """The Sampling settings when samples is set, else None (greedy decoding)."""
        if self.samples is None:
            return None
        return Sampling(float(self.temperature), float(self.top_p), self.top_k)

    @classmethod
    def of(cls, options=None, **keywords):
        """EvalOptions from options (None, an EvalOptions, or a mapping of fields) with the
        keywords replacing its fields; TypeError naming an unknown keyword."""
        unknown = [k for k in keywords if k not in FIELDS]
        if isinstance(options, Mapping):
            unknown += [k for k in options if k not in FIELDS]
            keywords = {**options, **keywords}
            options = None
        if unknown:
            raise TypeError(f"evaluate() got an unexpected keyword argument {unknown[0]!r} "
                            f"(the options are: {', '.join(FIELDS)})")
        if options is None:
            return cls(**keywords)
        if not isinstance(options, cls):
            raise TypeError(f"options must be an EvalOptions or a mapping of its fields, "
                            f"got {type(options).__name__}")
        return dataclasses.replace(options, **keywords) if keywords else options


def _positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


FIELDS = tuple(f.name for f in dataclasses.fields(EvalOptions))
