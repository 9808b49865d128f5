"""Scale benchmark: what a run costs as the number of clients K grows. Not a timed test.

    python -m potara_studies.scale                          # tiny preset at K = 5..100, paper preset at K = 5..20
    python -m potara_studies.scale --preset tiny --clients 5 10 --out runs/scale.json

Each (preset, K) is one pipeline.run_experiment in its own process (so its peak resident memory is its own),
on random client data (no download) and a backbone with RANDOM weights (no pre-training, no download): the
costs, not the accuracies, are measured. Per run:
  time / client      wall time of run_experiment (every stage: FedIT, FedSA-LoRA, local adapters, evaluation,
                     communication curve, outputs) divided by K; and its CPU time (user + system) divided by K,
                     which a machine shared with other jobs disturbs less
  peak RSS           the process's maximum resident set (getrusage ru_maxrss), backbone included
  bytes written      every file the run wrote, counted where it writes them (safe_files.atomic_write: checkpoint.pt
                     each round, each part file once, the results), in total and per client
  checkpoint         the largest checkpoint.pt the run wrote (FedSA-LoRA's rounds hold K private parts)
and the table gives each as a ratio to the preset's smallest K. What linear growth looks like: time / client,
bytes / client and checkpoint / client flat (ratio ~1), peak RSS flat (one backbone; a client's adapters are
read from its files when used, never all held).

Presets, reduced to fit a 2-core CPU in minutes (the ratios are what matters; say so when quoting):
  tiny   vit.py's tiny ViT (4 x 96, 32 px), LoRA r = 8 on q/v + a 100-class head
  paper  torchvision vit_b_16 (12 x 768, 86M parameters, random weights), LoRA r = 32 on q/v + head: a 5 MB
         adapter (run_cifar.py's paper preset adapts at rank 8); at 32 px instead of 224 (5 tokens instead of 197:
         the backbone's size is the paper's, the compute per image is not)
Both at 2 FedIT + 2 FedSA-LoRA rounds of 1 local step, 2 local and 2 fine-tuning steps, 8 train / 8 val /
8 test images per client, the 21-point grid.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

from potara_harness import cli, run_folder

RUN = dict(
    rounds=2,
    local_steps=1,
    local_train_steps=2,
    finetune_steps=2,
    batch_size=4,
    fisher_samples=8,
    grid_step=0.05,
    snapshots=2,
    lr=1e-3,
)
SPLIT = (8, 8, 8)  # train, val, test images per client
PRESETS = {"tiny": dict(rank=8, alpha=16, image_size=32), "paper": dict(rank=32, alpha=64, image_size=32)}
DEFAULT_K = {"tiny": [5, 10, 20, 40, 100], "paper": [5, 10, 20]}


def build(preset: str):
    """The preset's model with random weights and its LoRA adapter (vit.build_model), and the image size."""
    import torch
    from torchvision.models import VisionTransformer, vit_b_16

    from potara_harness.config import TINY_VIT, VIT_PRESETS
    from potara_harness.vit import build_model

    torch.manual_seed(0)
    p, s = VIT_PRESETS[preset], PRESETS[preset]
    vit = (
        VisionTransformer(**TINY_VIT, num_classes=100)
        if preset == "tiny"
        else vit_b_16(weights=None, image_size=s["image_size"])
    )
    return build_model(vit, p, s["rank"], s["alpha"], seed=0), s["image_size"]


def client_data(K: int, image_size: int) -> list:
    """K clients of random images and labels (data.ClientSplits), SPLIT images each."""
    import torch

    from data import ClientSplits

    g, (tr, va, te) = torch.Generator().manual_seed(1), SPLIT
    x = lambda n: torch.randn(n, 3, image_size, image_size, generator=g)
    y = lambda n: torch.randint(0, 100, (n,), generator=g)
    return [ClientSplits(f"client{k}", x(tr), y(tr), x(va), y(va), x(te), y(te)) for k in range(K)]


def one_run(preset: str, K: int, out: str) -> dict:
    """One run_experiment in this process; its costs (module docstring)."""
    import torch

    from lora import lora_state_dict
    from potara_harness import checkpoint, report
    from potara_harness.config import ExperimentConfig
    from potara_harness.pipeline import run_experiment

    torch.set_num_threads(1)
    written = {"bytes": 0, "files": 0, "checkpoint_max": 0}
    real = report.atomic_write

    def counting(path, write):
        real(path, write)
        size = os.path.getsize(path)
        written["bytes"] += size
        written["files"] += 1
        if os.path.basename(path) == "checkpoint.pt":
            written["checkpoint_max"] = max(written["checkpoint_max"], size)

    model, size = build(preset)
    splits = client_data(K, size)
    cpu = lambda: (lambda u: u.ru_utime + u.ru_stime)(resource.getrusage(resource.RUSAGE_SELF))
    checkpoint.atomic_write = report.atomic_write = counting
    try:
        t0, c0 = time.perf_counter(), cpu()
        run_experiment(model, splits, ExperimentConfig(**RUN), out, progress=False)
        seconds, cpu_seconds = time.perf_counter() - t0, cpu() - c0
    finally:
        checkpoint.atomic_write = report.atomic_write = real
    return {
        "preset": preset,
        "clients": K,
        "seconds": seconds,
        "seconds_per_client": seconds / K,
        "cpu_seconds_per_client": cpu_seconds / K,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "bytes_written": written["bytes"],
        "bytes_per_client": written["bytes"] / K,
        "files_written": written["files"],
        "checkpoint_max_bytes": written["checkpoint_max"],
        "adapter_bytes": sum(v.numel() * v.element_size() for v in lora_state_dict(model).values()),
    }


def ratios_table(rows: list[dict]) -> str:
    """Markdown: per preset, each K's figures and their ratio to the preset's smallest K."""
    lines = [
        "| preset | K | wall / client | CPU / client | peak RSS | bytes written (/ client) "
        "| largest checkpoint.pt (/ client) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset in dict.fromkeys(r["preset"] for r in rows):
        mine = sorted((r for r in rows if r["preset"] == preset), key=lambda r: r["clients"])
        b = mine[0]
        rel = lambda r, k, base: f"{r[k] / base[k]:.2f}x"
        for r in mine:
            lines.append(
                f"| {preset} | {r['clients']} | {r['seconds_per_client']:.2f} s ({rel(r, 'seconds_per_client', b)}) "
                f"| {r['cpu_seconds_per_client']:.2f} s ({rel(r, 'cpu_seconds_per_client', b)}) "
                f"| {r['peak_rss_mb']:.0f} MB ({rel(r, 'peak_rss_mb', b)}) "
                f"| {r['bytes_written'] / 1e6:.1f} MB ({r['bytes_per_client'] / 1e6:.2f} MB, "
                f"{rel(r, 'bytes_per_client', b)}) "
                f"| {r['checkpoint_max_bytes'] / 1e6:.1f} MB ({r['checkpoint_max_bytes'] / r['clients'] / 1e6:.2f} MB, "
                f"{r['checkpoint_max_bytes'] / r['clients'] / (b['checkpoint_max_bytes'] / b['clients']):.2f}x) |"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(description=__doc__.splitlines()[0], formatter_class=cli.HelpFormatter)
    ap.add_argument("--preset", choices=["tiny", "paper", "both"], default="both")
    ap.add_argument("--clients", type=int, nargs="+", help="K values (default: tiny 5 10 20 40 100, paper 5 10 20)")
    ap.add_argument("--out", default="runs/scale.json", help="the measurements, as JSON")
    ap.add_argument("--one", nargs=3, metavar=("PRESET", "K", "DIR"), help=argparse.SUPPRESS)  # the child process
    cli.bound_numbers(ap)  # --clients: run_cifar.py's range (config.BOUNDS), checked as it is parsed
    return ap


def main(argv=None) -> list[dict]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one_run(args.one[0], int(args.one[1]), args.one[2])))
        return []
    run_folder.prepare_out_file(ap, args.out)  # its folder made now, no link where the JSON goes: before any run
    rows = measure(args)
    print(ratios_table(rows))
    from potara_harness.report import write_text  # torch: the children's, loaded here at the end only

    measured = {"load_average": os.getloadavg(), "run": RUN, "split": SPLIT, "rows": rows}
    write_text(args.out, json.dumps(measured, indent=1))  # atomic, never through a link
    return rows


def measure(args) -> list[dict]:
    """One child process per preset x K (a fresh process: its peak memory is its own), in a temporary folder."""
    rows, root = [], tempfile.mkdtemp(prefix="potara-scale-")
    try:
        for preset in ["tiny", "paper"] if args.preset == "both" else [args.preset]:
            for K in args.clients or DEFAULT_K[preset]:
                cmd = [
                    sys.executable,
                    "-m",
                    "potara_studies.scale",
                    "--one",
                    preset,
                    str(K),
                    os.path.join(root, f"{preset}-{K}"),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    raise SystemExit(f"error: {preset} K={K} failed: {done.stderr.strip().splitlines()[-1:]}")
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"{preset} K={K}: {rows[-1]['seconds']:.1f} s", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    main()
