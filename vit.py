"""The vision model: a torchvision VisionTransformer behind a uint8-image front end, its presets, and its
backbone (ImageNet vit_b_16 for the paper's setting; a small ViT pre-trained here on public CIFAR images,
cached, for a CPU).

    p = PRESETS["tiny"]                                     # every default of run_cifar.py, per preset
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
from tqdm.auto import tqdm

from lora import add_lora
from pretrain import cache_path, cached_pretrain, step, warmup_cosine

CIFAR_MEAN, CIFAR_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=96, mlp_dim=192)
PRESETS = {  # every default of the CIFAR pipeline, per preset (None: not used by that preset)
    "tiny": dict(vit=TINY_VIT, mean=CIFAR_MEAN, std=CIFAR_STD, public=30000, pretrain_steps=1000, pretrain_lr=2e-3,
                 pretrain_batch=128, clients=5, alpha=0.5, train=400, val=100, test=200, rounds=100, local_steps=5,
                 local_train_steps=100, finetune_steps=25, lr=3e-3, batch_size=32, rank=8, lora_alpha=16),
    "paper": dict(vit=None, mean=IMAGENET_MEAN, std=IMAGENET_STD, public=0, pretrain_steps=None, pretrain_lr=None,
                  pretrain_batch=None, clients=10, alpha=0.5, train=1000, val=100, test=500, rounds=400,
                  local_steps=5, local_train_steps=300, finetune_steps=100, lr=1e-3, batch_size=32, rank=8,
                  lora_alpha=16),
}
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


def build_model(backbone: VisionTransformer, p: dict, rank: int, lora_alpha: float, seed: int,
                num_classes: int = NUM_CLASSES) -> ImageClassifier:
    """The backbone (modified in place: pass copy.deepcopy(backbone) to keep it) with a new zero head and LoRA
    on the attention q and v (lora.add_lora); the adapter's random A factors (phi_0, shared by every client
    and the server) are drawn from `seed`."""
    new_head(backbone, num_classes)
    model = ImageClassifier(backbone, p["mean"], p["std"])
    torch.manual_seed(seed)
    add_lora(model, ["self_attention"], r=rank, alpha=lora_alpha, trainable=["vit.heads"])
    return model


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
    vit = VisionTransformer(**p["vit"], num_classes=NUM_CLASSES)
    model = ImageClassifier(vit, p["mean"], p["std"]).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=p["pretrain_lr"], weight_decay=0.05)
    sched = warmup_cosine(opt, p["pretrain_steps"])
    g = torch.Generator().manual_seed(seed)
    n_train = len(images) - held
    for _ in tqdm(range(p["pretrain_steps"]), desc="pre-training the tiny backbone", disable=not progress):
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
        pred = torch.cat([model(images[i:i + 256].to(device)).argmax(-1).cpu() for i in range(n_train, len(images), 256)])
    return vit.cpu(), float((pred == labels[n_train:]).float().mean())


def tiny_backbone(p: dict, data, public: np.ndarray, data_desc: dict, data_dir: str, pretrain_steps: int,
                  device: torch.device, progress: bool) -> tuple[VisionTransformer, dict]:
    """The tiny preset's backbone, pre-trained (seed 0) on the public images data.images[public] (a
    data.CifarData) and cached as data_dir/backbones/tiny-<hash>.pt; the hash covers the architecture, the
    schedule, data_desc (which data, e.g. {"data": "synthetic", "synthetic_per_class": 500}) and the public
    indices, so a cache file is reused exactly when it would be trained again the same. Returns (backbone, info)."""
    key = {"vit": p["vit"], "schedule": "warmup-cosine", "steps": pretrain_steps, "lr": p["pretrain_lr"],
           "batch": p["pretrain_batch"], "mean": p["mean"], "std": p["std"], **data_desc,
           "public": hashlib.sha256(public.tobytes()).hexdigest()}
    images, labels = data.images[public], torch.from_numpy(data.labels[public])
    path = cache_path(os.path.join(data_dir, "backbones"), "tiny", key)

    def restore(obj: dict) -> VisionTransformer:
        vit = VisionTransformer(**obj["vit"])
        vit.load_state_dict(obj["state_dict"])
        return vit

    def train() -> dict:
        t0 = time.time()
        vit, acc = pretrain_tiny_backbone({**p, "pretrain_steps": pretrain_steps}, images, labels, device, 0, progress)
        info = {"public_acc": acc, "public_images": len(images), "pretrain_seconds": time.time() - t0, "key": key}
        return {"format": "potara-backbone-v1", "vit": {**p["vit"], "num_classes": NUM_CLASSES},
                "state_dict": vit.state_dict(), "info": info}

    vit, info, where = cached_pretrain(path, "tiny backbone", restore, train,
                                       lambda i: f"held-out public accuracy {i['public_acc']:.3f}")
    return vit, {"backbone": where, **info}
