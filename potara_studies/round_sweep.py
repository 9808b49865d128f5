"""Every method of claims 2 and 3 at several FedIT round counts, from one federation: how Potara's gain moves with
the rounds, and what each method's accuracy cost in bytes.

    fed = Federation(model, splits, cfg)                 # cfg: the pipeline's ExperimentConfig (cfg.rounds unused)
    result = sweep(fed, rounds=(5, 10, 20, 50, 100, 200))
    result["rounds"]["200"]["mean"]["potara"]            # mean test accuracy over the clients

FedIT and FedSA-LoRA run once each, for R = max(rounds) rounds (fed.run_fedit), and their adapters are kept at
every round count r of `rounds` (on_round). A run of r rounds IS the first r rounds of a longer one: round t draws
everything from fed.derive_seed(seed, t, client) and the learning rate is constant, so the adapters kept at r are
those an r-round run ends with (tests/test_claims.py holds the sweep at r equal to pipeline.run_experiment with
rounds=r). Per round count r and client k, each scored on k's own test split:

    fedit(r)         phi_G^r, the global adapter after r rounds
    potara(r)        phi_G^r merged with phi_L at the default weight (evaluation.potara_step: the pipeline's step,
                     the verified estimator on min(100, val) held-out samples)
    potara_paper(r)  the same with the paper's estimator in the paper's setting: PaperFisher on 32 training samples
    fedit_ft(r)      phi_G^r fine-tuned for cfg.finetune_steps on k's training split (pipeline.train_local)
    fedsa(r)         FedSA-LoRA after r rounds: the shared A factors with k's own B factors and head
and, once, local = phi_L: cfg.local_train_steps from phi_0 on k's training split (no communication).
Bytes at r (report.sent_bytes): FedIT's rounds 1..r both ways for fedit, potara, potara_paper and fedit_ft (the
merge and the fine-tuning are on the device); FedSA-LoRA's own rounds 1..r for fedsa; 0 for local.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Sequence

import torch.nn as nn

from data import ClientSplits
from fed import Client, FedState, LossFn, classification_loss, progress_bar, run_fedit
from lora import load_lora_state_dict, lora_factor, lora_state_dict
from potara import Likelihood, classification_likelihood
from potara_harness.config import ExperimentConfig
from potara_harness.evaluation import Evaluate, Evaluator, accuracy, potara_step
from potara_harness.pipeline import finetune_seed, local_seed, train_local
from potara_harness.report import mean, sent_bytes


@dataclass
class Federation:
    """One pipeline's federation for one seed: the model (its adapter phi_0 on entry), the clients and the
    settings, with the pipeline's plug-ins (metric, training loss, likelihood of the statistics)."""

    model: nn.Module
    splits: Sequence[ClientSplits]
    cfg: ExperimentConfig
    evaluate: Evaluate = accuracy
    loss_fn: LossFn = classification_loss
    likelihood: Likelihood = classification_likelihood
    paper_samples: int = 32


def kept_states(fed: Federation, rounds: Sequence[int], share=None) -> tuple[FedState, dict[int, FedState]]:
    """One federated run of max(rounds) rounds (FedIT; FedSA-LoRA with `share` selecting the A factors) and the
    state after each round count in `rounds`, copied as it was then."""
    kept: dict[int, FedState] = {}

    def keep(state: FedState) -> None:
        if state.round in rounds:
            private = {name: dict(p) for name, p in state.private_states.items()}
            kept[state.round] = FedState(state.round, dict(state.global_state), private, list(state.history))

    clients = [Client(s.name, s.train_inputs, s.train_targets) for s in fed.splits]
    cfg = replace(fed.cfg, rounds=max(rounds)).fed_config()
    final = run_fedit(fed.model, clients, cfg, loss_fn=fed.loss_fn, share=share, on_round=keep, progress=False)
    return final, kept


def score_round(fed: Federation, ev: Evaluator, ev_paper: Evaluator, G: dict, fedsa: FedState, local: list) -> dict:
    """Every client's test accuracy for each method at one round count (FedIT's phi_G^r, FedSA-LoRA's state),
    and the weights lam both estimators chose."""
    acc = {m: [] for m in ("fedit", "potara", "potara_paper", "fedit_ft", "fedsa")}
    lams = {"potara": [], "potara_paper": []}
    cfg = fed.cfg
    for i, s in enumerate(fed.splits):
        test = (s.test_inputs, s.test_targets)
        acc["fedit"].append(ev.score(G, *test))
        for m, e in (("potara", ev), ("potara_paper", ev_paper)):
            merged, info = potara_step(e, i, s, G, local[i])
            acc[m].append(ev.score(merged, *test))
            lams[m].append(float(info["lam"]))
        tuned = train_local(fed.model, G, s, cfg.finetune_steps, finetune_seed(cfg.seed, i), cfg, fed.loss_fn)
        acc["fedit_ft"].append(ev.score(tuned, *test))
        acc["fedsa"].append(ev.score({**fedsa.global_state, **fedsa.private_states[s.name]}, *test))
    return {"acc": acc, "lam": lams}


def sweep(fed: Federation, rounds: Sequence[int], progress: bool = False) -> dict:
    """Every method at every round count (module docstring): per round count the per-client accuracies, their
    means, the weights chosen and the bytes each method sent; the seconds each stage took."""
    rounds, cfg, t0, timing = sorted(set(rounds)), fed.cfg, time.time(), {}
    ev = Evaluator(fed.model, lora_state_dict(fed.model), cfg, fed.evaluate, fed.likelihood)
    paper_cfg = replace(cfg, estimator="paper", fisher_split="train", fisher_samples=fed.paper_samples)
    ev_paper = Evaluator(fed.model, ev.init, paper_cfg, fed.evaluate, fed.likelihood)
    fedit_final, fedit = kept_states(fed, rounds)
    fedsa_final, fedsa = kept_states(fed, rounds, share=lambda k: lora_factor(k) == "A")
    timing["federated"], t0 = time.time() - t0, time.time()
    local = [
        train_local(fed.model, ev.init, s, cfg.local_train_steps, local_seed(cfg.seed, i), cfg, fed.loss_fn)
        for i, s in enumerate(fed.splits)
    ]
    local_acc = [ev.score(L, s.test_inputs, s.test_targets) for L, s in zip(local, fed.splits)]
    timing["local"], t0 = time.time() - t0, time.time()
    out = {"clients": [s.name for s in fed.splits], "rounds": {}}
    for r in progress_bar(rounds, "round counts", progress, stage=True):
        scored = score_round(fed, ev, ev_paper, fedit[r].global_state, fedsa[r], local)
        acc = {"local": local_acc, **scored["acc"]}
        fb, sb = sent_bytes(fedit_final.history[:r]), sent_bytes(fedsa_final.history[:r])
        out["rounds"][str(r)] = {
            "per_client": acc,
            "mean": {m: mean(v) for m, v in acc.items()},
            "lam": scored["lam"],
            "bytes": {"local": 0, "fedit": fb, "potara": fb, "potara_paper": fb, "fedit_ft": fb, "fedsa": sb},
        }
    timing["evaluation"] = time.time() - t0
    load_lora_state_dict(fed.model, ev.init)
    return {**out, "timing_s": timing}
