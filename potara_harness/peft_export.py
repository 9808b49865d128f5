"""Adapters in peft's format (adapter_config.json + adapter_model.safetensors), loadable by
peft.PeftModel.from_pretrained(base, folder) or a multi-LoRA server: what run_llm.py --export-peft writes and
what a Flower device of the language experiment keeps (potara_flower/client_app.py). Needs the `llm` extra
(safetensors, transformers).

    export_peft("adapters", {"sst2": state}, scaling=2.0, targets=["q_proj", "v_proj"], base_model="/abs/base")
    save_tiny_base(model, "adapters/base_model")   # the tiny Llama without its LoRA layers, in HF's format

Every folder is written beside its place and renamed into it (write_folder_atomically): a crash leaves the old
folder or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import TYPE_CHECKING

from potara_guards.safe_files import UnsafeFile, WriteError, folder_problem, remove_leftovers, write_target_problem

if TYPE_CHECKING:  # annotations only: run_llm.py checks its export targets before torch loads
    import torch
    import torch.nn as nn

EXPORT_RESERVED = ("federated", "base_model")  # export folders that are not a client's
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # what export_peft writes in a folder
BASE_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors")  # what save_tiny_base writes


def export_target_problem(folder: str, may_hold) -> str | None:
    """Why the export must not replace `folder` (None if absent or a folder an export wrote: a real folder this
    user can write, holding only regular files of one name, named in may_hold). The export replaces only what it
    wrote: never a link, a file, or a folder with anything else in it (a task named like a user's folder, or like
    the run's checkpoint; a link or special file planted in an earlier export)."""
    problem = folder_problem(folder)  # a symbolic link, not a directory, or one this user cannot write
    if problem or not os.path.lexists(folder):
        return problem and problem.split(": ")[0]  # the caller says what to do
    entries = sorted(os.listdir(folder))
    other = [e for e in entries if e not in may_hold]
    if other:
        return f"holds {other[0][:60]!a}, which no export writes"
    for entry in entries:
        problem = write_target_problem(os.path.join(folder, entry))
        if problem:
            return f"holds {entry}, which {problem.split(' (')[0]}"
    return None


def save_tiny_base(model: nn.Module, path: str) -> None:
    """The tiny model without its LoRA layers, in Hugging Face's format (config.json + model.safetensors)."""
    base = type(model)._from_config(model.config, attn_implementation="eager")
    state = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    base.load_state_dict(state)
    base.save_pretrained(path)


def export_with_base(
    out_dir: str,
    model: nn.Module,
    adapters: dict[str, dict[str, torch.Tensor]],
    targets: list[str],
    base_model: str | None,
) -> str:
    """export_peft of `adapters` (LoRA of `model`, whose scaling they share), naming base_model as their base; with
    base_model None the model is the tiny Llama, which no hub holds: it is written to out_dir/base_model in HF's
    format and named by its absolute path. Returns the base model's name or path."""
    from lora import lora_meta

    if base_model is None:
        base_model = os.path.abspath(os.path.join(out_dir, "base_model"))
        write_folder_atomically(base_model, lambda folder: save_tiny_base(model, folder))
    scaling = {m["scaling"] for m in lora_meta(model)["layers"].values()}.pop()
    export_peft(out_dir, adapters, scaling, targets, base_model)
    return base_model


def export_peft(
    out_dir: str, adapters: dict[str, dict[str, torch.Tensor]], scaling: float, targets: list[str], base_model: str
) -> None:
    """Write each adapter as a peft LoRA adapter: out_dir/<name>/adapter_config.json + adapter_model.safetensors.
    Keys: "<module>.lora_A" -> "base_model.model.<module>.lora_A.weight" (peft's layout); peft computes
    scaling = lora_alpha / r, so lora_alpha is written as scaling * rank (a rank-2r "delta" merge keeps the
    scaling of its rank-r parents)."""
    from safetensors.torch import save_file

    for name, state in adapters.items():
        other = [k for k in state if not k.endswith((".lora_A", ".lora_B"))]
        if other:
            raise ValueError(
                f"export_peft: only lora_A/lora_B tensors of nn.Linear layers can be exported, got {other[:3]}"
            )
        ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A")}
        if len(ranks) != 1:
            raise ValueError(f"export_peft: adapter {name} mixes ranks {sorted(ranks)}")
        rank = ranks.pop()
        alpha = scaling * rank
        config = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "r": rank,
            "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "use_dora": False,
            "init_lora_weights": True,
            "modules_to_save": None,
            "rank_pattern": {},
            "alpha_pattern": {},
        }
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
    safe_files.remove_leftovers), never a half-written one. An existing `folder` is replaced only if an export wrote
    it (export_target_problem: a real folder holding only files the new one holds), else safe_files.UnsafeFile;
    any other failure on the way is a safe_files.WriteError naming `folder`, the previous folder intact."""
    parent, name = os.path.split(os.path.abspath(folder))
    tmp, old = (os.path.join(parent, f".{name}.{what}-{os.getpid()}") for what in ("partial", "old"))
    try:
        os.makedirs(parent, exist_ok=True)
        if not os.access(parent, os.W_OK | os.X_OK):
            raise UnsafeFile(f"{parent}: is a folder this user cannot write: make it writable or choose another")
        remove_leftovers(parent, name)
        clear(tmp)  # never followed: a link planted under this pid's name is removed, not written through
        clear(old)
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
            clear(tmp)
            clear(old)
    except UnsafeFile:
        raise
    except OSError as e:  # no space, a file-size limit, no permission: one line naming the folder asked for
        raise WriteError(f"cannot write {folder} ({e.strerror or type(e).__name__})") from None


def clear(path: str) -> None:
    """Remove what is at `path` without following it: a link or file is unlinked (what it points to stays), a
    folder removed with its content (shutil.rmtree, which never descends into a link)."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)
