"""The Flower ClientApp of Potara: one client on its own device (a SuperNode), run by Flower once per
message. Declared in pyproject.toml ([tool.flwr.app.components]); started by a SuperNode such as

    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \
        --node-config "partition-id=0 num-partitions=2 backbone='data/backbones/tiny-3ed7fae472e8.pt' data-dir='data'"

Node config (per device): partition-id k and num-partitions K (which client this device is),
backbone (a local backbone file: vit.py's potara-backbone-v1 format, e.g. the tiny preset's cache file
that run_cifar.py wrote; loaded, never re-trained), data-dir (where cifar-100-python/ or synthetic/ live,
default "data"), cache-dir (optional: client k's split is kept there between messages, task.client_split),
threads (torch CPU threads, default torch's own), device ("cpu", the default, or "cuda":
bfloat16 autocast as the pipelines on CUDA; bitwise equality with the in-process loop is a CPU
property), adapter-dir (optional: the client saves its personalised Potara adapter there, on the device).

With the run config's experiment="language" (run_llm.py's experiment, docs/flower.md), instead of backbone,
data-dir and cache-dir: task (the client's task: 'synthetic:<name>', one of run_llm.py --data synthetic's tasks,
or the path of a <task>.jsonl file) and model (a tiny model file as run_llm.py --model tiny caches it, e.g.
data/llm/tiny-llama-dff38b954720.pt, or a local Hugging Face folder; hashed at set-up, where the server checks that
every
device holds the same). Every message then builds run_llm.py's client (task.language_client): the task's
train / val / test split, the model with phi_0 on `targets`, lm_loss for training, the option scorer and
causal_lm_likelihood for the final step; adapter-dir receives the Potara adapter in peft's format
(adapter-dir/<task>/, and adapter-dir/base_model/ for the tiny model).

Every message rebuilds the same client: the CIFAR-100 (or synthetic) images, the partition of
data.py exactly as run_cifar.py draws it (public set, Dirichlet or superclass split, client k's
train / val / test), and the model vit.build_model(backbone, preset, rank, lora_alpha, seed), whose
initial adapter phi_0 every client and the in-process pipeline share. Handlers (task.py has
the protocol):

    query     -> partition-id, num-partitions, n_k, the backbone file's sha256, phi_0
    train     -> fed.local_update from phi^t: the same seeds (seed, t, k) as fed.run_fedit, so the
                 update is bitwise the one the in-process loop computes
    evaluate  -> after the last round, with phi_G = phi^R: pipeline.train_checked (the local adapter phi_L
                 from phi_0, and phi_G fine-tuned) and evaluation.evaluate_client: Potara's weight lam
                 from the client's own validation split (potara.personalize, the default estimator),
                 the merge phi(lam) = lam phi_G + (1 - lam) phi_L and every baseline scored on its
                 test split. Numbers go back (evaluate_client's record); the adapters stay here.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass

IMPORTS_STARTED = time.time()  # with IMPORTS_DONE: where a message's start-up goes (train's timings)

import torch
import torch.nn as nn
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from data import ClientSplits
from fed import Client, FedConfig, local_update
from lora import lora_meta, lora_state_dict
from potara_flower.task import (
    ADAPTER,
    CONFIG,
    METRICS,
    SETUP_SHA256,
    LanguageClient,
    client_split,
    file_sha256,
    flatten,
    from_record,
    language_client,
    model_sha256,
    to_record,
)
from potara_guards.safe_files import write_target_problem
from potara_guards.tensor_checks import check_tensors
from potara_harness.config import BOUNDS, VIT_PRESETS, AppConfig, ConfigError, bound_problem
from potara_harness.peft_export import ADAPTER_FILES, BASE_MODEL_FILES, EXPORT_RESERVED, export_target_problem
from potara_harness.run_folder import dir_problem

IMPORTS_DONE = time.time()
app = ClientApp()


@dataclass
class LocalClient:
    """What one client process holds; none of it leaves the device except phi_0 at setup."""

    index: int  # k, the partition id
    num_partitions: int  # K
    split: ClientSplits  # its train / val / test data
    model: nn.Module  # backbone + phi_0
    phi0: dict[str, torch.Tensor]  # on the CPU, like everything received
    backbone_sha256: str  # the backbone file's (language: the model file's or folder's), hashed every message
    autocast_dtype: torch.dtype | None  # bfloat16 autocast on CUDA, none on the CPU
    language: LanguageClient | None = None  # experiment="language": its loss, scorer and likelihood (task.py)

    def training(self) -> dict:
        """The training plug-in local_update and train_checked take: lm_loss for the language experiment."""
        return {"loss_fn": self.language.loss_fn} if self.language else {}

    def scoring(self) -> dict:
        """The evaluation.Evaluator plug-ins: the language experiment's Scorer and causal_lm_likelihood."""
        return {"evaluate": self.language.evaluate, "likelihood": self.language.likelihood} if self.language else {}


def node_value(node_config, key: str, kind: type, default=None):
    """One node-config value of the right type, or a one-line ConfigError."""
    value = node_config.get(key, default)
    if value is None:
        raise ConfigError(f'node config {key} is missing: start the SuperNode with --node-config "{key}=..."')
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        within = f" in {BOUNDS[key.replace('-', '_')].text()}" if key.replace("-", "_") in BOUNDS else ""
        raise ConfigError(f"node config {key} = {str(value)[:40]!r}: expected an integer{within}")
    problem = bound_problem(key.replace("-", "_"), value) if kind is int and key.replace("-", "_") in BOUNDS else None
    if problem:  # config.BOUNDS: the same range as the command lines' and the run config's
        raise ConfigError(f"node config {key} {problem}")
    if kind is str and not isinstance(value, str):
        raise ConfigError(f"node config {key} = {value!r}: expected a quoted string")
    return value


def load_client(context: Context) -> tuple[AppConfig, LocalClient]:
    """The run configuration and this device's client (node config: module docstring). The model (backbone or
    language model) is hashed in every message: check_same_model compares it with the set-up's (a Hugging Face
    folder of gigabytes costs seconds per message: the price of never training on another model)."""
    cfg = AppConfig.from_run_config(context.run_config)
    node = context.node_config
    k, K = node_value(node, "partition-id", int), node_value(node, "num-partitions", int)
    if not 0 <= k < K or K != cfg.num_clients:
        raise ConfigError(
            f"node config partition-id={k} num-partitions={K}: need 0 <= partition-id < "
            f"num-partitions = the run's num-clients ({cfg.num_clients})"
        )
    if node.get("threads") is not None:
        torch.set_num_threads(node_value(node, "threads", int))  # node_value: within config.BOUNDS' range
    device = node_value(node, "device", str, "cpu")
    if device not in ("cpu", "cuda") or (device == "cuda" and not torch.cuda.is_available()):
        raise ConfigError(f"node config device={device!r}: 'cpu', or 'cuda' on a device where CUDA is available")
    adapter_dir = node_value(node, "adapter-dir", str, "")
    problem = adapter_dir and dir_problem(adapter_dir)  # the folder itself, before the model is read
    if problem:
        raise ConfigError(f"node config adapter-dir={adapter_dir!r}: {problem}")
    if cfg.experiment == "language":
        split, model, sha, language = load_language(cfg, node)
    else:
        split, model, sha, language = load_vision(cfg, node, k, K)
    problem = adapter_dir and adapter_dir_problem(adapter_dir, split.name, language)  # and what it writes there
    if problem:
        raise ConfigError(f"node config adapter-dir={adapter_dir!r}: {problem}")
    model = model.to(device)
    phi0 = {name: v.detach().cpu() for name, v in lora_state_dict(model).items()}
    autocast = torch.bfloat16 if device == "cuda" else None  # as the pipelines on CUDA (cli.autocast_dtype)
    return cfg, LocalClient(k, K, split, model, phi0, sha, autocast, language)


def load_vision(cfg: AppConfig, node, k: int, K: int) -> tuple[ClientSplits, nn.Module, str, None]:
    """run_cifar.py's client k: its split (from the device's cache when cache-dir holds it) and the ViT from the
    node's backbone file (hashed every message) with phi_0."""
    from potara_harness.vit import build_model, load_backbone_file  # torchvision: the vision experiment's only

    path = node_value(node, "backbone", str)
    if not os.path.isfile(path):
        raise ConfigError(f"node config backbone={path!r}: no such file on this device")
    sha = file_sha256(path)  # a regular file of bounded size (safe_files.open_regular), never a FIFO
    p = VIT_PRESETS[cfg.preset]
    backbone = load_backbone_file(path, p["vit"])  # weights_only=True, checked: vit.BackboneError, one line
    model = build_model(backbone, p, cfg.rank, cfg.lora_alpha, cfg.seed)
    cache = node_value(node, "cache-dir", str, "") or None  # optional: the device's split cache (task.py)
    return client_split(cfg, node_value(node, "data-dir", str, "data"), k, K, cache), model, sha, None


def load_language(cfg: AppConfig, node) -> tuple[ClientSplits, nn.Module, str, LanguageClient]:
    """run_llm.py's client for the node's task and model (task.language_client); and the model's sha256."""
    model_path = node_value(node, "model", str)
    split, model, language = language_client(cfg, node_value(node, "task", str), model_path)
    return split, model, model_sha256(model_path), language


def adapter_dir_problem(adapter_dir: str, name: str, language: LanguageClient | None) -> str | None:
    """Why this client must not write its Potara adapter into adapter_dir (None if it may), asked at set-up and
    in every message, before any work: the folder exists as a writable one or can be made (as the scripts'
    --out), and what the client writes in it is absent or its own earlier output, never a link, a hard link or a
    special file: <name>-potara.pt (vision); the <task>/ export and, for the tiny model, base_model/ (language:
    an export replaces only the folders an export wrote, peft_export.export_target_problem)."""
    problem = dir_problem(adapter_dir)
    if problem:
        return problem
    if language is None:
        problem = write_target_problem(os.path.join(adapter_dir, f"{name}-potara.pt"))
        return problem and f"{name}-potara.pt in it {problem}"
    if name in EXPORT_RESERVED:
        return f"a task named {name!r} would share a folder with the {name} export: rename its .jsonl file"
    exports = {name: ADAPTER_FILES, **({"base_model": BASE_MODEL_FILES} if language.base_model is None else {})}
    for folder, files in exports.items():
        problem = export_target_problem(os.path.join(adapter_dir, folder), files)
        if problem:
            return f"{folder} in it {problem}: move it away (an export replaces only the folders it wrote)"
    return None


def check_same_model(config, c: LocalClient, context: Context) -> None:
    """Refuse to train or score on a model other than the one set-up agreed on: the server sends the set-up's
    hash (SETUP_SHA256) with every round and the final step, and this device's file, hashed again for this
    message, must still be it. A changed file (the preparation rerun in the same folder with other settings)
    fails this client with a one-line reason; the others go on."""
    expected = config.get(SETUP_SHA256) if hasattr(config, "get") else None
    if expected is not None and expected != c.backbone_sha256:
        key = "model" if c.language else "backbone"
        raise ConfigError(
            f"node config {key}={context.node_config.get(key)!r} changed since set-up (sha256 {str(expected)[:12]}"
            f" then, {c.backbone_sha256[:12]} now): this client refuses to train on another model; restore the "
            "file or restart the run"
        )


def received_adapter(msg: Message, phi0: dict) -> dict[str, torch.Tensor]:
    """The server's adapter, checked against this client's phi_0 (keys, shapes, dtypes, finite values)."""
    state = from_record(msg.content[ADAPTER])
    check_tensors(state, phi0, what="adapter from the server")
    return state


def process_age() -> float | None:
    """Seconds since this process started (Linux /proc; None elsewhere). Flower starts a fresh process per
    message: this is everything before a handler runs."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            return float(f.read().split()[0]) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


# the model code of each experiment, imported by the handler that needs it, not at the top (a language device
# imports no torchvision): vision builds torchvision's ViT, language transformers' Llama (the tiny model)
EXPERIMENT_MODULES = {
    "vision": ("potara_harness.vit",),
    "language": ("potara_harness.lm", "transformers.models.llama.modeling_llama"),
}


def import_experiment(context: Context) -> float:
    """Imports the run's experiment's model code (EXPERIMENT_MODULES); the seconds it took, counted with the
    imports in a message's timings rather than with data loading."""
    t0 = time.perf_counter()
    for name in EXPERIMENT_MODULES.get(str(context.run_config.get("experiment", "vision")), ()):
        importlib.import_module(name)
    return time.perf_counter() - t0


def startup_seconds() -> dict[str, float]:
    """A message's start-up in three measured parts: Flower starting the process until this module is
    imported (interpreter, flwr-clientapp, its hand-shake with the SuperNode), this module's imports
    (torch, flwr, the project; train adds the experiment's model code, import_experiment), and from then until
    the handler runs (Flower loading the app and the message)."""
    age, now = process_age(), time.time()
    parts = {"imports": IMPORTS_DONE - IMPORTS_STARTED, "handover": now - IMPORTS_DONE}
    if age is not None:
        parts["flower-start"] = age - (now - IMPORTS_STARTED)
    return parts


@app.query()
def setup(msg: Message, context: Context) -> Message:
    """Who this client is, its data size n_k (FedAvg's weight) and phi_0 (the server checks all agree)."""
    _, c = load_client(context)
    info = ConfigRecord(
        {
            "partition-id": c.index,
            "num-partitions": c.num_partitions,
            "num-examples": len(c.split.train_targets),
            "backbone-sha256": c.backbone_sha256,
        }
    )
    return Message(RecordDict({ADAPTER: to_record(c.phi0), CONFIG: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Round t: phi^t -> fed.local_update (seeds (seed, t, k)) -> phi_k^{t+1}, n_k, mean loss."""
    startup, config = startup_seconds(), msg.content[CONFIG]
    if config.get("drop", False):  # a simulated drop-out (fed.sample_clients): answers, but sends nothing
        return Message(RecordDict({CONFIG: ConfigRecord({"dropped": True})}), reply_to=msg)
    startup["imports"] += import_experiment(context)
    t0 = time.perf_counter()
    cfg, c = load_client(context)
    check_same_model(config, c, context)
    phi_t, s, t1 = received_adapter(msg, c.phi0), c.split, time.perf_counter()
    fed_cfg = FedConfig(cfg.rounds, cfg.local_steps, cfg.lr, cfg.batch_size, seed=cfg.seed)
    reply, _ = local_update(
        c.model,
        Client(s.name, s.train_inputs, s.train_targets),
        phi_t,
        {},
        int(config["round"]),
        c.index,
        fed_cfg,
        autocast_dtype=c.autocast_dtype,
        progress=False,
        **c.training(),
    )
    seconds = {**startup, "load": t1 - t0, "train": time.perf_counter() - t1}  # where the time went
    metrics = MetricRecord(
        {
            "num-examples": reply.num_examples,
            "train-loss": reply.mean_loss,
            **{f"{k}-seconds": v for k, v in seconds.items()},
        }
    )
    return Message(RecordDict({ADAPTER: to_record(reply.state), METRICS: metrics}), reply_to=msg)


@app.evaluate()
def personalize(msg: Message, context: Context) -> Message:
    """After the last round: the local adapter phi_L, phi_G fine-tuned, Potara's lam on the client's own
    validation split, and every method scored on its test split. Only numbers go back. (Its modules are
    imported here: a training round does not pay for them.)"""
    from potara_guards.adapter_file import save_adapter
    from potara_harness.evaluation import Evaluator, evaluate_client
    from potara_harness.pipeline import finetune_seed, local_seed, train_checked

    cfg, c = load_client(context)
    check_same_model(msg.content.get(CONFIG, {}), c, context)
    G, s, k = received_adapter(msg, c.phi0), c.split, c.index
    ecfg = cfg.pipeline_config()
    L, local_fallback = train_checked(
        c.model,
        c.phi0,
        s,
        cfg.local_train_steps,
        local_seed(cfg.seed, k),
        ecfg,
        "local",
        autocast_dtype=c.autocast_dtype,
        **c.training(),
    )
    F, finetune_fallback = train_checked(
        c.model,
        G,
        s,
        cfg.finetune_steps,
        finetune_seed(cfg.seed, k),
        ecfg,
        "fine-tune",
        autocast_dtype=c.autocast_dtype,
        **c.training(),
    )
    e = evaluate_client(Evaluator(c.model, c.phi0, ecfg, autocast_dtype=c.autocast_dtype, **c.scoring()), k, s, G, L, F)
    out = flatten(
        {
            "acc": e.acc,
            "record": e.record,
            "fallbacks": [f"{x['stage']}: {x['reason']}" for x in (local_fallback, finetune_fallback) if x],
            "bad-statistics": [x["what"] for x in e.bad_stats],
        }
    )
    adapter_dir = context.node_config.get("adapter-dir")
    if adapter_dir:  # the personalised adapter stays on the device (adapter_dir_problem: checked in load_client)
        os.makedirs(adapter_dir, exist_ok=True)
        if c.language:
            save_language_adapter(adapter_dir, cfg, c, e.potara_adapter)
        else:
            save_adapter(
                os.path.join(adapter_dir, f"{s.name}-potara.pt"),
                e.potara_adapter,
                {"lam": e.record["potara"]["lam"], **lora_meta(c.model)},
            )
    return Message(RecordDict({CONFIG: ConfigRecord(out)}), reply_to=msg)


def save_language_adapter(adapter_dir: str, cfg: AppConfig, c: LocalClient, adapter: dict) -> None:
    """The language client's Potara adapter in peft's format, as run_llm.py --export-peft writes it:
    adapter-dir/<task>/ (adapter_config.json + adapter_model.safetensors) over the node's Hugging Face folder, or
    over the tiny model, then written beside it as adapter-dir/base_model/ (peft_export.export_with_base)."""
    from potara_harness.peft_export import export_with_base

    export_with_base(adapter_dir, c.model, {c.split.name: adapter}, cfg.target_modules, c.language.base_model)
