"""LoRA by hand: low-rank adapters on nn.Linear (and, with lora_mha.py beside it, on the packed q/k/v
in-projection of nn.MultiheadAttention). This file alone (torch only) is LoRA for any model of nn.Linear layers.

LoRA (Hu et al., 2021, arXiv 2106.09685) keeps a pre-trained weight W0 frozen and learns a low-rank update:

    y = W0 x + b + (alpha / r) * B A dropout(x),   A in R^{r x in}, B in R^{out x r}

A is Kaiming-uniform, B is zero, so a fresh adapter leaves the model unchanged. `merge()` folds the update
into W0 (inference then costs exactly a plain layer) and `unmerge()` takes it out again.

Functional API (minLoRA / loralib style):
    names = add_lora(model, targets=["fc1", "fc2"], r=8, alpha=16, trainable=["head"])
    add_lora(vit, ["self_attention"], layers=lora_mha.LORA_LAYERS)   # attention: lora_mha.py beside this file
    state = lora_state_dict(model)          # the adapter: every trainable tensor, CPU copies
    load_lora_state_dict(model, state)      # checked first, all-or-nothing
    merge_lora(model); unmerge_lora(model)

The adapter of a model is *every trainable tensor*: the LoRA factors plus the extras named in `trainable=`
(e.g. a new classification head). Federated averaging and the Potara merge treat all of them alike
(docs/algorithm.md). Its file is adapter_file.py. load_lora_state_dict checks a state with the validator of
untrusted tensors (tensor_checks.py) when this file sits in the potara package; copied alone, with a short
check of keys, shapes, dtypes and values.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

try:  # in the potara package: the one validator of untrusted tensors
    from .tensor_checks import AdapterError, check_tensors
except ImportError:  # this file copied alone: the keys, shapes, dtypes and values of an adapter, nothing more

    class AdapterError(ValueError):
        """An adapter state that does not fit the model."""

    def check_tensors(state, reference, what="state", free_dim=None):
        if not isinstance(state, dict) or set(state) != set(reference):
            raise AdapterError(f"{what}: keys do not match the model's adapter")
        for k, t in state.items():
            like, free = reference[k], free_dim(k) if free_dim else None
            if type(t) not in (torch.Tensor, nn.Parameter) or t.layout != torch.strided or t.dtype != like.dtype:
                raise AdapterError(f"{what}: {k} is not a dense {like.dtype} tensor")
            if t.shape != like.shape and not (
                free is not None and t.dim() == 2 and t.shape[1 - free] == like.shape[1 - free]
            ):
                raise AdapterError(f"{what}: {k} has shape {tuple(t.shape)}, the model expects {tuple(like.shape)}")
            if not torch.isfinite(t).all():
                raise AdapterError(f"{what}: {k} holds NaN or Inf values")


def init_factors(r: int, in_features: int, out_features: int, like: torch.Tensor):
    A = torch.empty(r, in_features, dtype=like.dtype, device=like.device)
    nn.init.kaiming_uniform_(A, a=math.sqrt(5))  # what nn.Linear uses for its weight (loralib does the same)
    B = torch.zeros(out_features, r, dtype=like.dtype, device=like.device)
    return nn.Parameter(A), nn.Parameter(B)


class LoRALayer(nn.Module):
    """What both LoRA layers share: r, alpha, scaling = alpha / r, a frozen base, merge/unmerge of delta_weight()."""

    def __init__(self, base: nn.Module, r: int, alpha: float):
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.scaling = alpha / r  # fixed at creation: a rank-2r concatenated adapter keeps it (potara.merge_adapters)
        self.merged = False
        for p in base.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def merge(self) -> None:
        """W0 += delta_weight(): the forward then costs exactly the plain layer."""
        if not self.merged:
            w = self.frozen_weight()
            w += self.delta_weight().to(w.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.frozen_weight()
            w -= self.delta_weight().to(w.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        parts = f"parts={self.parts!r}, " if hasattr(self, "parts") else ""  # LoRAPackedQKV's q/k/v choice
        return f"{parts}r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


class LoRALinear(LoRALayer):
    """y = base(x) + (alpha / r) * B A dropout(x); the base layer is frozen."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16, dropout: float = 0.0):
        super().__init__(base, r, alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A, self.lora_B = init_factors(r, base.in_features, base.out_features, base.weight)

    def frozen_weight(self) -> torch.Tensor:
        return self.base.weight

    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)  # exactly the cost of a plain nn.Linear
        # x -> A -> B keeps the intermediate at rank r: O(r (in + out)) per token, never forms B A.
        # addmm adds scaling * h B^T to the base output in one kernel (no full-size temporaries for the
        # product, its scale and the sum), and a contiguous B^T makes autograd compute B's gradient as
        # h^T g, the fast orientation of that skinny product (potara_studies/bench.py, section "lora").
        x2 = x.reshape(-1, x.shape[-1])
        out = self.base(x2)
        h = F.linear(self.dropout(x2), self.lora_A)
        out = torch.addmm(out, h, self.lora_B.t().contiguous(), alpha=self.scaling)
        return out.view(*x.shape[:-1], out.shape[-1])


LORA_LAYERS = {nn.Linear: LoRALinear}  # module type -> its LoRA layer, built as layer(module, r, alpha, dropout)


def add_lora(
    model: nn.Module,
    targets: Sequence[str],
    r: int = 8,
    alpha: float = 16,
    dropout: float = 0.0,
    trainable: Sequence[str] = (),
    layers: dict = LORA_LAYERS,
) -> list[str]:
    """Wrap the modules named by `targets` with LoRA and freeze everything else except `trainable`.

    A target matches a module whose dotted name equals it or ends with "." + target (as peft's
    target_modules). Each matched module becomes layers[its type](module, r, alpha, dropout): nn.Linear
    becomes LoRALinear; with layers=lora_mha.LORA_LAYERS nn.MultiheadAttention becomes LoRAPackedQKV on its
    q and v. `trainable` names parameters or module prefixes (e.g. "heads") that stay trainable and so
    belong to the adapter. Returns the wrapped module names.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    named = dict(model.named_modules())
    if any(isinstance(m, LoRALayer) for m in named.values()):
        raise ValueError("model already has LoRA layers; add_lora is applied once per model")
    wanted = [n for n in named if n and any(n == t or n.endswith("." + t) for t in targets)]
    kinds = tuple(layers) + (nn.MultiheadAttention,)
    if not wanted:
        candidates = [n for n, m in named.items() if isinstance(m, kinds)]
        raise ValueError(
            f"add_lora: no module matches targets {list(targets)}; linear/attention modules are: "
            f"{candidates[:20]}{' ...' if len(candidates) > 20 else ''}"
        )
    builders = {n: next((b for t, b in layers.items() if isinstance(named[n], t)), None) for n in wanted}
    bad = [f"{n} ({type(named[n]).__name__})" for n in wanted if builders[n] is None]
    if bad:
        hint = (
            " (for nn.MultiheadAttention pass layers=lora_mha.LORA_LAYERS)"
            if any(isinstance(named[n], nn.MultiheadAttention) for n in wanted)
            else ""
        )
        kinds = " or ".join(f"nn.{t.__name__}" for t in layers)
        raise ValueError(f"add_lora: targets {list(targets)} match modules that are not {kinds}: {bad}{hint}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in wanted:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, builders[name](named[name], r, alpha, dropout))
    for t in trainable:
        hits = [p for n, p in model.named_parameters() if n == t or n.startswith(t + ".")]
        if not hits:
            raise ValueError(f"add_lora: trainable={t!r} names no parameter of the model")
        for p in hits:
            p.requires_grad_(True)
    return wanted


def lora_layers(model: nn.Module) -> Iterable[nn.Module]:
    return (m for m in model.modules() if isinstance(m, LoRALayer))


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: every trainable tensor (LoRA factors + trainable extras), detached CPU copies."""
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


_OUR_FACTOR = re.compile(r"(?:^|\.)lora_([AB])(?:_[qkv])?$")  # <module>.lora_A, <module>.lora_B_q, ...
_PEFT_FACTOR = re.compile(r"(?:^|\.)lora_([AB])(?:\.[A-Za-z_]\w*)?\.weight$")  # lora_A.weight, lora_A.default.weight


def lora_factor(name: str) -> str | None:
    """'A' or 'B' for a LoRA factor's state key, None for any other tensor. Recognised exactly: ours,
    `<module>.lora_A` / `.lora_B` (`.lora_A_q` etc. on packed attention), and peft's `<module>.lora_A.weight`
    (in memory `<module>.lora_A.<adapter name>.weight`). A (r x in) has its rank in dim 0, B (out x r) in dim 1."""
    m = _OUR_FACTOR.search(name) or _PEFT_FACTOR.search(name)
    return m.group(1) if m else None


def rank_dim(name: str) -> int | None:
    """The dimension that holds a LoRA factor's rank (A: 0, B: 1), None for any other tensor."""
    return {"A": 0, "B": 1}.get(lora_factor(name))


def _new_ranks(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[nn.Module, int]:
    """The rank every LoRA layer gets from `state` (factors missing from it keep theirs); AdapterError unless
    each layer's A and B factors (all parts of a packed layer) share one rank >= 1."""
    ranks = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            prefix = f"{name}." if name else ""
            r = {
                state.get(prefix + n, p).shape[rank_dim(n)]
                for n, p in m.named_parameters(recurse=False)
                if lora_factor(n)
            }
            if len(r) != 1 or 0 in r:
                raise AdapterError(
                    f"adapter: the LoRA factors of {name or 'the model'} have ranks {sorted(r)}; "
                    f"A and B must share one rank >= 1"
                )
            ranks[m] = r.pop()
    return ranks


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], allow_rank_change: bool = False) -> None:
    """Copy an adapter state into the model's trainable tensors; validate everything first (check_tensors
    against the model's adapter), so a bad state never loads partially. allow_rank_change=True replaces
    LoRA factors whose rank differs (e.g. the rank-2r adapters of potara.merge_adapters(space="delta")):
    each layer's r becomes the new rank and its scaling stays as created, so alpha becomes scaling * r
    (alpha / r is the scaling actually applied, as peft reads it)."""
    if any(m.merged for m in lora_layers(model)):
        raise AdapterError("cannot load an adapter into a merged model: call unmerge_lora(model) first")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_tensors(state, params, "adapter", free_dim=rank_dim if allow_rank_change else None)
    ranks = _new_ranks(model, state) if allow_rank_change else {}
    for k, p in params.items():
        if state[k].shape == p.shape:
            p.copy_(state[k])
        else:  # a new rank: swap in a fresh Parameter of the new shape
            module_name, _, attr = k.rpartition(".")
            setattr(model.get_submodule(module_name), attr, nn.Parameter(state[k].to(p.device, copy=True)))
    for m, r in ranks.items():
        if r != m.r:
            m.r, m.alpha = r, m.scaling * r


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model):
        m.unmerge()


def lora_meta(model: nn.Module) -> dict:
    """Plain-data description of the model's LoRA layers (what adapter_file.save_adapter stores beside the tensors)."""
    layers = {
        n: {
            "r": int(m.r),
            "alpha": float(m.alpha),
            "scaling": float(m.scaling),
            "kind": type(m).__name__,
            **({"parts": m.parts} if hasattr(m, "parts") else {}),
        }
        for n, m in model.named_modules()
        if isinstance(m, LoRALayer)
    }
    return {"targets": sorted(layers), "layers": layers}
