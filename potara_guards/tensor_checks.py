"""Untrusted tensors: everything that arrives from a file or a peer (an adapter file, a client's update, a
checkpoint, a backbone) passes this one validator before anything is allocated from it or trusted.

    check_tensors(state, reference, what="update")   # exactly reference's keys, each tensor like its own
    check_tensor("head.weight", t, like=model_weight)  # one tensor

Checked in this order, metadata before any value is read: a plain tensor (no subclass that could run code on
access), dense and strided, not on the meta device, a float dtype (or the reference's), the reference's shape (a
LoRA factor's rank may differ when `free_dim` allows it), a bounded number of elements, no element addressed
twice and none beyond its storage; then finite values. Any failure is one AdapterError line naming the tensor.
The method's files check a caller's own tensors more simply (keys, dtypes, shapes, finite values: a ValueError);
this is for what comes from outside: the harness's checkpoints and backbones, the Flower app's records.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class AdapterError(ValueError):
    """An adapter state or file, or any untrusted tensor container, that is malformed or does not fit the
    model (keys, layout, dtype, shape, values). A ValueError, so callers can catch either."""


FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
MAX_NUMEL = 2**28  # elements in one container when no reference bounds the shapes (1 GiB of float32)


def _check_layout(name: str, t, like: torch.Tensor | None, max_numel: int, free: int | None) -> None:
    """Steps 1-5 of check_tensor: reads only metadata (type, layout, device, dtype, sizes, strides)."""
    if type(t) not in (torch.Tensor, nn.Parameter):  # also refuses subclasses that could run code on access
        raise AdapterError(f"{name} is a {type(t).__name__}, not a tensor")
    if t.layout != torch.strided or t.is_nested:
        raise AdapterError(f"{name} is not a dense strided tensor ({'nested' if t.is_nested else t.layout})")
    if t.is_meta:
        raise AdapterError(f"{name} is on the meta device: it holds no data")
    if t.dtype not in ((like.dtype,) if like is not None else FLOAT_DTYPES):
        raise AdapterError(
            f"{name} has dtype {t.dtype}, expected "
            f"{like.dtype if like is not None else 'float32, float64, float16 or bfloat16'}"
        )
    if (
        like is not None
        and t.shape != like.shape
        and not (free is not None and t.dim() == like.dim() == 2 and t.shape[1 - free] == like.shape[1 - free])
    ):
        raise AdapterError(f"{name} has shape {tuple(t.shape)}, the model expects {tuple(like.shape)}")
    if t.numel() > max_numel:
        raise AdapterError(f"{name} has {t.numel()} elements, more than the limit of {max_numel}")
    if t.numel() > 0:  # no element addressed twice (so numel <= what the storage holds), none beyond it
        extent = 0  # the largest offset the dimensions of smaller stride reach
        for s, n in sorted((s, n) for n, s in zip(t.shape, t.stride()) if n > 1):
            if s <= extent:
                raise AdapterError(
                    f"{name} is an overlapping or expanded view (strides {t.stride()}): expected a dense tensor"
                )
            extent += s * (n - 1)
        if (t.storage_offset() + extent + 1) * t.element_size() > t.untyped_storage().nbytes():
            raise AdapterError(f"{name} addresses data beyond its storage (corrupt sizes or strides)")


def check_tensor(
    name: str,
    t,
    like: torch.Tensor | None = None,
    max_numel: int = MAX_NUMEL,
    free_dim: Callable[[str], int | None] | None = None,
) -> None:
    """Raise AdapterError (a ValueError; one line starting with `name`) unless `t` is safe to read and use.

    Checked in this order, nothing allocated before the metadata checks pass:
      1. a plain torch.Tensor or nn.Parameter (no other subclass);
      2. dense and strided (not sparse, mkldnn or nested), not on the meta device;
      3. dtype: like.dtype when `like` is given (the model's own, e.g. an int64 buffer of a backbone), else
         one of FLOAT_DTYPES (float32, float64, float16, bfloat16);
      4. shape: like.shape when given (a 2-D tensor may differ in dimension free_dim(name) when free_dim is
         given and says one: lora.rank_dim lets a LoRA factor change its rank), and at most `max_numel` elements;
      5. no element addressed twice (an expanded view, stride 0, or overlapping strides: one stored element
         posing as 200000 x 200000), and its storage holds every element its sizes and strides address;
      6. finite values (no NaN/Inf).
    Keep the signature simple: checkpoint and backbone loaders call this (or check_tensors, for a dict) on
    every tensor before using it, with `like` the model's own tensor where there is one.
    """
    _check_layout(name, t, like, max_numel, free_dim(name) if free_dim else None)
    if not torch.isfinite(t).all():
        raise AdapterError(f"{name} holds NaN or Inf values")


def _key(k: str) -> str:
    """A key as messages show it: itself when short and printable, else a clipped repr (errors stay one line)."""
    return k if k.isprintable() and len(k) <= 100 else repr(k[:100]) + ("..." if len(k) > 100 else "")


def check_tensors(
    state,
    reference: dict[str, torch.Tensor] | None = None,
    what: str = "state",
    free_dim: Callable[[str], int | None] | None = None,
    max_numel: int = MAX_NUMEL,
) -> None:
    """check_tensor on every entry of a {str: tensor} dict, metadata of all first, then values; AdapterError
    names `what` and the key. With `reference` (e.g. the model's adapter): exactly its keys, each tensor
    like the reference's. Without: any str keys, at most `max_numel` elements in all the tensors together."""
    if not isinstance(state, dict):
        raise AdapterError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    if not all(isinstance(k, str) for k in state):
        bad = [k for k in state if not isinstance(k, str)][:3]
        raise AdapterError(f"{what}: keys must be strings, got {bad}"[:300])
    if reference is not None and set(state) != set(reference):
        missing, extra = sorted(set(reference) - set(state)), sorted(set(state) - set(reference))
        raise AdapterError(
            f"{what}: keys do not match the model's adapter: "
            f"missing {[_key(k) for k in missing[:5]]}, unexpected {[_key(k) for k in extra[:5]]}"
        )
    total = 0
    for k, t in state.items():
        _check_layout(
            f"{what}: {_key(k)}",
            t,
            None if reference is None else reference[k],
            max_numel,
            free_dim(k) if free_dim else None,
        )
        total += t.numel()
        if reference is None and total > max_numel:
            raise AdapterError(f"{what}: more than {max_numel} elements in all (at {_key(k)})")
    for k, t in state.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"{what}: {_key(k)} holds NaN or Inf values")
