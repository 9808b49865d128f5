"""Every default of the project in one place: the experiment's settings, the presets of the two demos, the
Flower app's run configuration, the seed salts and the rules that bound them.

    cfg = ExperimentConfig(rounds=20, local_steps=5)   # the pipeline's settings (results.json "experiment")
    p = VIT_PRESETS["tiny"]                            # run_cifar.py --preset tiny: model and training
    p = LM_PRESETS["tiny"]                             # run_llm.py --model tiny
    app = AppConfig.from_run_config(run_config)        # the Flower app; pyproject's [tool.flwr.app.config]
                                                       # is AppConfig's defaults (a test holds them equal)

Precedence, for a command line: an option given > the script's preset > ExperimentConfig's default.
"No bound" for max_update_norm is None inside the code; on a command line and in the Flower table (TOML has
no None) it is 0 (update_bound maps both).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

# potara.potara.ESTIMATORS and DEFAULT_ESTIMATOR, written here so that this module (and so every --help) imports
# no torch; tests/test_config.py holds them equal to potara's.
ESTIMATORS = ("verified", "paper")
DEFAULT_ESTIMATOR = "verified"
MAX_GRID_POINTS = 1000  # the lam grid 0, step, ..., 1 has at most this many steps (grid-step >= 0.001)

# Size bounds: what the program can hold, checked before any work (cli.check_sizes, AppConfig.check, the readers).
MAX_SYNTHETIC_PER_CLASS = 3000  # synthetic train images per class: the train file holds 100 n images of 3072
#                                    bytes + ~60 bytes of labels and names each, 0.94 GB at 3000: under
# data.MAX_FILE_BYTES
#                                    (1 GiB, which data.py reads no more than; tests/test_sizes.py checks it)
MAX_SYNTHETIC_EXAMPLES = 1_000  # per synthetic text task: distinct prompts, and the smallest task (pronoun) has 1,152
MAX_LEN_TOKENS = 32_768  # --max-len: tokens per example (the tiny model's positions grow with it)
MAX_NEW_TOKENS = 4096  # --max-new-tokens: greedy decoding steps per free-form answer
MAX_RESULTS_FILE_BYTES = 64 << 20  # a results.json a tool reads back (the bench's pipeline section, the Flower bench)
MAX_TASK_FILE_BYTES = 256 << 20  # one <task>.jsonl file (read_jsonl reads no more)
MAX_LINE_BYTES = 1 << 20  # one JSONL line: parsing costs ~10x its bytes in memory (a 50 MB line cost 480 MB)
MAX_TASK_NAME_BYTES = 200  # a task name in UTF-8: a folder name of --export-peft, plus ".<name>.partial-<pid>"
SIZE_BOUNDS = {  # option (its dest) -> (largest value, why)
    "synthetic_per_class": (
        MAX_SYNTHETIC_PER_CLASS,
        "the synthetic train file must stay under the 1 GiB the CIFAR reader accepts",
    ),
    "synthetic_examples": (MAX_SYNTHETIC_EXAMPLES, "the smallest synthetic task has 1,152 distinct prompts"),
    "max_len": (MAX_LEN_TOKENS, "tokens per example"),
    "max_new_tokens": (MAX_NEW_TOKENS, "greedy decoding steps"),
}


@dataclass(frozen=True)
class Bound:
    """The allowed range of one numeric option: lo <= v <= hi (lo < v with lo_open, v < hi with hi_open); `why`, when
    a bound is not self-evident, follows the range in every message."""

    lo: float
    hi: float
    lo_open: bool = False
    hi_open: bool = False
    why: str = ""

    def text(self) -> str:
        show = lambda x: f"{x:,}" if isinstance(x, int) else f"{x:g}"
        interval = f"{'(' if self.lo_open else '['}{show(self.lo)}, {show(self.hi)}{')' if self.hi_open else ']'}"
        return f"{interval} ({self.why})" if self.why else interval


_STEPS, _COUNT, _EXAMPLES = Bound(1, 10_000_000), Bound(1, 100_000), Bound(1, 10_000_000)
# Every number any entry point takes -- run_cifar.py's and run_llm.py's options (by dest), the Flower run config's
# keys and the node config's (with - for _) -- has its range here, the same for the same name everywhere; checked
# before any work (bound_problem: cli.check_bounds, AppConfig.check, client_app.node_value), and a test holds
# every numeric option of the parsers and of AppConfig to have an entry. The upper bounds are generous for real
# use and only keep a typo (10**30) from reaching the code: 10**7 steps, 10**7 examples per client and split,
# 10**5 clients or rounds, rank 4096, batches of 65,536, a learning rate of 10, 30 days of timeout, 2**63 - 1 for
# a seed (torch.manual_seed's 64-bit seeds); the size options take config's MAX_* above (what the program can hold),
# threads the machine's cores (more only oversubscribe them). One range per name: every message about a number
# states this range (bound_problem), the parser's and the later checks' alike. A lower bound of 0 means 0 is allowed
# (e.g. pretrain-steps 0 = none for a Hugging Face model); cross-option rules (clients-per-round <= clients,
# fisher-samples <= the split) stay the entry point's.
BOUNDS: dict[str, Bound] = {
    "rounds": _COUNT,
    "local_steps": _STEPS,
    "local_train_steps": _STEPS,
    "finetune_steps": _STEPS,
    "pretrain_steps": Bound(0, 10_000_000),
    "clients": _COUNT,
    "num_clients": _COUNT,
    "clients_per_round": Bound(0, 100_000),
    "num_partitions": _COUNT,
    "partition_id": Bound(0, 99_999),
    "train": _EXAMPLES,
    "val": _EXAMPLES,
    "test": _EXAMPLES,
    "public": Bound(0, 10_000_000),
    "fisher_samples": _EXAMPLES,
    "fisher_chunk": Bound(1, 1_000_000),
    "batch_size": Bound(1, 65_536),
    "eval_batch_size": Bound(1, 65_536),
    "rank": Bound(1, 4096),
    "snapshots": Bound(0, 100_000),
    "threads": Bound(1, os.cpu_count() or 1, why="the CPU cores of this machine"),
    "seed": Bound(0, 2**63 - 1),
    "synthetic_per_class": Bound(5, MAX_SYNTHETIC_PER_CLASS),  # the synthetic test set holds a fifth of it
    "synthetic_examples": Bound(1, MAX_SYNTHETIC_EXAMPLES),
    "max_len": Bound(1, MAX_LEN_TOKENS),
    "max_new_tokens": Bound(1, MAX_NEW_TOKENS),
    "lr": Bound(0, 10.0, lo_open=True),
    "lora_alpha": Bound(0, 1e6, lo_open=True),
    "alpha": Bound(0, 1e6, lo_open=True),
    "eps": Bound(0, 1e3, lo_open=True),
    "grid_step": Bound(0, 1.0, lo_open=True),
    "drop_prob": Bound(0, 1.0, hi_open=True),
    "max_update_norm": Bound(0, 1e12),
    "connect_timeout": Bound(0, 2_592_000.0, lo_open=True),
    "round_timeout": Bound(0, 2_592_000.0, lo_open=True),
    "personalize_timeout": Bound(0, 2_592_000.0),
    # the tools' own numbers (potara_studies, potara_flower's bench and fleet)
    "reps": Bound(1, 10_000),
    "conflict_classes": Bound(2, 100),  # the ablation's 'conflict' scenario: classes of CIFAR-100's 100
    "per_task": _EXAMPLES,  # export_flan: examples per task
    "superexec_poll": Bound(0.01, 60.0),  # flwr's FLWR_SUPEREXEC_TASK_POLL_INTERVAL, seconds
    "nodes": Bound(2, 64),  # SuperNodes of one loopback federation on one machine
    "restart_nodes": Bound(2, 64),
}


def bound_problem(name: str, value) -> str | None:
    """Why `value` is outside BOUNDS[name] (None if inside, or None: an unset option), as "must be in [lo, hi],
    got v" -- nan and inf included (a comparison with nan is False both ways, so finiteness is asked first)."""
    if value is None:
        return None
    b = BOUNDS[name]
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (b.lo < value if b.lo_open else b.lo <= value) and (value < b.hi if b.hi_open else value <= b.hi)
    if ok:
        return None
    shown = (
        value
        if not isinstance(value, int) or abs(value) < 10**20
        else f"{str(value)[:12]}... ({len(str(value))} digits)"
    )
    what = "an integer" if isinstance(b.lo, int) and isinstance(b.hi, int) else "a number"
    return f"must be {what} in {b.text()}, got {shown}"


@dataclass
class ExperimentConfig:
    rounds: int = 20  # FedIT rounds R
    local_steps: int = 10  # optimizer steps per client per round
    clients_per_round: int = 0  # 0 = every client every round
    lr: float = 1e-3  # AdamW, for FedIT, FedSA, local training and fine-tuning alike
    weight_decay: float = 0.0
    batch_size: int = 32
    local_train_steps: int = 200  # the local-only adapter phi_L, from phi_0
    finetune_steps: int = 50  # "FedIT then local fine-tuning", from phi_G
    fisher_samples: int = 100  # client samples for Potara's statistics (at most the split's size)
    fisher_labels: str = "empirical"  # "empirical" (true labels) or "sampled" (true Fisher)
    fisher_split: str = "val"  # the split the statistics use: "val" (held out: what the default needs)
    # or "train" (the paper's ~32 training samples, for "paper")
    fisher_chunk: int | None = None  # vmap chunk of per-sample gradients (lower GPU memory for large models)
    eps: float = 1e-3  # potara's relative Fisher floor ("paper")
    granularity: str = "client"  # one lam per client, or "module": one per adapted module
    estimator: str = DEFAULT_ESTIMATOR  # one of potara.ESTIMATORS
    grid_step: float = 0.05  # lam grid 0, step, ..., 1
    grid_space: str = "ab"  # merge space of the uniform merge and of the grid
    snapshots: int = 4  # evenly spaced FedIT round counts for the communication curve
    fedsa: bool = True  # run the FedSA-LoRA baseline (a second federated run)
    seed: int = 0
    drop_prob: float = 0.0  # chance that a selected client never returns its update (simulated)
    max_update_norm: float | None = None  # reject updates with ||phi_k - phi^t||_2 above it (None: no bound)

    def fed_config(self):
        """The settings of a federated run (fed.FedConfig: fed.run_fedit, fed.local_update) these describe."""
        from fed import FedConfig  # here, not at the top: this module imports no torch

        return FedConfig(
            rounds=self.rounds,
            local_steps=self.local_steps,
            lr=self.lr,
            batch_size=self.batch_size,
            weight_decay=self.weight_decay,
            clients_per_round=self.clients_per_round,
            seed=self.seed,
            drop_prob=self.drop_prob,
            max_update_norm=self.max_update_norm,
        )


# Seeds: every random draw of a run is fed.derive_seed(seed, <where>, salt): the salt names the stream.
SALT_LOCAL = 101  # client i's local-only adapter phi_L: derive_seed(seed, i, SALT_LOCAL)
SALT_FINETUNE = 202  # client i's "FedIT + local fine-tuning" adapter
SALT_STATS = 303  # which held-out samples Potara's statistics (and Fisher merging) read
SALT_LABELS = 404  # labels sampled for the true Fisher ("paper" with fisher_labels="sampled")

# ----------------------------------------------------------------------------- the demos' presets
CIFAR_MEAN, CIFAR_STD = (0.507, 0.487, 0.441), (0.267, 0.256, 0.276)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TINY_VIT = dict(image_size=32, patch_size=8, num_layers=4, num_heads=4, hidden_dim=96, mlp_dim=192)
VIT_PRESETS = {  # every default of run_cifar.py, per --preset (None: not used by that preset)
    "tiny": dict(
        vit=TINY_VIT,
        mean=CIFAR_MEAN,
        std=CIFAR_STD,
        public=30000,
        pretrain_steps=1000,
        pretrain_lr=2e-3,
        pretrain_batch=128,
        clients=5,
        alpha=0.5,
        train=400,
        val=100,
        test=200,
        rounds=100,
        local_steps=5,
        local_train_steps=100,
        finetune_steps=25,
        lr=3e-3,
        batch_size=32,
        rank=8,
        lora_alpha=16,
    ),
    "paper": dict(
        vit=None,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        public=0,
        pretrain_steps=None,
        pretrain_lr=None,
        pretrain_batch=None,
        clients=10,
        alpha=0.5,
        train=1000,
        val=100,
        test=500,
        rounds=400,
        local_steps=5,
        local_train_steps=300,
        finetune_steps=100,
        lr=1e-3,
        batch_size=32,
        rank=8,
        lora_alpha=16,
    ),
}
TINY_LLAMA = dict(
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    rms_norm_eps=1e-5,
    tie_word_embeddings=True,
)
SYNTHETIC_TASKS_SEED = 1234  # run_llm.py --data synthetic's tasks: llm_tasks.synthetic_tasks(n, seed=this)
LM_PRESETS = {  # every default of run_llm.py that depends on the model: "tiny" or "hf" (any Hugging Face model)
    "tiny": dict(
        train=200,
        val=50,
        test=100,
        max_len=96,
        max_new_tokens=16,
        rounds=20,
        local_steps=5,
        local_train_steps=100,
        finetune_steps=25,
        lr=3e-3,
        batch_size=32,
        rank=8,
        lora_alpha=16,
        pretrain_steps=2500,
        pretrain_lr=3e-3,
        pretrain_batch=32,
    ),
    "hf": dict(
        train=1000,
        val=100,
        test=500,
        max_len=512,
        max_new_tokens=32,
        rounds=50,
        local_steps=5,
        local_train_steps=300,
        finetune_steps=100,
        lr=2e-4,
        batch_size=8,
        rank=8,
        lora_alpha=16,
        pretrain_steps=0,
        pretrain_lr=0.0,
        pretrain_batch=0,
    ),
}


# ----------------------------------------------------------------------------- rules every entry point shares
def grid_step_problem(step: float) -> str | None:
    """Why `step` cannot be the lam grid's step (None if it can): 1/step must be an integer n in
    [1, MAX_GRID_POINTS]."""
    if not (isinstance(step, (int, float)) and math.isfinite(step) and 0 < step <= 1):
        return f"must be 1/n for an integer n >= 1 (e.g. 0.05), got {step}"
    n = 1 / step
    if abs(n - round(n)) >= 1e-6:
        return f"must be 1/n for an integer n >= 1 (e.g. 0.05), got {step}"
    if round(n) > MAX_GRID_POINTS:
        return f"must be >= {1 / MAX_GRID_POINTS:g} (at most {MAX_GRID_POINTS} grid steps), got {step}"
    return None


def size_problem(name: str, value: int | None) -> str | None:
    """Why `value` is too large for the size-like option `name` (a key of SIZE_BOUNDS; None if it fits or is unset)."""
    bound, why = SIZE_BOUNDS[name]
    if value is None or value <= bound:
        return None
    return f"must be <= {bound:,} ({why}), got {value:,}"


def update_bound(value: float | None) -> float | None:
    """max_update_norm as fed.run_fedit takes it: None for "no bound", written None or 0 outside the code."""
    return None if value is None or value == 0 else float(value)


# ----------------------------------------------------------------------------- the Flower app
class ConfigError(ValueError):
    """A run or node configuration value that is missing, of the wrong type, or out of range (one line)."""


_TINY, _TINY_LM = VIT_PRESETS["tiny"], LM_PRESETS["tiny"]


@dataclass
class AppConfig:
    """The Flower app's run configuration; every field is a key of [tool.flwr.app.config] with - for _.
    The tiny preset's settings, over 2 SuperNodes and 20 rounds. experiment="language" runs run_llm.py's
    experiment with the same training keys (rounds ... fisher-samples: set them to run_llm.py's, e.g. train=200
    val=50 test=100 for its tiny defaults) and the language keys at the end; preset ... public are vision's."""

    num_clients: int = 2  # SuperNodes (= partitions) the server waits for
    rounds: int = 20  # FedIT rounds R
    local_steps: int = _TINY["local_steps"]
    clients_per_round: int = 0  # 0 = every client every round
    lr: float = _TINY["lr"]
    batch_size: int = _TINY["batch_size"]
    rank: int = _TINY["rank"]  # LoRA rank r on the attention q and v
    lora_alpha: float = float(_TINY["lora_alpha"])
    seed: int = 0
    preset: str = "tiny"  # VIT_PRESETS: the image normalisation (and architecture of a plain state_dict)
    data: str = "synthetic"  # "synthetic" (written offline) or "cifar" (CIFAR-100 under the node's data-dir)
    synthetic_per_class: int = 500
    partition: str = "dirichlet"  # "dirichlet" (label skew) or "superclass"
    alpha: float = _TINY["alpha"]  # Dirichlet concentration
    public: int = _TINY["public"]  # images no client holds (the tiny backbone's pre-training set)
    train: int = _TINY["train"]  # images per client and split
    val: int = _TINY["val"]
    test: int = _TINY["test"]
    local_train_steps: int = _TINY["local_train_steps"]  # the local adapter phi_L, from phi_0
    finetune_steps: int = _TINY["finetune_steps"]  # the "FedIT + local fine-tuning" baseline, from phi_G
    estimator: str = "default"  # one of potara.ESTIMATORS, or "default": potara.DEFAULT_ESTIMATOR
    fisher_samples: int = ExperimentConfig.fisher_samples  # validation samples for Potara's statistics
    grid_step: float = ExperimentConfig.grid_step  # the lam grid of the grid-search baseline
    drop_prob: float = 0.0  # simulated drop-outs (seeded as fed.sample_clients)
    max_update_norm: float = 0.0  # reject ||phi_k - phi^t|| above it; 0 = no bound
    out_dir: str = "runs/flower"  # on the server: results.json, results.md, checkpoint.pt
    resume: bool = False  # continue out-dir/checkpoint.pt (same run configuration)
    connect_timeout: float = 300.0  # seconds to wait for num-clients SuperNodes
    round_timeout: float = 600.0  # seconds to wait for the replies of one round
    personalize_timeout: float = 0.0  # seconds to wait for the final Potara step; 0 = final_timeout's estimate
    experiment: str = "vision"  # "vision" (run_cifar.py's: images, a ViT) or "language" (run_llm.py's: one
    # instruction task per client, a causal LM): the keys below are its alone
    max_len: int = _TINY_LM["max_len"]  # tokens per example (run_llm.py --max-len)
    max_new_tokens: int = _TINY_LM["max_new_tokens"]  # greedy decoding budget of free-form answers
    eval_batch_size: int = 64  # sequences per forward pass when scoring options (run_llm.py's default)
    synthetic_examples: int = 600  # examples of each synthetic task (a node's task='synthetic:<name>')
    targets: str = "q_proj v_proj"  # the modules LoRA wraps, space-separated (run_llm.py --targets)

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
                ok = isinstance(v, (int, float)) and not isinstance(v, bool)  # nan, inf: check()'s bounds
                v = float(v) if ok and (isinstance(v, float) or abs(v) < 2**1023) else v
            else:
                ok = isinstance(v, str)
            if not ok:
                kind = type(default).__name__
                within = f" in {BOUNDS[f.name].text()}" if f.name in BOUNDS else ""
                raise ConfigError(f"run config {key} = {str(v)[:40]!r}: expected a {kind}{within}")
            values[f.name] = v
        cfg = cls(**values)
        cfg.check()
        return cfg

    def check(self) -> None:
        for f in fields(self):  # every number in its range first (BOUNDS: the same as the command lines')
            problem = bound_problem(f.name, getattr(self, f.name)) if f.name in BOUNDS else None
            if problem:
                raise ConfigError(f"run config {f.name.replace('_', '-')} {problem}")
        positive = (
            "num_clients",
            "rounds",
            "local_steps",
            "batch_size",
            "rank",
            "synthetic_per_class",
            "train",
            "val",
            "test",
            "local_train_steps",
            "finetune_steps",
            "fisher_samples",
            "lr",
            "lora_alpha",
            "alpha",
            "connect_timeout",
            "round_timeout",
            "max_len",
            "max_new_tokens",
            "eval_batch_size",
            "synthetic_examples",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"run config {name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        grid = grid_step_problem(self.grid_step)
        problems = [
            (
                not 0 <= self.clients_per_round <= self.num_clients,
                f"clients-per-round must be in [0, num-clients={self.num_clients}], got {self.clients_per_round}",
            ),
            (self.preset not in VIT_PRESETS, f"preset must be one of {sorted(VIT_PRESETS)}, got {self.preset!r}"),
            (
                self.estimator != "default" and self.estimator not in ESTIMATORS,
                f"estimator must be 'default' or one of {sorted(ESTIMATORS)}, got {self.estimator!r}",
            ),
            (self.data not in ("synthetic", "cifar"), f"data must be 'synthetic' or 'cifar', got {self.data!r}"),
            (
                self.partition not in ("dirichlet", "superclass"),
                f"partition must be 'dirichlet' or 'superclass', got {self.partition!r}",
            ),
            (min(self.public, self.seed) < 0, "public and seed must be >= 0"),
            (not 0 <= self.drop_prob < 1, f"drop-prob must be in [0, 1), got {self.drop_prob}"),
            (self.max_update_norm < 0, f"max-update-norm must be >= 0 (0: no bound), got {self.max_update_norm}"),
            (
                self.personalize_timeout < 0,
                f"personalize-timeout must be >= 0 (0: sized from the final step's "
                f"work), got {self.personalize_timeout}",
            ),
            (self.fisher_samples > self.val, f"fisher-samples {self.fisher_samples} exceeds val {self.val}"),
            (grid is not None, f"grid-step {grid}"),
            (
                size_problem("synthetic_per_class", self.synthetic_per_class) is not None,
                f"synthetic-per-class {size_problem('synthetic_per_class', self.synthetic_per_class)}",
            ),
            (not self.out_dir, "out-dir must not be empty"),
            (
                self.experiment not in ("vision", "language"),
                f"experiment must be 'vision' or 'language', got {self.experiment!r}",
            ),
            (
                not self.target_modules or set(self.target_modules) & {"self_attn", "attention"},
                f"targets must name nn.Linear projections, space-separated (e.g. 'q_proj v_proj'), "
                f"got {self.targets!r}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(f"run config {message}")

    @property
    def final_timeout(self) -> float:
        """The final step's timeout: personalize-timeout, or 0 for round-timeout x (the step's work / a round's),
        work counted in training steps of batch-size examples. A round is local-steps of them; the final step is
        local-train-steps + finetune-steps, the statistics (per-sample gradients of fisher-samples examples for
        both adapters and the held-out loss: ~3 passes of them) and the scoring (forward passes, ~1/3 of a step
        per batch: every grid point on val twice, accuracy and loss, and on test, every method on test). A
        round's fixed costs (process start, imports, loading) are in both, so if round-timeout covers a round
        the scaled one covers the final step."""
        if self.personalize_timeout > 0:
            return self.personalize_timeout
        points = round(1 / self.grid_step) + 1
        scored = points * (2 * self.val + self.test) + 9 * self.test
        work = (
            self.local_train_steps
            + self.finetune_steps
            + math.ceil(3 * self.fisher_samples / self.batch_size)
            + math.ceil(scored / (3 * self.batch_size))
        )
        return self.round_timeout * max(1.0, work / self.local_steps)

    @property
    def target_modules(self) -> list[str]:
        """targets as run_llm.py --targets takes them (a device exports its adapter in peft's format: nn.Linear)."""
        return self.targets.split()

    @property
    def per_round(self) -> int:
        return self.clients_per_round or self.num_clients

    def pipeline_config(self) -> ExperimentConfig:
        """The in-process pipeline's settings for the same run (what the client-side stages read; results.json)."""
        return ExperimentConfig(
            rounds=self.rounds,
            local_steps=self.local_steps,
            clients_per_round=self.clients_per_round,
            lr=self.lr,
            batch_size=self.batch_size,
            local_train_steps=self.local_train_steps,
            finetune_steps=self.finetune_steps,
            fisher_samples=self.fisher_samples,
            estimator=DEFAULT_ESTIMATOR if self.estimator == "default" else self.estimator,
            grid_step=self.grid_step,
            fedsa=False,
            seed=self.seed,
            drop_prob=self.drop_prob,
            max_update_norm=update_bound(self.max_update_norm),
        )


# ----------------------------------------------------------------------------- the estimator study
# potara_studies/ablation.py's scenarios, statistics sources and estimators, and the real-data suite's settings
# (potara_studies/digits.py): here, so that the study's --help and argument checks import no torch.
ABLATION_SCENARIOS = {  # synthetic suite: name -> how clients get their data ("train": a smaller training split)
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1},
    "dirichlet-1.0": {"partition": "dirichlet", "alpha": 1.0},
    "dirichlet-10": {"partition": "dirichlet", "alpha": 10.0},
    "fewshot": {"partition": "dirichlet", "alpha": 10.0, "train": 50},
    "superclass": {"partition": "superclass"},
    "conflict": {"partition": "conflict", "classes": 20},
}
ABLATION_SOURCES = {  # name -> (client split, samples (None: the whole split), Fisher labels: the data's or sampled)
    "train32": ("train", 32, "empirical"),
    "val32": ("val", 32, "empirical"),
    "val": ("val", None, "empirical"),
    "train32-sampled": ("train", 32, "sampled"),
    "val-sampled": ("val", None, "sampled"),
}
ABLATION_ESTIMATORS = ("verified", "hermite", "quadratic", "verified-loss", "paper", "bias")
DIGITS_SCENARIOS = {
    "conflict": {"partition": "uniform", "tasks": True},  # real suite (digits.py)
    "dirichlet-0.5": {"partition": "dirichlet", "alpha": 0.5, "tasks": False},
}
ABLATION_OUTPUTS = ("ablation.json", "ablation.md")  # in the study's --out, with its ABLATION_CACHE folder
ABLATION_CACHE = "cache"  # in --out: each scenario x seed's trained adapters (<scenario>-s<seed>-<key>.pt)
ABLATION_SUITES = {
    "synthetic": {
        "scenarios": ABLATION_SCENARIOS,
        "default": "dirichlet-0.1,dirichlet-1.0,fewshot,superclass,conflict",
        "seeds": "0,1,2",
        "title": "SYNTHETIC DATA (not CIFAR-100)",
    },
    "real": {
        "scenarios": DIGITS_SCENARIOS,
        "default": ",".join(DIGITS_SCENARIOS),
        "seeds": "0,1,2,3,4,5,6,7,8,9",
        "title": "REAL DATA: handwritten digits (scikit-learn's bundled UCI set), MLP backbone",
    },
}


@dataclass
class DigitsConfig:
    """Sizes and training of the real-data study (digits.py); the defaults are what docs/estimator-study.md's
    table used."""

    clients: int = 6
    train: int = 60  # per client: FedIT / local training samples
    val: int = 50  # held out: the weight's statistics and the grid search's choice
    test: int = 50  # what every method is scored on
    public: int = 500  # backbone pre-training images, no client holds them
    hidden: int = 64
    pretrain_steps: int = 300
    rank: int = 4
    lora_alpha: float = 8.0
    rounds: int = 30  # FedIT
    local_steps: int = 10  # per client per round
    local_train_steps: int = 150
    lr: float = 1e-2
    batch_size: int = 16
