"""Does the closed-form weight track the grid search? Every estimator x statistics source, scenario by scenario.

    python ablation.py                                   # the suite: 5 scenarios x 3 seeds (10 min on 2 cores)
    python ablation.py --scenarios conflict --seeds 0    # one scenario, one seed
    python ablation.py --estimators paper,hermite --sources train32,val --scenarios all

Offline: the synthetic CIFAR-100 stand-in (data.py) and the tiny ViT preset (vit.py) (the backbone is pre-trained once on
the public images and cached under --data-dir; FedIT runs --rounds rounds, half the preset's, to fit the
time: 600 s measured on 2 shared cores, plus ~3 min once for the backbone). Per scenario and seed: one
partition into clients (train / val / test each), one FedIT adapter and one local adapter per client,
trained once and cached under --out/cache (delete it to retrain), the local one exactly as the
pipeline trains it (pipeline.train_local, seeded by pipeline.local_seed); then, per client and on the SAME two
adapters, the lam grid on val and test (the grid search picks the best val accuracy, ties -> lam nearest
0.5, pipeline.grid_choice), and for every estimator x source the closed-form lam and the test accuracy of the
A/B-space merge at that lam. The estimators are cheap; training is not.
Scenarios (SCENARIOS): Dirichlet label skew at two alphas (a third, 10, with --scenarios all); few-shot
clients (50 training images, mild skew: the federated adapter is the better one); class-subset tasks
(each client owns 4 superclasses); conflicting tasks (the same 20 classes for every client, each labelling
them with its own permutation: what FedIT learns fits no client).
Sources (SOURCES): client split, sample count, Fisher labels ("sampled": the true Fisher).
Output: --out/ablation.json (every figure, per client) and ablation.md (the table), rewritten after every
scenario x seed, so an interrupted suite keeps what it finished. Per scenario, over clients and seeds:
mean test accuracy, its ratio to the grid search's, mean |lam - lam_grid|; local / FedIT / uniform /
grid (val) / grid (test oracle) for reference. The goal (issue 7): acc >= 0.98 x grid and >= the better
of local and FedIT in every scenario.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import time

import cli  # first: sets OMP_WAIT_POLICY before torch starts its threads
import numpy as np
import torch
from tqdm.auto import tqdm

from data import DataError, class_split_partition, client_splits, dirichlet_partition, load_images, public_and_pool
from fed import Client, run_fedit
from lora import lora_state_dict
from evaluation import grid_choice, lam_grid, score_adapter
from pipeline import ExperimentConfig, local_seed, train_local
from potara import ESTIMATORS, gradient_stats, merge_adapters, weight_from_stats
from report import atomic_write, write_text
from vit import PRESETS, build_model, tiny_backbone

SCENARIOS = {  # name -> how clients get their data ("train": a smaller training split than --train)
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1},
    "dirichlet-1.0": {"partition": "dirichlet", "alpha": 1.0},
    "dirichlet-10": {"partition": "dirichlet", "alpha": 10.0},
    "fewshot": {"partition": "dirichlet", "alpha": 10.0, "train": 50},
    "superclass": {"partition": "superclass"},
    "conflict": {"partition": "conflict", "classes": 20},
}
SOURCES = {  # name -> (client split, samples (None: the whole split), Fisher labels: the data's or model-sampled)
    "train32": ("train", 32, "empirical"),
    "val32": ("val", 32, "empirical"),
    "val": ("val", None, "empirical"),
    "train32-sampled": ("train", 32, "sampled"),
    "val-sampled": ("val", None, "sampled"),
}
DEFAULTS = dict(scenarios="dirichlet-0.1,dirichlet-1.0,fewshot,superclass,conflict", seeds="0,1,2",
                sources="train32,val32,val", rounds=50)
REFERENCE = ("local", "fedit", "uniform", "grid_val", "grid_oracle")


def conflict_partition(labels: np.ndarray, num_clients: int, samples_per_client: int, classes: int, seed: int):
    """Every client samples uniformly from the same `classes` classes (disjoint samples) and relabels
    them with its own random permutation. Returns (parts, relabel): relabel[k][y] is client k's label."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(np.unique(labels), classes, replace=False))
    pool = rng.permutation(np.flatnonzero(np.isin(labels, chosen)))
    if num_clients * samples_per_client > len(pool):
        raise DataError(f"{num_clients} clients x {samples_per_client} samples > the {len(pool)} images of "
                        f"{classes} classes")
    parts = [np.sort(pool[k * samples_per_client:(k + 1) * samples_per_client]) for k in range(num_clients)]
    relabel = []
    for _ in range(num_clients):
        table = np.arange(int(labels.max()) + 1)
        table[chosen] = chosen[rng.permutation(classes)]
        relabel.append(table)
    return parts, relabel


def make_splits(spec: dict, data, pool: np.ndarray, args, seed: int):
    """The scenario's clients (data.ClientSplits), each with its train / val / test split."""
    sizes = (min(spec.get("train", args.train), args.train), args.val, args.test)
    labels, relabel = data.labels[pool], None
    if spec["partition"] == "dirichlet":
        parts = dirichlet_partition(labels, args.clients, spec["alpha"], sum(sizes), seed)
    elif spec["partition"] == "superclass":
        parts = class_split_partition(labels, data.coarse_labels[pool], args.clients, sum(sizes), seed)
    else:
        parts, relabel = conflict_partition(labels, args.clients, sum(sizes), spec["classes"], seed)
    return client_splits(data.images, data.labels, pool, parts, sizes, seed, relabel)


def fresh_model(backbone, p: dict, args, seed: int) -> torch.nn.Module:
    """The pipeline's model (vit.build_model) on a copy of the cached backbone, phi_0 drawn from `seed`."""
    return build_model(copy.deepcopy(backbone), p, args.rank, args.lora_alpha, seed)


def training_config(args, seed: int) -> ExperimentConfig:
    return ExperimentConfig(rounds=args.rounds, local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
                            local_train_steps=args.local_train_steps, seed=seed)


def train_adapters(model, splits, args, seed: int, cache: str) -> tuple[dict, dict]:
    """FedIT's global adapter and one local adapter per client, both from phi_0, trained as the pipeline trains
    them (same seeds: the same adapters as run_cifar.py for the same clients); read from `cache` when there."""
    if os.path.exists(cache):
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return saved["global"], saved["local"]
    init, cfg = lora_state_dict(model), training_config(args, seed)
    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in splits]
    fedit = run_fedit(model, clients, cfg.rounds, cfg.local_steps, len(clients), cfg.lr, seed, cfg.batch_size,
                      progress=False)
    local = {s.name: train_local(model, init, s, cfg.local_train_steps, local_seed(seed, i), cfg)
             for i, s in enumerate(splits)}
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_write(cache, lambda f: torch.save({"global": fedit.global_state, "local": local}, f))
    return fedit.global_state, local


def evaluate_client(model, init: dict, G: dict, L: dict, s, args, seed: int) -> dict:
    """Local, FedIT, uniform, the grid (val choice and test oracle), and every estimator x source."""
    test_at: dict[float, float] = {}
    score = lambda state, x, y: score_adapter(model, state, init, x, y)

    def test_acc(lam: float) -> float:  # memoised: estimators often land on the same lam (0, 1, ...)
        key = round(float(lam), 12)
        if key not in test_at:
            test_at[key] = score(merge_adapters(G, L, key), s.test_inputs, s.test_targets)
        return test_at[key]

    grid = lam_grid(args.grid_step)
    val = [score(merge_adapters(G, L, lam), s.val_inputs, s.val_targets) for lam in grid]
    j = grid_choice(grid, val)
    test = [test_acc(lam) for lam in grid]
    out = {"local": test[0], "fedit": test[-1], "uniform": test_acc(0.5), "grid_val": test[j], "lam_grid": grid[j],
           "grid_oracle": max(test), "grid": {"lam": grid, "val": val, "test": test}, "estimators": {}}
    for src in args.sources:
        split, n, labels = SOURCES[src]
        x, y = (s.train_inputs, s.train_targets) if split == "train" else (s.val_inputs, s.val_targets)
        n = len(y) if n is None else min(n, len(y))
        stats = gradient_stats(model, G, L, [(x[:n], y[:n])], n_samples=n, labels=labels, seed=seed)
        for est in args.estimators:
            lam, _ = weight_from_stats(stats, est, eps=args.eps)
            out["estimators"][f"{est}@{src}"] = {"lam": lam, "acc": test_acc(lam), "abs_lam_diff": abs(lam - grid[j]),
                                                 "n_samples": n}
    return out


def summarize(runs: dict) -> dict:
    """Per scenario, over clients and seeds: mean accuracy of every method, its ratio to the grid search
    on val (ratio of the means), the mean |lam - lam_grid| and the mean lam."""
    summary = {}
    for scen, by_seed in runs.items():
        clients = [c for seed in by_seed.values() for c in seed.values()]
        mean = lambda f: float(np.mean([f(c) for c in clients]))
        grid = mean(lambda c: c["grid_val"])
        row = {m: {"acc": mean(lambda c: c[m])} for m in REFERENCE}
        for m in clients[0]["estimators"]:
            acc = mean(lambda c: c["estimators"][m]["acc"])
            row[m] = {"acc": acc, "ratio": acc / grid if grid > 0 else 1.0 if acc == 0 else float("inf"),
                      "abs_lam_diff": mean(lambda c: c["estimators"][m]["abs_lam_diff"]),
                      "lam": mean(lambda c: c["estimators"][m]["lam"])}
        row["lam_grid"], row["clients_x_seeds"] = mean(lambda c: c["lam_grid"]), len(clients)
        summary[scen] = row
    return summary


def goal_met(row: dict, method: str) -> bool:
    """Issue 7's goal in one scenario: >= 0.98 x the grid search on val, and >= the better of local and FedIT."""
    return row[method]["ratio"] >= 0.98 and row[method]["acc"] >= max(row["local"]["acc"], row["fedit"]["acc"])


def markdown(summary: dict) -> str:
    scens = list(summary)
    lines = ["Mean test accuracy over clients and seeds; for estimators: accuracy (ratio to the grid search on "
             "val; mean abs(lam - lam_grid)). Rows: estimator@source, best worst-case ratio first.", "",
             "| method | " + " | ".join(scens) + " | worst ratio | goal met |", "|---|" + "---|" * (len(scens) + 2)]
    for m in REFERENCE:
        lines.append(f"| {m} | " + " | ".join(f"{summary[s][m]['acc']:.3f}" for s in scens) + " | | |")
    estimators = [m for m in summary[scens[0]] if "@" in m]
    worst = {m: min(summary[s][m]["ratio"] for s in scens) for m in estimators}
    for m in sorted(estimators, key=lambda m: -worst[m]):
        cells = [f"{summary[s][m]['acc']:.3f} ({summary[s][m]['ratio']:.3f}; {summary[s][m]['abs_lam_diff']:.2f})"
                 for s in scens]
        met = "yes" if all(goal_met(summary[s], m) for s in scens) else "no: " + ", ".join(
            s for s in scens if not goal_met(summary[s], m))
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {worst[m]:.3f} | {met} |")
    lines += ["", "Goal: acc >= 0.98 x grid (val) and >= max(local, fedit) in every scenario. Mean lam_grid (val): "
              + ", ".join(f"{s} {summary[s]['lam_grid']:.2f}" for s in scens) + "; clients x seeds: "
              + ", ".join(f"{s} {summary[s]['clients_x_seeds']}" for s in scens) + "."]
    return "\n".join(lines)


def write(results: dict, out: str) -> None:
    write_text(os.path.join(out, "ablation.json"), json.dumps(results, indent=1))
    write_text(os.path.join(out, "ablation.md"), "SYNTHETIC DATA (not CIFAR-100)\n\n" + markdown(results["summary"]) + "\n")


FLOATS = ("lr", "lora_alpha", "eps", "grid_step")
SHARED = ("clients", "train", "val", "test", "public", "pretrain_steps", "synthetic_per_class", "local_steps",
          "local_train_steps", "batch_size", "rank", "lr", "lora_alpha", "eps", "grid_step")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Options left at None take the tiny preset's value (vit.PRESETS['tiny']).")
    a = ap.add_argument
    a("--scenarios", default=DEFAULTS["scenarios"], help=f"comma-separated from {list(SCENARIOS)}, or 'all'")
    a("--seeds", default=DEFAULTS["seeds"], help="comma-separated integer seeds (partition, phi_0, training)")
    a("--estimators", default=",".join(ESTIMATORS), help=f"comma-separated from {list(ESTIMATORS)}")
    a("--sources", default=DEFAULTS["sources"], help=f"comma-separated statistics sources from {list(SOURCES)}")
    a("--out", default=os.path.join("runs", "ablation"), help="output folder (ablation.json, ablation.md, cache/)")
    a("--data-dir", default="data", help="where synthetic/ and the cached tiny backbone live")
    a("--rounds", type=int, default=DEFAULTS["rounds"], help="FedIT rounds")
    a("--conflict-classes", type=int, default=SCENARIOS["conflict"]["classes"], help="classes of 'conflict'")
    for k in SHARED:
        a(f"--{k.replace('_', '-')}", type=float if k in FLOATS else int, help="as in run_cifar.py")
    cli.add_run_options(ap)
    return ap


def resolve(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the tiny preset, and reject every impossible value with a one-line error."""
    args = ap.parse_args(argv)

    def names(flag: str, text: str, known) -> list[str]:
        items = list(known) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in known for x in items):
            ap.error(f"--{flag} {text!r}: expected a comma-separated list from {list(known)}")
        return items

    args.scenarios = names("scenarios", args.scenarios, SCENARIOS)
    args.estimators = names("estimators", args.estimators, ESTIMATORS)
    args.sources = names("sources", args.sources, SOURCES)
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        args.seeds = []
    if not args.seeds:
        ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers")
    p = PRESETS["tiny"]
    cli.fill_from_preset(args, {**p, "eps": 1e-3, "grid_step": 0.05})
    cli.require_positive(ap, args, ("rounds", "clients", "train", "val", "test", "pretrain_steps", "local_steps",
                                    "local_train_steps", "batch_size", "rank", "threads", "synthetic_per_class"))
    cli.require_positive(ap, args, ("conflict_classes",), minimum=2)
    for k in FLOATS:
        if not (getattr(args, k) > 0 and math.isfinite(getattr(args, k))):
            ap.error(f"--{k.replace('_', '-')} must be a positive number, got {getattr(args, k)}")
    if not abs(1 / args.grid_step - round(1 / args.grid_step)) < 1e-6 or args.grid_step > 1:
        ap.error(f"--grid-step must be 1/n for an integer n >= 1 (e.g. 0.05), got {args.grid_step}")
    if args.public < 1000:
        ap.error(f"--public must be >= 1000 (the tiny backbone is pre-trained on it), got {args.public}")
    cli.check_dirs(ap, ("--data-dir", args.data_dir, os.R_OK | os.X_OK), ("--out", args.out, os.W_OK | os.X_OK))
    args.data, args.progress = "synthetic", args.progress
    return args, p


def setup(args, p: dict):
    """The synthetic data (written once), the client pool and the tiny backbone (pre-trained once, cached:
    the same file run_cifar.py --preset tiny --data synthetic uses)."""
    try:
        data, _ = load_images("synthetic", args.data_dir, args.synthetic_per_class)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    public, pool = public_and_pool(len(data.labels), args.public)
    desc = {"data": "synthetic", "synthetic_per_class": args.synthetic_per_class}
    backbone, backbone_info = tiny_backbone(p, data, public, desc, args.data_dir, args.pretrain_steps,
                                            torch.device("cpu"), args.progress)
    return data, pool, backbone, backbone_info


def cache_path(args, scen: str, spec: dict, seed: int, backbone_info: dict) -> str:
    """--out/cache/<scenario>-s<seed>-<hash of everything the adapters depend on>.pt"""
    training = {k: getattr(args, k) for k in SHARED + ("rounds",) if k not in ("eps", "grid_step")}
    key = json.dumps({"spec": spec, "seed": seed, "backbone": backbone_info.get("backbone"), "training": training,
                      "local_seed": "pipeline.local_seed"},  # caches of the old seeding (seed * 7919 + i) are stale
                     sort_keys=True)
    return os.path.join(args.out, "cache", f"{scen}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt")


def scenario_spec(args, scen: str) -> dict:
    return {**SCENARIOS[scen], **({"classes": args.conflict_classes} if scen == "conflict" else {})}


def main(argv=None) -> dict:
    args, p = resolve(build_parser(), argv)
    args.device = "cpu"
    cli.setup_torch(args)
    data, pool, backbone, backbone_info = setup(args, p)
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("progress", "threads", "resume")}
    results = {"settings": settings, "backbone": backbone_info, "runs": {}, "summary": {}, "timing_s": {}}
    jobs = [(scen, seed) for scen in args.scenarios for seed in args.seeds]
    t_start = time.time()
    for scen, seed in tqdm(jobs, desc="scenarios x seeds", disable=not args.progress):
        t0 = time.time()
        spec = scenario_spec(args, scen)
        try:
            splits = make_splits(spec, data, pool, args, seed)
        except DataError as e:
            raise SystemExit(f"error: scenario {scen}: {e}") from None
        model = fresh_model(backbone, p, args, seed)
        G, local = train_adapters(model, splits, args, seed, cache_path(args, scen, spec, seed, backbone_info))
        init = lora_state_dict(model)
        results["runs"].setdefault(scen, {})[str(seed)] = {s.name: evaluate_client(model, init, G, local[s.name], s,
                                                                                    args, seed * 1000 + i)
                                                            for i, s in enumerate(splits)}
        results["timing_s"][f"{scen}-s{seed}"] = time.time() - t0
        results["summary"] = summarize(results["runs"])
        write(results, args.out)
    results["timing_s"]["total"] = time.time() - t_start
    write(results, args.out)
    print("SYNTHETIC DATA (not CIFAR-100)\n" + markdown(results["summary"]))
    print(f"{results['timing_s']['total']:.0f}s; results in {args.out}/ablation.json and ablation.md")
    return results


if __name__ == "__main__":
    main()
