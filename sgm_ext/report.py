"""Reports as text and files: the profile's expertise table, the evaluation's terminal table,
report.md, and the files of an evaluation's report directory."""
import json
import os

import torch

from .files import write_json, write_text
from .plots import eval_chart
from .registry import site_kind, site_layer
from .scale_math import illegal_counts
from .transport import TRANSPORT_METHODS

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
    lines.append(f"{'neurons':>8} {'damped':>7} {'min':>7} {'mean':>7} {'max':>7}  site")
    for site, s in scales.items():
        lines.append(f"{s.numel():>8} {int((s != 1).sum()):>7} {float(s.min()):>7.4f} "
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
        per_layer[key] = per_layer.get(key, 0) + int((s != 1).sum())
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


def rate_rows(report):
    """(label, unpatched, patched, count label) of the rates: harmful rate overall and per
    category on the harmful (and unlabelled) prompts, over-refusal on the benign ones."""
    u, p = report["unpatched"], report["patched"]
    n_harmful = report.get("n_harmful_prompts", report["n_prompts"])
    rows = []
    if u["harmful_rate"] is not None:
        rows.append(("harmful rate", u["harmful_rate"], p["harmful_rate"],
                     (f"{u['harmful']}/{n_harmful}", f"{p['harmful']}/{n_harmful}")))
        if len(report["categories"]) > 1 or "over_refusal" in u:
            rows += [(f"harmful rate: {c} (n={v['n']})", v["harmful_rate"],
                      p["per_category"][c]["harmful_rate"], None)
                     for c, v in u["per_category"].items()]
    if "over_refusal" in u:
        n = report["n_benign_prompts"]
        rows.append(("over-refusal (benign prompts)", u["over_refusal"], p["over_refusal"],
                     (f"{u['refusals']}/{n}", f"{p['refusals']}/{n}")))
        rows += [(f"over-refusal: {c} (n={v['n']})", v["over_refusal"],
                  p["over_refusal_per_category"][c]["over_refusal"], None)
                 for c, v in u["over_refusal_per_category"].items()]
    return rows


def summary_table(report):
    """The short terminal table."""
    u, p = report["unpatched"], report["patched"]
    rows = [(("  " + name.split(": ", 1)[1]) if ": " in name else name, a, b, ".3f")
            for name, a, b, _ in rate_rows(report)]
    rows.append(("perplexity", u["perplexity"], p["perplexity"], ".3f"))
    lat = report.get("latency")
    if lat:
        rows.append(("generate time (s)", lat["unpatched_s"], lat["patched_s"], ".4f"))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'':<{width}}{'unpatched':>11}{'patched':>11}"]
    lines += [f"{name:<{width}}{a:>11{fmt}}{b:>11{fmt}}" for name, a, b, fmt in rows]
    if lat:
        lines.append(f"latency ratio patched / unpatched: {lat['ratio']:.3f} "
                     f"(median of {lat['pairs']} interleaved pairs, {lat['new_tokens']} tokens)")
    lines.append(f"{_prompt_counts(report)}, judge {report['judge']}, "
                 f"strength {report['strength']}, mode {report['mode']}")
    return "\n".join(lines)


def _prompt_counts(report):
    n, benign = report["n_prompts"], report.get("n_benign_prompts", 0)
    return f"{n} prompts" if not benign else \
        f"{n} prompts ({n - benign} harmful or unlabelled, {benign} benign)"


def interval(ci):
    """"lo-hi" of an interval [lo, hi]."""
    return f"{ci[0]:.3f}-{ci[1]:.3f}"


def markdown(report):
    u, p = report["unpatched"], report["patched"]
    lines = ["# sgm-ext evaluation", "",
             f"{_prompt_counts(report)}, judge `{report['judge']}` (harmful when score >= "
             f"{report['threshold']}), greedy decoding in batches of {report['batch_size']}, "
             f"{report['max_new_tokens']} new tokens at most, patch mode `{report['mode']}`, "
             f"strength {report['strength']}. The harmful rate counts the answers the judge "
             "calls harmful among the harmful (and unlabelled) prompts; over-refusal the "
             "answers that decline among the benign prompts.", "",
             "| | unpatched | patched |", "|---|---|---|"]
    for name, a, b, counts in rate_rows(report):
        if counts:
            lines.append(f"| {name} | {a:.3f} ({counts[0]}) | {b:.3f} ({counts[1]}) |")
        else:
            lines.append(f"| {name} | {a:.3f} | {b:.3f} |")
    for key, name in (("harmful_rate_ci95", "harmful rate"), ("over_refusal_ci95",
                                                              "over-refusal")):
        if u.get(key):
            lines.append(f"| {name}, 95% interval (Wilson) | {interval(u[key])} | "
                         f"{interval(p[key])} |")
    lines.append(f"| perplexity ({report['reference_passages']} reference passages) "
                 f"| {u['perplexity']:.3f} | {p['perplexity']:.3f} |")
    if u.get("perplexity_ci95"):
        lines.append(f"| perplexity, 95% bootstrap interval over the passages | "
                     f"{u['perplexity_ci95'][0]:.3f}-{u['perplexity_ci95'][1]:.3f} | "
                     f"{p['perplexity_ci95'][0]:.3f}-{p['perplexity_ci95'][1]:.3f} |")
        lo, hi = report["perplexity_ratio_ci95"]
        ratio = p["perplexity"] / u["perplexity"]
        lines += ["", f"Perplexity ratio patched / unpatched: {ratio:.3f} (95% paired bootstrap "
                  f"interval {lo:.3f}-{hi:.3f})."]
    lat = report.get("latency")
    if lat:
        lines.append(f"| generate time, median (s) | {lat['unpatched_s']:.4f} | "
                     f"{lat['patched_s']:.4f} |")
        lines += ["", f"Latency ratio patched / unpatched: **{lat['ratio']:.3f}** (median of "
                  f"{lat['pairs']} interleaved pairs, each generating exactly "
                  f"{lat['new_tokens']} tokens for one prompt)."]
    return "\n".join(lines) + "\n"


def write_report(report, generations, out):
    """report.json, report.md, report.png and generations.jsonl in directory `out`."""
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "report.json"), report, indent=2)
    write_text(os.path.join(out, "report.md"), markdown(report))
    write_text(os.path.join(out, "generations.jsonl"),
               "".join(json.dumps(g) + "\n" for g in generations))
    eval_chart(report, os.path.join(out, "report.png"), rate_rows(report))
    return [os.path.join(out, name) for name in REPORT_FILES]
