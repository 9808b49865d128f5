"""FedAvg / FedIT over adapter tensors, with one backbone in memory for any number of clients.

FedIT (Zhang et al., 2024, arXiv 2305.05644) is FedAvg (McMahan et al., 2017) applied to the
LoRA adapter only. Every client starts each round from the global adapter phi^t, runs a few
local steps, and the server averages what comes back, weighted by client data size n_k:

    phi^{t+1} = sum_{k in S_t} n_k phi_k^{t+1} / sum_{k in S_t} n_k

A client is its data plus its adapter tensors: switching client loads tensors into the one
shared backbone (lora.load_lora_state_dict), never a copy of the model.

Reproducibility: round t draws its clients from a generator seeded with (seed, t) and client
k's local batches and dropout from (seed, t, k), so a run resumed at round t from its saved
global adapter (`start_round=t`) ends bitwise equal to an uninterrupted one on CPU.

`share(name) -> bool` selects the tensors that are federated; the rest stay on the client
across rounds (FedSA-LoRA: share only the LoRA A factors, keep B and the head local).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from lora import check_state, load_lora_state_dict, lora_state_dict

log = logging.getLogger("potara.fed")
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def classification_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of model(inputs) against integer labels."""
    return F.cross_entropy(model(inputs), targets)


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes on the wire for a set of tensors: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """sum_k n_k state_k / sum_k n_k per tensor, accumulated in float64, returned in each tensor's dtype."""
    if len(states) == 0:
        raise ValueError("fedavg: no client states to average")
    if len(states) != len(num_examples):
        raise ValueError(f"fedavg: {len(states)} states but {len(num_examples)} example counts")
    if any(n < 0 for n in num_examples) or sum(num_examples) <= 0:
        raise ValueError(f"fedavg: example counts must be >= 0 with a positive total, got {list(num_examples)}")
    for i, s in enumerate(states[1:], start=1):
        check_state(s, states[0], what=f"fedavg: client state {i} (against client 0)")
    total = float(sum(num_examples))
    averaged = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for s, n in zip(states, num_examples):
            acc += (n / total) * s[k].to(torch.float64)
        averaged[k] = acc.to(ref.dtype)
    return averaged


def shuffled_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int) -> Iterator:
    """Endless stream of (inputs, targets) minibatches, a fresh permutation every epoch."""
    if len(inputs) == 0:
        raise ValueError("shuffled_batches: a client with no examples")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(len(inputs), generator=g)
        for i in range(0, len(perm), batch_size):
            idx = perm[i:i + batch_size]
            yield inputs[idx], targets[idx]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class TrainResult(NamedTuple):
    state: dict[str, torch.Tensor]
    num_examples: int  # examples seen (sum of batch sizes)
    mean_loss: float


def train_adapter(model: nn.Module, batches: Iterable, steps: int, lr: float, weight_decay: float = 0.0,
                  loss_fn: LossFn = classification_loss, autocast_dtype: torch.dtype | None = None,
                  desc: str | None = None, progress: bool = True) -> TrainResult:
    """`steps` AdamW steps on the model's trainable tensors only; `batches` yields (inputs, targets)
    and is re-iterated when exhausted. Returns the adapter state, examples seen and mean loss."""
    if steps <= 0:
        raise ValueError(f"train_adapter: steps must be positive, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_adapter: the model has no trainable tensors (call lora.add_lora first)")
    device = _device_of(model)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    it, seen, loss_sum = iter(batches), 0, torch.zeros((), device=device)
    for _ in tqdm(range(steps), desc=desc or "local training", leave=False, disable=not progress):
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


@dataclass
class Client:
    """What a client holds: its training data (tensors) and its name. The adapter lives elsewhere."""
    name: str
    inputs: torch.Tensor
    targets: torch.Tensor

    @property
    def num_examples(self) -> int:
        return len(self.inputs)


@dataclass
class FedState:
    """Everything needed to continue a federated run: checkpoint this after each round."""
    round: int  # rounds completed
    global_state: dict[str, torch.Tensor]  # the shared tensors
    private_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per client, unshared tensors
    history: list[dict] = field(default_factory=list)


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    max_norm: float | None = None) -> str | None:
    """Why a client's update must not be aggregated, or None if it is fine: wrong keys, shapes or
    dtypes, NaN/Inf, or an L2 distance ||update - reference|| over all tensors above max_norm."""
    try:
        check_state(update, reference, what="update")
    except ValueError as e:
        return str(e)
    if max_norm is not None:
        norm = math.sqrt(sum(float((u.double() - reference[k].double()).pow(2).sum()) for k, u in update.items()))
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds --max-update-norm {max_norm:g}"
    return None


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, round, client, ...): every random draw of a run is
    keyed by where it happens, so a resumed run repeats the uninterrupted one exactly."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


def run_fedit(model: nn.Module, clients: Sequence[Client], rounds: int, local_steps: int, clients_per_round: int,
              lr: float, seed: int, batch_size: int = 32, weight_decay: float = 0.0,
              loss_fn: LossFn = classification_loss, share: Callable[[str], bool] | None = None,
              resume: FedState | None = None, on_round: Callable[[FedState], None] | None = None,
              autocast_dtype: torch.dtype | None = None, progress: bool = True,
              drop_prob: float = 0.0, max_update_norm: float | None = None) -> FedState:
    """FedIT from the model's current adapter (the shared initial adapter phi_0) for `rounds` rounds.

    Each round: sample `clients_per_round` clients without replacement, send each the global
    tensors, train `local_steps` steps, average what comes back with fedavg (weights = client
    data sizes). history[t] records the participants, their mean training loss and the bytes
    sent server->clients and clients->server (sum of numel * element_size of what was sent).
    `resume` continues a saved FedState; `on_round` is called after every round (checkpointing).
    The model's adapter is restored to phi_0 on return.

    Untrusted clients: each returned update is checked (validate_update: keys, shapes, dtypes,
    finite values, and ||phi_k - phi^t||_2 <= max_update_norm when given); a bad one is logged and
    left out, and a round with no valid update keeps phi^t. `drop_prob` simulates clients that
    received the adapter but never answered. history[t] lists "dropped" and "rejected" clients;
    bytes count what was actually sent (down: to every selected client; up: every returned update).
    """
    if rounds < 0 or local_steps <= 0 or batch_size <= 0:
        raise ValueError(f"run_fedit: need rounds >= 0, local_steps > 0, batch_size > 0; got {rounds}, "
                         f"{local_steps}, {batch_size}")
    if not clients:
        raise ValueError("run_fedit: no clients")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"run_fedit: drop_prob must be in [0, 1), got {drop_prob}")
    if max_update_norm is not None and not max_update_norm > 0:
        raise ValueError(f"run_fedit: max_update_norm must be positive, got {max_update_norm}")
    if not 1 <= clients_per_round <= len(clients):
        raise ValueError(f"run_fedit: clients_per_round must be in [1, {len(clients)}], got {clients_per_round}")
    share = share or (lambda name: True)
    init = lora_state_dict(model)
    shared_keys = [k for k in init if share(k)]
    if not shared_keys:
        raise ValueError("run_fedit: `share` selects no adapter tensor to federate")
    state = resume or FedState(0, {k: init[k] for k in shared_keys},
                               {c.name: {k: v for k, v in init.items() if k not in shared_keys} for c in clients})
    down = state_bytes(state.global_state)
    try:
        for t in tqdm(range(state.round, rounds), desc="FedIT rounds", initial=state.round, total=rounds,
                      disable=not progress):
            g = torch.Generator().manual_seed(derive_seed(seed, t))
            picked = sorted(torch.randperm(len(clients), generator=g)[:clients_per_round].tolist())
            dropped = [k for k, u in zip(picked, torch.rand(len(picked), generator=g).tolist()) if u < drop_prob]
            updates, sizes, losses, rejected, up = [], [], [], [], 0
            for k in picked:
                client = clients[k]
                if k in dropped:
                    continue
                load_lora_state_dict(model, {**state.global_state, **state.private_states[client.name]})
                torch.manual_seed(derive_seed(seed, t, k, 1))  # dropout etc.: reproducible per (round, client)
                result = train_adapter(model, shuffled_batches(client.inputs, client.targets, batch_size,
                                                               derive_seed(seed, t, k)),
                                       local_steps, lr, weight_decay, loss_fn, autocast_dtype,
                                       desc=f"round {t} client {client.name}", progress=progress)
                update = {k2: result.state[k2] for k2 in shared_keys}
                up += state_bytes(update)
                reason = validate_update(update, state.global_state, max_update_norm)
                if reason is not None:
                    log.warning("round %d: rejected the update of client %s: %s", t, client.name, reason)
                    rejected.append({"client": client.name, "reason": reason})
                    continue
                updates.append(update)
                state.private_states[client.name] = {k2: v for k2, v in result.state.items() if k2 not in shared_keys}
                sizes.append(client.num_examples)
                losses.append(result.mean_loss)
            if updates:  # otherwise nothing valid came back: the global adapter stays as it was
                state.global_state = fedavg(updates, sizes)
            state.round = t + 1
            state.history.append({"round": t, "clients": [clients[k].name for k in picked],
                                  "dropped": [clients[k].name for k in dropped], "rejected": rejected,
                                  "mean_train_loss": sum(losses) / len(losses) if losses else None,
                                  "bytes_down": down * len(picked), "bytes_up": up})
            if on_round is not None:
                on_round(state)
    finally:
        load_lora_state_dict(model, init)
    return state
