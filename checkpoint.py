"""The pipeline's run state and its checkpoint: what has been trained so far, saved atomically after every
round and every client's local training, and resumed only by the same run.

    state = RunState(fingerprint(model, splits, cfg))     # a fresh run
    save_state(state, path)                               # atomic (report.atomic_write)
    state = load_state(path, fingerprint(model, splits, cfg))   # --resume: ResumeError if not this run's

The fingerprint is what the checkpointed adapters depend on: the training settings, the model's tensors
and every client's data. Potara's and the grid's options are left out on purpose: resuming a finished run
with other estimator options only re-evaluates (cheap ablations). Checkpoints are loaded with
torch.load(weights_only=True): a checkpoint never runs code.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from typing import Sequence

import torch
import torch.nn as nn

from data import ClientSplits
from fed import FedState
from report import atomic_write


class ResumeError(ValueError):
    """The checkpoint cannot be resumed: another run's (training settings, model or data differ),
    unreadable (truncated, foreign) or holding NaN/Inf."""


@dataclass
class RunState:
    """Everything trained so far. fedit / fedsa: the federated runs (fed.FedState fields as a dict, None
    before round 1); snapshots: {round: FedIT's global adapter} for the communication curve; local /
    finetuned: {client: adapter}; fallbacks: trainings that diverged (the client kept its start adapter)."""
    fingerprint: str
    fedit: dict | None = None
    fedsa: dict | None = None
    snapshots: dict = field(default_factory=dict)
    local: dict = field(default_factory=dict)
    finetuned: dict = field(default_factory=dict)
    fallbacks: list = field(default_factory=list)

    def fed_state(self, stage: str) -> FedState | None:
        saved = getattr(self, stage)
        return FedState(**saved) if saved else None


def fed_dict(s: FedState) -> dict:
    return {"round": s.round, "global_state": s.global_state, "private_states": s.private_states, "history": s.history}


TRAINING_FIELDS = ("rounds", "local_steps", "clients_per_round", "lr", "weight_decay", "batch_size",
                   "local_train_steps", "finetune_steps", "snapshots", "fedsa", "seed")
FAULT_FIELDS = {"drop_prob": 0.0, "max_update_norm": None}  # fingerprinted only when set: older checkpoints stay valid


def fingerprint(model: nn.Module, splits: Sequence[ClientSplits], cfg) -> str:
    """What the checkpointed adapters depend on: the training fields of cfg (a pipeline.ExperimentConfig),
    every model tensor (a sum per tensor: backbone and phi_0) and every client tensor (sha256)."""
    digest = lambda t: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    training = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    training.update({k: getattr(cfg, k) for k, default in FAULT_FIELDS.items() if getattr(cfg, k) != default})
    return json.dumps({"training": training,
                       "model": {n: [list(p.shape), float(p.detach().double().sum())]
                                 for n, p in model.state_dict().items() if p.is_floating_point()},
                       "clients": [[s.name] + [digest(getattr(s, f"{part}_{what}")) for part in ("train", "val", "test")
                                               for what in ("inputs", "targets")] for s in splits]}, sort_keys=True)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def save_state(state: RunState, path: str) -> None:
    plain = {f.name: getattr(state, f.name) for f in fields(state)}  # not asdict: it deep-copies every tensor
    atomic_write(path, lambda f: torch.save(plain, f))


def load_state(path: str, fp: str) -> RunState:
    """The checkpoint at `path` if it is this run's (fingerprint fp) and sound; else ResumeError (one line)."""
    start_over = "rerun without --resume to start over (or delete it)"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResumeError(f"{path} is unreadable (truncated, foreign or unsafe: {first}); {start_over}") from None
    keys = ("fingerprint", "fedit", "fedsa", "snapshots", "local", "finetuned")
    if not isinstance(ck, dict) or any(k not in ck for k in keys):
        raise ResumeError(f"{path} is not a potara experiment checkpoint; {start_over}")
    if ck["fingerprint"] != fp:
        raise ResumeError(f"{path} was written by a run with other training settings, model or data; "
                          "rerun with the same arguments, or without --resume to start over")
    if not all(torch.isfinite(t).all() for t in _tensors(ck) if t.is_floating_point()):
        raise ResumeError(f"{path} holds NaN or Inf tensors (damaged or edited); {start_over}")
    return RunState(**{k: ck[k] for k in keys}, fallbacks=ck.get("fallbacks", []))
