"""Local training of an adapter: AdamW steps on a model's trainable tensors only (the LoRA factors and the
extras add_lora named), the frozen backbone untouched. The one loop behind every client's FedIT round
(fedit.local_update), the local adapter phi_L and the fine-tuned baseline.

    batches = shuffled_batches(inputs, targets, batch_size=32, seed=0)   # endless, reshuffled every epoch
    result = train_adapter(model, batches, steps=100, lr=1e-3, start=phi_0)   # TrainResult(state, n, mean_loss)

The model keeps the trained adapter: `start` loads the adapter to start from first (phi_0 for every client's
local adapter, so a loop over clients never starts one client from the previous client's result).

Each step: loss = loss_fn(model, x, y) (default: classification_loss, mean cross-entropy), then AdamW on the
adapter, theta <- AdamW(theta, grad_theta loss). The mean loss stays on the device during the loop (no host
sync per step). Randomness: batches from `seed`; dropout from torch's global RNG (fedit.local_update seeds it
per round and client in a forked RNG).
"""

from __future__ import annotations

import sys
from typing import Callable, Iterable, Iterator, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .lora import load_lora_state_dict, lora_state_dict

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def progress_bar(items: Iterable, desc: str, progress: bool = True, stage: bool = False, **tqdm_args) -> tqdm:
    """tqdm over `items`, drawn only when stderr is a terminal (tqdm's disable=None), never with progress=False.
    In a log (stderr a file or a pipe) bars redrawn at every step would fill it, so there a stage (stage=True:
    FedIT's rounds, local training, evaluation, pre-training) writes one line as it starts, "<desc>: <done>/<total>",
    and an inner bar (one client's steps) nothing."""
    bar = tqdm(items, desc=desc, disable=None if progress else True, **tqdm_args)
    if progress and stage and not sys.stderr.isatty():
        print(f"{desc}: {bar.n}/{bar.total if bar.total is not None else '?'}", file=sys.stderr, flush=True)
    return bar


def classification_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of model(inputs) against integer labels."""
    return F.cross_entropy(model(inputs), targets)


def shuffled_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int) -> Iterator:
    """Endless stream of (inputs, targets) minibatches, a fresh permutation every epoch."""
    if len(inputs) == 0:
        raise ValueError("shuffled_batches: a client with no examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(inputs), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i : i + batch_size]
            yield inputs[idx], targets[idx]


def model_device(model: nn.Module) -> torch.device:
    """Where the model's (first) parameters live: batches are moved there."""
    return next(model.parameters()).device


class TrainResult(NamedTuple):
    state: dict[str, torch.Tensor]
    num_examples: int  # examples seen (sum of batch sizes)
    mean_loss: float


def train_adapter(
    model: nn.Module,
    batches: Iterable,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    loss_fn: LossFn = classification_loss,
    autocast_dtype: torch.dtype | None = None,
    desc: str | None = None,
    progress: bool = True,
    *,
    start: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """`steps` AdamW steps on the model's trainable tensors only, from `start` when given (loaded first, checked:
    lora.load_lora_state_dict) or else from the adapter the model holds; `batches` yields (inputs, targets)
    and is re-iterated when exhausted. Returns the adapter state, examples seen and mean loss."""
    if steps <= 0:
        raise ValueError(f"train_adapter: steps must be positive, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_adapter: the model has no trainable tensors (call lora.add_lora first)")
    if start is not None:
        load_lora_state_dict(model, start)  # copies into the same tensors: `params` stays the adapter
    device = model_device(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    it, seen, loss_sum = iter(batches), 0, torch.zeros((), device=device)
    for _ in progress_bar(range(steps), desc or "local training", progress, leave=False):
        try:
            inputs, targets = next(it)
        except StopIteration:
            it = iter(batches)
            inputs, targets = next(it)
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            loss = loss_fn(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.detach().float()  # stays on the device: no host sync per step
        seen += len(targets)
    model.eval()
    return TrainResult(lora_state_dict(model), seen, loss_sum.item() / steps)
