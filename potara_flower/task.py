"""What the Flower ServerApp (server_app.py) and ClientApp (client_app.py) share: the message protocol,
adapter tensors <-> Flower ArrayRecords, and a client's data. The run configuration is
potara_harness.config.AppConfig.

    flower-superlink --insecure --host 127.0.0.1 --port 9093 --disable-runtime-dependency-installation
    flower-supernode --insecure --superlink 127.0.0.1:9093 --port 9094 \
        --node-config "partition-id=0 num-partitions=2 backbone='data/backbones/tiny-3ed7fae472e8.pt' data-dir='data'"
    flwr run . <connection> --run-config "rounds=5 out-dir='/abs/path/runs/flower'"

(docs/flower.md has the whole recipe, with TLS and SuperNode keys.)

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

import hashlib
import json
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from data import ClientSplits, client_splits, label_partition, load_images, public_and_pool
from potara_guards.safe_files import MAX_TORCH_FILE, UnsafeFile, atomic_write, load_torch_file, open_regular
from potara_harness.config import AppConfig, ConfigError

SETUP, TRAIN, EVALUATE = "query", "train", "evaluate"  # Flower message types (ClientApp handlers)
ADAPTER, CONFIG, METRICS = "adapter", "config", "metrics"  # keys of a message's RecordDict
SETUP_SHA256 = "setup-sha256"  # train / evaluate config: the model hash the set-up agreed on (re-checked)


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
    adapter it expects (tensor_checks.check_tensors / updates.validate_update): the sender is not trusted."""
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


def draw_split(cfg: AppConfig, data_dir: str, k: int, num_partitions: int) -> ClientSplits:
    """Client k's data, drawn exactly as run_cifar.py draws it for --clients num_partitions."""
    data, _ = load_images(cfg.data, data_dir, cfg.synthetic_per_class)
    _, pool = public_and_pool(len(data.labels), cfg.public)
    per_client = cfg.train + cfg.val + cfg.test
    parts = label_partition(
        cfg.partition, data.labels[pool], data.coarse_labels[pool], num_partitions, cfg.alpha, per_client, cfg.seed
    )
    return client_splits(data.images, data.labels, pool, parts, (cfg.train, cfg.val, cfg.test), cfg.seed)[k]


# ----------------------------------------------------------------------------- a device's split cache
# Flower starts a fresh process per message, so every message would read all of CIFAR-100 (or the synthetic
# stand-in) and partition it again for the ~700 images this client holds. The split is cached on the device
# as one torch file of plain tensors, keyed by a hash of everything that determines it: the run settings in
# SPLIT_SETTINGS, (k, K), the data folder and each data file's name, size and modification time. Read with
# weights_only=True (no code runs) and checked; a file whose key, keys, dtypes, shapes or label range do not
# match is not used: the split is drawn again and the file rewritten (atomically: a killed process leaves the
# old file or none).
SPLIT_CACHE_FORMAT = "potara-split-v1"
SPLIT_SETTINGS = ("data", "synthetic_per_class", "public", "partition", "alpha", "train", "val", "test", "seed")
SPLIT_PARTS = [f"{p}_{kind}" for p in ("train", "val", "test") for kind in ("inputs", "targets")]


def split_key(cfg: AppConfig, data_dir: str, k: int, num_partitions: int) -> str:
    """sha256 of what client k's split depends on (the data files by name, size and mtime: hashing 160 MB
    of CIFAR-100 per message would cost what the cache saves)."""
    folder = os.path.join(data_dir, "synthetic" if cfg.data == "synthetic" else "", "cifar-100-python")
    stat = lambda n: os.stat(os.path.join(folder, n))
    files = (
        [(n, stat(n).st_size, stat(n).st_mtime_ns) for n in sorted(os.listdir(folder))]
        if os.path.isdir(folder)
        else None
    )
    blob = {
        "format": SPLIT_CACHE_FORMAT,
        "settings": {f: getattr(cfg, f) for f in SPLIT_SETTINGS},
        "client": [k, num_partitions],
        "folder": os.path.abspath(folder),
        "files": files,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


def read_cached_split(path: str, key: str, cfg: AppConfig, k: int) -> ClientSplits | None:
    """The cached split if the file is this key's and well-formed, else None (the file is never executed)."""
    try:
        obj = load_torch_file(path, 1 << 30)
    except Exception:  # missing, a link, a FIFO, truncated, or not a plain torch file
        return None
    if (
        not isinstance(obj, dict)
        or set(obj) != {"format", "key", "name", *SPLIT_PARTS}
        or obj["key"] != key
        or obj["name"] != f"client{k}"
    ):
        return None
    for part, n in zip(("train", "val", "test"), (cfg.train, cfg.val, cfg.test)):
        x, y = obj[f"{part}_inputs"], obj[f"{part}_targets"]
        if not (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == torch.uint8
            and tuple(x.shape) == (n, 3, 32, 32)
            and y.dtype == torch.int64
            and tuple(y.shape) == (n,)
            and (n == 0 or 0 <= int(y.min()) and int(y.max()) < 100)
        ):
            return None
    return ClientSplits(obj["name"], *(obj[p] for p in SPLIT_PARTS))


def client_split(
    cfg: AppConfig, data_dir: str, k: int, num_partitions: int, cache_dir: str | None = None
) -> ClientSplits:
    """Client k's data (draw_split); with cache_dir, from the device's cache when it holds this exact split."""
    if cache_dir is None:
        return draw_split(cfg, data_dir, k, num_partitions)
    path = lambda key: os.path.join(cache_dir, f"client{k}-of-{num_partitions}-{key[:16]}.pt")
    key = split_key(cfg, data_dir, k, num_partitions)
    split = read_cached_split(path(key), key, cfg, k)
    if split is None:
        split = draw_split(cfg, data_dir, k, num_partitions)
        key = split_key(cfg, data_dir, k, num_partitions)  # the synthetic files may have been written just now
        obj = {
            "format": SPLIT_CACHE_FORMAT,
            "key": key,
            "name": split.name,
            **{p: getattr(split, p).clone() for p in SPLIT_PARTS},
        }  # own storage, not a view of all images
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(path(key), lambda f: torch.save(obj, f))
    return split


# ----------------------------------------------------------------------------- the language experiment
# experiment="language": run_llm.py's experiment, one instruction task per client. A node names its task
# (task='synthetic:<name>' or a <task>.jsonl file) and the model (a tiny model file or a local Hugging Face folder);
# every message builds the client as run_llm.py builds it (lm.build_splits, the model, add_language_lora's phi_0).
@dataclass
class LanguageClient:
    """What the language experiment's client holds beyond its split and model: the plug-ins run_llm.py hands the
    pipeline (lm_loss, the Scorer, causal_lm_likelihood), and where the model came from (its peft export's base)."""

    loss_fn: Callable
    evaluate: Callable
    likelihood: object
    base_model: str | None  # a Hugging Face folder's absolute path; None: the tiny model (exported beside it)


def language_client(cfg: AppConfig, task: str, model_path: str) -> tuple[ClientSplits, nn.Module, LanguageClient]:
    """Client k's split, model with phi_0 and plug-ins for the node's task and model, built as run_llm.py builds
    them: the task's examples split by (seed, task name) into train / val / test and encoded with answer-only labels
    (lm.build_splits), the model (tiny: lm.load_tiny_file, the byte tokenizer; a folder: AutoModelForCausalLM and
    AutoTokenizer from it, eager attention), then LoRA on `targets` drawn under torch.manual_seed(seed)."""
    from potara import causal_lm_likelihood  # the language modules (transformers among them) only when they run
    from potara_harness.llm_data import ByteTokenizer
    from potara_harness.lm import (
        Scorer,
        add_language_lora,
        build_splits,
        client_task,
        lm_loss,
        load_hf_model,
        load_hf_tokenizer,
        load_tiny_file,
    )

    name, examples = client_task(task, cfg.synthetic_examples)
    if os.path.isfile(model_path):
        tok, model, base = ByteTokenizer(), load_tiny_file(model_path, cfg.max_len), None
    elif os.path.isdir(model_path):
        tok, base = load_hf_tokenizer(model_path), os.path.abspath(model_path)
        model = load_hf_model(model_path, "eager").eval()
    else:
        raise ConfigError(f"node config model={model_path!r}: no such file or folder on this device")
    scorer = Scorer(tok, cfg.max_new_tokens, cfg.eval_batch_size)
    [split] = build_splits({name: examples}, tok, (cfg.train, cfg.val, cfg.test), cfg.max_len, cfg.seed, scorer)
    add_language_lora(model, cfg.target_modules, cfg.rank, cfg.lora_alpha, cfg.seed)
    return split, model, LanguageClient(lm_loss, scorer, causal_lm_likelihood, base)


def file_sha256(path: str, max_bytes: int = MAX_TORCH_FILE) -> str:
    """sha256 of a regular file's bytes, read in 1 MiB blocks: opened as every read of the project is
    (safe_files.open_regular: no link at the last component, no FIFO or device, at most max_bytes), so a FIFO
    or /dev/zero is refused at once instead of hanging. UnsafeFile (an OSError, one line) otherwise."""
    h, total = hashlib.sha256(), 0
    with open_regular(path, max_bytes) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            total += len(block)
            if total > max_bytes:  # grew while read
                raise UnsafeFile(f"{path}: larger than the {max_bytes:,} bytes this file may hold")
            h.update(block)
    return h.hexdigest()


def model_sha256(path: str) -> str:
    """sha256 of a node's model: a file's bytes (what the vision app's backbone hash is), or for a folder the sha256
    of one line "<relative path>\\0<the file's sha256>" per file under it, in sorted order (so two folders agree
    exactly when they hold the same files with the same bytes). Every file is a regular file (file_sha256); a
    link inside the folder is hashed as the file it resolves to (a Hugging Face cache's snapshot folder is links
    to its blobs), and refused when that is not a regular file (a link to /dev/zero, a FIFO)."""
    if not os.path.isdir(path):
        return file_sha256(path)
    files = sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)
    lines = "".join(f"{f}\0{file_sha256(os.path.realpath(os.path.join(path, f)))}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()
