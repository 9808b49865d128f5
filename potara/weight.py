"""The weight lam of Potara's merge phi(lam) = lam * phi_G + (1 - lam) * phi_L: the paper's closed form, the
paper's estimator of its terms, and this project's default, verified on held-out samples (merge.py merges).

docs/algorithm.md: (P) = the paper states it, (R) = a third-party reading of the paper, (OURS) = this
project's reconstruction, checked against a grid search (potara_studies/ablation.py).

Merge (P):       phi(lam) = lam * phi_G + (1 - lam) * phi_L    (both start from the same phi_0)
Bound (P, R):    E[L_k(phi(lam))] <= L_k* + (beta/2) tr Var(phi(lam)),
                 tr Var(phi(lam)) = lam^2 a + (1 - lam)^2 b + 2 lam (1 - lam) c,
                 a = tr Sigma_G, b = tr Sigma_L, c = tr Sigma_GL.
Closed form (R): lam* = (b - c) / (a + b - 2c), value (ab - c^2)/(a + b - 2c) <= min(a, b).
The paper's estimator, "paper" (OURS, docs/algorithm.md's reconstruction), from the diagonal Fisher of each
model on n client samples (fisher.py: per-sample gradients):
                 a = sum_j 1/(F_G[j] + eps'),   b = sum_j 1/(F_L[j] + eps'),
                 rho = clip(sum_j X[j] / sqrt(sum_j E_G[j] sum_j E_L[j]), 0, 1),  c = min(rho sqrt(ab), a, b)
with E = mean_i g_i^2 (empirical Fisher), X = mean_i g_G,i g_L,i (rho: the correlation of the two models'
per-sample gradients) and eps' = eps * mean entry of (F_G + F_L)/2 (relative: lam does not change when
the loss is rescaled).

THE DEFAULT, "verified" (OURS): the client's loss f(lam) = -mean_i log p(y_i | x_i; phi(lam)) along the
segment, on HELD-OUT client samples (a validation split the adapters were not trained on):
  1. f(0), f'(0), f(1), f'(1): one batched forward-backward pass at each end (slopes are exact directional
     derivatives, autograd through the merge, in the merge's own space);
  2. lam_h = argmin over [0, 1] of the cubic Hermite interpolant of those four numbers (closed form);
  3. if lam_h is inside (0, 1): one forward pass gives its held-out loss (and error); lam_h is kept only if it
     beats both ends, compared by held-out error first (likelihood.correct: the metric a grid search over lam
     chooses by), then loss (by loss alone where the likelihood defines no error); else the better end is
     taken (a loss barrier: the two adapters are not linearly connected there) and the barrier reported;
     lam_h at an end: the better end in the same order, with no extra pass.
Cost: 2 forward-backward passes + at most 1 forward pass over the n held-out samples; never a grid. The
chosen lam is never worse than the better end in that (error, loss) order on the held-out samples; by loss
alone it can be, where the end with fewer errors has the higher loss (over-confident mistakes; docs/estimator-study.md).
The paper's estimator assumes linear mode connectivity; under conflicting tasks (real digits,
docs/estimator-study.md) it
fails, and any weight read off the two ends alone can land on a barrier: the verification pass sees it.
On the adapters' own training samples f(0) and f'(0) are ~0 and the weight favours phi_L: personalize
warns when the samples look like that.

Usage (merge.personalize runs these and merges):
        lam = potara_weight(a, b, c)                                      # the closed form
        lam, info = verified_weight(model, global_state, local_state, held_out_batches)   # the default
Degenerate numerics (tested): NaN/Inf adapters, merged models and adapters that do not match the model's
trainable tensors are refused (AdapterError); a zero Fisher entry is absorbed by eps'; an all-zero Fisher
warns; NaN statistics warn and give lam = 0.5 ("paper") or the end with a finite loss ("verified").
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from .fisher import GradStats, Likelihood, call_model, classification_likelihood, to_device
from .lora import lora_factor


# ----------------------------------------------------------------------------- the closed form (paper)
def potara_weight(a: float, b: float, c: float, tol: float = 1e-12) -> float:
    """lam* = argmin_lam lam^2 a + (1-lam)^2 b + 2 lam(1-lam) c = (b - c) / (a + b - 2c).

    Documented edge cases (OURS, docs/algorithm.md: the paper leaves them open):
      * a or b negative: ValueError (they are traces of covariances).
      * NaN anywhere: warning, lam = 0.5 (no information).
      * a = inf (federated model infinitely uncertain): lam = 0; b = inf: lam = 1; both: 0.5.
      * c is clipped to [0, min(a, b)]: the range where lam* lies in [0, 1].
      * a + b - 2c <= tol * (a + b) (equally uncertain and fully correlated, or a = b = 0): lam = 0.5.
    """
    a, b, c = float(a), float(b), float(c)
    if math.isnan(a) or math.isnan(b) or math.isnan(c):
        warnings.warn(f"potara_weight: NaN in (a, b, c) = ({a}, {b}, {c}); using lam = 0.5")
        return 0.5
    if a < 0 or b < 0:
        raise ValueError(f"potara_weight: a and b are variance traces and must be >= 0, got a={a}, b={b}")
    if math.isinf(a) or math.isinf(b):
        return 0.5 if math.isinf(a) and math.isinf(b) else (0.0 if math.isinf(a) else 1.0)
    c = min(max(c, 0.0), a, b)
    denom = a + b - 2 * c
    if denom <= tol * (a + b) or denom <= 0:
        return 0.5
    return min(max((b - c) / denom, 0.0), 1.0)


def variance_bound(lam: float, a: float, b: float, c: float) -> float:
    """tr Var(phi(lam)) = lam^2 a + (1 - lam)^2 b + 2 lam (1 - lam) c."""
    return lam * lam * a + (1 - lam) ** 2 * b + 2 * lam * (1 - lam) * c


def module_of(name: str) -> str:
    """Group key for granularity="module": the owning module (e.g. 'encoder.layers.0.self_attention')."""
    return name.rpartition(".")[0]


def _groups(keys, granularity: str) -> dict[str, list[str]]:
    if granularity not in ("client", "module"):
        raise ValueError(f"granularity must be 'client' or 'module', got {granularity!r}")
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault("client" if granularity == "client" else module_of(k), []).append(k)
    return groups


# ----------------------------------------------------------------------------- the paper's estimator
def variance_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client", bias: bool = False):
    """The "paper" estimator of (a, b, c) (module docstring): floats for granularity="client", dicts
    {module: value} for "module" (one weight per adapted module). bias=True is the study's "bias" variant
    (potara_studies/ablation.py): + each model's squared diagonal-Newton distance to the client optimum, sum_j
    (E[g_j]/F_j)^2."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")

    def terms(keys):
        cat = lambda d: torch.cat([d[k].flatten().double() for k in keys])
        FG, FL = cat(stats.fisher_G), cat(stats.fisher_L)
        eps_abs = eps * float((FG + FL).mean()) / 2
        if eps_abs == 0:  # no gradient signal at all: a = b, lam = 0.5 unless rho says otherwise
            warnings.warn(f"variance_terms: the Fisher of {keys[0]!r}... is all zero; using absolute eps={eps}")
            eps_abs = eps
        a, b = float((1 / (FG + eps_abs)).sum()), float((1 / (FL + eps_abs)).sum())
        if bias:
            a += float((cat(stats.mean_G) / (FG + eps_abs)).pow(2).sum())
            b += float((cat(stats.mean_L) / (FL + eps_abs)).pow(2).sum())
        norm = math.sqrt(float(cat(stats.sq_G).sum()) * float(cat(stats.sq_L).sum()))
        rho = min(max(float(cat(stats.cross).sum()) / norm, 0.0), 1.0) if norm > 0 else 0.0
        return a, b, min(rho * math.sqrt(a * b), a, b)

    out = {g: terms(ks) for g, ks in _groups(list(stats.fisher_G), granularity).items()}
    return out["client"] if granularity == "client" else tuple({g: v[i] for g, v in out.items()} for i in range(3))


def paper_weight(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """The paper's weight from per-sample gradient statistics: (lam, {"a", "b", "c"}); floats, or
    {module: value} dicts for granularity="module"."""
    a, b, c = variance_terms(stats, eps, granularity)
    lam = {g: potara_weight(a[g], b[g], c[g]) for g in a} if isinstance(a, dict) else potara_weight(a, b, c)
    return lam, {"a": a, "b": b, "c": c}


# ----------------------------------------------------------------------------- the default: verified Hermite
def cubic_minimiser(f0: float, f1: float, d0: float, d1: float) -> tuple[float, float]:
    """argmin over [0, 1] of the cubic Hermite interpolant p(0) = f0, p(1) = f1, p'(0) = d0, p'(1) = d1:
        p(t) = f0 + d0 t + c2 t^2 + c3 t^3,  c2 = 3 (f1 - f0) - 2 d0 - d1,  c3 = 2 (f0 - f1) + d0 + d1,
    the candidates being 0, 1 and the roots of p'(t) = d0 + 2 c2 t + 3 c3 t^2 in (0, 1) (ties: nearest 0.5;
    a constant p: 0.5). Exact for any cubic f, so for any quadratic. Returns (t*, p''(t*))."""
    c2, c3 = 3 * (f1 - f0) - 2 * d0 - d1, 2 * (f0 - f1) + d0 + d1
    A, B, C = 3 * c3, 2 * c2, d0  # p'(t) = A t^2 + B t + C
    scale = abs(A) + abs(B) + abs(C)
    if scale == 0:  # p is constant: no preference
        return 0.5, 0.0
    roots = []
    if abs(A) <= 1e-12 * scale:
        roots = [-C / B] if B != 0 else []
    elif B * B - 4 * A * C >= 0:  # the cancellation-free pair of quadratic roots
        q = -0.5 * (B + math.copysign(math.sqrt(B * B - 4 * A * C), B))
        roots = [q / A] + ([C / q] if q != 0 else [])
    p = lambda t: f0 + t * (d0 + t * (c2 + t * c3))
    t = min([0.0, 1.0] + [r for r in roots if 0 < r < 1], key=lambda t: (p(t), abs(t - 0.5)))
    return t, 2 * c2 + 6 * c3 * t


def segment_state(global_state: dict, local_state: dict, lam, space: str = "ab") -> dict[str, torch.Tensor]:
    """phi(lam), differentiable in lam when lam is a tensor. space="ab": every tensor lam G + (1 - lam) L;
    "delta": LoRA pairs concatenated (merge_adapters), so each layer's output is lam f_G(x) + (1 - lam) f_L(x)."""
    out = {}
    for k, G in global_state.items():
        L, factor = local_state[k], lora_factor(k) if space == "delta" else None
        w = lam.to(G.dtype) if isinstance(lam, torch.Tensor) else lam
        out[k] = (
            torch.cat([G, L], 0)
            if factor == "A"
            else torch.cat([w * G, (1 - w) * L], 1)
            if factor == "B"
            else L + w * (G - L)
        )
    return out


def segment_loss(
    model: nn.Module,
    global_state: dict,
    local_state: dict,
    lam: float,
    samples: list,
    likelihood: Likelihood = classification_likelihood,
    space: str = "ab",
    slope: bool = True,
) -> tuple[float, float, float | None]:
    """(f(lam), f'(lam), error(lam)) over `samples` (a list of (inputs, targets) batches), with
    f(lam) = -(1/n) sum_i log p(y_i | x_i; phi(lam)) and error(lam) the fraction of wrong predictions
    (likelihood.correct; None where it is not defined). One batched forward (+ backward to the scalar lam
    when slope) per batch, in the model's current mode; f'(lam) = <grad f(phi(lam)), d phi/d lam> exactly,
    NaN when slope=False."""
    device = next(model.parameters()).device
    t = torch.tensor(float(lam), device=device, requires_grad=slope)
    G = {k: v.to(device) for k, v in global_state.items()}
    L = {k: v.to(device) for k, v in local_state.items()}
    total, d, right, n = 0.0, 0.0, 0.0, 0
    for inputs, targets in samples:
        inputs, targets = to_device(inputs, device), targets.to(device)
        with torch.set_grad_enabled(slope):
            out = call_model(model, segment_state(G, L, t, space), inputs)
            loss = -likelihood.log_prob(out, targets).sum()
        if slope:
            d += float(torch.autograd.grad(loss, t)[0])
        if likelihood.correct is not None:
            right += float(likelihood.correct(out, targets).sum())
        total, n = total + float(loss.detach()), n + len(targets)
    return total / n, d / n if slope else math.nan, 1 - right / n if likelihood.correct is not None else None


def verified_weight(
    model: nn.Module,
    global_state: dict,
    local_state: dict,
    samples: list,
    likelihood: Likelihood = classification_likelihood,
    space: str = "ab",
) -> tuple[float, dict]:
    """The default weight (module docstring, steps 1-3) on held-out `samples`. Candidates are compared by
    held-out error, then loss (by loss alone where the likelihood defines no error): the grid search's own
    criterion, at three points. Returns (lam, info): the ends' losses, slopes and errors, the Hermite
    candidate and its verified loss/error, the candidate taken ("hermite", "local end", "federated end"), the
    barrier seen (f(lam_h) above the chord (1 - lam_h) f(0) + lam_h f(1); 0 when none or not measured) and
    the passes spent."""
    f0, d0, e0 = segment_loss(model, global_state, local_state, 0.0, samples, likelihood, space)
    f1, d1, e1 = segment_loss(model, global_state, local_state, 1.0, samples, likelihood, space)
    info = {
        "loss_local": f0,
        "loss_federated": f1,
        "slope_local": d0,
        "slope_federated": d1,
        "error_local": e0,
        "error_federated": e1,
        "lam_hermite": None,
        "loss_at_hermite": None,
        "error_at_hermite": None,
        "barrier": 0.0,
        "passes": {"forward_backward": 2, "forward": 0},
    }
    key = lambda f, e: (e if e is not None else 0.0, f if math.isfinite(f) else math.inf)
    ends = sorted([(key(f0, e0), 0.0, "local end"), (key(f1, e1), 1.0, "federated end")])
    if not all(math.isfinite(v) for v in (f0, f1, d0, d1)):
        lam = ends[0][1] if math.isfinite(f0) or math.isfinite(f1) else 0.5
        warnings.warn(
            f"verified_weight: non-finite loss or slope (f(0)={f0}, f(1)={f1}, f'(0)={d0}, f'(1)={d1}); "
            f"using lam = {lam}"
        )
        return lam, {**info, "candidate": "fallback (non-finite)"}
    lam_h, _ = cubic_minimiser(f0, f1, d0, d1)
    info["lam_hermite"] = lam_h
    if not 0 < lam_h < 1:  # the cubic's minimum is an end: nothing to verify
        return ends[0][1], {**info, "candidate": ends[0][2]}
    f_h, _, e_h = segment_loss(model, global_state, local_state, lam_h, samples, likelihood, space, slope=False)
    info.update(loss_at_hermite=f_h, error_at_hermite=e_h, barrier=max(0.0, f_h - ((1 - lam_h) * f0 + lam_h * f1)))
    info["passes"]["forward"] = 1
    if key(f_h, e_h) < ends[0][0]:
        return lam_h, {**info, "candidate": "hermite"}
    return ends[0][1], {**info, "candidate": ends[0][2]}  # a barrier the end points could not see
