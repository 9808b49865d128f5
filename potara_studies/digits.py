"""Real handwritten digits for the merge-weight study (python -m potara_studies.ablation --suite real): data,
backbone, clients.

    from potara_studies.digits import load_digits_data, pretrain_backbone, build_model, scenario_splits
    cfg = DigitsConfig()                           # sizes and training: potara_harness/config.py
    x, y = load_digits_data()                      # 1797 real 8x8 images (UCI optical digits), labels 0-9
    public, pool = public_and_pool(len(y), cfg.public)
    backbone = pretrain_backbone(x[public], y[public], cfg)       # small and quick: not cached
    splits = scenario_splits("conflict", x, y, pool, cfg, seed)   # one ClientSplits per client
    model = build_model(backbone, cfg, seed)       # zero head + LoRA on both hidden layers (phi_0 from seed)

The data is scikit-learn's bundled copy of the UCI "optical recognition of handwritten digits" test set
(`sklearn.datasets.load_digits`: it ships inside the package, nothing is downloaded), so the study runs
offline on data nobody here made. scikit-learn is imported only here, lazily (the `study` extra).
The backbone is a 2-hidden-layer MLP pre-trained to classify the digit on a fixed public split no client
holds; clients adapt it with LoRA on both hidden layers plus a new zero head (10 outputs for every task).
Scenarios (config.DIGITS_SCENARIOS):
  conflict        every client holds a disjoint uniform sample of the same digits and labels it its own way
                  (TASKS: the digit, its parity, digit > 4, digit mod 3, 9 - digit, digit mod 4): what FedIT
                  learns fits no client, and the two adapters need not be linearly connected;
  dirichlet-0.5   label skew (the paper's setting): digit labels, class mix q_k ~ Dir(0.5).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ClientSplits, DataError, client_splits, dirichlet_partition
from lora import add_lora
from potara_harness.config import DIGITS_SCENARIOS, DigitsConfig

TASKS = {  # client k's task: TASK_ORDER[k % 6]; each maps the digit to the client's label (all in 0..9)
    "digit": lambda d: d,
    "parity": lambda d: d % 2,
    "greater-than-4": lambda d: (d > 4).astype(np.int64),
    "mod-3": lambda d: d % 3,
    "mirror": lambda d: 9 - d,
    "mod-4": lambda d: d % 4,
}
TASK_ORDER = list(TASKS)


def load_digits_data() -> tuple[torch.Tensor, np.ndarray]:
    """(images [1797, 64] float32 in [0, 1], labels [1797] int64) from scikit-learn's bundled copy."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the real-data suite needs scikit-learn (its bundled digits): pip install '.[study]'") from None
    bunch = load_digits()
    return torch.tensor(bunch.data / 16.0, dtype=torch.float32), bunch.target.astype(np.int64)


class DigitMLP(nn.Module):
    """x [batch, 64] -> body (Linear, ReLU, Linear, ReLU) -> head Linear -> logits [batch, classes]."""

    def __init__(self, hidden: int = 64, classes: int = 10):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def pretrain_backbone(x: torch.Tensor, y: np.ndarray, cfg: DigitsConfig, seed: int = 0) -> DigitMLP:
    """Full-batch AdamW on the public split's digit labels (deterministic for a seed; ~1 s on one thread)."""
    torch.manual_seed(seed)
    model = DigitMLP(cfg.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-4)
    target = torch.from_numpy(y)
    for _ in range(cfg.pretrain_steps):
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def build_model(backbone: DigitMLP, cfg: DigitsConfig, seed: int) -> DigitMLP:
    """The client model: a copy of the backbone, a new zero head (a fresh task), LoRA on both hidden layers;
    the LoRA A factors (phi_0, shared by server and clients) are drawn from `seed`."""
    model = copy.deepcopy(backbone)
    model.head = nn.Linear(cfg.hidden, 10)
    nn.init.zeros_(model.head.weight)
    nn.init.zeros_(model.head.bias)
    torch.manual_seed(seed)
    add_lora(model, ["body.0", "body.2"], r=cfg.rank, alpha=cfg.lora_alpha, trainable=["head"])
    return model.eval()


def task_tables(num_clients: int) -> list[np.ndarray]:
    """relabel[k][d] = client k's label of digit d (TASK_ORDER, cycling)."""
    digits = np.arange(10)
    return [TASKS[TASK_ORDER[k % len(TASK_ORDER)]](digits).astype(np.int64) for k in range(num_clients)]


def scenario_splits(
    name: str, x: torch.Tensor, y: np.ndarray, pool: np.ndarray, cfg: DigitsConfig, seed: int
) -> list[ClientSplits]:
    """The clients of scenario `name`: disjoint samples of the pool, each split train / val / test from the
    client's own distribution (and labelled by its own task under "conflict")."""
    if name not in DIGITS_SCENARIOS:
        raise DataError(f"unknown real-data scenario {name!r}; choose from {list(DIGITS_SCENARIOS)}")
    spec, per_client = DIGITS_SCENARIOS[name], cfg.train + cfg.val + cfg.test
    labels = y[pool]
    if spec["partition"] == "dirichlet":
        parts = dirichlet_partition(labels, cfg.clients, spec["alpha"], per_client, seed)
    else:
        if cfg.clients * per_client > len(pool):
            raise DataError(f"{cfg.clients} clients x {per_client} samples > the {len(pool)} images of the pool")
        order = np.random.default_rng(seed).permutation(len(pool))
        parts = [np.sort(order[k * per_client : (k + 1) * per_client]) for k in range(cfg.clients)]
    relabel = task_tables(cfg.clients) if spec["tasks"] else None
    return client_splits(x, y, pool, parts, (cfg.train, cfg.val, cfg.test), seed, relabel)
