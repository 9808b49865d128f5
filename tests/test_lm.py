"""lm.py: the tiny Llama takes LoRA where peft would put it, the loss counts answer tokens only, option
scores and greedy decoding match naive computations."""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from lora import LoRALinear, add_lora, lora_state_dict, merge_lora
from potara import causal_lm_likelihood, per_sample_grads
from potara_harness import config, lm
from potara_harness.llm_data import IGNORE, ByteTokenizer, Example, encode_examples, normalize_answer


def test_lora_injection_into_transformers_llama(small_llama, randomize_lora):
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


def test_lm_loss_counts_only_answer_tokens(small_llama):
    model = small_llama()
    ids, labels = encode_examples(ByteTokenizer(), [Example("abc", "de"), Example("x", "yz w")], max_len=32)
    logits = model(ids).logits
    terms = [
        F.log_softmax(logits[i, t - 1], -1)[ids[i, t]]
        for i in range(2)
        for t in range(ids.shape[1])
        if labels[i, t] != IGNORE
    ]
    torch.testing.assert_close(lm.lm_loss(model, ids, labels), -torch.stack(terms).mean())
    # the same shift and mask as Potara's per-sample likelihood (fisher.py): summed, it is the same loss
    from potara import causal_lm_likelihood

    summed = causal_lm_likelihood.log_prob(model(ids), labels)
    torch.testing.assert_close(lm.lm_loss(model, ids, labels), -summed.sum() / (labels[:, 1:] != IGNORE).sum())


def test_per_sample_grads_vmap_on_llama_matches_a_loop(small_llama, randomize_lora):
    model = small_llama()
    add_lora(model, ["q_proj", "v_proj"], r=2, alpha=4)
    randomize_lora(model)
    params = {k: v.clone() for k, v in lora_state_dict(model).items()}
    ids, labels = encode_examples(ByteTokenizer(), [Example("ab", "cd"), Example("abcde", "f")], max_len=32)
    batched = per_sample_grads(model, params, ids, labels, causal_lm_likelihood)
    for i in range(2):
        p = {k: v.clone().requires_grad_(True) for k, v in params.items()}
        out = torch.func.functional_call(model, p, (ids[i : i + 1],))
        grads = torch.autograd.grad(causal_lm_likelihood.log_prob(out, labels[i : i + 1]).sum(), list(p.values()))
        for k, g in zip(p, grads):
            torch.testing.assert_close(batched[k][i], g, rtol=1e-4, atol=1e-6)


def test_option_scores_match_a_hand_computation(small_llama):
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
        assert scorer(model, ids[i : i + 1], labels[i : i + 1]) == float(ex.answer == best)
    assert scorer(model, ids, labels) == pytest.approx(1 / 3)


def test_greedy_decode_matches_a_naive_loop_and_exact_match(small_llama):
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
            assert got == seq[len(p) :]
    scorer = lm.Scorer(tok, max_new_tokens=5)  # free-form: right iff normalised continuation == answer
    texts = [tok.decode(f) for f in fast]
    cases = [(t, 1.0) for t in texts if normalize_answer(t)][:1] + [("surely not this", 0.0)]
    assert len(cases) == 2
    for answer, expected in cases:
        ex = Example(tok.decode(prompts[texts.index(answer)][1:]) if expected else "ab", answer.strip())
        ids, labels = encode_examples(tok, [ex], max_len=32)
        scorer.register(ids, labels, [ex])
        assert scorer(model, ids, labels) == expected


def test_a_nan_pretraining_cache_is_trained_again(tmp_path, capsys, small_llama):
    """The cached tiny model is untrusted like any file: one NaN in it and it is pre-trained again (with the
    reason printed), to the same weights as the first time; never loaded into the model."""
    from potara_harness.llm_data import ByteTokenizer

    p = {**config.LM_PRESETS["tiny"], "pretrain_steps": 2, "pretrain_batch": 4, "max_len": 32}
    first = small_llama(0)
    info = lm.pretrain_tiny(first, ByteTokenizer(), p, 0, str(tmp_path), torch.device("cpu"), False)
    obj = torch.load(info["cache"], weights_only=True)
    key = next(k for k, v in obj["state_dict"].items() if v.is_floating_point())
    obj["state_dict"][key].view(-1)[0] = float("nan")
    torch.save(obj, info["cache"])
    capsys.readouterr()
    again = small_llama(0)
    lm.pretrain_tiny(again, ByteTokenizer(), p, 0, str(tmp_path), torch.device("cpu"), False)
    out = capsys.readouterr().out
    assert "is unusable (AdapterError:" in out and "holds NaN or Inf" in out and "pre-training it again" in out
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), first.state_dict().values()))
