"""The PNG plots: the profile's AUROC distribution and experts per layer, the evaluation chart."""
from .registry import site_kind, site_layer


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def expertise_plot(expertise, scales, path, threshold=None):
    """PNG: histogram of all AUROCs (with the selection threshold), and damped neurons per
    layer and site kind."""
    import matplotlib.ticker
    import torch

    plt = _pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), layout="constrained")
    values = torch.cat(list(expertise.auroc.values())).numpy()
    left.hist(values, bins=50, range=(0, 1), color="#4477aa", label="neurons")
    left.set_yscale("log")
    if threshold is not None:
        left.axvline(threshold, color="#cc6677", linestyle="--",
                     label=f"threshold {threshold:g} (experts to the right)")
    left.set(xlabel="AUROC (toxic vs non-toxic)", ylabel="neurons", title="Expertise")
    # legends below the axes: above the bars they would hide the tallest ones
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
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
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


COLORS = {"unpatched": "#cc6677", "patched": "#4477aa"}


def eval_chart(report, path, rate_rows):
    """PNG: the rates (harmful rate overall and per category, over-refusal), perplexity, and
    the spread of the generation times; unpatched vs patched.

    rate_rows: [(label, unpatched, patched, counts)] as report.rate_rows gives them."""
    plt = _pyplot()

    u, p = report["unpatched"], report["patched"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), layout="constrained",
                             gridspec_kw={"width_ratios": [3, 1, 1.2]})
    names = [name.replace("harmful rate: ", "").replace("over-refusal: ", "refused: ")
             for name, *_ in rate_rows]
    x = range(len(names))
    for off, state in enumerate(("unpatched", "patched")):
        values = [row[1 + off] for row in rate_rows]
        bars = axes[0].bar([i + 0.4 * off for i in x], values, 0.4, label=state,
                           color=COLORS[state])
        axes[0].bar_label(bars, fmt="%.2f", fontsize=8)  # a rate of 0 has no visible bar
    axes[0].set_xticks([i + 0.2 for i in x], names, rotation=25, ha="right", fontsize=8)
    axes[0].set(ylabel="rate", ylim=(0, 1.12), title="Harmful answers / over-refusal")
    axes[0].legend(loc="upper right", fontsize=8, ncol=2)
    bars = axes[1].bar(["unpatched", "patched"], [u["perplexity"], p["perplexity"]],
                       color=list(COLORS.values()))
    axes[1].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[1].set(title="Perplexity\n(reference text)")
    lat = report.get("latency")
    if lat:
        times = [lat["times"]["unpatched"], lat["times"]["patched"]]
        box = axes[2].boxplot(times, tick_labels=["unpatched", "patched"], patch_artist=True,
                              widths=0.5)
        for patch, color in zip(box["boxes"], COLORS.values()):
            patch.set_facecolor(color)
        axes[2].set(title=f"Generate time per prompt\n(median ratio {lat['ratio']:.2f})",
                    ylabel="seconds")
    else:
        axes[2].axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
