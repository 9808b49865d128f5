"""Pre-training a small backbone once and caching it on disk: shared by the tiny ViT (vit.py) and the tiny
Llama (lm.py), which are trained here because no pre-trained weights can be downloaded offline.

    sched = warmup_cosine(optimizer, steps)           # linear warm-up over steps // 10, then cosine to 0
    path = cache_path("data/backbones", "tiny", key)  # the file name carries a hash of everything that shapes it
    model, info = cached_pretrain(path, "tiny backbone", restore, train, describe)

A cache file is {"state_dict": ..., "info": {...}, ...} written atomically (safe_files.atomic_write) and read
with torch.load(weights_only=True) from a regular file of bounded size (safe_files.open_regular): it never runs code.
A cache file that cannot be restored (damaged,
stale, foreign) is pre-trained again; a cache folder that cannot be written is reported, not fatal.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Callable

import torch

from potara_guards.safe_files import atomic_write, open_regular

MAX_CACHE_BYTES = 1 << 30  # a cached tiny backbone is a few MB


def warmup_cosine(opt: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor min(1, (t + 1) / w) * (1 + cos(pi t / steps)) / 2 with w = max(1, steps // 10): a linear
    warm-up, then cosine decay to 0 at t = steps (Loshchilov & Hutter, 2017)."""
    warm = max(1, steps // 10)
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda t: min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(t, steps) / steps))
    )


def step(opt: torch.optim.Optimizer, sched, loss: torch.Tensor) -> None:
    """One pre-training step: backward of `loss`, the optimizer's step, then the schedule's."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


def cache_path(folder: str, prefix: str, key: dict) -> str:
    """folder/<prefix>-<first 12 hex digits of sha256(key as sorted JSON)>.pt"""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(folder, f"{prefix}-{digest}.pt")


def cached_pretrain(
    path: str, what: str, restore: Callable[[dict], Any], train: Callable[[], dict], describe: Callable[[dict], str]
) -> tuple[Any, dict, str]:
    """restore(the cache file's dict) when `path` holds a usable one, else obj = train() (a dict with "info"),
    saved to `path`, then restore(obj). Returns (restored, info, where: path or "(not cached)").
    describe(info) is the one-line summary printed either way (e.g. the held-out accuracy)."""
    if os.path.exists(path):
        try:
            with open_regular(path, MAX_CACHE_BYTES) as f:  # a link, FIFO or device: unusable, not a hang
                obj = torch.load(f, map_location="cpu", weights_only=True)
            restored = restore(obj)
            print(f"{what}: reusing {path} ({describe(obj['info'])})")
            return restored, obj["info"], path
        except MemoryError:  # not a damaged file
            raise
        except Exception as e:  # noqa: BLE001 -- any unusable cache entry (damaged, edited, NaN): pre-train again
            why = " ".join(str(e).split())[:160]
            print(
                f"{what}: the cached {path} is unusable ({type(e).__name__}{': ' + why if why else ''}); "
                "pre-training it again"
            )
    obj = train()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, lambda f: torch.save(obj, f))
        saved, where = f"saved to {path}", path
    except OSError as e:
        saved, where = f"NOT cached ({e.strerror or type(e).__name__}: {os.path.dirname(path)})", "(not cached)"
    print(f"{what}: pre-trained in {obj['info'].get('pretrain_seconds', 0):.0f}s, {describe(obj['info'])}, {saved}")
    return restore(obj), obj["info"], where
