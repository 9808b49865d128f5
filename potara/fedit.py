"""FedIT: FedAvg over the LoRA adapter only, with one backbone in memory for any number of clients.

FedIT (Zhang et al., 2024, arXiv 2305.05644) is FedAvg (McMahan et al., 2017) applied to the adapter. Every
client starts each round from the global adapter phi^t, runs a few local AdamW steps on its own data
(training.train_adapter), and the server averages what comes back, weighted by client data size n_k:

    phi^{t+1} = sum_{k in S_t} n_k phi_k^{t+1} / sum_{k in S_t} n_k

    state = run_fedit(model, clients, FedConfig(rounds=100, local_steps=5, lr=3e-3))   # state.global_state: phi_G

A client is its data plus its adapter tensors: switching client loads tensors into the one shared backbone
(lora.load_lora_state_dict), never a copy of the model. run_fedit is a short loop over one round's three
steps: the server samples S_t (rounds.sample_clients), each client runs local_update from phi^t, the server
checks the replies (rounds.check_replies) and averages the accepted ones (fedavg): server_round. A deployment
calls the same functions on each side (rounds.py shows how). Round t and client k draw all their randomness
from (seed, t, k), so a run resumed from its FedState ends bitwise equal to an uninterrupted one on CPU.

`share(name) -> bool` selects the tensors that are federated; the rest stay on the client across rounds
(FedSA-LoRA: share only the LoRA A factors, keep B and the head local).
"""

from __future__ import annotations

import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn

from .lora import load_lora_state_dict, lora_state_dict
from .rounds import ClientReply, check_replies, derive_seed, sample_clients, seeded
from .tensor_checks import check_tensors
from .training import LossFn, classification_loss, model_device, progress_bar, shuffled_batches, train_adapter


def _valid_count(n) -> bool:
    """A finite real number >= 0 and not a bool (a huge Python int counts as finite: the total catches it)."""
    return (
        not isinstance(n, bool) and isinstance(n, numbers.Real) and n >= 0 and (isinstance(n, int) or math.isfinite(n))
    )


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """sum_k n_k state_k / sum_k n_k per tensor, accumulated in float64, returned in each tensor's dtype.

    Refused with a ValueError (never a silent NaN or zero): a state that fails tensor_checks.check_tensors (client
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

    rounds: int  # FedIT rounds R
    local_steps: int  # AdamW steps per client per round
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    clients_per_round: int = 0  # |S_t|; 0 = every client every round
    seed: int = 0  # every draw of the run: rounds.derive_seed(seed, round, client, ...)
    drop_prob: float = 0.0  # chance that a selected client never answers (simulated drop-outs)
    max_update_norm: float | None = None  # reject ||phi_k - phi^t||_2 above it (None: no bound)

    def check(self, num_clients: int) -> None:
        """A one-line ValueError for settings no run can have with num_clients clients."""
        if self.rounds < 0 or self.local_steps <= 0 or self.batch_size <= 0:
            raise ValueError(
                f"run_fedit: need rounds >= 0, local_steps > 0, batch_size > 0; got {self.rounds}, "
                f"{self.local_steps}, {self.batch_size}"
            )
        if not 0.0 <= self.drop_prob < 1.0:
            raise ValueError(f"run_fedit: drop_prob must be in [0, 1), got {self.drop_prob}")
        if self.max_update_norm is not None and not self.max_update_norm > 0:
            raise ValueError(f"run_fedit: max_update_norm must be positive, got {self.max_update_norm}")
        if not 0 <= self.clients_per_round <= num_clients:
            raise ValueError(
                f"run_fedit: clients_per_round must be in [0, {num_clients}] (0: all), got {self.clients_per_round}"
            )


@dataclass
class FedState:
    """Everything needed to continue a federated run: checkpoint this after each round."""

    round: int  # rounds completed
    global_state: dict[str, torch.Tensor]  # the shared tensors
    private_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # per client, unshared tensors
    history: list[dict] = field(default_factory=list)


def local_update(
    model: nn.Module,
    client: Client,
    global_state: dict[str, torch.Tensor],
    private_state: dict[str, torch.Tensor],
    round: int,
    client_index: int,
    cfg: FedConfig,
    *,
    loss_fn: LossFn = classification_loss,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> tuple[ClientReply, dict[str, torch.Tensor]]:
    """Client k's part of round t: load phi^t (+ its private tensors) into the model, run cfg.local_steps
    AdamW steps on its data, and return (the reply to send: shared tensors, n_k, mean loss; its new
    private tensors). Batches come from derive_seed(seed, t, k), dropout etc. from
    derive_seed(seed, t, k, 1) in a forked RNG (the caller's global RNG state is left as it was).
    The model keeps the trained adapter; `global_state`'s keys decide which tensors are shared."""
    load_lora_state_dict(model, {**global_state, **private_state})
    with seeded(derive_seed(cfg.seed, round, client_index, 1), model_device(model)):
        batches = shuffled_batches(
            client.inputs, client.targets, cfg.batch_size, derive_seed(cfg.seed, round, client_index)
        )
        result = train_adapter(
            model,
            batches,
            cfg.local_steps,
            cfg.lr,
            cfg.weight_decay,
            loss_fn,
            autocast_dtype,
            desc=f"round {round} client {client.name}",
            progress=progress,
        )
    shared = {k: v for k, v in result.state.items() if k in global_state}
    private = {k: v for k, v in result.state.items() if k not in global_state}
    return ClientReply(shared, client.num_examples, result.mean_loss), private


class RoundOutcome(NamedTuple):
    global_state: dict[str, torch.Tensor]  # phi^{t+1} (phi^t itself when no update was accepted)
    accepted: list[int]  # client indices whose updates were averaged, sorted
    history: dict  # the round's record: clients, dropped, rejected (with reasons), mean loss, bytes


def server_round(
    round: int,
    global_state: dict[str, torch.Tensor],
    selected: Sequence[int],
    replies: Mapping[int, ClientReply],
    client_names: Sequence[str],
    max_update_norm: float | None = None,
) -> RoundOutcome:
    """The server's part of round t, given phi^t, the selected clients S_t and the replies that came back
    (client index -> ClientReply): the replies checked (rounds.check_replies: a bad one rejected with its
    reason, never raised), then the accepted ones averaged in sorted client order,
    phi^{t+1} = sum_k n_k phi_k / sum_k n_k (fedavg); with none accepted phi^t is kept."""
    accepted, history = check_replies(round, global_state, selected, replies, client_names, max_update_norm)
    if not accepted:
        return RoundOutcome(global_state, accepted, history)
    averaged = fedavg([replies[k][0] for k in accepted], [replies[k][1] for k in accepted])
    return RoundOutcome(averaged, accepted, history)


def run_fedit(
    model: nn.Module,
    clients: Sequence[Client],
    cfg: FedConfig,
    *,
    loss_fn: LossFn = classification_loss,
    share: Callable[[str], bool] | None = None,
    resume: FedState | None = None,
    on_round: Callable[[FedState], None] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    desc: str = "FedIT rounds",
) -> FedState:
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
    state = resume or FedState(
        0,
        {k: init[k] for k in shared_keys},
        {c.name: {k: v for k, v in init.items() if k not in shared_keys} for c in clients},
    )
    names = [c.name for c in clients]
    try:
        for t in progress_bar(
            range(state.round, cfg.rounds), desc, progress, stage=True, initial=state.round, total=cfg.rounds
        ):
            selected, dropped = sample_clients(cfg.seed, t, len(clients), per_round, cfg.drop_prob)
            replies, private = {}, {}
            for k in selected:
                if k not in dropped:
                    replies[k], private[k] = local_update(
                        model,
                        clients[k],
                        state.global_state,
                        state.private_states[names[k]],
                        t,
                        k,
                        cfg,
                        loss_fn=loss_fn,
                        autocast_dtype=autocast_dtype,
                        progress=progress,
                    )
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
