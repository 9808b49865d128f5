"""Scoring and the per-client evaluation stages of the pipeline (pipeline.run_experiment): every method of
METHODS on each client's own test split, and the lam grid on val and test.

    acc = score_adapter(model, adapter, restore=phi_0, x, y)     # evaluate(model holding adapter), then restore
    j = grid_choice(lam_grid(0.05), val_curve)                   # the grid search's lam (ties: nearest 0.5)

The stage functions take the pipeline's `Run` (the one model, the clients, the settings, the run state).
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Callable, Sequence

import torch
import torch.nn as nn

from data import ClientSplits
from fed import FedState, derive_seed
from lora import load_lora_state_dict
from potara import check_adapters, fisher_merge, gradient_stats, merge_adapters, paper_weight, personalize, segment_loss
from potara_harness.report import mean
from training import shuffled_batches

if TYPE_CHECKING:  # only for the annotations: pipeline imports this module
    from potara_harness.pipeline import Run

Evaluate = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]

METHOD_LABELS = {"local": "Local only", "fedit": "FedIT (global adapter)", "fedit_ft": "FedIT + local fine-tuning",
                 "uniform": "Uniform merge (lam = 0.5)", "fisher": "Fisher merging", "fedsa": "FedSA-LoRA",
                 "grid_val": "Grid search on val", "grid_oracle": "Grid oracle on test (not a method)",
                 "potara_ab": "Potara (A/B space)", "potara_delta": "Potara (delta space)"}
METHODS = tuple(METHOD_LABELS)


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of model(inputs) (logits, or an output with .logits) against integer labels."""
    device, correct = next(model.parameters()).device, 0
    for i in range(0, len(inputs), batch_size):
        out = model(inputs[i:i + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1).cpu() == targets[i:i + batch_size]).sum())
    return correct / len(inputs)


def lam_grid(step: float) -> list[float]:
    n = round(1 / step)
    return [round(i / n, 10) for i in range(n + 1)]


def grid_choice(grid: Sequence[float], val_curve: Sequence[float]) -> int:
    """Index of the grid search's lam: the best validation score; ties go to the lam closest to 0.5 (no
    preference for either model), then the smaller lam."""
    best = max(val_curve)
    return min((j for j, v in enumerate(val_curve) if v == best), key=lambda j: (abs(grid[j] - 0.5), j))


def score_adapter(model: nn.Module, adapter: dict, restore: dict, x: torch.Tensor, y: torch.Tensor,
                  evaluate: Evaluate = accuracy, autocast_dtype: torch.dtype | None = None) -> float:
    """evaluate(model holding `adapter`, x, y) in eval mode, then `restore` loaded back (ranks may differ: a
    delta merge has rank 2r)."""
    load_lora_state_dict(model, adapter, allow_rank_change=True)
    model.eval()
    with torch.autocast(next(model.parameters()).device.type, dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None):
        value = float(evaluate(model, x, y))
    load_lora_state_dict(model, restore, allow_rank_change=True)
    return value


def score(run: Run, adapter: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    return score_adapter(run.model, adapter, run.init, x, y, run.evaluate, run.autocast_dtype)


def stat_batches(run: Run, i: int, s: ClientSplits) -> list:
    """The statistics' samples, one batch: min(fisher_samples, split size) of the chosen split (val: held out),
    the first batch of a seeded shuffle. Never more than the split (no sample read twice)."""
    x, y = (s.train_inputs, s.train_targets) if run.cfg.fisher_split == "train" else (s.val_inputs, s.val_targets)
    return [next(shuffled_batches(x, y, min(run.cfg.fisher_samples, len(y)), derive_seed(run.cfg.seed, i, 303)))]


def potara_step(run: Run, i: int, s: ClientSplits, global_state: dict, stats=None) -> tuple[dict, dict]:
    """The client-side Potara merge of global_state and the client's local adapter (potara.personalize on the
    statistics' samples: val by default, held out). With estimator "paper" and `stats`, the per-sample statistics
    Fisher merging computed on the same samples and adapters, the weight is read off them (potara.paper_weight):
    one per-sample gradient pass per client, not two."""
    cfg, L = run.cfg, run.state.local[s.name]
    if cfg.estimator == "paper" and stats is not None:
        check_adapters(run.model, global_state, L)
        lam, info = paper_weight(stats, cfg.eps, cfg.granularity)
        info.update(lam=lam, estimator="paper", space="ab", n_samples=stats.n, granularity=cfg.granularity,
                    labels=cfg.fisher_labels, eps=cfg.eps)
        return merge_adapters(global_state, L, lam, "ab"), info
    paper_only = dict(labels=cfg.fisher_labels, eps=cfg.eps, seed=derive_seed(cfg.seed, i, 404),
                      chunk_size=cfg.fisher_chunk) if cfg.estimator == "paper" else {}
    return personalize(run.model, global_state, L, held_out=stat_batches(run, i, s), n_samples=cfg.fisher_samples,
                       estimator=cfg.estimator, likelihood=run.likelihood, granularity=cfg.granularity,
                       **paper_only)


def fisher_merging(run: Run, i: int, s: ClientSplits, G: dict, L: dict, bad_stats: list) -> tuple[dict, object]:
    """The Fisher merging baseline on the statistics' samples; returns (merged adapter, the gradient statistics)."""
    cfg = run.cfg
    stats = gradient_stats(run.model, G, L, stat_batches(run, i, s), cfg.fisher_samples, cfg.fisher_labels,
                           run.likelihood, seed=derive_seed(cfg.seed, i, 404), chunk_size=cfg.fisher_chunk)
    fisher = {"G": stats.fisher_G, "L": stats.fisher_L}
    if not all(torch.isfinite(v).all() for f in fisher.values() for v in f.values()):
        warnings.warn(f"client {s.name}: NaN/Inf in the Fisher; Fisher merging takes those entries as 0")
        fisher = {m: {k: torch.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in f.items()} for m, f in fisher.items()}
        bad_stats.append({"client": s.name, "what": "Fisher (Fisher merging: non-finite entries taken as 0)"})
    return fisher_merge(G, L, fisher["G"], fisher["L"]), stats


def grid_search(run: Run, s: ClientSplits, G: dict, L: dict) -> dict:
    """Merged adapters at every lam of the grid, scored on val and test, and the val loss (run.likelihood's
    -mean log p, what the default weight reads); the val choice, the test oracle, and the loss barrier: the
    largest val loss above the chord between the two ends, max_lam f(lam) - ((1 - lam) f(0) + lam f(1))."""
    grid, val_curve, test_curve, loss_curve = lam_grid(run.cfg.grid_step), [], [], []
    val = [(s.val_inputs[k:k + 64], s.val_targets[k:k + 64]) for k in range(0, len(s.val_targets), 64)]
    for lam in grid:
        merged = merge_adapters(G, L, lam, run.cfg.grid_space)
        val_curve.append(score(run, merged, s.val_inputs, s.val_targets))
        test_curve.append(score(run, merged, s.test_inputs, s.test_targets))
        run.model.eval()
        loss_curve.append(segment_loss(run.model, G, L, lam, val, run.likelihood, run.cfg.grid_space, slope=False)[0])
    j = grid_choice(grid, val_curve)
    oracle = max(range(len(grid)), key=lambda j: test_curve[j])
    barrier = max(f - ((1 - lam) * loss_curve[0] + lam * loss_curve[-1]) for lam, f in zip(grid, loss_curve))
    return {"j": j, "lam_val": grid[j], "lam_oracle": grid[oracle], "test_at_val": test_curve[j],
            "test_oracle": max(test_curve), "barrier": barrier,
            "curves": {"lam": grid, "val": val_curve, "test": test_curve, "val_loss": loss_curve}}


def evaluate_client(run: Run, i: int, s: ClientSplits, G: dict, fedsa: FedState | None, acc: dict,
                    bad_stats: list) -> dict:
    """Every method on client i's test split (into acc[method][client]); returns the client's Potara/grid record."""
    L, test, cfg = run.state.local[s.name], (s.test_inputs, s.test_targets), run.cfg
    acc["local"][s.name], acc["fedit"][s.name] = score(run, L, *test), score(run, G, *test)
    acc["fedit_ft"][s.name] = score(run, run.state.finetuned[s.name], *test)
    acc["uniform"][s.name] = score(run, merge_adapters(G, L, 0.5, cfg.grid_space), *test)
    fisher_merged, stats = fisher_merging(run, i, s, G, L, bad_stats)
    acc["fisher"][s.name] = score(run, fisher_merged, *test)
    if fedsa is not None:
        acc["fedsa"][s.name] = score(run, {**fedsa.global_state, **fedsa.private_states[s.name]}, *test)
    merged, info = potara_step(run, i, s, G, stats)  # "paper": the statistics Fisher merging used
    if "a" in info:  # the paper's estimator: its variance terms
        terms = [v for t in "abc" for v in (info[t].values() if isinstance(info[t], dict) else [info[t]])]
        if not all(math.isfinite(v) for v in terms):
            warnings.warn(f"client {s.name}: non-finite variance terms (a, b, c) = {info['a']}, {info['b']}, "
                          f"{info['c']}; Potara's lam = {info['lam']}")
            bad_stats.append({"client": s.name, "what": f"variance terms (Potara: lam = {info['lam']})"})
    elif info["candidate"].startswith("fallback"):  # the default: non-finite held-out loss or slope (warned)
        bad_stats.append({"client": s.name, "what": f"held-out loss/slope (Potara: lam = {info['lam']})"})
    acc["potara_ab"][s.name] = score(run, merged, *test)
    # the same lam in both spaces: the statistics are of phi_G and phi_L, not of the merged adapter
    acc["potara_delta"][s.name] = score(run, merge_adapters(G, L, info["lam"], "delta"), *test)
    grid = grid_search(run, s, G, L)
    acc["grid_val"][s.name], acc["grid_oracle"][s.name] = grid["test_at_val"], grid["test_oracle"]
    lam_p = mean(info["lam"].values()) if isinstance(info["lam"], dict) else info["lam"]
    return {"potara": info, "lam_potara": lam_p, "lam_grid_val": grid["lam_val"], "lam_grid_oracle": grid["lam_oracle"],
            "abs_lam_diff": abs(lam_p - grid["lam_val"]), "barrier": grid["barrier"], "grid": grid["curves"]}
