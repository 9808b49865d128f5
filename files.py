"""The adapter file: one LoRA adapter (its tensors + plain metadata) on disk, written atomically and read
back without executing code.

    save_adapter("client0.pt", lora_state_dict(model), lora_meta(model))   # temp file, fsync, rename, fsync
    state, meta = load_adapter("client0.pt")                               # weights_only; check_tensors
    load_lora_state_dict(model, state)                                     # validated, all-or-nothing

Format ADAPTER_FORMAT: a torch.save dict {"format": "potara-adapter-v1", "meta": plain data, "state":
{name: contiguous CPU tensor}}. Files from clients are untrusted: torch.load(weights_only=True) refuses any
pickle that would call code, and every tensor passes lora.check_tensors (the project's one validator of
untrusted tensors) before the state is returned. Needs only lora.py beside it.
"""
from __future__ import annotations

import os

import torch

from lora import MAX_NUMEL, AdapterError, check_tensors

ADAPTER_FORMAT = "potara-adapter-v1"


def _plain(x) -> bool:
    if type(x) in (list, tuple):
        return all(_plain(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and _plain(v) for k, v in x.items())
    return type(x) in (str, int, float, bool, type(None))


def save_adapter(path: str | os.PathLike, state: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    """Write tensors (checked: check_tensors) + meta (plain str/int/float/bool/list/dict only) to one file,
    atomically: a temporary file, fsync, rename, fsync of the folder, so a crash leaves the old file or the
    new one, never half of one."""
    path = os.fspath(path)
    check_tensors(state, what=f"{path}: adapter to save")
    if not _plain(meta or {}):  # anything else would be written, then refused by load_adapter's weights_only
        raise AdapterError(f"{path}: meta must be plain data (str, int, float, bool, None, lists, str-keyed dicts)")
    payload = {"format": ADAPTER_FORMAT, "meta": meta or {},
               "state": {k: v.detach().to("cpu").contiguous() for k, v in state.items()}}
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if os.name == "posix":  # the rename itself reaches the disk only once the folder is synced
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_adapter(path: str | os.PathLike, max_numel: int = MAX_NUMEL) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a file written by save_adapter. Never executes code from the file (weights_only=True: a pickle
    that tries to call anything is refused; torch checks each storage's size against the file's record
    before allocating it); then every tensor is checked (check_tensors, at most max_numel elements in all).
    Any problem is one AdapterError naming the file."""
    path = os.fspath(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise AdapterError(f"{path}: no such adapter file") from None
    except MemoryError:
        raise
    except Exception as e:  # whatever a damaged or hostile file makes the unpickler raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdapterError(f"{path}: not a readable potara adapter file (truncated, foreign or unsafe): "
                           f"{first[:200]}") from None
    if not isinstance(payload, dict) or payload.get("format") != ADAPTER_FORMAT:
        raise AdapterError(f"{path}: not a potara adapter file (no '{ADAPTER_FORMAT}' marker)")
    state, meta = payload.get("state"), payload.get("meta")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise AdapterError(f"{path}: malformed adapter file (state or meta is not a dict)")
    check_tensors(state, what=path, max_numel=max_numel)
    return state, meta
