"""run_llm.py's --model and --targets, checked before any download, pre-training or training: a mistyped name or
target is one line naming it, in seconds, never a late or misleading failure.

    problem = model_problem("meta-llama/Llama-3.2-3B")    # None, or why it cannot be loaded (one line)
    problem = targets_problem(tiny_llama_linears(3), ["q_proj", "v_proj"])     # the tiny model: no torch
    problem = targets_problem(hf_linears(name, "eager"), targets)            # a --model NAME: its config only

--model: "tiny" is built here; a folder must hold config.json and the weights; a Hugging Face name must be in the
local cache, or (unless HF_HUB_OFFLINE is set) on the Hub: one request, no retries, with the Hub's own log lines
silenced so that this module's line is the first one. --targets: each target must name an nn.Linear of the
architecture (lora.add_lora's rule: the module's dotted name equals the target or ends with "." + target); the
tiny model's are listed from its configuration without building it, a Hugging Face model's are read from a copy
built from its config.json on the meta device (no weight is read or downloaded).

This module imports neither torch nor transformers at its top: the scripts call it before torch loads.
"""

from __future__ import annotations

import logging
import os
import warnings

# The files transformers reads a causal LM's weights from (safetensors or PyTorch, whole or sharded).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
LOCAL_MODEL = "pass a local folder with config.json, the weights and the tokenizer"
MAX_LISTED = 12  # module names an error lists


# ----------------------------------------------------------------------------- --model
def model_problem(name: str) -> str | None:
    """Why --model `name` cannot be loaded, as "--model <name>: ..." (None if it can, or if only the download
    itself can tell): a folder without config.json or weights, a path that does not exist, a name that is no
    Hugging Face name, or a name neither cached nor on the Hub (offline: not cached)."""
    if name == "tiny":
        return None
    if os.path.isdir(name):
        if not os.path.isfile(os.path.join(name, "config.json")):
            return f"--model {name}: a folder without config.json, so no Hugging Face model: {LOCAL_MODEL}"
        if not any(os.path.isfile(os.path.join(name, w)) for w in WEIGHT_FILES):
            return f"--model {name}: no weights in the folder (none of {', '.join(WEIGHT_FILES)})"
        return None
    if os.path.lexists(name):
        return f"--model {name}: not a folder ({LOCAL_MODEL})"
    try:
        from huggingface_hub import constants, try_to_load_from_cache
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError as e:
        return f"--model {name} needs the 'llm' extra (pip install '.[llm]'): {e}"
    try:
        validate_repo_id(name)
    except HFValidationError:
        return f"--model {name}: no such folder, and not a Hugging Face model name (<owner>/<name>)"
    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return None
    if _offline(constants):
        return (
            f"--model {name}: not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE}), and "
            f"HF_HUB_OFFLINE is set: {LOCAL_MODEL}, or download it first"
        )
    return _hub_problem(name, constants.HF_HUB_CACHE)


def _offline(constants) -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) set: what the Hugging Face libraries read at their import, or the
    environment now."""
    env = (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or "").upper()
    return bool(constants.HF_HUB_OFFLINE) or env in ("1", "ON", "YES", "TRUE")


def _hub_problem(name: str, cache: str) -> str | None:
    """One HEAD request for the model's config.json on the Hub (no retries; its log lines silenced): why it cannot
    be downloaded, or None."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    hub_log = logging.getLogger("huggingface_hub")
    level, hub_log.level = hub_log.level, logging.CRITICAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            url = hf_hub_url(name, "config.json")
            try:
                get_hf_file_metadata(url, timeout=10, retry_on_errors=False)
            except TypeError:  # a huggingface_hub without retry_on_errors: it never retried
                get_hf_file_metadata(url, timeout=10)
    except GatedRepoError:
        return f"--model {name}: a gated model: accept its terms on huggingface.co and log in (hf auth login)"
    except RepositoryNotFoundError:
        return (
            f"--model {name}: no such model on the Hugging Face Hub and no such local folder (a private model needs "
            "hf auth login)"
        )
    except EntryNotFoundError:
        return f"--model {name}: its Hugging Face repository has no config.json: not a transformers model"
    except Exception as e:  # noqa: BLE001 -- no network, DNS, TLS, timeout, proxy: the Hub cannot be reached
        if getattr(getattr(e, "response", None), "status_code", None) in (401, 403, 404):  # an HTTP error of its own
            return (
                f"--model {name}: no such model on the Hugging Face Hub and no such local folder (HTTP "
                f"{e.response.status_code}; a private or gated model needs hf auth login)"
            )
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return (
            f"--model {name}: not a local folder, not in the Hugging Face cache ({cache}), and the Hub cannot be "
            f"reached ({type(e).__name__}{': ' + first if first else ''}); offline, {LOCAL_MODEL}"
        )
    finally:
        hub_log.level = level
    return None


# ----------------------------------------------------------------------------- --targets
def tiny_llama_linears(num_hidden_layers: int) -> list[str]:
    """The nn.Linear modules of the tiny Llama (lm.tiny_llama: transformers' LlamaForCausalLM) by dotted name,
    from its configuration alone (tests/test_model_check.py holds them equal to the built model's)."""
    per_layer = [f"self_attn.{p}_proj" for p in "qkvo"] + [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    return [f"model.layers.{i}.{m}" for i in range(num_hidden_layers) for m in per_layer] + ["lm_head"]


def hf_linears(name: str, attn: str) -> list[str]:
    """The modules LoRA can wrap (lora.LORA_LAYERS' types) of --model `name`, by dotted name: the model built from
    its config.json alone on the meta device (no weight read, none downloaded). ValueError (one line) when the
    config cannot be read or the model not built from it (e.g. an unknown --attn)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora import LORA_LAYERS

    try:
        config = AutoConfig.from_pretrained(name)  # trust_remote_code stays False: no code from the repository
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except Exception as e:  # noqa: BLE001 -- OSError, ValueError, KeyError (an unknown model type), ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f"--model {name}: could not build it from its config.json ({type(e).__name__}: {first})"
        ) from None
    return [n for n, m in model.named_modules() if isinstance(m, tuple(LORA_LAYERS))]


def targets_problem(linears: list[str], targets) -> str | None:
    """Why --targets cannot be used on a model whose LoRA-wrappable modules are `linears` (dotted names), as
    "--targets <t>: ..." for the first target that names none of them (lora.add_lora's rule: the name equals the
    target or ends with "." + target), listing the distinct last parts of the names, what --targets takes."""
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in linears):
            names = sorted({n.rsplit(".", 1)[-1] for n in linears})
            listed = ", ".join(names[:MAX_LISTED]) + (
                f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
            )
            return (
                f"--targets {t}: no nn.Linear module of the model is named {t} or ends in .{t} (LoRA wraps "
                f"nn.Linear layers); its nn.Linear modules end in {listed}"
            )
    return None
