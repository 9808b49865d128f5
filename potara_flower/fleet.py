"""Many devices and a restart, on loopback: what an operator sees beyond three SuperNodes. Not a test (slow).

    python -m potara_flower.fleet --backbone data/backbones/tiny-3ed7fae472e8.pt                  # K = 3, 6, 10
    python -m potara_flower.fleet --backbone B --nodes 3 6 10 --clients-per-round 2 --rounds 3 --restart

For each K of --nodes: a SuperLink and K SuperNodes on 127.0.0.1 (loopback.LocalFederation), the vision app
for --rounds rounds with clients-per-round < K (fed.sample_clients draws who trains), then its final
step. Reported per K: the final global adapter against fed.run_fedit in this process with the same
sampling (bitwise), the server's seconds per round (the ServerApp's own clock), the ServerApp process's
peak resident memory (it reports it in results.json) and the SuperLink's (VmHWM from /proc while it runs).

--restart: TLS and SuperNode authentication (every device's key registered), --restart-nodes SuperNodes,
every client trained every round, at least 4 rounds; once the checkpoint of round 1 is written, client 1's
SuperNode is SIGKILLed (its process group: the device and its ClientApp) and, as soon as the SuperLink lists
it offline (flwr 1.42 refuses to activate a node it still counts online), started again with the same key
and node config. Reported: the rounds client 1 took part in and those it failed, whether it is in the final
results, the seconds from the kill to the node listed offline and from the restart to it online again, and
(when it failed no round) bitwise equality with the uninterrupted in-process run.
Output: a table on stdout and --out/fleet.json (atomic).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from potara_flower.bench import APP, in_process, read_json
from potara_flower.loopback import LocalFederation, wait_for
from potara_guards.safe_files import load_torch_file
from potara_harness import cli, run_folder
from potara_harness.config import AppConfig, ConfigError

FINAL_STEP = {"local-train-steps": 5, "finetune-steps": 5, "fisher-samples": 20}  # not what is measured here


def node_config(k: int, K: int, backbone: str, data_dir: str, folder: Path) -> str:
    """Client k's device: the backbone, the data, its split kept between messages (cache-dir, in the run's
    folder: nothing is written beside the data), one thread."""
    cache = os.path.join(folder, "cache", f"node{k}")
    return (
        f"partition-id={k} num-partitions={K} backbone='{backbone}' data-dir='{data_dir}' threads=1 cache-dir='{cache}'"
    )


def vm_hwm_mb(pid: int) -> float:
    """A live process's peak resident memory (VmHWM), MB; 0 once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def final_adapter(out: Path) -> dict:
    return load_torch_file(out / "checkpoint.pt")["fedit"]["global_state"]  # weights only, a bounded regular file


def bitwise(a: dict, b: dict) -> bool:
    import torch

    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in b)


def many_nodes(K: int, run: dict, backbone: str, data_dir: str, folder: Path) -> dict:
    """One federation of K SuperNodes, one run of the vision app; its figures."""
    out, hwm = folder / "out", [0.0]
    config = {**run, "num-clients": K, "out-dir": str(out)}
    cfg = AppConfig.from_run_config(config)
    reference, _ = in_process(cfg, backbone, data_dir)
    with LocalFederation(folder / "federation") as fed:
        link = fed.superlink()
        for k in range(K):
            fed.supernode(f"node{k}", node_config(k, K, backbone, data_dir, folder))
        t0 = time.time()
        status = fed.run(APP, config, timeout=3600, during=lambda _: hwm.append(vm_hwm_mb(link.pid)))
        wall = time.time() - t0
        hwm.append(vm_hwm_mb(link.pid))
    if status["status"] != "finished:completed":
        raise RuntimeError(f"K = {K}: the run ended {status['status']}")
    results = read_json(out / "results.json")
    rounds = [h["seconds"] for h in results["fedit_history"]]
    return {
        "nodes": K,
        "clients_per_round": cfg.clients_per_round,
        "bitwise_equal": bitwise(final_adapter(out), reference),
        "participants": [h["clients"] for h in results["fedit_history"]],
        "failed": [h["failed"] for h in results["fedit_history"]],
        "server_round_s": sum(rounds) / len(rounds),
        "serverapp_peak_rss_mb": results["server_peak_rss_mb"],
        "superlink_peak_rss_mb": max(hwm),
        "run_wall_s": wall,
        "stages_s": results["timing_s"],
    }


def restart(K: int, run: dict, backbone: str, data_dir: str, folder: Path) -> dict:
    """K authenticated SuperNodes; client 1's killed after round 1 and started again with its key and node config."""
    from potara_flower.loopback import tls_and_keys

    folder.mkdir(parents=True, exist_ok=True)
    names = tuple(f"node{k}" for k in range(K))
    tls, out = tls_and_keys(folder, names), folder / "out"
    config = {**run, "num-clients": K, "clients-per-round": 0, "rounds": max(run["rounds"], 4), "out-dir": str(out)}
    reference, _ = in_process(AppConfig.from_run_config(config), backbone, data_dir)
    events: dict[str, float] = {}
    with LocalFederation(folder / "federation", tls=tls) as fed:
        fed.superlink("--enable-supernode-auth")
        for name in names:
            assert fed.flwr("supernode", "register", str(folder / f"{name}.pub"), "local").get("success"), name
        key = lambda k: ("--auth-supernode-private-key", str(folder / names[k]))
        nodes = [fed.supernode(names[k], node_config(k, K, backbone, data_dir, folder), *key(k)) for k in range(K)]
        listing = lambda: {n["node-id"]: n for n in fed.flwr("supernode", "list", "local")["nodes"]}
        wait_for(lambda: sum(n["status"] == "online" for n in listing().values()) == K, 120, f"{K} nodes online")
        before = listing()

        def during(_status: dict) -> None:
            # flwr 1.42 activates a node only when it is registered or offline (LinkState.activate_node): a SuperNode
            # started again while the SuperLink still counts the dead one online is refused and exits (code 305), so
            # the restart waits until the SuperLink has marked it offline (2 missed heartbeats)
            if "killed" not in events and (out / "checkpoint.pt").exists():  # round 1 is written (atomically)
                os.killpg(nodes[1].pid, signal.SIGKILL)
                nodes[1].wait(30)
                events["killed"] = time.time()
            elif "killed" in events and "restarted" not in events:
                if any(n["status"] == "offline" for n in listing().values()):
                    events["offline"] = time.time()
                    nodes[1] = fed.supernode("node1-restarted", node_config(1, K, backbone, data_dir, folder), *key(1))
                    events["restarted"] = time.time()
            elif "restarted" in events and "online_again" not in events:
                if sum(n["status"] == "online" for n in listing().values()) == K:
                    events["online_again"] = time.time()

        status = fed.run(APP, config, timeout=3600, poll=0.5, during=during)
        after = listing()
    results = read_json(out / "results.json")
    history = results["fedit_history"]
    took_part = [t + 1 for t, h in enumerate(history) if "client1" in h["clients"] and "client1" not in h["dropped"]]
    failed = [t + 1 for t, h in enumerate(history) if any(f["client"] == "client1" for f in h["failed"])]
    return {
        "nodes": K,
        "status": status["status"],
        "node_ids_kept": sorted(after) == sorted(before),
        "client1_trained_in_rounds": took_part,
        "client1_failed_in_rounds": failed,
        "client1_failures": [f for h in history for f in h["failed"] if f["client"] == "client1"],
        "client1_in_results": "client1" in results["clients"],
        "kill_to_offline_s": events["offline"] - events["killed"] if "offline" in events else None,
        "restart_to_online_s": events["online_again"] - events["restarted"] if "online_again" in events else None,
        "restarted_node_exit_code": nodes[1].poll() if "restarted" in events else None,
        "bitwise_equal_to_uninterrupted": bitwise(final_adapter(out), reference) if not failed else None,
        "server_round_s": [h["seconds"] for h in history],
    }


OUTPUT_FILES = ("fleet.json",)  # in --out, beside one folder per run: K<K>/ and restart/


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter)
    ap.add_argument("--backbone", required=True, help="a backbone file (vit.py's format, e.g. the tiny preset's cache)")
    ap.add_argument(
        "--nodes",
        type=int,
        nargs="*",
        default=[3, 6, 10],
        help="SuperNodes K, one federation each (none: --restart only)",
    )
    ap.add_argument("--clients-per-round", type=int, default=2, help="clients trained each round (< every K)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data-dir", default="data")
    ap.add_argument("--restart", action="store_true", help="also the restart run (TLS, authenticated SuperNodes)")
    ap.add_argument("--restart-nodes", type=int, default=3)
    ap.add_argument("--out", default="runs/flower-fleet")
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


def main(argv=None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    # --nodes and --restart-nodes: 2 to 64 each (config.BOUNDS, at parse time); what depends on them, here
    if not 1 <= args.clients_per_round < min(args.nodes, default=65):
        ap.error("--clients-per-round: 1 to below the smallest K of --nodes")
    if not 1 <= args.rounds <= 100 or args.rounds < 2 and args.restart:
        ap.error("--rounds: 1 to 100 (2 or more with --restart)")
    run = {"rounds": args.rounds, "clients-per-round": args.clients_per_round, "drop-prob": 0.0, **FINAL_STEP}
    run["round-timeout"] = 120.0  # a dead device is reported by the SuperLink in under a minute
    try:
        AppConfig.from_run_config({**run, "num-clients": max(args.nodes)})
    except ConfigError as e:
        ap.error(str(e))
    folders = [f"K{K}" for K in args.nodes] + ["restart"] * args.restart
    run_folder.prepare_out_dir(ap, args.out, files=OUTPUT_FILES, dirs=(), folders=tuple(folders))  # before any run
    with run_folder.out_dir_lock(args.out, files=OUTPUT_FILES):  # a second fleet on the same --out: one line
        return measure(args, run)


def measure(args: argparse.Namespace, run: dict) -> dict:
    """The federations of the checked command line and their report (fleet.json, a table)."""
    import torch

    from potara_guards.safe_files import atomic_write

    torch.set_num_threads(1)  # as every device runs (threads=1): the same kernels, the same sums
    out = Path(args.out).resolve()  # made and checked by main (run_folder.prepare_out_dir)
    backbone, data_dir = os.path.abspath(args.backbone), os.path.abspath(args.data_dir)
    report = {"rounds": args.rounds, "many_nodes": [], "restart": None}
    for K in args.nodes:
        report["many_nodes"].append(many_nodes(K, run, backbone, data_dir, out / f"K{K}"))
        print(json.dumps(report["many_nodes"][-1]))
    if args.restart:
        report["restart"] = restart(args.restart_nodes, run, backbone, data_dir, out / "restart")
        print(json.dumps(report["restart"]))
    atomic_write(str(out / "fleet.json"), lambda f: f.write(json.dumps(report, indent=1).encode()))
    print(
        "| K SuperNodes | clients per round | bitwise = in-process | server s/round | ServerApp peak MB | "
        "SuperLink peak MB |\n|---|---|---|---|---|---|"
    )
    for r in report["many_nodes"]:
        print(
            f"| {r['nodes']} | {r['clients_per_round']} | {r['bitwise_equal']} | {r['server_round_s']:.1f} | "
            f"{r['serverapp_peak_rss_mb']:.0f} | {r['superlink_peak_rss_mb']:.0f} |"
        )
    print(out / "fleet.json")
    return report


if __name__ == "__main__":
    main()
