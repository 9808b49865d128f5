"""Flower on loopback against its floors and the in-process loop: wall time per FedIT round of both
experiments, and where Flower's time goes (measured by the clients and the server).

    python -m potara_flower.bench --backbone data/backbones/tiny-3ed7fae472e8.pt --clients 3 --rounds 3
    python -m potara_flower.bench --backbone B --experiment vision --out runs/flower-bench

On one loopback federation (loopback.LocalFederation: a SuperLink and --clients SuperNodes on 127.0.0.1,
each client on --threads torch threads), one run after the other, --rounds rounds each:
  echo floor     potara_flower/floor/: a round of the same shape whose ClientApp returns its input at once
                 (flwr and numpy only): what Flower itself costs, a fresh process per message included;
  import floor   the same, with the ClientApp importing what the experiment's device cannot do without
                 (IMPORT_FLOORS): the least a torch app can cost, since Flower 1.42 starts a process per message;
  the app        `flwr run` of this repository's app, per experiment (vision: the tiny ViT on synthetic or
                 CIFAR-100 images; language: the tiny Llama of --model, or one with random weights, on the
                 first K synthetic tasks, run_llm.py's tiny split sizes), its final step shortened (FINAL_STEP:
                 not what is measured).
Per app round, from every client (client_app.startup_seconds): Flower starting its process, the app's
imports, the hand-over, data and model loading, local training; what is left is messaging (push, polling,
pull), taken against the slowest client. Goal: app round <= GOAL x (import floor + loading + training).
Vision also runs in process (fed.run_fedit on the clients client_app.py builds), and the final global
adapters are compared bitwise (the language experiment's bitwise equality is test_flower_llm.py's).
Output: a table on stdout and --out/flower_bench.json (atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from potara_flower.loopback import LocalFederation
from potara_harness import cli, run_folder
from potara_harness.config import LM_PRESETS, MAX_RESULTS_FILE_BYTES, VIT_PRESETS, AppConfig, ConfigError

# The command line is checked before torch loads (--help and a bad option answer at once): torch and what uses it
# are imported inside the functions that run after the checks.

APP = Path(__file__).resolve().parents[1]  # the repository root holds the Flower app (pyproject.toml's [tool.flwr.app])
FLOOR = Path(__file__).resolve().parent / "floor"  # the trivial app: its ClientApp returns its input at once
GOAL = 1.15  # the app's round within GOAL x (the import floor's round + the app's own loading and training)
IMPORT_FLOORS = {
    "vision": "torch,torchvision",  # the model is torchvision's VisionTransformer (vit.py)
    "language": "torch,transformers.models.llama.modeling_llama",  # the tiny model is transformers' Llama (lm.py)
}
FINAL_STEP = {"local-train-steps": 5, "finetune-steps": 5, "fisher-samples": 20}  # the app's last step, shortened


def in_process(cfg: AppConfig, backbone: str, data_dir: str) -> tuple[dict, list[float]]:
    """fed.run_fedit on the same clients and model as the Flower run; (final global adapter, seconds per round)."""
    from fed import Client, run_fedit
    from potara_flower.task import client_split
    from potara_harness.vit import build_model, load_backbone_file

    splits = [client_split(cfg, data_dir, k, cfg.num_clients) for k in range(cfg.num_clients)]
    p = VIT_PRESETS[cfg.preset]
    model = build_model(load_backbone_file(backbone, p["vit"]), p, cfg.rank, cfg.lora_alpha, cfg.seed)
    stamps = [time.perf_counter()]
    state = run_fedit(
        model,
        [Client(s.name, s.train_inputs, s.train_targets) for s in splits],
        cfg.pipeline_config().fed_config(),
        progress=False,
        on_round=lambda _: stamps.append(time.perf_counter()),
    )
    return state.global_state, [b - a for a, b in zip(stamps, stamps[1:])]


def random_tiny_model(path: Path) -> str:
    """The tiny Llama (config.TINY_LLAMA) with random weights, in pretrain_tiny's file format: a round's cost does
    not depend on the weights."""
    import torch

    from potara_harness.config import TINY_LLAMA
    from potara_harness.lm import tiny_model

    cfg = AppConfig.from_run_config({"experiment": "language"})
    state = tiny_model(cfg.max_len, TINY_LLAMA).state_dict()
    torch.save({"info": {"key": {"arch": dict(TINY_LLAMA)}}, "state_dict": state}, path)
    return str(path)


def node_config(k: int, k_total: int, backbone: str, data_dir: str, model: str, threads: int, cache: str) -> str:
    """One SuperNode's settings for both experiments (each reads its own keys): client k's backbone, data and
    split cache (vision), the k-th synthetic task and the tiny model file (language)."""
    from potara_harness.llm_tasks import SYNTHETIC_TASKS

    task = list(SYNTHETIC_TASKS)[k]
    return (
        f"partition-id={k} num-partitions={k_total} backbone='{backbone}' data-dir='{data_dir}' threads={threads} "
        f"task='synthetic:{task}' model='{model}'" + (f" cache-dir='{cache}'" if cache else "")
    )


def on_flower(runs: list[tuple[str, Path, dict]], nodes: list[str], folder: Path, superexec_poll: float | None) -> None:
    """Each (name, app folder, run config) of `runs` in turn on one loopback federation of len(nodes) SuperNodes."""
    with LocalFederation(folder / "federation") as fed:
        if superexec_poll is not None:  # the SuperNodes' SuperExec inherits it (flwr's default: 1 s)
            fed.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll)
        fed.superlink()
        for k, config in enumerate(nodes):
            fed.supernode(f"node{k}", config)
        for name, app, config in runs:
            t0 = time.time()
            status = fed.run(app, config, timeout=3600)
            if status["status"] != "finished:completed":
                raise RuntimeError(f"{name} ended {status['status']}:\n{fed.run_log(status['run-id'])[-3000:]}")
            print(f"{name}: {time.time() - t0:.0f} s")


def read_json(path: Path) -> dict:
    """A JSON file a run of this bench wrote: a regular file of bounded size (safe_files.read_regular)."""
    from potara_guards.safe_files import read_regular

    return json.loads(read_regular(path, MAX_RESULTS_FILE_BYTES))


def floor_rounds(out: Path) -> list[float]:
    return [r["seconds"] for r in read_json(out / "floor.json")["rounds"]]


def breakdown(results: dict) -> dict:
    """Mean per round of Flower's wall time and of its parts (clients in parallel: the slowest one's)."""
    from potara_flower.task import TIMINGS
    from potara_harness.report import mean

    rows = []
    for h in results["fedit_history"]:
        clients = h["client_seconds"].values()
        slowest = max(clients, key=lambda c: sum(c.values()), default={})
        parts = {k: slowest.get(k, 0.0) for k in TIMINGS}
        rows.append({"round": h["seconds"], **parts, "messaging": h["seconds"] - sum(parts.values())})
    return {k: mean(r[k] for r in rows) for k in ("round", *TIMINGS, "messaging")}


def against_floor(flower: dict, import_floor: float, echo_floor: float) -> dict:
    """The app's round against the floors: the ratios, and the goal app <= GOAL x (import floor + the app's
    loading + training)."""
    bound = GOAL * (import_floor + flower["load"] + flower["train"])
    return {
        "echo_floor_round_s": echo_floor,
        "import_floor_round_s": import_floor,
        "ratio_to_echo_floor": flower["round"] / echo_floor,
        "ratio_to_import_floor": flower["round"] / import_floor,
        "ratio_to_goal_base": flower["round"] / (bound / GOAL),
        "goal_bound_s": bound,
        "goal_met": flower["round"] <= bound,
    }


def table(report: dict) -> str:
    """The report as a markdown table: the echo floor, then per experiment its import floor and the app."""
    rows = [f"| Flower's echo floor (ClientApp returns its input) | {report['echo_floor_round_s']:.2f} |"]
    for name, e in report["experiments"].items():
        f = e["flower"]
        rows += [
            f"| **{name}**: import floor (+ `import {IMPORT_FLOORS[name]}`) | {e['import_floor_round_s']:.2f} |",
            f"| {name}: the app on Flower | {f['round']:.2f} ({e['ratio_to_import_floor']:.2f}x the import floor) |",
            *(
                f"| - {label} | {f[k]:.2f} |"
                for k, label in (
                    ("flower-start", "Flower starts a client process"),
                    ("imports", "the app's imports"),
                    ("handover", "app imported -> handler called"),
                    ("load", "client data + model loading"),
                    ("train", "client local training"),
                    ("messaging", "Flower messaging (push, polling, pull)"),
                )
            ),
            f"| {name}: app / (import floor + loading + training) | {e['ratio_to_goal_base']:.2f}x (goal <= {GOAL}:"
            f" {'met' if e['goal_met'] else 'not met'}) |",
        ]
        if "in_process_round_s" in e:
            rows.append(f"| {name}: in-process (fed.run_fedit) | {e['in_process_round_s']:.2f} |")
    return "| seconds per FedIT round (mean) | |\n|---|---|\n" + "\n".join(rows)


OUTPUT_FILES = ("flower_bench.json", "tiny-llama-random.pt")  # in --out, beside the folders below
SERVER_FOLDERS = ("vision", "language")  # the Potara app's out-dirs: run folders (run_folder.OUTPUT_FILES, ...)
FLOOR_FOLDERS = ("echo-floor", "vision-import-floor", "language-import-floor")  # the floor app's: floor.json
OUTPUT_FOLDERS = ("cache", "federation", *FLOOR_FOLDERS, *SERVER_FOLDERS)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    ap.add_argument("--backbone", required=True, help="a backbone file (vit.py's format, e.g. the tiny preset's cache)")
    ap.add_argument("--experiment", choices=["vision", "language", "both"], default="both")
    ap.add_argument(
        "--model",
        default=None,
        help="a tiny model file (run_llm.py --model tiny's cache); default: "
        "the tiny architecture with random weights, written to --out",
    )
    ap.add_argument("--clients", type=int, default=3, help="SuperNodes (= clients), every one trained every round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", choices=["synthetic", "cifar"], default="synthetic")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each client and of the in-process run")
    ap.add_argument("--out", default="runs/flower-bench")
    ap.add_argument("--no-cache", action="store_true", help="no split cache on the SuperNodes (node config cache-dir)")
    ap.add_argument(
        "--superexec-poll",
        type=float,
        default=None,
        help="FLWR_SUPEREXEC_TASK_POLL_INTERVAL of the SuperNodes, seconds (flwr's default: 1)",
    )
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


def parse(argv) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    if args.model is not None and not os.path.isfile(args.model):
        ap.error(f"--model {args.model}: no such file")
    if not 1 <= args.clients <= 8:
        ap.error(f"--clients {args.clients}: 1 to 8 (the language experiment's synthetic tasks)")
    # before any work: --out, its files and the folders the servers and devices fill (run_folder's rule)
    run_folder.prepare_out_dir(ap, args.out, files=OUTPUT_FILES, dirs=(), folders=OUTPUT_FOLDERS)
    for name in SERVER_FOLDERS:  # what the servers will check at their start, checked now, before the first run
        run_folder.prepare_out_dir(ap, os.path.join(args.out, name))
    for name in FLOOR_FOLDERS:
        run_folder.prepare_out_dir(ap, os.path.join(args.out, name), files=("floor.json",), dirs=())
    return args, ap


def main(argv=None) -> dict:
    args, ap = parse(argv)
    with run_folder.out_dir_lock(args.out, files=OUTPUT_FILES):  # a second bench on the same --out: one line
        return bench(args, ap)


def bench(args: argparse.Namespace, ap: argparse.ArgumentParser) -> dict:
    """The measured runs and their report (main: the checked command line, --out held)."""
    out = Path(args.out).resolve()
    experiments = ["vision", "language"] if args.experiment == "both" else [args.experiment]
    k, rounds = args.clients, args.rounds
    configs = {
        e: {
            "experiment": e,
            "num-clients": k,
            "rounds": rounds,
            "data": args.data,
            "out-dir": str(out / e),
            **FINAL_STEP,
            **({k: LM_PRESETS["tiny"][k] for k in ("train", "val", "test")} if e == "language" else {}),
        }
        for e in experiments
    }
    try:
        cfgs = {e: AppConfig.from_run_config(c) for e, c in configs.items()}  # the rest: pyproject's defaults
    except ConfigError as e:
        ap.error(str(e))
    backbone, data_dir = os.path.abspath(args.backbone), os.path.abspath(args.data_dir)  # --out: made by parse
    import torch

    from potara_guards.safe_files import atomic_write, load_torch_file
    from potara_harness.report import mean

    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = os.path.abspath(args.model) if args.model else random_tiny_model(out / "tiny-llama-random.pt")
    ref = None
    if "vision" in experiments:
        ref, seconds = in_process(cfgs["vision"], backbone, data_dir)
        print(f"in-process: {rounds} rounds in {sum(seconds):.1f} s")
    numel = sum(v.numel() for v in ref.values()) if ref else 21988

    def floor(name: str, imports: str) -> tuple[str, Path, dict]:
        return (
            name,
            FLOOR,
            {"num-clients": k, "rounds": rounds, "numel": numel, "imports": imports, "out-dir": str(out / name)},
        )

    runs = [floor("echo-floor", "")]
    for e in experiments:
        runs += [floor(f"{e}-import-floor", IMPORT_FLOORS[e]), (f"{e}-app", APP, configs[e])]
    caches = [("" if args.no_cache else str(out / "cache" / f"node{i}")) for i in range(k)]
    nodes = [node_config(i, k, backbone, data_dir, model, args.threads, caches[i]) for i in range(k)]
    on_flower(runs, nodes, out, args.superexec_poll)
    echo = mean(floor_rounds(out / "echo-floor"))
    report = {
        "clients": k,
        "rounds": rounds,
        "threads": args.threads,
        "backbone": backbone,
        "model": model,
        "echo_floor_round_s": echo,
        "experiments": {},
    }
    for e in experiments:
        results = read_json(out / e / "results.json")
        flower = breakdown(results)
        entry = {
            "flower": flower,
            **against_floor(flower, mean(floor_rounds(out / f"{e}-import-floor")), echo),
            "adapter_bytes": results["adapter"]["bytes"],
            "adapter_wire_bytes": results["adapter"]["wire_bytes"],
            "flower_stages_s": results["timing_s"],
        }
        if e == "vision":
            got = load_torch_file(out / e / "checkpoint.pt")["fedit"]["global_state"]
            entry["bitwise_equal"] = sorted(got) == sorted(ref) and all(torch.equal(got[n], ref[n]) for n in ref)
            entry["in_process_round_s"] = mean(seconds)
        report["experiments"][e] = entry
    report.update(superexec_poll_s=args.superexec_poll, cache=not args.no_cache, wall_s=time.time() - t0)
    atomic_write(str(out / "flower_bench.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(table(report))
    if ref is not None:
        equal = report["experiments"]["vision"]["bitwise_equal"]
        print(f"vision: final adapters bitwise equal to the in-process run: {equal}")
    print(out / "flower_bench.json")
    return report


if __name__ == "__main__":
    main()
