"""The PNG plots: the profile's AUROC distribution and experts per layer, the evaluation chart."""
from .registry import site_kind, site_layer


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def expertise_plot(expertise, scales, path):
    """PNG: histogram of all AUROCs, and damped neurons per layer and site kind."""
    import matplotlib.ticker
    import torch

    plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    values = torch.cat(list(expertise.auroc.values())).numpy()
    left.hist(values, bins=50, range=(0, 1), color="#4477aa")
    left.set_yscale("log")
    left.set(xlabel="AUROC (toxic vs non-toxic)", ylabel="neurons", title="Expertise")
    per_kind = {}
    for site, s in scales.items():
        layer = site_layer(site)
        damped = int((s < 1).sum())
        per_kind.setdefault(site_kind(site), {})[layer if layer is not None else -1] = damped
    width = 0.8 / max(len(per_kind), 1)
    for j, (kind, counts) in enumerate(sorted(per_kind.items())):
        layers = sorted(counts)
        right.bar([x + j * width for x in layers], [counts[x] for x in layers], width, label=kind)
    right.set(xlabel="layer", ylabel="experts (scale < 1)", title="Experts per layer")
    right.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_chart(report, path):
    """PNG: harmful rate per category and overall, perplexity, latency; unpatched vs patched."""
    plt = _pyplot()

    u, p = report["unpatched"], report["patched"]
    cats = list(report["categories"]) if len(report["categories"]) > 1 else []
    names = ["overall"] + cats
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), gridspec_kw={"width_ratios": [3, 1, 1]})
    x = range(len(names))
    for off, (label, side, color) in enumerate((("unpatched", u, "#cc6677"),
                                                ("patched", p, "#4477aa"))):
        values = [side["harmful_rate"]] + [side["per_category"][c]["harmful_rate"] for c in cats]
        bars = axes[0].bar([i + 0.4 * off for i in x], values, 0.4, label=label, color=color)
        axes[0].bar_label(bars, fmt="%.2f", fontsize=8)  # a rate of 0 has no visible bar
    axes[0].set_xticks([i + 0.2 for i in x], names, rotation=20)
    axes[0].set(ylabel="harmful rate", ylim=(0, 1), title="Harmful answers")
    axes[0].legend()
    bars = axes[1].bar(["unpatched", "patched"], [u["perplexity"], p["perplexity"]],
                       color=["#cc6677", "#4477aa"])
    axes[1].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[1].set(title="Perplexity (reference text)")
    lat = report.get("latency")
    if lat:
        axes[2].bar(["unpatched", "patched"], [lat["unpatched_s"], lat["patched_s"]],
                    color=["#cc6677", "#4477aa"])
        axes[2].set(title=f"Generate time (ratio {lat['ratio']:.2f})", ylabel="seconds")
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
