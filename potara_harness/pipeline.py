"""The experiment: Potara beside every baseline, on any model whose adapter is its trainable tensors
(lora.add_lora) and any per-client data (data.ClientSplits). run_cifar.py (ViT, images) and run_llm.py
(causal LM, tokens) both call it; only the model, the data and three plug-ins differ.

    results = run_experiment(model, splits, ExperimentConfig(rounds=20, ...), "runs/x",
                             evaluate=accuracy,                    # (model, inputs, targets) -> float
                             loss_fn=training.classification_loss, # (model, inputs, targets) -> loss
                             likelihood=potara.classification_likelihood, resume=False, config={...})

Stages (one backbone in memory; a client is switched in by loading adapter tensors):
  phi_0 = the model's adapter on entry (shared initial adapter, LoRA B = 0)
  1. federated_training: FedIT for `rounds` rounds (fed.run_fedit), global snapshots at `snapshots` round
     counts; then FedSA-LoRA, FedIT sharing only the LoRA A factors (B and the head stay on each client)
  2. local_training: per client a local adapter phi_L from phi_0, and phi_G fine-tuned locally
  3. evaluation.evaluate_client: on each client's test split, every method of METHODS; the lam grid on val
     and test
  4. communication_curve: FedIT alone and Potara after each snapshot, against bytes sent
Checkpoint (checkpoint.RunState): rewritten atomically after every round and every client's local training;
resume=True continues it (training settings, model and data must match: checkpoint.fingerprint) and ends
bitwise equal to an uninterrupted run on CPU (every stage is seeded from (seed, round, client)).
Bytes: a method costs what its training sent both ways: local only 0, FedSA-LoRA its own history, every
other method FedIT's history (merging and Fisher statistics are on-device).
Faults (results["faults"]): drop-outs and rejected updates per federated run (fed.validate_update); a local
training that diverged (NaN/Inf adapter: warned, the client keeps the adapter it started from); NaN/Inf
gradient statistics (warned; Fisher merging takes them as 0). No adapter with NaN/Inf is scored or saved.
"""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from data import ClientSplits
from fed import Client, FedState, derive_seed, run_fedit, state_bytes
from lora import load_lora_state_dict, lora_factor, lora_state_dict
from potara import DEFAULT_ESTIMATOR, Likelihood, classification_likelihood
from potara_harness.checkpoint import RunState, fed_dict, fingerprint, load_state, save_state
from potara_harness.evaluation import METHOD_LABELS, METHODS, Evaluate, accuracy, evaluate_client, potara_step, score
from potara_harness.report import mean, write_outputs
from training import LossFn, classification_loss, shuffled_batches, train_adapter


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
    fisher_split: str = "val"       # the split the statistics use: "val" (held out: what the default needs)
                                    # or "train" (the paper's ~32 training samples, for "paper")
    fisher_chunk: int | None = None  # vmap chunk of per-sample gradients (lower GPU memory for large models)
    eps: float = 1e-3               # potara's relative Fisher floor ("paper")
    granularity: str = "client"     # one lam per client, or "module": one per adapted module
    estimator: str = DEFAULT_ESTIMATOR  # a key of potara.ESTIMATORS
    grid_step: float = 0.05         # lam grid 0, step, ..., 1
    grid_space: str = "ab"          # merge space of the uniform merge and of the grid
    snapshots: int = 4              # evenly spaced FedIT round counts for the communication curve
    fedsa: bool = True              # run the FedSA-LoRA baseline (a second federated run)
    seed: int = 0
    drop_prob: float = 0.0          # chance that a selected client never returns its update (simulated)
    max_update_norm: float | None = None  # reject updates with ||phi_k - phi^t||_2 above it (None: no bound)


def snapshot_rounds(rounds: int, snapshots: int) -> list[int]:
    return sorted({max(1, round(rounds * i / snapshots)) for i in range(1, snapshots + 1)}) if snapshots else [rounds]


def local_seed(seed: int, client_index: int) -> int:
    """The seed of client i's local-only adapter (its batches and dropout): shared with ablation.py."""
    return derive_seed(seed, client_index, 101)


@dataclass
class Run:
    """What every stage needs: the one model, the clients' data, the settings, the plug-ins, phi_0 and the
    checkpointed state (saved to ckpt_path after every round and client)."""
    model: nn.Module
    splits: Sequence[ClientSplits]
    cfg: ExperimentConfig
    ckpt_path: str
    init: dict
    state: RunState
    evaluate: Evaluate
    loss_fn: LossFn
    likelihood: Likelihood
    autocast_dtype: torch.dtype | None
    progress: bool
    on_round: Callable[[str, FedState], None] | None = None


def start_run(model, splits, cfg, out_dir, resume: bool, **plugins) -> Run:
    """Check the inputs, then a fresh run state or the checkpoint's (resume=True)."""
    names = [s.name for s in splits]
    if not splits or len(set(names)) != len(names):
        raise ValueError(f"run_experiment: need at least one client and unique client names, got {names}")
    if cfg.fisher_split not in ("train", "val"):
        raise ValueError(f"fisher_split must be 'train' or 'val', got {cfg.fisher_split!r}")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, fp = os.path.join(out_dir, "checkpoint.pt"), fingerprint(model, splits, cfg)
    state, init = RunState(fp), lora_state_dict(model)
    if resume and os.path.exists(ckpt_path):  # every adapter in it checked against phi_0's keys, shapes, dtypes
        state = load_state(ckpt_path, fp, adapter=init, clients=names, rounds=cfg.rounds)
        print(f"resuming from {ckpt_path}: FedIT at round {state.fedit['round'] if state.fedit else 0}, "
              f"{len(state.local)} local adapters")
    elif resume:
        print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
    return Run(model, splits, cfg, ckpt_path, init, state, **plugins)


def run_experiment(model: nn.Module, splits: Sequence[ClientSplits], cfg: ExperimentConfig, out_dir: str,
                   evaluate: Evaluate = accuracy, loss_fn: LossFn = classification_loss,
                   likelihood: Likelihood = classification_likelihood, resume: bool = False,
                   config: dict | None = None, autocast_dtype: torch.dtype | None = None, progress: bool = True,
                   on_round: Callable[[str, FedState], None] | None = None) -> dict:
    """Run every stage (module docstring), write the outputs (report.write_outputs), return the results dict.
    on_round(stage, state) is called after each checkpointed round (stage "fedit" or "fedsa").
    Raises checkpoint.ResumeError when resume=True finds a checkpoint that is not this run's, or unsound."""
    run = start_run(model, splits, cfg, out_dir, resume, evaluate=evaluate, loss_fn=loss_fn, likelihood=likelihood,
                    autocast_dtype=autocast_dtype, progress=progress, on_round=on_round)
    timing, t0 = {}, time.time()
    fedit = federated_training(run, "fedit")
    timing["fedit"], t0 = time.time() - t0, time.time()
    fedsa = federated_training(run, "fedsa", share=lambda k: lora_factor(k) == "A") if cfg.fedsa else None
    if fedsa is not None:
        timing["fedsa"], t0 = time.time() - t0, time.time()
    local_training(run, fedit.global_state)
    timing["local"], t0 = time.time() - t0, time.time()
    acc = {m: {} for m in METHODS if cfg.fedsa or m != "fedsa"}
    per_client, bad_stats = {}, []
    for i, s in enumerate(_bar(splits, "evaluation", progress)):
        per_client[s.name] = evaluate_client(run, i, s, fedit.global_state, fedsa, acc, bad_stats)
    timing["evaluation"], t0 = time.time() - t0, time.time()
    curve = communication_curve(run, fedit, acc)
    timing["communication_curve"] = time.time() - t0
    results = collect_results(run, acc, per_client, curve, fedit, fedsa, bad_stats, config, timing)
    write_outputs(results, out_dir)
    return results


# ----------------------------------------------------------------------------- stages
def federated_training(run: Run, stage: str, share=None) -> FedState:
    """FedIT (share=None: every adapter tensor) or FedSA-LoRA, checkpointed after every round."""
    cfg, snaps = run.cfg, snapshot_rounds(run.cfg.rounds, run.cfg.snapshots)

    def checkpoint(fed: FedState) -> None:
        setattr(run.state, stage, fed_dict(fed))
        if stage == "fedit" and fed.round in snaps:
            run.state.snapshots[fed.round] = fed.global_state
        save_state(run.state, run.ckpt_path)
        if run.on_round is not None:
            run.on_round(stage, fed)

    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in run.splits]
    return run_fedit(run.model, clients, cfg.rounds, cfg.local_steps, cfg.clients_per_round or len(clients), cfg.lr,
                     cfg.seed, cfg.batch_size, cfg.weight_decay, run.loss_fn, share, run.state.fed_state(stage),
                     checkpoint, run.autocast_dtype, run.progress, drop_prob=cfg.drop_prob,
                     max_update_norm=cfg.max_update_norm)


def train_local(model: nn.Module, start: dict, split: ClientSplits, steps: int, seed: int, cfg: ExperimentConfig,
                loss_fn: LossFn = classification_loss, autocast_dtype: torch.dtype | None = None,
                desc: str | None = None, progress: bool = False) -> dict:
    """`steps` of AdamW on the client's train split from adapter `start`, seeded by `seed` (batches and dropout):
    how every local adapter of the project is trained (the pipeline, ablation.py)."""
    load_lora_state_dict(model, start)
    torch.manual_seed(seed)
    batches = shuffled_batches(split.train_inputs, split.train_targets, cfg.batch_size, seed)
    return train_adapter(model, batches, steps, cfg.lr, cfg.weight_decay, loss_fn, autocast_dtype, desc=desc,
                         progress=progress).state


def train_from(run: Run, start: dict, split: ClientSplits, steps: int, seed: int, stage: str) -> dict:
    """train_local, but a diverged result (NaN/Inf, e.g. from NaN in the client's data) is never kept: the
    client keeps `start`, and the fallback is recorded."""
    state = train_local(run.model, start, split, steps, seed, run.cfg, run.loss_fn, run.autocast_dtype,
                        f"{stage} {split.name}", run.progress)
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if bad:
        reason = f"{stage} training gave NaN/Inf in {bad[0]}" + (f" (+{len(bad) - 1} more)" if bad[1:] else "")
        warnings.warn(f"client {split.name}: {reason}; it keeps the adapter it started from")
        run.state.fallbacks.append({"client": split.name, "stage": stage, "reason": reason})
        return dict(start)
    return state


def local_training(run: Run, global_state: dict) -> None:
    """Per client, unless checkpointed: the local-only adapter phi_L from phi_0, and phi_G fine-tuned locally."""
    for i, s in enumerate(_bar(run.splits, "local training", run.progress)):
        if s.name not in run.state.local:
            run.state.local[s.name] = train_from(run, run.init, s, run.cfg.local_train_steps, local_seed(run.cfg.seed, i),
                                                 "local")
            save_state(run.state, run.ckpt_path)
        if s.name not in run.state.finetuned:
            run.state.finetuned[s.name] = train_from(run, global_state, s, run.cfg.finetune_steps,
                                                     derive_seed(run.cfg.seed, i, 202), "fine-tune")
            save_state(run.state, run.ckpt_path)
    load_lora_state_dict(run.model, run.init)


def _sent(history: list[dict]) -> int:
    return sum(r["bytes_down"] + r["bytes_up"] for r in history)


def communication_curve(run: Run, fedit: FedState, acc: dict) -> list[dict]:
    """Mean test accuracy of FedIT's global adapter and of Potara on it, after each snapshot round."""
    splits, cfg = run.splits, run.cfg
    curve = [{"round": 0, "bytes": 0, "fedit": None, "potara": None, "local": mean(acc["local"].values())}]
    for r in _bar(snapshot_rounds(cfg.rounds, cfg.snapshots), "communication curve", run.progress):
        if r == cfg.rounds:
            fa, pa = mean(acc["fedit"].values()), mean(acc["potara_ab"].values())
        else:
            Gr = run.state.snapshots[r]
            fa = mean(score(run, Gr, s.test_inputs, s.test_targets) for s in splits)
            pa = mean(score(run, potara_step(run, i, s, Gr)[0], s.test_inputs, s.test_targets)
                      for i, s in enumerate(splits))
        curve.append({"round": r, "bytes": _sent(fedit.history[:r]), "fedit": fa, "potara": pa})
    return curve


def fed_faults(history: list[dict]) -> dict:
    return {"dropped": sum(len(h.get("dropped", [])) for h in history),
            "rejected": [{"round": h["round"], **r} for h in history for r in h.get("rejected", [])]}


def collect_results(run: Run, acc, per_client, curve, fedit: FedState, fedsa: FedState | None, bad_stats,
                    config, timing) -> dict:
    """The results dict written to results.json (its fields: report.py's module docstring)."""
    cfg, init = run.cfg, run.init
    bytes_of = {m: 0 if m == "local" else _sent(fedsa.history) if m == "fedsa" else _sent(fedit.history) for m in acc}
    return {"config": config or {}, "experiment": asdict(cfg), "seed": cfg.seed, "clients": [s.name for s in run.splits],
            "methods": {m: {"label": METHOD_LABELS[m], "mean": mean(acc[m].values()), "per_client": acc[m],
                            "bytes": bytes_of[m]} for m in acc},
            "per_client": per_client,
            "mean_abs_lam_diff": mean(c["abs_lam_diff"] for c in per_client.values()),
            "adapter": {"numel": sum(v.numel() for v in init.values()), "bytes": state_bytes(init),
                        "fedsa_shared_bytes": state_bytes({k: v for k, v in init.items() if lora_factor(k) == "A"})},
            "communication": curve, "fedit_history": fedit.history,
            "fedsa_history": fedsa.history if fedsa else None,
            "faults": {"drop_prob": cfg.drop_prob, "max_update_norm": cfg.max_update_norm,
                       "fedit": fed_faults(fedit.history), "fedsa": fed_faults(fedsa.history) if fedsa else None,
                       "fallbacks": run.state.fallbacks, "statistics": bad_stats},
            "timing_s": timing}


def _bar(items, desc: str, progress: bool):
    from tqdm.auto import tqdm
    return tqdm(items, desc=desc, leave=False, disable=not progress)
