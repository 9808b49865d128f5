"""Potara on a causal language model: one instruction task per client (FLAN-style), LoRA on attention.

    python run_llm.py --model tiny --data synthetic              # offline, CPU (work and time below)
    python run_llm.py --model meta-llama/Llama-3.2-3B --data data/flan   # one GPU, bf16 autocast
    python run_llm.py --model tiny --data synthetic --resume     # continue an interrupted run (same arguments)
    python run_llm.py ... --export-peft adapters/                # each client's Potara adapter in peft's format

Pipeline: --data DIR (one <task>.jsonl per client, format in llm_data.py) or the synthetic tasks ->
per client a train / val / test split, encoded as input_ids + labels (-100 except the answer tokens)
-> --model: any causal LM AutoModelForCausalLM loads, or "tiny", a small Llama built here from a config
and pre-trained on the synthetic tasks' public corpus (cached in --cache-dir) -> lora.add_lora on the
attention projections (--targets, default q_proj v_proj) -> pipeline.run_experiment, the same
pipeline as run_cifar.py: FedIT, FedSA-LoRA, local adapters, Potara and every baseline, scored on each
client's test split (multiple choice: the option with the largest summed log-likelihood; free-form:
exact match of greedy decoding) -> --out DIR: results.json, results.md, checkpoint.pt, plots; the table
also shows chance and the pre-trained model with no adapter, what the learned methods must beat.

Training loss and Potara's Fisher are token-level over the answer tokens only (labels -100 elsewhere,
potara.causal_lm_likelihood). Per-sample gradients (torch.func.vmap over grad with functional_call) run
on the transformers model; eager attention avoids torch.func's slow fallback for SDPA (--attn).
--export-peft DIR writes each client's Potara adapter as peft's adapter_config.json +
adapter_model.safetensors (loadable with peft.PeftModel.from_pretrained or a multi-LoRA server).

--model tiny's work: pre-training the tiny Llama once (2500 steps of 32 sequences, cached in --cache-dir), then
per client (8 synthetic tasks) FedIT 20 rounds x 5 local steps, a FedSA-LoRA run of the same size, 100 local and
25 fine-tuning steps, and scoring every method on 100 test examples. On this project's 2-core CPU, shared with
other jobs, the run took 109 s with the tiny model cached, and the pre-training 95-441 s, depending on the
load (docs/language-models.md); a first run has taken 18 min on a busier machine (issue 19).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import time
from typing import TYPE_CHECKING

from files import UnsafeFile, remove_leftovers
from potara_harness import cli
from potara_harness.config import LM_PRESETS

if TYPE_CHECKING:  # annotations only
    import torch
    import torch.nn as nn

    from potara_harness.llm_data import Tokenizer

# The command line is parsed and checked before torch loads (--help and a bad option answer at once): this module
# imports torch, transformers and everything that uses them inside the functions that run after the checks.


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=cli.HelpFormatter,
                                 epilog="Options showing two values take the first for --model tiny, the second for any "
                                        "other model (LM_PRESETS in potara_harness/config.py).")
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
    cli.add_experiment_options(ap)  # training, Potara, evaluation, run control: shared with run_cifar.py
    cli.describe_presets(ap, {"--model tiny": LM_PRESETS["tiny"], "other models": LM_PRESETS["hf"]})
    return ap


def resolve_args(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the preset, and reject every impossible value with a one-line error."""
    args = ap.parse_args(argv)
    p = dict(LM_PRESETS["tiny" if args.model == "tiny" else "hf"])
    cli.fill_from_preset(args, p)
    p.update(pretrain_steps=args.pretrain_steps, max_len=args.max_len)
    cli.require_positive(ap, args, ("train", "val", "test", "max_len", "max_new_tokens", "eval_batch_size",
                                    "synthetic_examples"))
    cli.check_sizes(ap, args, ("synthetic_examples", "max_len", "max_new_tokens"))
    if args.clients < 0:
        ap.error(f"--clients must be >= 0, got {args.clients}")
    cli.check_experiment_options(ap, args)
    if args.model == "tiny" and args.pretrain_steps < 1:
        ap.error("--model tiny is pre-trained here: --pretrain-steps must be >= 1")
    if args.export_peft and any(t in ("self_attn", "attention") for t in args.targets):
        ap.error("--export-peft needs LoRA on nn.Linear projections (e.g. --targets q_proj v_proj)")
    tag = lambda s: os.path.basename(os.path.normpath(s)) or "model"
    args.out = args.out or os.path.join("runs", f"llm-{tag(args.model)}-{tag(args.data)}-s{args.seed}")
    rw = os.W_OK | os.X_OK
    cli.check_dirs(ap, ("--cache-dir", args.cache_dir, rw), ("--export-peft", args.export_peft, rw))
    cli.prepare_out_dir(ap, args.out)
    return args, p


def main(argv=None) -> dict:
    ap = build_parser()
    args, p = resolve_args(ap, argv)
    with cli.one_line_errors(), cli.out_dir_lock(args.out):  # bad data / checkpoint: one line, exit 2
        return run(ap, args, p, cli.command_line("run_llm.py", argv))


def load_checked_tasks(ap: argparse.ArgumentParser, args, p: dict) -> tuple[dict, Tokenizer]:
    """The tasks and the tokenizer, with every data check done before a model is loaded or pre-trained:
    enough examples per task, every answer fits --max-len (and the tiny model's public corpus too), task
    names that --export-peft can write."""
    from potara_harness.llm_data import ByteTokenizer, check_fits, read_task_dir, split_tasks
    from potara_harness.llm_tasks import public_corpus, synthetic_tasks
    from potara_harness.lm import load_hf_tokenizer

    tasks = (synthetic_tasks(args.synthetic_examples, seed=1234) if args.data == "synthetic"
             else read_task_dir(args.data))
    if args.clients:
        if args.clients > len(tasks):
            ap.error(f"--clients {args.clients}: the data has only {len(tasks)} tasks")
        tasks = dict(list(tasks.items())[:args.clients])
    if args.clients_per_round > len(tasks):
        ap.error(f"--clients-per-round must be in [0, {len(tasks)}], got {args.clients_per_round}")
    if args.export_peft:
        check_export_targets(ap, args, tasks)
    chosen = split_tasks(tasks, (args.train, args.val, args.test), args.seed)
    tok: Tokenizer = ByteTokenizer() if args.model == "tiny" else load_hf_tokenizer(args.model)
    check_fits({name: [e for part in parts for e in part] for name, parts in chosen.items()}, tok, args.max_len)
    if args.model == "tiny":  # the pre-training corpus is encoded at --max-len too; its answers are a fixed set
        check_fits({"the public pre-training corpus": public_corpus(2000, random.Random(0))}, tok, p["max_len"])
    return tasks, tok


def data_source(args, tasks: dict) -> str:
    """What the clients' tasks are, for results.md and results.json."""
    names = ", ".join(tasks)
    if args.data == "synthetic":
        return (f"SYNTHETIC TASKS (not FLAN): llm_tasks.py's generated tasks, {args.synthetic_examples} examples "
                f"each: {names}")
    return f"tasks read from {args.data}: {names}"


def run(ap: argparse.ArgumentParser, args, p: dict, command: str) -> dict:
    """The run, once the command line is checked: torch, the model and the pipeline load here."""
    device = cli.start_torch(args)
    import torch

    from fisher import causal_lm_likelihood
    from lora import add_lora
    from potara_harness.lm import Scorer, build_splits, chance, lm_loss, load_hf_model, pretrain_tiny, tiny_llama
    from potara_harness.pipeline import run_experiment
    from potara_harness.report import markdown_table, results_header, write_text

    tasks, tok = load_checked_tasks(ap, args, p)
    if args.model == "tiny":
        torch.manual_seed(0)
        model = tiny_llama(tok.vocab_size, max_position_embeddings=max(128, args.max_len))
        model_info = pretrain_tiny(model, tok, p, 0, args.cache_dir, device, args.progress)
    else:
        model, model_info = load_hf_model(args.model, args.attn), {"model": args.model}
    scorer = Scorer(tok, args.max_new_tokens, args.eval_batch_size)
    splits = build_splits(tasks, tok, (args.train, args.val, args.test), args.max_len, args.seed, scorer)
    model.to(device).eval()
    chance_acc = {s.name: chance(tasks[s.name]) for s in splits}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        base = {s.name: scorer(model, s.test_inputs, s.test_targets) for s in splits}
    torch.manual_seed(args.seed)  # phi_0, the initial adapter every client and the server share
    try:
        add_lora(model, args.targets, r=args.rank, alpha=args.lora_alpha)
    except ValueError as e:
        ap.error(f"--targets: {e}")
    model.to(device)
    config = {"args": {k: v for k, v in vars(args).items() if k not in ("progress", "resume", "threads", "export_peft")},
              "data_source": data_source(args, tasks), "command": command,
              "model": model_info, "device": device.type, "torch": torch.__version__,
              "reference": {"chance": chance_acc, "pretrained_no_adapter": base},
              "tasks": {s.name: {"examples": len(tasks[s.name]), "multiple_choice": tasks[s.name][0].options is not None}
                        for s in splits}}
    t0, adapters = time.time(), {}
    results = run_experiment(model, splits, cli.config_from_args(args), args.out, evaluate=scorer, loss_fn=lm_loss,
                             likelihood=causal_lm_likelihood, resume=args.resume, config=config,
                             progress=args.progress, autocast_dtype=cli.autocast_dtype(device), adapters=adapters)
    table = results_header(results) + markdown_table(results) + "\n\n" + reference_table(results)
    write_text(os.path.join(args.out, "results.md"), table + "\n")
    if args.export_peft:
        write_peft(args, model, adapters)
    print(table)
    print(f"\n{time.time() - t0:.0f}s on {device} ({args.threads} threads); results in {args.out}/results.json")
    return results


def reference_table(results: dict) -> str:
    """What the methods are measured against: a uniform guess, and the pre-trained model with no adapter."""
    names, ref = results["clients"], results["config"]["reference"]
    rows = [("Chance (uniform guess)", ref["chance"]), ("Pre-trained model, no adapter", ref["pretrained_no_adapter"])]
    return "\n".join(["| reference | mean acc | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)] +
                     [f"| {label} | {sum(d.values()) / len(d):.3f} | " + " | ".join(f"{d[n]:.3f}" for n in names) + " |"
                      for label, d in rows])


EXPORT_RESERVED = ("federated", "base_model")  # --export-peft folders that are not a client's
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what export_peft writes in a folder
BASE_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")  # what save_tiny_base writes


def export_target_problem(folder: str, may_hold) -> str | None:
    """Why the export must not replace `folder` (None if absent or a folder an export wrote: a real folder
    holding only files named in may_hold). The export replaces only what it wrote: never a link, a file,
    or a folder with anything else in it (a task named like a user's folder, or like the run's checkpoint)."""
    try:
        st = os.lstat(folder)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISDIR(st.st_mode):
        return "is a file, not a folder an export wrote"
    other = sorted(set(os.listdir(folder)) - set(may_hold))
    return f"holds {other[0][:60]!a}, which no export writes" if other else None


def check_export_targets(ap: argparse.ArgumentParser, args, tasks: dict) -> None:
    """Before any work: every folder --export-peft will write (one per task, federated, base_model) is absent
    or an earlier export's; no task takes the name of a reserved folder or, when --export-peft is --out, of one
    of the run's own files (a task file checkpoint.pt.jsonl would turn the checkpoint into an adapter folder)."""
    reserved = sorted(set(tasks) & set(EXPORT_RESERVED))
    if reserved:
        ap.error(f"--export-peft: a task named {reserved[0]!r} would share a folder with the {reserved[0]} export: "
                 "rename its .jsonl file")
    if os.path.realpath(args.export_peft) == os.path.realpath(args.out):
        clash = sorted(set(tasks) & set(cli.OUTPUT_FILES + (cli.LOCK_FILE,)))
        if clash:
            ap.error(f"--export-peft is --out: a task named {clash[0]!r} would replace the run's {clash[0]}: rename "
                     "its .jsonl file or choose another --export-peft")
    for name in [*tasks, *EXPORT_RESERVED]:
        problem = export_target_problem(os.path.join(args.export_peft, name),
                                        BASE_MODEL_FILES if name == "base_model" else ADAPTER_FILES)
        if problem:
            ap.error(f"--export-peft {args.export_peft}: {name} in it {problem}: move it away or choose another "
                     "--export-peft (an export replaces only the folders it wrote)")


def save_tiny_base(model: nn.Module, path: str) -> None:
    """The tiny model without its LoRA layers, in Hugging Face's format (config.json + model.safetensors)."""
    base = type(model)._from_config(model.config, attn_implementation="eager")
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)
    base.save_pretrained(path)


def write_peft(args, model: nn.Module, adapters: dict) -> None:
    """--export-peft DIR: the adapters the run ended with (pipeline.run_experiment's `adapters`: each client's
    Potara adapter, the A/B-space merge at its lam, and the federated one); for --model tiny also the base
    model in HF format."""
    from lora import lora_meta

    base = args.model
    if args.model == "tiny":
        base = os.path.abspath(os.path.join(args.export_peft, "base_model"))
        write_folder_atomically(base, lambda folder: save_tiny_base(model, folder))
    scaling = {m["scaling"] for m in lora_meta(model)["layers"].values()}.pop()
    export_peft(args.export_peft, adapters, scaling, list(args.targets), base)
    print(f"peft adapters of {len(adapters)} models written to {args.export_peft}/ (base model: {base})")


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

        def write(folder: str) -> None:
            os.makedirs(folder)
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                json.dump(config, f, indent=2)
            save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
        write_folder_atomically(os.path.join(out_dir, name), write)


def write_folder_atomically(folder: str, write) -> None:
    """write(tmp) creates and fills a new folder beside `folder` (files fsynced), which then takes its place
    by two renames: a crash leaves the old folder or the new one complete (plus a hidden .<name>.partial-<pid>
    or .<name>.old-<pid> folder, removed by the next export of that name once its pid is gone:
    files.remove_leftovers), never a half-written one. An existing `folder` is replaced only if an export wrote
    it (export_target_problem: a real folder holding only files the new one holds), else files.UnsafeFile."""
    parent, name = os.path.split(os.path.abspath(folder))
    tmp, old = (os.path.join(parent, f".{name}.{what}-{os.getpid()}") for what in ("partial", "old"))
    os.makedirs(parent, exist_ok=True)
    remove_leftovers(parent, name)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        for f in os.listdir(tmp):
            if os.path.isfile(os.path.join(tmp, f)):
                with open(os.path.join(tmp, f), "rb") as handle:
                    os.fsync(handle.fileno())
        problem = export_target_problem(folder, os.listdir(tmp))
        if problem:
            raise UnsafeFile(f"{folder}: {problem}: an export replaces only the folders it wrote (move it away)")
        if os.path.lexists(folder):
            os.replace(folder, old)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


if __name__ == "__main__":
    cli.run_main(main)
