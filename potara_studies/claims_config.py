"""The settings of the paper-claims study (python -m potara_studies.claims): which pipelines, round counts, seeds
and sizes; here, without torch, so that the study's --help and its argument checks answer at once.

    s = sweep_settings("vision", reduced=False)   # a SweepSettings: rounds, seeds, sizes, training
    s.rounds                                       # (5, 10, 20, 50, 100, 200): FedIT round counts read off one run

Every pipeline of claims 2 and 3 is a federation run as the demos run it (potara_harness.pipeline's stages and
seeds), read at several FedIT round counts:
  vision    run_cifar.py --preset tiny --data synthetic: the synthetic CIFAR-100 stand-in, the tiny ViT pre-trained
            here, 5 clients with Dirichlet(0.5) label skew; every training setting the preset's;
  language  run_llm.py --model tiny --data synthetic: the tiny Llama pre-trained here, 8 synthetic tasks, one per
            client; every training setting the preset's;
  digits    scikit-learn's bundled handwritten digits (real data), an MLP pre-trained here on 500 public digits,
            6 clients with Dirichlet(0.5) label skew (potara_studies/digits.py, config.DigitsConfig);
  text      real text and a real pre-trained model: the docstrings of Python's standard library, labelled with the
            chapter of the Library Reference that documents their module, and all-MiniLM-L6-v2 (a pre-trained
            BERT sentence encoder, from its pip package) with LoRA on its last layer (potara_studies/stdlib_text.py).
The round counts and seeds were chosen for what this 2-core machine affords in an hour, before any result was
seen, and were not changed after.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

PIPELINES = ("vision", "language", "digits", "text")
CLAIMS = ("1", "2", "3")
SUITES = ("real", "synthetic")  # claim 1: the estimator study's two suites (potara_studies/ablation.py)
CLAIM1_ESTIMATORS = "verified,paper"  # the default and the paper's estimator
CLAIM1_SOURCES = "val,train32"  # the default's held-out samples; the paper's 32 training samples
COMPARABLE = 0.98  # claim 1: "comparable" = at least this fraction of the grid search's accuracy (the study's goal)
TARGET_FRACTIONS = (0.95, 0.99)  # claim 3: targets, as fractions of the best accuracy any method reached in a sweep
SWEEP_METHODS = ("local", "fedit", "potara", "potara_paper", "fedit_ft", "fedsa")
METHOD_LABELS = {
    "local": "Local only",
    "fedit": "FedIT (global adapter)",
    "potara": "Potara (default estimator)",
    "potara_paper": "Potara (paper's estimator)",
    "fedit_ft": "FedIT + local fine-tuning",
    "fedsa": "FedSA-LoRA",
}
OUTPUT_FILES = ("claims.json", "claims.md", "claim1.png", "claim2.png", "claim3.png")  # in --out
CLAIM1_FOLDERS = {"real": "claim1-real", "synthetic": "claim1-synthetic"}  # in --out: each suite's ablation folder


@dataclass(frozen=True)
class SweepSettings:
    """One pipeline of claims 2 and 3: the round counts read off one federation per seed, the seeds, and the
    pipeline's own sizes and training (None: the demo's preset or DigitsConfig's value)."""

    rounds: tuple[int, ...]
    seeds: tuple[int, ...]
    clients: int | None = None
    train: int | None = None
    val: int | None = None
    test: int | None = None
    local_steps: int | None = None
    local_train_steps: int | None = None
    finetune_steps: int | None = None
    paper_samples: int = 32  # the paper's estimator reads this many training samples (the paper's setting)
    extra: dict = field(default_factory=dict)  # pipeline-specific sizes (pre-training, data), reduced mode only


FULL = {
    "vision": SweepSettings(rounds=(5, 10, 20, 50, 100), seeds=(0, 1, 2)),
    "language": SweepSettings(rounds=(5, 10, 20, 50), seeds=(0, 1)),
    "digits": SweepSettings(rounds=(5, 10, 20, 50, 100, 200), seeds=(0, 1, 2, 3, 4)),
    "text": SweepSettings(rounds=(3, 5, 10, 20, 30), seeds=(0, 1)),
}
CLAIM1_FULL = {"real": [], "synthetic": ["--seeds", "0,1"]}  # the study's own settings; 2 of its 3 synthetic seeds


def toy(train: int, val: int, test: int, local_steps: int = 1, local_train_steps: int = 3, **extra) -> SweepSettings:
    """A pipeline at toy size: round counts 1 and 2 of one seed, 2 clients, 2 fine-tuning steps, 8 paper samples;
    `extra` the pipeline's own sizes."""
    return SweepSettings(
        rounds=(1, 2),
        seeds=(0,),
        clients=2,
        train=train,
        val=val,
        test=test,
        local_steps=local_steps,
        local_train_steps=local_train_steps,
        finetune_steps=2,
        paper_samples=8,
        extra=extra,
    )


REDUCED = {  # every step of the study at toy size (tests/test_claims.py runs it): its numbers mean nothing
    "vision": toy(24, 12, 12, public=1000, pretrain_steps=2, synthetic_per_class=12),
    "language": toy(16, 8, 8, pretrain_steps=2, synthetic_examples=40),
    "digits": toy(20, 10, 10, local_steps=2, local_train_steps=5, pretrain_steps=5),
    "text": toy(16, 8, 8),
}
CLAIM1_REDUCED = {  # the estimator study's options at toy size, per suite
    "real": [
        "--seeds",
        "0",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--local-train-steps",
        "5",
        "--pretrain-steps",
        "5",
        "--grid-step",
        "0.25",
    ],
    "synthetic": [
        "--seeds",
        "0",
        "--scenarios",
        "dirichlet-0.1,superclass",
        "--rounds",
        "1",
        "--clients",
        "2",
        "--train",
        "20",
        "--val",
        "10",
        "--test",
        "10",
        "--local-steps",
        "1",
        "--local-train-steps",
        "3",
        "--public",
        "1000",
        "--pretrain-steps",
        "2",
        "--synthetic-per-class",
        "12",
        "--grid-step",
        "0.25",
    ],
}


@dataclass(frozen=True)
class TextConfig:
    """The text pipeline's sizes and training (potara_studies/stdlib_text.py): the tiny vision preset's training
    settings but batches of 16 (a BERT layer costs ~10x a tiny ViT step here), LoRA on the last layer only."""

    clients: int = 5
    alpha: float = 0.5  # Dirichlet label skew over the chapters (the paper's setting)
    train: int = 100
    val: int = 50
    test: int = 80
    max_len: int = 32  # tokens per docstring (MiniLM's tokenizer; longer ones are cut)
    rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 3e-3
    batch_size: int = 16
    local_steps: int = 5
    local_train_steps: int = 100
    finetune_steps: int = 25


def sweep_settings(pipeline: str, reduced: bool, seeds: tuple[int, ...] | None = None) -> SweepSettings:
    """The pipeline's settings (REDUCED or FULL), with `seeds` in place of its own when given."""
    s = (REDUCED if reduced else FULL)[pipeline]
    return replace(s, seeds=tuple(seeds)) if seeds else s
