"""FedIT: FedAvg over adapter tensors, with one backbone in memory for any number of clients. Stands alone
(torch and tqdm only): copy this file into any project; it works on any model whose adapter is its trainable
tensors (lora.py's, or peft's).

FedIT (Zhang et al., 2024, arXiv 2305.05644) is FedAvg (McMahan et al., 2017) applied to the adapter (P). In
round t the server samples clients S_t; each starts from the global adapter phi^t, runs a few local AdamW steps
on its own data (train_adapter) and sends phi_k^{t+1} back; the server averages, weighted by data size n_k:

    phi^{t+1} = sum_{k in S_t} n_k phi_k^{t+1} / sum_{k in S_t} n_k                           (fedavg)

    state = run_fedit(model, clients, FedConfig(rounds=100, local_steps=5, lr=3e-3))   # state.global_state: phi_G
    phi_L = train_adapter(model, shuffled_batches(x, y, batch_size=32, seed=0), steps=100, lr=3e-3, start=phi_0).state

A client is its data plus its adapter tensors: switching client loads tensors into the one shared backbone, never
a copy of the model. run_fedit is a loop over one round's three steps, which a deployment calls on each side:
sample_clients (server), local_update (client), server_round (server: check the replies, fedavg the accepted).
Round t and client k draw all their randomness from derive_seed(seed, t, k, ...), so any process that knows the
seed repeats the draws, and a run resumed from its FedState ends bitwise equal to an uninterrupted one on CPU.
`share(name) -> bool` selects the federated tensors; the rest stay on the client (FedSA-LoRA: share only A).

Threads: on a CPU shared with other work, torch's default of one thread per core can be several times slower
than torch.set_num_threads(1) (10 FedIT rounds of the tiny demo: 8.35 s against 2.19 s on a busy 2-core
machine); the scripts set it with --threads. Progress: a bar when stderr is a terminal, one line per stage in a
log; progress=False for none.
"""

from __future__ import annotations

import logging
import math
import numbers
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Mapping, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- the adapter as tensors
def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: every trainable tensor, detached CPU copies (lora.lora_state_dict)."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def check_state(state, reference: dict[str, torch.Tensor], what: str) -> None:
    """A ValueError naming the tensor unless `state` has exactly `reference`'s keys, each a dense tensor of the
    reference's dtype and shape, with finite values."""
    if not isinstance(state, dict):
        raise ValueError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    if set(state) != set(reference):
        missing, extra = sorted(set(reference) - set(state), key=str), sorted(set(state) - set(reference), key=str)
        raise ValueError(f"{what}: keys do not match: missing {missing[:5]}, unexpected {extra[:5]}"[:400])
    for k, t in state.items():
        like = reference[k]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{what}: {k} is not a dense tensor ({getattr(t, 'layout', type(t).__name__)})")
        if t.dtype != like.dtype:
            raise ValueError(f"{what}: {k} has dtype {t.dtype}, expected {like.dtype}")
        if t.shape != like.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {k} holds NaN or Inf values")


@torch.no_grad()
def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter state into the model's trainable tensors, all checked first (never half loaded)."""
    if any(getattr(m, "merged", False) is True for m in model.modules()):
        raise ValueError("cannot load an adapter into a merged model: unmerge its LoRA layers first")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_state(state, params, "adapter")
    for k, p in params.items():
        p.copy_(state[k])


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes on the wire for a set of tensors: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ----------------------------------------------------------------------------- FedAvg
def _valid_count(n) -> bool:
    """A finite real number >= 0 and not a bool (a huge Python int counts as finite: the total catches it)."""
    return (
        not isinstance(n, bool) and isinstance(n, numbers.Real) and n >= 0 and (isinstance(n, int) or math.isfinite(n))
    )


def fedavg(states: Sequence[dict[str, torch.Tensor]], num_examples: Sequence[int]) -> dict[str, torch.Tensor]:
    """sum_k n_k state_k / sum_k n_k per tensor, accumulated in float64, returned in each tensor's dtype.

    A ValueError (never a silent NaN or zero) for: states whose keys, dtypes or shapes differ from client 0's or
    that hold NaN/Inf, an n_k that is not a finite real number >= 0 (bools too), a total not positive and finite."""
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
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if not all(isinstance(t, torch.Tensor) and t.dtype in floats for t in getattr(states[0], "values", list)()):
        raise ValueError("fedavg: client state 0 must be a dict of float16, bfloat16, float32 or float64 tensors")
    for i, s in enumerate(states):
        check_state(s, states[0] if i else s, f"fedavg: client state {i}" + (" (against client 0)" if i else ""))
    averaged = {}
    for k, ref in states[0].items():
        acc = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
        for s, n in zip(states, num_examples):
            acc += (n / total) * s[k].to(ref.device, torch.float64)  # a client's tensor may sit elsewhere
        averaged[k] = acc.to(ref.dtype)
    return averaged


# ----------------------------------------------------------------------------- local training
def progress_bar(items: Iterable, desc: str, progress: bool = True, stage: bool = False, **tqdm_args) -> tqdm:
    """tqdm over `items`, drawn only when stderr is a terminal (tqdm's disable=None), never with progress=False.
    In a log (stderr a file or a pipe) a stage (stage=True: FedIT's rounds, local training, evaluation) writes
    one line as it starts, "<desc>: <done>/<total>", and an inner bar (one client's steps) nothing."""
    bar = tqdm(items, desc=desc, disable=None if progress else True, **tqdm_args)
    if progress and stage and not sys.stderr.isatty():
        print(f"{desc}: {bar.n}/{bar.total if bar.total is not None else '?'}", file=sys.stderr, flush=True)
    return bar


def classification_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of model(inputs) against integer labels."""
    return F.cross_entropy(model(inputs), targets)


def shuffled_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int) -> Iterator:
    """Endless stream of (inputs, targets) minibatches, a fresh permutation every epoch, drawn from `seed`."""
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
    state: dict[str, torch.Tensor]  # the trained adapter (adapter_state)
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
    """`steps` AdamW steps on the model's trainable tensors only: theta <- AdamW(theta, grad loss_fn(model, x, y)).

    `batches` yields (inputs, targets) and is iterated again when exhausted (a list of batches, or the endless
    shuffled_batches). `start` is loaded first (phi_0 for every client's local adapter, so a loop over clients
    never starts one from the previous one's result); without it, training continues from the model's adapter.
    The model keeps the trained adapter. The mean loss stays on the device during the loop (no sync per step);
    dropout draws from torch's global RNG."""
    if steps <= 0:
        raise ValueError(f"train_adapter: steps must be positive, got {steps}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_adapter: the model has no trainable tensors (call lora.add_lora first)")
    if start is not None:
        load_adapter_state(model, start)  # copies into the same tensors: `params` stays the adapter
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
    return TrainResult(adapter_state(model), seen, loss_sum.item() / steps)


# ----------------------------------------------------------------------------- seeds and sampling
def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, round, client, ...): every random draw of a run is keyed by
    where it happens, so a resumed run repeats the uninterrupted one exactly."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch.manual_seed(seed) inside the block (dropout etc.); the caller's CPU and accelerator generator states
    are restored on exit, so the caller's own random streams are not disturbed."""
    devices = [] if device.type == "cpu" else list(range(torch.get_device_module(device.type).device_count()))
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


def sample_clients(
    seed: int, round: int, num_clients: int, clients_per_round: int, drop_prob: float = 0.0
) -> tuple[list[int], list[int]]:
    """Round `round`'s participants S_t: `clients_per_round` of range(num_clients) without replacement, sorted,
    from a generator seeded with derive_seed(seed, round); then, from the same generator, the simulated
    drop-outs: each selected client independently with probability drop_prob. Returns (selected, dropped)."""
    if not 1 <= clients_per_round <= num_clients:
        raise ValueError(f"sample_clients: clients_per_round must be in [1, {num_clients}], got {clients_per_round}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"sample_clients: drop_prob must be in [0, 1), got {drop_prob}")
    g = torch.Generator().manual_seed(derive_seed(seed, round))
    selected = sorted(torch.randperm(num_clients, generator=g)[:clients_per_round].tolist())
    dropped = [k for k, u in zip(selected, torch.rand(len(selected), generator=g).tolist()) if u < drop_prob]
    return selected, dropped


# ----------------------------------------------------------------------------- one round: client and server
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
    """How a federated run trains (no defaults for what an experiment must choose)."""

    rounds: int  # FedIT rounds R
    local_steps: int  # AdamW steps per client per round
    lr: float
    batch_size: int = 32
    weight_decay: float = 0.0
    clients_per_round: int = 0  # |S_t|; 0 = every client every round
    seed: int = 0  # every draw of the run: derive_seed(seed, round, client, ...)
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


class ClientReply(NamedTuple):
    """What a client sends back in a round: its shared tensors phi_k^{t+1}, its data size n_k (the FedAvg weight,
    not the number of examples seen) and its mean training loss."""

    state: dict[str, torch.Tensor]
    num_examples: int
    mean_loss: float


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
    """Client k's part of round t: load phi^t (+ its private tensors), run cfg.local_steps AdamW steps on its data,
    return (the reply to send; its new private tensors). Batches come from derive_seed(seed, t, k), dropout from
    derive_seed(seed, t, k, 1) in a forked RNG. `global_state`'s keys decide which tensors are shared."""
    load_adapter_state(model, {**global_state, **private_state})
    with seeded(derive_seed(cfg.seed, round, client_index, 1), model_device(model)):
        batches = shuffled_batches(
            client.inputs, client.targets, cfg.batch_size, derive_seed(cfg.seed, round, client_index)
        )
        desc = f"round {round} client {client.name}"
        result = train_adapter(
            model, batches, cfg.local_steps, cfg.lr, cfg.weight_decay, loss_fn, autocast_dtype, desc, progress
        )
    shared = {k: v for k, v in result.state.items() if k in global_state}
    private = {k: v for k, v in result.state.items() if k not in global_state}
    return ClientReply(shared, client.num_examples, result.mean_loss), private


def reply_problem(reply, global_state: dict[str, torch.Tensor], max_update_norm: float | None = None) -> str | None:
    """Why the server must not average a reply (None: it may): not a (state, n_k, loss) triple; a state that is
    not phi^t's keys, dtypes and shapes with finite values; ||phi_k - phi^t||_2 > max_update_norm; n_k not an int
    in [1, 2**53] (a larger one would overflow the total and outweigh everyone); a non-finite loss."""
    if not isinstance(reply, tuple) or len(reply) != 3:
        return "malformed reply (expected (state, num_examples, mean_loss))"
    state, n, loss = reply
    try:
        check_state(state, global_state, "update")
    except ValueError as e:
        return str(e)
    if max_update_norm is not None:
        sq = sum(
            float((u.to("cpu", torch.float64) - global_state[k].to("cpu", torch.float64)).pow(2).sum())
            for k, u in state.items()
        )
        if not math.sqrt(sq) <= max_update_norm:
            return f"update norm {math.sqrt(sq):.4g} exceeds max_update_norm {max_update_norm:g}"
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or not 1 <= n <= 2**53:
        return f"num_examples must be an int in [1, 2**53], got {n!r}"[:200]
    if isinstance(loss, bool) or not isinstance(loss, numbers.Real) or not math.isfinite(loss):
        return f"mean_loss must be a finite number, got {loss!r}"
    return None


class RoundOutcome(NamedTuple):
    global_state: dict[str, torch.Tensor]  # phi^{t+1} (phi^t itself when no update was accepted)
    accepted: list[int]  # client indices whose updates were averaged, sorted
    history: dict  # the round's record: clients, dropped, rejected (with reasons), mean loss, bytes


def _sent_bytes(reply) -> int:
    """state_bytes of whatever tensors a (possibly malformed) reply holds."""
    state = reply[0] if isinstance(reply, tuple) and reply else None
    return (
        state_bytes({k: v for k, v in state.items() if isinstance(v, torch.Tensor)}) if isinstance(state, dict) else 0
    )


def server_round(
    round: int,
    global_state: dict[str, torch.Tensor],
    selected: Sequence[int],
    replies: Mapping[int, ClientReply],
    client_names: Sequence[str],
    max_update_norm: float | None = None,
    problem: Callable = reply_problem,
) -> RoundOutcome:
    """The server's part of round t, given phi^t, S_t and the replies that came back (client index -> reply):
    each reply checked (`problem`, reply_problem by default: a bad one is logged and rejected with its reason,
    never raised), then phi^{t+1} = fedavg of the accepted ones in sorted client order; phi^t when none is.
    A selected client with no reply is a drop-out. bytes_down = |phi^t| |S_t|, bytes_up = every reply received;
    the record's mean loss is over the accepted replies."""
    rejected, accepted, losses = [], [], []
    for k in sorted(replies):
        reason = "not selected this round" if k not in selected else problem(replies[k], global_state, max_update_norm)
        if reason is not None:
            log.warning("round %d: rejected the update of client %s: %s", round, client_names[k], reason)
            rejected.append({"client": client_names[k], "reason": reason})
            continue
        accepted.append(k)
        losses.append(float(replies[k][2]))
    history = {
        "round": round,
        "clients": [client_names[k] for k in selected],
        "dropped": [client_names[k] for k in selected if k not in replies],
        "rejected": rejected,
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
        "bytes_down": state_bytes(global_state) * len(selected),
        "bytes_up": sum(_sent_bytes(replies[k]) for k in replies),
    }
    if not accepted:
        return RoundOutcome(global_state, accepted, history)
    averaged = fedavg([replies[k][0] for k in accepted], [replies[k][1] for k in accepted])
    return RoundOutcome(averaged, accepted, history)


# ----------------------------------------------------------------------------- the loop
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
    """FedIT from the model's current adapter phi_0 for cfg.rounds rounds, in one process: per round
    sample_clients, local_update for each selected client that does not drop out, then server_round.
    `resume` continues a saved FedState; `on_round(state)` runs after every round (checkpointing). The model's
    adapter is restored to phi_0 on return, and torch's global RNG state is the caller's. A client keeps its
    private (unshared) tensors only when its update was accepted."""
    if not clients:
        raise ValueError("run_fedit: no clients")
    cfg.check(len(clients))
    per_round = cfg.clients_per_round or len(clients)
    share = share or (lambda name: True)
    init = adapter_state(model)
    shared_keys = [k for k in init if share(k)]
    if not shared_keys:
        raise ValueError("run_fedit: `share` selects no adapter tensor to federate")
    private_init = {k: v for k, v in init.items() if k not in shared_keys}
    state = resume or FedState(0, {k: init[k] for k in shared_keys}, {c.name: dict(private_init) for c in clients})
    names = [c.name for c in clients]
    try:
        rounds = range(state.round, cfg.rounds)
        for t in progress_bar(rounds, desc, progress, stage=True, initial=state.round, total=cfg.rounds):
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
        load_adapter_state(model, init)
    return state
