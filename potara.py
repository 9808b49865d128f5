"""Potara: merge a federated adapter phi_G and a local adapter phi_L with a closed-form weight.

Read ../shared/ALGORITHM.md: (P) = the paper states it, (R) = a third-party reading of the
paper, (OURS) = this project's reconstruction, to be checked against a grid search.

Merge (P):      phi(lam) = lam * phi_G + (1 - lam) * phi_L    (both start from the same phi_0)
Bound (P, R):   E[L_k(phi(lam))] <= L_k* + (beta/2) tr Var(phi(lam)),
                tr Var(phi(lam)) = lam^2 a + (1 - lam)^2 b + 2 lam (1 - lam) c,
                a = tr Sigma_G, b = tr Sigma_L, c = tr Sigma_GL.
Closed form (R): lam* = (b - c) / (a + b - 2c), value (ab - c^2)/(a + b - 2c) <= min(a, b).
Estimator "paper" (OURS, the reconstruction of ALGORITHM.md, kept as is), from the diagonal
Fisher F of each model on n client samples:
                a = sum_j 1/(F_G[j] + eps'),   b = sum_j 1/(F_L[j] + eps'),
                rho = clip(sum_j X[j] / sqrt(sum_j E_G[j] sum_j E_L[j]), 0, 1),  c = min(rho sqrt(ab), a, b)
where E = mean_i g_i^2 (empirical Fisher), X = mean_i g_G,i * g_L,i (the cross moment of the two
models' per-sample log-likelihood gradients on the same samples: rho is their correlation), and
eps' = eps * (mean entry of (F_G + F_L)/2) is relative (OURS), so lam does not change when the
loss is rescaled.

Other estimators (OURS, `personalize(estimator=...)`, derivations in their docstrings): "bias"
(paper + each model's squared diagonal-Newton distance to the client optimum), "quadratic"
(the same closed form with a, b, c the curvature-weighted errors of a quadratic loss model, read
off the two end-point gradients along the segment) and "hermite", THE DEFAULT: lam* = the minimiser
on [0, 1] of the cubic through the client loss's values and slopes at both ends of the segment
(closed form: an end or a root of a quadratic). "quadratic" and "hermite" need held-out client
samples (not the ones the adapters were trained on). Evidence for the default: ablation.py (the
README's table): in six heterogeneity scenarios (synthetic data, tiny ViT), "hermite" on 100 validation
samples keeps >= 0.99 of the validation grid search's accuracy in each; "paper" on 32 training samples
drops to 0.76-0.86 of it wherever the local adapter is the better one (lam = 1.0, all weight on the
federated adapter, except under conflicting tasks: 0.77).

Everything takes `batches`, an iterable of (inputs, targets), and a pluggable `Likelihood`
(default: classification log-softmax; `causal_lm_likelihood` for token-level LM answers).
Usage:  merged, info = personalize(model, global_state, local_state, held_out_client_batches)

Degenerate numerics (documented, tested): a zero Fisher entry is absorbed by eps'; an all-zero
Fisher warns and uses eps as absolute; NaN in a statistic warns and gives lam = 0.5; an infinite
variance gives the other adapter all the weight; adapters with NaN/Inf are refused (AdapterError),
so a NaN adapter never comes out of personalize.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

try:  # torch >= 2.3; older versions only lose speed (vmap then loops over fused attention kernels)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    _batchable_attention = lambda: sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover
    from contextlib import nullcontext as _batchable_attention

from lora import check_state, lora_factor


# ----------------------------------------------------------------------------- likelihoods
@dataclass(frozen=True)
class Likelihood:
    """log_prob(output, targets) -> per-sample log p(targets | inputs), shape [batch];
    sample(output, targets, generator) -> targets drawn from the model (for the true Fisher)."""
    log_prob: Callable[[object, torch.Tensor], torch.Tensor]
    sample: Callable[[object, torch.Tensor, torch.Generator | None], torch.Tensor]


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _sample_from(logits: torch.Tensor, generator) -> torch.Tensor:
    probs = F.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


classification_likelihood = Likelihood(
    log_prob=lambda out, y: F.log_softmax(_logits(out).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1),
    sample=lambda out, y, g: _sample_from(_logits(out).detach(), g),
)


def _lm_log_prob(out, labels: torch.Tensor) -> torch.Tensor:
    # logits[:, t] predicts token t+1; label -100 marks prompt/padding (not scored)
    logp = F.log_softmax(_logits(out)[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * mask).sum(-1)


def _lm_sample(out, labels: torch.Tensor, generator) -> torch.Tensor:
    # teacher-forced: each answer token drawn from p(. | prompt, true previous tokens)
    drawn = _sample_from(_logits(out)[:, :-1].detach(), generator).to(labels.device)
    sampled = labels.clone()
    sampled[:, 1:] = torch.where(labels[:, 1:] != -100, drawn, labels[:, 1:])
    return sampled


causal_lm_likelihood = Likelihood(log_prob=_lm_log_prob, sample=_lm_sample)


# ----------------------------------------------------------------------------- per-sample gradients
def per_sample_grads(model: nn.Module, params: dict[str, torch.Tensor], inputs: torch.Tensor,
                     targets: torch.Tensor, likelihood: Likelihood = classification_likelihood,
                     chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """grad_params log p(targets_i | inputs_i) for every sample i at once, shape [batch, *param.shape],
    via torch.func: vmap(grad(f)) with functional_call (params override the model's own tensors)."""
    return _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size)[0]


def _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size=None):
    """per_sample_grads plus the per-sample log p(targets_i | inputs_i) of the same forward pass."""
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def log_lik(p, x, y):
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        log_p = likelihood.log_prob(out, y.unsqueeze(0)).sum()
        return log_p, log_p.detach()

    # The math attention backend: vmap has batching rules for its plain matmul/softmax ops, but not
    # for the fused CPU flash kernel (and its backward), where it falls back to a per-sample Python
    # loop (bench.py, section "fisher"). Same values, up to float rounding.
    with _batchable_attention():
        return vmap(grad(log_lik, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)


@dataclass
class GradStats:
    """Moments of per-sample log-likelihood gradients of the two adapters on the same n samples.
    fisher_* uses the requested labels (empirical or sampled); sq_*, cross and mean_* use the true
    labels: sq = mean g^2 (empirical Fisher), cross = mean g_G g_L, mean = mean g.
    delta = phi_G - phi_L; loglik_* = mean log p(y|x) of each adapter on the samples."""
    n: int
    fisher_G: dict[str, torch.Tensor]
    fisher_L: dict[str, torch.Tensor]
    sq_G: dict[str, torch.Tensor]
    sq_L: dict[str, torch.Tensor]
    cross: dict[str, torch.Tensor]
    mean_G: dict[str, torch.Tensor]
    mean_L: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor] = None
    loglik_G: float = 0.0
    loglik_L: float = 0.0


def _first_samples(batches: Iterable, n_samples: int):
    """Yield (inputs, targets) batches holding the first n_samples samples in total."""
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    left = n_samples
    for inputs, targets in batches:
        take = min(left, len(targets))
        yield inputs[:take], targets[:take]
        left -= take
        if left == 0:
            return
    if left == n_samples:
        raise ValueError("no samples: `batches` yielded nothing")


def gradient_stats(model: nn.Module, global_state: dict, local_state: dict, batches: Iterable,
                   n_samples: int = 32, labels: str = "empirical",
                   likelihood: Likelihood = classification_likelihood, seed: int = 0,
                   chunk_size: int | None = None) -> GradStats:
    """One pass over the first n_samples of `batches`, per-sample gradients at phi_G and phi_L
    (model in eval mode: no dropout), moments accumulated in float32 on the model's device.
    When global_state IS local_state (diag_fisher), the gradients are computed once and shared."""
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    same = global_state is local_state
    device = next(model.parameters()).device
    states = {"G": {k: v.to(device) for k, v in global_state.items()},
              "L": {k: v.to(device) for k, v in local_state.items()}}
    zeros = lambda: {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in states["G"].items()}
    acc = {name: zeros() for name in ("fisher_G", "fisher_L", "sq_G", "sq_L", "cross", "mean_G", "mean_L")}
    gen = torch.Generator(device=device).manual_seed(seed)
    loglik = {"G": torch.zeros((), device=device), "L": torch.zeros((), device=device)}
    was_training, n = model.training, 0
    model.eval()
    try:
        for inputs, targets in _first_samples(batches, n_samples):
            inputs, targets = inputs.to(device), targets.to(device)
            g = {}
            for m, params in states.items():
                if m == "L" and same:  # one model: its statistics are G's (copied after the loop)
                    continue
                grads, log_p = _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size)
                g[m] = {k: v.float() for k, v in grads.items()}
                loglik[m] += log_p.sum()  # from the gradient pass itself: no extra forward
                if labels == "sampled":
                    with torch.no_grad():
                        drawn = likelihood.sample(functional_call(model, params, (inputs,)), targets, gen)
                    g_f = per_sample_grads(model, params, inputs, drawn, likelihood, chunk_size)
                    for k, v in g_f.items():
                        acc[f"fisher_{m}"][k] += v.float().pow(2).sum(0)
            for k in acc["cross"]:
                sq_G = g["G"][k].pow(2).sum(0)
                acc["sq_G"][k] += sq_G
                acc["mean_G"][k] += g["G"][k].sum(0)
                if same:
                    acc["cross"][k] += sq_G
                else:
                    acc["sq_L"][k] += g["L"][k].pow(2).sum(0)
                    acc["mean_L"][k] += g["L"][k].sum(0)
                    acc["cross"][k] += (g["G"][k] * g["L"][k]).sum(0)
            n += len(targets)
    finally:
        model.train(was_training)
    if same:
        for name in ("sq", "mean", "fisher"):
            acc[f"{name}_L"] = acc[f"{name}_G"]
        loglik["L"] = loglik["G"]
    stats = {name: {k: v / n for k, v in d.items()} for name, d in acc.items()}
    if labels == "empirical":
        stats["fisher_G"], stats["fisher_L"] = stats["sq_G"], stats["sq_L"]
    delta = {k: (states["G"][k].float() - states["L"][k].float()) for k in states["G"]}
    return GradStats(n=n, **stats, delta=delta, loglik_G=loglik["G"].item() / n, loglik_L=loglik["L"].item() / n)


def diag_fisher(model: nn.Module, batches: Iterable, n_samples: int = 32, labels: str = "empirical",
                likelihood: Likelihood = classification_likelihood, seed: int = 0,
                chunk_size: int | None = None) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's current adapter: F[j] = (1/n) sum_i (d/dtheta_j log p(y_i|x_i))^2,
    the mean of SQUARED PER-SAMPLE gradients (not the square of a batch gradient). labels="empirical"
    uses the data's y_i (empirical Fisher); "sampled" draws y_i ~ p(.|x_i) from the model (true Fisher)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return gradient_stats(model, state, state, batches, n_samples, labels, likelihood, seed, chunk_size).fisher_G


# ----------------------------------------------------------------------------- closed form
def potara_weight(a: float, b: float, c: float, tol: float = 1e-12) -> float:
    """lam* = argmin_lam lam^2 a + (1-lam)^2 b + 2 lam(1-lam) c = (b - c) / (a + b - 2c).

    Documented edge cases (OURS, ALGORITHM.md leaves them open):
      * a or b negative: ValueError (they are traces of covariances).
      * NaN anywhere: warning, lam = 0.5 (no information).
      * a = inf (federated model infinitely uncertain): lam = 0; b = inf: lam = 1; both: 0.5.
      * c is clipped to [0, min(a, b)]: the range where lam* lies in [0, 1] (c < 0 would still give
        lam* in (0, 1); clipping it to 0 matches the estimator's clip of rho to [0, 1]).
      * a + b - 2c <= tol * (a + b) (equally uncertain and fully correlated, or a = b = 0): every
        lam gives the same bound; lam = 0.5.
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


def _per_group(granularity: str, terms: Callable[[list[str]], tuple[float, float, float]], keys):
    out = {g: terms(ks) for g, ks in _groups(keys, granularity).items()}
    if granularity == "client":
        return out["client"]
    return tuple({g: v[i] for g, v in out.items()} for i in range(3))


def _inverse_fisher_terms(stats: GradStats, eps: float, granularity: str, bias: bool):
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
        if bias:  # + squared diagonal-Newton distance to the client optimum, (E[g] / F)^2
            a += float((cat(stats.mean_G) / (FG + eps_abs)).pow(2).sum())
            b += float((cat(stats.mean_L) / (FL + eps_abs)).pow(2).sum())
        norm = math.sqrt(float(cat(stats.sq_G).sum()) * float(cat(stats.sq_L).sum()))
        rho = min(max(float(cat(stats.cross).sum()) / norm, 0.0), 1.0) if norm > 0 else 0.0
        return a, b, min(rho * math.sqrt(a * b), a, b)

    return _per_group(granularity, terms, list(stats.fisher_G))


def variance_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """The "paper" estimator of (a, b, c) (module docstring). Returns floats for granularity="client",
    dicts {module: value} for "module" (one weight per adapted module)."""
    return _inverse_fisher_terms(stats, eps, granularity, bias=False)


def bias_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """Estimator "bias" (OURS): "paper" plus each model's squared bias on the client's data,
    a = sum_j 1/(F_G[j] + eps') + sum_j (E[g_G,j] / (F_G[j] + eps'))^2 (and b likewise): E[g]/F is the
    diagonal-Newton step from the adapter to the client's optimum, so a model that fits the client
    badly (large mean gradient) is no longer taken as certain just because its Fisher is large."""
    return _inverse_fisher_terms(stats, eps, granularity, bias=True)


def quadratic_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """Estimator "quadratic" (OURS): the paper's bound with realised, curvature-weighted errors.

    Take the client loss near the adapters as L(phi) = L* + 1/2 (phi - phi*)^T H (phi - phi*). With
    e_G = phi_G - phi*, e_L = phi_L - phi*:  L(phi(lam)) - L* = 1/2 [lam^2 a + (1-lam)^2 b + 2 lam(1-lam) c],
    a = e_G^T H e_G, b = e_L^T H e_L, c = e_G^T H e_L, the same form as the variance bound, so the same
    lam* = (b - c)/(a + b - 2c) minimises it. The end-point gradients grad L(phi_G) = H e_G and
    grad L(phi_L) = H e_L give the two differences it needs, without H or phi*:
        a - c = <grad L(phi_G), phi_G - phi_L>,   b - c = <grad L(phi_L), phi_L - phi_G>,
    i.e. lam* is the minimiser of the quadratic through the two directional derivatives along the
    segment. Returned as (a - c, b - c, 0). a - c <= 0 (the loss still falls beyond phi_G) gives lam = 1,
    b - c <= 0 gives lam = 0, both (concave along the segment): the end with the smaller loss.
    Estimate on held-out client samples: on the local adapter's own training samples grad L(phi_L) ~ 0,
    which always favours phi_L. `eps` is unused (no inverse Fisher here).
    """
    def terms(keys):
        dot = lambda mean: sum(float((mean[k].double() * stats.delta[k].double()).sum()) for k in keys)
        a_c, b_c = -dot(stats.mean_G), dot(stats.mean_L)  # loss gradient = -(log-likelihood gradient)
        if a_c <= 0 and b_c <= 0:
            better_G = stats.loglik_G > stats.loglik_L
            return (0.0, 1.0, 0.0) if better_G else (1.0, 0.0, 0.0) if stats.loglik_L > stats.loglik_G else (1.0, 1.0, 0.0)
        return max(a_c, 0.0), max(b_c, 0.0), 0.0

    return _per_group(granularity, terms, list(stats.mean_G))


def segment_loss(stats: GradStats) -> tuple[float, float, float, float]:
    """The client loss f(lam) = -mean_i log p(y_i | x_i; phi(lam)) along phi(lam) = phi_L + lam (phi_G - phi_L),
    at both ends: (f(0), f(1), f'(0), f'(1)), with f'(lam) = <grad f(phi(lam)), phi_G - phi_L> (exact
    directional derivatives of the merged adapter's loss, whatever the model)."""
    dot = lambda mean: sum(float((mean[k].double() * stats.delta[k].double()).sum()) for k in stats.delta)
    return -stats.loglik_L, -stats.loglik_G, -dot(stats.mean_L), -dot(stats.mean_G)


def cubic_minimiser(f0: float, f1: float, d0: float, d1: float) -> tuple[float, float]:
    """argmin over [0, 1] of the cubic Hermite interpolant p(0) = f0, p(1) = f1, p'(0) = d0, p'(1) = d1:
        p(t) = f0 + d0 t + c2 t^2 + c3 t^3,  c2 = 3 (f1 - f0) - 2 d0 - d1,  c3 = 2 (f0 - f1) + d0 + d1,
    the candidates being 0, 1 and the roots of p'(t) = d0 + 2 c2 t + 3 c3 t^2 in (0, 1) (ties: nearest 0.5;
    a constant p: 0.5). Returns (t*, p''(t*))."""
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


def hermite_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """Estimator "hermite" (OURS, the default): the minimiser of the client loss along the merge segment,
    modelled by the cubic through its values AND slopes at both ends (segment_loss, cubic_minimiser).

    "quadratic" uses the two slopes only, i.e. it assumes f''(lam) is constant. On held-out samples the
    loss of an over-fitted adapter is not: it climbs steeply next to that adapter (over-confident wrong
    answers) and flattens elsewhere, and the slopes alone then misplace the minimum (by 0.2 in lam on
    average in ablation.py's few-shot scenario, where they favour the local adapter). The cubic
    Hermite interpolant p of (f(0), f'(0), f(1), f'(1)) is exact for any cubic f (so for any quadratic,
    where it equals "quadratic"), and its minimiser on [0, 1] is closed form: an end point or a root of
    the quadratic p'. No search over lam, no extra forward pass: the two losses come with the gradients.
    Returned in the paper's form as the quadratic osculating p at t* (c = 0): a = (1 - t*) k, b = t* k,
    k = p''(t*) (or 1 where p''(t*) <= 0, a minimum at an end of a concave stretch), so that
    potara_weight(a, b, c) = t* and a + b - 2c is the loss curvature there.
    Estimate on held-out client samples (ablation.py: 100 validation samples track the grid search in
    every scenario, 32 a little less well); on the local adapter's own training samples its loss and
    slope are ~0, which always favours phi_L. One weight per client: the loss values are not per module.
    `eps` is unused. NaN statistics give (nan, nan, nan), hence lam = 0.5 with a warning.
    """
    if granularity != "client":
        raise ValueError(f"estimator 'hermite' gives one weight per client (the loss values are not per module), "
                         f"got granularity={granularity!r}: use granularity='client' or estimator='quadratic'")
    f0, f1, d0, d1 = segment_loss(stats)
    if not all(math.isfinite(v) for v in (f0, f1, d0, d1)):
        return math.nan, math.nan, math.nan
    t, curvature = cubic_minimiser(f0, f1, d0, d1)
    k = curvature if curvature > 0 else 1.0
    return (1 - t) * k, t * k, 0.0


# ----------------------------------------------------------------------------- merging
def _lam_for(key: str, lam) -> float:
    return float(lam[module_of(key)]) if isinstance(lam, dict) else float(lam)


def merge_adapters(global_state: dict, local_state: dict, lam, space: str = "ab") -> dict[str, torch.Tensor]:
    """Merge two adapters with weight lam on the global one (a float, or {module: lam}).

    space="ab" (the paper's practice, R): every tensor, LoRA factors included, is
        lam * G + (1 - lam) * L. Note B A of the result is NOT the convex merge of the two B A.
    space="delta" (OURS, exact): each LoRA pair becomes a rank-2r adapter by concatenation,
        A = [A_G; A_L],  B = [lam B_G, (1 - lam) B_L]  =>  B A = lam B_G A_G + (1 - lam) B_L A_L,
    so the layer's output is exactly lam f_G(x) + (1 - lam) f_L(x); other tensors (heads, biases:
    linear in the output) are combined convexly. Load with load_lora_state_dict(..., allow_rank_change=True).
    """
    if space not in ("ab", "delta"):
        raise ValueError(f"space must be 'ab' or 'delta', got {space!r}")
    if set(global_state) != set(local_state):
        raise ValueError("merge_adapters: the two adapters have different keys")
    merged = {}
    for k, G in global_state.items():
        L, w = local_state[k], _lam_for(k, lam)
        if space == "delta" and lora_factor(k) == "A":
            merged[k] = torch.cat([G, L], dim=0)
        elif space == "delta" and lora_factor(k) == "B":
            merged[k] = torch.cat([w * G, (1 - w) * L], dim=1).to(G.dtype)
        else:
            merged[k] = (w * G.double() + (1 - w) * L.double()).to(G.dtype)
    return merged


def fisher_merge(global_state: dict, local_state: dict, fisher_G: dict, fisher_L: dict,
                 eps: float = 1e-8) -> dict[str, torch.Tensor]:
    """Fisher merging baseline (Matena & Raffel, 2022): per parameter,
    theta = (F_G theta_G + F_L theta_L) / (F_G + F_L), eps guarding entries where both are zero."""
    out = {}
    for k, G in global_state.items():
        fg, fl = fisher_G[k].double().cpu() + eps, fisher_L[k].double().cpu() + eps
        out[k] = ((fg * G.double() + fl * local_state[k].double()) / (fg + fl)).to(G.dtype)
    return out


ESTIMATORS = {"paper": variance_terms, "bias": bias_terms, "quadratic": quadratic_terms, "hermite": hermite_terms}
DEFAULT_ESTIMATOR = "hermite"  # ablation.py: the best in its worst scenario; "paper" is one flag away


def weight_from_stats(stats: GradStats, estimator: str = "paper", eps: float = 1e-3, granularity: str = "client"):
    """(a, b, c) of the estimator -> lam* = potara_weight(a, b, c). Returns (lam, {"a", "b", "c"}): floats
    for granularity="client", dicts {module: value} for "module"."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
    a, b, c = ESTIMATORS[estimator](stats, eps=eps, granularity=granularity)
    lam = {g: potara_weight(a[g], b[g], c[g]) for g in a} if isinstance(a, dict) else potara_weight(a, b, c)
    return lam, {"a": a, "b": b, "c": c}


def personalize(model: nn.Module, global_state: dict, local_state: dict, batches: Iterable,
                n_samples: int = 100, labels: str = "empirical", eps: float = 1e-3, granularity: str = "client",
                space: str = "ab", estimator: str = DEFAULT_ESTIMATOR,
                likelihood: Likelihood = classification_likelihood, seed: int = 0,
                chunk_size: int | None = None, stats: GradStats | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The client-side Potara step: statistics on the first n_samples of `batches` -> (a, b, c) -> lam* ->
    merged adapter. Returns (merged_state, info) with info = {a, b, c, lam, n_samples, ...}.
    Which samples: the default estimator ("hermite") needs HELD-OUT client samples (e.g. a validation
    split the adapters were not trained on; 100 by default, fewer are noisier); "paper" was meant for
    ~32 of the client's training samples (R). `labels` and `eps` only matter to "paper" and "bias".
    chunk_size bounds how many per-sample gradients vmap holds at once (memory for large models).
    `stats`: gradient_stats of these same two adapters, already computed (then `batches` is not read)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose from {sorted(ESTIMATORS)}")
    check_state(global_state, global_state, what="global adapter")  # finite values
    check_state(local_state, global_state, what="local adapter")  # same keys, shapes, dtypes; finite
    if stats is None:
        stats = gradient_stats(model, global_state, local_state, batches, n_samples, labels, likelihood, seed,
                               chunk_size)
    lam, terms = weight_from_stats(stats, estimator, eps, granularity)
    info = {**terms, "lam": lam, "n_samples": stats.n, "labels": labels, "eps": eps,
            "granularity": granularity, "space": space, "estimator": estimator}
    merged = merge_adapters(global_state, local_state, lam, space)
    check_state(merged, merged, what="merged adapter")  # never hand back a NaN adapter
    return merged, info
