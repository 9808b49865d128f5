"""The shared, model-agnostic experiment: Potara beside every baseline, on any model whose adapter
is its trainable tensors (lora.add_lora) and any per-client data. run_cifar.py (ViT, images) and
run_llm.py (causal LM, tokens) both call it; only the model, the data and three plug-ins differ.

API (stable):
    splits  = [ClientSplits(name, train_inputs, train_targets, val_inputs, val_targets,
                            test_inputs, test_targets), ...]           # one per client, CPU tensors
    cfg     = ExperimentConfig(rounds=20, local_steps=10, ...)        # every default below
    results = run_experiment(model, splits, cfg, out_dir,
                             evaluate=accuracy,                       # (model, inputs, targets) -> float
                             loss_fn=fed.classification_loss,         # (model, inputs, targets) -> loss
                             likelihood=potara.classification_likelihood,
                             resume=False, config={...plain data saved in results.json...},
                             autocast_dtype=None, progress=True,
                             on_round=None)                           # (stage, FedState) after each round
    # raises ResumeError when resume=True finds a checkpoint of another run (fingerprint differs) or
    # one that is unreadable, not a potara checkpoint, or holds NaN/Inf;
    # results["methods"][m] = {label, mean, per_client, bytes} for m in METHODS
    # writes out_dir/results.json, results.md, checkpoint.pt (+ lambda.png, communication.png
    # when matplotlib imports); print(markdown_table(results)) shows the table.
    # CLI helpers shared by the scripts: add_experiment_options(ap), check_experiment_options(ap, args),
    # config_from_args(args); dir_problem(path) (an unusable --out), atomic_write(path, write_fn).

Pipeline (one backbone in memory; a client is switched in by loading adapter tensors):
  phi_0 = the model's adapter on entry (shared initial adapter, LoRA B = 0)
  1. FedIT for `rounds` rounds (fed.run_fedit), global snapshots kept at `snapshots` round counts
  2. FedSA-LoRA: FedIT sharing only the LoRA A factors; B and the head stay on each client
  3. per client: local adapter phi_L from phi_0 (local_train_steps), and phi_G fine-tuned locally
  4. per client, on its own test split: every method of METHODS; the lam grid on val and test
  5. the communication curve: FedIT alone and Potara after each snapshot, against bytes sent
Checkpoint: out_dir/checkpoint.pt is rewritten atomically (temporary file + os.replace) after every
round and every client's local training; resume=True continues from it (training settings, model and
data must match: `fingerprint`) and ends bitwise equal to an uninterrupted run on CPU (every stage is
seeded from (seed, round, client)). Potara's options are not in the fingerprint: resuming a finished
run with other estimator options only re-evaluates (cheap ablations).
Bytes: a method costs what its training sent both ways: local only 0, FedSA-LoRA its own history,
every other method FedIT's history (merging and Fisher statistics are on-device).
Faults (results["faults"], one summary line under the table): clients that dropped out (cfg.drop_prob) or
whose update was rejected (cfg.max_update_norm, NaN/Inf: fed.validate_update), per federated run; a local
training that diverged (NaN/Inf adapter: warned, the client keeps the adapter it started from); NaN/Inf
gradient statistics (warned; potara_weight's rules: NaN -> lam = 0.5; Fisher merging takes them as 0). No
adapter with NaN/Inf is ever scored or saved; results.json is strict JSON (NaN/Inf written as null).
Every output (checkpoint, results.json/.md, plots) is written atomically (atomic_write).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import IO, Callable, Sequence

import torch
import torch.nn as nn

from fed import (Client, FedState, LossFn, classification_loss, derive_seed, run_fedit, shuffled_batches,
                 state_bytes, train_adapter)
from lora import load_lora_state_dict, lora_factor, lora_state_dict
from potara import (DEFAULT_ESTIMATOR, ESTIMATORS, Likelihood, classification_likelihood, fisher_merge,
                    gradient_stats, merge_adapters, personalize)

Evaluate = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]
METHODS = ("local", "fedit", "fedit_ft", "uniform", "fisher", "fedsa", "grid_val", "grid_oracle",
           "potara_ab", "potara_delta")
METHOD_LABELS = {"local": "Local only", "fedit": "FedIT (global adapter)", "fedit_ft": "FedIT + local fine-tuning",
                 "uniform": "Uniform merge (lam = 0.5)", "fisher": "Fisher merging", "fedsa": "FedSA-LoRA",
                 "grid_val": "Grid search on val", "grid_oracle": "Grid oracle on test (not a method)",
                 "potara_ab": "Potara (A/B space)", "potara_delta": "Potara (delta space)"}


class ResumeError(ValueError):
    """The checkpoint in out_dir cannot be resumed: another run's (training settings, model or data
    differ), unreadable (truncated, foreign) or holding NaN/Inf."""


@dataclass
class ClientSplits:
    """One client's data, drawn from its own distribution: train (its FedIT/local data and the Fisher's
    samples), val (the grid search's choice), test (what every method is scored on)."""
    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor

    def __post_init__(self):
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"{part}_inputs"), getattr(self, f"{part}_targets")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(f"client {self.name}: {part} split needs as many inputs as targets and at "
                                 f"least one example, got {len(x)} inputs and {len(y)} targets")

    def client(self) -> Client:
        return Client(self.name, self.train_inputs, self.train_targets)


@dataclass
class ExperimentConfig:
    rounds: int = 20                # FedIT rounds R
    local_steps: int = 10           # optimizer steps per client per round
    clients_per_round: int = 0      # 0 = every client every round
    lr: float = 1e-3                # AdamW, for FedIT, FedSA, local training and fine-tuning alike
    weight_decay: float = 0.0
    batch_size: int = 32
    local_train_steps: int = 200    # the local-only adapter phi_L, from phi_0
    finetune_steps: int = 50        # "FedIT then local fine-tuning", from phi_G
    fisher_samples: int = 100       # client samples for Potara's statistics (at most the split's size)
    fisher_labels: str = "empirical"  # "empirical" (true labels) or "sampled" (true Fisher)
    fisher_split: str = "val"       # which client split the statistics use: "val" (held out; what the default
                                    # estimator needs) or "train" (the paper's ~32 training samples, for "paper")
    fisher_chunk: int | None = None  # vmap chunk of per-sample gradients (lower GPU memory for large models)
    eps: float = 1e-3               # potara's relative Fisher floor ("paper", "bias")
    granularity: str = "client"     # one lam per client, or "module": one per adapted module
    estimator: str = DEFAULT_ESTIMATOR  # a key of potara.ESTIMATORS
    grid_step: float = 0.05         # lam grid 0, step, ..., 1
    grid_space: str = "ab"          # merge space of the uniform merge and of the grid
    snapshots: int = 4              # evenly spaced FedIT round counts for the communication curve
    fedsa: bool = True              # run the FedSA-LoRA baseline (a second federated run)
    seed: int = 0
    drop_prob: float = 0.0          # chance that a selected client never returns its update (simulated)
    max_update_norm: float | None = None  # reject updates with ||phi_k - phi^t||_2 above it (None: no bound)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of model(inputs) (logits, or an output with .logits) against integer labels."""
    device, correct = next(model.parameters()).device, 0
    for i in range(0, len(inputs), batch_size):
        out = model(inputs[i:i + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1).cpu() == targets[i:i + batch_size]).sum())
    return correct / len(inputs)


def snapshot_rounds(rounds: int, snapshots: int) -> list[int]:
    return sorted({max(1, round(rounds * i / snapshots)) for i in range(1, snapshots + 1)}) if snapshots else [rounds]


def lam_grid(step: float) -> list[float]:
    n = round(1 / step)
    return [round(i / n, 10) for i in range(n + 1)]


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """write(f) into a temporary file beside `path`, fsync, then os.replace (atomic on POSIX): whenever the
    process dies (SIGKILL, power loss), `path` holds the previous complete file or the new one, never a part."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _save(obj: dict, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def _fed_dict(s: FedState) -> dict:
    return {"round": s.round, "global_state": s.global_state, "private_states": s.private_states, "history": s.history}


TRAINING_FIELDS = ("rounds", "local_steps", "clients_per_round", "lr", "weight_decay", "batch_size",
                   "local_train_steps", "finetune_steps", "snapshots", "fedsa", "seed")
FAULT_FIELDS = {"drop_prob": 0.0, "max_update_norm": None}  # fingerprinted only when set: older checkpoints stay valid


def fingerprint(model: nn.Module, splits: Sequence[ClientSplits], cfg: ExperimentConfig) -> str:
    """What the checkpointed adapters depend on: the training fields of cfg, every model tensor (a sum
    per tensor: backbone and phi_0) and every client tensor (sha256). Potara's and the grid's options are
    left out on purpose: resume=True with other estimator options re-evaluates without retraining."""
    digest = lambda t: hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
    training = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    training.update({k: getattr(cfg, k) for k, default in FAULT_FIELDS.items() if getattr(cfg, k) != default})
    return json.dumps({"training": training,
                       "model": {n: [list(p.shape), float(p.detach().double().sum())]
                                 for n, p in model.state_dict().items() if p.is_floating_point()},
                       "clients": [[s.name] + [digest(getattr(s, f"{part}_{what}")) for part in ("train", "val", "test")
                                               for what in ("inputs", "targets")] for s in splits]}, sort_keys=True)


CHECKPOINT_KEYS = ("fingerprint", "fedit", "fedsa", "snapshots", "local", "finetuned")


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def load_checkpoint(path: str, fp: str) -> dict:
    """The checkpoint at `path` if it is this run's (fingerprint fp) and sound; else ResumeError (one line).
    Loaded with weights_only=True: a checkpoint never runs code."""
    start_over = "rerun without --resume to start over (or delete it)"
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ResumeError(f"{path} is unreadable (truncated, foreign or unsafe: {first}); {start_over}") from None
    if not isinstance(ck, dict) or any(k not in ck for k in CHECKPOINT_KEYS):
        raise ResumeError(f"{path} is not a potara experiment checkpoint; {start_over}")
    if ck["fingerprint"] != fp:
        raise ResumeError(f"{path} was written by a run with other training settings, model or data; "
                          "rerun with the same arguments, or without --resume to start over")
    if not all(torch.isfinite(t).all() for t in _tensors(ck) if t.is_floating_point()):
        raise ResumeError(f"{path} holds NaN or Inf tensors (damaged or edited); {start_over}")
    ck.setdefault("fallbacks", [])  # written by versions before the divergence fallback
    return ck


def run_experiment(model: nn.Module, splits: Sequence[ClientSplits], cfg: ExperimentConfig, out_dir: str,
                   evaluate: Evaluate = accuracy, loss_fn: LossFn = classification_loss,
                   likelihood: Likelihood = classification_likelihood, resume: bool = False,
                   config: dict | None = None, autocast_dtype: torch.dtype | None = None, progress: bool = True,
                   on_round: Callable[[str, FedState], None] | None = None) -> dict:
    """Run every stage (module docstring), write the outputs, return the results dict.
    on_round(stage, state) is called after each checkpointed round (stage "fedit" or "fedsa")."""
    names = [s.name for s in splits]
    if not splits or len(set(names)) != len(names):
        raise ValueError(f"run_experiment: need at least one client and unique client names, got {names}")
    if cfg.fisher_split not in ("train", "val"):
        raise ValueError(f"fisher_split must be 'train' or 'val', got {cfg.fisher_split!r}")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    device = next(model.parameters()).device
    init = lora_state_dict(model)
    fp = fingerprint(model, splits, cfg)
    ck = {"fingerprint": fp, "fedit": None, "fedsa": None, "snapshots": {}, "local": {}, "finetuned": {},
          "fallbacks": []}
    if resume and os.path.exists(ckpt_path):
        ck = load_checkpoint(ckpt_path, fp)
        print(f"resuming from {ckpt_path}: FedIT at round {ck['fedit']['round'] if ck['fedit'] else 0}, "
              f"{len(ck['local'])} local adapters")
    elif resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    clients = [s.client() for s in splits]
    cpr = cfg.clients_per_round or len(clients)
    snaps = snapshot_rounds(cfg.rounds, cfg.snapshots)
    timing: dict[str, float] = {}
    autocast = lambda: torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16,
                                      enabled=autocast_dtype is not None)

    def federate(stage: str, share) -> FedState:
        t0, saved = time.time(), ck[stage]

        def checkpoint(state: FedState) -> None:
            ck[stage] = _fed_dict(state)
            if stage == "fedit" and state.round in snaps:
                ck["snapshots"][state.round] = state.global_state
            _save(ck, ckpt_path)
            if on_round is not None:
                on_round(stage, state)

        state = run_fedit(model, clients, cfg.rounds, cfg.local_steps, cpr, cfg.lr, cfg.seed, cfg.batch_size,
                          cfg.weight_decay, loss_fn, share, FedState(**saved) if saved else None, checkpoint,
                          autocast_dtype, progress, drop_prob=cfg.drop_prob, max_update_norm=cfg.max_update_norm)
        timing[stage] = time.time() - t0
        return state

    def train_from(start: dict, split: ClientSplits, steps: int, seed: int, stage: str) -> dict:
        load_lora_state_dict(model, start)
        torch.manual_seed(seed)
        batches = shuffled_batches(split.train_inputs, split.train_targets, cfg.batch_size, seed)
        state = train_adapter(model, batches, steps, cfg.lr, cfg.weight_decay, loss_fn, autocast_dtype,
                              desc=f"{stage} {split.name}", progress=progress).state
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:  # diverged (e.g. NaN in the client's data): never keep a NaN adapter
            reason = f"{stage} training gave NaN/Inf in {bad[0]}" + (f" (+{len(bad) - 1} more)" if bad[1:] else "")
            warnings.warn(f"client {split.name}: {reason}; it keeps the adapter it started from")
            ck["fallbacks"].append({"client": split.name, "stage": stage, "reason": reason})
            return dict(start)
        return state

    fedit = federate("fedit", None)
    G = fedit.global_state
    fedsa = federate("fedsa", lambda k: lora_factor(k) == "A") if cfg.fedsa else None
    t0 = time.time()
    for i, s in enumerate(_bar(splits, "local training", progress)):
        if s.name not in ck["local"]:
            ck["local"][s.name] = train_from(init, s, cfg.local_train_steps, derive_seed(cfg.seed, i, 101), "local")
            _save(ck, ckpt_path)
        if s.name not in ck["finetuned"]:
            ck["finetuned"][s.name] = train_from(G, s, cfg.finetune_steps, derive_seed(cfg.seed, i, 202), "fine-tune")
            _save(ck, ckpt_path)
    load_lora_state_dict(model, init)
    timing["local"] = time.time() - t0

    def score(state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
        load_lora_state_dict(model, state, allow_rank_change=True)
        model.eval()
        with autocast():
            value = float(evaluate(model, x, y))
        load_lora_state_dict(model, init, allow_rank_change=True)  # back to rank r after a delta merge
        return value

    def stat_batches(i: int, s: ClientSplits):
        """The statistics' samples: min(fisher_samples, split size) of the chosen split, in one batch."""
        x, y = (s.train_inputs, s.train_targets) if cfg.fisher_split == "train" else (s.val_inputs, s.val_targets)
        return shuffled_batches(x, y, min(cfg.fisher_samples, len(y)), derive_seed(cfg.seed, i, 303))

    def potara(i: int, s: ClientSplits, global_state: dict, stats=None) -> tuple[dict, dict]:
        return personalize(model, global_state, ck["local"][s.name], stat_batches(i, s), cfg.fisher_samples,
                           cfg.fisher_labels, cfg.eps, cfg.granularity, "ab", cfg.estimator, likelihood,
                           seed=derive_seed(cfg.seed, i, 404), chunk_size=cfg.fisher_chunk, stats=stats)

    t0, grid = time.time(), lam_grid(cfg.grid_step)
    acc = {m: {} for m in METHODS if cfg.fedsa or m != "fedsa"}
    per_client, bad_stats = {}, []
    for i, s in enumerate(_bar(splits, "evaluation", progress)):
        L, test = ck["local"][s.name], (s.test_inputs, s.test_targets)
        acc["local"][s.name], acc["fedit"][s.name] = score(L, *test), score(G, *test)
        acc["fedit_ft"][s.name] = score(ck["finetuned"][s.name], *test)
        acc["uniform"][s.name] = score(merge_adapters(G, L, 0.5, cfg.grid_space), *test)
        stats = gradient_stats(model, G, L, stat_batches(i, s), cfg.fisher_samples, cfg.fisher_labels, likelihood,
                               seed=derive_seed(cfg.seed, i, 404), chunk_size=cfg.fisher_chunk)
        fisher = {m: f for m, f in (("G", stats.fisher_G), ("L", stats.fisher_L))}
        if not all(torch.isfinite(v).all() for f in fisher.values() for v in f.values()):
            warnings.warn(f"client {s.name}: NaN/Inf in the Fisher; Fisher merging takes those entries as 0")
            fisher = {m: {k: torch.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in f.items()} for m, f in fisher.items()}
            bad_stats.append({"client": s.name, "what": "Fisher (Fisher merging: non-finite entries taken as 0)"})
        acc["fisher"][s.name] = score(fisher_merge(G, L, fisher["G"], fisher["L"]), *test)
        if fedsa is not None:
            acc["fedsa"][s.name] = score({**fedsa.global_state, **fedsa.private_states[s.name]}, *test)
        merged, info = potara(i, s, G, stats)  # the statistics Fisher merging used: one pass, not two
        terms = [v for t in "abc" for v in (info[t].values() if isinstance(info[t], dict) else [info[t]])]
        if not all(math.isfinite(v) for v in terms):
            warnings.warn(f"client {s.name}: non-finite variance terms (a, b, c) = {info['a']}, {info['b']}, "
                          f"{info['c']}; Potara's lam = {info['lam']}")
            bad_stats.append({"client": s.name, "what": f"variance terms (Potara: lam = {info['lam']})"})
        acc["potara_ab"][s.name] = score(merged, *test)
        # the same lam in both spaces: the statistics are of phi_G and phi_L, not of the merged adapter
        acc["potara_delta"][s.name] = score(merge_adapters(G, L, info["lam"], "delta"), *test)
        val_curve, test_curve = [], []
        for lam in grid:
            state = merge_adapters(G, L, lam, cfg.grid_space)
            val_curve.append(score(state, s.val_inputs, s.val_targets))
            test_curve.append(score(state, *test))
        best = max(val_curve)  # ties: the lam closest to 0.5 (no preference for either model)
        j = min((j for j, v in enumerate(val_curve) if v == best), key=lambda j: (abs(grid[j] - 0.5), j))
        acc["grid_val"][s.name], acc["grid_oracle"][s.name] = test_curve[j], max(test_curve)
        lam_p = _mean(info["lam"].values()) if isinstance(info["lam"], dict) else info["lam"]
        per_client[s.name] = {"potara": info, "lam_potara": lam_p, "lam_grid_val": grid[j],
                              "lam_grid_oracle": grid[max(range(len(grid)), key=lambda j: test_curve[j])],
                              "abs_lam_diff": abs(lam_p - grid[j]), "grid": {"lam": grid, "val": val_curve,
                                                                                  "test": test_curve}}
    timing["evaluation"] = time.time() - t0

    t0 = time.time()
    sent = lambda h: sum(r["bytes_down"] + r["bytes_up"] for r in h)
    curve = [{"round": 0, "bytes": 0, "fedit": None, "potara": None, "local": _mean(acc["local"].values())}]
    for r in _bar(snaps, "communication curve", progress):
        if r == cfg.rounds:
            fa, pa = _mean(acc["fedit"].values()), _mean(acc["potara_ab"].values())
        else:
            Gr = ck["snapshots"][r]
            fa = _mean(score(Gr, s.test_inputs, s.test_targets) for s in splits)
            pa = _mean(score(potara(i, s, Gr)[0], s.test_inputs, s.test_targets) for i, s in enumerate(splits))
        curve.append({"round": r, "bytes": sent(fedit.history[:r]), "fedit": fa, "potara": pa})
    timing["communication_curve"] = time.time() - t0

    fedit_bytes = sent(fedit.history)
    bytes_of = {m: 0 if m == "local" else sent(fedsa.history) if m == "fedsa" else fedit_bytes for m in acc}
    results = {"config": config or {}, "experiment": asdict(cfg), "seed": cfg.seed, "clients": names,
               "methods": {m: {"label": METHOD_LABELS[m], "mean": _mean(acc[m].values()), "per_client": acc[m],
                               "bytes": bytes_of[m]} for m in acc},
               "per_client": per_client,
               "mean_abs_lam_diff": _mean(c["abs_lam_diff"] for c in per_client.values()),
               "adapter": {"numel": sum(v.numel() for v in init.values()), "bytes": state_bytes(init),
                           "fedsa_shared_bytes": state_bytes({k: v for k, v in init.items() if lora_factor(k) == "A"})},
               "communication": curve, "fedit_history": fedit.history,
               "fedsa_history": fedsa.history if fedsa else None,
               "faults": {"drop_prob": cfg.drop_prob, "max_update_norm": cfg.max_update_norm,
                          "fedit": _fed_faults(fedit.history), "fedsa": _fed_faults(fedsa.history) if fedsa else None,
                          "fallbacks": ck["fallbacks"], "statistics": bad_stats},
               "timing_s": timing}
    write_outputs(results, out_dir)
    return results


def _fed_faults(history: list[dict]) -> dict:
    return {"dropped": sum(len(h.get("dropped", [])) for h in history),
            "rejected": [{"round": h["round"], **r} for h in history for r in h.get("rejected", [])]}


def fault_summary(results: dict) -> str | None:
    """One line: drop-outs, rejected updates, diverged trainings, non-finite statistics (None if none and
    neither --drop-prob nor --max-update-norm was set)."""
    f = results.get("faults")
    if not f:
        return None
    parts = [f"{label}: {f[m]['dropped']} client-rounds dropped, {len(f[m]['rejected'])} updates rejected"
             for m, label in (("fedit", "FedIT"), ("fedsa", "FedSA-LoRA")) if f[m] is not None]
    if f["fallbacks"]:
        parts.append(f"{len(f['fallbacks'])} diverged trainings kept their start adapter "
                     f"({', '.join(sorted({x['client'] for x in f['fallbacks']}))})")
    if f["statistics"]:
        parts.append(f"non-finite statistics for {', '.join(sorted({x['client'] for x in f['statistics']}))}")
    happened = any(f[m] and (f[m]["dropped"] or f[m]["rejected"]) for m in ("fedit", "fedsa"))
    if not (happened or f["fallbacks"] or f["statistics"] or f["drop_prob"] or f["max_update_norm"] is not None):
        return None
    return "faults: " + "; ".join(parts) + " (details: \"faults\" and the histories in results.json)"


# ----------------------------------------------------------------------------- the shared CLI
def add_experiment_options(ap: argparse.ArgumentParser) -> None:
    """The options every pipeline script shares: training, Potara, evaluation and run control. Options
    left at None are filled by the script's preset; Potara's defaults are ExperimentConfig's."""
    d, a = ExperimentConfig(), ap.add_argument
    a("--rounds", type=int, help="FedIT rounds R")
    a("--local-steps", type=int, help="local steps per client per round")
    a("--clients-per-round", type=int, default=0, help="clients sampled per round (0 = all)")
    a("--max-update-norm", type=float, default=None,
      help="reject a client update whose L2 distance to the global adapter exceeds this (unset: none)")
    a("--drop-prob", type=float, default=0.0,
      help="probability that a selected client never returns its update in a round (simulated drop-out)")
    a("--local-train-steps", type=int, help="steps of the local-only adapter")
    a("--finetune-steps", type=int, help="steps of local fine-tuning after FedIT")
    a("--lr", type=float, help="AdamW learning rate of every adapter training")
    a("--batch-size", type=int, help="training batch size")
    a("--rank", type=int, help="LoRA rank r")
    a("--lora-alpha", type=float, help="LoRA alpha (scaling alpha / r)")
    a("--estimator", default=d.estimator, help=f"how Potara estimates a, b, c: one of {sorted(ESTIMATORS)} "
      "(hermite: needs held-out samples, see README; paper: ALGORITHM.md's inverse-Fisher reconstruction)")
    a("--fisher-split", choices=["train", "val"], default=d.fisher_split,
      help="client split Potara's statistics use (val: held out, what hermite needs; train: the paper's setting)")
    a("--fisher-samples", type=int, default=None,
      help=f"samples of that split for the statistics (default: {d.fisher_samples}, or the whole split if smaller)")
    a("--fisher-chunk", type=int, default=None,
      help="per-sample gradients held at once (lower it for a large model on one GPU; default: all)")
    a("--labels", choices=["empirical", "sampled"], default=d.fisher_labels, help="Fisher labels: data's or model-sampled")
    a("--eps", type=float, default=d.eps, help="relative Fisher floor of the paper/bias estimators")
    a("--granularity", choices=["client", "module"], default=d.granularity,
      help="one lam per client or per adapted module (paper, bias, quadratic)")
    a("--grid-step", type=float, default=d.grid_step, help="lam grid step (1/step must be an integer)")
    a("--snapshots", type=int, default=d.snapshots, help="FedIT round counts for the communication curve")
    a("--no-fedsa", dest="fedsa", action="store_false", help="skip the FedSA-LoRA baseline (a second federated run)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present (bf16 autocast)")
    a("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
      help="CPU threads for torch (default: half the cores; oversubscribed cores slow torch down badly)")
    a("--seed", type=int, default=0)
    a("--resume", action="store_true", help="continue from --out/checkpoint.pt (same arguments)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")


def check_experiment_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible shared options with a one-line parser error (after the preset filled args.train
    and args.val); fills --fisher-samples' default."""
    for k in ("rounds", "local_steps", "local_train_steps", "finetune_steps", "batch_size", "rank", "threads",
              "fisher_samples", "fisher_chunk"):
        if getattr(args, k) is not None and getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    for k in ("lr", "lora_alpha", "eps"):
        if not (getattr(args, k) > 0 and math.isfinite(getattr(args, k))):
            ap.error(f"--{k.replace('_', '-')} must be a positive number, got {getattr(args, k)}")
    if min(args.clients_per_round, args.snapshots, args.seed) < 0:
        ap.error("--clients-per-round, --snapshots and --seed must be >= 0")
    if args.max_update_norm is not None and not (args.max_update_norm > 0 and math.isfinite(args.max_update_norm)):
        ap.error(f"--max-update-norm must be a positive number, got {args.max_update_norm}")
    if not 0 <= args.drop_prob < 1:
        ap.error(f"--drop-prob must be in [0, 1), got {args.drop_prob}")
    if not (0 < args.grid_step <= 1 and abs(1 / args.grid_step - round(1 / args.grid_step)) < 1e-6):
        ap.error(f"--grid-step must be 1/n for an integer n >= 1 (e.g. 0.05), got {args.grid_step}")
    if args.estimator not in ESTIMATORS:
        ap.error(f"--estimator must be one of {sorted(ESTIMATORS)}, got {args.estimator!r}")
    if args.estimator == "hermite" and args.granularity == "module":
        ap.error("--estimator hermite gives one weight per client: use --granularity client (or another estimator)")
    split = args.train if args.fisher_split == "train" else args.val
    if args.fisher_samples is None:
        args.fisher_samples = min(ExperimentConfig.fisher_samples, split)
    elif args.fisher_samples > split:
        ap.error(f"--fisher-samples {args.fisher_samples} exceeds the client's {args.fisher_split} split ({split})")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available (use --device cpu or auto)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The ExperimentConfig the shared options describe."""
    return ExperimentConfig(
        rounds=args.rounds, local_steps=args.local_steps, clients_per_round=args.clients_per_round, lr=args.lr,
        batch_size=args.batch_size, local_train_steps=args.local_train_steps, finetune_steps=args.finetune_steps,
        fisher_samples=args.fisher_samples, fisher_labels=args.labels, fisher_split=args.fisher_split,
        fisher_chunk=args.fisher_chunk, eps=args.eps, granularity=args.granularity, estimator=args.estimator,
        grid_step=args.grid_step, snapshots=args.snapshots, fedsa=args.fedsa, seed=args.seed,
        drop_prob=args.drop_prob, max_update_norm=args.max_update_norm)


def dir_problem(path: str, mode: int = os.W_OK | os.X_OK) -> str | None:
    """Why `path` cannot serve as a directory with access `mode` (None if it can, or can be created):
    for a one-line CLI error before any work is done."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "exists and is not a directory"
        return None if os.access(path, mode) else "permission denied"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created ({parent} is a file)"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created ({parent} is not writable)"


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False, disable=not progress)


def markdown_table(results: dict) -> str:
    """The methods (mean and per-client test accuracy, MB sent) and Potara's weights against the grid's."""
    names = results["clients"]
    lines = ["| method | mean acc | " + " | ".join(names) + " | MB sent |",
             "|---|---|" + "---|" * len(names) + "---|"]
    for m, r in results["methods"].items():
        cells = " | ".join(f"{r['per_client'][n]:.3f}" for n in names)
        lines.append(f"| {r['label']} | {r['mean']:.3f} | {cells} | {r['bytes'] / 1e6:.2f} |")
    lines += ["", "| client | a | b | c | lam Potara | lam grid (val) | abs diff | lam grid (test oracle) |",
              "|---|---|---|---|---|---|---|---|"]
    fmt = lambda v: f"{_mean(v.values()):.4g} (mean of {len(v)} modules)" if isinstance(v, dict) else f"{v:.4g}"
    for n in names:
        c = results["per_client"][n]
        p = c["potara"]
        lines.append(f"| {n} | {fmt(p['a'])} | {fmt(p['b'])} | {fmt(p['c'])} | {c['lam_potara']:.3f} | "
                     f"{c['lam_grid_val']:.2f} | {c['abs_lam_diff']:.3f} | {c['lam_grid_oracle']:.2f} |")
    lines.append(f"\nmean |lam_potara - lam_grid(val)| = {results['mean_abs_lam_diff']:.3f}")
    faults = fault_summary(results)
    return "\n".join(lines + ([faults] if faults else []))


def _strict_json(x):
    """NaN/Inf -> None, recursively: json.dumps would write NaN, which is not JSON."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _strict_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict_json(v) for v in x]
    return x


def write_outputs(results: dict, out_dir: str) -> None:
    """results.json (strict JSON: NaN/Inf as null) and results.md, and the two plots when matplotlib is
    installed, each written atomically."""
    for name, text in (("results.json", json.dumps(_strict_json(results), indent=1, default=str, allow_nan=False)),
                       ("results.md", markdown_table(results) + "\n")):
        atomic_write(os.path.join(out_dir, name), lambda f: f.write(text.encode()))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    names = results["clients"]
    cols = min(len(names), 5)
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 2.6 * rows), squeeze=False)
    for ax, n in zip(axes.flat, names):
        c = results["per_client"][n]
        ax.plot(c["grid"]["lam"], c["grid"]["test"], label="test")
        ax.plot(c["grid"]["lam"], c["grid"]["val"], ls=":", label="val")
        ax.axvline(c["lam_potara"], color="r", label="Potara lam")
        ax.axvline(c["lam_grid_val"], color="g", ls="--", label="grid (val) lam")
        ax.set(title=n, xlabel="lam (weight of the federated adapter)", ylabel="accuracy")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, "lambda.png"), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    pts = [p for p in results["communication"] if p["fedit"] is not None]
    mb = [p["bytes"] / 1e6 for p in pts]
    ax.plot(mb, [p["fedit"] for p in pts], "o-", label="FedIT (global adapter)")
    ax.plot(mb, [p["potara"] for p in pts], "s-", label="Potara after FedIT")
    ax.axhline(results["communication"][0]["local"], color="gray", ls="--", label="Local only (0 MB)")
    ax.set(xlabel="MB communicated (both ways)", ylabel="mean test accuracy")
    ax.legend()
    fig.tight_layout()
    atomic_write(os.path.join(out_dir, "communication.png"), lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
