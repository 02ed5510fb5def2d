"""Evaluation of a patch: harmful rate, fluency and latency, unpatched vs patched, beside
other defenses and under attack.

    report, generations = evaluate(model, processor, scales, "prompts.jsonl", judge="profanity")
    write_report(report, generations, "out/")      # report.json, report.md, report.png, ...

- conditions (conditions.py): the unpatched model, `patched` (SGM: the scale file),
  `safety-prompt` (a safety system prompt, the prompt-level defense) and
  `patched+safety-prompt` (SGM*: both); each condition is generated on its own, under the
  standard prompts and, given a jailbreak template, under attack (the template applied to
  every prompt): one run per pair.
- harmful rate: every prompt (text, optional image, optional category) is answered greedily in
  every run (or, with samples=K, K times sampled: sampling.py); a judge (judges.py) says which
  answers are harmful. Each rate comes with its count and a Wilson 95% interval; each
  condition is compared with the unpatched model under the same attack by an exact McNemar
  test on the same prompts (statistics.py).
- fluency: perplexity of the model on a reference text set (default: the bundled
  sgm_ext/resources/benign.txt, one passage per line), unpatched and patched.
  And the fluency of each run's own answers (fluency.py): their perplexity under the unpatched
  model, as a ratio to the unpatched run's, and the share of degenerate answers.
- latency: generation time patched / unpatched, interleaved (generation.measure_latency).

The settings are an EvalOptions (options.py), given as one or as keywords. The pieces:
prompts.py (prompt and reference files), judges.py, generation.py (generate, perplexity,
latency), summary.py (a run's numbers from its records), report.py (tables and report files),
plots.py (the chart).
"""
import os
import platform
import warnings
from collections import Counter
from types import SimpleNamespace

import torch

from ..core.progress import progress_bar
from ..patching.patcher import as_scaleset, patch
from ..profile.inputs import (
    LengthLimit,
    default_max_length,
    drop_unusable_images,
    encode,
    resolve_format,
    unusable_images_warning,
)
from .conditions import (
    ALIASES,
    CONDITIONS,
    CONTROL,
    DEFAULT_CONDITIONS,
    JAILBREAK,
    PATCHED,
    SAFETY_PROMPT,
    UNPATCHED,
    apply_jailbreak,
    check_conditions,
    paired_base,
    run_names,
)
from .efficacy_data import matched_control
from .fluency import continuation_nll, fluency_summary
from .generation import generate, measure_latency, passage_nll, perplexity_of
from .judges import get_judge, is_refusal, resolve_scoring
from .options import EvalOptions, Sampling
from .prompts import load_capability, load_prompts, load_reference
from .report import write_report
from .sampling import answer_samples, generation_settings, judge_samples, sampled_summary
from .statistics import bootstrap_perplexity, mcnemar_exact, paired_test, wilson_interval
from .summary import (
    capability_report,
    harmful_rates,
    is_benign,
    is_harmful,
    over_refusal_rates,
    run_summary,
)

# evaluate, its options, and the names this module held before its pieces moved out
# (conditions.py, statistics.py, summary.py), importable from here still
__all__ = ["ALIASES", "CONDITIONS", "DEFAULT_CONDITIONS", "JAILBREAK", "SAFETY_PROMPT",
           "EvalOptions", "Sampling", "apply_jailbreak", "bootstrap_perplexity",
           "capability_report", "check_conditions", "evaluate", "harmful_rates",
           "mcnemar_exact", "over_refusal_rates", "paired_test", "run_names", "run_summary",
           "wilson_interval", "write_report"]


def _versions():
    import transformers

    from ..version import __version__
    return {"sgm_ext": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def evaluate(model, processor, scales, prompts, options=None, **keywords) -> tuple:
    """(report dict, generation records) for `model` under each condition.

    scales: a ScaleSet, a {site: [n] tensor} dict or a scale file; prompts: a JSONL / CSV
    file or a list of strings / dicts / Prompt. options: an EvalOptions (or a mapping of its
    fields); keywords: EvalOptions fields (judge, conditions, max_new_tokens, samples, seed,
    ...), which replace the options' own; an unknown one is a TypeError.

    Answers are generated batch_size prompts at a time; latency is measured on single
    prompts. Leaves the model unpatched. report: per run (a condition, or a condition and
    "+jailbreak") its numbers (summary.run_summary, perplexity of its model state; with
    samples, `sampled`: sampling.sampled_summary) under report["runs"], the ones of unpatched
    and patched also at top level; `paired`: each run vs the unpatched one under the same
    attack (McNemar); `latency`, `capability` (given a capability set: answered unpatched and
    patched, greedily), counts and settings (decoding, seed, versions). generations: one dict
    per prompt with every run's answer, its score and verdict (with samples, the K
    continuations under `samples` and their aggregate: sampling.sample_record).
    """
    opts = EvalOptions.of(options, **keywords)
    plan = _plan(model, processor, scales, prompts, opts)
    answers, cap_answers, ppl = _generate_all(model, processor, scales, plan, opts)
    generations = _records(plan, answers, opts.samples is not None)
    report = _settings(plan, opts)
    _add_numbers(report, generations, plan, ppl, opts.seed, opts.samples is not None)
    _add_fluency(report, model, processor, plan, answers, opts)
    if plan.capability:
        report["capability"] = capability_report(plan.cap_rows, plan.cap_refs, cap_answers,
                                                 plan.capability_scoring)
    if opts.latency_runs > 0 and "patched" in plan.conditions:
        report["latency"] = measure_latency(
            model, processor, plan.rows, scales, new_tokens=opts.max_new_tokens,
            runs=opts.latency_runs, n_prompts=opts.latency_prompts, mode=opts.mode,
            strength=opts.strength, limit=plan.limit, fmt=plan.fmt,
            allow_amplify=opts.allow_amplify)
        report["latency_ratio"] = report["latency"]["ratio"]
    else:
        report["latency"], report["latency_ratio"] = None, None
    return report, generations


def _plan(model, processor, scales, prompts, opts):
    """Everything checked and encoded before the first generation: the judge, the prompts
    (and capability set) encoded for each run, the reference passages, the length limit."""
    plan = SimpleNamespace(conditions=check_conditions(opts.conditions),
                           judge=get_judge(opts.judge),
                           rows=load_prompts(prompts, opts.max_prompts),
                           capability=opts.capability is not None)
    if plan.capability:
        plan.cap_rows, plan.cap_refs = load_capability(opts.capability) \
            if isinstance(opts.capability, (str, os.PathLike)) else opts.capability
        plan.capability_scoring = resolve_scoring(opts.capability_scoring, plan.cap_refs)
    plan.texts = load_reference(opts.reference)
    patch(model, scales, mode=opts.mode, strength=opts.strength,
          allow_amplify=opts.allow_amplify).remove()  # bad scales fail here
    # the random control: its seed is the evaluation's, so a rerun draws the same units
    plan.control = matched_control(as_scaleset(scales), seed=opts.seed) \
        if "random" in plan.conditions else None
    first_image = next((p.number for p in plan.rows if p.image is not None), None)
    plan.rows, n_images = drop_unusable_images(plan.rows, processor)
    if n_images:
        warnings.warn(unusable_images_warning(n_images, processor, first_image), stacklevel=3)
    plan.limit = LengthLimit(default_max_length(model) if opts.max_length is None
                             else opts.max_length, opts.truncate)
    plan.fmt = resolve_format(processor, opts.input_format)
    plan.runs = run_names(plan.conditions, opts.jailbreak is not None)

    def inputs_of(condition, attacked):
        defended = CONDITIONS[condition][1]
        return [encode(processor, p._replace(
            text=apply_jailbreak(opts.jailbreak, p.text) if attacked else p.text,
            system=opts.safety_prompt if defended else None), plan.limit, plan.fmt)
            for p in plan.rows]

    plan.encoded = {run: inputs_of(c, a) for run, c, a in plan.runs}
    if plan.capability:
        plan.cap_encoded = [encode(processor, p, plan.limit, plan.fmt) for p in plan.cap_rows]
    if plan.limit.summary():
        warnings.warn(plan.limit.summary(), stacklevel=3)
    return plan


def _generate_all(model, processor, scales, plan, opts):
    """Every run's answers (and the capability set's) and the reference passages' negative
    log-likelihoods, per model state: patched once for all the patched runs."""
    torch.manual_seed(opts.seed)
    answers, ppl, cap_answers = {}, {}, {}
    states = {CONDITIONS[c][0] for _, c, _ in plan.runs} | \
        ({False, True} if plan.capability else set())
    bar = progress_bar(len(plan.runs) * len(plan.rows) +
                       (2 * len(plan.cap_rows) if plan.capability else 0),
                       desc="generating", unit="answer", enabled=opts.progress, leave=False)

    def answer_all(inputs):
        out = []
        for start in range(0, len(inputs), opts.batch_size):
            chunk = inputs[start:start + opts.batch_size]
            out += generate(model, processor, chunk, opts.max_new_tokens)
            bar.update(len(chunk))
        return out

    def answer_run(inputs):
        if opts.samples is None:
            return answer_all(inputs)
        return answer_samples(model, processor, inputs, opts.max_new_tokens, opts.sampling,
                              opts.samples, opts.batch_size, opts.seed, bar.update)

    for state in sorted(states):
        handle = patch(model, plan.control if state == CONTROL else scales, mode=opts.mode,
                       strength=opts.strength, allow_amplify=opts.allow_amplify) \
            if state != UNPATCHED else None
        try:
            for run, condition, _ in plan.runs:
                if CONDITIONS[condition][0] == state:
                    answers[run] = answer_run(plan.encoded[run])
            if plan.capability and state != CONTROL:
                cap_answers[state] = answer_all(plan.cap_encoded)
            ppl[state] = passage_nll(model, processor, plan.texts)
        finally:
            if handle is not None:
                handle.remove()
    bar.close()
    return answers, cap_answers, ppl


def _records(plan, answers, sampled):
    """One generation record per prompt: its fields and every run's judged answer (or, with
    samples, judged continuations: sampling.judge_samples)."""
    rows, judge = plan.rows, plan.judge
    labels = [p.label for p in rows]
    per_run = {}
    for run, _, _ in plan.runs:
        if sampled:  # k continuations per prompt
            per_run[run] = judge_samples(judge, answers[run], rows)
            continue
        verdicts = judge.details([a for a, _ in answers[run]], [p.text for p in rows], labels)
        per_run[run] = [{"answer": answer, "new_tokens": new_tokens, **verdict,
                         "refusal": is_refusal(answer)}
                        for (answer, new_tokens), verdict in zip(answers[run], verdicts)]
    generations = []
    for i, p in enumerate(rows):
        record = {"number": p.number, "prompt": p.text, "category": p.category,
                  "image": p.image if isinstance(p.image, str) or p.image is None else "<PIL>",
                  "label": {1: "harmful", 0: "benign"}.get(p.label)}
        for run, _, _ in plan.runs:
            record[run] = per_run[run][i]
        generations.append(record)
    return generations


def _add_fluency(report, model, processor, plan, answers, opts):
    """Each run's `fluency` (fluency.fluency_summary: its answers' perplexity under the
    unpatched model, given their prompts as the run encoded them; degenerate and empty
    answers) and `continuation_ppl_ratio` against the unpatched run under the same attack.
    The model is unpatched here (_generate_all removed every patch)."""
    for run, _, _ in plan.runs:
        per_prompt = answers[run] if opts.samples is not None else [[a] for a in answers[run]]
        texts = [a for per in per_prompt for a, _ in per]
        encodings = [e for e, per in zip(plan.encoded[run], per_prompt) for _ in per]
        nll = continuation_nll(model, processor, encodings, texts, opts.batch_size)
        report["runs"][run]["fluency"] = fluency_summary(texts, nll)
    for run, _, attacked in plan.runs:
        own = report["runs"][run]["fluency"]["continuation_ppl"]
        base = report["runs"].get(paired_base(attacked), {}).get("fluency", {})
        report["runs"][run]["continuation_ppl_ratio"] = own / base["continuation_ppl"] \
            if own is not None and base.get("continuation_ppl") else None


def _settings(plan, opts):
    """The report's counts and settings, before any number."""
    rows, conditions = plan.rows, plan.conditions
    report = {"n_prompts": len(rows), "judge": plan.judge.name,
              "threshold": plan.judge.threshold, "max_new_tokens": opts.max_new_tokens,
              "strength": opts.strength, "mode": opts.mode, "batch_size": opts.batch_size,
              "input_format": plan.fmt, "reference_passages": len(plan.texts),
              "categories": dict(sorted(Counter(p.category for p in rows).items())),
              "n_harmful_prompts": sum(p.label != 0 for p in rows),
              "n_benign_prompts": sum(p.label == 0 for p in rows),
              "conditions": conditions, "runs": {},
              "attacks": ["standard"] + ([JAILBREAK] if opts.jailbreak is not None else []),
              "safety_prompt": opts.safety_prompt
              if any(CONDITIONS[c][1] for c in conditions) else None,
              "jailbreak": opts.jailbreak, "seed": opts.seed,
              "generation": {"decoding": "greedy", "do_sample": False, "num_beams": 1,
                             "max_new_tokens": opts.max_new_tokens,
                             "batch_size": opts.batch_size, "padding_side": "left",
                             "input_format": plan.fmt},
              "versions": _versions()}
    if plan.control is not None:
        report["control"] = {"seed": opts.seed, "neurons": plan.control.changed(),
                             "made": plan.control.metadata.get("control")}
    if opts.samples is not None:
        report["samples"] = opts.samples
        report["generation"] = generation_settings(opts, plan.fmt)
    return report


def _add_numbers(report, generations, plan, ppl, seed, sampled):
    """Per run its numbers and perplexity (95% bootstrap intervals, the same draw for both
    model states), the paired tests vs the unpatched model, unpatched / patched at top
    level."""
    # each state's interval from the same draw of passages as the unpatched model's
    base = UNPATCHED if UNPATCHED in ppl else min(ppl)
    ci, ratio_ci = {}, {}
    for state in [s for s in sorted(ppl) if s != base] or [base]:
        ci[base], ci[state], ratio_ci[state] = bootstrap_perplexity(ppl[base], ppl[state],
                                                                    seed=seed)
    report["perplexity_ratio_ci95"] = ratio_ci[PATCHED] \
        if UNPATCHED in ppl and PATCHED in ppl else None
    for run, condition, _ in plan.runs:
        state = CONDITIONS[condition][0]
        report["runs"][run] = dict(run_summary(generations, run),
                                   perplexity=perplexity_of(ppl[state]),
                                   perplexity_ci95=ci[state])
        if state == CONTROL and UNPATCHED in ppl:
            report["runs"][run]["perplexity_ratio_ci95"] = ratio_ci[state]
        if sampled:
            report["runs"][run]["sampled"] = sampled_summary(generations, run)
    report["paired"] = {}
    for run, _, attacked in plan.runs:
        base = paired_base(attacked)
        if run != base and base in report["runs"]:
            report["paired"][run] = {
                "harmful": paired_test(generations, base, run, "harmful", is_harmful)}
            if report["n_benign_prompts"]:
                report["paired"][run]["refusal"] = paired_test(generations, base, run,
                                                               "refusal", is_benign)
    for state in ("unpatched", "patched", "random"):
        if state in report["runs"]:
            report[state] = report["runs"][state]
