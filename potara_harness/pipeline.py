"""The experiment: Potara beside every baseline, on any model whose adapter is its trainable tensors
(lora.add_lora) and any per-client data (data.ClientSplits). run_cifar.py (ViT, images) and run_llm.py
(causal LM, tokens) both call it; only the model, the data and three plug-ins differ.

    results = run_experiment(model, splits, ExperimentConfig(rounds=20, ...), "runs/x",
                             evaluate=accuracy,                    # (model, inputs, targets) -> float
                             loss_fn=fed.classification_loss, # (model, inputs, targets) -> loss
                             likelihood=potara.classification_likelihood, resume=False, config={...})

Stages (one backbone in memory; a client is switched in by loading adapter tensors):
  phi_0 = the model's adapter on entry (shared initial adapter, LoRA B = 0)
  1. federated_training: FedIT for `rounds` rounds (fed.run_fedit), global snapshots at `snapshots` round
     counts; then FedSA-LoRA, FedIT sharing only the LoRA A factors (B and the head stay on each client)
  2. local_training: per client a local adapter phi_L from phi_0, and phi_G fine-tuned locally
  3. evaluation.evaluate_client: on each client's test split, every method of report.METHODS; the lam grid
     on val and test
  4. communication_curve: FedIT alone and Potara after each snapshot, against bytes sent
Checkpoint (checkpoint.py): checkpoint.pt (checkpoint.RunState) rewritten atomically after every federated round;
each client's local and fine-tuned adapter and each FedIT snapshot written once, atomically, to its own file
when it is made (checkpoint.Parts: the bytes written grow linearly with the clients, and only the adapters a
stage uses are in memory); a kill in any stage loses at most the adapter being trained. resume=True continues it
(training settings, model and data must match: checkpoint.fingerprint) and ends
bitwise equal to an uninterrupted run on CPU (every stage is seeded from (seed, round or salt, client):
fed.derive_seed, config.SALT_*; every seeded stage runs in a forked RNG, fed.seeded).
Bytes: a method costs what its training sent both ways: local only 0, FedSA-LoRA its own history, every
other method FedIT's history (merging and Fisher statistics are on-device).
Faults (results["faults"]): drop-outs and rejected updates per federated run (updates.validate_update); a local
training that diverged (NaN/Inf adapter: warned, the client keeps the adapter it started from); NaN/Inf
gradient statistics (warned; Fisher merging takes them as 0). No adapter with NaN/Inf is scored or saved.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn

from data import ClientSplits, warn_held_out_overlap, warn_single_class
from fed import (
    Client,
    FedState,
    LossFn,
    classification_loss,
    derive_seed,
    model_device,
    progress_bar,
    run_fedit,
    seeded,
    shuffled_batches,
    train_adapter,
)
from lora import load_lora_state_dict, lora_factor, lora_state_dict
from potara import Likelihood, classification_likelihood
from potara_harness.checkpoint import Parts, RunState, fed_dict, fingerprint, load_state, save_state
from potara_harness.config import SALT_FINETUNE, SALT_LOCAL, ExperimentConfig
from potara_harness.evaluation import Evaluate, Evaluator, accuracy, evaluate_client, potara_step
from potara_harness.report import METHODS, collect_results, mean, write_outputs


def snapshot_rounds(rounds: int, snapshots: int) -> list[int]:
    """The FedIT round counts of the communication curve: `snapshots` evenly spaced ones (every round when
    snapshots >= rounds), or the last round alone for 0."""
    if not snapshots:
        return [rounds]
    snapshots = min(snapshots, rounds)  # the same round counts, and no loop longer than the run
    return sorted({max(1, round(rounds * i / snapshots)) for i in range(1, snapshots + 1)})


def local_seed(seed: int, client_index: int) -> int:
    """The seed of client i's local-only adapter (its batches and dropout): shared with the Flower client and
    the estimator study."""
    return derive_seed(seed, client_index, SALT_LOCAL)


def finetune_seed(seed: int, client_index: int) -> int:
    """The seed of client i's "FedIT + local fine-tuning" adapter."""
    return derive_seed(seed, client_index, SALT_FINETUNE)


@dataclass
class Run:
    """What every stage needs: the evaluator (the one model, phi_0, the settings, the scoring plug-ins), the
    clients' data, the training plug-ins, the round state (saved to ckpt_path after every round) and the
    adapters made once (parts: one file each)."""

    ev: Evaluator
    splits: Sequence[ClientSplits]
    ckpt_path: str
    state: RunState
    parts: Parts
    loss_fn: LossFn
    progress: bool
    on_round: Callable[[str, FedState], None] | None = None

    @property
    def model(self) -> nn.Module:
        return self.ev.model

    @property
    def cfg(self) -> ExperimentConfig:
        return self.ev.cfg


def start_run(
    model, splits, cfg, out_dir, resume: bool, evaluate, loss_fn, likelihood, autocast_dtype, progress, on_round
) -> Run:
    """Check the inputs, then a fresh run state (an earlier run's parts removed, checkpoint.pt written: its
    run_id is what this run's parts carry) or the checkpoint's (resume=True: every file checked)."""
    names = [s.name for s in splits]
    if not splits or len(set(names)) != len(names):
        raise ValueError(f"run_experiment: need at least one client and unique client names, got {names}")
    if cfg.fisher_split not in ("train", "val"):
        raise ValueError(f"fisher_split must be 'train' or 'val', got {cfg.fisher_split!r}")
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path, fp = os.path.join(out_dir, "checkpoint.pt"), fingerprint(model, splits, cfg)
    init, snaps = lora_state_dict(model), snapshot_rounds(cfg.rounds, cfg.snapshots)
    if resume and os.path.exists(ckpt_path):  # every adapter checked against phi_0's keys, shapes, dtypes
        state = load_state(ckpt_path, fp, adapter=init, clients=names, rounds=cfg.rounds, snapshots=snaps)
        parts = Parts(ckpt_path, state, init, names)
        print(
            f"resuming from {ckpt_path}: FedIT at round {state.fedit['round'] if state.fedit else 0}, "
            f"{sum(parts.exists('local', i) for i in range(len(names)))} local adapters"
        )
    else:
        if resume:
            print(f"--resume: no checkpoint at {ckpt_path}, starting from scratch")
        state = RunState(fp)
        parts = Parts(ckpt_path, state, init, names)
        parts.clear()  # first: a kill before the next line leaves the earlier run whole but for retrainable parts
        save_state(state, ckpt_path)
    ev = Evaluator(model, init, cfg, evaluate, likelihood, autocast_dtype)
    return Run(ev, splits, ckpt_path, state, parts, loss_fn, progress, on_round)


def run_experiment(
    model: nn.Module,
    splits: Sequence[ClientSplits],
    cfg: ExperimentConfig,
    out_dir: str,
    evaluate: Evaluate = accuracy,
    loss_fn: LossFn = classification_loss,
    likelihood: Likelihood = classification_likelihood,
    resume: bool = False,
    config: dict | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    on_round: Callable[[str, FedState], None] | None = None,
    adapters: dict | None = None,
) -> dict:
    """Run every stage (module docstring), write the outputs (report.write_outputs), return the results dict.
    on_round(stage, state) is called after each checkpointed round (stage "fedit" or "fedsa"); `adapters`, when
    given, receives the adapters the run ends with, for an export: "federated" (phi_G) and each client's Potara
    adapter (A/B space), merged once, here.
    Raises checkpoint.ResumeError when resume=True finds a checkpoint that is not this run's, or unsound."""
    warn_single_class(splits, cfg.fisher_split)  # held-out data of one class: lam follows that class alone
    warn_held_out_overlap(splits, cfg.fisher_split, cfg.estimator)  # the local adapter's own samples favour it
    run = start_run(
        model, splits, cfg, out_dir, resume, evaluate, loss_fn, likelihood, autocast_dtype, progress, on_round
    )
    timing, t0 = {}, time.time()
    fedit = federated_training(run, "fedit")
    timing["fedit"], t0 = time.time() - t0, time.time()
    fedsa = federated_training(run, "fedsa", share=lambda k: lora_factor(k) == "A") if cfg.fedsa else None
    if fedsa is not None:
        timing["fedsa"], t0 = time.time() - t0, time.time()
    local_training(run, fedit.global_state)
    timing["local"], t0 = time.time() - t0, time.time()
    acc = {m: {} for m in METHODS if cfg.fedsa or m != "fedsa"}
    per_client, bad_stats, fallbacks = {}, [], []
    for i, s in enumerate(_bar(splits, "evaluation", progress)):
        fedsa_adapter = {**fedsa.global_state, **fedsa.private_states[s.name]} if fedsa else None
        (local, fb_local), (finetuned, fb_ft) = run.parts.load("local", i), run.parts.load("finetuned", i)
        fallbacks += [fb for fb in (fb_local, fb_ft) if fb is not None]
        e = evaluate_client(run.ev, i, s, fedit.global_state, local, finetuned, fedsa_adapter)
        for m in acc:
            acc[m][s.name] = e.acc[m]
        per_client[s.name], bad_stats = e.record, bad_stats + e.bad_stats
        if adapters is not None:
            adapters.update({"federated": fedit.global_state, s.name: e.potara_adapter})
    timing["evaluation"], t0 = time.time() - t0, time.time()
    curve = communication_curve(run, fedit, acc)
    timing["communication_curve"] = time.time() - t0
    results = collect_results(
        config or {},
        cfg,
        [s.name for s in splits],
        acc,
        per_client,
        curve,
        run.ev.init,
        fedit.history,
        fedsa.history if fedsa else None,
        fallbacks,
        bad_stats,
        timing,
    )
    write_outputs(results, out_dir)
    return results


# ----------------------------------------------------------------------------- stages
def federated_training(run: Run, stage: str, share=None) -> FedState:
    """FedIT (share=None: every adapter tensor) or FedSA-LoRA, checkpointed after every round; FedIT's global
    adapter at each snapshot round written to its own file first (a kill between the two: the round reruns)."""
    snaps = snapshot_rounds(run.cfg.rounds, run.cfg.snapshots)

    def checkpoint(fed: FedState) -> None:
        setattr(run.state, stage, fed_dict(fed))
        if stage == "fedit" and fed.round in snaps:
            run.parts.save("snapshot", fed.round, fed.global_state)
        save_state(run.state, run.ckpt_path)
        if run.on_round is not None:
            run.on_round(stage, fed)

    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in run.splits]
    return run_fedit(
        run.model,
        clients,
        run.cfg.fed_config(),
        loss_fn=run.loss_fn,
        share=share,
        resume=run.state.fed_state(stage),
        on_round=checkpoint,
        autocast_dtype=run.ev.autocast_dtype,
        progress=run.progress,
        desc="FedIT rounds" if share is None else "FedSA-LoRA rounds",
    )


def train_local(
    model: nn.Module,
    start: dict,
    split: ClientSplits,
    steps: int,
    seed: int,
    cfg: ExperimentConfig,
    loss_fn: LossFn = classification_loss,
    autocast_dtype: torch.dtype | None = None,
    desc: str | None = None,
    progress: bool = False,
) -> dict:
    """`steps` of AdamW on the client's train split from adapter `start`, seeded by `seed` (batches, and dropout
    in a forked RNG as fed.local_update: the caller's RNG is left as it was): how every local adapter of the
    project is trained (the pipeline, the Flower client, the estimator study)."""
    load_lora_state_dict(model, start)
    with seeded(seed, model_device(model)):
        batches = shuffled_batches(split.train_inputs, split.train_targets, cfg.batch_size, seed)
        return train_adapter(
            model, batches, steps, cfg.lr, cfg.weight_decay, loss_fn, autocast_dtype, desc=desc, progress=progress
        ).state


def train_checked(
    model: nn.Module,
    start: dict,
    split: ClientSplits,
    steps: int,
    seed: int,
    cfg: ExperimentConfig,
    stage: str,
    loss_fn: LossFn = classification_loss,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> tuple[dict, dict | None]:
    """train_local, but a diverged result (NaN/Inf, e.g. from NaN in the client's data) is never kept: the
    client keeps `start` (warned). Returns (adapter, the fallback's record or None)."""
    state = train_local(
        model, start, split, steps, seed, cfg, loss_fn, autocast_dtype, f"{stage} {split.name}", progress
    )
    bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
    if not bad:
        return state, None
    reason = f"{stage} training gave NaN/Inf in {bad[0]}" + (f" (+{len(bad) - 1} more)" if bad[1:] else "")
    warnings.warn(f"client {split.name}: {reason}; it keeps the adapter it started from")
    return dict(start), {"client": split.name, "stage": stage, "reason": reason}


def local_training(run: Run, global_state: dict) -> None:
    """Per client, unless its file exists: the local-only adapter phi_L from phi_0, and phi_G fine-tuned locally,
    each written once to its own file (checkpoint.Parts) with the fallback record of a diverged training."""
    cfg, m, ac = run.cfg, run.model, run.ev.autocast_dtype
    for i, s in enumerate(_bar(run.splits, "local training", run.progress)):
        for kind, start, steps, seed, stage in (
            ("local", run.ev.init, cfg.local_train_steps, local_seed(cfg.seed, i), "local"),
            ("finetuned", global_state, cfg.finetune_steps, finetune_seed(cfg.seed, i), "fine-tune"),
        ):
            if not run.parts.exists(kind, i):
                adapter, fallback = train_checked(m, start, s, steps, seed, cfg, stage, run.loss_fn, ac, run.progress)
                run.parts.save(kind, i, adapter, fallback)
    load_lora_state_dict(run.model, run.ev.init)


def communication_curve(run: Run, fedit: FedState, acc: dict) -> list[dict]:
    """Mean test accuracy of FedIT's global adapter and of Potara on it, after each snapshot round."""
    splits, cfg, ev = run.splits, run.cfg, run.ev
    curve = [{"round": 0, "bytes": 0, "fedit": None, "potara": None, "local": mean(acc["local"].values())}]
    for r in _bar(snapshot_rounds(cfg.rounds, cfg.snapshots), "communication curve", run.progress):
        if r == cfg.rounds:
            fa, pa = mean(acc["fedit"].values()), mean(acc["potara_ab"].values())
        else:
            Gr = run.parts.load("snapshot", r)[0]
            fa = mean(ev.score(Gr, s.test_inputs, s.test_targets) for s in splits)
            pa = mean(
                ev.score(potara_step(ev, i, s, Gr, run.parts.load("local", i)[0])[0], s.test_inputs, s.test_targets)
                for i, s in enumerate(splits)
            )
        curve.append(
            {
                "round": r,
                "bytes": sum(h["bytes_down"] + h["bytes_up"] for h in fedit.history[:r]),
                "fedit": fa,
                "potara": pa,
            }
        )
    return curve


def _bar(items, desc: str, progress: bool):
    """A stage's bar over clients or snapshot rounds: on a terminal, or one line in a log (fed.progress_bar)."""
    return progress_bar(items, desc, progress, stage=True, leave=False)
