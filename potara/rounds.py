"""One FedIT round in the pieces a deployment calls: who takes part, what a client sends back, which replies the
server may average, what crossed the wire, and the seeds that make every draw repeatable. fedit.run_fedit calls
the same pieces in one process; an out-of-process deployment (e.g. a Flower app) calls them on each side:

    server: selected, _ = sample_clients(seed, t, K, clients_per_round)    # S_t, seeded by (seed, t)
            send phi^t (the shared tensors) to every k in selected
    client: reply, private = fedit.local_update(model, client, phi_t, private, t, k, FedConfig(...))
            send reply = ClientReply(shared tensors, n_k, mean loss); keep `private` (the unshared tensors)
    server: outcome = fedit.server_round(t, phi_t, selected, {k: reply_k received}, names, max_update_norm)
            phi^{t+1} = outcome.global_state; outcome.history is the round's record

A selected client that never answers is a drop-out. Every reply is untrusted: check_replies refuses a bad one
with its reason instead of raising (validate_update: keys, shapes, dtypes, layout, finite values, an optional
L2 bound on the update; then n_k and the loss), so one client cannot crash the aggregation. Limits, by design:
the reported n_k is trusted as the FedAvg weight once it is an int in [1, 2**53] (a client can claim more data
than it has), and a norm bound limits each update, not a group of colluding clients that each stay under it.

Reproducibility: round t draws its clients from a generator seeded with derive_seed(seed, t) and client k's
local batches and dropout from derive_seed(seed, t, k, ...), so any process that knows the seed repeats the
draws of the in-process loop, and a run resumed at round t ends bitwise equal to an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import math
import numbers
from contextlib import contextmanager
from typing import Iterator, Mapping, NamedTuple, Sequence

import torch

from .tensor_checks import check_tensors

log = logging.getLogger(__name__)  # potara.rounds


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several integers (seed, round, client, ...): every random draw of a run is
    keyed by where it happens, so a resumed run repeats the uninterrupted one exactly."""
    s = 0
    for p in parts:
        s = (s * 1_000_003 + int(p)) % (2**63 - 1)
    return s


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch.manual_seed(seed) inside the block (dropout etc.); the caller's CPU and accelerator
    generator states are restored on exit, so callers' own random streams are not disturbed."""
    devices = [] if device.type == "cpu" else list(range(torch.get_device_module(device.type).device_count()))
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        torch.manual_seed(seed)
        yield


def sample_clients(
    seed: int, round: int, num_clients: int, clients_per_round: int, drop_prob: float = 0.0
) -> tuple[list[int], list[int]]:
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


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes on the wire for a set of tensors: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in state.values())


def validate_update(
    update: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], max_norm: float | None = None
) -> str | None:
    """Why a client's update must not be aggregated, or None if it is fine. The update is untrusted:
    tensor_checks.check_tensors against the reference (phi^t) refuses wrong keys, shapes or dtypes, sparse, meta,
    expanded or out-of-storage tensors and NaN/Inf before anything is computed from it; then the L2
    distance ||update - reference|| over all tensors must be <= max_norm when given. Never raises."""
    try:
        check_tensors(update, reference, what="update")
    except ValueError as e:
        return str(e)
    if max_norm is not None:
        norm = math.sqrt(
            sum(
                float((u.to("cpu", torch.float64) - reference[k].to("cpu", torch.float64)).pow(2).sum())
                for k, u in update.items()
            )
        )
        if not norm <= max_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_norm:g}"
    return None


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


def check_replies(
    round: int,
    global_state: dict[str, torch.Tensor],
    selected: Sequence[int],
    replies: Mapping[int, ClientReply],
    client_names: Sequence[str],
    max_update_norm: float | None = None,
) -> tuple[list[int], dict]:
    """The server's checks of round t's replies (client index -> ClientReply): (accepted client indices,
    sorted; the round's record). A selected client with no reply is a drop-out; each reply is checked
    (validate_update, then n_k an int in [1, 2**53] and a finite loss) and a bad one is logged and rejected
    with its reason, never raised. bytes_down = |phi^t| * |S_t| (sent to every selected client), bytes_up =
    every reply received. The record's mean loss is over the accepted replies."""
    rejected, accepted, losses, up = [], [], [], 0
    for k in sorted(replies):
        reply = replies[k]
        up += _wire_bytes(reply[0] if isinstance(reply, tuple) and reply else None)
        reason = (
            "not selected this round" if k not in selected else _reply_problem(reply, global_state, max_update_norm)
        )
        if reason is not None:
            log.warning("round %d: rejected the update of client %s: %s", round, client_names[k], reason)
            rejected.append({"client": client_names[k], "reason": reason})
            continue
        accepted.append(k)
        losses.append(float(reply[2]))
    history = {
        "round": round,
        "clients": [client_names[k] for k in selected],
        "dropped": [client_names[k] for k in selected if k not in replies],
        "rejected": rejected,
        "mean_train_loss": sum(losses) / len(losses) if losses else None,
        "bytes_down": state_bytes(global_state) * len(selected),
        "bytes_up": up,
    }
    return accepted, history
