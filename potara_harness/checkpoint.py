"""The pipeline's run state and its checkpoint: what has been trained so far, saved atomically after every
round and every client's local training, and resumed only by the same run.

    state = RunState(fingerprint(model, splits, cfg))     # a fresh run
    save_state(state, path)                               # atomic (files.atomic_write)
    state = load_state(path, fingerprint(model, splits, cfg), adapter=lora_state_dict(model),
                       clients=[s.name for s in splits], rounds=cfg.rounds)   # --resume

The fingerprint is what the checkpointed adapters depend on: every training setting of the config, every
tensor of the model (parameters and buffers: the backbone, phi_0, normalisation constants; a sha256 of the
bytes, so one changed weight is a different model), the LoRA layers' scaling alpha / r (not a tensor) and
every client's data (sha256). Potara's and the grid's options are left out on purpose: resuming a finished
run with other estimator options only re-evaluates (cheap ablations).

A checkpoint is untrusted input: it is loaded with torch.load(weights_only=True) (it never runs code) and
then every part is checked before it is used: each adapter against the model's (lora.check_tensors: keys,
shapes, dtypes, layout, storage bounds, finite values), round counts as integers within the run's rounds,
histories as lists of round records, client names among the run's clients. Any failure is a one-line
ResumeError.
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
from files import atomic_write
from lora import AdapterError, check_tensors, lora_meta


class ResumeError(ValueError):
    """The checkpoint cannot be resumed: another run's (training settings, model or data differ),
    unreadable (truncated, foreign, unsafe) or not sound (edited: wrong shapes, dtypes, counts, NaN/Inf)."""


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
FAULT_FIELDS = {"drop_prob": 0.0, "max_update_norm": None}  # fingerprinted only when set (as before)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (any dtype or device): changes when any element does."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def fingerprint(model: nn.Module, splits: Sequence[ClientSplits], cfg) -> str:
    """What the checkpointed adapters depend on (module docstring), as JSON: the training fields of cfg (a
    pipeline.ExperimentConfig), a digest of every model parameter and buffer, the LoRA layers' r, alpha
    and scaling, and a digest of every client tensor."""
    training = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    training.update({k: getattr(cfg, k) for k, default in FAULT_FIELDS.items() if getattr(cfg, k) != default})
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # buffers: persistent or not
    return json.dumps({"training": training, "lora": lora_meta(model)["layers"],
                       "model": {n: tensor_digest(t) for n, t in tensors.items()},
                       "clients": [[s.name] + [tensor_digest(getattr(s, f"{part}_{what}"))
                                               for part in ("train", "val", "test") for what in ("inputs", "targets")]
                                   for s in splits]}, sort_keys=True)


def _differs(saved: str, fp: str) -> str:
    """Which part of two fingerprints differs, for the error message."""
    try:
        a, b = json.loads(saved), json.loads(fp)
    except (TypeError, ValueError):
        return "training settings, model or data"
    if a.get("training") != b.get("training") and isinstance(a.get("training"), dict):
        ta, tb = a["training"], b.get("training") or {}
        keys = sorted(k for k in set(ta) | set(tb) if ta.get(k) != tb.get(k))
        return "training settings " + ", ".join(keys)
    labels = {"lora": "LoRA rank/alpha", "model": "model (backbone or initial adapter)", "clients": "client data"}
    return ", ".join(label for k, label in labels.items() if a.get(k) != b.get(k)) or "training settings, model or data"


def _tensors(obj):
    """Every tensor in nested dicts / lists (a checkpoint's)."""
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


def load_state(path: str, fp: str, adapter: dict[str, torch.Tensor] | None = None,
               clients: Sequence[str] | None = None, rounds: int | None = None) -> RunState:
    """The checkpoint at `path` if it is this run's (fingerprint fp) and sound; else ResumeError (one line).
    adapter (the model's, e.g. phi_0), clients (the run's client names) and rounds (the run's round count)
    bound what the checkpoint may hold; each left None is not checked (beyond finite tensors)."""
    start_over = "rerun without --resume to start over (or delete it)"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- a pickle refused, truncated zip, ...: all mean "not usable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResumeError(f"{path} is unreadable (truncated, foreign or unsafe: {first}); {start_over}") from None
    keys = ("fingerprint", "fedit", "fedsa", "snapshots", "local", "finetuned")
    if not isinstance(ck, dict) or any(k not in ck for k in keys):
        raise ResumeError(f"{path} is not a potara experiment checkpoint; {start_over}")
    if ck["fingerprint"] != fp:
        raise ResumeError(f"{path} was written by a run with other {_differs(ck['fingerprint'], fp)}; "
                          "rerun with the same arguments, or without --resume to start over")
    try:
        _check_state(ck, adapter, clients, rounds)
    except (AdapterError, _Malformed) as e:
        raise ResumeError(f"{path} is damaged or edited ({e}); {start_over}") from None
    return RunState(**{k: ck[k] for k in keys}, fallbacks=ck.get("fallbacks", []))


class _Malformed(ValueError):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _is_count(x, low: int, high: int | None) -> bool:
    return type(x) is int and x >= low and (high is None or x <= high)


def _check_state(ck: dict, adapter: dict | None, clients: Sequence[str] | None, rounds: int | None) -> None:
    """Every part of a checkpoint dict, before any of it is used (ResumeError's reasons)."""
    known = set(clients) if clients is not None else None
    client_key = lambda c: isinstance(c, str) and (known is None or c in known)
    for stage in ("fedit", "fedsa"):
        fed = ck[stage]
        if fed is None:
            continue
        _require(isinstance(fed, dict) and set(fed) == {"round", "global_state", "private_states", "history"},
                 f"{stage}: not a federated state")
        _require(_is_count(fed["round"], 0, rounds), f"{stage}: round {fed['round']!r} is not a count in [0, {rounds}]")
        glob, private = fed["global_state"], fed["private_states"]
        _require(isinstance(glob, dict) and isinstance(private, dict), f"{stage}: adapters are not dicts")
        ref_global = ref_private = None
        if adapter is not None:  # FedIT shares every adapter tensor, FedSA-LoRA a non-empty part of them
            _require(glob.keys() <= adapter.keys() and (glob.keys() == adapter.keys() or stage == "fedsa") and glob,
                     f"{stage}: global adapter keys {sorted(glob)[:3]}... are not the model's")
            ref_global = {k: adapter[k] for k in glob}
            ref_private = {k: v for k, v in adapter.items() if k not in glob}
        check_tensors(glob, ref_global, what=f"{stage} global adapter")
        _require(all(map(client_key, private)) and (known is None or set(private) == known),
                 f"{stage}: private states of other clients than the run's")
        for c, state in private.items():
            check_tensors(state, ref_private, what=f"{stage} private adapter of {c}")
        _check_history(stage, fed["history"], fed["round"], client_key)
    _require(isinstance(ck["snapshots"], dict) and all(_is_count(r, 1, rounds) for r in ck["snapshots"]),
             "snapshots: rounds must be counts within the run's rounds")
    for r, state in ck["snapshots"].items():
        check_tensors(state, adapter, what=f"snapshot of round {r}")
    for part in ("local", "finetuned"):
        _require(isinstance(ck[part], dict) and all(map(client_key, ck[part])), f"{part}: adapters of unknown clients")
        for c, state in ck[part].items():
            check_tensors(state, adapter, what=f"{part} adapter of {c}")
    fallbacks = ck.get("fallbacks", [])
    _require(isinstance(fallbacks, list) and all(
        isinstance(f, dict) and set(f) == {"client", "stage", "reason"} and client_key(f["client"])
        and isinstance(f["stage"], str) and isinstance(f["reason"], str) for f in fallbacks), "fallbacks: malformed")


def _check_history(stage: str, history, completed: int, client_key) -> None:
    """One record per completed round, as fed.server_round writes it."""
    _require(isinstance(history, list) and len(history) == completed,
             f"{stage}: history must list one record per completed round ({completed})")
    for t, h in enumerate(history):
        _require(isinstance(h, dict) and type(h.get("round")) is int and h["round"] == t,
                 f"{stage}: history[{t}] malformed")
        _require(all(_is_count(h.get(k), 0, None) for k in ("bytes_down", "bytes_up")), f"{stage}: history[{t}] bytes")
        for k in ("clients", "dropped"):
            _require(isinstance(h.get(k), list) and all(map(client_key, h[k])), f"{stage}: history[{t}] {k}")
        rejected = h.get("rejected")
        _require(isinstance(rejected, list) and all(isinstance(r, dict) and client_key(r.get("client")) for r in rejected),
                 f"{stage}: history[{t}] rejected")
        loss = h.get("mean_train_loss")
        _require(loss is None or (type(loss) in (int, float) and loss == loss and abs(loss) != float("inf")),
                 f"{stage}: history[{t}] mean_train_loss")
