"""Likelihoods, per-sample gradients and the diagonal Fisher: the statistics behind the paper's Potara
estimator (weight.variance_terms) and the Fisher-merging baseline (merge.fisher_merge).

    fisher = diag_fisher(model, batches)                      # F[j] = mean_i (d/dtheta_j log p(y_i | x_i))^2
    stats = gradient_stats(model, global_state, local_state, batches)   # moments at both adapters

`batches` is an iterable of (inputs, targets); inputs is a tensor, a tuple of tensors (positional
arguments) or a dict of tensors (keyword arguments, e.g. input_ids + attention_mask), batch first.
Per-sample gradients come from torch.func: vmap(grad(log p)) with functional_call. Models whose forward
branches on tensor values (Hugging Face attention masks: "vmap: ... data-dependent control flow") cannot
be batched by vmap; per_sample_grads then loops over single samples (same values, slower) and warns once.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Iterable

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

N_SAMPLES = 100  # the one default sample count: Potara's statistics, diag_fisher, gradient_stats


# ----------------------------------------------------------------------------- inputs
def call_model(model: nn.Module, params: dict, inputs):
    """model(inputs) with `params` in place of the model's own tensors (functional_call); a dict of
    inputs is passed as keyword arguments, a tuple/list as positional ones."""
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


# ----------------------------------------------------------------------------- likelihoods
@dataclass(frozen=True)
class Likelihood:
    """log_prob(output, targets) -> per-sample log p(targets | inputs), shape [batch];
    sample(output, targets, generator) -> targets drawn from the model (for the true Fisher);
    correct(output, targets) -> per-sample 1.0 where the prediction is right (the task's metric, what a grid
    search over lam would choose by), or None where the likelihood defines no such metric."""

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
_warned_loop: set[str] = set()


def per_sample_grads(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs,
    targets: torch.Tensor,
    likelihood: Likelihood = classification_likelihood,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """grad_params log p(targets_i | inputs_i) for every sample i, shape [batch, *param.shape]."""
    return _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size)[0]


def _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size=None):
    """per_sample_grads plus the per-sample log p(targets_i | inputs_i) of the same forward pass: vmap(grad)
    over the batch, or, when vmap cannot batch the model, a loop over single samples (warned once per model class)."""
    frozen = {n: p for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def log_lik(p, x, y):  # x, y: one sample (batch dimension removed)
        one = tree_map(lambda t: t.unsqueeze(0), x)
        log_p = likelihood.log_prob(call_model(model, (p, frozen, buffers), one), y.unsqueeze(0)).sum()
        return log_p, log_p.detach()

    # The math attention backend: vmap has batching rules for its plain matmul/softmax ops, but not
    # for the fused CPU flash kernel (and its backward), where it falls back to a per-sample Python loop.
    with _batchable_attention():
        try:
            per_sample = vmap(grad(log_lik, has_aux=True), in_dims=(None, 0, 0), chunk_size=chunk_size)
            return per_sample(params, inputs, targets)
        except RuntimeError as e:  # e.g. "vmap: ... data-dependent control flow" (branches on mask values)
            name = type(model).__name__
            if name not in _warned_loop:
                _warned_loop.add(name)
                reason = " ".join(str(e).split())[:160]
                warnings.warn(
                    f"per-sample gradients: vmap cannot batch {name}, looping over single samples instead "
                    f"(same values, slower); vmap said: {reason}"
                )
        rows = [
            grad(log_lik, has_aux=True)(params, tree_map(lambda t: t[i], inputs), targets[i])
            for i in range(len(targets))
        ]
    return ({k: torch.stack([g[k] for g, _ in rows]) for k in params}, torch.stack([lp for _, lp in rows]))


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
    """One pass over the first n_samples of `batches`, per-sample gradients at phi_G and phi_L
    (model in eval mode: no dropout), moments accumulated in float32 on the model's device.
    When global_state IS local_state (diag_fisher), the gradients are computed once and shared."""
    if labels not in ("empirical", "sampled"):
        raise ValueError(f"labels must be 'empirical' or 'sampled', got {labels!r}")
    same = global_state is local_state
    device = next(model.parameters()).device
    states = {m: {k: v.to(device) for k, v in s.items()} for m, s in (("G", global_state), ("L", local_state))}
    zeros = lambda: {k: torch.zeros(v.shape, dtype=torch.float32, device=device) for k, v in states["G"].items()}
    acc = {name: zeros() for name in ("fisher_G", "fisher_L", "sq_G", "sq_L", "cross", "mean_G", "mean_L")}
    gen = torch.Generator(device=device).manual_seed(seed)
    loglik = {"G": torch.zeros((), device=device), "L": torch.zeros((), device=device)}
    was_training, n = model.training, 0
    model.eval()
    try:
        for inputs, targets in first_samples(batches, n_samples):
            inputs, targets = to_device(inputs, device), targets.to(device)
            g = {}
            for m, params in states.items():
                if m == "L" and same:  # one model: its statistics are G's (copied after the loop)
                    continue
                grads, log_p = _grads_and_log_prob(model, params, inputs, targets, likelihood, chunk_size)
                g[m] = {k: v.float() for k, v in grads.items()}
                loglik[m] += log_p.sum()  # from the gradient pass itself: no extra forward
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
        loglik["L"] = loglik["G"]
    stats = {name: {k: v / n for k, v in d.items()} for name, d in acc.items()}
    if labels == "empirical":
        stats["fisher_G"], stats["fisher_L"] = stats["sq_G"], stats["sq_L"]
    delta = {k: (states["G"][k].float() - states["L"][k].float()) for k in states["G"]}
    return GradStats(n=n, **stats, delta=delta, loglik_G=loglik["G"].item() / n, loglik_L=loglik["L"].item() / n)


def diag_fisher(
    model: nn.Module,
    batches: Iterable,
    n_samples: int = N_SAMPLES,
    labels: str = "empirical",
    likelihood: Likelihood = classification_likelihood,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the model's current adapter: F[j] = (1/n) sum_i (d/dtheta_j log p(y_i|x_i))^2,
    the mean of SQUARED PER-SAMPLE gradients (not the square of a batch gradient). labels="empirical"
    uses the data's y_i (empirical Fisher); "sampled" draws y_i ~ p(.|x_i) from the model (true Fisher)."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    return gradient_stats(model, state, state, batches, n_samples, labels, likelihood, seed, chunk_size).fisher_G
