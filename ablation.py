"""Does the closed-form weight track the grid search? Every estimator x statistics source, scenario by scenario.

    python ablation.py                                   # the whole suite (synthetic data, tiny preset)
    python ablation.py --scenarios conflict --seeds 0    # one scenario, one seed
    python ablation.py --estimators paper,quadratic --sources train32,val

For each scenario and seed: one partition of the synthetic CIFAR-100 stand-in into clients (train /
val / test each), one FedIT run and one local adapter per client (trained once, cached under
--out/cache), then, per client, on the SAME two adapters: the lam grid on val and test, and for every
estimator x source the closed-form lam and the test accuracy of the A/B-space merge at that lam.
Scenarios (SCENARIOS): Dirichlet label skew at two alphas, class-subset tasks (each client owns its
own superclasses), and conflicting tasks (the same 20 classes for every client, each client labelling
them with its own permutation: what the federated adapter learns fits no client).
Sources (SOURCES): which client split the statistics use and how many samples.
Output: --out/ablation.json (every figure, per client) and ablation.md (the table), rewritten after
every scenario and seed, so an interrupted suite keeps what it finished. Reported per scenario: mean
test accuracy over clients and seeds, its ratio to the validation grid search's, the mean
|lam - lam_grid(val)|, and local / FedIT / grid (val) / grid (test oracle) for reference.
The backbone is run_cifar's tiny one (pre-trained once on the public images and cached).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see run_cifar.py

import numpy as np
import torch
from tqdm.auto import tqdm

import run_cifar
from data import DataError, class_split_partition, dirichlet_partition, load_cifar100, split_client, write_synthetic_cifar100
from experiment import ClientSplits, accuracy, lam_grid
from fed import Client, run_fedit, shuffled_batches, train_adapter
from lora import add_lora, load_lora_state_dict, lora_state_dict
from potara import ESTIMATORS, gradient_stats, merge_adapters, weight_from_stats

SCENARIOS = {  # name -> how clients get their data
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
DEFAULT_SOURCES = "train32,val32,val"
DEFAULT_SEEDS = "0,1,2"
DEFAULT_ROUNDS = 50  # FedIT rounds (the tiny preset's 100 halved: 3 seeds x 4 scenarios in ~15 min on 2 cores)


def conflict_partition(labels: np.ndarray, num_clients: int, samples_per_client: int, classes: int, seed: int):
    """Every client samples uniformly from the same `classes` classes (disjoint samples) and relabels
    them with its own random permutation. Returns (parts, relabel): relabel[k][y] is client k's label."""
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(np.unique(labels), classes, replace=False))
    pool = rng.permutation(np.flatnonzero(np.isin(labels, chosen)))
    if num_clients * samples_per_client > len(pool):
        raise DataError(f"conflict: {num_clients} x {samples_per_client} samples > the {len(pool)} images of "
                        f"{classes} classes")
    parts = [np.sort(pool[k * samples_per_client:(k + 1) * samples_per_client]) for k in range(num_clients)]
    relabel = []
    for _ in range(num_clients):
        table = np.arange(int(labels.max()) + 1)
        table[chosen] = chosen[rng.permutation(classes)]
        relabel.append(table)
    return parts, relabel


def make_splits(spec: dict, data, pool: np.ndarray, args, seed: int) -> list[ClientSplits]:
    sizes = (spec.get("train", args.train), args.val, args.test)  # a scenario may shrink the training split
    labels, per_client = data.labels[pool], sum(sizes)
    relabel = None
    if spec["partition"] == "dirichlet":
        parts = dirichlet_partition(labels, args.clients, spec["alpha"], per_client, seed)
    elif spec["partition"] == "superclass":
        parts = class_split_partition(labels, data.coarse_labels[pool], args.clients, per_client, seed)
    else:
        parts, relabel = conflict_partition(labels, args.clients, per_client, spec["classes"], seed)
    splits = []
    for k, part in enumerate(parts):
        idx = [pool[i] for i in split_client(part, sizes, seed=seed * 1000 + k)]
        ys = [data.labels[i] if relabel is None else relabel[k][data.labels[i]] for i in idx]
        x = [data.images[torch.from_numpy(i)] for i in idx]
        splits.append(ClientSplits(f"client{k}", x[0], torch.from_numpy(ys[0]), x[1],
                                             torch.from_numpy(ys[1]), x[2], torch.from_numpy(ys[2])))
    return splits


def fresh_model(backbone, p: dict, args, seed: int) -> torch.nn.Module:
    """run_cifar's model: the cached backbone, a zero head, LoRA on q and v (phi_0 drawn from `seed`)."""
    vit = copy.deepcopy(backbone)
    run_cifar.new_head(vit, 100)
    model = run_cifar.ImageClassifier(vit, p["mean"], p["std"])
    torch.manual_seed(seed)
    add_lora(model, ["self_attention"], r=args.rank, alpha=args.lora_alpha, trainable=["vit.heads"])
    return model


def train_adapters(model, splits, args, seed: int, cache: str) -> tuple[dict, dict]:
    """FedIT's global adapter and one local adapter per client, from phi_0; loaded from `cache` when there."""
    if os.path.exists(cache):
        saved = torch.load(cache, map_location="cpu", weights_only=True)
        return saved["global"], saved["local"]
    init = lora_state_dict(model)
    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in splits]
    fedit = run_fedit(model, clients, args.rounds, args.local_steps, len(clients), args.lr, seed, args.batch_size,
                      progress=False)
    local = {}
    for i, s in enumerate(splits):
        load_lora_state_dict(model, init)
        torch.manual_seed(seed * 7919 + i)
        batches = shuffled_batches(s.train_inputs, s.train_targets, args.batch_size, seed * 7919 + i)
        local[s.name] = train_adapter(model, batches, args.local_train_steps, args.lr, progress=False).state
    load_lora_state_dict(model, init)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save({"global": fedit.global_state, "local": local}, f"{cache}.tmp{os.getpid()}")
    os.replace(f"{cache}.tmp{os.getpid()}", cache)
    return fedit.global_state, local


def evaluate_client(model, init: dict, G: dict, L: dict, s, args, sources: list[str], estimators: list[str],
                    seed: int) -> dict:
    """Local, FedIT, the grid (val choice, ties -> lam nearest 0.5, as experiment.py), and every
    estimator x source: its lam and the test accuracy of the A/B merge at that lam."""
    test_at: dict[float, float] = {}

    def score(state, x, y):
        load_lora_state_dict(model, state)
        value = accuracy(model.eval(), x, y)
        load_lora_state_dict(model, init)
        return value

    def test_acc(lam: float) -> float:
        key = round(float(lam), 12)
        if key not in test_at:
            test_at[key] = score(merge_adapters(G, L, key), s.test_inputs, s.test_targets)
        return test_at[key]

    grid = lam_grid(args.grid_step)
    val = [score(merge_adapters(G, L, lam), s.val_inputs, s.val_targets) for lam in grid]
    best = max(val)
    j = min((j for j, v in enumerate(val) if v == best), key=lambda j: (abs(grid[j] - 0.5), j))
    test = [test_acc(lam) for lam in grid]
    out = {"local": test[0], "fedit": test[-1], "grid_val": test[j], "lam_grid": grid[j],
           "grid_oracle": max(test), "uniform": test_acc(0.5), "grid": {"lam": grid, "val": val, "test": test},
           "estimators": {}}
    for src in sources:
        split, n, labels = SOURCES[src]
        x, y = (s.train_inputs, s.train_targets) if split == "train" else (s.val_inputs, s.val_targets)
        n = len(y) if n is None else min(n, len(y))
        stats = gradient_stats(model, G, L, [(x[:n], y[:n])], n_samples=n, labels=labels, seed=seed)
        for est in estimators:
            lam, _ = weight_from_stats(stats, est, eps=args.eps)
            out["estimators"][f"{est}@{src}"] = {"lam": lam, "acc": test_acc(lam), "abs_lam_diff": abs(lam - grid[j])}
    return out


def summarize(runs: dict) -> dict:
    """Per scenario, over clients and seeds: mean acc of every method, ratio to grid (val), mean |dlam|."""
    summary = {}
    for scen, by_seed in runs.items():
        clients = [c for seed in by_seed.values() for c in seed.values()]
        mean = lambda f: float(np.mean([f(c) for c in clients]))
        grid = mean(lambda c: c["grid_val"])
        row = {m: {"acc": mean(lambda c: c[m])} for m in ("local", "fedit", "uniform", "grid_val", "grid_oracle")}
        for m in clients[0]["estimators"]:
            acc = mean(lambda c: c["estimators"][m]["acc"])
            row[m] = {"acc": acc, "ratio": acc / grid if grid else float("nan"),
                      "abs_lam_diff": mean(lambda c: c["estimators"][m]["abs_lam_diff"]),
                      "lam": mean(lambda c: c["estimators"][m]["lam"])}
        row["lam_grid"] = mean(lambda c: c["lam_grid"])
        row["clients_x_seeds"] = len(clients)
        summary[scen] = row
    return summary


def markdown(summary: dict) -> str:
    scens = list(summary)
    head = "| method | " + " | ".join(scens) + " | worst ratio | goal met |"
    lines = ["mean test accuracy (ratio to grid search on val; mean abs(lam - lam_grid))", "",
             head, "|---|" + "---|" * (len(scens) + 2)]
    for m in ("local", "fedit", "uniform", "grid_val", "grid_oracle"):
        lines.append(f"| {m} | " + " | ".join(f"{summary[s][m]['acc']:.3f}" for s in scens) + " | | |")
    estimators = [m for m in summary[scens[0]] if "@" in m]
    for m in sorted(estimators, key=lambda m: -min(summary[s][m]["ratio"] for s in scens)):
        cells = [f"{summary[s][m]['acc']:.3f} ({summary[s][m]['ratio']:.3f}; {summary[s][m]['abs_lam_diff']:.2f})"
                 for s in scens]
        ok = all(summary[s][m]["ratio"] >= 0.98 and summary[s][m]["acc"] >= max(summary[s]["local"]["acc"],
                                                                                  summary[s]["fedit"]["acc"])
                 for s in scens)
        worst = min(summary[s][m]["ratio"] for s in scens)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {worst:.3f} | {'yes' if ok else 'no'} |")
    lines += ["", "goal: acc >= 0.98 x grid (val) and >= max(local, FedIT) in every scenario",
              "mean lam_grid(val) per scenario: " + ", ".join(f"{s} {summary[s]['lam_grid']:.2f}" for s in scens)]
    return "\n".join(lines)


def write(results: dict, out: str) -> None:
    for name, text in (("ablation.json", json.dumps(results, indent=1)),
                       ("ablation.md", markdown(results["summary"]) + "\n" if results["summary"] else "")):
        tmp = os.path.join(out, f"{name}.tmp{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out, name))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Options left at None take run_cifar's tiny preset value.")
    a = ap.add_argument
    a("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, from {list(SCENARIOS)}")
    a("--seeds", default=DEFAULT_SEEDS, help="comma-separated integer seeds (partition, phi_0, training)")
    a("--estimators", default=",".join(ESTIMATORS), help=f"comma-separated, from {list(ESTIMATORS)}")
    a("--sources", default=DEFAULT_SOURCES, help=f"comma-separated statistics sources, from {list(SOURCES)}")
    a("--out", default=os.path.join("runs", "ablation"), help="output folder (ablation.json, ablation.md, cache/)")
    a("--data-dir", default="data", help="where synthetic/ and the cached tiny backbone live")
    a("--rounds", type=int, default=DEFAULT_ROUNDS, help="FedIT rounds")
    a("--conflict-classes", type=int, default=SCENARIOS["conflict"]["classes"], help="classes of the conflict scenario")
    for flag in ("clients", "train", "val", "test", "public", "pretrain-steps", "synthetic-per-class", "local-steps",
                 "local-train-steps", "batch-size", "rank"):
        a(f"--{flag}", type=int, help="as in run_cifar.py")
    for flag in ("lr", "lora-alpha", "eps", "grid-step"):
        a(f"--{flag}", type=float, help="as in run_cifar.py")
    a("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="CPU threads for torch")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    return ap


def resolve(ap: argparse.ArgumentParser, argv=None):
    """Our own lists, plus run_cifar's checks of every shared option (its parser, its one-line errors)."""
    args = ap.parse_args(argv)
    pick = lambda text, known, what: [x for x in text.split(",") if x] if all(
        x in known for x in text.split(",") if x) and text.strip(",") else ap.error(
        f"--{what}: {text!r} is not a comma-separated list of {list(known)}")
    args.scenarios = pick(args.scenarios, SCENARIOS, "scenarios")
    args.estimators = pick(args.estimators, ESTIMATORS, "estimators")
    args.sources = pick(args.sources, SOURCES, "sources")
    try:
        args.seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not args.seeds or args.conflict_classes < 2:
        ap.error("need at least one seed and --conflict-classes >= 2")
    shared = ["--preset", "tiny", "--data", "synthetic", "--data-dir", args.data_dir, "--rounds", str(args.rounds),
              "--threads", str(args.threads), "--out", args.out, "--fisher-samples", "1"]  # ours: --sources
    for k, v in vars(args).items():
        if v is not None and k.replace("_", "-") in {"clients", "train", "val", "test", "public", "pretrain-steps",
                                                      "synthetic-per-class", "local-steps", "local-train-steps",
                                                      "batch-size", "rank", "lr", "lora-alpha", "eps", "grid-step"}:
            shared += [f"--{k.replace('_', '-')}", str(v)]
    if not args.progress:
        shared.append("--no-progress")
    shared_parser = run_cifar.build_parser()
    shared_parser.error = ap.error  # its checks, our usage line
    rargs, p = run_cifar.resolve_args(shared_parser, shared)
    for k in ("scenarios", "seeds", "estimators", "sources", "conflict_classes"):
        setattr(rargs, k, getattr(args, k))
    return rargs, p


def main(argv=None) -> dict:
    args, p = resolve(build_parser(), argv)
    torch.set_num_threads(args.threads)
    import warnings
    warnings.filterwarnings("ignore", message="There is a performance drop")
    try:
        root = os.path.join(args.data_dir, "synthetic")
        write_synthetic_cifar100(root, args.synthetic_per_class, args.synthetic_per_class // 5)
        data = load_cifar100(root)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    n = len(data.labels)
    order = np.random.default_rng(12345).permutation(n)  # run_cifar's public set: the same cached backbone
    public, pool = np.sort(order[:args.public]), np.sort(order[args.public:])
    if args.public + args.clients * (args.train + args.val + args.test) > n:
        raise SystemExit(f"error: {args.clients} clients x {args.train + args.val + args.test} images + "
                         f"{args.public} public images > the {n} images available")
    backbone, backbone_info = run_cifar.get_backbone(args, p, data, public, torch.device("cpu"))
    os.makedirs(args.out, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("progress", "threads", "out", "resume")}
    results = {"settings": settings, "backbone": backbone_info, "runs": {}, "summary": {}, "timing_s": {}}
    jobs = [(sc, seed) for sc in args.scenarios for seed in args.seeds]
    for scen, seed in tqdm(jobs, desc="scenarios x seeds", disable=not args.progress):
        t0 = time.time()
        spec = {**SCENARIOS[scen], **({"classes": args.conflict_classes} if scen == "conflict" else {})}
        try:
            splits = make_splits(spec, data, pool, args, seed)
        except DataError as e:
            raise SystemExit(f"error: scenario {scen}: {e}") from None
        model = fresh_model(backbone, p, args, seed)
        train_key = {k: settings[k] for k in ("rounds", "local_steps", "local_train_steps", "lr", "batch_size", "rank",
                                              "lora_alpha", "clients", "train", "val", "test", "public",
                                              "synthetic_per_class")}
        key = json.dumps({"spec": spec, "seed": seed, "train": train_key, "backbone": backbone_info.get("backbone")},
                         sort_keys=True)
        cache = os.path.join(args.out, "cache", f"{scen}-s{seed}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt")
        G, local = train_adapters(model, splits, args, seed, cache)
        init = lora_state_dict(model)
        per_client = {s.name: evaluate_client(model, init, G, local[s.name], s, args, args.sources, args.estimators,
                                              seed * 1000 + i) for i, s in enumerate(splits)}
        results["runs"].setdefault(scen, {})[str(seed)] = per_client
        results["timing_s"][f"{scen}-s{seed}"] = time.time() - t0
        results["summary"] = summarize(results["runs"])
        write(results, args.out)
    print("SYNTHETIC DATA (not CIFAR-100)\n" + markdown(results["summary"]))
    print(f"results in {args.out}/ablation.json and ablation.md")
    return results


if __name__ == "__main__":
    main()
