"""fisher.py: likelihoods, per-sample gradients (vmap, and the loop where vmap cannot batch), the diagonal Fisher."""

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import lora_vit

from potara import fisher
from potara.fisher import (
    causal_lm_likelihood,
    classification_likelihood,
    diag_fisher,
    first_samples,
    gradient_stats,
    per_sample_grads,
)
from potara.lora import load_lora_state_dict, lora_state_dict


def naive_grads(model, call, n, y):
    """One ordinary backward per sample: [{name: grad of log p(y_i | x_i)}]."""
    params = {k: p for k, p in model.named_parameters() if p.requires_grad}
    out = []
    for i in range(n):
        model.zero_grad()
        F.log_softmax(call(i), -1)[0, y[i]].backward()
        out.append({k: p.grad.detach().clone() for k, p in params.items()})
    return out


def test_diag_fisher_matches_naive_loop_not_batch_gradient():
    model = lora_vit()
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # crosses a batch boundary: 5 + 5 of the 7 in batch two
    fisher_ = diag_fisher(model, batches, n_samples=10)
    grads = naive_grads(model, lambda i: model(x[i : i + 1]), 10, y)
    for k in fisher_:
        ref = sum(g[k].double() ** 2 for g in grads) / 10
        assert fisher_[k].dtype == torch.float32
        assert (fisher_[k].double() - ref).abs().max() / ref.abs().max() < 1e-5, k
    model.zero_grad()  # the square of the batch-mean gradient is a different (wrong) thing
    F.log_softmax(model(x[:10]), -1).gather(1, y[:10, None]).mean().backward()
    sq_batch = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.requires_grad)
    assert sq_batch < 0.5 * sum(float(v.sum()) for v in fisher_.values())


def test_true_fisher_closed_form_for_softmax_regression():
    # logits = W x: the true Fisher diagonal is p_c (1 - p_c) x_d^2 (independent closed form)
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False)
    x = torch.tensor([0.5, -1.0, 2.0])
    p = F.softmax(model(x), -1).detach()
    expected = (p * (1 - p))[:, None] * (x**2)[None, :]
    n = 4000
    data = [(x.repeat(n, 1), torch.zeros(n, dtype=torch.long))]
    torch.testing.assert_close(
        diag_fisher(model, data, n_samples=n, labels="sampled")["weight"], expected, rtol=0.1, atol=1e-3
    )
    onehot = torch.tensor([1.0, 0, 0, 0])
    torch.testing.assert_close(
        diag_fisher(model, data, n_samples=n)["weight"], ((p - onehot) ** 2)[:, None] * (x**2)[None, :]
    )


def test_likelihoods_hand_computed():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 5, 2]])
    lp = F.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 0, 3] + lp[0, 1, 1], lp[1, 1, 5] + lp[1, 2, 2]])
    torch.testing.assert_close(causal_lm_likelihood.log_prob(logits, labels), expected)
    sampled = causal_lm_likelihood.sample(logits, labels, torch.Generator().manual_seed(0))
    assert torch.equal(sampled == -100, labels == -100)
    assert causal_lm_likelihood.correct is None
    cls = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert classification_likelihood.correct(cls, torch.tensor([0, 1])).tolist() == [1.0, 0.0]


def test_gradient_stats_cross_moment_matches_loop():
    model = lora_vit()
    G = lora_state_dict(model)
    g = torch.Generator().manual_seed(1)
    L = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in G.items()}
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    stats = gradient_stats(model, G, L, [(x, y)], n_samples=6)
    grads = {}
    for name, state in (("G", G), ("L", L)):
        load_lora_state_dict(model, state)
        grads[name] = naive_grads(model, lambda i: model(x[i : i + 1]), 6, y)
    for k in G:
        torch.testing.assert_close(
            stats.cross[k], sum(a[k] * b[k] for a, b in zip(grads["G"], grads["L"])) / 6, rtol=1e-4, atol=1e-6
        )
        torch.testing.assert_close(stats.mean_L[k], sum(b[k] for b in grads["L"]) / 6, rtol=1e-4, atol=1e-6)


class Branchy(nn.Module):
    """A model vmap cannot batch: its forward branches on a tensor value (like Hugging Face's mask code)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)

    def forward(self, x, scale):
        if scale.max() > 1:  # data-dependent control flow
            x = x * scale
        return self.lin(x)


def test_vmap_fallback_loops_over_samples_warns_once_and_takes_dict_inputs():
    model = Branchy()
    x, s, y = torch.randn(5, 4), torch.tensor([[1.0], [2.0], [1.0], [3.0], [0.5]]), torch.tensor([0, 2, 1, 1, 0])
    fisher._warned_loop.discard("Branchy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        f_dict = diag_fisher(model, [({"x": x, "scale": s}, y)], n_samples=5)
        f_tuple = diag_fisher(model, [((x, s), y)], n_samples=5)
    assert sum("vmap cannot batch Branchy" in str(w.message) for w in caught) == 1  # once, not per call
    grads = naive_grads(model, lambda i: model(x[i : i + 1], s[i : i + 1]), 5, y)
    for k in ("lin.weight", "lin.bias"):
        ref = sum(g[k] ** 2 for g in grads) / 5
        torch.testing.assert_close(f_dict[k], ref)
        torch.testing.assert_close(f_tuple[k], ref)
    params = {k: p.detach() for k, p in model.named_parameters()}
    per = per_sample_grads(model, params, {"x": x, "scale": s}, y)
    torch.testing.assert_close(per["lin.weight"][3], grads[3]["lin.weight"])


def test_first_samples_slices_dicts_and_checks_counts():
    batches = [
        ({"a": torch.arange(4), "b": torch.arange(4) * 2}, torch.arange(4)),
        ({"a": torch.arange(3), "b": torch.arange(3)}, torch.arange(3)),
    ]
    got = list(first_samples(batches, 6))
    assert [len(y) for _, y in got] == [4, 2] and got[1][0]["a"].tolist() == [0, 1]
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            list(first_samples(batches, bad))
    with pytest.raises(ValueError, match="yielded nothing"):
        list(first_samples([], 3))
