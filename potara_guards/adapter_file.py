"""The adapter file: one adapter (its tensors and plain metadata) in one file, written atomically and read back
without running code from it.

    save_adapter("client0.pt", lora_state_dict(model), lora_meta(model))   # safe_files.atomic_write + torch.save
    state, meta = load_adapter("client0.pt")                               # weights_only; check_tensors

Format ADAPTER_FORMAT: a torch.save dict {"format": "potara-adapter-v1", "meta": plain data,
"state": {name: contiguous CPU tensor}}. Files from clients are untrusted: torch.load(weights_only=True)
refuses any pickle that would call code, and every tensor passes tensor_checks.check_tensors before the state
is returned.
"""

from __future__ import annotations

import os

import torch

from .safe_files import UnsafeFile, atomic_write, open_regular
from .tensor_checks import MAX_NUMEL, AdapterError, check_tensors

ADAPTER_FORMAT = "potara-adapter-v1"


def _plain(x) -> bool:
    if type(x) in (list, tuple):
        return all(_plain(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and _plain(v) for k, v in x.items())
    return type(x) in (str, int, float, bool, type(None))


def save_adapter(path: str | os.PathLike, state: dict, meta: dict | None = None) -> None:
    """Write tensors (checked: tensor_checks.check_tensors) + meta (plain str/int/float/bool/list/dict only) to one
    file,
    atomically (atomic_write), so a crash leaves the old file or the new one, never half of one."""
    path = os.fspath(path)
    check_tensors(state, what=f"{path}: adapter to save")
    if not _plain(meta or {}):  # anything else would be written, then refused by load_adapter's weights_only
        raise AdapterError(f"{path}: meta must be plain data (str, int, float, bool, None, lists, str-keyed dicts)")
    payload = {
        "format": ADAPTER_FORMAT,
        "meta": meta or {},
        "state": {k: v.detach().to("cpu").contiguous() for k, v in state.items()},
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_adapter(path: str | os.PathLike, max_numel: int | None = None) -> tuple[dict, dict]:
    """Read a file written by save_adapter. Only a regular file of at most 8 bytes per allowed element (plus
    1 MiB of structure) is opened (open_regular). Never executes code from the file (weights_only=True: a pickle
    that tries to call anything is refused; torch checks each storage's size against the file's record before
    allocating it); then every tensor is checked (check_tensors, at most max_numel elements in all).
    Any problem is one AdapterError naming the file. max_numel None: tensor_checks.MAX_NUMEL."""
    path, max_numel = os.fspath(path), MAX_NUMEL if max_numel is None else max_numel
    try:
        with open_regular(path, 8 * max_numel + (1 << 20)) as f:
            payload = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such adapter file") from None
    except UnsafeFile as e:
        raise AdapterError(str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # whatever a damaged or hostile file makes the unpickler raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(
            f"{path}: not a readable potara adapter file (truncated, foreign or unsafe): {first[:200]}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: not a potara adapter file (no '{ADAPTER_FORMAT}' marker)")
    state, meta = payload.get("state"), payload.get("meta")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise AdapterError(f"{path}: malformed adapter file (state or meta is not a dict)")
    check_tensors(state, what=path, max_numel=max_numel)
    return state, meta
