"""Potara on CIFAR-100 with a ViT: the paper's vision experiment end to end on one machine.

    python run_cifar.py --preset tiny                       # small ViT, 2-core CPU, ~15 min (downloads CIFAR-100)
    python run_cifar.py --preset tiny --data synthetic      # offline: synthetic images in the CIFAR-100 layout
    python run_cifar.py --preset paper --clients 20         # vit_b_16 (ImageNet weights), 224 px, one GPU
    python run_cifar.py --preset tiny --resume              # continue an interrupted run (same arguments)
    python run_cifar.py --preset tiny --drop-prob 0.2 --max-update-norm 10   # unreliable clients

Pipeline: data (data.py) -> images no client holds become the public set -> Dirichlet (label skew) or
superclass partition of the rest, each client a train / val / test split -> backbone (paper: torchvision
vit_b_16 with its ImageNet weights; tiny: a small ViT pre-trained here on the public set, cached under
--data-dir and reused) -> a new zero-initialised head and LoRA on the attention q and v (lora.add_lora)
-> experiment.run_experiment: FedIT, FedSA-LoRA, local adapters, Potara and every baseline, each
scored on every client's own test split -> --out DIR: results.json, results.md, checkpoint.pt,
lambda.png and communication.png (when matplotlib is installed).
Images stay uint8 (N, 3, 32, 32) on the CPU; the model resizes and normalises them itself.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings

# Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads of an
# oversubscribed pool slowed training here 20x. Read when torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import VisionTransformer
from tqdm.auto import tqdm

from data import (DataError, class_split_partition, dirichlet_partition, load_cifar100, split_client,
                  write_synthetic_cifar100)
from experiment import (ClientSplits, ResumeError, add_experiment_options, atomic_write, check_experiment_options,
                        config_from_args, dir_problem, markdown_table, run_experiment)
from lora import add_lora

CIFAR_MEAN, CIFAR_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PRESETS = {  # every default of the CLI, per preset (None: not used by that preset)
    "tiny": dict(vit=dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=96, mlp_dim=192),
                 mean=CIFAR_MEAN, std=CIFAR_STD, public=30000, pretrain_steps=1000, pretrain_lr=2e-3,
                 pretrain_batch=128, clients=5, alpha=0.5, train=400, val=100, test=200, rounds=100, local_steps=5,
                 local_train_steps=100, finetune_steps=25, lr=3e-3, batch_size=32, rank=8, lora_alpha=16),
    "paper": dict(vit=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, public=0, pretrain_steps=None, pretrain_lr=None,
                  pretrain_batch=None, clients=10, alpha=0.5, train=1000, val=100, test=500, rounds=400,
                  local_steps=5, local_train_steps=300, finetune_steps=100, lr=1e-3, batch_size=32, rank=8,
                  lora_alpha=16),
}


class UInt8Images(nn.Module):
    """uint8 (N, 3, 32, 32) -> float in [0, 1] -> bilinear resize to `size` -> (x - mean) / std."""

    def __init__(self, size: int, mean, std):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


class ImageClassifier(nn.Module):
    """UInt8Images in front of a torchvision VisionTransformer (whose head is `vit.heads`)."""

    def __init__(self, vit: VisionTransformer, mean, std):
        super().__init__()
        self.prep, self.vit = UInt8Images(vit.image_size, mean, std), vit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vit(self.prep(x))


def new_head(vit: VisionTransformer, num_classes: int) -> None:
    """Replace the classifier by a zero-initialised one (torchvision's own initialisation of a head)."""
    vit.heads.head = nn.Linear(vit.hidden_dim, num_classes)
    nn.init.zeros_(vit.heads.head.weight)
    nn.init.zeros_(vit.heads.head.bias)


def load_backbone_file(path: str, default_vit: dict | None) -> VisionTransformer:
    """A potara backbone file (arch + weights) or a plain state_dict of the preset's architecture
    (e.g. torchvision's vit_b_16-c6a6e5f1.pth). The old head is dropped."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"error: --backbone {path}: not a readable torch file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or ("format" in obj and not {"vit", "state_dict"} <= obj.keys()):
        raise SystemExit(f"error: --backbone {path}: neither a potara backbone file nor a state_dict")
    arch, state = (obj["vit"], obj["state_dict"]) if "format" in obj else (default_vit, obj)
    vit = VisionTransformer(**arch) if arch else torchvision.models.vit_b_16()
    state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("heads.")]:
        raise SystemExit(f"error: --backbone {path} does not fit the ViT: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    return vit


def imagenet_vit_b_16() -> VisionTransformer:
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    try:
        return torchvision.models.vit_b_16(weights=weights)
    except Exception as e:
        where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise SystemExit(f"error: could not get the ImageNet weights of vit_b_16 (offline? {type(e).__name__}): "
                         f"put {os.path.basename(weights.url)} at {where} or pass --backbone PATH") from None


def pretrain_tiny_backbone(p: dict, images: torch.Tensor, labels: torch.Tensor, device: torch.device, seed: int,
                           progress: bool) -> tuple[VisionTransformer, float]:
    """Full supervised training of the small ViT on the public images (random translation + flip, AdamW
    with warm-up and cosine decay). Returns the backbone and its accuracy on the last 1000 public images (held out)."""
    torch.manual_seed(seed)
    held = min(1000, len(images) // 10)
    vit = VisionTransformer(**p["vit"], num_classes=100)
    model = ImageClassifier(vit, p["mean"], p["std"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["pretrain_lr"], weight_decay=0.05)
    steps, warm = p["pretrain_steps"], max(1, p["pretrain_steps"] // 10)  # linear warm-up, then cosine to 0
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps)))
    g = torch.Generator().manual_seed(seed)
    n_train = len(images) - held
    for _ in tqdm(range(steps), desc="pre-training the tiny backbone", disable=not progress):
        idx = torch.randint(n_train, (p["pretrain_batch"],), generator=g)
        dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
        x = torch.roll(images[idx], (dx, dy), dims=(2, 3))  # random translation (wrapping)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        pred = torch.cat([model(images[i:i + 256].to(device)).argmax(-1).cpu() for i in range(n_train, len(images), 256)])
    return vit.cpu(), float((pred == labels[n_train:]).float().mean())


def get_backbone(args, p: dict, data, public: np.ndarray, device: torch.device) -> tuple[VisionTransformer, dict]:
    """--backbone PATH; else vit_b_16's ImageNet weights (paper); else the cached tiny backbone,
    pre-trained on the public images when no cache file has its key (tiny)."""
    if args.backbone:
        return load_backbone_file(args.backbone, p["vit"]), {"backbone": args.backbone}
    if args.preset == "paper":
        return imagenet_vit_b_16(), {"backbone": "torchvision vit_b_16 IMAGENET1K_V1"}
    key = {"vit": p["vit"], "schedule": "warmup-cosine", "steps": args.pretrain_steps, "lr": p["pretrain_lr"], "batch": p["pretrain_batch"],
           "mean": p["mean"], "std": p["std"], "data": args.data, "synthetic_per_class": args.synthetic_per_class
           if args.data == "synthetic" else None, "public": hashlib.sha256(public.tobytes()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(args.data_dir, "backbones", f"tiny-{digest}.pt")
    if os.path.exists(path):
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
            vit = VisionTransformer(**obj["vit"])
            vit.load_state_dict(obj["state_dict"])
            print(f"tiny backbone: reusing {path} (held-out public accuracy {obj['info']['public_acc']:.3f})")
            return vit, {"backbone": path, **obj["info"]}
        except Exception as e:  # damaged cache entry (atomic writes never leave a partial one): rebuild it
            print(f"tiny backbone: the cached {path} is unreadable ({type(e).__name__}); pre-training it again")
    t0 = time.time()
    vit, acc = pretrain_tiny_backbone({**p, "pretrain_steps": args.pretrain_steps}, data.images[public],
                                      torch.from_numpy(data.labels[public]), device, seed=0, progress=args.progress)
    info = {"public_acc": acc, "public_images": len(public), "pretrain_seconds": time.time() - t0, "key": key}
    obj = {"format": "potara-backbone-v1", "vit": {**p["vit"], "num_classes": 100}, "state_dict": vit.state_dict(),
           "info": info}
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(obj, f))
        saved = f"saved to {path}"
    except OSError as e:
        saved, path = f"NOT cached ({e.strerror or type(e).__name__}: {os.path.dirname(path)})", "(not cached)"
    print(f"tiny backbone: pre-trained on {len(public)} public images in {info['pretrain_seconds']:.0f}s, "
          f"held-out accuracy {acc:.3f}, {saved}")
    return vit, {"backbone": path, **info}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Arguments left at None take the preset's value (see PRESETS in run_cifar.py).")
    a = ap.add_argument
    a("--preset", choices=sorted(PRESETS), default="tiny", help="tiny: small ViT on a CPU; paper: vit_b_16 on a GPU")
    a("--data", choices=["cifar", "synthetic"], default="cifar", help="real CIFAR-100 (downloaded) or the offline synthetic stand-in")
    a("--data-dir", default="data", help="where cifar-100-python/, synthetic/ and cached backbones live")
    a("--out", default=None, help="output folder (default: runs/<preset>-<data>-<partition>-k<clients>-s<seed>)")
    a("--partition", choices=["dirichlet", "superclass"], default="dirichlet",
      help="dirichlet: label skew (the paper); superclass: each client owns its own CIFAR-100 superclasses")
    a("--clients", type=int, help="number of clients K")
    a("--alpha", type=float, help="Dirichlet concentration (smaller = more skewed)")
    for split in ("train", "val", "test"):
        a(f"--{split}", type=int, help=f"{split} images per client")
    a("--public", type=int, help="images kept out of every client (pre-training the tiny backbone)")
    a("--pretrain-steps", type=int, help="steps of tiny-backbone pre-training on the public images")
    a("--backbone", help="load this saved backbone instead (potara backbone file or a ViT state_dict)")
    a("--synthetic-per-class", type=int, default=500, help="synthetic training images per class (test: a fifth)")
    add_experiment_options(ap)  # training, Potara, evaluation, run control: shared with run_llm.py
    return ap


def resolve_args(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the preset, and reject every impossible value with a one-line error."""
    args = ap.parse_args(argv)
    p = PRESETS[args.preset]
    for k, v in p.items():
        if getattr(args, k, "absent") is None:
            setattr(args, k, v)
    for k in ("clients", "train", "val", "test", "synthetic_per_class"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if not (args.alpha > 0 and math.isfinite(args.alpha)):
        ap.error(f"--alpha must be a positive number, got {args.alpha}")
    if args.public < 0:
        ap.error(f"--public must be >= 0, got {args.public}")
    check_experiment_options(ap, args)
    if not 0 <= args.clients_per_round <= args.clients:
        ap.error(f"--clients-per-round must be in [0, --clients={args.clients}], got {args.clients_per_round}")
    if args.partition == "superclass" and args.clients > 20:
        ap.error(f"--partition superclass deals out 20 superclasses: --clients must be <= 20, got {args.clients}")
    if args.data == "synthetic" and args.synthetic_per_class < 5:
        ap.error("--synthetic-per-class must be >= 5 (the synthetic test set holds a fifth of it)")
    if args.backbone and not os.path.isfile(args.backbone):
        ap.error(f"--backbone {args.backbone}: no such file")
    if args.preset == "tiny" and not args.backbone and (args.pretrain_steps < 1 or args.public < 1000):
        ap.error("the tiny preset pre-trains its backbone: needs --pretrain-steps >= 1 and --public >= 1000 "
                 "(or pass --backbone PATH)")
    args.out = args.out or os.path.join("runs", f"{args.preset}-{args.data}-{args.partition}-k{args.clients}-s{args.seed}")
    for flag, path, mode in (("--data-dir", args.data_dir, os.R_OK | os.X_OK), ("--out", args.out, os.W_OK | os.X_OK)):
        problem = dir_problem(path, mode)
        if problem:
            ap.error(f"{flag} {path}: {problem}")
    return args, p


def check_data(data, where: str) -> None:
    """Images and labels as the pipeline needs them (foreign or edited files fail here, in one line)."""
    n, problem = len(data.labels), None
    if data.images.dtype != torch.uint8 or data.images.dim() != 4 or tuple(data.images.shape[1:]) != (3, 32, 32):
        problem = f"images are {data.images.dtype} {tuple(data.images.shape)}, expected uint8 (N, 3, 32, 32)"
    elif len(data.images) != n or len(data.coarse_labels) != n:
        problem = f"{len(data.images)} images, {n} labels and {len(data.coarse_labels)} superclass labels"
    elif n and not (0 <= data.labels.min() and data.labels.max() < 100):
        problem = f"labels outside 0..99 (min {data.labels.min()}, max {data.labels.max()})"
    elif n and not (0 <= data.coarse_labels.min() and data.coarse_labels.max() < 20):
        problem = "superclass labels outside 0..19"
    if problem:
        raise SystemExit(f"error: the CIFAR-100 files under {where} are malformed: {problem}")


def main(argv=None) -> dict:
    ap = build_parser()
    args, p = resolve_args(ap, argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func's SDPA fallback (Fisher)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        root = args.data_dir
        if args.data == "synthetic":
            root = os.path.join(args.data_dir, "synthetic")
            write_synthetic_cifar100(root, args.synthetic_per_class, args.synthetic_per_class // 5)
        data = load_cifar100(root)
    except (DataError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    check_data(data, root)
    n = len(data.labels)
    per_client = args.train + args.val + args.test
    if args.public + args.clients * per_client > n:
        ap.error(f"{args.clients} clients x {per_client} images + {args.public} public images > the {n} images "
                 "available: lower --clients, --train/--val/--test or --public")
    order = np.random.default_rng(12345).permutation(n)  # fixed: the public set (and so the backbone) is seed-free
    public, pool = np.sort(order[:args.public]), np.sort(order[args.public:])
    try:
        parts = (dirichlet_partition(data.labels[pool], args.clients, args.alpha, per_client, args.seed)
                 if args.partition == "dirichlet" else
                 class_split_partition(data.labels[pool], data.coarse_labels[pool], args.clients, per_client, args.seed))
    except DataError as e:
        ap.error(str(e))
    splits, client_info = [], {}
    for k, part in enumerate(parts):
        tr, va, te = (pool[i] for i in split_client(part, (args.train, args.val, args.test), seed=args.seed * 1000 + k))
        x = lambda idx: data.images[torch.from_numpy(idx)]
        y = lambda idx: torch.from_numpy(data.labels[idx])
        splits.append(ClientSplits(f"client{k}", x(tr), y(tr), x(va), y(va), x(te), y(te)))
        counts = np.bincount(data.labels[tr], minlength=100)
        client_info[f"client{k}"] = {"train_classes": int((counts > 0).sum()),
                                     "top_class_share": float(counts.max() / counts.sum())}
    vit, backbone_info = get_backbone(args, p, data, public, device)
    new_head(vit, 100)
    model = ImageClassifier(vit, p["mean"], p["std"])
    torch.manual_seed(args.seed)  # phi_0, the initial adapter every client and the server share
    add_lora(model, ["self_attention"], r=args.rank, alpha=args.lora_alpha, trainable=["vit.heads"])
    model.to(device)
    cfg = config_from_args(args)
    config = {"args": {k: v for k, v in vars(args).items() if k not in ("progress", "resume", "threads")},
              "synthetic_data": data.synthetic, "backbone": backbone_info, "clients": client_info,
              "device": device.type, "torch": torch.__version__}
    t0 = time.time()
    try:
        results = run_experiment(model, splits, cfg, args.out, resume=args.resume, config=config,
                                 progress=args.progress, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    except ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    print(("SYNTHETIC DATA (not CIFAR-100)\n" if data.synthetic else "") + markdown_table(results))
    print(f"\n{time.time() - t0:.0f}s on {device} ({args.threads} threads); results in {args.out}/results.json")
    return results


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the checkpoint is written after every round and client: nothing is lost
        raise SystemExit("interrupted: rerun the same command with --resume to continue") from None
