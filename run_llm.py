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
25 fine-tuning steps, and scoring every method on 100 test examples (its measured time:
docs/language-models.md).
"""

from __future__ import annotations

import argparse
import os
import random
import time
from typing import TYPE_CHECKING

from potara_harness import cli, model_check, run_folder
from potara_harness.config import BOUNDS, LM_PRESETS, SYNTHETIC_TASKS_SEED, TINY_LLAMA

if TYPE_CHECKING:  # annotations only
    import torch.nn as nn

    from potara_harness.llm_data import Tokenizer

# The command line is parsed and checked before torch loads (--help and a bad option answer at once): this module
# imports torch, transformers and everything that uses them inside the functions that run after the checks.


# ----------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Options showing two values take the first for --model tiny, the second for any "
        "other model (LM_PRESETS in potara_harness/config.py).",
    )
    a = ap.add_argument
    a(
        "--model",
        default="tiny",
        help="'tiny' (a small Llama built and pre-trained here) or any name/path "
        "AutoModelForCausalLM loads, e.g. meta-llama/Llama-3.2-3B or Qwen/Qwen3-1.7B",
    )
    a(
        "--data",
        default="synthetic",
        help="'synthetic' (offline tasks, one per client) or a folder of <task>.jsonl files",
    )
    a("--out", default=None, help="output folder (default: runs/llm-<model>-<data>-s<seed>)")
    a("--cache-dir", default=os.path.join("data", "llm"), help="where the pre-trained tiny model is cached")
    a("--targets", nargs="+", default=["q_proj", "v_proj"], help="module names LoRA wraps (peft-style suffix match)")
    a("--clients", type=int, help="use the first K tasks only (default: every task)")
    for split in ("train", "val", "test"):
        a(f"--{split}", type=int, help=f"{split} examples per client")
    a("--synthetic-examples", type=int, default=600, help="examples generated per synthetic task")
    a("--max-len", type=int, help="tokens per example (prompt cut from the left to fit)")
    a("--max-new-tokens", type=int, help="greedy decoding budget for free-form answers")
    a("--pretrain-steps", type=int, help="tiny model: pre-training steps on the public corpus")
    a("--eval-batch-size", type=int, default=64, help="sequences per forward pass when scoring options")
    a("--attn", default="eager", help="attention implementation of a --model NAME (eager works under torch.func.vmap)")
    a(
        "--export-peft",
        metavar="DIR",
        help="also write each client's Potara adapter (and the federated one) in peft's format",
    )
    cli.add_experiment_options(ap)  # training, Potara, evaluation, run control: shared with run_cifar.py
    cli.describe_presets(ap, {"--model tiny": LM_PRESETS["tiny"], "other models": LM_PRESETS["hf"]})
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


def resolve_args(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the preset, and reject every impossible value with a one-line error, before torch
    loads: every number in its config.BOUNDS range, the rules between options, --model (a folder with config.json
    and weights, or a name cached or on the Hub: model_check.model_problem), the tiny model's --targets (against
    its architecture), the synthetic tasks' size, the --data, --cache-dir, --export-peft and --out folders."""
    args = ap.parse_args(argv)
    cli.check_bounds(ap, args)  # every number in config.BOUNDS' range, before the preset fills the rest
    p = dict(LM_PRESETS["tiny" if args.model == "tiny" else "hf"])
    cli.fill_from_preset(args, p)
    p.update(pretrain_steps=args.pretrain_steps, max_len=args.max_len)
    cli.check_experiment_options(ap, args)  # the filled numbers in their ranges too, then the rules between options
    if args.model == "tiny":  # its modules are known from its configuration: no need to build it
        linears = model_check.tiny_llama_linears(TINY_LLAMA["num_hidden_layers"])
        problem = model_check.targets_problem(linears, args.targets) or (
            "--model tiny is pre-trained here: --pretrain-steps must be >= 1" if args.pretrain_steps < 1 else None
        )
    else:  # a folder or a Hugging Face name; its --targets once torch loads (load_checked_tasks)
        problem = model_check.model_problem(args.model)
    if problem:
        ap.error(problem)
    if args.export_peft and any(t in ("self_attn", "attention") for t in args.targets):
        ap.error("--export-peft needs LoRA on nn.Linear projections (e.g. --targets q_proj v_proj)")
    if args.data == "synthetic":
        if args.train + args.val + args.test > args.synthetic_examples:  # each task: that many distinct prompts
            ap.error(
                f"--data synthetic: each task holds --synthetic-examples {args.synthetic_examples} examples, fewer "
                f"than --train {args.train} + --val {args.val} + --test {args.test}: lower them (or raise "
                f"--synthetic-examples, at most {BOUNDS['synthetic_examples'].hi:,})"
            )
    elif not os.path.isdir(args.data):
        ap.error(f"--data {args.data}: no such folder (one <task>.jsonl file per client), and not 'synthetic'")
    tag = lambda s: os.path.basename(os.path.normpath(s)) or "model"
    args.out = args.out or os.path.join("runs", f"llm-{tag(args.model)}-{tag(args.data)}-s{args.seed}")
    rw = os.W_OK | os.X_OK
    run_folder.check_dirs(ap, ("--cache-dir", args.cache_dir, rw), ("--export-peft", args.export_peft, rw))
    run_folder.prepare_out_dir(ap, args.out)
    return args, p


def main(argv=None) -> dict:
    ap = build_parser()
    args, p = resolve_args(ap, argv)
    with cli.one_line_errors(), run_folder.out_dir_lock(args.out):  # bad data / checkpoint: one line, exit 2
        return run(ap, args, p, cli.command_line("run_llm.py", argv))


def load_checked_tasks(ap: argparse.ArgumentParser, args, p: dict) -> tuple[dict, Tokenizer]:
    """The tasks and the tokenizer, with every data check done before a model is loaded or pre-trained:
    enough examples per task, task names that --export-peft can write, a --model NAME's --targets (against the
    architecture its config.json describes), every answer fits --max-len (and the tiny model's public corpus
    too)."""
    from potara_harness.llm_data import ByteTokenizer, check_fits, read_task_dir, split_tasks
    from potara_harness.llm_tasks import public_corpus, synthetic_tasks
    from potara_harness.lm import load_hf_tokenizer

    tasks = (
        synthetic_tasks(args.synthetic_examples, seed=SYNTHETIC_TASKS_SEED)
        if args.data == "synthetic"
        else read_task_dir(args.data)
    )
    if args.clients:
        if args.clients > len(tasks):
            ap.error(f"--clients {args.clients}: the data has only {len(tasks)} tasks")
        tasks = dict(list(tasks.items())[: args.clients])
    if args.clients_per_round > len(tasks):
        ap.error(f"--clients-per-round must be <= the {len(tasks)} clients (tasks), got {args.clients_per_round}")
    if args.export_peft:
        check_export_targets(ap, args, tasks)
    chosen = split_tasks(tasks, (args.train, args.val, args.test), args.seed)
    if args.model != "tiny":  # --targets against its architecture, before its tokenizer or weights are fetched
        try:
            problem = model_check.targets_problem(model_check.hf_linears(args.model, args.attn), args.targets)
        except ValueError as e:
            problem = str(e)
        if problem:
            ap.error(problem)
    tok: Tokenizer = ByteTokenizer() if args.model == "tiny" else load_hf_tokenizer(args.model)
    check_fits({name: [e for part in parts for e in part] for name, parts in chosen.items()}, tok, args.max_len)
    if args.model == "tiny":  # the pre-training corpus is encoded at --max-len too; its answers are a fixed set
        check_fits({"the public pre-training corpus": public_corpus(2000, random.Random(0))}, tok, p["max_len"])
    return tasks, tok


def data_source(args, tasks: dict) -> str:
    """What the clients' tasks are, for results.md and results.json."""
    names = ", ".join(tasks)
    if args.data == "synthetic":
        return (
            f"SYNTHETIC TASKS (not FLAN): llm_tasks.py's generated tasks, {args.synthetic_examples} examples "
            f"each: {names}"
        )
    return f"tasks read from {args.data}: {names}"


def run(ap: argparse.ArgumentParser, args, p: dict, command: str) -> dict:
    """The run, once the command line is checked: torch, the model and the pipeline load here."""
    device = cli.start_torch(args)
    cli.check_resume(args)  # the checkpoint's training settings, before the tasks are read or a model loaded
    import torch

    from potara import causal_lm_likelihood
    from potara_harness.lm import (
        Scorer,
        add_language_lora,
        build_splits,
        chance,
        lm_loss,
        load_hf_model,
        pretrain_tiny,
        tiny_model,
    )
    from potara_harness.pipeline import run_experiment
    from potara_harness.report import markdown_table, results_header, write_text

    tasks, tok = load_checked_tasks(ap, args, p)
    if args.model == "tiny":
        torch.manual_seed(0)  # the tiny model's initial weights, before pre-training
        model = tiny_model(args.max_len)
        model_info = pretrain_tiny(model, tok, p, 0, args.cache_dir, device, args.progress)
    else:
        model, model_info = load_hf_model(args.model, args.attn), {"model": args.model}
    scorer = Scorer(tok, args.max_new_tokens, args.eval_batch_size)
    splits = build_splits(tasks, tok, (args.train, args.val, args.test), args.max_len, args.seed, scorer)
    model.to(device).eval()
    chance_acc = {s.name: chance(tasks[s.name]) for s in splits}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        base = {s.name: scorer(model, s.test_inputs, s.test_targets) for s in splits}
    try:  # phi_0, the initial adapter every client and the server share
        add_language_lora(model, args.targets, args.rank, args.lora_alpha, args.seed)
    except ValueError as e:
        ap.error(f"--targets: {e}")
    model.to(device)
    config = {
        "args": {k: v for k, v in vars(args).items() if k not in ("progress", "resume", "threads", "export_peft")},
        "data_source": data_source(args, tasks),
        "command": command,
        "model": model_info,
        "device": device.type,
        "torch": torch.__version__,
        "reference": {"chance": chance_acc, "pretrained_no_adapter": base},
        "tasks": {
            s.name: {"examples": len(tasks[s.name]), "multiple_choice": tasks[s.name][0].options is not None}
            for s in splits
        },
    }
    t0, adapters = time.time(), {}
    results = run_experiment(
        model,
        splits,
        cli.config_from_args(args),
        args.out,
        evaluate=scorer,
        loss_fn=lm_loss,
        likelihood=causal_lm_likelihood,
        resume=args.resume,
        config=config,
        progress=args.progress,
        autocast_dtype=cli.autocast_dtype(device),
        adapters=adapters,
    )
    table = results_header(results) + markdown_table(results) + "\n\n" + reference_table(results)
    write_text(os.path.join(args.out, "results.md"), table + "\n")
    if args.export_peft:
        write_peft(args, model, adapters)
    print(table)
    print("\n" + cli.finished(time.time() - t0, device, args.threads, args.out))
    return results


def reference_table(results: dict) -> str:
    """What the methods are measured against: a uniform guess, and the pre-trained model with no adapter."""
    names, ref = results["clients"], results["config"]["reference"]
    rows = [("Chance (uniform guess)", ref["chance"]), ("Pre-trained model, no adapter", ref["pretrained_no_adapter"])]
    return "\n".join(
        ["| reference | mean acc | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
        + [
            f"| {label} | {sum(d.values()) / len(d):.3f} | " + " | ".join(f"{d[n]:.3f}" for n in names) + " |"
            for label, d in rows
        ]
    )


def check_export_targets(ap: argparse.ArgumentParser, args, tasks: dict) -> None:
    """Before any work: every folder --export-peft will write (one per task, federated, base_model) is absent
    or an earlier export's; no task takes the name of a reserved folder or, when --export-peft is --out, of one
    of the run's own files (a task file checkpoint.pt.jsonl would turn the checkpoint into an adapter folder)."""
    from potara_harness.peft_export import ADAPTER_FILES, BASE_MODEL_FILES, EXPORT_RESERVED, export_target_problem

    reserved = sorted(set(tasks) & set(EXPORT_RESERVED))
    if reserved:
        ap.error(
            f"--export-peft: a task named {reserved[0]!r} would share a folder with the {reserved[0]} export: "
            "rename its .jsonl file"
        )
    if os.path.realpath(args.export_peft) == os.path.realpath(args.out):
        clash = sorted(set(tasks) & set(run_folder.OUTPUT_FILES + (run_folder.LOCK_FILE,)))
        if clash:
            ap.error(
                f"--export-peft is --out: a task named {clash[0]!r} would replace the run's {clash[0]}: rename "
                "its .jsonl file or choose another --export-peft"
            )
    for name in [*tasks, *EXPORT_RESERVED]:
        problem = export_target_problem(
            os.path.join(args.export_peft, name), BASE_MODEL_FILES if name == "base_model" else ADAPTER_FILES
        )
        if problem:
            ap.error(
                f"--export-peft {args.export_peft}: {name} in it {problem}: move it away or choose another "
                "--export-peft (an export replaces only the folders it wrote)"
            )


def write_peft(args, model: nn.Module, adapters: dict) -> None:
    """--export-peft DIR: the adapters the run ended with (pipeline.run_experiment's `adapters`: each client's
    Potara adapter, the A/B-space merge at its lam, and the federated one); for --model tiny also the base
    model in HF format."""
    from potara_harness.peft_export import export_with_base

    base = export_with_base(
        args.export_peft, model, adapters, list(args.targets), None if args.model == "tiny" else args.model
    )
    print(f"peft adapters of {len(adapters)} models written to {args.export_peft}/ (base model: {base})")


if __name__ == "__main__":
    cli.run_main(main)
