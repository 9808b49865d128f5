"""Specification of weight.py: the closed form and its degenerate cases, the paper's variance terms, the cubic
minimiser, the segment loss and slope, the verified default against exact curves and constructed barriers."""

import math
import random

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import lora_vit, perturbed

from potara.fisher import GradStats, Likelihood
from potara.lora import load_lora_state_dict, lora_state_dict
from potara.merge import merge_adapters
from potara.weight import cubic_minimiser, potara_weight, segment_loss, variance_bound, variance_terms, verified_weight


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
