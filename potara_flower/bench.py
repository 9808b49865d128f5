"""Flower on loopback against the in-process loop: the same model, data, seeds and rounds, run both ways;
wall time per FedIT round, and where Flower's time goes (measured by the clients and the server).

    python -m potara_flower.bench --backbone data/backbones/tiny-3ed7fae472e8.pt                # tiny preset, 2
    clients, 5 rounds
    python -m potara_flower.bench --backbone B --clients 2 --rounds 5 --out runs/flower-bench

In-process: fedit.run_fedit on the clients client_app.py would build (task.client_split, the
backbone file, vit.build_model), timed per round. Flower: loopback.LocalFederation (a SuperLink and
--clients SuperNodes on 127.0.0.1, each SuperNode's clients on --threads torch threads), `flwr run` of
this folder with the same run config; per round the server's wall time, and from every client (Flower
starts a process per message) how long Flower took to start its process, the app's imports, the
hand-over of the message, data and model loading, and local training (client_app.startup_seconds).
What is left of a round is Flower's messaging (push, the SuperNodes' polling, pull), taken against the
slowest client. The final global adapters of both runs are compared bitwise.
Output: a table on stdout and --out/flower_bench.json (atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from potara_flower.loopback import LocalFederation
from potara_harness import cli
from potara_harness.config import VIT_PRESETS, AppConfig, ConfigError

# The command line is checked before torch loads (--help and a bad option answer at once): torch and what uses it
# are imported inside the functions that run after the checks.

APP = Path(__file__).resolve().parents[1]  # the repository root holds the Flower app (pyproject.toml's [tool.flwr.app])
FLOOR = Path(__file__).resolve().parent / "floor"  # the trivial app: its ClientApp returns its input at once
GOAL = 1.25  # the app's round within GOAL x the floor's round plus its own training time


def in_process(cfg: AppConfig, backbone: str, data_dir: str) -> tuple[dict, list[float]]:
    """fedit.run_fedit on the same clients and model as the Flower run; (final global adapter, seconds per round)."""
    from potara.fedit import Client, run_fedit
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


def on_flower(
    run_config: dict,
    backbone: str,
    data_dir: str,
    threads: int,
    folder: Path,
    cache: bool,
    superexec_poll: float | None,
    numel: int,
) -> tuple[dict, dict, list[float]]:
    """The floor app, then the same run as in_process, through Flower on one loopback federation; (final
    global adapter, results.json, the floor's seconds per round)."""
    import torch

    k_total = run_config["num-clients"]
    with LocalFederation(folder / "federation") as fed:
        if superexec_poll is not None:  # the SuperNodes' SuperExec inherits it (flwr's default: 1 s)
            fed.env["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(superexec_poll)
        fed.superlink()
        for k in range(k_total):
            fed.supernode(
                f"node{k}",
                f"partition-id={k} num-partitions={k_total} backbone='{backbone}' "
                f"data-dir='{data_dir}' threads={threads}"
                + (f" cache-dir='{folder / 'cache' / f'node{k}'}'" if cache else ""),
            )
        floor_out = folder / "floor"
        for app, config in (
            (
                FLOOR,
                {"num-clients": k_total, "rounds": run_config["rounds"], "numel": numel, "out-dir": str(floor_out)},
            ),
            (APP, run_config),
        ):
            status = fed.run(app, config, timeout=3600)
            if status["status"] != "finished:completed":
                raise RuntimeError(f"{app.name} ended {status['status']}:\n{fed.log('superlink')[-3000:]}")
    out = Path(run_config["out-dir"])
    adapter = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["fedit"]["global_state"]
    floor = [r["seconds"] for r in json.loads((floor_out / "floor.json").read_text())["rounds"]]
    return adapter, json.loads((out / "results.json").read_text()), floor


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


def against_floor(flower: dict, floor_round: float) -> dict:
    """The app's round against the floor's: the ratio, and the goal app <= GOAL x floor + the app's training."""
    bound = GOAL * floor_round + flower["train"]
    return {
        "floor_round_s": floor_round,
        "ratio_to_floor": flower["round"] / floor_round,
        "goal_bound_s": bound,
        "goal_met": flower["round"] <= bound,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    ap.add_argument("--backbone", required=True, help="a backbone file (vit.py's format, e.g. the tiny preset's cache)")
    ap.add_argument("--clients", type=int, default=2, help="SuperNodes (= clients), every one trained every round")
    ap.add_argument("--rounds", type=int, default=5)
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
    args = ap.parse_args(argv)
    if not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    if args.superexec_poll is not None and not 0.01 <= args.superexec_poll <= 60:
        ap.error(f"--superexec-poll {args.superexec_poll}: flwr takes 0.01 to 60 seconds")
    out = Path(args.out).resolve()
    run_config = {"num-clients": args.clients, "rounds": args.rounds, "data": args.data, "out-dir": str(out / "flower")}
    try:
        cfg = AppConfig.from_run_config(run_config)  # every other setting: pyproject's defaults (the tiny preset)
    except ConfigError as e:
        ap.error(str(e))
    backbone, data_dir = os.path.abspath(args.backbone), os.path.abspath(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    import torch

    from potara.safe_files import atomic_write
    from potara_harness.report import mean

    torch.set_num_threads(args.threads)
    t0 = time.time()
    ref, seconds = in_process(cfg, backbone, data_dir)
    print(f"in-process: {args.rounds} rounds in {sum(seconds):.1f} s")
    got, results, floor = on_flower(
        run_config,
        backbone,
        data_dir,
        args.threads,
        out,
        not args.no_cache,
        args.superexec_poll,
        sum(v.numel() for v in ref.values()),
    )
    flower = breakdown(results)
    vs_floor = against_floor(flower, mean(floor))
    report = {
        "clients": args.clients,
        "rounds": args.rounds,
        "threads": args.threads,
        "backbone": backbone,
        "adapter_bytes": results["adapter"]["bytes"],
        "adapter_wire_bytes": results["adapter"]["wire_bytes"],
        "bitwise_equal": sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref),
        "in_process_round_s": mean(seconds),
        "flower": flower,
        "ratio": flower["round"] / mean(seconds),
        "floor_rounds_s": floor,
        **vs_floor,
        "superexec_poll_s": args.superexec_poll,
        "cache": not args.no_cache,
        "flower_stages_s": results["timing_s"],
        "wall_s": time.time() - t0,
    }
    atomic_write(str(out / "flower_bench.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(
        f"| per FedIT round ({args.clients} clients, {args.threads} thread each) | seconds |\n|---|---|\n"
        f"| in-process (fedit.run_fedit) | {mean(seconds):.2f} |\n| Flower on loopback | {flower['round']:.2f} "
        f"({flower['round'] / mean(seconds):.0f}x) |\n"
        + "".join(
            f"| - {label} | {flower[k]:.2f} |\n"
            for k, label in (
                ("flower-start", "Flower starts a client process (interpreter, flwr-clientapp, SuperNode hand-shake)"),
                ("imports", "the app's imports (torch, torchvision, the project)"),
                ("handover", "app imported -> handler called (Flower hands over the message)"),
                ("load", "client data + model loading"),
                ("train", "client local training"),
                ("messaging", "Flower messaging (push, SuperNode polling, pull)"),
            )
        )
        + f"| Flower's floor (a ClientApp that returns its input, same federation) | {mean(floor):.2f} |\n"
        f"| app / floor | {vs_floor['ratio_to_floor']:.2f}x (goal: app <= {GOAL} x floor + training = "
        f"{vs_floor['goal_bound_s']:.2f} s: {'met' if vs_floor['goal_met'] else 'not met'}) |"
    )
    print(
        f"Flower stages: {', '.join(f'{k} {v:.1f} s' for k, v in results['timing_s'].items())}; final adapters "
        f"bitwise equal: {report['bitwise_equal']}; adapter {report['adapter_bytes']} bytes "
        f"({report['adapter_wire_bytes']} serialised); {out / 'flower_bench.json'}"
    )
    return report


if __name__ == "__main__":
    main()
