"""The run state and its files: what has been trained so far, written so that a kill at any instant loses
nothing, the bytes a run writes grow linearly with its clients, and a resume accepts only this run's files.

    state = RunState(fingerprint(model, splits, cfg))       # a fresh run (a random run_id)
    save_state(state, path)                                 # checkpoint.pt: the federated rounds (atomic)
    parts = Parts(path, state, adapter=lora_state_dict(model), clients=names)
    parts.save("local", i, adapter, fallback)               # adapters/local-0003.pt: written once, atomic
    adapter, fallback = parts.load("local", i)              # read back when needed, checked
    state = load_state(path, fp, adapter=..., clients=names, rounds=R, snapshots=[2, 4])   # --resume

Two kinds of file (a single checkpoint holding every client's adapters and was rewritten after
each client, K^2 bytes for K clients):
  checkpoint.pt    what changes each round: FedIT's and FedSA-LoRA's fed.FedState (global adapter, FedSA's
                   per-client private tensors, histories), the fingerprint and the run_id. Rewritten after every
                   round; R rounds write R x (adapter + K x FedSA private part): linear in K.
  adapters/*.pt    what is made once: each client's local adapter phi_L and fine-tuned phi_G
                   (local-<i>.pt, finetuned-<i>.pt, i = the client's index) and FedIT's global snapshots
                   (snapshot-<round>.pt). Each is written once when it is made, never rewritten: 2K adapters.
Every file is written atomically (safe_files.atomic_write: a temporary file, fsync, rename), so a kill leaves each
file complete or absent; an absent part is trained again (every stage is seeded: the same bits). Nothing is
held in memory beyond what a stage uses: parts are read back when needed (memory flat in K).

The fingerprint is what the checkpointed adapters depend on: every training setting of the config, every
tensor of the model (parameters and buffers: the backbone, phi_0, normalisation constants; a sha256 of the
bytes, so one changed weight is a different model), the LoRA layers' scaling alpha / r (not a tensor) and
every client's data (sha256). Potara's and the grid's options are left out on purpose: resuming a finished
run with other estimator options only re-evaluates (cheap ablations). Each part file carries the sha256 of the
fingerprint and the run_id (random, drawn when a run starts from scratch): a part of another run (other
settings, or the same settings started over) is refused, as is one filed under another client or kind.

Every file is untrusted input: torch.load(weights_only=True) (it never runs code), then every part is checked
before it is used: each adapter against the model's (tensor_checks.check_tensors: keys, shapes, dtypes, layout, storage
bounds, finite values), round counts as integers within the run's rounds, histories as lists of round records
(with the Flower server's own fields when flower=True), client names among the run's clients, a snapshot for
every snapshot round already trained. Any failure is a one-line ResumeError, raised by load_state: the whole
state is checked when loading, never half-way through the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn as nn

from data import ClientSplits
from fed import FedState
from lora import lora_meta
from potara_guards.safe_files import (
    UnsafeFile,
    atomic_write,
    folder_problem,
    load_torch_file,
    make_folder,
    write_target_problem,
)
from potara_guards.tensor_checks import AdapterError, check_tensors

CHECKPOINT_FORMAT = "potara-checkpoint-v2"
PART_FORMAT = "potara-run-part-v1"
PARTS_DIR = "adapters"  # beside checkpoint.pt
PART_KINDS = ("local", "finetuned", "snapshot")
PART_NAME = re.compile(r"(local|finetuned|snapshot)-(\d{4,})\.pt")
START_OVER = "rerun without --resume to start over (or delete it)"


class ResumeError(ValueError):
    """The checkpoint cannot be resumed: another run's (training settings, model or data differ),
    unreadable (truncated, foreign, unsafe) or not sound (edited: wrong shapes, dtypes, counts, NaN/Inf)."""


@dataclass
class RunState:
    """What changes each round (checkpoint.pt). fedit / fedsa: the federated runs (fed.FedState fields as a
    dict, None before round 1); run_id: drawn when the run starts from scratch, written into each of its parts."""

    fingerprint: str
    fedit: dict | None = None
    fedsa: dict | None = None
    run_id: str = field(default_factory=lambda: secrets.token_hex(8))

    def fed_state(self, stage: str) -> FedState | None:
        saved = getattr(self, stage)
        return FedState(**saved) if saved else None


def fed_dict(s: FedState) -> dict:
    return {"round": s.round, "global_state": s.global_state, "private_states": s.private_states, "history": s.history}


TRAINING_FIELDS = (
    "rounds",
    "local_steps",
    "clients_per_round",
    "lr",
    "weight_decay",
    "batch_size",
    "local_train_steps",
    "finetune_steps",
    "snapshots",
    "fedsa",
    "seed",
)
FAULT_FIELDS = {"drop_prob": 0.0, "max_update_norm": None}  # fingerprinted only when set (as before)


def tensor_digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (any dtype or device): changes when any element does."""
    t = t.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}:{tuple(t.shape)}:".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def training_settings(cfg) -> dict:
    """The training fields of cfg (a config.ExperimentConfig) as the fingerprint holds them: TRAINING_FIELDS, and
    FAULT_FIELDS only when set."""
    training = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    training.update({k: getattr(cfg, k) for k, default in FAULT_FIELDS.items() if getattr(cfg, k) != default})
    return training


def fingerprint(model: nn.Module, splits: Sequence[ClientSplits], cfg) -> str:
    """What the checkpointed adapters depend on (module docstring), as JSON: the training fields of cfg (a
    pipeline.ExperimentConfig), a digest of every model parameter and buffer, the LoRA layers' r, alpha
    and scaling, and a digest of every client tensor."""
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # buffers: persistent or not
    return json.dumps(
        {
            "training": training_settings(cfg),
            "lora": lora_meta(model)["layers"],
            "model": {n: tensor_digest(t) for n, t in tensors.items()},
            "clients": [
                [s.name]
                + [
                    tensor_digest(getattr(s, f"{part}_{what}"))
                    for part in ("train", "val", "test")
                    for what in ("inputs", "targets")
                ]
                for s in splits
            ],
        },
        sort_keys=True,
    )


_LORA_TENSOR = re.compile(r"(?:^|\.)lora_[AB](?:_[qkv])?$")  # lora.py's factors: <module>.lora_A, .lora_B_q, ...
_ANY_CHANGE = "training settings, model or data"


def _setting_changes(saved: dict, now: dict) -> list[str]:
    """Each training setting whose value differs, as "<name> (<saved> there, <now> now)" (the name as the command
    line and the Flower run config spell it, without the dashes; an unset fault option: its default)."""
    value = lambda d, k: d.get(k, FAULT_FIELDS.get(k))
    names = [*TRAINING_FIELDS, *FAULT_FIELDS] + sorted(set(saved) - set(TRAINING_FIELDS) - set(FAULT_FIELDS))
    return [
        f"{k.replace('_', '-')} ({value(saved, k)} there, {value(now, k)} now)"
        for k in names
        if value(saved, k) != value(now, k)
    ]


def _rank_alpha(layers) -> tuple[int, float] | None:
    """(r, alpha) of a fingerprint's LoRA layers when every layer has the same (as the scripts make them)."""
    pairs = (
        {(x.get("r"), x.get("alpha")) for x in layers.values() if isinstance(x, dict)}
        if isinstance(layers, dict)
        else set()
    )
    return next(iter(pairs)) if len(pairs) == 1 else None


def _lora_change(saved: tuple | None, now: tuple | None) -> str:
    """The LoRA part of a resume message: both sides' r and alpha when each has one."""
    if saved is None or now is None or saved == now:
        return "LoRA rank/alpha"
    show = lambda ra: f"r={ra[0]} alpha={ra[1]:g}" if isinstance(ra[1], (int, float)) else f"r={ra[0]} alpha={ra[1]}"
    return f"LoRA rank/alpha ({show(saved)} there, {show(now)} now)"


def _differs(saved: str, fp: str) -> str:
    """What differs between two fingerprints (this module's, or the Flower server's: its settings under "flower",
    the backbone's and phi_0's digests), for the error message, and only what changed: each setting with both
    values; the LoRA layers; the model (its base tensors, or the initial adapter when neither the LoRA settings
    nor the seed explain it); the client data (unless the seed, which draws the splits, changed)."""
    try:
        a, b = json.loads(saved), json.loads(fp)
    except (TypeError, ValueError):
        return _ANY_CHANGE
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return _ANY_CHANGE
    lora_layers_changed = a.get("lora") != b.get("lora")
    changes, seed_changed, lora_changed = [], False, lora_layers_changed
    for key in ("training", "flower"):
        ta, tb = a.get(key), b.get(key)
        if isinstance(ta, dict) and isinstance(tb, dict):
            changes += _setting_changes(ta, tb)
            seed_changed |= ta.get("seed") != tb.get("seed")
            lora_changed |= (ta.get("rank"), ta.get("lora_alpha")) != (tb.get("rank"), tb.get("lora_alpha"))
        elif ta != tb:
            changes.append("training settings")
            seed_changed = True
    if lora_layers_changed:
        changes.append(_lora_change(_rank_alpha(a.get("lora")), _rank_alpha(b.get("lora"))))
    ma, mb = a.get("model"), b.get("model")
    if isinstance(ma, dict) and isinstance(mb, dict):
        part = lambda m, lora: {k: v for k, v in m.items() if bool(_LORA_TENSOR.search(k)) == lora}
        base_changed, adapter_changed = part(ma, False) != part(mb, False), part(ma, True) != part(mb, True)
    else:
        base_changed, adapter_changed = (
            ma != mb or a.get("backbone") != b.get("backbone"),
            a.get("phi0") != b.get("phi0"),
        )
    if base_changed or (adapter_changed and not lora_changed and not seed_changed):
        changes.append("model (backbone or initial adapter)")
    if a.get("clients") != b.get("clients") and not seed_changed:
        changes.append("client data")
    return ", ".join(changes) or _ANY_CHANGE


def check_settings(path: str, cfg, rank: int | None = None, alpha: float | None = None) -> None:
    """For a resume, before any work: a ResumeError (one line) naming each training setting of cfg (a
    config.ExperimentConfig) that differs from the one the checkpoint at `path` was written with, both values
    given, and the LoRA rank and alpha when given (every LoRA layer of the run has them). The model and the data
    are compared once they are built (load_state); no checkpoint: nothing to do."""
    if not os.path.exists(path):
        return
    ck = _read(path, START_OVER)
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a potara experiment checkpoint ({CHECKPOINT_FORMAT}); {START_OVER}")
    try:
        saved = json.loads(ck["fingerprint"])
        training, lora = saved["training"], _rank_alpha(saved["lora"])
    except (KeyError, TypeError, ValueError):
        return  # not a fingerprint of this format: load_state refuses it
    changes = _setting_changes(training, training_settings(cfg)) if isinstance(training, dict) else []
    if rank is not None and lora is not None and lora != (rank, float(alpha)):
        changes.append(_lora_change(lora, (rank, float(alpha))))
    if changes:
        raise ResumeError(
            f"{path} was written by a run with other {', '.join(changes)}; rerun with the same arguments, or "
            "without --resume to start over"
        )


def save_state(state: RunState, path: str) -> None:
    """checkpoint.pt: the fingerprint, the run_id and the federated states (atomic: safe_files.atomic_write)."""
    plain = {
        "format": CHECKPOINT_FORMAT,
        "fingerprint": state.fingerprint,
        "run_id": state.run_id,
        "fedit": state.fedit,
        "fedsa": state.fedsa,
    }
    atomic_write(path, lambda f: torch.save(plain, f))


def _read(path: str, what: str) -> object:
    """torch.load(weights_only=True): never runs code; any failure is a one-line ResumeError."""
    try:
        return load_torch_file(path)
    except Exception as e:  # noqa: BLE001 -- a pickle refused, truncated zip, a folder, ...: all mean "not usable"
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResumeError(f"{path} is unreadable (truncated, foreign or unsafe: {first}); {what}") from None


def load_state(
    path: str,
    fp: str,
    adapter: dict[str, torch.Tensor] | None = None,
    clients: Sequence[str] | None = None,
    rounds: int | None = None,
    snapshots: Sequence[int] | None = None,
    flower: bool = False,
) -> RunState:
    """The run state at `path` if it is this run's (fingerprint fp) and sound, with every part file beside it
    (Parts) checked when `snapshots` (the run's snapshot rounds) is given; else ResumeError (one line).
    adapter (the model's, e.g. phi_0), clients (the run's client names) and rounds (the run's round count; needed
    with snapshots) bound what the files may hold; each left None is not checked (beyond finite tensors).
    flower=True: the
    Flower server's checkpoint (FedIT only, at least one round, its history records' own fields)."""
    ck = _read(path, START_OVER)
    keys = ("format", "fingerprint", "run_id", "fedit", "fedsa")
    if not isinstance(ck, dict) or set(ck) != set(keys) or ck["format"] != CHECKPOINT_FORMAT:
        raise ResumeError(f"{path} is not a potara experiment checkpoint ({CHECKPOINT_FORMAT}); {START_OVER}")
    if ck["fingerprint"] != fp:
        raise ResumeError(
            f"{path} was written by a run with other {_differs(ck['fingerprint'], fp)}; "
            "rerun with the same arguments, or without --resume to start over"
        )
    state = RunState(fp, ck["fedit"], ck["fedsa"], ck["run_id"])
    try:
        _require(
            isinstance(state.run_id, str) and re.fullmatch(r"[0-9a-f]{16}", state.run_id) is not None,
            "run_id malformed",
        )
        _check_state(ck, adapter, clients, rounds, flower)
        if snapshots is not None:
            Parts(path, state, adapter, clients).check_all(snapshots, rounds)
    except (AdapterError, _Malformed) as e:
        raise ResumeError(f"{path} is damaged or edited ({e}); {START_OVER}") from None
    return state


class Parts:
    """The adapters a run makes once (module docstring): adapters/<kind>-<index>.pt beside checkpoint.pt, each
    stamped with the run it belongs to (the fingerprint's sha256 and the run_id), its kind and its client.
    kind "local" / "finetuned": index = the client's index in `clients`; kind "snapshot": index = the round."""

    def __init__(
        self, ckpt_path: str, state: RunState, adapter: dict | None = None, clients: Sequence[str] | None = None
    ):
        self.folder = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), PARTS_DIR)
        self.owner = {
            "fingerprint_sha256": hashlib.sha256(state.fingerprint.encode()).hexdigest(),
            "run_id": state.run_id,
        }
        self.state, self.adapter, self.clients = state, adapter, list(clients) if clients is not None else None

    def path(self, kind: str, index: int) -> str:
        return os.path.join(self.folder, f"{kind}-{index:04d}.pt")

    def exists(self, kind: str, index: int) -> bool:
        return os.path.isfile(self.path(kind, index))

    def _client(self, kind: str, index: int) -> str | None:
        return None if kind == "snapshot" or self.clients is None else self.clients[index]

    def save(self, kind: str, index: int, adapter: dict[str, torch.Tensor], fallback: dict | None = None) -> None:
        """Write one part, atomically (a kill leaves it complete or absent), into adapters/ made or checked first
        (safe_files.make_folder: never a link to another folder)."""
        make_folder(self.folder)
        payload = {
            "format": PART_FORMAT,
            **self.owner,
            "kind": kind,
            "index": index,
            "client": self._client(kind, index),
            "adapter": adapter,
            "fallback": fallback,
        }
        atomic_write(self.path(kind, index), lambda f: torch.save(payload, f))

    def load(self, kind: str, index: int) -> tuple[dict[str, torch.Tensor], dict | None]:
        """(adapter, the fallback record of its training or None), checked; ResumeError (one line) otherwise."""
        path = self.path(kind, index)
        part = _read(path, START_OVER)
        try:
            self._check(part, kind, index)
        except (AdapterError, _Malformed) as e:
            raise ResumeError(f"{path} is damaged, edited or another run's ({e}); {START_OVER}") from None
        return part["adapter"], part["fallback"]

    def _check(self, part, kind: str, index: int) -> None:
        keys = {"format", "fingerprint_sha256", "run_id", "kind", "index", "client", "adapter", "fallback"}
        _require(
            isinstance(part, dict) and set(part) == keys and part["format"] == PART_FORMAT,
            f"not a part file ({PART_FORMAT})",
        )
        _require(
            part["fingerprint_sha256"] == self.owner["fingerprint_sha256"] and part["run_id"] == self.owner["run_id"],
            "a part of another run",
        )
        client = self._client(kind, index)
        _require(
            part["kind"] == kind and part["index"] == index and type(part["index"]) is int and part["client"] == client,
            f"filed as {kind} {index} ({client}), it holds another part",
        )
        check_tensors(part["adapter"], self.adapter, what=f"{kind} adapter {index}")
        fb = part["fallback"]
        _require(
            fb is None
            or (
                kind != "snapshot"
                and isinstance(fb, dict)
                and set(fb) == {"client", "stage", "reason"}
                and fb["client"] == client
                and isinstance(fb["stage"], str)
                and isinstance(fb["reason"], str)
            ),
            "fallback malformed",
        )

    def check_all(self, snapshots: Sequence[int], rounds: int) -> None:
        """Every part file in the folder is this run's and sound, and every snapshot of a round FedIT has
        completed is there (the communication curve needs it); else _Malformed / ResumeError."""
        done = self.state.fedit["round"] if self.state.fedit else 0
        for r in snapshots:
            _require(r > done or self.exists("snapshot", r), f"the snapshot of round {r} is missing")
        names = sorted(os.listdir(self.folder)) if os.path.isdir(self.folder) else []
        for name in names:
            m = PART_NAME.fullmatch(name)
            if m is None:
                continue  # not a part (a leftover temporary file of a killed write): never read
            kind, index = m.group(1), int(m.group(2))
            expected = (
                index in snapshots if kind == "snapshot" else (self.clients is not None and index < len(self.clients))
            )
            _require(
                expected and name == os.path.basename(self.path(kind, index)),
                f"{PARTS_DIR}/{name} is no part of this run",
            )
            _require(kind == "snapshot" or done == rounds, f"{PARTS_DIR}/{name}: a client adapter before FedIT ended")
            self.load(kind, index)

    def clear(self) -> None:
        """Remove every part file (and leftover temporary file of one) of an earlier run: a run started from
        scratch must not meet them on --resume. Only names this module writes are touched, only regular files, and
        only in a real folder: adapters/ a link to another folder, or a directory, link or special file under a
        part's name, is refused (UnsafeFile, one line), nothing there is deleted."""
        problem = folder_problem(self.folder)
        if problem:
            raise UnsafeFile(f"{self.folder}: {problem}")
        if not os.path.isdir(self.folder):
            return
        names = [name for name in sorted(os.listdir(self.folder)) if PART_NAME.fullmatch(name.split(".tmp")[0])]
        for name in names:  # every one checked before any is removed
            problem = write_target_problem(os.path.join(self.folder, name))
            if problem:
                raise UnsafeFile(f"{os.path.join(self.folder, name)}: {problem}")
        for name in names:
            os.remove(os.path.join(self.folder, name))


def read_run(out_dir: str) -> dict:
    """A run folder as one dict, to inspect it (tests, studies): checkpoint.pt's fields plus "snapshots"
    {round: adapter}, "local" / "finetuned" {client: adapter} and "fallbacks" (by file name). Read with
    weights_only (no code runs) but not checked against a run: load_state is what a resume trusts."""
    ck = load_torch_file(os.path.join(out_dir, "checkpoint.pt"))
    run = {**ck, "snapshots": {}, "local": {}, "finetuned": {}, "fallbacks": []}
    folder = os.path.join(out_dir, PARTS_DIR)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if PART_NAME.fullmatch(name):
            part = load_torch_file(os.path.join(folder, name))
            run[part["kind"] + ("s" if part["kind"] == "snapshot" else "")][part["client"] or part["index"]] = part[
                "adapter"
            ]
            run["fallbacks"] += [part["fallback"]] if part["fallback"] else []
    return run


class _Malformed(ValueError):
    pass


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise _Malformed(what)


def _is_count(x, low: int, high: int | None) -> bool:
    return type(x) is int and x >= low and (high is None or x <= high)


def _check_state(
    ck: dict, adapter: dict | None, clients: Sequence[str] | None, rounds: int | None, flower: bool
) -> None:
    """Every part of checkpoint.pt, before any of it is used (ResumeError's reasons)."""
    known = set(clients) if clients is not None else None
    client_key = lambda c: isinstance(c, str) and (known is None or c in known)
    if flower:  # the server writes its checkpoint after each round, FedIT only
        _require(ck["fedit"] is not None and ck["fedsa"] is None, "fedit: missing (a Flower checkpoint has it)")
    for stage in ("fedit", "fedsa"):
        fed = ck[stage]
        if fed is None:
            continue
        _require(
            isinstance(fed, dict) and set(fed) == {"round", "global_state", "private_states", "history"},
            f"{stage}: not a federated state",
        )
        _require(_is_count(fed["round"], 0, rounds), f"{stage}: round {fed['round']!r} is not a count in [0, {rounds}]")
        glob, private = fed["global_state"], fed["private_states"]
        _require(isinstance(glob, dict) and isinstance(private, dict), f"{stage}: adapters are not dicts")
        ref_global = ref_private = None
        if adapter is not None:  # FedIT shares every adapter tensor, FedSA-LoRA a non-empty part of them
            _require(
                glob.keys() <= adapter.keys() and (glob.keys() == adapter.keys() or stage == "fedsa") and glob,
                f"{stage}: global adapter keys {sorted(glob)[:3]}... are not the model's",
            )
            ref_global = {k: adapter[k] for k in glob}
            ref_private = {k: v for k, v in adapter.items() if k not in glob}
        check_tensors(glob, ref_global, what=f"{stage} global adapter")
        _require(
            all(map(client_key, private)) and (known is None or set(private) == known),
            f"{stage}: private states of other clients than the run's",
        )
        for c, state in private.items():
            check_tensors(state, ref_private, what=f"{stage} private adapter of {c}")
        _check_history(stage, fed["history"], fed["round"], client_key, flower)
    _require(
        ck["fedsa"] is None or (ck["fedit"] is not None and rounds in (None, ck["fedit"]["round"])),
        "fedsa: started before FedIT ended",
    )


def _number(x) -> bool:
    return type(x) in (int, float) and x == x and abs(x) != float("inf")


def _check_history(stage: str, history, completed: int, client_key, flower: bool = False) -> None:
    """One record per completed round, as fed.server_round writes it (flower: plus the fields the Flower server
    adds, server_app.fedit_round: failed clients with their reasons, wire bytes, seconds)."""
    _require(
        isinstance(history, list) and len(history) == completed,
        f"{stage}: history must list one record per completed round ({completed})",
    )
    for t, h in enumerate(history):
        _require(
            isinstance(h, dict) and type(h.get("round")) is int and h["round"] == t, f"{stage}: history[{t}] malformed"
        )
        _require(all(_is_count(h.get(k), 0, None) for k in ("bytes_down", "bytes_up")), f"{stage}: history[{t}] bytes")
        for k in ("clients", "dropped"):
            _require(isinstance(h.get(k), list) and all(map(client_key, h[k])), f"{stage}: history[{t}] {k}")
        for k in ("rejected",) + (("failed",) if flower else ()):
            _require(
                isinstance(h.get(k), list)
                and all(
                    isinstance(r, dict) and client_key(r.get("client")) and isinstance(r.get("reason"), str)
                    for r in h[k]
                ),
                f"{stage}: history[{t}] {k}",
            )
        loss = h.get("mean_train_loss")
        _require(loss is None or _number(loss), f"{stage}: history[{t}] mean_train_loss")
        if flower:
            _require(
                all(_is_count(h.get(k), 0, None) for k in ("wire_bytes_down", "wire_bytes_up"))
                and _number(h.get("seconds"))
                and isinstance(h.get("client_seconds"), dict)
                and all(
                    client_key(c) and isinstance(s, dict) and all(map(_number, s.values()))
                    for c, s in h["client_seconds"].items()
                ),
                f"{stage}: history[{t}] wire bytes or seconds",
            )
