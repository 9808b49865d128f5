"""The vision model: a torchvision VisionTransformer behind a uint8-image front end, its presets, and its
backbone (ImageNet vit_b_16 for the paper's setting; a small ViT pre-trained here on public CIFAR images,
cached, for a CPU).

    p = config.VIT_PRESETS["tiny"]                          # every default of run_cifar.py, per preset
    backbone, info = tiny_backbone(p, data, public, {"data": "synthetic", ...}, "data", 1000, device, True)
    model = build_model(backbone, p, rank=8, lora_alpha=16, seed=0)   # zero head + LoRA on q, v

Images stay uint8 (N, 3, 32, 32) on the CPU; the model resizes and normalises them itself.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models import VisionTransformer

from data import DataError
from fed import progress_bar
from lora import add_lora
from potara_guards.safe_files import load_torch_file
from potara_guards.tensor_checks import AdapterError, check_tensors
from potara_harness.pretrain import cache_path, cached_pretrain, step, warmup_cosine

NUM_CLASSES = 100


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


def build_model(
    backbone: VisionTransformer, p: dict, rank: int, lora_alpha: float, seed: int, num_classes: int = NUM_CLASSES
) -> ImageClassifier:
    """The backbone (modified in place: pass copy.deepcopy(backbone) to keep it) with a new zero head and LoRA
    on the attention q and v (lora.add_lora); the adapter's random A factors (phi_0, shared by every client
    and the server) are drawn from `seed`."""
    new_head(backbone, num_classes)
    model = ImageClassifier(backbone, p["mean"], p["std"])
    torch.manual_seed(seed)
    add_lora(model, ["self_attention"], r=rank, alpha=lora_alpha, trainable=["vit.heads"])
    return model


class BackboneError(DataError):
    """A backbone file that cannot be used: unreadable, unsafe, or an architecture or tensors that do not
    describe a sound ViT (a DataError: the scripts report it in one line, exit status 2)."""


VIT_B_16 = dict(image_size=224, patch_size=16, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072)
ARCH_LIMITS = {
    "image_size": (1, 1024),
    "patch_size": (1, 1024),
    "num_layers": (1, 64),
    "num_heads": (1, 64),
    "hidden_dim": (1, 4096),
    "mlp_dim": (1, 16384),
    "num_classes": (1, 100_000),
}
MAX_BACKBONE_PARAMS = 10**9  # 4 GB of float32 (torchvision's largest ViT, vit_h_14, has 0.63e9)


def check_arch(arch) -> dict:
    """A backbone file's architecture, checked before anything is built from it: exactly the keys of
    ARCH_LIMITS (num_classes optional), integers within their limits, patch_size dividing image_size,
    num_heads dividing hidden_dim, and at most MAX_BACKBONE_PARAMS parameters by the count of a ViT with L
    layers, width d, MLP width m, patch p and image side s: L (4 d^2 + 2 d m) + ((s/p)^2 + 1) d + 3 p^2 d."""
    if not isinstance(arch, dict):
        raise BackboneError(f"the architecture is a {type(arch).__name__}, not a dict")
    unknown = sorted(str(k)[:40] for k in set(arch) - set(ARCH_LIMITS))
    missing = sorted(set(ARCH_LIMITS) - {"num_classes"} - set(arch))
    if unknown or missing:
        raise BackboneError(f"the architecture has unknown keys {unknown} or lacks {missing}")
    for k, v in arch.items():
        lo, hi = ARCH_LIMITS[k]
        if type(v) is not int or not lo <= v <= hi:
            raise BackboneError(f"the architecture's {k} must be an integer in [{lo}, {hi}], got {str(v)[:40]}")
    L, d, m, p, s = (arch[k] for k in ("num_layers", "hidden_dim", "mlp_dim", "patch_size", "image_size"))
    if s % p or d % arch["num_heads"]:
        raise BackboneError(f"the architecture needs patch_size | image_size and num_heads | hidden_dim, got {arch}")
    params = L * (4 * d * d + 2 * d * m) + ((s // p) ** 2 + 1) * d + 3 * p * p * d
    if params > MAX_BACKBONE_PARAMS:
        raise BackboneError(f"the architecture has ~{params:.2g} parameters, more than {MAX_BACKBONE_PARAMS:.0e}")
    return arch


def backbone_from_state(arch, state, what: str) -> VisionTransformer:
    """A VisionTransformer(**arch) holding `state` (its old head dropped), after check_arch and, on the
    expected shapes taken from a ViT built on the meta device (nothing allocated), tensor_checks.check_tensors on
    every tensor: keys, dtypes, shapes, layout, storage bounds, finite values. BackboneError names `what`."""
    arch = check_arch(arch)
    if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
        raise BackboneError(f"{what}: the weights are not a dict of named tensors")
    with torch.device("meta"):
        expected = {k: v for k, v in VisionTransformer(**arch).state_dict().items() if not k.startswith("heads.")}
    body = {k: v for k, v in state.items() if not k.startswith("heads.")}
    if body.keys() != expected.keys():
        missing, unexpected = sorted(expected.keys() - body.keys())[:3], sorted(body.keys() - expected.keys())[:3]
        raise BackboneError(
            f"{what} does not fit a ViT of its architecture: missing {missing}, unexpected {unexpected}"
        )
    try:
        check_tensors(body, expected, what=what)
    except AdapterError as e:
        raise BackboneError(str(e)) from None
    vit = VisionTransformer(**arch)
    vit.load_state_dict(body, strict=False)  # the head is replaced (new_head)
    return vit


def load_backbone_file(path: str, default_vit: dict | None) -> VisionTransformer:
    """A potara backbone file {"format": "potara-backbone-v1", "vit": arch, "state_dict": ...} or a plain
    state_dict of the preset's architecture (default_vit; None: vit_b_16, e.g. torchvision's
    vit_b_16-c6a6e5f1.pth). Read with weights_only=True (never runs code) and checked (backbone_from_state)."""
    try:
        obj = load_torch_file(path)
    except Exception as e:  # noqa: BLE001 -- a link, a FIFO, a refused pickle, a truncated zip, ...: all "not usable"
        raise BackboneError(f"--backbone {path}: not a readable, safe torch file ({type(e).__name__})") from None
    if not isinstance(obj, dict) or (
        "format" in obj and (obj.get("format") != "potara-backbone-v1" or not {"vit", "state_dict"} <= obj.keys())
    ):
        raise BackboneError(f"--backbone {path}: neither a potara backbone file nor a state_dict")
    arch, state = (obj["vit"], obj["state_dict"]) if "format" in obj else (default_vit or VIT_B_16, obj)
    try:
        return backbone_from_state(arch, state, f"--backbone {path}")
    except BackboneError as e:
        raise BackboneError(str(e) if str(e).startswith("--backbone") else f"--backbone {path}: {e}") from None


def imagenet_vit_b_16() -> VisionTransformer:
    weights = torchvision.models.ViT_B_16_Weights.IMAGENET1K_V1
    try:
        return torchvision.models.vit_b_16(weights=weights)
    except Exception as e:  # noqa: BLE001 -- offline, a damaged download, ...
        where = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise BackboneError(
            f"could not get the ImageNet weights of vit_b_16 (offline? {type(e).__name__}): "
            f"put {os.path.basename(weights.url)} at {where} or pass --backbone PATH"
        ) from None


def pretrain_tiny_backbone(
    p: dict, images: torch.Tensor, labels: torch.Tensor, device: torch.device, seed: int, progress: bool
) -> tuple[VisionTransformer, float]:
    """Full supervised training of the small ViT on the public images (random translation + flip, AdamW
    with warm-up and cosine decay). Returns the backbone and its accuracy on the last 1000 public images (held out)."""
    torch.manual_seed(seed)
    held = min(1000, len(images) // 10)
    vit = VisionTransformer(**p["vit"], num_classes=NUM_CLASSES)
    model = ImageClassifier(vit, p["mean"], p["std"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["pretrain_lr"], weight_decay=0.05)
    sched = warmup_cosine(opt, p["pretrain_steps"])
    g = torch.Generator().manual_seed(seed)
    n_train = len(images) - held
    for _ in progress_bar(range(p["pretrain_steps"]), "pre-training the tiny backbone", progress, stage=True):
        idx = torch.randint(n_train, (p["pretrain_batch"],), generator=g)
        dx, dy = torch.randint(-4, 5, (2,), generator=g).tolist()
        x = torch.roll(images[idx], (dx, dy), dims=(2, 3))  # random translation (wrapping)
        flip = torch.rand(len(idx), generator=g) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.cross_entropy(model(x.to(device)), labels[idx].to(device))
        step(opt, sched, loss)
    model.eval()
    with torch.no_grad():
        pred = torch.cat(
            [model(images[i : i + 256].to(device)).argmax(-1).cpu() for i in range(n_train, len(images), 256)]
        )
    return vit.cpu(), float((pred == labels[n_train:]).float().mean())


def tiny_backbone(
    p: dict,
    data,
    public: np.ndarray,
    data_desc: dict,
    data_dir: str,
    pretrain_steps: int,
    device: torch.device,
    progress: bool,
) -> tuple[VisionTransformer, dict]:
    """The tiny preset's backbone, pre-trained (seed 0) on the public images data.images[public] (a
    data.CifarData) and cached as data_dir/backbones/tiny-<hash>.pt; the hash covers the architecture, the
    schedule, data_desc (which data, e.g. {"data": "synthetic", "synthetic_per_class": 500}) and the public
    indices, so a cache file is reused exactly when it would be trained again the same. Returns (backbone, info)."""
    key = {
        "vit": p["vit"],
        "schedule": "warmup-cosine",
        "steps": pretrain_steps,
        "lr": p["pretrain_lr"],
        "batch": p["pretrain_batch"],
        "mean": p["mean"],
        "std": p["std"],
        **data_desc,
        "public": hashlib.sha256(public.tobytes()).hexdigest(),
    }
    images, labels = data.images[public], torch.from_numpy(data.labels[public])
    path = cache_path(os.path.join(data_dir, "backbones"), "tiny", key)

    def restore(obj: dict) -> VisionTransformer:  # a cache file is checked like any backbone file
        if not isinstance(obj, dict) or obj.get("vit") != {**p["vit"], "num_classes": NUM_CLASSES}:
            raise BackboneError(f"{path} holds another architecture")
        return backbone_from_state(obj["vit"], obj["state_dict"], path)

    def train() -> dict:
        t0 = time.time()
        vit, acc = pretrain_tiny_backbone({**p, "pretrain_steps": pretrain_steps}, images, labels, device, 0, progress)
        info = {"public_acc": acc, "public_images": len(images), "pretrain_seconds": time.time() - t0, "key": key}
        return {
            "format": "potara-backbone-v1",
            "vit": {**p["vit"], "num_classes": NUM_CLASSES},
            "state_dict": vit.state_dict(),
            "info": info,
        }

    vit, info, where = cached_pretrain(
        path, "tiny backbone", restore, train, lambda i: f"held-out public accuracy {i['public_acc']:.3f}"
    )
    return vit, {"backbone": where, **info}
