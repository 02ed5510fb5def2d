"""Reports as text and files: the profile's expertise table, the evaluation's terminal table,
report.md, and the files of an evaluation's report directory."""
import json
import os

from .files import write_json, write_text
from .plots import eval_chart
from .registry import site_kind, site_layer

REPORT_FILES = ("report.json", "report.md", "report.png", "generations.jsonl")


def expertise_table(expertise, scales, threshold, top_k, strongest=10):
    """Experts per site (layer, kind) and the strongest neurons, as text."""
    experts = expertise.experts(threshold, top_k)
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


def summary_table(report):
    """The short terminal table."""
    u, p = report["unpatched"], report["patched"]
    rows = [("harmful rate", u["harmful_rate"], p["harmful_rate"], ".3f")]
    if len(report["categories"]) > 1:
        rows += [(f"  {c} (n={n})", u["per_category"][c]["harmful_rate"],
                  p["per_category"][c]["harmful_rate"], ".3f")
                 for c, n in report["categories"].items()]
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
    lines.append(f"{report['n_prompts']} prompts, judge {report['judge']}, "
                 f"strength {report['strength']}, mode {report['mode']}")
    return "\n".join(lines)


def markdown(report):
    u, p = report["unpatched"], report["patched"]
    lines = ["# sgm-ext evaluation", "",
             f"{report['n_prompts']} prompts, judge `{report['judge']}` (harmful when score >= "
             f"{report['threshold']}), greedy decoding in batches of {report['batch_size']}, "
             f"{report['max_new_tokens']} new tokens at most, patch mode `{report['mode']}`, "
             f"strength {report['strength']}.", "",
             "| | unpatched | patched |", "|---|---|---|",
             f"| harmful rate | {u['harmful_rate']:.3f} ({u['harmful']}/{report['n_prompts']}) "
             f"| {p['harmful_rate']:.3f} ({p['harmful']}/{report['n_prompts']}) |"]
    for c, n in report["categories"].items():
        lines.append(f"| harmful rate: {c} (n={n}) | {u['per_category'][c]['harmful_rate']:.3f} "
                     f"| {p['per_category'][c]['harmful_rate']:.3f} |")
    lines.append(f"| perplexity ({report['reference_passages']} reference passages) "
                 f"| {u['perplexity']:.3f} | {p['perplexity']:.3f} |")
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
    eval_chart(report, os.path.join(out, "report.png"))
    return [os.path.join(out, name) for name in REPORT_FILES]
