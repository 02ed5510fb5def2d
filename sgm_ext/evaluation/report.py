"""Reports as text and files: the profile's expertise table, the evaluation's terminal table,
report.md, and the files of an evaluation's report directory."""
import json
import os

import torch

from ..core.files import write_json, write_text
from ..core.scale_math import illegal_counts
from ..patching.registry import site_kind, site_layer
from ..profile.transport import TRANSPORT_METHODS
from .plots import eval_chart

REPORT_FILES = ("report.json", "report.md", "report.png", "generations.jsonl")


def expertise_table(expertise, scales, experts, strongest=10):
    """Experts per site (layer, kind) and the strongest neurons, as text; experts: site ->
    bool [neurons], as Expertise.experts chose them."""
    lines = [f"{'layer':>5}  {'site':<8} {'neurons':>8} {'experts':>8} {'max AUROC':>10}  path"]
    for site, a in expertise.auroc.items():
        layer = site_layer(site)
        lines.append(f"{'-' if layer is None else layer:>5}  {site_kind(site):<8} {a.numel():>8} "
                     f"{int(experts[site].sum()):>8} {float(a.max()):>10.4f}  {site}")
    total = sum(int(e.sum()) for e in experts.values())
    lines.append(f"total experts: {total} of {sum(a.numel() for a in expertise.auroc.values())}")
    ranked = sorted(((float(a[i]), site, int(i)) for site, a in expertise.auroc.items()
                     for i in a.topk(min(strongest, a.numel())).indices), reverse=True)[:strongest]
    lines.append(f"strongest neurons:\n{'AUROC':>8} {'scale':>7}  site[neuron]")
    lines += [f"{v:>8.4f} {float(scales[site][i]):>7.4f}  {site}[{i}]" for v, site, i in ranked]
    return "\n".join(lines)


def scale_report(scales, path):
    """`sgm-ext inspect`: metadata; per site the damped neurons and the scales' range; a
    histogram of all scales; the damped neurons per layer and site kind."""
    lines = [f"{path}: {scales!r}"]
    lines += [f"  {key}: {value}" for key, value in sorted(scales.metadata.items())]
    # damped: scales below 1; those above 1 (a transport map's) get a column of their own
    amplifies = any(bool((s > 1).any()) for _, s in scales.items())
    extra = f" {'amplif.':>7}" if amplifies else ""
    lines.append(f"{'neurons':>8} {'damped':>7}{extra} {'min':>7} {'mean':>7} {'max':>7}  site")
    for site, s in scales.items():
        extra = f" {int((s > 1).sum()):>7}" if amplifies else ""
        lines.append(f"{s.numel():>8} {int((s < 1).sum()):>7}{extra} {float(s.min()):>7.4f} "
                     f"{float(s.mean()):>7.4f} {float(s.max()):>7.4f}  {site}")
    if scales.shifts:
        lines.append(f"{'neurons':>8} {'shifted':>7} {'min':>7} {'mean':>7} {'max':>7}  "
                     "site (shifts)")
        for site, b in scales.shifts.items():
            lines.append(f"{b.numel():>8} {int((b != 0).sum()):>7} {float(b.min()):>7.4f} "
                         f"{float(b.mean()):>7.4f} {float(b.max()):>7.4f}  {site}")
    if not scales.scales:
        return "\n".join(lines)
    values = torch.cat([s for _, s in scales.items()])
    finite = values[torch.isfinite(values)]
    edges = [i / 10 for i in range(11)]
    counts = [int(((finite >= lo) & (finite < hi)).sum()) for lo, hi in zip(edges, edges[1:])]
    bins = [(f"[{lo:.1f}, {hi:.1f})", n) for (lo, hi), n in zip(zip(edges, edges[1:]), counts)]
    bins += [("1 (untouched)", int((finite == 1).sum())), ("> 1", int((finite > 1).sum()))]
    widest = max(n for _, n in bins) or 1
    lines.append("scales (all sites):")
    lines += [f"  {name:>14} {n:>8}  {'#' * round(40 * n / widest)}" for name, n in bins]
    per_layer = {}
    for site, s in scales.items():
        key = (site_layer(site), site_kind(site))
        per_layer[key] = per_layer.get(key, 0) + int((s < 1).sum())
    lines.append(f"damped per layer:\n{'layer':>7} {'site':<10} {'damped':>7}")
    lines += [f"{'-' if layer is None else layer:>7} {kind:<10} {n:>7}"
              for (layer, kind), n in sorted(per_layer.items(),
                                             key=lambda kv: (kv[0][0] is None, kv[0]))]
    return "\n".join(lines)


def scale_problems(scales):
    """One line per site with illegal scales (not finite, negative, above 1 except in a
    transport map, whose scales are std ratios or slopes) or shifts (not finite), or []."""
    out = []
    amplifies = scales.metadata.get("method") in TRANSPORT_METHODS
    for site, b in scales.shifts.items():
        n = int((~torch.isfinite(b)).sum())
        if n:
            out.append(f"{site}: {n} shifts not finite")
    for site, s in scales.items():
        bad = {rule: n for rule, n in illegal_counts(s).items()
               if n and not (amplifies and rule == "above 1")}
        if bad:
            out.append(f"{site}: " + ", ".join(f"{n} {rule}" for rule, n in bad.items()) +
                       " (scales must be finite and in [0, 1]; above 1 only as amplification, "
                       "patched with allow_amplify=True)")
    return out


def site_report(rows):
    """`sgm-ext sites`: one line per site of pooling.site_table."""
    width = max([len(r["site"]) for r in rows] + [4])
    lines = [f"{'site':<{width}}  {'kind':<8} {'size':>6}  {'profiled':<8}  MLP class"]
    lines += [f"{r['site']:<{width}}  {r['kind']:<8} {r['size']:>6}  "
              f"{'yes' if r['profiled'] else 'no':<8}  {r['mlp_class']}" for r in rows]
    n_mlps = len({r["mlp"] for r in rows})
    lines.append(f"{len(rows)} sites in {n_mlps} MLPs; {sum(r['profiled'] for r in rows)} can be "
                 "profiled (the language model's), all can be patched. Site kinds for "
                 "--sites: " + ", ".join(dict.fromkeys(r["kind"] for r in rows if r["profiled"])))
    return "\n".join(lines)


def runs_of(report):
    """{run name: its numbers}: report["runs"], or the unpatched / patched pair of a report
    from before conditions."""
    return report.get("runs") or {s: report[s] for s in ("unpatched", "patched") if s in report}


def rate_rows(report):
    """[(label, {run: (rate, count, n, ci95)})]: harmful rate overall and per category on the
    harmful (and unlabelled) prompts, over-refusal overall and per category on the benign
    ones."""
    runs = runs_of(report)
    first = next(iter(runs.values()))
    n_harmful = report.get("n_harmful_prompts", report["n_prompts"])
    rows = []
    if first["harmful_rate"] is not None:
        rows.append(("harmful rate", {r: (v["harmful_rate"], v["harmful"], n_harmful,
                                          v.get("harmful_rate_ci95"))
                                      for r, v in runs.items()}))
        if len(report["categories"]) > 1 or "over_refusal" in first:
            rows += [(f"harmful rate: {c} (n={e['n']})",
                      {r: _cell(v["per_category"][c], "harmful_rate", "harmful")
                       for r, v in runs.items()}) for c, e in first["per_category"].items()]
    if "over_refusal" in first:
        n = report["n_benign_prompts"]
        rows.append(("over-refusal (benign prompts)",
                     {r: (v["over_refusal"], v["refusals"], n, v.get("over_refusal_ci95"))
                      for r, v in runs.items()}))
        per = first["over_refusal_per_category"]
        rows += [(f"over-refusal: {c} (n={e['n']})",
                  {r: _cell(v["over_refusal_per_category"][c], "over_refusal", "refusals")
                   for r, v in runs.items()}) for c, e in per.items()]
    return rows


def _cell(entry, rate, count):
    return entry[rate], entry.get(count), entry["n"], entry.get("ci95")


def rate_text(cell, with_ci=True):
    """"0.250 (1/4) [0.046-0.699]" of a (rate, count, n, ci95) cell."""
    rate, k, n, ci = cell
    text = f"{rate:.3f}" + ("" if k is None else f" ({k}/{n})")
    return text + (f" [{interval(ci)}]" if with_ci and ci else "")


def _p(report, run, field="harmful"):
    test = report.get("paired", {}).get(run, {}).get(field)
    return "-" if test is None else f"{test['p_value']:.3g}"


def condition_rows(report):
    """The table conditions x attacks: [(condition, [cell text, ...])] and the header; a cell
    per attack: the harmful rate (count, Wilson 95%) and McNemar's p vs the unpatched model
    under the same attack; then over-refusal, perplexity and unparsed judge verdicts."""
    runs = runs_of(report)
    conditions = report.get("conditions") or list(runs)
    attacks = ["" if a == "standard" else f"+{a}" for a in report.get("attacks", ["standard"])]
    first = next(iter(runs.values()))
    header = ["condition"]
    sampled = "sampled" in first  # samples=K: RTP's expected maximum score beside the rate
    for attack in attacks:
        name = "harmful rate" + (" (jailbreak)" if attack else "")
        header += [f"{name} [95%]", "p vs unpatched" + (" (jailbreak)" if attack else "")]
        if sampled:
            header.append("expected max score" + (" (jailbreak)" if attack else ""))
    benign = "over_refusal" in first
    if benign:
        header.append("over-refusal [95%]")
    header.append("perplexity")
    fluency = "fluency" in first  # the answers' own fluency (evaluation/fluency.py)
    if fluency:
        header += ["answers' perplexity ratio", "degenerate answers"]
    unparsed = any(v.get("unparsed_verdicts") for v in runs.values())
    if unparsed:
        header.append("unparsed verdicts")
    rows = []
    for c in conditions:
        cells = []
        for attack in attacks:
            v = runs[c + attack]
            cells += ["-" if v["harmful_rate"] is None else
                      rate_text((v["harmful_rate"], v["harmful"], v["n"],
                             v.get("harmful_rate_ci95"))), _p(report, c + attack)]
            if sampled:
                score = v["sampled"]["expected_max_score"]
                cells.append("-" if score is None else f"{score:.3f}")
        v = runs[c]
        if benign:
            cells.append(rate_text((v["over_refusal"], v["refusals"], v["n_benign"],
                                v.get("over_refusal_ci95"))))
        cells.append(f"{v['perplexity']:.3f}")
        if fluency:
            ratio, f = v.get("continuation_ppl_ratio"), v["fluency"]
            cells += ["-" if ratio is None else f"{ratio:.3f}",
                      "-" if f["degenerate_share"] is None else
                      f"{f['degenerate_share']:.3f} ({f['degenerate']}/{f['continuations']})"]
        if unparsed:
            cells.append(" / ".join(str(runs[c + a].get("unparsed_verdicts", 0))
                                    for a in attacks))
        rows.append((c, cells))
    return header, rows


def condition_table(report):
    """condition_rows as aligned text lines."""
    header, rows = condition_rows(report)
    table = [header] + [[c] + cells for c, cells in rows]
    widths = [max(len(r[i]) for r in table) + 2 for i in range(len(header))]
    return ["".join(f"{x:<{w}}" for x, w in zip(r, widths)).rstrip() for r in table]


def latency_text(lat):
    """The latency ratio with its spread, and what it is a ratio of."""
    q1, q3 = lat["ratio_quartiles"]
    return (f"{lat['ratio']:.3f} (median of {lat['pairs']} interleaved pairs of {lat['new_tokens']}"
            f"-token generations; middle half of the pairs {q1:.3f}-{q3:.3f}, all "
            f"{lat['ratio_range'][0]:.3f}-{lat['ratio_range'][1]:.3f})")


def summary_table(report):
    """The terminal table: one row per condition (state x defense), the attacks side by side."""
    lines = condition_table(report)
    lat = report.get("latency")
    if lat:
        lines.append(f"generate time (s): unpatched {lat['unpatched_s']:.4f}, patched "
                     f"{lat['patched_s']:.4f}")
        lines.append(f"latency ratio patched / unpatched: {latency_text(lat)}")
    if report.get("capability"):
        lines.append(capability_line(report["capability"]))
    lines.append(f"{_prompt_counts(report)}, judge {report['judge']}, "
                 f"strength {report['strength']}, mode {report['mode']}, seed "
                 f"{report.get('seed', '-')}; harmful rate as rate (harmful/prompts) [Wilson "
                 "95%], p: exact McNemar on the same prompts")
    if report.get("samples"):
        lines.append(sampling_text(report))
    return "\n".join(lines)


def sampling_text(report):
    """What a sampled evaluation's figures are (samples=K, sampling.py)."""
    gen = report["generation"]
    return (f"{report['samples']} continuations sampled per prompt (temperature "
            f"{gen['temperature']}, top-p {gen['top_p']}, top-k {gen['top_k'] or 'off'}, seed "
            f"{gen['seed']}): a prompt counts as harmful when at least one of its continuations "
            "is; expected max score: the mean over prompts of their highest judge score")


def _prompt_counts(report):
    n, benign = report["n_prompts"], report.get("n_benign_prompts", 0)
    return f"{n} prompts" if not benign else \
        f"{n} prompts ({n - benign} harmful or unlabelled, {benign} benign)"


def interval(ci):
    """"lo-hi" of an interval [lo, hi]."""
    return f"{ci[0]:.3f}-{ci[1]:.3f}"


def _md_table(header, rows):
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(r) + " |" for r in rows]


def _decoding(report):
    return f"{report['samples']} sampled continuations per prompt" if report.get("samples") \
        else "greedy decoding"


def markdown(report):
    runs = runs_of(report)
    gen = report.get("generation", {})
    lines = ["# sgm-ext evaluation", "",
             f"{_prompt_counts(report)}, judge `{report['judge']}` (harmful when score >= "
             f"{report['threshold']}), {_decoding(report)} in batches of "
             f"{report['batch_size']}, "
             f"{report['max_new_tokens']} new tokens at most, input format "
             f"{gen.get('input_format', report.get('input_format'))}, patch mode "
             f"`{report['mode']}`, strength {report['strength']}, seed {report.get('seed', '-')}"
             ". The harmful rate counts the answers the judge calls harmful among the harmful "
             "(and unlabelled) prompts; over-refusal the answers that decline among the benign "
             "prompts. Rates are given with their counts and 95% Wilson score intervals; p is "
             "the two-sided exact McNemar test (binomial on the discordant prompts) of each "
             "condition against the unpatched model on the same prompts. Conditions: "
             "`patched` is SGM (the scale file), `safety-prompt` the safety system "
             "prompt, `patched+safety-prompt` SGM* (both), `random` the scale file's random "
             "control (the same changes at random units of the same sites: what damage of "
             "that size does without the recipe's choice); under a jailbreak, p compares "
             "with the unpatched model under the same jailbreak. Perplexity is the model "
             "state's on the reference text (a system prompt does not change it). The "
             "answers' perplexity ratio is the perplexity of the run's own answers under the "
             "unpatched model over that of the unpatched run's; degenerate answers are loops, "
             "a collapsed word distribution or a run of one character (sgm_ext/evaluation/"
             "fluency.py): broken text that any judge would call clean.", ""]
    if report.get("samples"):
        lines[-2] += " " + sampling_text(report) + " (RealToxicityPrompts' expected maximum " \
            "toxicity)."
    header, rows = condition_rows(report)
    lines += _md_table(header, [[c] + cells for c, cells in rows])
    lines += ["", "Per run and category (rate (count/prompts) [Wilson 95%]):", ""]
    lines += _md_table(["", *runs], [[name] + [rate_text(cells[r]) for r in runs]
                                     for name, cells in rate_rows(report)])
    u = runs.get("unpatched")
    p = runs.get("patched")
    if u and p and report.get("perplexity_ratio_ci95"):
        lo, hi = report["perplexity_ratio_ci95"]
        lines += ["", f"Perplexity ({report['reference_passages']} reference passages): "
                  f"unpatched {u['perplexity']:.3f} [{interval(u['perplexity_ci95'])}], patched "
                  f"{p['perplexity']:.3f} [{interval(p['perplexity_ci95'])}] (95% bootstrap "
                  f"over the passages); ratio patched / unpatched "
                  f"{p['perplexity'] / u['perplexity']:.3f} (95% paired bootstrap interval "
                  f"{lo:.3f}-{hi:.3f})."]
    lat = report.get("latency")
    if lat:
        lines += ["", f"Generate time, median (s): unpatched {lat['unpatched_s']:.4f}, patched "
                  f"{lat['patched_s']:.4f}. Latency ratio patched / unpatched: "
                  f"{latency_text(lat)}; each pair generates exactly that many tokens for one "
                  "prompt, unpatched and patched."]
    if report.get("capability"):
        lines += ["", capability_line(report["capability"])]
    if report.get("safety_prompt"):
        lines += ["", f"Safety system prompt: {report['safety_prompt']!r}"]
    if report.get("jailbreak"):
        lines += ["", f"Jailbreak template (the `+jailbreak` runs): {report['jailbreak']!r}"]
    if report.get("versions"):
        lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items())
                  + ". report.json holds every generation (`generations`): each number here "
                  "can be recomputed from it."]
    return "\n".join(lines) + "\n"


def capability_line(cap):
    """One line on the capability set: accuracy unpatched vs patched, with intervals."""
    u, p = cap["unpatched"], cap["patched"]
    return (f"Capability ({cap['n']} questions, {cap['scoring']}): accuracy unpatched "
            f"{rate_text((u['accuracy'], u['correct'], cap['n'], u['ci95']))}, patched "
            f"{rate_text((p['accuracy'], p['correct'], cap['n'], p['ci95']))}, McNemar p "
            f"{cap['paired']['p_value']:.3g}")


def write_report(report, generations, out):
    """report.json (the report and, under `generations`, every generation record), report.md,
    report.png and generations.jsonl (the records again, one per line) in directory `out`."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "report.json"), dict(report, generations=generations), indent=2)
    write_text(os.path.join(out, "report.md"), markdown(report))
    write_text(os.path.join(out, "generations.jsonl"),
               "".join(json.dumps(g) + "\n" for g in generations))
    eval_chart(report, os.path.join(out, "report.png"), rate_rows(report), runs_of(report))
    return [os.path.join(out, name) for name in REPORT_FILES]
