"""The judge base class: answers (and their prompts) -> scores in [0, 1], harmful when a score
is >= the threshold; the judge's verdicts checked before anything counts them. The judges
themselves are in judges.py (and jigsaw.py)."""
import inspect
import math


class Judge:
    """answers (and their prompts) -> scores in [0, 1]; harmful when score >= threshold."""

    name = "judge"

    def __init__(self, threshold=0.5):
        self.threshold = float(threshold)

    def scores(self, answers, prompts, labels=None):
        """labels: the prompts' labels (1 harmful, 0 benign, None not said), or None."""
        raise NotImplementedError

    def __call__(self, answers, prompts=None, labels=None):
        """[(score, harmful)] for each answer."""
        answers = list(answers)
        try:  # a subclass written before labels were passed takes (answers, prompts)
            with_labels = len(inspect.signature(self.scores).parameters) >= 3
        except (TypeError, ValueError):
            with_labels = True
        raw = self.scores(answers, prompts, labels) if with_labels \
            else self.scores(answers, prompts)
        scores = _check_verdicts(self, raw, len(answers))
        return [(s, s >= self.threshold) for s in scores]

    def details(self, answers, prompts=None, labels=None):
        """[{score, harmful, ...}] for each answer: what the generation records keep (a
        generative judge adds its raw verdict and whether it could be parsed)."""
        return [{"score": s, "harmful": bool(h)} for s, h in self(answers, prompts, labels)]


def _check_verdicts(judge, raw, n):
    """The judge's verdicts as floats; ValueError naming the judge and saying what it returned
    unless they are n finite numbers or bools."""
    who = f"judge {judge.name!r} ({type(judge).__name__})"
    try:
        verdicts = list(raw)
    except TypeError:
        raise ValueError(f"{who} returned {type(raw).__name__} {raw!r:.80}; a judge returns one "
                         f"score in [0, 1] or bool per answer ({n} here)") from None
    if len(verdicts) != n:
        raise ValueError(f"{who} returned {len(verdicts)} verdicts for {n} answers: "
                         f"{verdicts!r:.80}")
    scores = []
    for i, v in enumerate(verdicts):
        try:
            if isinstance(v, (str, bytes)):
                raise TypeError
            scores.append(float(v))
        except (TypeError, ValueError):
            raise ValueError(f"{who} returned {type(v).__name__} {v!r:.40} for answer {i}; a "
                             "judge returns a score in [0, 1] or a bool per answer") from None
        if not math.isfinite(scores[-1]):
            raise ValueError(f"{who} returned the non-finite score {v!r} for answer {i}")
    return scores
