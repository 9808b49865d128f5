import json
import os
import random

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

import lm
import run_llm
from llm_data import (IGNORE, ByteTokenizer, DataError, Example, encode_examples, normalize_answer, public_corpus,
                      read_jsonl, read_task_dir, synthetic_tasks)
from lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from potara import causal_lm_likelihood, per_sample_grads, merge_adapters

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def small_llama(seed=0):
    torch.manual_seed(seed)
    return lm.tiny_llama(ByteTokenizer.vocab_size, **SMALL).eval()


def randomize_lora(model, seed=1, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- data
def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_reader_reads_both_kinds(tmp_path):
    path = write(tmp_path / "t.jsonl", [json.dumps({"prompt": "p1", "answer": "b", "options": ["a", "b"]}), "",
                                        json.dumps({"prompt": "p2", "answer": "free"})])
    assert read_jsonl(path) == [Example("p1", "b", ("a", "b")), Example("p2", "free", None)]


@pytest.mark.parametrize("bad, why", [
    ('{"prompt": "p", "answer": ', "not valid JSON"),
    ('["p", "a"]', "expected a JSON object"),
    ('{"prompt": "p"}', "'answer' must be a non-empty string"),
    ('{"prompt": "", "answer": "a"}', "'prompt' must be a non-empty string"),
    ('{"prompt": "p", "answer": "c", "options": ["a", "b"]}', "is not one of the options"),
    ('{"prompt": "p", "answer": "a", "options": "a"}', "'options' must be a list"),
    ('{"prompt": "p", "answer": "a", "options": ["a", "a"]}', "duplicates"),
    ('{"prompt": "p", "answer": "a", "label": 1}', "unknown field"),
])
def test_jsonl_reader_names_the_bad_line(tmp_path, bad, why):
    good = json.dumps({"prompt": "p", "answer": "a"})
    path = write(tmp_path / "task.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert "task.jsonl:3:" in str(e.value) and why in str(e.value)


def test_task_dir_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_task_dir(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .jsonl files"):
        read_task_dir(str(tmp_path))
    write(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "answer": "a"})])
    write(tmp_path / "a.jsonl", [json.dumps({"prompt": "q", "answer": "z"})])
    assert list(read_task_dir(str(tmp_path))) == ["a", "b"]


def test_encoding_labels_only_the_answer_and_right_pads():
    tok = ByteTokenizer()
    ids, labels = encode_examples(tok, [Example("ab", "c"), Example("abcd", "xy")], max_len=16)
    # <bos> a b " " c <eos> | <bos> a b c d " " x y <eos>
    assert ids[0].tolist() == [1, 100, 101, 35, 102, 2, 0, 0, 0]
    assert labels[0].tolist() == [IGNORE] * 3 + [35, 102, 2] + [IGNORE] * 3
    assert labels[1].tolist() == [IGNORE] * 5 + [35, 123, 124, 2]
    short, short_labels = encode_examples(tok, [Example("abcdef", "z")], max_len=6)  # prompt cut from the left
    assert tok.decode(short[0].tolist()) == "ef z" and (short_labels[0] != IGNORE).sum() == 3
    with pytest.raises(DataError, match="more than --max-len"):
        encode_examples(tok, [Example("a", "long answer")], max_len=5)
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert normalize_answer(" The  Tolkien!") == "tolkien"


def test_synthetic_tasks_are_deterministic_and_well_formed():
    a, b = synthetic_tasks(30, seed=3), synthetic_tasks(30, seed=3)
    assert a == b and len(a) == 8
    for name, examples in a.items():
        assert len(examples) == 30 and len({e.prompt for e in examples}) > 5, name
        for e in examples:
            assert e.options is None or e.answer in e.options
    pub = public_corpus(50, random.Random(0))
    client_prompts = {e.prompt for exs in a.values() for e in exs}
    assert not client_prompts & {e.prompt for e in pub}  # the public corpus never holds a client task's format


# ----------------------------------------------------------------------------- LoRA on a transformers Llama
def test_lora_injection_into_transformers_llama():
    model = small_llama()
    x = torch.randint(3, 259, (2, 9))
    with torch.no_grad():
        ref = model(x).logits
    names = add_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{f}" for n in names for f in "AB"} == set(lora_state_dict(model))
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)  # B = 0: the adapter starts as the identity
        randomize_lora(model)
        adapted = model(x).logits
        assert (adapted - ref).abs().max() > 1e-3
        merge_lora(model)
        torch.testing.assert_close(model(x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_lm_loss_counts_only_answer_tokens():
    model = small_llama()
    ids, labels = encode_examples(ByteTokenizer(), [Example("abc", "de"), Example("x", "yz w")], max_len=32)
    logits = model(ids).logits
    terms = [F.log_softmax(logits[i, t - 1], -1)[ids[i, t]] for i in range(2) for t in range(ids.shape[1])
             if labels[i, t] != IGNORE]
    torch.testing.assert_close(lm.lm_loss(model, ids, labels), -torch.stack(terms).mean())


def test_per_sample_grads_vmap_on_llama_matches_a_loop():
    model = small_llama()
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    randomize_lora(model)
    params = {k: v.clone() for k, v in lora_state_dict(model).items()}
    ids, labels = encode_examples(ByteTokenizer(), [Example("ab", "cd"), Example("abcde", "f")], max_len=32)
    batched = per_sample_grads(model, params, ids, labels, causal_lm_likelihood)
    for i in range(2):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out = torch.func.functional_call(model, p, (ids[i:i + 1],))
        grads = torch.autograd.grad(causal_lm_likelihood.log_prob(out, labels[i:i + 1]).sum(), list(p.values()))
        for k, g in zip(p, grads):
            torch.testing.assert_close(batched[k][i], g, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- scoring
def test_option_scores_match_a_hand_computation():
    model, tok = small_llama(), ByteTokenizer()
    prompt = [1] + tok.encode("max of 3 7:")
    options = [tok.encode(" 3"), tok.encode(" 7"), tok.encode(" 10")]
    with torch.no_grad():
        scores = lm.option_logprobs(model, [(prompt, o) for o in options], tok.pad_id, batch_size=2)
        for score, o in zip(scores, options):
            logp = F.log_softmax(model(torch.tensor([prompt + o])).logits[0].double(), -1)  # unpadded, alone
            hand = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(o))
            assert abs(float(score) - hand) < 1e-4
    # the scorer calls an example right exactly when its gold option scores highest
    scorer = lm.Scorer(tok, max_new_tokens=4)
    exs = [Example("max of 3 7:", gold, ("3", "7", "10")) for gold in ("3", "7", "10")]
    ids, labels = encode_examples(tok, exs, max_len=32)
    scorer.register(ids, labels, exs)
    best = ("3", "7", "10")[int(scores.argmax())]
    for i, ex in enumerate(exs):
        assert scorer(model, ids[i:i + 1], labels[i:i + 1]) == float(ex.answer == best)
    assert scorer(model, ids, labels) == pytest.approx(1 / 3)


def test_greedy_decode_matches_a_naive_loop_and_exact_match():
    model, tok = small_llama(), ByteTokenizer()
    with torch.no_grad():  # large random weights: the next token depends on the whole context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    prompts = [[1] + tok.encode("ab"), [1] + tok.encode("xyz"), [1] + tok.encode("cd"), [1] + tok.encode("ba")]
    fast = lm.greedy_decode(model, prompts, max_new_tokens=5, eos_id=tok.eos_id)
    assert len({tuple(f) for f in fast}) > 1 and max(len(set(f)) for f in fast) > 1  # not a constant model
    with torch.no_grad():
        for p, got in zip(prompts, fast):
            seq = list(p)
            for _ in range(5):
                nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
                if nxt == tok.eos_id:
                    break
                seq.append(nxt)
            assert got == seq[len(p):]
    scorer = lm.Scorer(tok, max_new_tokens=5)  # free-form: right iff normalised continuation == answer
    texts = [tok.decode(f) for f in fast]
    cases = [(t, 1.0) for t in texts if normalize_answer(t)][:1] + [("surely not this", 0.0)]
    assert len(cases) == 2
    for answer, expected in cases:
        ex = Example(tok.decode(prompts[texts.index(answer)][1:]) if expected else "ab", answer.strip())
        ids, labels = encode_examples(tok, [ex], max_len=32)
        scorer.register(ids, labels, [ex])
        assert scorer(model, ids, labels) == expected


# ----------------------------------------------------------------------------- peft export
def test_peft_export_loads_in_peft_with_equal_logits(tmp_path):
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


# ----------------------------------------------------------------------------- CLI
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
