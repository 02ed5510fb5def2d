"""The PNG plots: the profile's AUROC distribution and experts per layer, the evaluation chart."""
from ..patching.registry import site_kind, site_layer


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


COLORS = {"unpatched": "#cc6677", "patched": "#4477aa", "safety-prompt": "#ddcc77",
          "patched+safety-prompt": "#117733", "random": "#999999"}
MORE_COLORS = ["#882255", "#88ccee", "#999933", "#44aa99", "#aa4499", "#332288"]


def eval_chart(report, path, rate_rows, runs):
    """PNG: the rates (harmful rate overall and per category, over-refusal) of every run with
    their 95% intervals as error bars, perplexity per run, and the spread of the generation
    times unpatched vs patched.

    rate_rows: [(label, {run: (rate, count, n, ci95)})] as report.rate_rows gives them;
    runs: {run: its numbers} (report.runs_of)."""
    plt = _pyplot()

    names = list(runs)
    spare = iter(MORE_COLORS * 4)
    colors = {r: COLORS.get(r) or next(spare) for r in names}
    fig, axes = plt.subplots(1, 3, figsize=(13 + 0.6 * max(0, len(names) - 2), 4.8),
                             layout="constrained", gridspec_kw={"width_ratios": [3, 1, 1.2]})
    labels = [name.replace("harmful rate: ", "").replace("over-refusal: ", "refused: ")
              for name, _ in rate_rows]
    width = 0.8 / len(names)
    for off, run in enumerate(names):
        cells = [cells[run] for _, cells in rate_rows]
        values = [c[0] for c in cells]
        # asymmetric error bars: the Wilson interval around the rate
        errors = [[max(0.0, c[0] - c[3][0]) if c[3] else 0.0 for c in cells],
                  [max(0.0, c[3][1] - c[0]) if c[3] else 0.0 for c in cells]]
        bars = axes[0].bar([i + width * off for i in range(len(labels))], values, width,
                           label=run, color=colors[run], yerr=errors, capsize=2,
                           error_kw={"elinewidth": 0.8})
        axes[0].bar_label(bars, fmt="%.2f", fontsize=7, padding=2)  # a 0 has no visible bar
    axes[0].set_xticks([i + 0.4 - width / 2 for i in range(len(labels))], labels, rotation=25,
                       ha="right", fontsize=8)
    axes[0].set(ylabel="rate (95% Wilson interval)", ylim=(0, 1.15),
                title="Harmful answers / over-refusal")
    axes[0].legend(loc="upper right", fontsize=7, ncol=min(4, len(names)))
    states = [r for r in names if r in ("unpatched", "patched", "random")] or names[:1]
    ppl = [runs[r]["perplexity"] for r in states]
    errors = [[max(0.0, v - runs[r]["perplexity_ci95"][0]) for r, v in zip(states, ppl)],
              [max(0.0, runs[r]["perplexity_ci95"][1] - v) for r, v in zip(states, ppl)]] \
        if all(runs[r].get("perplexity_ci95") for r in states) else None
    bars = axes[1].bar(states, ppl, color=[colors[r] for r in states], yerr=errors, capsize=3)
    axes[1].bar_label(bars, fmt="%.2f", fontsize=8)
    axes[1].set(title="Perplexity (reference text)\n95% bootstrap interval")
    lat = report.get("latency")
    if lat:
        times = [lat["times"]["unpatched"], lat["times"]["patched"]]
        box = axes[2].boxplot(times, tick_labels=["unpatched", "patched"], patch_artist=True,
                              widths=0.5)
        for patch, color in zip(box["boxes"], (COLORS["unpatched"], COLORS["patched"])):
            patch.set_facecolor(color)
        axes[2].set(title=f"Generate time per prompt\n(median ratio {lat['ratio']:.2f})",
                    ylabel="seconds")
    else:
        axes[2].axis("off")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
