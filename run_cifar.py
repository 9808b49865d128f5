"""Potara on CIFAR-100 with a ViT: the paper's vision experiment end to end on one machine.

    python run_cifar.py --preset tiny                       # small ViT, CPU, offline (the embedded synthetic data)
    python run_cifar.py --preset tiny --data cifar          # the same on real CIFAR-100 (downloaded once, 161 MiB)
    python run_cifar.py --preset paper --data cifar --clients 20   # vit_b_16 (ImageNet weights), 224 px, one GPU
    python run_cifar.py --preset tiny --resume              # continue an interrupted run (same arguments)
    python run_cifar.py --preset tiny --drop-prob 0.2 --max-update-norm 10   # unreliable clients

The tiny preset's work: pre-training the small ViT once (1000 steps of 128 images, cached under --data-dir), then
FedIT 100 rounds x 5 local steps x 5 clients, a FedSA-LoRA run of the same size, 100 local and 25 fine-tuning
steps per client, and Potara and every baseline scored per client (its measured time: docs/vision.md).

Pipeline: data (data.py) -> images no client holds become the public set -> Dirichlet (label skew) or
superclass partition of the rest, each client a train / val / test split -> backbone (paper: torchvision
vit_b_16 with its ImageNet weights; tiny: a small ViT pre-trained here on the public set, cached under
--data-dir and reused) -> a new zero-initialised head and LoRA on the attention q and v (vit.build_model)
-> pipeline.run_experiment: FedIT, FedSA-LoRA, local adapters, Potara and every baseline, each
scored on every client's own test split -> --out DIR: results.json, results.md, checkpoint.pt,
lambda.png and communication.png (when matplotlib is installed).
Images stay uint8 (N, 3, 32, 32) on the CPU; the model resizes and normalises them itself.
"""

from __future__ import annotations

import argparse
import os
import time

from potara_harness import cli, run_folder
from potara_harness.config import VIT_PRESETS

# The command line is parsed and checked before torch loads (--help and a bad option answer at once): this module
# imports torch, torchvision and everything that uses them inside the functions that run after the checks.


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Options showing two values take them from --preset tiny and paper "
        "(VIT_PRESETS in potara_harness/config.py).",
    )
    a = ap.add_argument
    a(
        "--preset",
        choices=sorted(VIT_PRESETS),
        default="tiny",
        help="tiny: small ViT on a CPU; paper: vit_b_16 on a GPU",
    )
    a(
        "--data",
        choices=["synthetic", "cifar"],
        default="synthetic",
        help="synthetic: the embedded offline stand-in in CIFAR-100's layout (data.py); cifar: real CIFAR-100, "
        "downloaded once into --data-dir",
    )
    a("--data-dir", default="data", help="where cifar-100-python/, synthetic/ and cached backbones live")
    a("--out", default=None, help="output folder (default: runs/<preset>-<data>-<partition>-k<clients>-s<seed>)")
    a(
        "--partition",
        choices=["dirichlet", "superclass"],
        default="dirichlet",
        help="dirichlet: label skew (the paper); superclass: each client owns its own CIFAR-100 superclasses",
    )
    a("--clients", type=int, help="number of clients K")
    a("--alpha", type=float, help="Dirichlet concentration (smaller = more skewed)")
    for split in ("train", "val", "test"):
        a(f"--{split}", type=int, help=f"{split} images per client")
    a("--public", type=int, help="images kept out of every client (pre-training the tiny backbone)")
    a("--pretrain-steps", type=int, help="steps of tiny-backbone pre-training on the public images")
    a("--backbone", help="load this saved backbone instead (potara backbone file or a ViT state_dict)")
    a("--synthetic-per-class", type=int, default=500, help="synthetic training images per class (test: a fifth)")
    cli.add_experiment_options(ap)  # training, Potara, evaluation, run control: shared with run_llm.py
    cli.describe_presets(ap, {"--preset tiny": VIT_PRESETS["tiny"], "paper": VIT_PRESETS["paper"]})
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


CIFAR_TRAIN_IMAGES = 50_000  # CIFAR-100's training set (md5-checked: always this many); synthetic: 100 per class x n


def resolve_args(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the preset, and reject every impossible value with a one-line error, before any
    download, pre-training or training: every number in its config.BOUNDS range, the rules between options, the
    images the clients ask for against what the data holds, --backbone, --data-dir and --out."""
    args = ap.parse_args(argv)
    cli.check_bounds(ap, args)  # every number in config.BOUNDS' range, before the preset fills the rest
    p = VIT_PRESETS[args.preset]
    cli.fill_from_preset(args, p)
    cli.check_experiment_options(ap, args)  # the filled numbers in their ranges too, then the rules between options
    if args.clients_per_round > args.clients:
        ap.error(f"--clients-per-round must be <= --clients ({args.clients}), got {args.clients_per_round}")
    if args.partition == "superclass" and args.clients > 20:
        ap.error(f"--partition superclass deals out 20 superclasses: --clients must be <= 20, got {args.clients}")
    images = CIFAR_TRAIN_IMAGES if args.data == "cifar" else 100 * args.synthetic_per_class
    per_client = args.train + args.val + args.test
    if args.public + args.clients * per_client > images:
        source = (
            "CIFAR-100's"
            if args.data == "cifar"
            else f"the synthetic set's (--synthetic-per-class {args.synthetic_per_class})"
        )
        ap.error(
            f"{args.clients} clients x {per_client} images (--train + --val + --test) + {args.public} public images "
            f"> {source} {images:,} training images: lower --clients, --train/--val/--test or --public"
        )
    if args.backbone and not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    if args.preset == "tiny" and not args.backbone and (args.pretrain_steps < 1 or args.public < 1000):
        ap.error(
            "the tiny preset pre-trains its backbone: needs --pretrain-steps >= 1 and --public >= 1000 "
            "(or pass --backbone PATH)"
        )
    args.out = args.out or os.path.join(
        "runs", f"{args.preset}-{args.data}-{args.partition}-k{args.clients}-s{args.seed}"
    )
    run_folder.check_dirs(ap, ("--data-dir", args.data_dir, os.R_OK | os.X_OK))
    run_folder.prepare_out_dir(ap, args.out)
    return args, p


def load_data(args):
    """CIFAR-100 (downloaded when missing) or the synthetic stand-in (written once), checked; DataError in one line."""
    from data import DataError, load_images

    try:
        return load_images(args.data, args.data_dir, args.synthetic_per_class)[0]
    except OSError as e:  # e.g. a read-only --data-dir for the synthetic files
        raise DataError(f"--data-dir {args.data_dir}: {e.strerror or e} ({e.filename or ''})") from None


def get_backbone(args, p: dict, data, public, device):
    """--backbone PATH; else vit_b_16's ImageNet weights (paper); else the cached tiny backbone,
    pre-trained on the public images (indices into data) when no cache file has its key (tiny)."""
    from potara_harness.vit import imagenet_vit_b_16, load_backbone_file, tiny_backbone

    if args.backbone:
        return load_backbone_file(args.backbone, p["vit"]), {"backbone": args.backbone}
    if args.preset == "paper":
        return imagenet_vit_b_16(), {"backbone": "torchvision vit_b_16 IMAGENET1K_V1"}
    desc = {"data": args.data, "synthetic_per_class": args.synthetic_per_class if args.data == "synthetic" else None}
    return tiny_backbone(p, data, public, desc, args.data_dir, args.pretrain_steps, device, args.progress)


def partition(ap: argparse.ArgumentParser, args, data, pool) -> list:
    """Each client's indices into `pool` (numpy arrays): Dirichlet label skew or superclass tasks (one-line error
    if impossible)."""
    from data import DataError, label_partition

    per_client = args.train + args.val + args.test
    if args.public + args.clients * per_client > len(data.labels):
        ap.error(
            f"{args.clients} clients x {per_client} images + {args.public} public images > the "
            f"{len(data.labels)} images available: lower --clients, --train/--val/--test or --public"
        )
    try:
        return label_partition(
            args.partition, data.labels[pool], data.coarse_labels[pool], args.clients, args.alpha, per_client, args.seed
        )
    except DataError as e:
        ap.error(str(e))


def main(argv=None) -> dict:
    ap = build_parser()
    args, p = resolve_args(ap, argv)
    with cli.one_line_errors(), run_folder.out_dir_lock(args.out):  # bad data, backbone or checkpoint: one line, exit 2
        return run(ap, args, p, cli.command_line("run_cifar.py", argv))


def data_source(args) -> str:
    """What the clients' images are, for results.md and results.json."""
    if args.data == "synthetic":
        return (
            f"SYNTHETIC DATA (not CIFAR-100): data.py's generated stand-in in CIFAR-100's layout, "
            f"{args.synthetic_per_class} training images per class, {args.data_dir}/synthetic"
        )
    return f"CIFAR-100 (real), {args.data_dir}/cifar-100-python"


def run(ap: argparse.ArgumentParser, args, p: dict, command: str) -> dict:
    """The run, once the command line is checked: torch and the pipeline load here."""
    device = cli.start_torch(args)
    cli.check_resume(args)  # the checkpoint's training settings, before the data is read or a backbone pre-trained
    import numpy as np
    import torch

    from data import client_splits, public_and_pool
    from potara_harness.pipeline import run_experiment
    from potara_harness.report import markdown_table, results_header
    from potara_harness.vit import build_model

    data = load_data(args)
    public, pool = public_and_pool(len(data.labels), args.public)
    parts = partition(ap, args, data, pool)
    splits = client_splits(data.images, data.labels, pool, parts, (args.train, args.val, args.test), args.seed)
    client_info = {}
    for s in splits:
        counts = np.bincount(s.train_targets.numpy(), minlength=100)
        client_info[s.name] = {
            "train_classes": int((counts > 0).sum()),
            "top_class_share": float(counts.max() / counts.sum()),
        }
    backbone, backbone_info = get_backbone(args, p, data, public, device)
    model = build_model(backbone, p, args.rank, args.lora_alpha, args.seed).to(device)
    config = {
        "args": {k: v for k, v in vars(args).items() if k not in ("progress", "resume", "threads")},
        "synthetic_data": data.synthetic,
        "data_source": data_source(args),
        "command": command,
        "backbone": backbone_info,
        "clients": client_info,
        "device": device.type,
        "torch": torch.__version__,
    }
    t0 = time.time()
    results = run_experiment(
        model,
        splits,
        cli.config_from_args(args),
        args.out,
        resume=args.resume,
        config=config,
        progress=args.progress,
        autocast_dtype=cli.autocast_dtype(device),
    )
    print(results_header(results) + markdown_table(results))
    print("\n" + cli.finished(time.time() - t0, device, args.threads, args.out))
    return results


if __name__ == "__main__":
    cli.run_main(main)
