"""What a run leaves behind: results.json (strict JSON), results.md (the tables) and two plots, each
written atomically (safe_files.atomic_write: a random temporary file, fsync, os.replace).

    write_outputs(results, out_dir)      # results.json, results.md, lambda.png, communication.png
    print(results_header(results) + markdown_table(results))   # what the run was on and how it was made; the table

`results` is collect_results' dict (pipeline.run_experiment and the Flower server build it here):
results["methods"][m] = {label, mean, per_client, bytes},
results["per_client"][client] = {potara, lam_potara, lam_grid_val, lam_grid_oracle, abs_lam_diff, grid},
results["faults"], results["communication"]. The plots need the `plot` extra (matplotlib); without it
only the two text files are written.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict

from fed import state_bytes
from lora import lora_factor
from potara_guards.safe_files import atomic_write

METHOD_LABELS = {
    "local": "Local only",
    "fedit": "FedIT (global adapter)",
    "fedit_ft": "FedIT + local fine-tuning",
    "uniform": "Uniform merge (lam = 0.5)",
    "fisher": "Fisher merging",
    "fedsa": "FedSA-LoRA",
    "grid_val": "Grid search on val",
    "grid_oracle": "Grid oracle on test (not a method)",
    "potara_ab": "Potara (A/B space)",
    "potara_delta": "Potara (delta space)",
}
METHODS = tuple(METHOD_LABELS)


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def sent_bytes(history: list[dict]) -> int:
    """Bytes a federated run sent both ways: its rounds' bytes_down + bytes_up."""
    return sum(h["bytes_down"] + h["bytes_up"] for h in history)


def fed_faults(history: list[dict]) -> dict:
    """A federated run's faults: drop-outs, rejected updates and (in a deployment) failed clients."""
    faults = {
        "dropped": sum(len(h.get("dropped", [])) for h in history),
        "rejected": [{"round": h["round"], **r} for h in history for r in h.get("rejected", [])],
    }
    if any("failed" in h for h in history):
        faults["failed"] = [{"round": h["round"], **f} for h in history for f in h.get("failed", [])]
    return faults


def collect_results(
    config: dict,
    cfg,
    clients: list[str],
    acc: dict,
    per_client: dict,
    curve: list[dict],
    init: dict,
    fedit_history: list[dict],
    fedsa_history: list[dict] | None,
    fallbacks: list,
    bad_stats: list,
    timing: dict,
    adapter_extra: dict | None = None,
    faults_extra: dict | None = None,
) -> dict:
    """The results dict written to results.json, for the pipeline and the Flower server alike. cfg is the
    ExperimentConfig; acc[method][client] the test accuracies of the methods that ran; init phi_0. Bytes: a
    method costs what its training sent both ways: local only 0, FedSA-LoRA its own history, every other method
    FedIT's history (merging and Fisher statistics are on-device)."""
    bytes_of = {
        m: 0 if m == "local" else sent_bytes(fedsa_history) if m == "fedsa" else sent_bytes(fedit_history) for m in acc
    }
    A = {k: v for k, v in init.items() if lora_factor(k) == "A"}  # what FedSA-LoRA shares
    return {
        "config": config,
        "experiment": asdict(cfg),
        "seed": cfg.seed,
        "clients": clients,
        "methods": {
            m: {"label": METHOD_LABELS[m], "mean": mean(acc[m].values()), "per_client": acc[m], "bytes": bytes_of[m]}
            for m in acc
        },
        "per_client": per_client,
        "mean_abs_lam_diff": mean(c["abs_lam_diff"] for c in per_client.values()),
        "adapter": {
            "numel": sum(v.numel() for v in init.values()),
            "bytes": state_bytes(init),
            "fedsa_shared_bytes": state_bytes(A),
            **(adapter_extra or {}),
        },
        "communication": curve,
        "fedit_history": fedit_history,
        "fedsa_history": fedsa_history,
        "faults": {
            "drop_prob": cfg.drop_prob,
            "max_update_norm": cfg.max_update_norm,
            "fedit": fed_faults(fedit_history),
            "fedsa": fed_faults(fedsa_history) if fedsa_history is not None else None,
            "fallbacks": fallbacks,
            "statistics": bad_stats,
            **(faults_extra or {}),
        },
        "timing_s": timing,
    }


def fault_summary(results: dict) -> str | None:
    """One line: drop-outs, rejected updates, diverged trainings, non-finite statistics, and in a deployment the
    clients that failed a round or are missing from the results (None if none and neither drop_prob nor
    max_update_norm was set)."""
    f = results.get("faults")
    if not f:
        return None
    parts = [
        f"{label}: {f[m]['dropped']} client-rounds dropped, {len(f[m]['rejected'])} updates rejected"
        for m, label in (("fedit", "FedIT"), ("fedsa", "FedSA-LoRA"))
        if f[m] is not None
    ]
    if f["fallbacks"]:
        parts.append(
            f"{len(f['fallbacks'])} diverged trainings kept their start adapter "
            f"({', '.join(sorted({x['client'] for x in f['fallbacks']}))})"
        )
    if f["statistics"]:
        parts.append(f"non-finite statistics for {', '.join(sorted({x['client'] for x in f['statistics']}))}")
    failed = f["fedit"].get("failed") if f["fedit"] else None  # a deployment's clients that failed a round
    if failed:
        parts.append(f"{len(failed)} client-rounds failed ({', '.join(sorted({x['client'] for x in failed}))})")
    missing = f.get("personalization_failed")  # a deployment's clients without final results
    if missing:
        parts.append("MISSING from the results: " + ", ".join(f"{x['client']} ({x['reason']})" for x in missing))
    happened = any(f[m] and (f[m]["dropped"] or f[m]["rejected"]) for m in ("fedit", "fedsa"))
    if not (
        happened
        or failed
        or missing
        or f["fallbacks"]
        or f["statistics"]
        or f["drop_prob"]
        or f["max_update_norm"] is not None
    ):
        return None
    return "faults: " + "; ".join(parts) + ' (details: "faults" and the histories in results.json)'


def potara_how(info: dict) -> str:
    """One cell: the paper's a, b, c where that estimator ran; else the default's candidate, its Hermite lam and the
    barrier its verification pass saw (the val loss there above the chord between the ends)."""
    fmt = lambda v: f"{mean(v.values()):.4g} (mean of {len(v)} modules)" if isinstance(v, dict) else f"{v:.4g}"
    if "a" in info:
        return f"a {fmt(info['a'])}, b {fmt(info['b'])}, c {fmt(info['c'])}"
    lam_h = "n/a" if info.get("lam_hermite") is None else f"{info['lam_hermite']:.2f}"
    return f"{info['candidate']} (Hermite lam {lam_h}, barrier seen {info['barrier']:.3g})"


def markdown_table(results: dict) -> str:
    """The methods (mean and per-client test accuracy, MB sent) and Potara's weights against the grid's."""
    names = results["clients"]
    lines = ["| method | mean acc | " + " | ".join(names) + " | MB sent |", "|---|---|" + "---|" * len(names) + "---|"]
    for m, r in results["methods"].items():
        cells = " | ".join(f"{r['per_client'][n]:.3f}" for n in names)
        lines.append(f"| {r['label']} | {r['mean']:.3f} | {cells} | {r['bytes'] / 1e6:.2f} |")
    lines += [
        "",
        "| client | lam Potara | how Potara chose it | val-loss barrier (grid) | lam grid (val) | abs diff | "
        "lam grid (test oracle) |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in names:
        c = results["per_client"][n]
        barrier = f"{c['barrier']:.3g}" if c.get("barrier") is not None else "n/a"
        lines.append(
            f"| {n} | {c['lam_potara']:.3f} | {potara_how(c['potara'])} | {barrier} | "
            f"{c['lam_grid_val']:.2f} | {c['abs_lam_diff']:.3f} | {c['lam_grid_oracle']:.2f} |"
        )
    lines.append(f"\nmean |lam_potara - lam_grid(val)| = {results['mean_abs_lam_diff']:.3f}")
    faults = fault_summary(results)
    return "\n".join(lines + ([faults] if faults else []))


def results_header(results: dict) -> str:
    """results.md's first lines, so that a copied file still says what it is: results["config"]["data_source"]
    (what the clients' data was: synthetic or real, which set or tasks) and ["command"] (the command line that
    made it), each a paragraph; "" when the config has neither (e.g. the Flower server's)."""
    config = results.get("config") or {}
    lines = ([f"Data: {config['data_source']}"] if config.get("data_source") else []) + (
        [f"Command: `{config['command']}`"] if config.get("command") else []
    )
    return "".join(line + "\n\n" for line in lines)


def strict_json(x):
    """NaN/Inf -> None, recursively: json.dumps would write NaN, which is not JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [strict_json(v) for v in x]
    return x


def write_text(path: str, text: str) -> None:
    """`text` as UTF-8, written atomically (safe_files.atomic_write)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def write_outputs(results: dict, out_dir: str, table: str | None = None) -> None:
    """results.json (strict JSON: NaN/Inf as null), results.md (results_header, then `table`, default
    markdown_table(results)) and the two plots when matplotlib is installed, each written atomically."""
    write_text(
        os.path.join(out_dir, "results.json"), json.dumps(strict_json(results), indent=1, default=str, allow_nan=False)
    )
    write_text(os.path.join(out_dir, "results.md"), results_header(results) + (table or markdown_table(results)) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    for name, draw in (("lambda.png", plot_lambda), ("communication.png", plot_communication)):
        fig = draw(plt, results)
        atomic_write(os.path.join(out_dir, name), lambda f: fig.savefig(f, format="png", dpi=110))
        plt.close(fig)


def plot_lambda(plt, results: dict):
    """Per client: accuracy along the merge segment (test, val) and the val loss (right axis) with Potara's lam
    (red) and the grid's (green)."""
    names = results["clients"]
    cols = min(len(names), 5)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.8 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        c = results["per_client"][n]
        ax.plot(c["grid"]["lam"], c["grid"]["test"], label="test acc")
        ax.plot(c["grid"]["lam"], c["grid"]["val"], ls=":", label="val acc")
        ax.axvline(c["lam_potara"], color="r", label="Potara lam")
        ax.axvline(c["lam_grid_val"], color="g", ls="--", label="grid (val) lam")
        ax.set(title=n, xlabel="lam (weight of the federated adapter)", ylabel="accuracy")
        if c["grid"].get("val_loss"):
            loss_ax = ax.twinx()
            loss_ax.plot(c["grid"]["lam"], c["grid"]["val_loss"], color="0.4", ls="-.", label="val loss")
            loss_ax.tick_params(labelsize=7)
            loss_ax.set_ylabel("val loss (-mean log p)", fontsize=7)
            if n == names[0]:
                loss_ax.legend(fontsize=7, loc="lower right")
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_communication(plt, results: dict):
    """Mean test accuracy of FedIT and of Potara after each snapshot, against the bytes sent so far."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = [p for p in results["communication"] if p["fedit"] is not None]
    mb = [p["bytes"] / 1e6 for p in pts]
    ax.plot(mb, [p["fedit"] for p in pts], "o-", label="FedIT (global adapter)")
    ax.plot(mb, [p["potara"] for p in pts], "s-", label="Potara after FedIT")
    ax.axhline(results["communication"][0]["local"], color="gray", ls="--", label="Local only (0 MB)")
    ax.set(xlabel="MB communicated (both ways)", ylabel="mean test accuracy")
    ax.legend()
    fig.tight_layout()
    return fig
