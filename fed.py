"""FedAvg / FedIT over adapter tensors, with one backbone in memory for any number of clients.

FedIT (Zhang et al., 2024, arXiv 2305.05644) is FedAvg (McMahan et al., 2017) applied to the
LoRA adapter only. Every client starts each round from the global adapter phi^t, runs a few
local steps, and the server averages what comes back, weighted by client data size n_k:

    phi^{t+1} = sum_{k in S_t} n_k phi_k^{t+1} / sum_{k in S_t} n_k

A client is its data plus its adapter tensors: switching client loads tensors into the one
shared backbone (lora.load_lora_state_dict), never a copy of the model. Its local steps are
training.train_adapter (AdamW on the adapter only).

One round is three public functions; `run_fedit` is a short loop over them in one process, and an
out-of-process deployment (e.g. a Flower app) calls the same ones on each side:

    server: selected, _ = sample_clients(seed, t, K, clients_per_round)    # S_t, seeded by (seed, t)
            send phi^t (the shared tensors) to every k in selected
    client: reply, private = local_update(model, client, phi_t, private, t, k, FedConfig(...))
            send reply = (shared tensors, n_k, mean loss); keep `private` (the unshared tensors)
    server: outcome = server_round(t, phi_t, selected, {k: reply_k received}, names, max_update_norm)
            phi^{t+1} = outcome.global_state; outcome.history is the round's record

A selected client that never answers is a drop-out (in run_fedit, `drop_prob` simulates them with
sample_clients' second draw). Every reply is untrusted: server_round checks it (validate_update:
keys, shapes, dtypes, layout, finite values, optional L2 norm bound) and rejects a bad one with its
reason instead of raising, so one client cannot crash the aggregation. Limits, by design: the
reported n_k is trusted as the FedAvg weight once it is an int in [1, 2**53] (a client can claim
more data than it has), and a norm bound limits each update, not a group of colluding clients that
each stay under it and together still move the average.

Reproducibility: round t draws its clients from a generator seeded with (seed, t) and client
k's local batches and dropout from (seed, t, k), so a run resumed at round t from its saved
FedState (`resume=`) ends bitwise equal to an uninterrupted one on CPU, and a client
process computes exactly the update the in-process loop would. The caller's global RNG is restored.

`share(name) -> bool` selects the tensors that are federated; the rest stay on the client
across rounds (FedSA-LoRA: share only the LoRA A factors, keep B and the head local).
"""
from __future__ import annotations

import logging
import math
import numbers
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from lora import check_tensors, load_lora_state_dict, lora_state_dict
from training import LossFn, classification_loss, model_device, progress_bar, shuffled_batches, train_adapter

log = logging.getLogger("potara.fed")


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes on the wire for a set of tensors: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def _valid_count(n) -> bool:
    """A finite real number >= 0 and not a bool (a huge Python int counts as finite: the total catches it)."""
    return (not isinstance(n, bool) and isinstance(n, numbers.Real) and n >= 0
            and (isinstance(n, int) or math.isfinite(n)))


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """sum_k n_k state_k / sum_k n_k per tensor, accumulated in float64, returned in each tensor's dtype.

    Refused with a ValueError (never a silent NaN or zero): a state that fails lora.check_tensors (client
    0 on its own, every other against client 0: keys, layout, dtype, shape, finite values), an n_k that is
    not a finite real number >= 0 (bools are refused too), or a total that is not positive and finite.
    """
    if len(states) == 0:
        raise ValueError("fedavg: no client states to average")
    if len(states) != len(num_examples):
        raise ValueError(f"fedavg: {len(states)} states but {len(num_examples)} example counts")
    if not all(_valid_count(n) for n in num_examples):
        raise ValueError(f"fedavg: example counts must be finite numbers >= 0, got {list(num_examples)[:8]}")
    try:
        total = float(sum(num_examples))
    except OverflowError:  # an int sum beyond float range
        total = math.inf
    if not 0 < total < math.inf:
        raise ValueError(f"fedavg: example counts must have a positive, finite total, got {list(num_examples)[:8]}")
    check_tensors(states[0], what="fedavg: client state 0", max_numel=sys.maxsize)  # its data is in memory already
    for i, s in enumerate(states[1:], start=1):
        check_tensors(s, states[0], what=f"fedavg: client state {i} (against client 0)")
    averaged = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for s, n in zip(states, num_examples):
            acc += (n / total) * s[k].to(ref.device, torch.float64)  # a client's tensor may sit elsewhere
        averaged[k] = acc.to(ref.dtype)
    return averaged


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
class FedConfig:
    """How a federated run trains: the settings run_fedit and local_update share (no defaults for what an
    experiment must choose)."""
    rounds: int                    # FedIT rounds R
    local_steps: int               # AdamW steps per client per round
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    clients_per_round: int = 0     # |S_t|; 0 = every client every round
    seed: int = 0                  # every draw of the run: fed.derive_seed(seed, round, client, ...)
    drop_prob: float = 0.0         # chance that a selected client never answers (simulated drop-outs)
    max_update_norm: float | None = None  # reject ||phi_k - phi^t||_2 above it (None: no bound)

    def check(self, num_clients: int) -> None:
        """A one-line ValueError for settings no run can have with num_clients clients."""
        if self.rounds < 0 or self.local_steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"run_fedit: need rounds >= 0, local_steps > 0, batch_size > 0; got {self.rounds}, "
                             f"{self.local_steps}, {self.batch_size}")
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"run_fedit: drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"run_fedit: max_update_norm must be positive, got {self.max_update_norm}")
        if not 0 <= self.clients_per_round <= num_clients:
            raise ValueError(f"run_fedit: clients_per_round must be in [0, {num_clients}] (0: all), "
                             f"got {self.clients_per_round}")


@dataclass
class FedState:
    """Everything needed to continue a federated run: checkpoint this after each round."""
    round: int  # rounds completed
    global_state: dict[str, torch.Tensor]  # the shared tensors
    private_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per client, unshared tensors
    history: list[dict] = field(default_factory=list)


def validate_update(update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                    max_norm: float | None = None) -> str | None:
    """Why a client's update must not be aggregated, or None if it is fine. The update is untrusted:
    lora.check_tensors against the reference (phi^t) refuses wrong keys, shapes or dtypes, sparse, meta,
    expanded or out-of-storage tensors and NaN/Inf before anything is computed from it; then the L2
    distance ||update - reference|| over all tensors must be <= max_norm when given. Never raises."""
    try:
        check_tensors(update, reference, what="update")
    except ValueError as e:
        return str(e)
    if max_norm is not None:
        norm = math.sqrt(sum(float((u.to("cpu", torch.float64) - reference[k].to("cpu", torch.float64)).pow(2).sum())
                             for k, u in update.items()))
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}"
    return None


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, round, client, ...): every random draw of a run is
    keyed by where it happens, so a resumed run repeats the uninterrupted one exactly."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s



# ---- one round, in pieces an out-of-process server and client can call (see the module docstring) ----

def sample_clients(seed: int, round: int, num_clients: int, clients_per_round: int,
                   drop_prob: float = 0.0) -> tuple[list[int], list[int]]:
    """Round `round`'s participants S_t: `clients_per_round` of range(num_clients) without replacement,
    sorted, from a generator seeded with derive_seed(seed, round); then, from the same generator, the
    simulated drop-outs: each selected client independently with probability drop_prob (a subset of S_t,
    also sorted). Returns (selected, dropped). Any process that knows (seed, round) draws the same S_t."""
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"sample_clients: clients_per_round must be in [1, {num_clients}], got {clients_per_round}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"sample_clients: drop_prob must be in [0, 1), got {drop_prob}")
    g = torch.Generator().manual_seed(derive_seed(seed, round))
    selected = sorted(torch.randperm(num_clients, generator=g)[:clients_per_round].tolist())
    dropped = [k for k, u in zip(selected, torch.rand(len(selected), generator=g).tolist()) if u < drop_prob]
    return selected, dropped


class ClientReply(NamedTuple):
    """What a client sends back in a round: its shared tensors phi_k^{t+1}, its data size n_k (the
    FedAvg weight, not the number of examples seen) and its mean training loss."""
    state: dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch.manual_seed(seed) inside the block (dropout etc.); the caller's CPU and accelerator
    generator states are restored on exit, so callers' own random streams are not disturbed."""
    devices = [] if device.type == "cpu" else list(range(torch.get_device_module(device.type).device_count()))
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


def local_update(model: nn.Module, client: Client, global_state: dict[str, torch.Tensor],
                 private_state: dict[str, torch.Tensor], round: int, client_index: int, cfg: FedConfig, *,
                 loss_fn: LossFn = classification_loss, autocast_dtype: torch.dtype | None = None,
                 progress: bool = True) -> tuple[ClientReply, dict[str, torch.Tensor]]:
    """Client k's part of round t: load phi^t (+ its private tensors) into the model, run cfg.local_steps
    AdamW steps on its data, and return (the reply to send: shared tensors, n_k, mean loss; its new
    private tensors). Batches come from derive_seed(seed, t, k), dropout etc. from
    derive_seed(seed, t, k, 1) in a forked RNG (the caller's global RNG state is left as it was).
    The model keeps the trained adapter; `global_state`'s keys decide which tensors are shared."""
    load_lora_state_dict(model, {**global_state, **private_state})
    with seeded(derive_seed(cfg.seed, round, client_index, 1), model_device(model)):
        batches = shuffled_batches(client.inputs, client.targets, cfg.batch_size,
                                   derive_seed(cfg.seed, round, client_index))
        result = train_adapter(model, batches, cfg.local_steps, cfg.lr, cfg.weight_decay, loss_fn, autocast_dtype,
                               desc=f"round {round} client {client.name}", progress=progress)
    shared = {k: v for k, v in result.state.items() if k in global_state}
    private = {k: v for k, v in result.state.items() if k not in global_state}
    return ClientReply(shared, client.num_examples, result.mean_loss), private


def _reply_problem(reply, global_state: dict[str, torch.Tensor], max_update_norm: float | None) -> str | None:
    """Why a reply must not be aggregated: malformed, validate_update's reason, n_k not an int in [1, 2**53]
    (a larger count would overflow fedavg's total and outweigh everyone), or a non-finite loss."""
    if not isinstance(reply, tuple) or len(reply) != 3:
        return "malformed reply (expected (state, num_examples, mean_loss))"
    state, n, loss = reply
    reason = validate_update(state, global_state, max_update_norm)
    if reason is None and (isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 2**53):
        reason = f"num_examples must be an int in [1, 2**53], got {n!r}"[:200]
    if reason is None and (isinstance(loss, bool) or not isinstance(loss, numbers.Real) or not math.isfinite(loss)):
        reason = f"mean_loss must be a finite number, got {loss!r}"
    return reason


def _wire_bytes(state) -> int:
    """state_bytes of whatever tensors a (possibly malformed) reply holds."""
    if not isinstance(state, dict):
        return 0
    return state_bytes({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})


class RoundOutcome(NamedTuple):
    global_state: dict[str, torch.Tensor]  # phi^{t+1} (phi^t itself when no update was accepted)
    accepted: list[int]  # client indices whose updates were averaged, sorted
    history: dict  # the round's record: clients, dropped, rejected (with reasons), mean loss, bytes


def server_round(round: int, global_state: dict[str, torch.Tensor], selected: Sequence[int],
                 replies: Mapping[int, ClientReply], client_names: Sequence[str],
                 max_update_norm: float | None = None) -> RoundOutcome:
    """The server's part of round t, given phi^t, the selected clients S_t and the replies that came
    back (client index -> ClientReply). A selected client with no reply is a drop-out; each reply is
    checked (validate_update, then n_k an int in [1, 2**53] and a finite loss) and a bad one is
    logged and rejected with its reason, never raised. The accepted updates are averaged in sorted
    client order, phi^{t+1} = sum_k n_k phi_k / sum_k n_k (fedavg); with none accepted phi^t is kept.
    bytes_down = |phi^t| * |S_t| (sent to every selected client), bytes_up = every reply received."""
    down = state_bytes(global_state)
    rejected, accepted, updates, sizes, losses, up = [], [], [], [], [], 0
    for k in sorted(replies):
        reply = replies[k]
        up += _wire_bytes(reply[0] if isinstance(reply, tuple) and reply else None)
        reason = "not selected this round" if k not in selected else _reply_problem(reply, global_state,
                                                                                    max_update_norm)
        if reason is not None:
            log.warning("round %d: rejected the update of client %s: %s", round, client_names[k], reason)
            rejected.append({"client": client_names[k], "reason": reason})
            continue
        accepted.append(k)
        updates.append(reply[0])
        sizes.append(reply[1])
        losses.append(float(reply[2]))
    new_global = fedavg(updates, sizes) if updates else global_state
    history = {"round": round, "clients": [client_names[k] for k in selected],
               "dropped": [client_names[k] for k in selected if k not in replies], "rejected": rejected,
               "mean_train_loss": sum(losses) / len(losses) if losses else None,
               "bytes_down": down * len(selected), "bytes_up": up}
    return RoundOutcome(new_global, accepted, history)


def run_fedit(model: nn.Module, clients: Sequence[Client], cfg: FedConfig, *,
              loss_fn: LossFn = classification_loss, share: Callable[[str], bool] | None = None,
              resume: FedState | None = None, on_round: Callable[[FedState], None] | None = None,
              autocast_dtype: torch.dtype | None = None, progress: bool = True, desc: str = "FedIT rounds") -> FedState:
    """FedIT from the model's current adapter (the shared initial adapter phi_0) for cfg.rounds rounds,
    in one process: per round, sample_clients, local_update for each selected client that does not
    drop out, then server_round (validate, fedavg). history[t] is server_round's record.
    `resume` continues a saved FedState; `on_round` is called after every round (checkpointing); `desc` names the
    rounds' progress bar (training.progress_bar).
    The model's adapter is restored to phi_0 on return, and torch's global RNG state to the caller's.
    A client's private (unshared) tensors are kept only when its update was accepted (a deployed client
    that is not told the verdict would keep them anyway: the two differ only when a FedSA update is rejected).
    """
    if not clients:
        raise ValueError("run_fedit: no clients")
    cfg.check(len(clients))
    per_round = cfg.clients_per_round or len(clients)
    share = share or (lambda name: True)
    init = lora_state_dict(model)
    shared_keys = [k for k in init if share(k)]
    if not shared_keys:
        raise ValueError("run_fedit: `share` selects no adapter tensor to federate")
    state = resume or FedState(0, {k: init[k] for k in shared_keys},
                               {c.name: {k: v for k, v in init.items() if k not in shared_keys} for c in clients})
    names = [c.name for c in clients]
    try:
        for t in progress_bar(range(state.round, cfg.rounds), desc, progress, stage=True, initial=state.round,
                              total=cfg.rounds):
            selected, dropped = sample_clients(cfg.seed, t, len(clients), per_round, cfg.drop_prob)
            replies, private = {}, {}
            for k in selected:
                if k not in dropped:
                    replies[k], private[k] = local_update(
                        model, clients[k], state.global_state, state.private_states[names[k]], t, k, cfg,
                        loss_fn=loss_fn, autocast_dtype=autocast_dtype, progress=progress)
            outcome = server_round(t, state.global_state, selected, replies, names, cfg.max_update_norm)
            for k in outcome.accepted:
                state.private_states[names[k]] = private[k]
            state.global_state, state.round = outcome.global_state, t + 1
            state.history.append(outcome.history)
            if on_round is not None:
                on_round(state)
    finally:
        load_lora_state_dict(model, init)
    return state
