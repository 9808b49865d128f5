"""Flower on loopback against the in-process loop: the same model, data, seeds and rounds, run both ways;
wall time per FedIT round, and where Flower's time goes (measured by the clients and the server).

    python -m potara_flower.bench --backbone data/backbones/tiny-<key>.pt                # tiny preset, 2 clients, 5 rounds
    python -m potara_flower.bench --backbone B --clients 2 --rounds 5 --out runs/flower-bench

In-process: fed.run_fedit on the clients client_app.py would build (task.client_split, the
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

import torch

from fed import Client, run_fedit
from files import atomic_write
from potara_flower.loopback import LocalFederation
from potara_flower.task import TIMINGS, client_split
from potara_harness.config import VIT_PRESETS, AppConfig, ConfigError
from potara_harness.report import mean
from potara_harness.vit import build_model, load_backbone_file

APP = Path(__file__).resolve().parent  # this folder is the Flower app (pyproject.toml's [tool.flwr.app])


def in_process(cfg: AppConfig, backbone: str, data_dir: str) -> tuple[dict, list[float]]:
    """fed.run_fedit on the same clients and model as the Flower run; (final global adapter, seconds per round)."""
    splits = [client_split(cfg, data_dir, k, cfg.num_clients) for k in range(cfg.num_clients)]
    p = VIT_PRESETS[cfg.preset]
    model = build_model(load_backbone_file(backbone, p["vit"]), p, cfg.rank, cfg.lora_alpha, cfg.seed)
    stamps = [time.perf_counter()]
    state = run_fedit(model, [Client(s.name, s.train_inputs, s.train_targets) for s in splits],
                      cfg.experiment().fed_config(), progress=False,
                      on_round=lambda _: stamps.append(time.perf_counter()))
    return state.global_state, [b - a for a, b in zip(stamps, stamps[1:])]


def on_flower(run_config: dict, backbone: str, data_dir: str, threads: int, folder: Path) -> tuple[dict, dict]:
    """The same run through Flower on loopback; (final global adapter, results.json)."""
    k_total = run_config["num-clients"]
    with LocalFederation(folder / "federation") as fed:
        fed.superlink()
        for k in range(k_total):
            fed.supernode(f"node{k}", f"partition-id={k} num-partitions={k_total} backbone='{backbone}' "
                                      f"data-dir='{data_dir}' threads={threads}")
        status = fed.run(APP, run_config, timeout=3600)
        if status["status"] != "finished:completed":
            raise RuntimeError(f"the Flower run ended {status['status']}:\n{fed.log('superlink')[-3000:]}")
    out = Path(run_config["out-dir"])
    adapter = torch.load(out / "checkpoint.pt", map_location="cpu", weights_only=True)["fedit"]["global_state"]
    return adapter, json.loads((out / "results.json").read_text())


def breakdown(results: dict) -> dict:
    """Mean per round of Flower's wall time and of its parts (clients in parallel: the slowest one's)."""
    rows = []
    for h in results["fedit_history"]:
        clients = h["client_seconds"].values()
        slowest = max(clients, key=lambda c: sum(c.values()), default={})
        parts = {k: slowest.get(k, 0.0) for k in TIMINGS}
        rows.append({"round": h["seconds"], **parts, "messaging": h["seconds"] - sum(parts.values())})
    return {k: mean(r[k] for r in rows) for k in ("round", *TIMINGS, "messaging")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--backbone", required=True, help="a backbone file (vit.py's format, e.g. the tiny preset's cache)")
    ap.add_argument("--clients", type=int, default=2, help="SuperNodes (= clients), every one trained every round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--data", choices=["synthetic", "cifar"], default="synthetic")
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each client and of the in-process run")
    ap.add_argument("--out", default="runs/flower-bench")
    args = ap.parse_args(argv)
    if not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    out = Path(args.out).resolve()
    run_config = {"num-clients": args.clients, "rounds": args.rounds, "data": args.data, "out-dir": str(out / "flower")}
    try:
        cfg = AppConfig.from_run_config(run_config)  # every other setting: pyproject's defaults (the tiny preset)
    except ConfigError as e:
        ap.error(str(e))
    backbone, data_dir = os.path.abspath(args.backbone), os.path.abspath(args.data_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    ref, seconds = in_process(cfg, backbone, data_dir)
    print(f"in-process: {args.rounds} rounds in {sum(seconds):.1f} s")
    got, results = on_flower(run_config, backbone, data_dir, args.threads, out)
    flower = breakdown(results)
    report = {"clients": args.clients, "rounds": args.rounds, "threads": args.threads, "backbone": backbone,
              "adapter_bytes": results["adapter"]["bytes"], "adapter_wire_bytes": results["adapter"]["wire_bytes"],
              "bitwise_equal": sorted(got) == sorted(ref) and all(torch.equal(got[k], ref[k]) for k in ref),
              "in_process_round_s": mean(seconds), "flower": flower, "ratio": flower["round"] / mean(seconds),
              "flower_stages_s": results["timing_s"], "wall_s": time.time() - t0}
    atomic_write(str(out / "flower_bench.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(f"| per FedIT round ({args.clients} clients, {args.threads} thread each) | seconds |\n|---|---|\n"
          f"| in-process (fed.run_fedit) | {mean(seconds):.2f} |\n| Flower on loopback | {flower['round']:.2f} "
          f"({flower['round'] / mean(seconds):.0f}x) |\n"
          + "".join(f"| - {label} | {flower[k]:.2f} |\n" for k, label in (
              ("flower-start", "Flower starts a client process (interpreter, flwr-clientapp, SuperNode hand-shake)"),
              ("imports", "the app's imports (torch, torchvision, the project)"),
              ("handover", "app imported -> handler called (Flower hands over the message)"),
              ("load", "client data + model loading"), ("train", "client local training"),
              ("messaging", "Flower messaging (push, SuperNode polling, pull)"))))
    print(f"Flower stages: {', '.join(f'{k} {v:.1f} s' for k, v in results['timing_s'].items())}; final adapters "
          f"bitwise equal: {report['bitwise_equal']}; adapter {report['adapter_bytes']} bytes "
          f"({report['adapter_wire_bytes']} serialised); {out / 'flower_bench.json'}")
    return report


if __name__ == "__main__":
    main()
