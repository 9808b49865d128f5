"""Scoring, and the per-client evaluation the pipeline (pipeline.run_experiment) and the Flower client run:
every method of report.METHODS on a client's own test split, and the lam grid on val and test.

    ev = Evaluator(model, init=phi_0, cfg=ExperimentConfig(...))     # + evaluate, likelihood, autocast_dtype
    acc = ev.score(adapter, x, y)                                    # evaluate(model holding adapter), phi_0 back
    e = evaluate_client(ev, i, split, G, L, finetuned)               # a ClientEvaluation: acc, record, adapter
    j = grid_choice(lam_grid(0.05), val_curve)                       # the grid search's lam (ties: nearest 0.5)

Seeds (config.SALT_*): client i's statistics read the samples of derive_seed(seed, i, SALT_STATS), and sample
labels ("paper" with sampled labels) from derive_seed(seed, i, SALT_LABELS).
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn as nn

from data import ClientSplits
from fed import derive_seed, shuffled_batches
from lora import load_lora_state_dict, lora_layers
from potara import (
    Likelihood,
    PaperFisher,
    Verified,
    check_adapters,
    classification_likelihood,
    gradient_stats,
    merge_adapters,
    paper_merge,
    personalize,
    segment_loss,
)
from potara_harness.config import SALT_LABELS, SALT_STATS, ExperimentConfig
from potara_harness.report import mean

Evaluate = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]


@torch.no_grad()
def accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 accuracy of model(inputs) (logits, or an output with .logits) against integer labels."""
    device, correct = next(model.parameters()).device, 0
    for i in range(0, len(inputs), batch_size):
        out = model(inputs[i : i + batch_size].to(device))
        logits = out.logits if hasattr(out, "logits") else out
        correct += int((logits.argmax(-1).cpu() == targets[i : i + batch_size]).sum())
    return correct / len(inputs)


def fisher_merge(
    global_state: dict, local_state: dict, fisher_G: dict, fisher_L: dict, eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """The Fisher-merging baseline (Matena & Raffel, 2022): per parameter,
    theta = (F_G theta_G + F_L theta_L) / (F_G + F_L), eps guarding entries where both are zero."""
    out = {}
    for k, G in global_state.items():
        fg, fl = fisher_G[k].double().cpu() + eps, fisher_L[k].double().cpu() + eps
        out[k] = ((fg * G.double() + fl * local_state[k].double()) / (fg + fl)).to(G.dtype)
    return out


def lam_grid(step: float) -> list[float]:
    n = round(1 / step)
    return [round(i / n, 10) for i in range(n + 1)]


def grid_choice(grid: Sequence[float], val_curve: Sequence[float]) -> int:
    """Index of the grid search's lam: the best validation score; ties go to the lam closest to 0.5 (no
    preference for either model), then the smaller lam."""
    best = max(val_curve)
    return min((j for j, v in enumerate(val_curve) if v == best), key=lambda j: (abs(grid[j] - 0.5), j))


@contextmanager
def merged_weights(model: nn.Module, enabled: bool = True):
    """Inside: every LoRA layer's scaling * B A folded into its frozen weight (LoRALayer.merge), so a forward
    costs the plain model's (no rank-r branch per layer: ~0.8x the unmerged scoring). On exit the
    frozen weights are copied back from a saved copy, not unmerged: (W0 + D) - D is not W0 in floating point,
    and a backbone that drifted by a rounding error per score would be another model. Only in full precision
    (score_adapter): under bf16 autocast a merged W0 + D is rounded to bf16 as a whole, which loses a small D
    that the separate rank-r branch keeps."""
    layers = [m for m in lora_layers(model) if not m.merged] if enabled else []
    saved = [m.frozen_weight().detach().clone() for m in layers]
    for m in layers:
        m.merge()
    try:
        yield
    finally:
        with torch.no_grad():
            for m, w in zip(layers, saved):
                m.frozen_weight().copy_(w)
                m.merged = False


def score_adapter(
    model: nn.Module,
    adapter: dict,
    restore: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    evaluate: Evaluate = accuracy,
    autocast_dtype: torch.dtype | None = None,
) -> float:
    """evaluate(model holding `adapter`, x, y) in eval mode, on merged weights in full precision
    (merged_weights), then `restore` loaded back (ranks may differ: a delta merge has rank 2r)."""
    load_lora_state_dict(model, adapter, allow_rank_change=True)
    model.eval()
    with (
        torch.autocast(
            next(model.parameters()).device.type,
            dtype=autocast_dtype or torch.bfloat16,
            enabled=autocast_dtype is not None,
        ),
        merged_weights(model, enabled=autocast_dtype is None),
    ):
        value = float(evaluate(model, x, y))
    load_lora_state_dict(model, restore, allow_rank_change=True)
    return value


@dataclass
class Evaluator:
    """What scoring and the client-side steps need: the one model, phi_0 (loaded back after every score), the
    settings, and the plug-ins (the metric, the likelihood of the statistics, autocast)."""

    model: nn.Module
    init: dict
    cfg: ExperimentConfig
    evaluate: Evaluate = accuracy
    likelihood: Likelihood = classification_likelihood
    autocast_dtype: torch.dtype | None = None

    def score(self, adapter: dict, x: torch.Tensor, y: torch.Tensor) -> float:
        return score_adapter(self.model, adapter, self.init, x, y, self.evaluate, self.autocast_dtype)


def stat_batches(ev: Evaluator, i: int, s: ClientSplits) -> list:
    """The statistics' samples, one batch: min(fisher_samples, split size) of the chosen split (val: held out),
    the first batch of a seeded shuffle. Never more than the split (no sample read twice)."""
    x, y = (s.train_inputs, s.train_targets) if ev.cfg.fisher_split == "train" else (s.val_inputs, s.val_targets)
    return [next(shuffled_batches(x, y, min(ev.cfg.fisher_samples, len(y)), derive_seed(ev.cfg.seed, i, SALT_STATS)))]


def potara_estimator(ev: Evaluator, i: int) -> Verified | PaperFisher:
    """The estimator of client i under the settings: Verified() (it takes no options), or PaperFisher with the
    run's granularity, labels, eps, vmap chunk and client i's label-sampling seed."""
    cfg = ev.cfg
    if cfg.estimator != PaperFisher.name:
        if cfg.granularity != "client":  # the command lines refuse it first; a config built by hand lands here
            raise ValueError(
                f"estimator {cfg.estimator!r} gives one weight per client: granularity "
                f"{cfg.granularity!r} applies to the paper's estimator only"
            )
        return Verified()
    return PaperFisher(
        granularity=cfg.granularity,
        labels=cfg.fisher_labels,
        eps=cfg.eps,
        seed=derive_seed(cfg.seed, i, SALT_LABELS),
        chunk_size=cfg.fisher_chunk,
    )


def potara_step(ev: Evaluator, i: int, s: ClientSplits, G: dict, L: dict, stats=None) -> tuple[dict, dict]:
    """The client-side Potara merge of G and the client's local adapter L (potara.personalize on the
    statistics' samples: val by default, held out). With the paper's estimator and `stats`, the per-sample
    statistics Fisher merging computed on the same samples and adapters, the weight is read off them
    (potara.paper_merge, personalize's own "paper" step): one per-sample gradient pass per client, not two."""
    estimator = potara_estimator(ev, i)
    if isinstance(estimator, PaperFisher) and stats is not None:
        check_adapters(ev.model, G, L)
        return paper_merge(stats, G, L, estimator=estimator)
    return personalize(
        ev.model,
        G,
        L,
        held_out=stat_batches(ev, i, s),
        n_samples=ev.cfg.fisher_samples,
        estimator=estimator,
        likelihood=ev.likelihood,
    )


def fisher_merging(ev: Evaluator, i: int, s: ClientSplits, G: dict, L: dict) -> tuple[dict, object, dict | None]:
    """The Fisher merging baseline on the statistics' samples: (merged adapter, the gradient statistics, a fault
    record when the Fisher had NaN/Inf entries, taken as 0, else None)."""
    cfg = ev.cfg
    stats = gradient_stats(
        ev.model,
        G,
        L,
        stat_batches(ev, i, s),
        cfg.fisher_samples,
        cfg.fisher_labels,
        ev.likelihood,
        seed=derive_seed(cfg.seed, i, SALT_LABELS),
        chunk_size=cfg.fisher_chunk,
    )
    fisher, fault = {"G": stats.fisher_G, "L": stats.fisher_L}, None
    if not all(torch.isfinite(v).all() for f in fisher.values() for v in f.values()):
        warnings.warn(f"client {s.name}: NaN/Inf in the Fisher; Fisher merging takes those entries as 0")
        fisher = {m: {k: torch.nan_to_num(v, nan=0.0, posinf=0.0) for k, v in f.items()} for m, f in fisher.items()}
        fault = {"client": s.name, "what": "Fisher (Fisher merging: non-finite entries taken as 0)"}
    return fisher_merge(G, L, fisher["G"], fisher["L"]), stats, fault


@torch.no_grad()
def accuracy_and_loss(
    ev: Evaluator, adapter: dict, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> tuple[float, float]:
    """(accuracy, -mean log p) of the model holding `adapter` from ONE forward of (x, y), on merged weights:
    the accuracy is evaluation.accuracy's (the same batches, the same logits' argmax), the loss
    ev.likelihood's -(1/n) sum_i log p(y_i | x_i). For ev.evaluate = accuracy in full precision."""
    model, device = ev.model, next(ev.model.parameters()).device
    load_lora_state_dict(model, adapter, allow_rank_change=True)
    model.eval()
    correct, total = 0, 0.0
    with merged_weights(model):
        for i in range(0, len(x), batch_size):
            out = model(x[i : i + batch_size].to(device))
            logits, targets = (out.logits if hasattr(out, "logits") else out), y[i : i + batch_size]
            correct += int((logits.argmax(-1).cpu() == targets).sum())
            total += float(-ev.likelihood.log_prob(out, targets.to(device)).sum())
    load_lora_state_dict(model, ev.init, allow_rank_change=True)
    return correct / len(x), total / len(x)


def val_score_and_loss(ev: Evaluator, s: ClientSplits, G: dict, L: dict, lam: float, merged: dict) -> tuple:
    """The grid's val score and val loss at lam: one forward when the metric is accuracy in full precision
    (accuracy_and_loss); otherwise (a generated-answer metric, autocast) the metric, then the loss by
    potara.segment_loss (no autocast, as the default weight reads it)."""
    if ev.evaluate is accuracy and ev.autocast_dtype is None:
        return accuracy_and_loss(ev, merged, s.val_inputs, s.val_targets)
    score = ev.score(merged, s.val_inputs, s.val_targets)
    val = [(s.val_inputs[k : k + 64], s.val_targets[k : k + 64]) for k in range(0, len(s.val_targets), 64)]
    ev.model.eval()
    return score, segment_loss(ev.model, G, L, lam, val, ev.likelihood, ev.cfg.grid_space, slope=False)[0]


def grid_search(ev: Evaluator, s: ClientSplits, G: dict, L: dict) -> dict:
    """Merged adapters at every lam of the grid, scored on val and test, and the val loss (ev.likelihood's
    -mean log p, what the default weight reads); the val choice, the test oracle, and the loss barrier: the
    largest val loss above the chord between the two ends, max_lam f(lam) - ((1 - lam) f(0) + lam f(1)).
    Per lam: one val forward (score and loss from the same logits, val_score_and_loss) and one test forward."""
    grid, val_curve, test_curve, loss_curve = lam_grid(ev.cfg.grid_step), [], [], []
    for lam in grid:
        merged = merge_adapters(G, L, lam, ev.cfg.grid_space)
        score, loss = val_score_and_loss(ev, s, G, L, lam, merged)
        val_curve.append(score)
        loss_curve.append(loss)
        test_curve.append(ev.score(merged, s.test_inputs, s.test_targets))
    j = grid_choice(grid, val_curve)
    oracle = max(range(len(grid)), key=lambda j: test_curve[j])
    barrier = max(f - ((1 - lam) * loss_curve[0] + lam * loss_curve[-1]) for lam, f in zip(grid, loss_curve))
    return {
        "j": j,
        "lam_val": grid[j],
        "lam_oracle": grid[oracle],
        "test_at_val": test_curve[j],
        "test_oracle": max(test_curve),
        "barrier": barrier,
        "curves": {"lam": grid, "val": val_curve, "test": test_curve, "val_loss": loss_curve},
    }


@dataclass
class ClientEvaluation:
    """One client's evaluation: acc[method] on its test split, its Potara/grid record (results.json's
    per_client entry), its Potara adapter (A/B space: what a device keeps or exports), and its faults."""

    acc: dict[str, float]
    record: dict
    potara_adapter: dict[str, torch.Tensor]
    bad_stats: list[dict] = field(default_factory=list)


def statistics_fault(name: str, info: dict) -> dict | None:
    """A fault record when Potara's statistics were not finite (warned), else None."""
    if "a" in info:  # the paper's estimator: its variance terms
        terms = [v for t in "abc" for v in (info[t].values() if isinstance(info[t], dict) else [info[t]])]
        if not all(math.isfinite(v) for v in terms):
            warnings.warn(
                f"client {name}: non-finite variance terms (a, b, c) = {info['a']}, {info['b']}, "
                f"{info['c']}; Potara's lam = {info['lam']}"
            )
            return {"client": name, "what": f"variance terms (Potara: lam = {info['lam']})"}
    elif info["candidate"].startswith("fallback"):  # the default: non-finite held-out loss or slope (warned)
        return {"client": name, "what": f"held-out loss/slope (Potara: lam = {info['lam']})"}
    return None


def evaluate_client(
    ev: Evaluator, i: int, s: ClientSplits, G: dict, L: dict, finetuned: dict, fedsa_adapter: dict | None = None
) -> ClientEvaluation:
    """Every method on client i's test split, given the federated adapter G, its local adapter L, its fine-tuned
    adapter and (when FedSA-LoRA ran) its FedSA adapter. Writes nothing; the caller keeps what it needs."""
    test, space = (s.test_inputs, s.test_targets), ev.cfg.grid_space
    acc = {
        "local": ev.score(L, *test),
        "fedit": ev.score(G, *test),
        "fedit_ft": ev.score(finetuned, *test),
        "uniform": ev.score(merge_adapters(G, L, 0.5, space), *test),
    }
    fisher_merged, stats, fisher_fault = fisher_merging(ev, i, s, G, L)
    acc["fisher"] = ev.score(fisher_merged, *test)
    if fedsa_adapter is not None:
        acc["fedsa"] = ev.score(fedsa_adapter, *test)
    merged, info = potara_step(ev, i, s, G, L, stats)  # "paper": the statistics Fisher merging used
    bad_stats = [f for f in (fisher_fault, statistics_fault(s.name, info)) if f is not None]
    acc["potara_ab"] = ev.score(merged, *test)
    # the same lam in both spaces: the statistics are of phi_G and phi_L, not of the merged adapter
    acc["potara_delta"] = ev.score(merge_adapters(G, L, info["lam"], "delta"), *test)
    grid = grid_search(ev, s, G, L)
    acc["grid_val"], acc["grid_oracle"] = grid["test_at_val"], grid["test_oracle"]
    lam_p = mean(info["lam"].values()) if isinstance(info["lam"], dict) else info["lam"]
    record = {
        "potara": info,
        "lam_potara": lam_p,
        "lam_grid_val": grid["lam_val"],
        "lam_grid_oracle": grid["lam_oracle"],
        "abs_lam_diff": abs(lam_p - grid["lam_val"]),
        "barrier": grid["barrier"],
        "grid": grid["curves"],
    }
    return ClientEvaluation(acc, record, merged, bad_stats)
