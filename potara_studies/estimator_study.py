"""The estimator study behind `python -m potara_studies.ablation` (ablation.py: its command line): does the merge
weight track the grid search? Every estimator x statistics source, scenario by scenario.

    args, p = ablation.resolve(ablation.build_parser(), argv)   # the checked command line
    results = run(args, p)                                      # --out/ablation.json and ablation.md

Suites. synthetic: the synthetic CIFAR-100 stand-in (data.py) and the tiny ViT preset (vit.py; the backbone is
pre-trained once on the public images and cached under --data-dir); scenarios: Dirichlet label skew at two
alphas (a third, 10, with --scenarios all), few-shot clients (50 training images, mild skew), class-subset tasks
(4 superclasses each), conflicting tasks (the same 20 classes, each client its own permutation of them).
real: scikit-learn's bundled handwritten digits (digits.py: installed with the package, nothing downloaded), an
MLP backbone pre-trained on a public split (~1 s, not cached); scenarios: conflicting tasks (the digit, its
parity, digit > 4, ...) and Dirichlet label skew; sizes and training from config.DigitsConfig.
Per scenario and seed: one partition into clients (train / val / test), one FedIT adapter and one local adapter
per client, trained as the pipeline trains them (pipeline.train_local, pipeline.local_seed; synthetic: cached
under --out/cache); then per client, on the SAME two adapters: the lam grid's val accuracy, val loss and test
accuracy (the grid search picks the best val accuracy, evaluation.grid_choice), the loss barrier along the
segment, and every estimator x source with the test accuracy of the A/B-space merge at its lam.
Estimators: "verified" (potara's default) and "paper" (potara), and kept here for the study only:
  hermite        the default without its verification pass (the cubic's minimiser; the previous default);
  quadratic      the minimiser of the quadratic through the two end slopes, d0 / (d0 - d1) (clipped);
  verified-loss  the default comparing its candidates by held-out loss alone (not error first);
  bias           "paper" + each model's squared diagonal-Newton distance (potara.variance_terms(bias=True)).
The first four (FROM_INFO) come from one potara.personalize call (its info: no extra pass), the other two
(FROM_STATS) from one potara.gradient_stats call. Sources (config.ABLATION_SOURCES): client split, sample count,
Fisher labels
("sampled": true Fisher).
Output: --out/ablation.json (every figure, per client) and ablation.md (the table), rewritten after every
scenario x seed. Goal: in every scenario acc >= 0.98 x the grid search on val and
>= max(local, FedIT) - 0.005.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import time
import warnings
from dataclasses import fields

import numpy as np
import torch

from data import DataError, class_split_partition, client_splits, dirichlet_partition, load_images, public_and_pool
from fed import Client, progress_bar, run_fedit
from lora import lora_state_dict
from potara import (
    gradient_stats,
    merge_adapters,
    paper_weight,
    personalize,
    potara_weight,
    segment_loss,
    variance_terms,
)
from potara_guards.safe_files import UnsafeFile, atomic_write, load_torch_file, make_folder
from potara_harness import cli
from potara_harness.config import (
    ABLATION_CACHE,
    ABLATION_ESTIMATORS,
    ABLATION_OUTPUTS,
    ABLATION_SCENARIOS,
    ABLATION_SOURCES,
    ABLATION_SUITES,
    DigitsConfig,
    ExperimentConfig,
)
from potara_harness.evaluation import grid_choice, lam_grid, score_adapter
from potara_harness.pipeline import local_seed, train_local
from potara_harness.report import write_text
from potara_harness.vit import build_model, tiny_backbone
from potara_studies import digits

FROM_STATS = ("paper", "bias")  # from one gradient_stats() call
FROM_INFO = tuple(e for e in ABLATION_ESTIMATORS if e not in FROM_STATS)  # from one personalize() call
REFERENCE = ("local", "fedit", "uniform", "grid_val", "grid_oracle")
CACHE_KEYS = (
    "clients",
    "train",
    "val",
    "test",
    "public",
    "pretrain_steps",
    "synthetic_per_class",
    "local_steps",
    "local_train_steps",
    "batch_size",
    "rank",
    "lr",
    "lora_alpha",
    "rounds",
)  # what the adapters depend on


# ----------------------------------------------------------------------------- study-only estimators
def quadratic_lam(info: dict) -> float:
    """ "quadratic": f''(lam) taken constant, d1 - d0, from the end slopes d0 = f'(0), d1 = f'(1): the minimiser
    d0 / (d0 - d1) when convex (d0 < 0 < d1); rising from 0: 0; still falling at 1: 1; concave: the better end."""
    d0, d1 = info["slope_local"], info["slope_federated"]
    if d0 >= 0 and d1 <= 0:
        return 0.0 if info["loss_local"] <= info["loss_federated"] else 1.0
    return 0.0 if d0 >= 0 else 1.0 if d1 <= 0 else d0 / (d0 - d1)


def loss_only_lam(info: dict) -> float:
    """ "verified-loss": the default's candidates (both ends, the Hermite minimiser) compared by held-out loss alone."""
    cands = [(info["loss_local"], 0.0), (info["loss_federated"], 1.0)]
    if info["loss_at_hermite"] is not None:
        cands.append((info["loss_at_hermite"], info["lam_hermite"]))
    return min(cands)[1]


def bias_lam(stats) -> float:
    return potara_weight(*variance_terms(stats, bias=True))


# ----------------------------------------------------------------------------- scenarios
def conflict_partition(labels: np.ndarray, num_clients: int, samples_per_client: int, classes: int, seed: int):
    """Every client samples uniformly from the same `classes` classes (disjoint samples) and relabels
    them with its own random permutation. Returns (parts, relabel): relabel[k][y] is client k's label."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(np.unique(labels), classes, replace=False))
    pool = rng.permutation(np.flatnonzero(np.isin(labels, chosen)))
    if num_clients * samples_per_client > len(pool):
        raise DataError(
            f"{num_clients} clients x {samples_per_client} samples > the {len(pool)} images of {classes} classes"
        )
    parts = [np.sort(pool[k * samples_per_client : (k + 1) * samples_per_client]) for k in range(num_clients)]
    relabel = []
    for _ in range(num_clients):
        table = np.arange(int(labels.max()) + 1)
        table[chosen] = chosen[rng.permutation(classes)]
        relabel.append(table)
    return parts, relabel


def make_splits(spec: dict, data, pool: np.ndarray, args, seed: int):
    """The synthetic scenario's clients (data.ClientSplits), each with its train / val / test split."""
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
    return ExperimentConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        lr=args.lr,
        batch_size=args.batch_size,
        local_train_steps=args.local_train_steps,
        seed=seed,
    )


def train_adapters(model, splits, args, seed: int, cache: str | None) -> tuple[dict, dict]:
    """FedIT's global adapter and one local adapter per client, both from phi_0, trained as the pipeline trains
    them (same seeds: the same adapters as run_cifar.py for the same clients); read from `cache` when there."""
    if cache and os.path.lexists(cache):
        try:  # a regular file of bounded size, weights only (safe_files): a planted FIFO or link is refused
            saved = load_torch_file(cache)
        except (UnsafeFile, RuntimeError, OSError, pickle.UnpicklingError) as e:
            cli.fail(f"the study's cache {cache}: {(str(e) or type(e).__name__).splitlines()[0][:200]} (remove it)")
        if not (
            isinstance(saved, dict) and isinstance(saved.get("global"), dict) and isinstance(saved.get("local"), dict)
        ):
            cli.fail(f"the study's cache {cache}: not a cache this study wrote (remove it)")
        return saved["global"], saved["local"]
    init, cfg = lora_state_dict(model), training_config(args, seed)
    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in splits]
    fedit = run_fedit(model, clients, cfg.fed_config(), progress=False)
    local = {
        s.name: train_local(model, init, s, cfg.local_train_steps, local_seed(seed, i), cfg)
        for i, s in enumerate(splits)
    }
    if cache:
        make_folder(os.path.dirname(cache))  # never through a link planted where the folder goes
        atomic_write(cache, lambda f: torch.save({"global": fedit.global_state, "local": local}, f))
    return fedit.global_state, local


# ----------------------------------------------------------------------------- per client
def grid_curves(model, init: dict, G: dict, L: dict, s, args) -> dict:
    """The lam grid: val accuracy (the grid search's choice), val loss (the barrier) and test accuracy."""
    grid = lam_grid(args.grid_step)
    score = lambda lam, x, y: score_adapter(model, merge_adapters(G, L, lam), init, x, y)
    val = [score(lam, s.val_inputs, s.val_targets) for lam in grid]
    test = [score(lam, s.test_inputs, s.test_targets) for lam in grid]
    val_loss = [segment_loss(model, G, L, lam, [(s.val_inputs, s.val_targets)], slope=False)[0] for lam in grid]
    barrier = max(f - ((1 - lam) * val_loss[0] + lam * val_loss[-1]) for lam, f in zip(grid, val_loss))
    return {"lam": grid, "val": val, "test": test, "val_loss": val_loss, "barrier": barrier}


def estimator_weights(model, G: dict, L: dict, s, src: str, estimators, seed: int) -> dict:
    """{estimator: (lam, extra)} for one statistics source: one personalize() call for FROM_INFO, one
    gradient_stats() call for FROM_STATS."""
    split, n, labels = ABLATION_SOURCES[src]
    x, y = (s.train_inputs, s.train_targets) if split == "train" else (s.val_inputs, s.val_targets)
    n = len(y) if n is None else min(n, len(y))
    out = {}
    if any(e in FROM_INFO for e in estimators):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, info = personalize(model, G, L, held_out=[(x[:n], y[:n])], n_samples=n)
        info["warned_training_data"] = any("training data" in str(w.message) for w in caught)
        lams = {
            "verified": info["lam"],
            "hermite": info["lam_hermite"] if info["lam_hermite"] is not None else 0.5,
            "quadratic": quadratic_lam(info),
            "verified-loss": loss_only_lam(info),
        }
        out.update({e: (lams[e], {"info": info} if e == "verified" else {}) for e in FROM_INFO if e in estimators})
    if any(e in FROM_STATS for e in estimators):
        stats = gradient_stats(model, G, L, [(x[:n], y[:n])], n_samples=n, labels=labels, seed=seed)
        lams = {"paper": paper_weight(stats)[0], "bias": bias_lam(stats)}
        out.update({e: (lams[e], {}) for e in FROM_STATS if e in estimators})
    return {e: (lam, {**extra, "n_samples": n}) for e, (lam, extra) in out.items()}


def evaluate_client(model, init: dict, G: dict, L: dict, s, args, seed: int) -> dict:
    """Local, FedIT, uniform, the grid (val choice and test oracle), the barrier, every estimator x source."""
    curves = grid_curves(model, init, G, L, s, args)
    grid, test = curves["lam"], curves["test"]
    j = grid_choice(grid, curves["val"])
    test_at = dict(zip(grid, test))  # memoised: estimators often land on the grid (0, 1, ...)

    def acc(lam: float) -> float:
        key = round(float(lam), 10)
        if key not in test_at:
            test_at[key] = score_adapter(model, merge_adapters(G, L, key), init, s.test_inputs, s.test_targets)
        return test_at[key]

    out = {
        "local": test[0],
        "fedit": test[-1],
        "uniform": acc(0.5),
        "grid_val": test[j],
        "lam_grid": grid[j],
        "grid_oracle": max(test),
        "barrier": curves.pop("barrier"),
        "grid": curves,
        "estimators": {},
    }
    for src in args.sources:
        for est, (lam, extra) in estimator_weights(model, G, L, s, src, args.estimators, seed).items():
            out["estimators"][f"{est}@{src}"] = {
                "lam": lam,
                "acc": acc(lam),
                "abs_lam_diff": abs(lam - grid[j]),
                **extra,
            }
    return out


# ----------------------------------------------------------------------------- summary and table
def chosen_point(info: dict) -> tuple:
    """The default's (held-out error, loss) at its lam, and at the better end in (error, loss) order and by loss."""
    at = {
        "hermite": ("error_at_hermite", "loss_at_hermite"),
        "local end": ("error_local", "loss_local"),
        "federated end": ("error_federated", "loss_federated"),
    }.get(info["candidate"])
    if at is None:
        return None
    chosen = (info[at[0]], info[at[1]])
    best_end = min((info["error_local"], info["loss_local"]), (info["error_federated"], info["loss_federated"]))
    return chosen, best_end, min(info["loss_local"], info["loss_federated"])


def default_checks(clients: list[dict], m: str) -> dict:
    """For the default ("verified@..."): candidates taken, the training-data warnings, and the property checks:
    chosen (error, loss) above the better end's (never, by construction), chosen loss above the lower end loss."""
    infos = [c["estimators"][m]["info"] for c in clients]
    points = [p for p in map(chosen_point, infos) if p is not None]
    above = [chosen[1] - low for chosen, _, low in points if chosen[1] > low + 1e-12]
    return {
        "candidates": {k: sum(i["candidate"] == k for i in infos) for k in sorted({i["candidate"] for i in infos})},
        "warned_training_data": sum(i["warned_training_data"] for i in infos),
        "above_better_end": sum(chosen > best for chosen, best, _ in points),
        "loss_above_lower_end": len(above),
        "max_loss_excess": max(above, default=0.0),
        "passes": {
            "forward_backward": max(i["passes"]["forward_backward"] for i in infos),
            "forward": max(i["passes"]["forward"] for i in infos),
        },
    }


def summarize(runs: dict) -> dict:
    """Per scenario, over clients and seeds: mean accuracy of every method, its ratio to the grid search on val
    (ratio of the means), the mean |lam - lam_grid| and lam; the barriers; the default's checks."""
    summary = {}
    for scen, by_seed in runs.items():
        clients = [c for seed in by_seed.values() for c in seed.values()]
        mean = lambda f: float(np.mean([f(c) for c in clients]))
        grid = mean(lambda c: c["grid_val"])
        row = {m: {"acc": mean(lambda c: c[m])} for m in REFERENCE}
        for m in clients[0]["estimators"]:
            acc = mean(lambda c: c["estimators"][m]["acc"])
            row[m] = {
                "acc": acc,
                "ratio": acc / grid if grid > 0 else 1.0 if acc == 0 else float("inf"),
                "abs_lam_diff": mean(lambda c: c["estimators"][m]["abs_lam_diff"]),
                "lam": mean(lambda c: c["estimators"][m]["lam"]),
            }
            if m.startswith("verified@"):
                row[m]["default"] = default_checks(clients, m)
        barriers = [c["barrier"] for c in clients]
        row["barrier"] = {
            "mean": float(np.mean(barriers)),
            "max": float(max(barriers)),
            "clients_above_0.1": int(sum(b > 0.1 for b in barriers)),
        }
        row["lam_grid"], row["clients_x_seeds"] = mean(lambda c: c["lam_grid"]), len(clients)
        summary[scen] = row
    return summary


def goal_met(row: dict, method: str) -> bool:
    """The study's goal in one scenario: >= 0.98 x the grid search on val, and >= max(local, FedIT) - 0.005."""
    return row[method]["ratio"] >= 0.98 and row[method]["acc"] >= max(row["local"]["acc"], row["fedit"]["acc"]) - 0.005


def markdown(summary: dict) -> str:
    scens = list(summary)
    lines = [
        "Mean test accuracy over clients and seeds; for estimators: accuracy (ratio to the grid search on "
        "val; mean abs(lam - lam_grid)). Rows: estimator@source, best worst-case ratio first.",
        "",
        "| method | " + " | ".join(scens) + " | worst ratio | goal met |",
        "|---|" + "---|" * (len(scens) + 2),
    ]
    for m in REFERENCE:
        lines.append(f"| {m} | " + " | ".join(f"{summary[s][m]['acc']:.3f}" for s in scens) + " | | |")
    estimators = [m for m in summary[scens[0]] if "@" in m]
    worst = {m: min(summary[s][m]["ratio"] for s in scens) for m in estimators}
    for m in sorted(estimators, key=lambda m: -worst[m]):
        cells = [
            f"{summary[s][m]['acc']:.3f} ({summary[s][m]['ratio']:.3f}; {summary[s][m]['abs_lam_diff']:.2f})"
            for s in scens
        ]
        met = (
            "yes"
            if all(goal_met(summary[s], m) for s in scens)
            else "no: " + ", ".join(s for s in scens if not goal_met(summary[s], m))
        )
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {worst[m]:.3f} | {met} |")
    lines += [
        "",
        "Goal: acc >= 0.98 x grid (val) and >= max(local, fedit) - 0.005 in every scenario. Mean lam_grid "
        "(val): "
        + ", ".join(f"{s} {summary[s]['lam_grid']:.2f}" for s in scens)
        + "; clients x seeds: "
        + ", ".join(f"{s} {summary[s]['clients_x_seeds']}" for s in scens)
        + ".",
        "Loss barrier on val (max over the grid of the loss above the chord between the ends): "
        + "; ".join(
            f"{s} mean {summary[s]['barrier']['mean']:.2f}, max {summary[s]['barrier']['max']:.2f}, "
            f"{summary[s]['barrier']['clients_above_0.1']} clients > 0.1"
            for s in scens
        )
        + ".",
    ]
    for m in (m for m in estimators if m.startswith("verified@")):
        d = {s: summary[s][m]["default"] for s in scens}
        lines.append(
            f"{m}: "
            + "; ".join(
                f"{s}: taken {d[s]['candidates']}, (error, loss) above the better end's {d[s]['above_better_end']}, "
                f"loss above the lower end's {d[s]['loss_above_lower_end']} (max +{d[s]['max_loss_excess']:.3f}), "
                f"training-data warnings {d[s]['warned_training_data']}"
                for s in scens
            )
            + "."
        )
    return "\n".join(lines)


def write(results: dict, out: str) -> None:
    json_name, md_name = ABLATION_OUTPUTS
    write_text(os.path.join(out, json_name), json.dumps(results, indent=1))
    settings = results["settings"]
    write_text(
        os.path.join(out, md_name),
        ABLATION_SUITES[settings["suite"]]["title"]
        + "\n\n"
        + (f"Command: `{settings['command']}`\n\n" if settings.get("command") else "")
        + markdown(results["summary"])
        + "\n",
    )


def digits_config(args) -> DigitsConfig:
    """The real suite's settings: DigitsConfig's fields the command line has (all but `hidden`)."""
    return DigitsConfig(**{f.name: getattr(args, f.name) for f in fields(DigitsConfig) if hasattr(args, f.name)})


def setup(args, p: dict):
    """synthetic: the data (written once), the client pool and the tiny backbone (pre-trained once, cached: the
    file run_cifar.py --preset tiny --data synthetic uses). real: the digits, the pool, the MLP backbone."""
    try:
        if args.suite == "real":
            x, y = digits.load_digits_data()
            cfg = digits_config(args)
            public, pool = public_and_pool(len(y), cfg.public)
            backbone = digits.pretrain_backbone(x[public], y[public], cfg)
            with torch.no_grad():
                acc = float((backbone(x[pool]).argmax(-1) == torch.from_numpy(y[pool])).float().mean())
            return (
                (x, y),
                pool,
                backbone,
                {
                    "backbone": f"digits MLP, {cfg.pretrain_steps} steps on {cfg.public} public images",
                    "digit_accuracy_on_pool": acc,
                },
            )
        data, _ = load_images("synthetic", args.data_dir, args.synthetic_per_class)
    except (DataError, OSError) as e:
        cli.fail(str(e))  # one line, exit 2: bad input
    public, pool = public_and_pool(len(data.labels), args.public)
    desc = {"data": "synthetic", "synthetic_per_class": args.synthetic_per_class}
    backbone, backbone_info = tiny_backbone(
        p, data, public, desc, args.data_dir, args.pretrain_steps, torch.device("cpu"), args.progress
    )
    return data, pool, backbone, backbone_info


def cache_path(args, scen: str, spec: dict, seed: int, backbone_info: dict) -> str:
    """--out/cache/<scenario>-s<seed>-<hash of everything the adapters depend on>.pt"""
    training = {k: getattr(args, k) for k in CACHE_KEYS}
    key = json.dumps(
        {
            "spec": spec,
            "seed": seed,
            "backbone": backbone_info.get("backbone"),
            "training": training,
            "local_seed": "pipeline.local_seed",
        },  # caches of the old seeding (seed * 7919 + i) are stale
        sort_keys=True,
    )
    return os.path.join(args.out, ABLATION_CACHE, f"{scen}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt")


def scenario_spec(args, scen: str) -> dict:
    return {**ABLATION_SCENARIOS[scen], **({"classes": args.conflict_classes} if scen == "conflict" else {})}


def scenario(args, p: dict, scen: str, seed: int, data, pool, backbone, backbone_info):
    """The clients, the model (phi_0 from seed) and the two adapters of one scenario x seed."""
    try:
        if args.suite == "real":
            cfg = digits_config(args)
            splits = digits.scenario_splits(scen, *data, pool, cfg, seed)
            model = digits.build_model(backbone, cfg, seed)
            return splits, model, *train_adapters(model, splits, args, seed, None)  # ~1 s: not cached
        spec = scenario_spec(args, scen)
        splits = make_splits(spec, data, pool, args, seed)
    except DataError as e:
        cli.fail(f"scenario {scen}: {e}")
    model = fresh_model(backbone, p, args, seed)
    return splits, model, *train_adapters(model, splits, args, seed, cache_path(args, scen, spec, seed, backbone_info))


def run(args, p: dict) -> dict:
    """Every scenario x seed of the checked command line (ablation.resolve), torch started (cli.start_torch)."""
    data, pool, backbone, backbone_info = setup(args, p)
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("progress", "threads", "resume")}
    results = {"settings": settings, "backbone": backbone_info, "runs": {}, "summary": {}, "timing_s": {}}
    t_start = time.time()
    for scen, seed in progress_bar(
        [(sc, sd) for sc in args.scenarios for sd in args.seeds], "scenarios x seeds", args.progress, stage=True
    ):
        t0 = time.time()
        splits, model, G, local = scenario(args, p, scen, seed, data, pool, backbone, backbone_info)
        init = lora_state_dict(model)
        results["runs"].setdefault(scen, {})[str(seed)] = {
            s.name: evaluate_client(model, init, G, local[s.name], s, args, seed * 1000 + i)
            for i, s in enumerate(splits)
        }
        results["timing_s"][f"{scen}-s{seed}"] = time.time() - t0
        results["summary"] = summarize(results["runs"])
        write(results, args.out)
    results["timing_s"]["total"] = time.time() - t_start
    write(results, args.out)
    print(ABLATION_SUITES[args.suite]["title"] + "\n" + markdown(results["summary"]))
    print(f"{results['timing_s']['total']:.0f}s; results in {args.out}/ablation.json and ablation.md")
    return results
