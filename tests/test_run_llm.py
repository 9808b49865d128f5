"""run_llm.py end to end on a micro problem; its peft export loads in peft with equal logits."""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")

import lm
import run_llm
from lora import add_lora, load_lora_state_dict, lora_state_dict
from potara import merge_adapters


def test_peft_export_loads_in_peft_with_equal_logits(tmp_path, small_llama, randomize_lora):
    peft = pytest.importorskip("peft")
    model = small_llama()
    add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_lora(model, seed=1)
    A = lora_state_dict(model)
    randomize_lora(model, seed=2)
    B = lora_state_dict(model)
    base_dir = str(tmp_path / "base")
    run_llm.save_tiny_base(model, base_dir)
    adapters = {"ab": merge_adapters(A, B, 0.3, "ab"), "delta": merge_adapters(A, B, 0.3, "delta")}  # rank 4, 8
    run_llm.export_peft(str(tmp_path / "peft"), adapters, scaling=2.0, targets=["q_proj", "v_proj"], base_model=base_dir)
    from transformers import AutoModelForCausalLM
    x = torch.randint(3, 259, (2, 11))
    for name, state in adapters.items():
        load_lora_state_dict(model, state, allow_rank_change=True)
        base = AutoModelForCausalLM.from_pretrained(base_dir, attn_implementation="eager").eval()
        with torch.no_grad():
            ours, plain = model(x).logits, base(x).logits
            theirs = peft.PeftModel.from_pretrained(base, str(tmp_path / "peft" / name)).eval()(x).logits
        assert (ours - plain).abs().max() > 1e-3  # the adapter matters, so equality below is not trivial
        torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)


MICRO = ["--clients", "2", "--rounds", "2", "--local-steps", "2", "--pretrain-steps", "10", "--train", "24",
         "--val", "8", "--test", "8", "--synthetic-examples", "40", "--local-train-steps", "3", "--finetune-steps", "2",
         "--fisher-samples", "8", "--batch-size", "8", "--grid-step", "0.5", "--snapshots", "1", "--no-progress",
         "--threads", "1"]


def test_micro_end_to_end_run(tmp_path):
    out = str(tmp_path / "run")
    results = run_llm.main(MICRO + ["--out", out, "--cache-dir", str(tmp_path / "cache"), "--export-peft",
                                    str(tmp_path / "peft")])
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["clients"] == ["sentiment", "duplicate"] and os.path.exists(os.path.join(out, "results.md"))
    for m in ("local", "fedit", "fedit_ft", "uniform", "fisher", "fedsa", "grid_val", "potara_ab", "potara_delta"):
        for acc in saved["methods"][m]["per_client"].values():
            assert 0 <= acc <= 1
    for c in saved["per_client"].values():
        assert 0 <= c["lam_potara"] <= 1
    arch = lm.TINY_LLAMA  # every layer: q and v, each A (r x d) and B (d x r), float32; default r = 8
    adapter_bytes = arch["num_hidden_layers"] * 2 * 2 * (8 * arch["hidden_size"]) * 4
    assert saved["adapter"]["bytes"] == adapter_bytes
    assert saved["methods"]["fedit"]["bytes"] == 2 * 2 * 2 * adapter_bytes  # rounds x clients x both ways
    assert saved["methods"]["local"]["bytes"] == 0
    assert saved["config"]["reference"]["chance"] == {"sentiment": 0.5, "duplicate": 0.5}
    assert "Pre-trained model, no adapter" in open(os.path.join(out, "results.md")).read()
    assert sorted(os.listdir(tmp_path / "peft")) == ["base_model", "duplicate", "federated", "sentiment"]
    assert results["methods"]["potara_ab"]["mean"] == saved["methods"]["potara_ab"]["mean"]
    again = run_llm.main(MICRO + ["--out", out, "--cache-dir", str(tmp_path / "cache"), "--resume"])  # from checkpoint
    assert {m: r["per_client"] for m, r in again["methods"].items()} == {m: r["per_client"] for m, r in
                                                                         results["methods"].items()}


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/dir"], "not a directory"),
    (["--rounds", "0"], "--rounds must be >= 1"),
    (["--clients", "9"], "only 8 tasks"),
    (["--model", "/nonexistent/model"], "could not load it"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        run_llm.main(argv + ["--cache-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--pretrain-steps", "1"])
    text = str(e.value.code) if e.value.code not in (None, 2) else capsys.readouterr().err
    assert message in text and len(text.strip().splitlines()[-1]) > 0


def test_damaged_pretrain_cache_is_rebuilt(tmp_path, capsys):
    cache = tmp_path / "cache"
    first = run_llm.main(MICRO + ["--out", str(tmp_path / "a"), "--cache-dir", str(cache)])
    (cached,) = [p for p in cache.iterdir() if p.name.startswith("tiny-llama-")]
    cached.write_bytes(cached.read_bytes()[:100])  # truncated by a crash or a full disk
    capsys.readouterr()
    second = run_llm.main(MICRO + ["--out", str(tmp_path / "b"), "--cache-dir", str(cache)])
    assert "unusable" in capsys.readouterr().out
    assert {m: r["per_client"] for m, r in second["methods"].items()} == {m: r["per_client"] for m, r in
                                                                          first["methods"].items()}
