import math
import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import VisionTransformer

from lora import LoRALinear, add_lora, load_lora_state_dict, lora_state_dict
from potara import (GradStats, causal_lm_likelihood, diag_fisher, fisher_merge, gradient_stats, merge_adapters,
                    personalize, potara_weight, variance_bound, variance_terms)


def lora_vit(seed=0):
    torch.manual_seed(seed)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5)
    add_lora(model, ["self_attention"], r=2, alpha=4, trainable=["heads"])
    with torch.no_grad():  # a trained-looking adapter: non-zero B and head, so every gradient is non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model.eval()


def perturbed(state, seed, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def naive_fisher(model, x, y):
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    for i in range(len(x)):
        model.zero_grad()
        F.log_softmax(model(x[i:i + 1]), -1)[0, y[i]].backward()
        for n, p in params.items():
            acc[n] += p.grad.double() ** 2 / len(x)
    return acc


def test_diag_fisher_matches_naive_loop_not_batch_gradient():
    model = lora_vit()
    x, y = torch.randn(12, 3, 16, 16), torch.randint(0, 5, (12,))
    batches = [(x[:5], y[:5]), (x[5:], y[5:])]  # crosses a batch boundary: 5 + 5 of the 7 in batch two
    fisher = diag_fisher(model, batches, n_samples=10)
    ref = naive_fisher(model, x[:10], y[:10])
    assert set(fisher) == set(ref)
    for k in ref:
        assert fisher[k].dtype == torch.float32
        rel = (fisher[k].double() - ref[k]).abs().max() / ref[k].abs().max()
        assert rel < 1e-5, (k, rel)
    model.zero_grad()  # the square of the batch-mean gradient is a different (wrong) thing
    F.log_softmax(model(x[:10]), -1).gather(1, y[:10, None]).mean().backward()
    sq_batch = {n: p.grad.double() ** 2 for n, p in model.named_parameters() if p.requires_grad}
    total_ref = sum(float(v.sum()) for v in ref.values())
    assert sum(float(v.sum()) for v in sq_batch.values()) < 0.5 * total_ref


def test_true_fisher_closed_form_for_softmax_regression():
    # logits = W x: the true Fisher diagonal is p_c (1 - p_c) x_d^2 (independent closed form)
    torch.manual_seed(0)
    model = nn.Linear(3, 4, bias=False)
    x = torch.tensor([0.5, -1.0, 2.0])
    p = F.softmax(model(x), -1).detach()
    expected = (p * (1 - p))[:, None] * (x ** 2)[None, :]
    n = 4000
    fisher = diag_fisher(model, [(x.repeat(n, 1), torch.zeros(n, dtype=torch.long))], n_samples=n, labels="sampled")
    torch.testing.assert_close(fisher["weight"], expected, rtol=0.1, atol=1e-3)
    empirical = diag_fisher(model, [(x.repeat(n, 1), torch.zeros(n, dtype=torch.long))], n_samples=n)
    onehot = torch.tensor([1.0, 0, 0, 0])
    torch.testing.assert_close(empirical["weight"], ((p - onehot) ** 2)[:, None] * (x ** 2)[None, :])


def test_causal_lm_likelihood_hand_computed():
    logits = torch.randn(2, 4, 6)
    labels = torch.tensor([[-100, 3, 1, -100], [-100, -100, 5, 2]])
    lp = F.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 0, 3] + lp[0, 1, 1], lp[1, 1, 5] + lp[1, 2, 2]])
    torch.testing.assert_close(causal_lm_likelihood.log_prob(logits, labels), expected)
    sampled = causal_lm_likelihood.sample(logits, labels, torch.Generator().manual_seed(0))
    assert torch.equal(sampled == -100, labels == -100)


def test_potara_weight_is_the_grid_argmin_and_never_worse():
    rng = random.Random(0)
    grid = [i / 20000 for i in range(20001)]
    for _ in range(200):
        a, b = 10 ** rng.uniform(-3, 3), 10 ** rng.uniform(-3, 3)
        c = rng.uniform(0, min(a, b))
        lam = potara_weight(a, b, c)
        best = min(grid, key=lambda t: variance_bound(t, a, b, c))
        assert 0 <= lam <= 1
        assert abs(lam - best) < 1e-3
        value = variance_bound(lam, a, b, c)
        assert value <= variance_bound(best, a, b, c) * (1 + 1e-9)
        assert value <= min(a, b) * (1 + 1e-12)
        assert math.isclose(value, (a * b - c * c) / (a + b - 2 * c), rel_tol=1e-9)


def test_potara_weight_degenerate_cases():
    assert potara_weight(2.0, 2.0, 2.0) == 0.5  # a + b - 2c = 0
    assert potara_weight(0.0, 0.0, 0.0) == 0.5
    assert potara_weight(1.0, 3.0, 5.0) == 1.0  # c clipped to min(a, b) = a: all weight on the smaller variance
    assert potara_weight(4.0, 1.0, 2.0) == 0.0
    assert potara_weight(1.0, 3.0, -7.0) == pytest.approx(3.0 / 4.0)  # c clipped to 0: lam = b / (a + b)
    assert potara_weight(math.inf, 1.0, 0.0) == 0.0 and potara_weight(1.0, math.inf, 0.0) == 1.0
    assert potara_weight(math.inf, math.inf, 0.0) == 0.5
    with pytest.warns(UserWarning, match="NaN"):
        assert potara_weight(float("nan"), 1.0, 0.0) == 0.5
    with pytest.raises(ValueError, match=">= 0"):
        potara_weight(-1.0, 1.0, 0.0)


def test_variance_terms_by_hand_and_by_module():
    stats = GradStats(
        n=4,
        fisher_G={"m1.lora_A": torch.tensor([1.0, 3.0]), "m2.w": torch.tensor([2.0])},
        fisher_L={"m1.lora_A": torch.tensor([4.0, 0.0]), "m2.w": torch.tensor([2.0])},
        sq_G={"m1.lora_A": torch.tensor([1.0, 3.0]), "m2.w": torch.tensor([2.0])},
        sq_L={"m1.lora_A": torch.tensor([4.0, 0.0]), "m2.w": torch.tensor([2.0])},
        cross={"m1.lora_A": torch.tensor([1.0, 0.0]), "m2.w": torch.tensor([-1.0])},
        mean_G={}, mean_L={})
    eps = 0.1
    a, b, c = variance_terms(stats, eps=eps)
    e = eps * ((1 + 3 + 2) + (4 + 0 + 2)) / 3 / 2  # relative: eps * mean of (F_G + F_L) / 2
    assert a == pytest.approx(1 / (1 + e) + 1 / (3 + e) + 1 / (2 + e))
    assert b == pytest.approx(1 / (4 + e) + 1 / e + 1 / (2 + e))
    rho = (1 + 0 - 1) / math.sqrt(6 * 6)  # = 0
    assert c == pytest.approx(rho * math.sqrt(a * b))
    am, bm, cm = variance_terms(stats, eps=eps, granularity="module")
    assert set(am) == {"m1", "m2"}
    e1 = eps * (4 + 4) / 2 / 2
    assert am["m1"] == pytest.approx(1 / (1 + e1) + 1 / (3 + e1))
    assert cm["m1"] == pytest.approx(min((1 / math.sqrt(4 * 4)) * math.sqrt(am["m1"] * bm["m1"]), am["m1"], bm["m1"]))
    assert cm["m2"] == 0.0  # negative correlation clipped
    with pytest.raises(ValueError, match="granularity"):
        variance_terms(stats, granularity="layer")
    with pytest.raises(ValueError, match="eps"):
        variance_terms(stats, eps=0)


def test_gradient_stats_cross_moment_matches_loop():
    model = lora_vit()
    G = lora_state_dict(model)
    L = perturbed(G, 1)
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    stats = gradient_stats(model, G, L, [(x, y)], n_samples=6)
    grads = {}
    for name, state in (("G", G), ("L", L)):
        load_lora_state_dict(model, state)
        per = []
        for i in range(6):
            model.zero_grad()
            F.log_softmax(model(x[i:i + 1]), -1)[0, y[i]].backward()
            per.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
        grads[name] = per
    for k in G:
        cross = sum(gG[k] * gL[k] for gG, gL in zip(grads["G"], grads["L"])) / 6
        mean_L = sum(g[k] for g in grads["L"]) / 6
        torch.testing.assert_close(stats.cross[k], cross, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(stats.mean_L[k], mean_L, rtol=1e-4, atol=1e-6)


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


def test_delta_merge_is_exact_output_mix():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(5, 3), r=2, alpha=4)
    init = lora_state_dict(layer)
    G, L = perturbed(init, 1), perturbed(init, 2)
    x = torch.randn(7, 5)

    def out(state, **kw):
        load_lora_state_dict(layer, state, **kw)
        return layer(x).detach()

    f_G, f_L = out(G), out(L)
    lam = 0.3
    merged = merge_adapters(G, L, lam, space="delta")
    assert merged["lora_A"].shape == (4, 5) and merged["lora_B"].shape == (3, 4)
    torch.testing.assert_close(out(merged, allow_rank_change=True), lam * f_G + (1 - lam) * f_L)
    ab = out(merge_adapters(G, L, lam, space="ab"), allow_rank_change=True)
    assert not torch.allclose(ab, lam * f_G + (1 - lam) * f_L)  # the A/B-space merge is not the output mix


def test_fisher_merge_hand_computed():
    G, L = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([3.0, 3.0])}
    out = fisher_merge(G, L, {"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([3.0, 0.0])}, eps=1e-12)
    torch.testing.assert_close(out["w"], torch.tensor([(1 + 9) / 4, 2.0]))


def test_personalize_end_to_end():
    model = lora_vit()
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    merged, info = personalize(model, G, L, [(x, y)], n_samples=8)
    assert 0 <= info["lam"] <= 1 and info["n_samples"] == 8
    assert info["lam"] == potara_weight(info["a"], info["b"], info["c"])
    expected = merge_adapters(G, L, info["lam"])
    assert all(torch.equal(merged[k], expected[k]) for k in G)
    assert all(torch.equal(v, G[k]) for k, v in lora_state_dict(model).items())  # model untouched
    _, info_m = personalize(model, G, L, [(x, y)], n_samples=8, granularity="module", space="delta", estimator="paper")
    assert set(info_m["lam"]) == {"encoder.layers.encoder_layer_0.self_attention",
                                  "encoder.layers.encoder_layer_1.self_attention", "heads.head"}
    for bad, match in [({"labels": "true"}, "labels"), ({"estimator": "magic"}, "estimator"),
                       ({"n_samples": 0}, "n_samples")]:
        with pytest.raises(ValueError, match=match):
            personalize(model, G, L, [(x, y)], **bad)
    with pytest.raises(ValueError, match="yielded nothing"):
        personalize(model, G, L, [])


def _stats(FG, FL, cross):
    t = lambda v: {"m.w": torch.tensor(v, dtype=torch.float32)}
    return GradStats(n=1, fisher_G=t(FG), fisher_L=t(FL), sq_G=t(FG), sq_L=t(FL), cross=t(cross), mean_G={},
                     mean_L={})


def test_degenerate_statistics_warn_and_stay_finite():
    with pytest.warns(UserWarning, match="all zero"):
        a, b, c = variance_terms(_stats([0.0, 0.0], [0.0, 0.0], [0.0, 0.0]))
    assert a == b and potara_weight(a, b, c) == 0.5
    a, b, c = variance_terms(_stats([0.0, 1.0], [1.0, 1.0], [0.0, 1.0]))  # a zero entry: eps keeps a finite
    assert math.isfinite(a) and a > b
    a, b, c = variance_terms(_stats([float("nan"), 1.0], [1.0, 1.0], [0.0, 1.0]))
    with pytest.warns(UserWarning, match="NaN"):
        assert potara_weight(a, b, c) == 0.5


def test_personalize_refuses_nan_adapters():
    from lora import AdapterError
    model = lora_vit()
    G = lora_state_dict(model)
    L = perturbed(G, 3)
    L["heads.head.bias"][0] = float("nan")
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 5, (4,))
    with pytest.raises(AdapterError, match="local adapter.*NaN"):
        personalize(model, G, L, [(x, y)])
    with pytest.raises(AdapterError, match="global adapter.*NaN"):
        personalize(model, L, G, [(x, y)])


def test_quadratic_estimator_is_exact_on_a_quadratic_loss():
    # Gaussian regression: the loss is exactly quadratic in the weights, so the closed form must equal
    # the argmin over lam of the loss on the same samples (an independent fine grid)
    from potara import Likelihood
    gauss = Likelihood(log_prob=lambda out, y: -0.5 * (out.squeeze(-1) - y) ** 2, sample=None)
    torch.manual_seed(0)
    model = nn.Linear(4, 1, bias=False)
    x = torch.randn(40, 4)
    w_star = torch.randn(1, 4)
    y = (x @ w_star.T).squeeze(-1) + 0.1 * torch.randn(40)
    grid = torch.linspace(0, 1, 20001)
    for seed in range(5):
        g = torch.Generator().manual_seed(seed)
        G = {"weight": w_star + 0.5 * torch.randn(1, 4, generator=g)}
        L = {"weight": w_star + 0.5 * torch.randn(1, 4, generator=g) + (2.0 if seed == 4 else 0.0)}
        _, info = personalize(model, G, L, [(x, y)], n_samples=40, estimator="quadratic", likelihood=gauss)
        W = grid[:, None, None] * G["weight"] + (1 - grid[:, None, None]) * L["weight"]  # [grid, 1, 4]
        losses = (0.5 * ((x @ W.transpose(1, 2)).squeeze(-1) - y) ** 2).mean(-1)
        assert abs(info["lam"] - float(grid[losses.argmin()])) < 2e-4, seed


def test_bias_estimator_adds_newton_distance():
    stats = _stats([1.0, 4.0], [1.0, 4.0], [1.0, 4.0])
    stats.mean_G = {"m.w": torch.tensor([2.0, 0.0])}
    stats.mean_L = {"m.w": torch.tensor([0.0, 0.0])}
    from potara import bias_terms
    a0, b0, _ = variance_terms(stats, eps=1e-9)
    a, b, _ = bias_terms(stats, eps=1e-9)
    assert b == pytest.approx(b0) and a == pytest.approx(a0 + (2.0 / 1.0) ** 2)


def test_hermite_estimator_is_exact_on_a_cubic_loss():
    # one weight w, loss(w) = k3 w^3 + k2 w^2 + k1 w on every sample: along the segment
    # w(t) = w_L + t (w_G - w_L) the loss is exactly a cubic in t, so the closed form must equal the
    # argmin of that loss over a fine grid on [0, 1] (computed independently with numpy)
    import numpy as np
    from potara import Likelihood
    rng = np.random.default_rng(0)
    model = nn.Linear(1, 1, bias=False)
    x, y = torch.ones(3, 1), torch.zeros(3)
    grid = np.linspace(0, 1, 200001)
    interior = ends = 0
    for case in range(40):
        k3, k2, k1 = rng.normal(size=3)
        cubic = Likelihood(log_prob=lambda out, _y, k=(k3, k2, k1): -(k[0] * out ** 3 + k[1] * out ** 2 + k[2] * out)
                           .squeeze(-1), sample=None)
        wG, wL = rng.normal(scale=2.0, size=2)
        G, L = ({"weight": torch.tensor([[w]], dtype=torch.float32)} for w in (wG, wL))
        _, info = personalize(model, G, L, [(x, y)], n_samples=3, estimator="hermite", likelihood=cubic)
        w = np.float32(wL) + grid * (np.float32(wG) - np.float32(wL))
        loss = k3 * w ** 3 + k2 * w ** 2 + k1 * w
        best = grid[loss.argmin()]
        assert abs(info["lam"] - best) < 1e-3 or loss[round(info["lam"] * 200000)] <= loss.min() + 1e-5, case
        interior += 0 < best < 1
        ends += best in (0.0, 1.0)
    assert interior >= 5 and ends >= 5  # both kinds of minimum were exercised


def test_cubic_minimiser_hand_cases_and_hermite_errors():
    from potara import cubic_minimiser, hermite_terms
    assert cubic_minimiser(1.0, 1.0, -2.0, 2.0) == pytest.approx((0.5, 4.0))  # p = 1 - 2t + 2t^2
    assert cubic_minimiser(1.0, 0.0, -1.0, -1.0)[0] == 1.0  # falls all the way: the federated end
    assert cubic_minimiser(0.0, 1.0, 1.0, 1.0)[0] == 0.0  # rises all the way: the local end
    assert cubic_minimiser(2.0, 2.0, 0.0, 0.0)[0] == 0.5  # constant: no preference
    # p = t^3 - 1.5 t^2 + 0.5 t + 1 (values 1, 1; slopes 0.5, 0.5): minimum at 1/2 + sqrt(3)/6, not an end
    t, curv = cubic_minimiser(1.0, 1.0, 0.5, 0.5)
    assert t == pytest.approx(0.5 + math.sqrt(3) / 6) and curv == pytest.approx(6 * t - 3)
    stats = _stats([1.0], [1.0], [1.0])
    stats.mean_G, stats.mean_L, stats.delta = {"m.w": torch.tensor([1.0])}, {"m.w": torch.tensor([-1.0])}, \
        {"m.w": torch.tensor([1.0])}
    with pytest.raises(ValueError, match="one weight per client"):
        hermite_terms(stats, granularity="module")
    stats.loglik_G = float("nan")
    with pytest.warns(UserWarning, match="NaN"):
        assert potara_weight(*hermite_terms(stats)) == 0.5
