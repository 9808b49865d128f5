"""The language model side: a tiny Llama built from a config (no download) or any Hugging Face causal LM,
the token-level loss over answer tokens, the cached pre-training of the tiny model, the text tasks as
client splits, and the scorer (multiple choice by summed log-likelihood, free-form by greedy decoding).

    tok = ByteTokenizer(); model = tiny_llama(tok.vocab_size)
    info = pretrain_tiny(model, tok, config.LM_PRESETS["tiny"], seed=0, cache_dir="data/llm", device=cpu, progress=True)
    scorer = Scorer(tok, max_new_tokens=16)
    splits = build_splits(synthetic_tasks(600), tok, (200, 50, 100), max_len=96, seed=0, scorer=scorer)
    run_experiment(model, splits, cfg, out, evaluate=scorer, loss_fn=lm_loss, likelihood=causal_lm_likelihood)

Needs the `llm` extra (transformers) for the models; a split's tensors hold <bos> prompt answer <eos>
with labels -100 everywhere but the answer (llm_data.encode_examples).
"""

from __future__ import annotations

import hashlib
import os
import random
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import ClientSplits
from fed import progress_bar
from lora import add_lora
from potara import causal_lm_likelihood
from potara_guards.safe_files import load_torch_file
from potara_guards.tensor_checks import check_tensors
from potara_harness.config import SYNTHETIC_TASKS_SEED, TINY_LLAMA
from potara_harness.llm_data import (
    IGNORE,
    ByteTokenizer,
    DataError,
    Example,
    HFTokenizer,
    Tokenizer,
    encode_examples,
    normalize_answer,
    read_jsonl,
    split_tasks,
    task_name_problem,
)
from potara_harness.llm_tasks import SYNTHETIC_TASKS, public_corpus, synthetic_tasks
from potara_harness.pretrain import cache_path, cached_pretrain, step, warmup_cosine


# ----------------------------------------------------------------------------- models
def tiny_llama(vocab_size: int, **overrides):
    """A small Llama-architecture causal LM from a config (random weights, no download). Eager
    attention: it runs under torch.func.vmap (Potara's per-sample gradients) without a fallback loop."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0, **{**TINY_LLAMA, **overrides}
    )
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


def tiny_model(max_len: int, arch: dict | None = None):
    """The tiny Llama (architecture `arch`, default config.TINY_LLAMA) for sequences of max_len tokens: positions
    max(128, max_len), the byte tokenizer's vocabulary. run_llm.py and a Flower device build it alike."""
    return tiny_llama(ByteTokenizer.vocab_size, **{**(arch or {}), "max_position_embeddings": max(128, max_len)})


def load_tiny_file(path: str, max_len: int) -> nn.Module:
    """The pre-trained tiny Llama from pretrain_tiny's cache file (run_llm.py --model tiny writes it to --cache-dir,
    e.g. data/llm/tiny-llama-dff38b954720.pt), as a Flower device loads it: torch.load(weights_only=True), no code runs;
    its architecture (info/key/arch) must have TINY_LLAMA's keys with values of their types, sizes in [1, 65536];
    every tensor is checked against the model built from it (keys, shapes, dtypes, finite). DataError, one line."""
    try:
        obj = load_torch_file(path)
    except Exception as e:  # noqa: BLE001 -- missing, a link, a FIFO, truncated, or a pickle that would run code
        raise DataError(f"{path}: not a readable, safe torch file ({type(e).__name__})") from None
    arch = obj.get("info", {}).get("key", {}).get("arch") if isinstance(obj, dict) else None
    if not (
        isinstance(arch, dict)
        and set(arch) == set(TINY_LLAMA)
        and all(type(v) is type(TINY_LLAMA[k]) for k, v in arch.items())
        and all(1 <= v <= 65536 for v in arch.values() if type(v) is int)
    ):
        raise DataError(f"{path}: not a tiny model file (pretrain_tiny's: info/key/arch with {sorted(TINY_LLAMA)})")
    try:
        model = tiny_model(max_len, arch)
        check_tensors(obj.get("state_dict"), model.state_dict(), what=path)
    except ValueError as e:  # transformers' config checks, tensor_checks.AdapterError
        raise DataError(f"{path}: {' '.join(str(e).split())[:300]}") from None
    model.load_state_dict(obj["state_dict"])
    return model.eval()


def add_language_lora(model: nn.Module, targets, rank: int, alpha: float, seed: int) -> None:
    """LoRA of rank r on the modules `targets` names (lora.add_lora), drawn under torch.manual_seed(seed): phi_0,
    the initial adapter every client and the server share, depends on the seed and the architecture only."""
    torch.manual_seed(seed)
    add_lora(model, targets, r=rank, alpha=alpha)


def _hf_failure(name: str, e: Exception) -> DataError:
    if isinstance(e, ImportError):
        return DataError(f"--model {name} needs the 'llm' extra (pip install '.[llm]'): {e}")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return DataError(
        f"--model {name}: could not load it ({type(e).__name__}: {first[:200]}); offline, pass a "
        "local folder with config.json, the weights and the tokenizer"
    )


def load_hf_tokenizer(name: str) -> HFTokenizer:
    """AutoTokenizer behind llm_data's interface: loaded before the model, so the data can be checked against
    it first (llm_data.check_fits). DataError (one line) when it cannot be loaded or has no eos token."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)  # trust_remote_code stays False: no code from the repo
    except Exception as e:  # noqa: BLE001 -- OSError offline / unknown repo, ImportError, ValueError, ...
        raise _hf_failure(name, e) from None
    return HFTokenizer(tokenizer)


def load_hf_model(name: str, attn: str) -> nn.Module:
    """AutoModelForCausalLM in float32 (transformers reads safetensors, or .bin with weights_only); a model
    with a NaN/Inf parameter is refused. DataError (one line) on any failure."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM

        new_api = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)  # torch_dtype -> dtype
        model = AutoModelForCausalLM.from_pretrained(
            name, attn_implementation=attn, **{"dtype" if new_api else "torch_dtype": torch.float32}
        )
    except Exception as e:  # noqa: BLE001
        raise _hf_failure(name, e) from None
    bad = next(
        (n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()), None
    )
    if bad is not None:
        raise DataError(f"--model {name}: its weight {bad} holds NaN or Inf values")
    return model


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy, mean over the answer tokens only: logits[:, t] predicts token t+1,
    positions whose label is -100 (prompt, padding) are dropped before the softmax (saves memory). The same
    shift and mask as potara.causal_lm_likelihood's per-sample log_prob, which multiplies by the mask instead
    (boolean indexing cannot run under torch.func.vmap); test_lm checks that the two agree."""
    logits = model(input_ids).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(logits[keep].float(), target[keep])


def pretrain_tiny(model: nn.Module, tok: Tokenizer, p: dict, seed: int, cache_dir: str, device, progress: bool) -> dict:
    """Full-model language-model pre-training of the tiny Llama on the public corpus (llm_tasks.public_corpus:
    the synthetic tasks in their generic form, no client's data), cached on disk by a hash of everything
    that shapes it (pretrain.cached_pretrain). Returns info (cache path, held-out loss, seconds)."""
    key = {
        "arch": TINY_LLAMA,
        "steps": p["pretrain_steps"],
        "lr": p["pretrain_lr"],
        "batch": p["pretrain_batch"],
        "max_len": p["max_len"],
        "seed": seed,  # a sample of the corpus: a change of its format is a new key
        "corpus": hashlib.sha256(repr(public_corpus(64, random.Random(seed))).encode()).hexdigest(),
    }
    path = cache_path(cache_dir, "tiny-llama", key)

    def restore(obj: dict) -> nn.Module:  # an untrusted file: every tensor checked against the model's first
        check_tensors(obj["state_dict"], model.state_dict(), what=path)
        model.load_state_dict(obj["state_dict"])
        return model

    def train() -> dict:
        t0, rng = time.time(), random.Random(seed)
        hx, hy = encode_examples(tok, public_corpus(500, random.Random(seed + 1)), p["max_len"])
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=p["pretrain_lr"], weight_decay=0.01)
        sched = warmup_cosine(opt, p["pretrain_steps"])
        for _ in progress_bar(range(p["pretrain_steps"]), "pre-training the tiny model", progress, stage=True):
            x, _ = encode_examples(tok, public_corpus(p["pretrain_batch"], rng), p["max_len"])
            y = x.masked_fill(x == tok.pad_id, IGNORE)  # a language model of the whole text, prompt included
            step(opt, sched, lm_loss(model, x.to(device), y.to(device)))
        model.eval()
        with torch.no_grad():
            held_loss = float(lm_loss(model, hx.to(device), hy.to(device)))
        model.cpu()
        info = {"heldout_loss": held_loss, "pretrain_seconds": time.time() - t0, "key": key}
        return {"state_dict": model.state_dict(), "info": info}

    _, info, _ = cached_pretrain(
        path, "tiny model", restore, train, lambda i: f"held-out public answer loss {i['heldout_loss']:.3f}"
    )
    return {"cache": path, **info}


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def option_logprobs(
    model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 64
) -> torch.Tensor:
    """For each (prompt, option) token pair, the summed log-probability of the option's tokens after the
    prompt, log p(option | prompt) (lm-evaluation-harness's multiple-choice "acc": no length
    normalisation, no <eos>). Rows are right-padded and batched; labels -100 outside the option."""
    device, scores = next(model.parameters()).device, []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b : b + batch_size]
        T = max(len(p) + len(o) for p, o in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
        for i, (p, o) in enumerate(chunk):
            ids[i, : len(p) + len(o)] = torch.tensor(p + o)
            labels[i, len(p) : len(p) + len(o)] = torch.tensor(o)
        scores.append(causal_lm_likelihood.log_prob(model(ids.to(device)), labels.to(device)).float().cpu())
    return torch.cat(scores)


@torch.no_grad()
def greedy_decode(
    model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int, batch_size: int = 64
) -> list[list[int]]:
    """Greedy continuation of each prompt until <eos> or max_new_tokens, with the KV cache. Prompts of
    equal length are decoded together (no padding, so no attention mask or position shift to get wrong)."""
    device, out = next(model.parameters()).device, [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in (ids[b : b + batch_size] for ids in by_len.values() for b in range(0, len(ids), batch_size)):
        x = torch.tensor([prompts[i] for i in idx], device=device)
        res = model(x, use_cache=True)
        cache_kw = "cache" if "cache" in res else "past_key_values"  # transformers >= 5.24 renamed it
        gen, done = [], torch.zeros(len(idx), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            nxt = res.logits[:, -1].argmax(-1)
            gen.append(torch.where(done, eos_id, nxt))
            done |= nxt == eos_id
            if bool(done.all()):
                break
            res = model(nxt[:, None], use_cache=True, **{cache_kw: res[cache_kw]})
        gen = torch.stack(gen, 1).tolist()
        for row, i in zip(gen, idx):
            out[i] = row[: row.index(eos_id)] if eos_id in row else row
    return out


class Scorer:
    """experiment's `evaluate(model, input_ids, labels) -> accuracy` for text tasks. A split's tensors hold
    <bos> prompt answer <eos>; the scorer finds each row's example (options or free-form) by its tokens,
    so the tensors stay plain (the same rows feed the training loss and Potara's Fisher).
    Multiple choice: correct when the gold option has the largest summed log-likelihood (ties: wrong).
    Free-form: correct when normalize_answer(greedy continuation) == normalize_answer(answer)."""

    def __init__(self, tok: Tokenizer, max_new_tokens: int, batch_size: int = 64):
        self.tok, self.max_new_tokens, self.batch_size, self.examples = tok, max_new_tokens, batch_size, {}

    def register(self, input_ids: torch.Tensor, labels: torch.Tensor, examples: list[Example]) -> None:
        for row, lab, ex in zip(input_ids, labels, examples):
            key = self.key(row, lab)
            if self.examples.setdefault(key, ex).options != ex.options:
                raise DataError(
                    f"two examples with the same prompt and answer but different options: {ex.prompt[:60]!r}"
                )

    @staticmethod
    def key(row: torch.Tensor, lab: torch.Tensor) -> tuple:
        end = int((lab != IGNORE).nonzero().max()) + 1
        return tuple(row[:end].tolist())

    def __call__(self, model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> float:
        mc, free = [], []  # (prompt, example)
        for row, lab in zip(input_ids.cpu(), labels.cpu()):
            start = int((lab != IGNORE).nonzero().min())
            ex = self.examples[self.key(row, lab)]
            (free if ex.options is None else mc).append((row[:start].tolist(), ex))
        correct = 0
        if mc:
            pairs = [(p, self.tok.encode(" " + o)) for p, ex in mc for o in ex.options]
            scores = option_logprobs(model, pairs, self.tok.pad_id, self.batch_size).split(
                [len(ex.options) for _, ex in mc]
            )
            for s, (_, ex) in zip(scores, mc):
                gold = ex.options.index(ex.answer)
                correct += int(bool((s[gold] > s[torch.arange(len(s)) != gold]).all()))
        if free:
            outs = greedy_decode(model, [p for p, _ in free], self.max_new_tokens, self.tok.eos_id, self.batch_size)
            correct += sum(
                normalize_answer(self.tok.decode(o)) == normalize_answer(ex.answer) for o, (_, ex) in zip(outs, free)
            )
        return correct / len(input_ids)


# ----------------------------------------------------------------------------- data -> client splits
def build_splits(
    tasks: dict[str, list[Example]],
    tok: Tokenizer,
    sizes: tuple[int, int, int],
    max_len: int,
    seed: int,
    scorer: Scorer,
) -> list[ClientSplits]:
    """One client per task: its examples shuffled with (seed, task), then test, val and train taken in
    that order (so --train does not change the test set). Every val/test row is registered with the scorer."""
    splits = []
    for name, (train, val, test) in split_tasks(tasks, sizes, seed).items():
        parts = {}
        for part, exs in (("train", train), ("val", val), ("test", test)):
            parts[part] = encode_examples(tok, exs, max_len)
            if part != "train":
                scorer.register(*parts[part], exs)
        splits.append(ClientSplits(name, *parts["train"], *parts["val"], *parts["test"]))
    return splits


SYNTHETIC_PREFIX = "synthetic:"  # a Flower node's task="synthetic:<name>": one of run_llm.py --data synthetic's tasks


def client_task(spec: str, synthetic_examples: int) -> tuple[str, list[Example]]:
    """One client's task, named as a Flower node's `task` setting names it: "synthetic:<name>", the task <name> of
    synthetic_tasks(synthetic_examples, seed=SYNTHETIC_TASKS_SEED) (run_llm.py --data synthetic's), or the path of
    a <task>.jsonl file (llm_data's format), named by the file as read_task_dir names it. DataError, one line."""
    if spec.startswith(SYNTHETIC_PREFIX):
        name = spec[len(SYNTHETIC_PREFIX) :]
        if name not in SYNTHETIC_TASKS:
            raise DataError(f"task {spec!r}: the synthetic tasks are {', '.join(SYNTHETIC_TASKS)}")
        return name, synthetic_tasks(synthetic_examples, seed=SYNTHETIC_TASKS_SEED)[name]
    name = os.path.basename(spec)[: -len(".jsonl")] if spec.endswith(".jsonl") else ""
    if name in ("", ".", ".."):
        raise DataError(f"task {spec!r}: expected a <task>.jsonl file or synthetic:<name>")
    problem = task_name_problem(name)  # the scripts' rule (read_task_dir), before any file is read or written
    if problem:
        raise DataError(f"task {spec!r}: the task name {problem} (it names the adapter-dir export's folder)")
    return name, read_jsonl(spec)


def chance(examples: list[Example]) -> float:
    """Accuracy of a uniform random guess: mean 1/#options (0 for free-form answers)."""
    return sum(1 / len(e.options) if e.options else 0.0 for e in examples) / len(examples)
