"""What the Flower ServerApp (flower_server.py) and ClientApp (flower_client.py) share: the run
configuration, the message protocol, and adapter tensors <-> Flower ArrayRecords.

    flower-superlink --insecure --host 127.0.0.1 --port 9093 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \
        --node-config "partition-id=0 num-partitions=2 backbone='data/backbones/tiny-<key>.pt' data-dir='data'"
    flwr run . <connection> --run-config "rounds=5 out-dir='/abs/path/runs/flower'"

(README, "Federated deployment with Flower", has the whole recipe, with TLS and SuperNode keys.)

The protocol, one Flower Message per arrow (client k = the SuperNode whose node config says
partition-id=k; every client holds the same backbone file and builds the same phi_0):

    setup      server -> every node: {}            node -> server: its partition, n_k, phi_0, backbone hash
    train      server -> k in S_t:   phi^t         k -> server:    phi_k^{t+1}, n_k, mean loss
               (a simulated drop-out gets {"drop": 1} and answers without training or tensors)
    evaluate   server -> every k:    phi^R         k -> server:    accuracies, evaluate_client's record (numbers)

What crosses the wire: the federated adapter (float32: Flower's ArrayRecord cannot carry bfloat16)
and plain numbers. What never does: the client's data, its local adapter phi_L, its fine-tuned and
merged adapters, and Potara's gradient statistics: they live and die inside the client process.
The run configuration ([tool.flwr.app.config] in pyproject.toml, overridden by `flwr run
--run-config`) reaches the ServerApp and every ClientApp alike; TOML has no None, so
max-update-norm = 0 means "no bound".
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, fields

import numpy as np
import torch

from data import ClientSplits, load_images
from potara import DEFAULT_ESTIMATOR, ESTIMATORS
from potara_harness.partition import client_splits, label_partition, public_and_pool
from potara_harness.pipeline import ExperimentConfig

SETUP, TRAIN, EVALUATE = "query", "train", "evaluate"  # Flower message types (ClientApp handlers)
ADAPTER, CONFIG, METRICS = "adapter", "config", "metrics"  # keys of a message's RecordDict


class ConfigError(ValueError):
    """A run or node configuration value that is missing, of the wrong type, or out of range (one line)."""


@dataclass
class AppConfig:
    """The run configuration; every field is a key of [tool.flwr.app.config] with - for _."""
    num_clients: int = 2           # SuperNodes (= partitions) the server waits for
    rounds: int = 20               # FedIT rounds R
    local_steps: int = 5           # AdamW steps per client per round
    clients_per_round: int = 0     # 0 = every client every round
    lr: float = 3e-3
    batch_size: int = 32
    rank: int = 8                  # LoRA rank r on the attention q and v
    lora_alpha: float = 16.0
    seed: int = 0
    preset: str = "tiny"           # vit.PRESETS: the image normalisation (and architecture of a plain state_dict)
    data: str = "synthetic"        # "synthetic" (written offline) or "cifar" (CIFAR-100 under the node's data-dir)
    synthetic_per_class: int = 500
    partition: str = "dirichlet"   # "dirichlet" (label skew) or "superclass"
    alpha: float = 0.5             # Dirichlet concentration
    public: int = 30000            # images no client holds (the tiny backbone's pre-training set)
    train: int = 400               # images per client and split
    val: int = 100
    test: int = 200
    local_train_steps: int = 100   # the local adapter phi_L, from phi_0 (after the last round)
    finetune_steps: int = 25       # the "FedIT + local fine-tuning" baseline, from phi_G
    estimator: str = "default"     # one of potara.ESTIMATORS, or "default": potara.DEFAULT_ESTIMATOR
    fisher_samples: int = 100      # validation samples for Potara's statistics
    grid_step: float = 0.05        # the lam grid of the grid-search baseline
    drop_prob: float = 0.0         # simulated drop-outs (seeded as fed.sample_clients)
    max_update_norm: float = 0.0   # reject ||phi_k - phi^t|| above it; 0 = no bound
    out_dir: str = "runs/flower"   # on the server: results.json, results.md, checkpoint.pt
    resume: bool = False           # continue out-dir/checkpoint.pt (same run configuration)
    connect_timeout: float = 300.0  # seconds to wait for num-clients SuperNodes
    round_timeout: float = 600.0   # seconds to wait for the replies of one round

    @classmethod
    def from_run_config(cls, run_config) -> "AppConfig":
        """Typed and range-checked; unknown keys are ignored, a missing key keeps its default."""
        values = {}
        for f in fields(cls):
            key, default = f.name.replace("_", "-"), f.default
            v = run_config.get(key, default)
            if isinstance(default, bool):
                ok = isinstance(v, bool)
            elif isinstance(default, int):
                ok = isinstance(v, int) and not isinstance(v, bool)
            elif isinstance(default, float):
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                v = float(v) if ok else v
            else:
                ok = isinstance(v, str)
            if not ok:
                raise ConfigError(f"run config {key} = {v!r}: expected a {type(default).__name__}")
            values[f.name] = v
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        positive = ("num_clients", "rounds", "local_steps", "batch_size", "rank", "synthetic_per_class", "train",
                    "val", "test", "local_train_steps", "finetune_steps", "fisher_samples", "lr", "lora_alpha",
                    "alpha", "connect_timeout", "round_timeout")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"run config {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        problems = [
            (not 0 <= self.clients_per_round <= self.num_clients, f"clients-per-round must be in [0, num-clients="
             f"{self.num_clients}], got {self.clients_per_round}"),
            (self.preset not in ("tiny", "paper"), f"preset must be 'tiny' or 'paper', got {self.preset!r}"),
            (self.estimator != "default" and self.estimator not in ESTIMATORS,
             f"estimator must be 'default' or one of {sorted(ESTIMATORS)}, got {self.estimator!r}"),
            (self.data not in ("synthetic", "cifar"), f"data must be 'synthetic' or 'cifar', got {self.data!r}"),
            (self.partition not in ("dirichlet", "superclass"), f"partition must be 'dirichlet' or 'superclass', "
             f"got {self.partition!r}"),
            (min(self.public, self.seed) < 0, "public and seed must be >= 0"),
            (not 0 <= self.drop_prob < 1, f"drop-prob must be in [0, 1), got {self.drop_prob}"),
            (self.max_update_norm < 0, f"max-update-norm must be >= 0 (0: no bound), got {self.max_update_norm}"),
            (self.fisher_samples > self.val, f"fisher-samples {self.fisher_samples} exceeds val {self.val}"),
            (not (0 < self.grid_step <= 1 and abs(1 / self.grid_step - round(1 / self.grid_step)) < 1e-6),
             f"grid-step must be 1/n for an integer n, got {self.grid_step}"),
            (not self.out_dir, "out-dir must not be empty"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(f"run config {message}")

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    @property
    def update_norm_bound(self) -> float | None:
        return self.max_update_norm or None


def experiment_config(cfg: AppConfig) -> ExperimentConfig:
    """The in-process pipeline's settings for the same run (what the client-side stages read; results.json)."""
    estimator = DEFAULT_ESTIMATOR if cfg.estimator == "default" else cfg.estimator
    return ExperimentConfig(rounds=cfg.rounds, local_steps=cfg.local_steps, clients_per_round=cfg.clients_per_round,
                            lr=cfg.lr, batch_size=cfg.batch_size, local_train_steps=cfg.local_train_steps,
                            finetune_steps=cfg.finetune_steps, fisher_samples=cfg.fisher_samples, estimator=estimator,
                            grid_step=cfg.grid_step, fedsa=False, seed=cfg.seed, drop_prob=cfg.drop_prob,
                            max_update_norm=cfg.update_norm_bound)


def to_record(state: dict[str, torch.Tensor]):
    """Adapter tensors -> a Flower ArrayRecord of float32 arrays, in key order (Flower stores each with
    np.save(allow_pickle=False)). A non-floating tensor is refused rather than silently cast."""
    from flwr.app import ArrayRecord  # flwr only where the app needs it: importing this module stays cheap

    for k, v in state.items():
        if not v.is_floating_point():
            raise ValueError(f"adapter tensor {k} is {v.dtype}: only floating tensors are federated")
    return ArrayRecord(OrderedDict((k, v.detach().to("cpu", torch.float32).contiguous()) for k, v in state.items()))


def from_record(record) -> dict[str, torch.Tensor]:
    """A received ArrayRecord -> CPU tensors (own memory), read with np.load(allow_pickle=False) by
    Flower: no code runs. The caller checks keys, shapes, dtypes and finite values against the
    adapter it expects (lora.check_state / fed.validate_update): the sender is not trusted."""
    state = {}
    for k in record.keys():
        a = record[k].numpy()
        if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu":
            raise ValueError(f"array {k!r} is not a numeric array")
        state[k] = torch.from_numpy(np.array(a, copy=True))
    return state


def flatten(tree: dict, prefix: str = "") -> dict:
    """A nested dict of numbers, strings and lists of them -> one level with "a/b" keys (a ConfigRecord's shape;
    "/" because adapter module names hold dots). None is left out; a mixed int/float list is sent as floats."""
    flat = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            flat.update(flatten(v, key + "/"))
        elif isinstance(v, (list, tuple)):
            v = list(v)
            kinds = {type(x) for x in v}
            flat[key] = [float(x) for x in v] if kinds in ({int, float}, {float, int}) else v
        elif v is not None:
            flat[key] = v
    return flat


def unflatten(flat) -> dict:
    """flatten's inverse (lists come back as lists)."""
    tree: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = list(v) if isinstance(v, (list, tuple)) else v
    return tree


def record_bytes(record) -> int:
    """What an ArrayRecord weighs on the wire: each array's serialized bytes (npy header included) and its key."""
    return int(record.count_bytes())


TIMINGS = ("flower-start", "imports", "handover", "load", "train")  # a client's round, measured by itself


def client_split(cfg: AppConfig, data_dir: str, k: int, num_partitions: int) -> ClientSplits:
    """Client k's data, drawn exactly as run_cifar.py draws it for --clients num_partitions."""
    data, _ = load_images(cfg.data, data_dir, cfg.synthetic_per_class)
    _, pool = public_and_pool(len(data.labels), cfg.public)
    per_client = cfg.train + cfg.val + cfg.test
    parts = label_partition(cfg.partition, data.labels[pool], data.coarse_labels[pool], num_partitions, cfg.alpha,
                            per_client, cfg.seed)
    return client_splits(data.images, data.labels, pool, parts, (cfg.train, cfg.val, cfg.test), cfg.seed)[k]
