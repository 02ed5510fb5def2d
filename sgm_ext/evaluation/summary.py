"""A run's numbers from the generation records alone: harmful rate and over-refusal (counts,
Wilson 95%, per category), unparsed judge verdicts, and the capability set's accuracy."""
from .judges import is_correct
from .statistics import paired_test, wilson_interval


def is_benign(g):
    """Whether a generation record's prompt is labelled benign."""
    return g["label"] == "benign"


def is_harmful(g):
    """Whether a generation record's prompt counts for the harmful rate (harmful or
    unlabelled)."""
    return g["label"] != "benign"


def harmful_rates(generations, state):
    """(overall rate, {category: {harmful_rate, harmful, n, ci95}}) of the `state` answers
    (a run name: "unpatched", "patched", ...) to the harmful and unlabelled prompts of the
    generation records; the rate is None when there are none. Benign prompts are not counted
    here (over_refusal_rates)."""
    return _rates(generations, state, "harmful", is_harmful, "harmful_rate", "harmful")


def over_refusal_rates(generations, state):
    """(overall rate, {category: {over_refusal, refusals, n, ci95}}): the share of benign
    prompts whose answer declines; (None, {}) without benign prompts."""
    return _rates(generations, state, "refusal", is_benign, "over_refusal", "refusals")


def _rates(generations, state, field, counted, name, count_name):
    per = {}
    for g in generations:
        if counted(g):
            per.setdefault(g["category"], []).append(bool(g[state][field]))
    flags = [v for values in per.values() for v in values]
    overall = sum(flags) / len(flags) if flags else None
    return overall, {c: {name: sum(v) / len(v), count_name: sum(v), "n": len(v),
                         "ci95": wilson_interval(sum(v), len(v))}
                     for c, v in sorted(per.items())}


def run_summary(generations, run):
    """A run's numbers from the generation records alone: harmful rate (count, Wilson 95%),
    per category; over-refusal on the benign prompts; unparsed judge verdicts."""
    out = {}
    n_harmful = sum(map(is_harmful, generations))
    rate, per = harmful_rates(generations, run)
    k = sum(bool(g[run]["harmful"]) for g in generations if is_harmful(g))
    out.update(harmful_rate=rate, harmful=k, n=n_harmful,
               harmful_rate_ci95=wilson_interval(k, n_harmful), per_category=per)
    n_benign = sum(map(is_benign, generations))
    if n_benign:
        refusal, per_benign = over_refusal_rates(generations, run)
        refusals = sum(bool(g[run]["refusal"]) for g in generations if is_benign(g))
        out.update(over_refusal=refusal, over_refusal_per_category=per_benign,
                   refusals=refusals, n_benign=n_benign,
                   over_refusal_ci95=wilson_interval(refusals, n_benign))
    out["unparsed_verdicts"] = sum(bool(g[run].get("unparsed")) for g in generations)
    return out


def capability_report(rows, references, answers, scoring):
    """Accuracy unpatched and patched (count, Wilson 95%), McNemar on correctness, and every
    question with both answers. answers: {patched?: [(text, new tokens)]}."""
    items = [{"number": p.number, "question": p.text, "reference": ref,
              "image": p.image if isinstance(p.image, str) or p.image is None else "<PIL>",
              **{state: {"answer": answers[patched][i][0],
                         "correct": is_correct(answers[patched][i][0], ref, scoring)}
                 for state, patched in (("unpatched", False), ("patched", True))}}
             for i, (p, ref) in enumerate(zip(rows, references))]
    n = len(items)
    out = {"n": n, "scoring": scoring, "items": items}
    for state in ("unpatched", "patched"):
        k = sum(it[state]["correct"] for it in items)
        out[state] = {"correct": k, "accuracy": k / n, "ci95": wilson_interval(k, n)}
    out["paired"] = paired_test(items, "unpatched", "patched", "correct", lambda it: True)
    return out
