"""Potara on a causal language model: one instruction task per client (FLAN-style), LoRA on attention.

    python run_llm.py --model tiny --data synthetic              # offline, 2-core CPU, ~10 min with pre-training
    python run_llm.py --model meta-llama/Llama-3.2-3B --data data/flan   # one GPU, bf16 autocast
    python run_llm.py --model tiny --data synthetic --resume     # continue an interrupted run (same arguments)
    python run_llm.py ... --export-peft adapters/                # each client's Potara adapter in peft's format

Pipeline: --data DIR (one <task>.jsonl per client, format in llm_data.py) or the synthetic tasks ->
per client a train / val / test split, encoded as input_ids + labels (-100 except the answer tokens)
-> --model: any causal LM AutoModelForCausalLM loads, or "tiny", a small Llama built here from a config
and pre-trained on the synthetic tasks' public corpus (cached in --cache-dir) -> lora.add_lora on the
attention projections (--targets, default q_proj v_proj) -> experiment.run_experiment, the same
pipeline as run_cifar.py: FedIT, FedSA-LoRA, local adapters, Potara and every baseline, scored on each
client's test split (multiple choice: the option with the largest summed log-likelihood; free-form:
exact match of greedy decoding) -> --out DIR: results.json, results.md, checkpoint.pt, plots; the table
also shows chance and the pre-trained model with no adapter, what the learned methods must beat.

Training loss and Potara's Fisher are token-level over the answer tokens only (labels -100 elsewhere,
potara.causal_lm_likelihood). Per-sample gradients (torch.func.vmap over grad with functional_call) run
on the transformers model; eager attention avoids torch.func's slow fallback for SDPA (--attn).
--export-peft DIR writes each client's Potara adapter as peft's adapter_config.json +
adapter_model.safetensors (loadable with peft.PeftModel.from_pretrained or a multi-LoRA server).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import time
import warnings

# Idle OpenMP threads sleep instead of spinning (as in run_cifar.py: spinning threads of an
# oversubscribed pool slow training down many times on a shared machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiment import (ClientSplits, ResumeError, add_experiment_options, atomic_write, check_experiment_options,
                        config_from_args, dir_problem, markdown_table, run_experiment)
from llm_data import (IGNORE, ByteTokenizer, DataError, Example, HFTokenizer, Tokenizer, encode_examples,
                      normalize_answer, public_corpus, read_task_dir, synthetic_tasks)
from lora import add_lora, lora_meta
from potara import causal_lm_likelihood, merge_adapters

TINY_LLAMA = dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=True)
PRESETS = {  # every default that depends on the model: "tiny" or any other (a Hugging Face model on a GPU)
    "tiny": dict(train=200, val=50, test=100, max_len=96, max_new_tokens=16, rounds=20, local_steps=5,
                 local_train_steps=100, finetune_steps=25, lr=3e-3, batch_size=32, rank=8, lora_alpha=16,
                 pretrain_steps=2500, pretrain_lr=3e-3, pretrain_batch=32),
    "hf": dict(train=1000, val=100, test=500, max_len=512, max_new_tokens=32, rounds=50, local_steps=5,
               local_train_steps=300, finetune_steps=100, lr=2e-4, batch_size=8, rank=8, lora_alpha=16,
               pretrain_steps=0, pretrain_lr=0.0, pretrain_batch=0),
}


# ----------------------------------------------------------------------------- models
def tiny_llama(vocab_size: int, **overrides):
    """A small Llama-architecture causal LM from a config (random weights, no download). Eager
    attention: it runs under torch.func.vmap (Potara's per-sample gradients) without a fallback loop."""
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      **{**TINY_LLAMA, **overrides})
    return LlamaForCausalLM._from_config(cfg, attn_implementation="eager")


def load_hf_model(name: str, attn: str):
    """AutoModelForCausalLM + AutoTokenizer; any failure (offline, unknown name) is one line."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(name)
        new_api = tuple(int(v) for v in transformers.__version__.split(".")[:2]) >= (4, 56)  # torch_dtype -> dtype
        model = AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn,
                                                     **{"dtype" if new_api else "torch_dtype": torch.float32})
    except ImportError as e:
        raise SystemExit(f"error: run_llm.py needs the 'llm' extra (pip install -e '.[llm]'): {e}") from None
    except Exception as e:  # OSError offline / unknown repo, ValueError unknown architecture, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: --model {name}: could not load it ({type(e).__name__}: {first[:200]}); offline, "
                         "pass a local folder with config.json, the weights and the tokenizer") from None
    return model, HFTokenizer(tokenizer)


def lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Token-level cross-entropy, mean over the answer tokens only: logits[:, t] predicts token t+1,
    positions whose label is -100 (prompt, padding) are dropped before the softmax (saves memory)."""
    logits = model(input_ids).logits[:, :-1]
    target = labels[:, 1:]
    keep = target != IGNORE
    return F.cross_entropy(logits[keep].float(), target[keep])


def pretrain_tiny(model: nn.Module, tok: Tokenizer, p: dict, seed: int, cache_dir: str, device, progress: bool) -> dict:
    """Full-model language-model pre-training of the tiny Llama on the public corpus (llm_data.public_corpus:
    the synthetic tasks in their generic form, no client's data), cached on disk by a hash of everything
    that shapes it. Returns info (cache path, held-out loss, seconds)."""
    key = {"arch": TINY_LLAMA, "steps": p["pretrain_steps"], "lr": p["pretrain_lr"], "batch": p["pretrain_batch"],
           "max_len": p["max_len"], "seed": seed,  # a sample of the corpus: a change of its format is a new key
           "corpus": hashlib.sha256(repr(public_corpus(64, random.Random(seed))).encode()).hexdigest()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"tiny-llama-{digest}.pt")
    if os.path.exists(path):
        try:  # weights_only: a cache file never runs code; a damaged or stale one is simply rebuilt
            obj = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(obj["state_dict"])
            print(f"tiny model: reusing {path} (held-out public answer loss {obj['info']['heldout_loss']:.3f})")
            return {"cache": path, **obj["info"]}
        except Exception as e:  # noqa: BLE001 -- any unreadable cache means: pre-train again
            print(f"tiny model: cached {path} is unusable ({type(e).__name__}); pre-training again")
    t0, rng = time.time(), random.Random(seed)
    held = public_corpus(500, random.Random(seed + 1))
    hx, hy = encode_examples(tok, held, p["max_len"])
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=p["pretrain_lr"], weight_decay=0.01)
    steps, warm = p["pretrain_steps"], max(1, p["pretrain_steps"] // 10)  # linear warm-up, then cosine decay
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    for _ in tqdm(range(p["pretrain_steps"]), desc="pre-training the tiny model", disable=not progress):
        x, _ = encode_examples(tok, public_corpus(p["pretrain_batch"], rng), p["max_len"])
        y = x.masked_fill(x == tok.pad_id, IGNORE)  # a language model of the whole text, prompt included
        loss = lm_loss(model, x.to(device), y.to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        held_loss = float(lm_loss(model, hx.to(device), hy.to(device)))
    model.cpu()
    info = {"heldout_loss": held_loss, "pretrain_seconds": time.time() - t0, "key": key}
    try:
        os.makedirs(cache_dir, exist_ok=True)
        atomic_write(path, lambda f: torch.save({"state_dict": model.state_dict(), "info": info}, f))
        where = f"saved to {path}"
    except OSError as e:
        where = f"NOT cached ({e.strerror or e})"
    print(f"tiny model: pre-trained in {info['pretrain_seconds']:.0f}s, held-out public answer loss {held_loss:.3f}, "
          f"{where}")
    return {"cache": path, **info}


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def option_logprobs(model: nn.Module, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                    batch_size: int = 64) -> torch.Tensor:
    """For each (prompt, option) token pair, the summed log-probability of the option's tokens after the
    prompt, log p(option | prompt) (lm-evaluation-harness's multiple-choice "acc": no length
    normalisation, no <eos>). Rows are right-padded and batched; labels -100 outside the option."""
    device, scores = next(model.parameters()).device, []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        T = max(len(p) + len(o) for p, o in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), T), IGNORE, dtype=torch.long)
        for i, (p, o) in enumerate(chunk):
            ids[i, :len(p) + len(o)] = torch.tensor(p + o)
            labels[i, len(p):len(p) + len(o)] = torch.tensor(o)
        scores.append(causal_lm_likelihood.log_prob(model(ids.to(device)), labels.to(device)).float().cpu())
    return torch.cat(scores)


@torch.no_grad()
def greedy_decode(model: nn.Module, prompts: list[list[int]], max_new_tokens: int, eos_id: int,
                  batch_size: int = 64) -> list[list[int]]:
    """Greedy continuation of each prompt until <eos> or max_new_tokens, with the KV cache. Prompts of
    equal length are decoded together (no padding, so no attention mask or position shift to get wrong)."""
    device, out = next(model.parameters()).device, [None] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    for idx in (ids[b:b + batch_size] for ids in by_len.values() for b in range(0, len(ids), batch_size)):
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
            out[i] = row[:row.index(eos_id)] if eos_id in row else row
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
                raise DataError(f"two examples with the same prompt and answer but different options: {ex.prompt[:60]!r}")

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
            scores = option_logprobs(model, pairs, self.tok.pad_id, self.batch_size).split([len(ex.options) for _, ex in mc])
            for s, (_, ex) in zip(scores, mc):
                gold = ex.options.index(ex.answer)
                correct += int(bool((s[gold] > s[torch.arange(len(s)) != gold]).all()))
        if free:
            outs = greedy_decode(model, [p for p, _ in free], self.max_new_tokens, self.tok.eos_id, self.batch_size)
            correct += sum(normalize_answer(self.tok.decode(o)) == normalize_answer(ex.answer)
                           for o, (_, ex) in zip(outs, free))
        return correct / len(input_ids)


# ----------------------------------------------------------------------------- data -> client splits
def build_splits(tasks: dict[str, list[Example]], tok: Tokenizer, sizes: tuple[int, int, int], max_len: int,
                 seed: int, scorer: Scorer) -> list[ClientSplits]:
    """One client per task: its examples shuffled with (seed, task), then test, val and train taken in
    that order (so --train does not change the test set). Every val/test row is registered with the scorer."""
    splits = []
    for name, examples in tasks.items():
        n_train, n_val, n_test = sizes
        if len(examples) < n_train + n_val + n_test:
            raise DataError(f"task {name}: {len(examples)} examples, fewer than --train {n_train} + --val {n_val} "
                            f"+ --test {n_test}")
        order = list(range(len(examples)))
        random.Random(f"{seed}/{name}").shuffle(order)
        test, val, train = (([examples[i] for i in order[a:b]])
                            for a, b in ((0, n_test), (n_test, n_test + n_val), (n_test + n_val, n_test + n_val + n_train)))
        parts = {}
        for part, exs in (("train", train), ("val", val), ("test", test)):
            parts[part] = encode_examples(tok, exs, max_len)
            if part != "train":
                scorer.register(*parts[part], exs)
        splits.append(ClientSplits(name, *parts["train"], *parts["val"], *parts["test"]))
    return splits


# ----------------------------------------------------------------------------- peft export
def export_peft(out_dir: str, adapters: dict[str, dict[str, torch.Tensor]], scaling: float, targets: list[str],
                base_model: str) -> None:
    """Write each adapter as a peft LoRA adapter: out_dir/<name>/adapter_config.json + adapter_model.safetensors.
    Keys: "<module>.lora_A" -> "base_model.model.<module>.lora_A.weight" (peft's layout); peft computes
    scaling = lora_alpha / r, so lora_alpha is written as scaling * rank (a rank-2r "delta" merge keeps the
    scaling of its rank-r parents)."""
    from safetensors.torch import save_file
    for name, state in adapters.items():
        other = [k for k in state if not k.endswith((".lora_A", ".lora_B"))]
        if other:
            raise ValueError(f"export_peft: only lora_A/lora_B tensors of nn.Linear layers can be exported, got {other[:3]}")
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A")}
        if len(ranks) != 1:
            raise ValueError(f"export_peft: adapter {name} mixes ranks {sorted(ranks)}")
        rank = ranks.pop()
        alpha = scaling * rank
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "r": rank,
                  "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha, "target_modules": targets,
                  "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
                  "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
                  "rank_pattern": {}, "alpha_pattern": {}}
        tensors = {f"base_model.model.{k}.weight": v.detach().to("cpu").contiguous() for k, v in state.items()}
        folder = os.path.join(out_dir, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                 epilog="Arguments left at None take the value of PRESETS['tiny'] for --model tiny, "
                                        "else PRESETS['hf'] (see run_llm.py).")
    a = ap.add_argument
    a("--model", default="tiny", help="'tiny' (a small Llama built and pre-trained here) or any name/path "
                                      "AutoModelForCausalLM loads, e.g. meta-llama/Llama-3.2-3B or Qwen/Qwen3-1.7B")
    a("--data", default="synthetic", help="'synthetic' (offline tasks, one per client) or a folder of <task>.jsonl files")
    a("--out", default=None, help="output folder (default: runs/llm-<model>-<data>-s<seed>)")
    a("--cache-dir", default=os.path.join("data", "llm"), help="where the pre-trained tiny model is cached")
    a("--targets", nargs="+", default=["q_proj", "v_proj"], help="module names LoRA wraps (peft-style suffix match)")
    a("--clients", type=int, default=0, help="use the first K tasks only (0 = every task)")
    for split in ("train", "val", "test"):
        a(f"--{split}", type=int, help=f"{split} examples per client")
    a("--synthetic-examples", type=int, default=600, help="examples generated per synthetic task")
    a("--max-len", type=int, help="tokens per example (prompt cut from the left to fit)")
    a("--max-new-tokens", type=int, help="greedy decoding budget for free-form answers")
    a("--pretrain-steps", type=int, help="tiny model: pre-training steps on the public corpus")
    a("--eval-batch-size", type=int, default=64, help="sequences per forward pass when scoring options")
    a("--attn", default="eager", help="attention implementation of a --model NAME (eager works under torch.func.vmap)")
    a("--export-peft", metavar="DIR", help="also write each client's Potara adapter (and the federated one) in peft's format")
    add_experiment_options(ap)  # training, Potara, evaluation, run control: shared with run_cifar.py
    return ap


def resolve_args(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the preset, and reject every impossible value with a one-line error."""
    args = ap.parse_args(argv)
    p = dict(PRESETS["tiny" if args.model == "tiny" else "hf"])
    for k, v in p.items():
        if getattr(args, k, "absent") is None:
            setattr(args, k, v)
    p.update(pretrain_steps=args.pretrain_steps, max_len=args.max_len)
    for k in ("train", "val", "test", "max_len", "max_new_tokens", "eval_batch_size", "synthetic_examples"):
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")
    if args.clients < 0:
        ap.error(f"--clients must be >= 0, got {args.clients}")
    check_experiment_options(ap, args)
    if args.model == "tiny" and args.pretrain_steps < 1:
        ap.error("--model tiny is pre-trained here: --pretrain-steps must be >= 1")
    if args.export_peft and any(t in ("self_attn", "attention") for t in args.targets):
        ap.error("--export-peft needs LoRA on nn.Linear projections (e.g. --targets q_proj v_proj)")
    tag = lambda s: os.path.basename(os.path.normpath(s)) or "model"
    args.out = args.out or os.path.join("runs", f"llm-{tag(args.model)}-{tag(args.data)}-s{args.seed}")
    for flag, path in (("--out", args.out), ("--cache-dir", args.cache_dir), ("--export-peft", args.export_peft)):
        problem = path and dir_problem(path)
        if problem:
            ap.error(f"{flag} {path}: {problem}")
    return args, p


def main(argv=None) -> dict:
    ap = build_parser()
    args, p = resolve_args(ap, argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func fallbacks (Fisher)
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    try:
        tasks = (synthetic_tasks(args.synthetic_examples, seed=1234) if args.data == "synthetic"
                 else read_task_dir(args.data))
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if args.clients:
        if args.clients > len(tasks):
            ap.error(f"--clients {args.clients}: the data has only {len(tasks)} tasks")
        tasks = dict(list(tasks.items())[:args.clients])
    if args.model == "tiny":
        tok: Tokenizer = ByteTokenizer()
        torch.manual_seed(0)
        model = tiny_llama(tok.vocab_size, max_position_embeddings=max(128, args.max_len))
        model_info = pretrain_tiny(model, tok, p, 0, args.cache_dir, device, args.progress)
    else:
        model, tok = load_hf_model(args.model, args.attn)
        model_info = {"model": args.model}
    scorer = Scorer(tok, args.max_new_tokens, args.eval_batch_size)
    try:
        splits = build_splits(tasks, tok, (args.train, args.val, args.test), args.max_len, args.seed, scorer)
    except DataError as e:
        raise SystemExit(f"error: {e}") from None
    if args.clients_per_round > len(splits):
        ap.error(f"--clients-per-round must be in [0, {len(splits)}], got {args.clients_per_round}")
    model.to(device).eval()
    chance = {s.name: _chance(tasks[s.name]) for s in splits}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        base = {s.name: scorer(model, s.test_inputs, s.test_targets) for s in splits}
    torch.manual_seed(args.seed)  # phi_0, the initial adapter every client and the server share
    try:
        add_lora(model, args.targets, r=args.rank, alpha=args.lora_alpha)
    except ValueError as e:
        ap.error(f"--targets: {e}")
    model.to(device)
    cfg = config_from_args(args)
    config = {"args": {k: v for k, v in vars(args).items() if k not in ("progress", "resume", "threads", "export_peft")},
              "model": model_info, "device": device.type, "torch": torch.__version__,
              "reference": {"chance": chance, "pretrained_no_adapter": base},
              "tasks": {s.name: {"examples": len(tasks[s.name]), "multiple_choice": tasks[s.name][0].options is not None}
                        for s in splits}}
    t0 = time.time()
    try:
        results = run_experiment(model, splits, cfg, args.out, evaluate=scorer, loss_fn=lm_loss,
                                 likelihood=causal_lm_likelihood, resume=args.resume, config=config,
                                 progress=args.progress, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    except ResumeError as e:
        raise SystemExit(f"error: {e}") from None
    table = markdown_table(results) + "\n\n" + reference_table(results)
    atomic_write(os.path.join(args.out, "results.md"), lambda f: f.write((table + "\n").encode()))
    if args.export_peft:
        write_peft(args, model, results)
    print(("SYNTHETIC TASKS (run_llm.py --data synthetic)\n" if args.data == "synthetic" else "") + table)
    print(f"\n{time.time() - t0:.0f}s on {device} ({args.threads} threads); results in {args.out}/results.json")
    return results


def reference_table(results: dict) -> str:
    """What the methods are measured against: a uniform guess, and the pre-trained model with no adapter."""
    names, ref = results["clients"], results["config"]["reference"]
    rows = [("Chance (uniform guess)", ref["chance"]), ("Pre-trained model, no adapter", ref["pretrained_no_adapter"])]
    return "\n".join(["| reference | mean acc | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)] +
                     [f"| {label} | {sum(d.values()) / len(d):.3f} | " + " | ".join(f"{d[n]:.3f}" for n in names) + " |"
                      for label, d in rows])


def _chance(examples: list[Example]) -> float:
    """Accuracy of a uniform random guess: mean 1/#options (0 for free-form answers)."""
    return sum(1 / len(e.options) if e.options else 0.0 for e in examples) / len(examples)


def save_tiny_base(model: nn.Module, path: str) -> None:
    """The tiny model without its LoRA layers, in Hugging Face's format (config.json + model.safetensors)."""
    base = type(model)._from_config(model.config, attn_implementation="eager")
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)
    base.save_pretrained(path)


def write_peft(args, model: nn.Module, results: dict) -> None:
    """--export-peft DIR: the Potara adapter of each client (A/B-space merge with its lam) and the federated
    adapter, recomputed from the run's checkpoint; for --model tiny also the base model in HF format."""
    ck = torch.load(os.path.join(args.out, "checkpoint.pt"), map_location="cpu", weights_only=True)
    G = ck["fedit"]["global_state"]
    adapters = {"federated": G}
    for name in results["clients"]:
        adapters[name] = merge_adapters(G, ck["local"][name], results["per_client"][name]["potara"]["lam"], "ab")
    base = args.model
    if args.model == "tiny":
        base = os.path.abspath(os.path.join(args.export_peft, "base_model"))
        save_tiny_base(model, base)
    scaling = {m["scaling"] for m in lora_meta(model)["layers"].values()}.pop()
    export_peft(args.export_peft, adapters, scaling, list(args.targets), base)
    print(f"peft adapters of {len(adapters)} models written to {args.export_peft}/ (base model: {base})")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the checkpoint is written after every round and client: nothing is lost
        raise SystemExit("interrupted: rerun the same command with --resume to continue") from None
