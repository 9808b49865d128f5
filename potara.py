"""Potara (arXiv 2602.18658): personalise a client by merging its federated adapter phi_G and its local adapter phi_L
with a weight lam in closed form. Stands alone (torch only): copy this file into any project; it works on any model
whose adapter is its trainable tensors (lora.py's, or peft's).

    merged, info = personalize(model, phi_G, phi_L, held_out=val_batches)        # info["lam"]: the weight on phi_G
    merged, info = personalize(model, phi_G, phi_L, held_out=val_batches, estimator=PaperFisher())   # the paper's
    lora.load_lora_state_dict(model, merged)                       # space="ab" (the default)
    lora.load_lora_state_dict(model, merged, allow_rank_change=True)   # space="delta": rank-2r factors

`held_out` is an iterable of (inputs, targets) batches of the client's HELD-OUT samples (inputs a tensor, a tuple of
tensors or a dict of tensors such as input_ids + attention_mask; batch first). Sources, as docs/algorithm.md marks
them: (P) the paper states it, (R) a third-party reading of the paper, (OURS) this project's reconstruction.

Merge (P):       phi(lam) = lam phi_G + (1 - lam) phi_L      (both adapters start from the same phi_0)
Bound (P, R):    E[L_k(phi(lam))] <= L_k* + (beta/2) tr Var(phi(lam)),
                 tr Var(phi(lam)) = lam^2 a + (1 - lam)^2 b + 2 lam (1 - lam) c,  a = tr S_G, b = tr S_L, c = tr S_GL
Closed form (R): lam* = (b - c) / (a + b - 2c), with value (ab - c^2)/(a + b - 2c) <= min(a, b)   (potara_weight)
The paper's estimator, PaperFisher (OURS reconstruction), from the diagonal Fisher of each adapter on n samples:
                 a = sum_j 1/(F_G[j] + eps'),  b = sum_j 1/(F_L[j] + eps'),  eps' = eps * mean entry of (F_G + F_L)/2,
                 rho = clip(sum_j X[j] / sqrt(sum_j E_G[j] sum_j E_L[j]), 0, 1),  c = min(rho sqrt(ab), a, b),
                 E = mean_i g_i^2 (empirical Fisher), X = mean_i g_G,i g_L,i  (g: per-sample gradients of log p)
The default, Verified (OURS), on f(lam) = -mean_i log p(y_i | x_i; phi(lam)) over the held-out samples:
  1. f(0), f'(0), f(1), f'(1): one forward-backward pass at each end (exact directional derivatives);
  2. lam_h = argmin over [0, 1] of the cubic Hermite interpolant of those four numbers (closed form);
  3. lam_h inside (0, 1): one forward pass; lam_h is kept only if it beats both ends by held-out error, then loss
     (the grid search's own criterion); else the better end (a loss barrier: the adapters are not linearly
     connected there). Cost: 2 forward-backward + at most 1 forward pass; never a grid.
On the adapters' own training samples phi_L sits at a minimum and the weight favours it. No statistic of the
samples alone tells those from a task phi_L has learned perfectly, so nothing here warns: keeping the samples
held out is the caller's job (the demos check their splits exactly: data.warn_held_out_overlap).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterable, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap
from torch.utils._pytree import tree_map

try:  # torch >= 2.3; older versions only lose speed (vmap then loops over fused attention kernels)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _batchable_attention = lambda: sdpa_kernel([SDPBackend.MATH])
except ImportError:  # pragma: no cover
    from contextlib import nullcontext as _batchable_attention

N_SAMPLES = 100  # the one default sample count: personalize, gradient_stats, diag_fisher


# ----------------------------------------------------------------------------- inputs and likelihoods
def call_model(model: nn.Module, params: dict, inputs):
    """model(inputs) with `params` in place of the model's own tensors (functional_call); a dict of inputs is
    passed as keyword arguments, a tuple/list as positional ones."""
    if isinstance(inputs, Mapping):
        return functional_call(model, params, (), dict(inputs))
    return functional_call(model, params, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))


def to_device(inputs, device):
    return tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, inputs)


def first_samples(batches: Iterable, n_samples: int):
    """Yield (inputs, targets) batches holding the first n_samples samples in total."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples <= 0:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    left = n_samples
    for inputs, targets in batches:
        take = min(left, len(targets))
        yield tree_map(lambda t: t[:take] if isinstance(t, torch.Tensor) else t, inputs), targets[:take]
        left -= take
        if left == 0:
            return
    if left == n_samples:
        raise ValueError("no samples: the batches yielded nothing")


@dataclass(frozen=True)
class Likelihood:
    """log_prob(output, targets) -> per-sample log p(targets | inputs), shape [batch]; sample(output, targets,
    generator) -> targets drawn from the model (the true Fisher); correct(output, targets) -> per-sample 1.0 where
    the prediction is right (what a grid search over lam would choose by), or None where no such metric exists."""

    log_prob: Callable[[object, torch.Tensor], torch.Tensor]
    sample: Callable[[object, torch.Tensor, torch.Generator | None], torch.Tensor] | None = None
    correct: Callable[[object, torch.Tensor], torch.Tensor] | None = None


def _logits(output) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _sample_from(logits: torch.Tensor, generator) -> torch.Tensor:
    probs = F.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


classification_likelihood = Likelihood(
    log_prob=lambda out, y: F.log_softmax(_logits(out).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1),
    sample=lambda out, y, g: _sample_from(_logits(out).detach(), g),
    correct=lambda out, y: (_logits(out).argmax(-1) == y).float(),
)


def _lm_log_prob(out, labels: torch.Tensor) -> torch.Tensor:
    # logits[:, t] predicts token t+1; label -100 marks prompt/padding (not scored)
    logp = F.log_softmax(_logits(out)[:, :-1].float(), -1)
    tgt = labels[:, 1:]
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (tok * (tgt != -100)).sum(-1)


def _lm_sample(out, labels: torch.Tensor, generator) -> torch.Tensor:
    # teacher-forced: each answer token drawn from p(. | prompt, true previous tokens)
    drawn = _sample_from(_logits(out)[:, :-1].detach(), generator).to(labels.device)
    sampled = labels.clone()
    sampled[:, 1:] = torch.where(labels[:, 1:] != -100, drawn, labels[:, 1:])
    return sampled


causal_lm_likelihood = Likelihood(log_prob=_lm_log_prob, sample=_lm_sample)  # labels: -100 where not scored


# ----------------------------------------------------------------------------- per-sample gradients, the Fisher
_warned_loop: set[str] = set()


def per_sample_grads(model, params, inputs, targets, likelihood=classification_likelihood, chunk_size=None) -> dict:
    """grad_params log p(targets_i | inputs_i) for every sample i, shape [batch, *param.shape]: torch.func's
    vmap(grad) over the batch, or, where vmap cannot batch the model (it branches on tensor values, as Hugging Face
    attention masks do), a loop over single samples (the same values, slower; warned once per model class)."""
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def log_lik(p, x, y):  # x, y: one sample (batch dimension removed)
        one = tree_map(lambda t: t.unsqueeze(0), x)
        return likelihood.log_prob(call_model(model, (p, frozen, buffers), one), y.unsqueeze(0)).sum()

    # The math attention backend: vmap has batching rules for its plain matmul/softmax ops, but not for the
    # fused CPU flash kernel (and its backward), where it falls back to a per-sample Python loop.
    with _batchable_attention():
        try:
            return vmap(grad(log_lik), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, inputs, targets)
        except RuntimeError as e:  # e.g. "vmap: ... data-dependent control flow" (branches on mask values)
            name = type(model).__name__
            if name not in _warned_loop:
                _warned_loop.add(name)
                reason = " ".join(str(e).split())[:160]
                warnings.warn(
                    f"per-sample gradients: vmap cannot batch {name}, looping over single samples instead "
                    f"(same values, slower); vmap said: {reason}"
                )
        rows = [grad(log_lik)(params, tree_map(lambda t: t[i], inputs), targets[i]) for i in range(len(targets))]
    return {k: torch.stack([g[k] for g in rows]) for k in params}


@dataclass
class GradStats:
    """Moments of the per-sample gradients of log p(y|x) at both adapters on the same n samples: fisher_* with
    the requested labels (empirical or sampled); sq_* = mean g^2 (empirical Fisher), cross = mean g_G g_L and
    mean_* = mean g with the true labels."""

    n: int
    fisher_G: dict[str, torch.Tensor]
    fisher_L: dict[str, torch.Tensor]
    sq_G: dict[str, torch.Tensor]
    sq_L: dict[str, torch.Tensor]
    cross: dict[str, torch.Tensor]
    mean_G: dict[str, torch.Tensor]
    mean_L: dict[str, torch.Tensor]


def gradient_stats(
    model: nn.Module,
    global_state: dict,
    local_state: dict,
    batches: Iterable,
    n_samples: int = N_SAMPLES,
    labels: str = "empirical",
    likelihood: Likelihood = classification_likelihood,
    seed: int = 0,
    chunk_size: int | None = None,
) -> GradStats:
    """One pass over the first n_samples of `batches`, per-sample gradients at phi_G and phi_L (model in eval
    mode: no dropout), moments accumulated in float32 on the model's device. labels="sampled" draws y_i ~ p(.|x_i)
    for fisher_* (the true Fisher). When global_state IS local_state (diag_fisher) the gradients are computed once."""
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    same = global_state is local_state
    device = next(model.parameters()).device
    states = {m: {k: v.to(device) for k, v in s.items()} for m, s in (("G", global_state), ("L", local_state))}
    zeros = lambda: {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in states["G"].items()}
    acc = {name: zeros() for name in ("fisher_G", "fisher_L", "sq_G", "sq_L", "cross", "mean_G", "mean_L")}
    gen = torch.Generator(device=device).manual_seed(seed)
    was_training, n = model.training, 0
    model.eval()
    try:
        for inputs, targets in first_samples(batches, n_samples):
            inputs, targets = to_device(inputs, device), targets.to(device)
            g = {}
            for m, params in states.items():
                if m == "L" and same:  # one model: its statistics are G's (copied after the loop)
                    continue
                grads = per_sample_grads(model, params, inputs, targets, likelihood, chunk_size)
                g[m] = {k: v.float() for k, v in grads.items()}
                if labels == "sampled":
                    with torch.no_grad():
                        drawn = likelihood.sample(call_model(model, params, inputs), targets, gen)
                    for k, v in per_sample_grads(model, params, inputs, drawn, likelihood, chunk_size).items():
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
    stats = {name: {k: v / n for k, v in d.items()} for name, d in acc.items()}
    if labels == "empirical":
        stats["fisher_G"], stats["fisher_L"] = stats["sq_G"], stats["sq_L"]
    return GradStats(n=n, **stats)


def diag_fisher(model: nn.Module, batches: Iterable, n_samples: int = N_SAMPLES, **options) -> dict:
    """The diagonal Fisher of the model's current adapter, F[j] = (1/n) sum_i (d/dtheta_j log p(y_i|x_i))^2: the mean
    of SQUARED PER-SAMPLE gradients (not the square of a batch gradient). labels="empirical" uses the data's y_i
    (empirical Fisher), "sampled" draws y_i ~ p(.|x_i) from the model (true Fisher). options: gradient_stats's
    labels, likelihood, seed, chunk_size."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return gradient_stats(model, state, state, batches, n_samples, **options).fisher_G


# ----------------------------------------------------------------------------- the closed form, the paper's estimator
def potara_weight(a: float, b: float, c: float, tol: float = 1e-12) -> float:
    """lam* = argmin_lam lam^2 a + (1-lam)^2 b + 2 lam(1-lam) c = (b - c) / (a + b - 2c)   (R).

    Edge cases (OURS: the paper leaves them open): a or b negative: ValueError (traces of covariances); NaN
    anywhere: a warning and lam = 0.5 (no information); a = inf: lam = 0, b = inf: lam = 1, both: 0.5; c clipped
    to [0, min(a, b)], where lam* lies in [0, 1]; a + b - 2c <= tol (a + b) (equal and fully correlated): 0.5."""
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


def variance_terms(stats: GradStats, eps: float = 1e-3, granularity: str = "client", bias: bool = False):
    """The paper's estimator of (a, b, c) (module docstring): floats for granularity="client", {module: value}
    dicts for "module" (one weight per adapted module). bias=True, a variant the estimator study tries, adds each
    model's squared diagonal-Newton distance to the client optimum, sum_j (E[g_j]/F_j)^2."""
    if not eps > 0:
        raise ValueError(f"eps must be positive, got {eps}")
    if granularity not in ("client", "module"):
        raise ValueError(f"granularity must be 'client' or 'module', got {granularity!r}")

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

    groups: dict[str, list[str]] = {}
    for k in stats.fisher_G:
        groups.setdefault("client" if granularity == "client" else module_of(k), []).append(k)
    out = {g: terms(ks) for g, ks in groups.items()}
    return out["client"] if granularity == "client" else tuple({g: v[i] for g, v in out.items()} for i in range(3))


def paper_weight(stats: GradStats, eps: float = 1e-3, granularity: str = "client"):
    """The paper's weight from the gradient statistics: (lam, {"a", "b", "c"}); floats, or {module: value}."""
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


_LORA_FACTOR = re.compile(r"(?:^|\.)lora_([AB])(?:_[qkv]|(?:\.[A-Za-z_]\w*)?\.weight)?$")  # ours and peft's keys


def lora_factor(name: str) -> str | None:
    """'A' or 'B' for a LoRA factor's key (lora.py's `m.lora_A`, `m.lora_B_q`; peft's `m.lora_A.weight`,
    `m.lora_A.default.weight`), None for any other tensor (a head, a bias)."""
    m = _LORA_FACTOR.search(name)
    return m.group(1) if m else None


def segment_state(global_state: dict, local_state: dict, lam, space: str = "ab") -> dict[str, torch.Tensor]:
    """phi(lam), differentiable in lam when lam is a tensor. space="ab": every tensor lam G + (1 - lam) L;
    "delta": LoRA pairs concatenated (merge_adapters), so each layer's output is lam f_G(x) + (1 - lam) f_L(x)."""
    out = {}
    for k, G in global_state.items():
        L, factor = local_state[k], lora_factor(k) if space == "delta" else None
        w = lam.to(G.dtype) if isinstance(lam, torch.Tensor) else lam
        if factor == "A":
            out[k] = torch.cat([G, L], 0)
        elif factor == "B":
            out[k] = torch.cat([w * G, (1 - w) * L], 1)
        else:
            out[k] = L + w * (G - L)
    return out


def segment_loss(
    model, global_state, local_state, lam, samples, likelihood=classification_likelihood, space="ab", slope=True
):
    """(f(lam), f'(lam), error(lam)) over `samples`, a list of (inputs, targets) batches: f(lam) = -(1/n) sum_i
    log p(y_i | x_i; phi(lam)), error the fraction of wrong predictions (likelihood.correct; None where undefined).
    One forward (+ backward to the scalar lam when slope) per batch, in the model's current mode;
    f'(lam) = <grad f(phi(lam)), d phi / d lam> exactly, NaN when slope=False."""
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


def verified_weight(model, global_state, local_state, samples, likelihood=classification_likelihood, space="ab"):
    """The default weight (module docstring, steps 1-3) on held-out `samples`. Returns (lam, info): the ends' losses,
    slopes and errors, the Hermite candidate and its verified loss and error, the candidate taken ("hermite",
    "local end", "federated end"), the barrier seen (f(lam_h) above the chord; 0 when none or not measured) and
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
    key = lambda f, e: (e if e is not None else 0.0, f if math.isfinite(f) else math.inf)  # error, then loss
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


# ----------------------------------------------------------------------------- the merge
def merge_adapters(global_state: dict, local_state: dict, lam, space: str = "ab") -> dict[str, torch.Tensor]:
    """Merge two adapters with weight lam on the global one (a float, or {module: lam}), in float64.

    space="ab" (the paper's practice, R): every tensor, LoRA factors included, is lam G + (1 - lam) L
        (B A of the result is NOT the convex merge of the two B A: the product has cross terms).
    space="delta" (OURS, exact): each LoRA pair becomes a rank-2r adapter by concatenation,
        A = [A_G; A_L],  B = [lam B_G, (1 - lam) B_L]  =>  B A = lam B_G A_G + (1 - lam) B_L A_L,
    so the layer's output is exactly lam f_G(x) + (1 - lam) f_L(x); other tensors (heads, biases) are combined
    convexly. Load it with lora.load_lora_state_dict(model, merged, allow_rank_change=True)."""
    if space not in ("ab", "delta"):
        raise ValueError(f"space must be 'ab' or 'delta', got {space!r}")
    if set(global_state) != set(local_state):
        raise ValueError("merge_adapters: the two adapters have different keys")
    if space == "delta" and not any(lora_factor(k) for k in global_state):
        raise ValueError(
            f"merge_adapters(space='delta'): no LoRA factor among the keys ({sorted(global_state)[:4]}"
            f"...); expected names like '<module>.lora_A' / '<module>.lora_B.weight'"
        )
    merged = {}
    for k, G in global_state.items():
        w = float(lam[module_of(k)]) if isinstance(lam, dict) else float(lam)
        merged[k] = segment_state({k: G.double()}, {k: local_state[k].double()}, w, space)[k].to(G.dtype)
    return merged


@dataclass(frozen=True)
class Verified:
    """The default estimator (verified_weight): one weight per client, 2 forward-backward passes + at most 1
    forward pass on the held-out samples. It takes no options."""

    name: ClassVar[str] = "verified"


@dataclass(frozen=True)
class PaperFisher:
    """The paper's estimator (paper_weight): a, b, c of the variance-trace bound from each adapter's diagonal
    Fisher (gradient_stats), lam* = (b - c) / (a + b - 2c)."""

    name: ClassVar[str] = "paper"
    granularity: str = "client"  # "module": one lam per adapted module
    labels: str = "empirical"  # "sampled": the true Fisher, labels drawn from the model
    eps: float = 1e-3  # the Fisher floor, relative to its mean entry
    seed: int = 0  # the label sampling's seed
    chunk_size: int | None = None  # samples per vmap chunk (memory); None: the whole batch

    def __post_init__(self):
        if self.granularity not in ("client", "module"):
            raise ValueError(f"granularity must be 'client' or 'module', got {self.granularity!r}")
        if self.labels not in ("empirical", "sampled"):
            raise ValueError(f"labels must be 'empirical' or 'sampled', got {self.labels!r}")
        if not self.eps > 0:
            raise ValueError(f"eps must be positive, got {self.eps}")


Estimator = Union[Verified, PaperFisher]
ESTIMATORS = {"verified": Verified, "paper": PaperFisher}  # by name, for command lines and configs
DEFAULT_ESTIMATOR = Verified.name


def paper_merge(stats: GradStats, global_state, local_state, space="ab", estimator: PaperFisher = PaperFisher()):
    """The paper's step from statistics already computed (gradient_stats with estimator.labels): lam =
    paper_weight(stats), then the merge; returns (merged_state, info) as personalize does."""
    lam, info = paper_weight(stats, estimator.eps, estimator.granularity)
    info.update(lam=lam, estimator=estimator.name, space=space, n_samples=stats.n)
    info.update(granularity=estimator.granularity, labels=estimator.labels, eps=estimator.eps)
    return merge_adapters(global_state, local_state, lam, space), info


def check_state(state, reference: dict[str, torch.Tensor], what: str) -> None:
    """A ValueError naming the tensor unless `state` has exactly `reference`'s keys, each a dense tensor of the
    reference's dtype and shape, with finite values."""
    if not isinstance(state, dict):
        raise ValueError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    if set(state) != set(reference):
        missing, extra = sorted(set(reference) - set(state), key=str), sorted(set(state) - set(reference), key=str)
        raise ValueError(f"{what}: keys do not match: missing {missing[:5]}, unexpected {extra[:5]}"[:400])
    for k, t in state.items():
        like = reference[k]
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{what}: {k} is not a dense tensor ({getattr(t, 'layout', type(t).__name__)})")
        if t.dtype != like.dtype:
            raise ValueError(f"{what}: {k} has dtype {t.dtype}, expected {like.dtype}")
        if t.shape != like.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(t.shape)}, expected {tuple(like.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {k} holds NaN or Inf values")


def check_adapters(model: nn.Module, global_state: dict, local_state: dict) -> None:
    """A ValueError for what would give a silently wrong weight: a merged model (its LoRA gradients are zero),
    adapters whose keys, dtypes or shapes differ from the model's trainable tensors (a missing head would run
    with the model's current one), NaN/Inf values."""
    if any(getattr(m, "merged", False) is True for m in model.modules()):
        raise ValueError("personalize: the model's LoRA layers are merged; unmerge them first (lora.unmerge_lora)")
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("personalize: the model has no trainable tensors (add LoRA first: lora.add_lora)")
    check_state(global_state, trainable, "global adapter")
    check_state(local_state, trainable, "local adapter")


# ----------------------------------------------------------------------------- the client-side step
def personalize(
    model: nn.Module,
    global_state: dict,
    local_state: dict,
    *,
    held_out: Iterable,
    n_samples: int = N_SAMPLES,
    estimator: Estimator = Verified(),
    space: str = "ab",
    likelihood: Likelihood = classification_likelihood,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The client-side Potara step: lam from the first n_samples of `held_out`, then the merged adapter.

    Returns (merged_state, info). merged_state has the adapters' keys (space="delta": rank-2r LoRA factors);
    info["lam"] is the weight on phi_G (a {module: lam} dict with PaperFisher(granularity="module")), and info
    holds what the estimator saw: Verified: the end losses, slopes and errors, the candidate taken, the barrier;
    PaperFisher: a, b, c. held_out: (inputs, targets) batches of the client's HELD-OUT samples, read once.
    likelihood: classification_likelihood, causal_lm_likelihood or your own. The model's own adapter is left as
    it was; a merged model, an adapter that does not fit it, or NaN/Inf values are one ValueError."""
    if space not in ("ab", "delta"):
        raise ValueError(f"space must be 'ab' or 'delta', got {space!r}")
    if not isinstance(estimator, (Verified, PaperFisher)):
        raise ValueError(f"estimator must be Verified() or PaperFisher(...), got {estimator!r}"[:200])
    check_adapters(model, global_state, local_state)
    samples = list(first_samples(held_out, n_samples))
    was_training = model.training
    model.eval()
    try:
        if isinstance(estimator, Verified):
            lam, info = verified_weight(model, global_state, local_state, samples, likelihood, space)
            merged = merge_adapters(global_state, local_state, lam, space)
            n = sum(len(y) for _, y in samples)
            info = {**info, "lam": lam, "estimator": estimator.name, "space": space, "n_samples": n}
        else:
            e = estimator
            stats = gradient_stats(
                model, global_state, local_state, samples, n_samples, e.labels, likelihood, e.seed, e.chunk_size
            )
            merged, info = paper_merge(stats, global_state, local_state, space, estimator)
    finally:
        model.train(was_training)
    if not all(torch.isfinite(t).all() for t in merged.values()):  # never hand back a NaN adapter
        raise ValueError("personalize: the merged adapter holds NaN or Inf values")
    return merged, info
