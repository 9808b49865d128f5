"""The verdicts, tables and figures of the paper-claims study, from its claims.json alone (no torch: `python -m
potara_studies.claims --replot` redraws them from the file).

    text = write(results, out_dir, figures_dir=None)   # claims.md and claim1-3.png in out_dir (and figures_dir)
    v = verdicts(results)                               # {"1": line, "2": line, "3": line}

Claim 1, per estimator and regime (suite x scenario of the estimator study): accuracy / accuracy of the grid search
on val, and / the test oracle; "comparable" in a regime when the first ratio is >= COMPARABLE (0.98, the study's
own goal). Claim 2, per pipeline and round count r, over the seeds: the gain over local, g_L(r) = Potara(r) - local,
and over the better end, g_B(r) = Potara(r) - max(local, FedIT(r)), mean and standard deviation over seeds. The gain
GROWS when, seed by seed, d = g(r_max) - g(r_min) has a mean above twice its standard error (SHRINKS below minus
twice; else FLAT, within the seeds' noise; one seed: no error, the sign alone, said so). Claim 3, per pipeline: a
target T = f x the best mean accuracy any of Potara, FedIT + fine-tuning, FedSA-LoRA reached at any round count
(f in TARGET_FRACTIONS); for each method the first round count whose mean accuracy reaches T and the MB sent by then.
"""

from __future__ import annotations

import math
import os

from potara_guards.safe_files import atomic_write
from potara_harness.report import write_text
from potara_studies.claims_config import (
    CLAIM1_FOLDERS,
    COMPARABLE,
    METHOD_LABELS,
    OUTPUT_FILES,
    PIPELINES,
    TARGET_FRACTIONS,
)

CLAIM1_ROWS = {  # estimator@source of the estimator study -> what the page calls it
    "verified@val": "default (verified, held-out val)",
    "paper@train32": "paper's estimator, paper's setting (32 train samples)",
    "paper@val": "paper's estimator on held-out val",
}
RACE = ("potara", "fedit_ft", "fedsa")  # claim 3's methods


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def std(xs) -> float:
    """Sample standard deviation (0 for one value)."""
    xs = list(xs)
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------- claim 1
def claim1_cells(results: dict) -> list[dict]:
    """One row per regime: the grid's accuracies and, per estimator of CLAIM1_ROWS, its accuracy and ratios."""
    rows = []
    for suite, part in results.get("claim1", {}).items():
        for scen, row in part["summary"].items():
            cells = {"suite": suite, "scenario": scen, "grid_val": row["grid_val"]["acc"]}
            cells.update(grid_oracle=row["grid_oracle"]["acc"], local=row["local"]["acc"], fedit=row["fedit"]["acc"])
            for m in CLAIM1_ROWS:
                if m in row:
                    acc = row[m]["acc"]
                    oracle = acc / cells["grid_oracle"] if cells["grid_oracle"] > 0 else float("nan")
                    cells[m] = {"acc": acc, "ratio": row[m]["ratio"], "oracle_ratio": oracle, "lam": row[m]["lam"]}
            rows.append(cells)
    return rows


def claim1_verdict(rows: list[dict], m: str) -> str:
    """holds / holds in these regimes only / does not hold here, for estimator m, with the worst ratio."""
    have = [r for r in rows if m in r]
    if not have:
        return "not run"
    ok = [r for r in have if r[m]["ratio"] >= COMPARABLE]
    worst = min(have, key=lambda r: r[m]["ratio"])
    where = f"worst {worst[m]['ratio']:.3f} x the grid ({worst['suite']} {worst['scenario']})"
    if len(ok) == len(have):
        return f"holds in all {len(have)} regimes ({where})"
    if ok:
        return (
            f"holds in {len(ok)} of {len(have)} regimes only: "
            + ", ".join(f"{r['suite']} {r['scenario']}" for r in ok)
            + f" ({where})"
        )
    return f"does not hold here: below {COMPARABLE} x the grid in all {len(have)} regimes ({where})"


# ----------------------------------------------------------------------------- claim 2
def seed_means(entry: dict, r: str, method: str) -> list[float]:
    return [s["rounds"][r]["mean"][method] for s in entry["seeds"].values()]


def gains(entry: dict, method: str = "potara") -> dict:
    """Per round count: g_L and g_B of every seed (module docstring)."""
    out = {}
    for r in map(str, entry["rounds"]):
        local, fedit, pot = (seed_means(entry, r, m) for m in ("local", "fedit", method))
        out[r] = {
            "vs_local": [p - lo for p, lo in zip(pot, local)],
            "vs_best": [p - max(lo, f) for p, lo, f in zip(pot, local, fedit)],
        }
    return out


def trend(g: dict, key: str) -> dict:
    """d = g(r_max) - g(r_min) per seed: its mean, standard error, and GROWS / SHRINKS / FLAT (module docstring)."""
    rs = sorted(g, key=int)
    d = [b - a for a, b in zip(g[rs[0]][key], g[rs[-1]][key])]
    se = std(d) / math.sqrt(len(d)) if len(d) > 1 else None
    if se is None:
        word = "grows" if d[0] > 1e-9 else "shrinks" if d[0] < -1e-9 else "flat"  # float rounding is no change
        word += " (one seed: no noise estimate)"
    else:
        word = "GROWS" if mean(d) > 2 * se else "SHRINKS" if mean(d) < -2 * se else "FLAT (within noise)"
    return {"d": d, "mean": mean(d), "se": se, "word": word, "first": rs[0], "last": rs[-1]}


def claim2_verdict(results: dict) -> str:
    """Per pipeline: the trend of both gains for the default, and of the gain over local for the paper's estimator."""
    parts = []
    for name, entry in results.get("sweeps", {}).items():
        if not entry.get("seeds"):
            continue
        g, gp = gains(entry), gains(entry, "potara_paper")
        tl, tb, tp = trend(g, "vs_local"), trend(g, "vs_best"), trend(gp, "vs_local")
        at = lambda t, gg, key: f"{mean(gg[t['first']][key]):+.3f} -> {mean(gg[t['last']][key]):+.3f}"
        parts.append(
            f"{name} ({tl['first']} -> {tl['last']} rounds): default's gain over local {tl['word']} "
            f"({at(tl, g, 'vs_local')}), over max(local, FedIT) {tb['word']} ({at(tb, g, 'vs_best')}); "
            f"paper's estimator's gain over local {tp['word']} ({at(tp, gp, 'vs_local')})"
        )
    return "; ".join(parts) or "not run"


# ----------------------------------------------------------------------------- claim 3
def targets(entry: dict) -> list[dict]:
    """Per target fraction: T, and per method (and local) the first round count reaching it and its MB."""
    rs = [str(r) for r in entry["rounds"]]
    curve = {m: [mean(seed_means(entry, r, m)) for r in rs] for m in RACE + ("local",)}
    first = next(iter(entry["seeds"].values()))["rounds"]
    best = max(max(curve[m]) for m in RACE)
    out = []
    for f in TARGET_FRACTIONS:
        t = f * best
        row = {"fraction": f, "target": t, "methods": {}}
        for m in RACE:
            hit = next((r for r, a in zip(rs, curve[m]) if a >= t - 1e-12), None)
            row["methods"][m] = {"rounds": hit, "mb": first[hit]["bytes"][m] / 1e6 if hit else None}
        row["local_reaches"] = curve["local"][0] >= t - 1e-12
        out.append(row)
    return out


def claim3_verdict(results: dict) -> str:
    """Per pipeline and target: Potara's MB against both baselines' (strictly fewer, as many, more)."""
    parts = []
    for name, entry in results.get("sweeps", {}).items():
        if not entry.get("seeds"):
            continue
        words = []
        for row in targets(entry):
            mb = {m: row["methods"][m]["mb"] for m in RACE}
            cost = {m: v if v is not None else math.inf for m, v in mb.items()}
            if cost["potara"] == math.inf:
                word = "Potara does not reach it"
            elif cost["potara"] < min(cost["fedit_ft"], cost["fedsa"]):
                word = "Potara first"
            elif cost["potara"] <= min(cost["fedit_ft"], cost["fedsa"]):
                word = "Potara ties the first"
            else:
                word = f"{METHOD_LABELS[min(RACE, key=lambda m: cost[m])]} first"
            local = ", local only reaches it too (0 MB)" if row["local_reaches"] else ""
            words.append(f"{row['fraction']:.0%} of best ({row['target']:.3f}): {word}{local}")
        parts.append(f"{name}: " + "; ".join(words))
    return "; ".join(parts) or "not run"


def verdicts(results: dict) -> dict:
    rows = claim1_cells(results)
    return {
        "1": "paper's estimator (paper's setting): "
        + claim1_verdict(rows, "paper@train32")
        + "; default: "
        + claim1_verdict(rows, "verified@val"),
        "2": claim2_verdict(results),
        "3": claim3_verdict(results),
    }


# ----------------------------------------------------------------------------- tables
def pm(xs: list[float]) -> str:
    """mean +- standard deviation over seeds (the mean alone for one seed)."""
    return f"{mean(xs):+.3f}" + (f" ± {std(xs):.3f}" if len(xs) > 1 else "")


def claim1_table(rows: list[dict]) -> list[str]:
    head = ["suite", "scenario", "local", "FedIT", "grid (val)", "grid oracle (test)"] + list(CLAIM1_ROWS)
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in rows:
        cells = [r["suite"], r["scenario"]] + [f"{r[k]:.3f}" for k in ("local", "fedit", "grid_val", "grid_oracle")]
        for m in CLAIM1_ROWS:
            c = r.get(m)
            cells.append(f"{c['acc']:.3f} ({c['ratio']:.3f}; {c['oracle_ratio']:.3f})" if c else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def claim2_table(entry: dict) -> list[str]:
    g, gp = gains(entry), gains(entry, "potara_paper")
    first = next(iter(entry["seeds"].values()))["rounds"]
    head = ["FedIT rounds", "MB sent", "local", "FedIT", "Potara", "Potara - local", "Potara - max(local, FedIT)"]
    head += ["paper's est. - local", "paper's est. - max(local, FedIT)"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in map(str, entry["rounds"]):
        accs = [f"{mean(seed_means(entry, r, m)):.3f}" for m in ("local", "fedit", "potara")]
        gain = [pm(g[r]["vs_local"]), pm(g[r]["vs_best"]), pm(gp[r]["vs_local"]), pm(gp[r]["vs_best"])]
        lines.append("| " + " | ".join([r, f"{first[r]['bytes']['fedit'] / 1e6:.2f}", *accs, *gain]) + " |")
    return lines


def claim3_table(entry: dict) -> list[str]:
    first = next(iter(entry["seeds"].values()))["rounds"]
    head = ["FedIT rounds", "MB: Potara, FedIT + FT", "MB: FedSA-LoRA"] + [METHOD_LABELS[m] for m in RACE]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for r in map(str, entry["rounds"]):
        mb = [f"{first[r]['bytes'][m] / 1e6:.2f}" for m in ("potara", "fedsa")]
        lines.append("| " + " | ".join([r, *mb, *(f"{mean(seed_means(entry, r, m)):.3f}" for m in RACE)]) + " |")
    lines += ["", "| target | " + " | ".join(METHOD_LABELS[m] for m in RACE) + " | Local only (0 MB) |"]
    lines.append("|---" * (len(RACE) + 2) + "|")
    for row in targets(entry):
        cells = [
            f"{c['rounds']} rounds, {c['mb']:.2f} MB" if c["rounds"] else "not reached"
            for c in (row["methods"][m] for m in RACE)
        ]
        local = "reaches it" if row["local_reaches"] else "below"
        lines.append(f"| {row['fraction']:.0%} of best = {row['target']:.3f} | " + " | ".join(cells) + f" | {local} |")
    return lines


def markdown(results: dict) -> str:
    """claims.md: the command, the three verdicts, claim 1's table, and per pipeline its claim 2 and 3 tables."""
    v, rows = verdicts(results), claim1_cells(results)
    lines = ["# The paper's claims, tested here", "", f"Command: `{results['settings']['command']}`", ""]
    lines += [f"- **Claim {k}**: {v[k]}" for k in ("1", "2", "3")]
    if rows:
        folders = ", ".join(CLAIM1_FOLDERS[s] + "/" for s in results["claim1"])
        lines += ["", "## Claim 1: the closed-form weight against the grid search", ""]
        lines += [
            f"Mean test accuracy over clients and seeds (ratio to the grid search on val; ratio to the test "
            f"oracle). The estimator study's own outputs: {folders}",
            "",
        ]
        lines += claim1_table(rows)
    for name, entry in results.get("sweeps", {}).items():
        if entry.get("seeds"):
            lines += ["", f"## {name}: {entry['info']['data']}; seeds {', '.join(entry['seeds'])}", ""]
            lines += ["Claim 2 (gains: mean ± standard deviation over seeds):", ""] + claim2_table(entry)
            lines += ["", "Claim 3 (mean accuracy over seeds; targets):", ""] + claim3_table(entry)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- figures
def log_axis(axis, set_scale, ticks=None) -> None:
    """A log-scale axis labelled in plain numbers (at `ticks` when given), no minor labels."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    set_scale("log")
    if ticks is not None:
        axis.set_ticks(ticks)
    axis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    axis.set_minor_formatter(NullFormatter())


def legend_below(fig, axes):
    """One legend for all panels, under them (the first panel's lines: every panel draws the same ones)."""
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig


def plot_claim1(plt, rows: list[dict]):
    """Per regime, each estimator's accuracy as a fraction of the grid search's on val (the 0.98 line: comparable)."""
    fig, ax = plt.subplots(figsize=(7.5, 3.6))
    names = [f"{r['suite']}\n{r['scenario']}" for r in rows]
    for k, (m, label) in enumerate(CLAIM1_ROWS.items()):
        ys = [r[m]["ratio"] if m in r else math.nan for r in rows]
        ax.plot([i + 0.15 * (k - 1) for i in range(len(rows))], ys, "os^"[k], label=label, ls="none")
    ax.axhline(1.0, color="0.5", lw=0.8)
    ax.axhline(COMPARABLE, color="r", ls="--", lw=0.8, label=f"{COMPARABLE} x grid")
    ax.set_xticks(range(len(rows)), names, fontsize=7)
    ax.set(ylabel="accuracy / grid search (val)", title="Claim 1: closed-form weight vs grid search")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_claim2(plt, sweeps: dict):
    """Per pipeline: Potara's gain over local and over max(local, FedIT) against the FedIT rounds (log scale);
    bars: standard deviation over seeds."""
    names = [n for n in PIPELINES if sweeps.get(n, {}).get("seeds")]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.7), squeeze=False)
    for ax, name in zip(axes.flat, names):
        entry, rs = sweeps[name], [int(r) for r in sweeps[name]["rounds"]]
        for method, style in (("potara", "-"), ("potara_paper", ":")):
            g = gains(entry, method)
            for key, marker, label in (("vs_local", "o", "- local"), ("vs_best", "s", "- max(local, FedIT)")):
                ys, es = [mean(g[str(r)][key]) for r in rs], [std(g[str(r)][key]) for r in rs]
                who = "Potara" if method == "potara" else "paper's est."
                ax.errorbar(rs, ys, yerr=es, fmt=marker + style, ms=4, capsize=2, label=f"{who} {label}")
        ax.axhline(0, color="0.5", lw=0.8)
        log_axis(ax.xaxis, ax.set_xscale, rs)
        ax.set(title=name, xlabel="FedIT rounds", ylabel="accuracy gain (mean, std over seeds)")
    return legend_below(fig, axes)


def plot_claim3(plt, sweeps: dict):
    """Per pipeline: mean accuracy against MB sent (log scale) for Potara, FedIT + fine-tuning, FedSA-LoRA and
    FedIT; local only as a line (0 MB); the targets grey, dash-dotted."""
    names = [n for n in PIPELINES if sweeps.get(n, {}).get("seeds")]
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 3.7), squeeze=False)
    for ax, name in zip(axes.flat, names):
        entry = sweeps[name]
        rs, first = [str(r) for r in entry["rounds"]], next(iter(entry["seeds"].values()))["rounds"]
        for m, fmt in (("potara", "o-"), ("fedit_ft", "s-"), ("fedsa", "^-"), ("fedit", "x:")):
            xs = [first[r]["bytes"][m] / 1e6 for r in rs]
            ax.plot(xs, [mean(seed_means(entry, r, m)) for r in rs], fmt, ms=4, label=METHOD_LABELS[m])
        ax.axhline(mean(seed_means(entry, rs[0], "local")), color="0.4", ls="--", label="Local only (0 MB)")
        for row in targets(entry):
            ax.axhline(row["target"], color="0.6", ls="-.", lw=0.7)
        log_axis(ax.xaxis, ax.set_xscale)
        ax.set(title=name, xlabel="MB sent (both ways)", ylabel="mean test accuracy")
    return legend_below(fig, axes)


def write(results: dict, out: str, figures: str | None = None) -> str:
    """claims.md, and the figures of the claims that ran when matplotlib is installed, in `out` (and each figure
    also in `figures`), every file written atomically. Returns the markdown."""
    text = markdown(results)
    write_text(os.path.join(out, OUTPUT_FILES[1]), text)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return text
    rows, sweeps = claim1_cells(results), {n: e for n, e in results.get("sweeps", {}).items() if e.get("seeds")}
    figs = [(OUTPUT_FILES[2], plot_claim1, rows)] if rows else []
    figs += [(OUTPUT_FILES[3], plot_claim2, sweeps), (OUTPUT_FILES[4], plot_claim3, sweeps)] if sweeps else []
    for name, draw, data in figs:
        fig = draw(plt, data)
        for folder in [out] + ([figures] if figures else []):
            atomic_write(os.path.join(folder, name), lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)
    return text
