"""model_check.py: --model and --targets checked before any download or pre-training. The tiny model's modules,
listed from its configuration, are the built model's; a target is refused exactly when lora.add_lora would wrap
nothing for it; a Hugging Face model's modules come from its config.json alone; a name is found in the cache
without the network, and refused offline when it is not there."""

import json

import pytest
import torch.nn as nn

from lora import add_lora
from potara_harness import model_check
from potara_harness.config import TINY_LLAMA

pytest.importorskip("transformers")

from potara_harness.lm import tiny_model  # noqa: E402

TARGETS = ["q_proj", "v_proj", "self_attn.o_proj", "lm_head", "model.layers.0.mlp.up_proj", "foo_proj", "self_attn"]


def test_the_tiny_models_linears_are_the_built_ones():
    """tiny_llama_linears, written from the configuration, against the model transformers builds from it."""
    built = sorted(n for n, m in tiny_model(96).named_modules() if isinstance(m, nn.Linear))
    assert sorted(model_check.tiny_llama_linears(TINY_LLAMA["num_hidden_layers"])) == built
    assert len(built) == 7 * TINY_LLAMA["num_hidden_layers"] + 1  # q, k, v, o, gate, up, down per layer; lm_head


@pytest.mark.parametrize("target", TARGETS)
def test_a_target_is_refused_exactly_when_add_lora_would_wrap_no_linear_for_it(target):
    """lora.add_lora on the real tiny model is the reference: a target it wraps an nn.Linear for passes, one it
    refuses (no module, or no nn.Linear) is one line naming it and listing what --targets takes."""
    model = tiny_model(96)
    try:
        wrapped = add_lora(model, [target], r=2, alpha=4)
    except ValueError:
        wrapped = []
    problem = model_check.targets_problem(model_check.tiny_llama_linears(TINY_LLAMA["num_hidden_layers"]), [target])
    assert (problem is None) == bool(wrapped), (target, problem, wrapped)
    if problem:
        assert problem == (
            f"--targets {target}: no nn.Linear module of the model is named {target} or ends in .{target} (LoRA "
            "wraps nn.Linear layers); its nn.Linear modules end in down_proj, gate_proj, k_proj, lm_head, o_proj, "
            "q_proj, up_proj, v_proj"
        )


def test_the_first_target_that_names_nothing_is_the_one_named():
    linears = model_check.tiny_llama_linears(2)
    assert model_check.targets_problem(linears, ["q_proj", "v_proj"]) is None
    assert model_check.targets_problem(linears, ["q_proj", "qproj", "vproj"]).startswith("--targets qproj: ")
    many = [f"block.{i}.proj{i}" for i in range(20)]  # a long list is cut, saying how many more
    assert model_check.targets_problem(many, ["x"]).endswith(
        "end in proj0, proj1, proj10, proj11, proj12, proj13, proj14, proj15, proj16, proj17, proj18, proj19 and 8 more"
    )


def test_a_hugging_face_models_linears_come_from_its_config_alone(tmp_path):
    """A folder with config.json and no weights at all: the modules are listed (the meta device reads none)."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=50, hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2
    ).save_pretrained(str(tmp_path))
    assert sorted(model_check.hf_linears(str(tmp_path), "eager")) == sorted(model_check.tiny_llama_linears(2))
    with pytest.raises(ValueError, match=rf"^--model {tmp_path}: could not build it from its config.json \("):
        model_check.hf_linears(str(tmp_path), "no-such-attention")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(ValueError, match=r"could not build it from its config.json"):
        model_check.hf_linears(str(tmp_path), "eager")


def test_model_folders_and_paths(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    assert model_check.model_problem(str(folder)) == (
        f"--model {folder}: a folder without config.json, so no Hugging Face model: pass a local folder with "
        "config.json, the weights and the tokenizer"
    )
    (folder / "config.json").write_text("{}")
    assert "no weights in the folder (none of model.safetensors, " in model_check.model_problem(str(folder))
    (folder / "model.safetensors.index.json").write_text("{}")  # a sharded model: its index
    assert model_check.model_problem(str(folder)) is None
    (tmp_path / "a-file").write_text("x")
    assert model_check.model_problem(str(tmp_path / "a-file")).startswith(
        f"--model {tmp_path / 'a-file'}: not a folder"
    )
    for name in ("/nonexistent/model", "./missing", "a--b", "one/two/three"):
        assert model_check.model_problem(name) == (
            f"--model {name}: no such folder, and not a Hugging Face model name (<owner>/<name>)"
        ), name
    assert model_check.model_problem("tiny") is None


def test_a_cached_name_passes_and_an_uncached_one_is_refused_offline(tmp_path, monkeypatch):
    """The Hugging Face cache's layout (models--<owner>--<name>/refs/main, snapshots/<commit>/config.json) is
    read without the network; offline, a name not in it is one line naming the cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    repo = tmp_path / "models--someone--small-model"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    assert model_check.model_problem("someone/small-model") is None
    assert model_check.model_problem("someone/other-model") == (
        f"--model someone/other-model: not a local folder and not in the Hugging Face cache ({tmp_path}), and "
        "HF_HUB_OFFLINE is set: pass a local folder with config.json, the weights and the tokenizer, or download it "
        "first"
    )
