"""Potara's merge and the client-side step: phi(lam) = lam * phi_G + (1 - lam) * phi_L, with the weight lam
from weight.py, on the client's held-out samples.

    merged, info = personalize(model, global_state, local_state, held_out=validation_batches)
    merged, info = personalize(..., estimator=PaperFisher(granularity="module"))  # the paper's estimator

personalize checks both adapters against the model (keys, shapes, dtypes, finite values; a merged model is
refused), reads the first n_samples held-out samples once, computes lam with the chosen estimator and returns
the merged adapter with what the estimator saw. The estimator is one argument whose type carries its options:
Verified() (the default: losses and slopes at both ends, verified by one forward pass; no options) or
PaperFisher(...) (the paper's diagonal-Fisher terms; its options), so an option the estimator does not take
cannot be passed. merge_adapters merges in the paper's A/B space or exactly in weight space ("delta");
fisher_merge is the Fisher-merging baseline.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterable, Union

import torch
import torch.nn as nn

from .fisher import N_SAMPLES, GradStats, Likelihood, classification_likelihood, first_samples, gradient_stats
from .lora import AdapterError, lora_factor, lora_layers
from .tensor_checks import check_tensors
from .weight import module_of, paper_weight, segment_state, verified_weight


# ----------------------------------------------------------------------------- merging
def merge_adapters(global_state: dict, local_state: dict, lam, space: str = "ab") -> dict[str, torch.Tensor]:
    """Merge two adapters with weight lam on the global one (a float, or {module: lam}).

    space="ab" (the paper's practice, R): every tensor, LoRA factors included, is
        lam * G + (1 - lam) * L. Note B A of the result is NOT the convex merge of the two B A.
    space="delta" (OURS, exact): each LoRA pair becomes a rank-2r adapter by concatenation,
        A = [A_G; A_L],  B = [lam B_G, (1 - lam) B_L]  =>  B A = lam B_G A_G + (1 - lam) B_L A_L,
    so the layer's output is exactly lam f_G(x) + (1 - lam) f_L(x); other tensors (heads, biases:
    linear in the output) are combined convexly. Load with load_lora_state_dict(..., allow_rank_change=True).
    Refuses adapters with no LoRA factor lora.lora_factor recognises (the delta merge would silently be convex).
    """
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


def fisher_merge(
    global_state: dict, local_state: dict, fisher_G: dict, fisher_L: dict, eps: float = 1e-8
) -> dict[str, torch.Tensor]:
    """Fisher merging baseline (Matena & Raffel, 2022): per parameter,
    theta = (F_G theta_G + F_L theta_L) / (F_G + F_L), eps guarding entries where both are zero."""
    out = {}
    for k, G in global_state.items():
        fg, fl = fisher_G[k].double().cpu() + eps, fisher_L[k].double().cpu() + eps
        out[k] = ((fg * G.double() + fl * local_state[k].double()) / (fg + fl)).to(G.dtype)
    return out


# ----------------------------------------------------------------------------- the estimators
@dataclass(frozen=True)
class Verified:
    """The default estimator (weight.verified_weight): the held-out loss and its slope at both ends, the minimiser
    of the cubic through them, kept only if one forward pass confirms it beats both ends. One weight per
    client, 2 forward-backward passes + at most 1 forward pass. It takes no options."""

    name: ClassVar[str] = "verified"


@dataclass(frozen=True)
class PaperFisher:
    """The paper's estimator (weight.paper_weight): a, b, c of the variance-trace bound from the diagonal Fisher
    of each adapter (fisher.gradient_stats: per-sample gradients; vmap, or a loop where vmap cannot batch the
    model), lam* = (b - c) / (a + b - 2c)."""

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


def paper_merge(
    stats: GradStats, global_state: dict, local_state: dict, space: str = "ab", estimator: PaperFisher = PaperFisher()
) -> tuple[dict[str, torch.Tensor], dict]:
    """The paper's step from per-sample gradient statistics already computed (fisher.gradient_stats with
    estimator.labels): lam = paper_weight(stats), then the merge; returns (merged_state, info) as personalize
    does."""
    lam, info = paper_weight(stats, estimator.eps, estimator.granularity)
    info.update(
        lam=lam,
        estimator=estimator.name,
        space=space,
        n_samples=stats.n,
        granularity=estimator.granularity,
        labels=estimator.labels,
        eps=estimator.eps,
    )
    return merge_adapters(global_state, local_state, lam, space), info


def check_adapters(model: nn.Module, global_state: dict, local_state: dict) -> None:
    """Refuse, with one line, what would give a silently wrong weight: a merged model (LoRA gradients are
    zero), adapters whose keys, shapes or dtypes differ from the model's trainable tensors (a missing head
    would run with the model's current one), and NaN/Inf values."""
    if any(m.merged for m in lora_layers(model)):
        raise AdapterError(
            "personalize: the model's LoRA layers are merged (lora.merge_lora); call lora.unmerge_lora(model) first"
        )
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise AdapterError("personalize: the model has no trainable tensors (call lora.add_lora first)")
    check_tensors(global_state, trainable, what="global adapter")
    check_tensors(local_state, trainable, what="local adapter")


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
    Returns (merged_state, info); info["lam"] is the weight on the federated adapter.

    held_out: (inputs, targets) batches of the client's HELD-OUT samples (a validation split the adapters
    were not trained on: on its own training samples phi_L sits at a minimum, which always favours it; no
    statistic of the samples alone can tell those from a task phi_L has learned perfectly, so this is the
    caller's to keep: potara_harness.data.warn_held_out_overlap checks the demos' splits exactly); read once
    and kept for the passes. estimator: Verified() (the default), info = the end losses and slopes, the
    candidate taken, the barrier seen; or PaperFisher(...), info = a, b, c. space: "ab" (the paper's) or "delta"
    (merge_adapters). The model's own adapter is left as it was.
    """
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
            info = {
                **info,
                "lam": lam,
                "estimator": estimator.name,
                "space": space,
                "n_samples": sum(len(y) for _, y in samples),
            }
        else:
            stats = gradient_stats(
                model,
                global_state,
                local_state,
                samples,
                n_samples,
                estimator.labels,
                likelihood,
                estimator.seed,
                estimator.chunk_size,
            )
            merged, info = paper_merge(stats, global_state, local_state, space, estimator)
    finally:
        model.train(was_training)
    check_tensors(merged, what="merged adapter")  # never hand back a NaN adapter
    return merged, info
