"""The paper-claims study behind `python -m potara_studies.claims` (claims.py: its command line): each of the
paper's three claims tested where this machine can test it, with the data and the verdicts in --out/claims.json.

    args = claims.resolve(claims.build_parser(), argv)   # the checked command line
    results = run(args)                                  # --out/claims.json, claims.md, claim1-3.png

Claim 1 (the closed-form weight is about as good as a grid search over lam) is the estimator study's question:
it runs potara_studies/estimator_study.py on both its suites, real digits and synthetic images, for the default
estimator on held-out samples and the paper's on 32 training samples (claims.CLAIM1_*), into --out/claim1-*/.
Claims 2 (Potara's gain grows with the FedIT rounds) and 3 (Potara needs fewer rounds, so fewer bytes, than
FedIT + fine-tuning and FedSA-LoRA) read the same runs: per pipeline and seed one federation, each method at
several round counts (round_sweep.py). The pipelines (claims_config.py): the vision and language demos' tiny
presets, real digits with an MLP pre-trained here, real text with a real pre-trained encoder (stdlib_text.py).
claims.json is rewritten after every suite and every seed (a failure loses only the unit under way; --resume
skips the units it holds); the verdicts, tables and figures come from it alone (claims_report.py).
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from dataclasses import replace
from typing import Callable

import numpy as np
import torch

from data import DataError, client_splits, dirichlet_partition, label_partition, load_images, public_and_pool
from fed import progress_bar
from lora import add_lora
from potara import causal_lm_likelihood
from potara_guards.safe_files import read_regular
from potara_harness import cli
from potara_harness.config import (
    LM_PRESETS,
    MAX_RESULTS_FILE_BYTES,
    SYNTHETIC_TASKS_SEED,
    VIT_PRESETS,
    DigitsConfig,
    ExperimentConfig,
)
from potara_harness.report import strict_json, write_text
from potara_harness.vit import build_model, tiny_backbone
from potara_studies import claims_report, digits, estimator_study, stdlib_text
from potara_studies.claims_config import OUTPUT_FILES, SweepSettings, TextConfig, sweep_settings
from potara_studies.round_sweep import Federation, sweep

Maker = Callable[[int], Federation]  # seed -> the pipeline's federation for that seed


# ----------------------------------------------------------------------------- the pipelines
def training(seed: int, rounds: int, s: SweepSettings, base: dict) -> ExperimentConfig:
    """The pipeline's ExperimentConfig: its preset's training (`base`), the sweep's overrides, the default
    estimator on min(100, val) held-out samples (what the demos' command lines fill in)."""
    pick = lambda k: getattr(s, k) if getattr(s, k) is not None else base[k]
    return ExperimentConfig(
        rounds=rounds,
        local_steps=pick("local_steps"),
        lr=base["lr"],
        batch_size=base["batch_size"],
        local_train_steps=pick("local_train_steps"),
        finetune_steps=pick("finetune_steps"),
        fisher_samples=min(ExperimentConfig.fisher_samples, pick("val")),
        seed=seed,
    )


def sizes(s: SweepSettings, base: dict) -> tuple[int, int, int]:
    return tuple(getattr(s, k) if getattr(s, k) is not None else base[k] for k in ("train", "val", "test"))


def vision(s: SweepSettings, args) -> tuple[Maker, dict]:
    """run_cifar.py --preset tiny --data synthetic: 5 clients, Dirichlet(0.5) label skew, the cached tiny ViT."""
    p, ex = VIT_PRESETS["tiny"], s.extra
    per_class = ex.get("synthetic_per_class", 500)
    data, _ = load_images("synthetic", args.data_dir, per_class)
    public, pool = public_and_pool(len(data.labels), ex.get("public", p["public"]))
    desc = {"data": "synthetic", "synthetic_per_class": per_class}
    backbone, info = tiny_backbone(
        p,
        data,
        public,
        desc,
        args.data_dir,
        ex.get("pretrain_steps", p["pretrain_steps"]),
        torch.device("cpu"),
        args.progress,
    )
    clients, split = s.clients or p["clients"], sizes(s, p)

    def make(seed: int) -> Federation:
        labels = data.labels[pool]
        parts = label_partition("dirichlet", labels, data.coarse_labels[pool], clients, p["alpha"], sum(split), seed)
        splits = client_splits(data.images, data.labels, pool, parts, split, seed)
        model = build_model(copy.deepcopy(backbone), p, p["rank"], p["lora_alpha"], seed)
        return Federation(model, splits, training(seed, max(s.rounds), s, p), paper_samples=s.paper_samples)

    source = f"SYNTHETIC images (data.py's CIFAR-100 stand-in, {per_class} per class), tiny ViT pre-trained here"
    return make, {"data": source, "clients": clients, "sizes": split, "backbone": info}


def language(s: SweepSettings, args) -> tuple[Maker, dict]:
    """run_llm.py --model tiny --data synthetic: one synthetic task per client, the cached tiny Llama."""
    from potara_harness.llm_data import ByteTokenizer
    from potara_harness.llm_tasks import synthetic_tasks
    from potara_harness.lm import Scorer, add_language_lora, build_splits, lm_loss, pretrain_tiny, tiny_model

    p = {**LM_PRESETS["tiny"], **{k: v for k, v in s.extra.items() if k in LM_PRESETS["tiny"]}}
    tasks = synthetic_tasks(s.extra.get("synthetic_examples", 600), seed=SYNTHETIC_TASKS_SEED)
    tasks = dict(list(tasks.items())[: s.clients or len(tasks)])
    tok = ByteTokenizer()
    torch.manual_seed(0)  # the tiny model's initial weights, before pre-training (run_llm.py's)
    base = tiny_model(p["max_len"])
    info = pretrain_tiny(base, tok, p, 0, os.path.join(args.data_dir, "llm"), torch.device("cpu"), args.progress)
    scorer = Scorer(tok, p["max_new_tokens"], 64)
    split = sizes(s, p)

    def make(seed: int) -> Federation:
        splits = build_splits(tasks, tok, split, p["max_len"], seed, scorer)
        model = copy.deepcopy(base)
        add_language_lora(model, ["q_proj", "v_proj"], p["rank"], p["lora_alpha"], seed)
        cfg = training(seed, max(s.rounds), s, p)
        return Federation(model.eval(), splits, cfg, scorer, lm_loss, causal_lm_likelihood, s.paper_samples)

    source = f"SYNTHETIC tasks (llm_tasks.py, one per client: {', '.join(tasks)}), tiny Llama pre-trained here"
    return make, {"data": source, "clients": len(tasks), "sizes": split, "model": info}


def digits_pipeline(s: SweepSettings, args) -> tuple[Maker, dict]:
    """Real handwritten digits (scikit-learn's bundled copy), Dirichlet(0.5) label skew, an MLP pre-trained here on
    500 public digits (potara_studies/digits.py); finetune_steps a quarter of the local steps, as both presets."""
    base = DigitsConfig()
    cfg = replace(
        base,
        **{
            k: getattr(s, k)
            for k in ("clients", "train", "val", "test", "local_steps", "local_train_steps")
            if getattr(s, k) is not None
        },
        **{k: v for k, v in s.extra.items() if k == "pretrain_steps"},
    )
    x, y = digits.load_digits_data()
    public, pool = public_and_pool(len(y), cfg.public)
    backbone = digits.pretrain_backbone(x[public], y[public], cfg)
    train = {**vars(cfg), "finetune_steps": s.finetune_steps or cfg.local_train_steps // 4}

    def make(seed: int) -> Federation:
        splits = digits.scenario_splits("dirichlet-0.5", x, y, pool, cfg, seed)
        model = digits.build_model(backbone, cfg, seed)
        return Federation(model, splits, training(seed, max(s.rounds), s, train), paper_samples=s.paper_samples)

    source = "REAL handwritten digits (scikit-learn's bundled UCI set), MLP pre-trained here on 500 public digits"
    return make, {"data": source, "clients": cfg.clients, "sizes": (cfg.train, cfg.val, cfg.test)}


def text(s: SweepSettings, args) -> tuple[Maker, dict]:
    """Real text, real pre-trained model: standard-library docstrings by Library Reference chapter, all-MiniLM-L6-v2
    with LoRA on its last layer (stdlib_text.py); Dirichlet(0.5) label skew over the chapters."""
    tc = TextConfig()
    tc = replace(tc, **{k: getattr(s, k) for k in ("clients", "train", "val", "test") if getattr(s, k) is not None})
    texts, labels = stdlib_text.load_corpus()
    labels = np.asarray(labels)
    encoder, tokenizer = stdlib_text.load_minilm()
    features = torch.zeros(len(texts), tc.max_len, stdlib_text.HIDDEN + 1)
    done = np.zeros(len(texts), dtype=bool)
    split = (tc.train, tc.val, tc.test)
    train = {**vars(tc)}

    def make(seed: int) -> Federation:
        parts = dirichlet_partition(labels, tc.clients, tc.alpha, sum(split), seed)
        todo = np.flatnonzero(~done & np.isin(np.arange(len(texts)), np.concatenate(parts)))
        if len(todo):  # layers 0-4 once per text: the same for every adapter
            features[todo] = stdlib_text.frozen_features(encoder, tokenizer, [texts[i] for i in todo], tc.max_len)
            done[todo] = True
        splits = client_splits(features, labels, np.arange(len(texts)), parts, split, seed)
        model = stdlib_text.TopLayerClassifier(copy.deepcopy(encoder.encoder.layer[-1]), len(stdlib_text.CHAPTERS))
        torch.manual_seed(seed)  # phi_0's A factors
        add_lora(model, ["query", "value"], r=tc.rank, alpha=tc.lora_alpha, trainable=["head"])
        return Federation(model.eval(), splits, training(seed, max(s.rounds), s, train), paper_samples=s.paper_samples)

    counts = {c: int((labels == i).sum()) for i, c in enumerate(stdlib_text.CHAPTERS)}
    source = (
        f"REAL text: {len(texts)} docstrings of Python {platform.python_version()}'s standard library in "
        f"{len(counts)} Library Reference chapters; all-MiniLM-L6-v2 (pre-trained, from its package), LoRA on "
        "its last layer"
    )
    return make, {"data": source, "clients": tc.clients, "sizes": split, "chapters": counts}


PIPELINES = {"vision": vision, "language": language, "digits": digits_pipeline, "text": text}


# ----------------------------------------------------------------------------- the study
def claim1(args, suite: str) -> dict:
    """The estimator study's suite (its checked command line: claims.resolve made it), its summary kept."""
    a, p = args.claim1[suite]
    results = estimator_study.run(a, p)
    return {"command": a.command, "summary": results["summary"], "seconds": results["timing_s"]["total"]}


def claim_sweeps(args, results: dict, save: Callable[[], None]) -> None:
    """Claims 2 and 3: per pipeline, one sweep per seed (round_sweep.sweep), each saved as it ends."""
    for name in args.pipelines:
        s = sweep_settings(name, args.reduced, args.seeds)
        entry = results["sweeps"].setdefault(name, {"seeds": {}})
        todo = [seed for seed in s.seeds if str(seed) not in entry["seeds"]]
        if not todo:
            continue
        t0 = time.time()
        try:
            make, info = PIPELINES[name](s, args)
        except (DataError, OSError) as e:
            cli.fail(f"the {name} pipeline: {e}")
        entry.update(info=info, rounds=list(s.rounds), setup_s=time.time() - t0)
        for seed in progress_bar(todo, f"{name}: seeds", args.progress, stage=True):
            t0 = time.time()
            entry["seeds"][str(seed)] = {**sweep(make(seed), s.rounds, args.progress), "seconds": time.time() - t0}
            save()


def machine() -> dict:
    """What the timings were measured on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cores": os.cpu_count(), "load_avg": load}


def previous(args) -> dict | None:
    """--resume: the claims.json of an earlier run with the same settings, or None (nothing to reuse)."""
    path = os.path.join(args.out, OUTPUT_FILES[0])
    if not (args.resume and os.path.lexists(path)):
        return None
    try:
        old = json.loads(read_regular(path, MAX_RESULTS_FILE_BYTES))
    except (OSError, ValueError) as e:
        cli.fail(f"--resume: {path}: {(str(e) or type(e).__name__).splitlines()[0][:200]} (remove it)")
    if not isinstance(old, dict) or old.get("settings", {}).get("key") != args.key:
        print(f"--resume: {path} is another study's (other settings): starting from scratch")
        return None
    return old


def run(args) -> dict:
    """Every claim of the checked command line (claims.resolve), torch started (cli.start_torch)."""
    t_start = time.time()
    results = previous(args) or {"settings": {"key": args.key, "command": args.command}, "claim1": {}, "sweeps": {}}
    results["settings"]["command"] = args.command

    def save() -> None:
        results["machine"] = machine()
        write_text(os.path.join(args.out, OUTPUT_FILES[0]), json.dumps(strict_json(results), indent=1))

    if "1" in args.claims:
        for suite in args.suites:
            if suite not in results["claim1"]:
                results["claim1"][suite] = claim1(args, suite)
                save()
    if {"2", "3"} & set(args.claims):
        claim_sweeps(args, results, save)
    results["seconds"] = results.get("seconds", 0.0) + time.time() - t_start
    save()
    text = claims_report.write(results, args.out, args.figures)
    print(text)
    print(f"{time.time() - t_start:.0f}s; results in {args.out}/{OUTPUT_FILES[0]} and {OUTPUT_FILES[1]}")
    return results
