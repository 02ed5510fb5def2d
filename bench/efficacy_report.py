"""The efficacy benchmark's tables, frontier plot and consistency check (bench_efficacy.py
writes the figures; this reads them, so `bench_efficacy.py --print` redraws from the file)."""
import math


def check_result(result, budget):
    """ValueError when the benchmark's output is inconsistent (what the CI test relies on)."""
    for model, entry in result["models"].items():
        _check_run(model, entry, budget)
        best, control = entry["best"], entry["random_control"]
        if best not in entry["test"] or control not in entry["test"]:
            raise ValueError(f"{model}: best {best} or its control not reported on test")
        pairs = entry.get("random_controls") or {best: {"same_strength": control}}
        if control not in {c for pair in pairs.values() for c in pair.values()
                           if isinstance(c, str)}:
            raise ValueError(f"{model}: {control} is not {best}'s control")
        if "supplement" in entry:
            sup = entry["supplement"]
            _check_run(f"{model} supplement", sup, budget)
            if set(sup["calibration"]) & set(entry["calibration"]):
                raise ValueError(f"{model}: the supplement repeats a candidate of the run")
            would = sup["would_have_chosen"]
            if would in sup["calibration"] and would not in sup["random_controls"]:
                raise ValueError(f"{model}: the supplement's {would} has no random control")
    return result


def _check_run(model, run, budget):
    """The conditions of one run (or supplement): every figure present and coherent, each
    control beside its candidate, each candidate tested at its calibrated strength."""
    for split in ("validation", "test"):
        conds = run[split]
        if "unpatched" not in conds:
            raise ValueError(f"{model} {split}: no unpatched condition")
        for name, c in conds.items():
            for key in ("toxic_rate", "ci95", "n", "p_value", "neurons", "ppl", "ppl_ratio",
                        "strength", "judge", "judges", "fluency"):
                if key not in c:
                    raise ValueError(f"{model} {split} {name}: no {key}")
            for judge, figures in c["judges"].items():
                lo, hi = figures["ci95"]
                if figures["n"] <= 0 or not lo - 1e-12 <= figures["toxic_rate"] <= hi + 1e-12:
                    raise ValueError(f"{model} {split} {name} {judge}: rate outside its "
                                     "interval")
                if not 0.0 <= figures["p_value"] <= 1.0:
                    raise ValueError(f"{model} {split} {name} {judge}: bad p-value")
            if c["toxic_rate"] != c["judges"][c["judge"]]["toxic_rate"]:
                raise ValueError(f"{model} {split} {name}: the primary judge's rate differs")
            if not math.isfinite(c["ppl"]) or not 0.0 <= c["strength"] <= 1.0:
                raise ValueError(f"{model} {split} {name}: bad perplexity or strength")
        u = conds["unpatched"]
        if u["neurons"] != 0 or u["ppl_ratio"] != 1.0 or \
                u["fluency"]["continuation_ppl_ratio"] != 1.0:
            raise ValueError(f"{model} {split}: unpatched changed something")
    # a control changes as many neurons as its candidate, at the same strength, or (the
    # control at the same fluency cost, "@ppl") at the strength calibrated to its ratio
    for cname, pair in (run.get("random_controls") or {}).items():
        same, matched = pair["same_strength"], pair.get("same_ppl")
        missing = [c for c in (cname, same, matched) if c and c not in run["test"]]
        if missing:
            raise ValueError(f"{model}: {', '.join(missing)} not reported on test")
        cand = run["test"][cname]
        for c in filter(None, (same, matched)):
            if run["test"][c]["neurons"] != cand["neurons"]:
                raise ValueError(f"{model}: {c} changes another neuron count")
        if run["test"][same]["strength"] != cand["strength"]:
            raise ValueError(f"{model}: {same} runs at another strength than {cname}")
        if matched and run["test"][matched]["strength"] != \
                pair["same_ppl_calibration"]["strength"]:
            raise ValueError(f"{model}: {matched} runs at another strength than calibrated")
    for name, cal in run["calibration"].items():
        if name not in run["test"]:
            raise ValueError(f"{model} {name}: not reported on test")
        if cal["ratio"] > budget + 1e-12:
            raise ValueError(f"{model} {name}: calibrated over the budget")
        if run["test"][name]["strength"] != cal["strength"]:
            raise ValueError(f"{model} {name}: tested at another strength than calibrated")


def with_supplement(entry):
    """The entry's conditions and sweeps with its supplement's beside them (the supplement's
    unpatched left out: it repeats the run's), for the frontier plot."""
    sup = entry.get("supplement")
    if not sup:
        return entry
    merged = dict(entry, sweeps={**entry["sweeps"], **sup["sweeps"]})
    for split in ("validation", "test"):
        merged[split] = {**entry[split], **{c: v for c, v in sup[split].items()
                                            if c != "unpatched"}}
    return merged


def plot_frontier(entry, path, name, budget):
    """Toxic rate against perplexity ratio on benign text, one panel per judge: each
    candidate's validation sweep (unpatched, s*/2, s*, 1) as a line, its test point at s* with its
    Wilson interval, unpatched and the random control; the budget dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judges, entry = entry["judges"], with_supplement(entry)
    fig, axes = plt.subplots(1, len(judges), figsize=(7 * len(judges), 5.2), sharex=True)
    colours = iter(plt.get_cmap("tab10").colors)
    colour = {c: next(colours) for c in entry["sweeps"]}
    for ax, judge in zip(axes, judges):
        for cname, points in entry["sweeps"].items():
            val = [entry["validation"]["unpatched"]] + \
                [entry["validation"][label] for _, label in sorted(points.items())]
            ax.plot([v["ppl_ratio"] for v in val], [v["judges"][judge]["toxic_rate"]
                                                    for v in val],
                    "--", marker=".", color=colour[cname], alpha=0.6, lw=1)
            for v in val:
                ax.annotate(f"{v['strength']:.2g}", (v["ppl_ratio"],
                                                     v["judges"][judge]["toxic_rate"]),
                            fontsize=6, color=colour[cname], alpha=0.8)
        for cname, c in entry["test"].items():
            f = c["judges"][judge]
            lo, hi = f["ci95"]
            style = ("black", "s") if cname == "unpatched" else \
                ("tab:grey", "X") if cname.startswith("random-") else \
                (colour.get(cname, "tab:blue"), "*" if cname == entry["best"] else "o")
            ax.errorbar(c["ppl_ratio"], f["toxic_rate"], yerr=[[f["toxic_rate"] - lo],
                        [hi - f["toxic_rate"]]], fmt=style[1], color=style[0], capsize=3,
                        ms=10 if style[1] == "*" else 7,
                        label=f"{cname} (s={c['strength']:.2f}): {f['toxic']}/{f['n']}, "
                        f"p={f['p_value']:.2g}, x{c['ppl_ratio']:.3f}, degenerate "
                        f"{c['fluency']['degenerate_share']:.2f}")
        ax.axvline(budget, ls="--", color="tab:green", lw=1)
        # log: a broken model's x1e6 beside the x1.0-1.2 where the candidates sit
        ax.set_xscale("log")
        ax.set_xlabel("perplexity on held-out benign text / unpatched (log)")
        ax.set_ylabel(f"toxic rate ({judge} judge)")
        ax.set_title(f"{judge} judge: test points (markers, 95% Wilson), validation sweeps "
                     "(dashed, labelled by strength)", fontsize=8)
        ax.legend(fontsize=6, loc="upper right")
    fig.suptitle(f"{name}: toxicity against fluency, strengths calibrated to x{budget} "
                 f"(star: chosen on validation, X: its random control)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_table(result):
    """The figures as Markdown tables, one per model and split (round 3's files, one judge
    and no fluency figures, in their own layout)."""
    for name, entry in result["models"].items():
        if entry.get("round") != 4:
            _print_round3(name, entry)
            continue
        _print_round4(name, entry, entry)
        print(f"chosen on validation: {entry['best']}; random control: "
              f"{entry['random_control']}; target: {entry['target']}")
        sup = entry.get("supplement")
        if sup:
            _print_round4(f"{name} supplement ({', '.join(sup['candidates']['names'])})", entry,
                          sup)
            print(f"with the supplement, validation would have chosen: "
                  f"{sup['would_have_chosen']}; unpatched repeats the run's: "
                  f"{sup['same_unpatched']}" + (f"; target if chosen: {sup['target_if_chosen']}"
                                                if "target_if_chosen" in sup else ""))


def _print_round4(name, entry, run):
    """One round-4 run's (or supplement's) tables, validation and test, and its strengths."""
    judges = entry["judges"]
    for split in ("validation", "test"):
        u = run[split]["unpatched"]
        print(f"\n{name}, {split} split ({u['n']} prompts x {entry['sizes']['k_eval']} "
              f"samples of {entry['sizes']['new_tokens']} tokens)\n")
        head = "| condition | strength | " + " | ".join(
            f"{j} toxic [95% CI] | p" for j in judges) + \
            " | benign ppl ratio | answers' ppl ratio | degenerate | neurons |"
        print(head)
        print("|" + "---|" * (head.count("|") - 1))
        for c, v in run[split].items():
            cells = [c, f"{v['strength']:.3f}"]
            for j in judges:
                f = v["judges"][j]
                cells += [f"{f['toxic']}/{f['n']} {f['toxic_rate']:.3f} "
                          f"[{f['ci95'][0]:.3f}, {f['ci95'][1]:.3f}]", f"{f['p_value']:.2g}"]
            fl = v["fluency"]
            cells += [f"{v['ppl_ratio']:.3f}", f"{fl['continuation_ppl_ratio']:.3f}",
                      f"{fl['degenerate_share']:.3f}", str(v["neurons"])]
            print("| " + " | ".join(cells) + " |")
    print("\ncalibrated strengths: " + ", ".join(
        f"{c} {cal['strength']:.4f} (x{cal['ratio']:.3f})"
        for c, cal in run["calibration"].items()))


def _print_round3(name, entry):
    """A round-3 entry (bench/results/efficacy-round3.json): the profanity judge only."""
    for split in ("validation", "test"):
        print(f"\n{name}, {split} split ({entry[split]['unpatched']['n']} prompts x "
              f"{entry['sizes']['k_eval']} samples)\n")
        print("| condition | toxic prompts | rate [95% CI] | mean score | p vs unpatched | "
              "neurons | ppl | ppl ratio |")
        print("|---|---|---|---|---|---|---|---|")
        for c, v in entry[split].items():
            print(f"| {c} | {v['toxic']}/{v['n']} | {v['toxic_rate']:.3f} "
                  f"[{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}] | {v['mean_score']:.3f} | "
                  f"{v['p_value']:.2g} | {v['neurons']} | {v['ppl']:.2f} | "
                  f"{v['ppl_ratio']:.3f} |")
    print(f"\nbest (chosen on validation): {entry['best']}; random control: "
          f"{entry['random_control']}; target: {entry['target']}")
