"""LoRA by hand: low-rank adapters on nn.Linear and on nn.MultiheadAttention's packed q/k/v in-projection.
Stands alone (torch only): copy this file into any project.

LoRA (Hu et al., 2021, arXiv 2106.09685) keeps a pre-trained weight W0 frozen and learns a low-rank update (P):

    y = W0 x + b + (alpha / r) * B A dropout(x),   A in R^{r x in}, B in R^{out x r}

A is Kaiming-uniform, B is zero, so a fresh adapter leaves the model unchanged. `merge()` folds the update
into W0 (inference then costs exactly a plain layer) and `unmerge()` takes it out again.

    names = add_lora(model, ["fc1", "fc2"], r=8, alpha=16, trainable=["head"])   # nn.Linear -> LoRALinear
    add_lora(vit, ["self_attention"])              # nn.MultiheadAttention -> LoRAPackedQKV on q and v
    phi = lora_state_dict(model)                   # the adapter: every trainable tensor, CPU copies
    load_lora_state_dict(model, phi)               # checked first, all-or-nothing
    load_lora_state_dict(model, merged, allow_rank_change=True)   # a rank-2r delta-space merge (potara.py)
    merge_lora(model); unmerge_lora(model)

The adapter of a model is *every trainable tensor*: the LoRA factors plus the extras named in `trainable=`
(e.g. a new classification head). Federated averaging (fed.py) and the Potara merge (potara.py) treat all of
them alike. A state that does not fit the model is one ValueError naming the tensor.
"""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call


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


class LoRAPackedQKV(LoRALayer):
    """LoRA on parts of nn.MultiheadAttention's packed in-projection (default: q and v, k untouched).

    MultiheadAttention stores W_q, W_k, W_v stacked as one in_proj_weight (3E x E) and runs its own fused
    kernel, so in general the update is applied in weight space, W = W0 + (alpha/r) [B_q A_q; 0; B_v A_v], and
    the wrapped module is called with W swapped in (torch.func.functional_call), gradients flowing to the
    factors. For plain self-attention (torchvision's ViT: query is key is value, no masks, no attention weights
    returned) the forward runs in activation space instead, q = x W_q^T + b_q + (alpha/r) x A_q^T B_q^T, then
    scaled-dot-product attention as MultiheadAttention computes it: the same function, but autograd never forms
    the full 3E x E weight gradient (per sample, under torch.func). The q part is LoRALinear on a separate q
    projection. Input dropout cannot be applied in weight space, so none is offered. Factors are named
    lora_A_q, lora_B_q, lora_A_v, lora_B_v.
    """

    def __init__(self, base: nn.MultiheadAttention, r: int = 8, alpha: float = 16, parts: str = "qv"):
        if base.in_proj_weight is None:
            raise ValueError("LoRAPackedQKV needs a packed in_proj_weight (kdim == vdim == embed_dim)")
        if not parts or set(parts) - set("qkv") or len(set(parts)) != len(parts):
            raise ValueError(f"parts must be a non-empty subset of 'qkv', got {parts!r}")
        super().__init__(base, r, alpha)
        self.parts, E = "".join(p for p in "qkv" if p in parts), base.embed_dim
        for p in self.parts:
            A, B = init_factors(r, E, E, base.in_proj_weight)
            self.register_parameter(f"lora_A_{p}", A)
            self.register_parameter(f"lora_B_{p}", B)

    def frozen_weight(self) -> torch.Tensor:
        return self.base.in_proj_weight

    def factor(self, which: str, part: str) -> torch.Tensor:
        return getattr(self, f"lora_{which}_{part}")

    def delta_weight(self) -> torch.Tensor:
        E, W0 = self.base.embed_dim, self.base.in_proj_weight
        blocks = [self.factor("B", p) @ self.factor("A", p) if p in self.parts else W0.new_zeros(E, E) for p in "qkv"]
        return self.scaling * torch.cat(blocks, dim=0)

    def forward(
        self,
        query,
        key,
        value,
        key_padding_mask=None,
        need_weights=True,
        attn_mask=None,
        average_attn_weights=True,
        is_causal=False,
    ):
        """nn.MultiheadAttention.forward's signature and results."""
        mha = self.base
        kwargs = dict(
            key_padding_mask=key_padding_mask,
            need_weights=need_weights,
            attn_mask=attn_mask,
            average_attn_weights=average_attn_weights,
            is_causal=is_causal,
        )
        if self.merged:
            return mha(query, key, value, **kwargs)
        plain = key_padding_mask is None and attn_mask is None and not (need_weights or is_causal)
        if query is key and key is value and plain and mha.bias_k is None and not mha.add_zero_attn:
            return self._self_attention(query), None
        weight = mha.in_proj_weight + self.delta_weight()
        return functional_call(mha, {"in_proj_weight": weight}, (query, key, value), kwargs)

    def _self_attention(self, x: torch.Tensor) -> torch.Tensor:
        """Plain self-attention with the LoRA terms added to q/k/v in activation space (as LoRALinear)."""
        mha, E = self.base, self.base.embed_dim
        unbatched = x.dim() == 2
        x = x.unsqueeze(0) if unbatched else x if mha.batch_first else x.transpose(0, 1)  # [batch, tokens, E]
        n, t = x.shape[0], x.shape[1]
        x2, heads = x.reshape(n * t, E), []
        for i, p in enumerate("qkv"):
            bias = None if mha.in_proj_bias is None else mha.in_proj_bias[i * E : (i + 1) * E]
            y = F.linear(x2, mha.in_proj_weight[i * E : (i + 1) * E], bias)
            if p in self.parts:
                h = F.linear(x2, self.factor("A", p))
                y = torch.addmm(y, h, self.factor("B", p).t().contiguous(), alpha=self.scaling)
            heads.append(y.view(n, t, mha.num_heads, mha.head_dim).transpose(1, 2))  # [batch, heads, tokens, dim]
        o = F.scaled_dot_product_attention(*heads, dropout_p=mha.dropout if mha.training else 0.0)
        o = mha.out_proj(o.transpose(1, 2).reshape(n * t, E)).view(n, t, E)
        return o.squeeze(0) if unbatched else o if mha.batch_first else o.transpose(0, 1)


def packed_qv(base: nn.MultiheadAttention, r: int, alpha: float, dropout: float = 0.0) -> LoRAPackedQKV:
    """add_lora's builder for attention: LoRAPackedQKV on q and v (no input dropout in weight space)."""
    if dropout:
        raise ValueError("LoRA on nn.MultiheadAttention takes no dropout (it adapts the packed weight)")
    return LoRAPackedQKV(base, r, alpha, "qv")


# module type -> its LoRA layer, built as layer(module, r, alpha, dropout); checked in this order (isinstance)
LORA_LAYERS = {nn.Linear: LoRALinear, nn.MultiheadAttention: packed_qv}


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
    becomes LoRALinear, nn.MultiheadAttention LoRAPackedQKV on q and v. `trainable` names parameters or
    module prefixes (e.g. "heads") that stay trainable and so belong to the adapter. Returns the wrapped
    module names.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    named = dict(model.named_modules())
    if any(isinstance(m, LoRALayer) for m in named.values()):
        raise ValueError("model already has LoRA layers; add_lora is applied once per model")
    wanted = [n for n in named if n and any(n == t or n.endswith("." + t) for t in targets)]
    if not wanted:
        candidates = [n for n, m in named.items() if isinstance(m, tuple(layers))]
        raise ValueError(
            f"add_lora: no module matches targets {list(targets)}; the model's "
            f"{' and '.join(t.__name__ for t in layers)} modules are: "
            f"{candidates[:20]}{' ...' if len(candidates) > 20 else ''}"
        )
    builders = {n: next((b for t, b in layers.items() if isinstance(named[n], t)), None) for n in wanted}
    bad = [f"{n} ({type(named[n]).__name__})" for n in wanted if builders[n] is None]
    if bad:
        kinds = " or ".join(f"nn.{t.__name__}" for t in layers)
        raise ValueError(f"add_lora: targets {list(targets)} match modules that are not {kinds}: {bad}")
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


def lora_layers(model: nn.Module) -> Iterable[LoRALayer]:
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


def check_state(state, reference: dict[str, torch.Tensor], what: str, rank_free: bool = False) -> None:
    """A ValueError naming the tensor unless `state` has exactly `reference`'s keys, each a dense tensor of the
    reference's dtype and shape (a LoRA factor's rank may differ when rank_free), with finite values."""
    if not isinstance(state, dict):
        raise ValueError(f"{what}: expected a dict of tensors, got {type(state).__name__}")
    if set(state) != set(reference):
        missing, extra = sorted(set(reference) - set(state), key=str), sorted(set(state) - set(reference), key=str)
        raise ValueError(f"{what}: keys do not match: missing {missing[:5]}, unexpected {extra[:5]}"[:400])
    for k, t in state.items():
        like, free = reference[k], rank_dim(k) if rank_free else None
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise ValueError(f"{what}: {k} is not a dense tensor ({getattr(t, 'layout', type(t).__name__)})")
        if t.dtype != like.dtype:
            raise ValueError(f"{what}: {k} has dtype {t.dtype}, expected {like.dtype}")
        if t.shape != like.shape and not (
            free is not None and t.dim() == 2 and t.shape[1 - free] == like.shape[1 - free]
        ):
            hint = " (a delta-space merge: pass allow_rank_change=True)" if rank_dim(k) is not None else ""
            raise ValueError(f"{what}: {k} has shape {tuple(t.shape)}, expected {tuple(like.shape)}{hint}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{what}: {k} holds NaN or Inf values")


def _new_ranks(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[nn.Module, int]:
    """The rank every LoRA layer gets from `state` (factors missing from it keep theirs); ValueError unless
    each layer's A and B factors (all parts of a packed layer) share one rank >= 1."""
    ranks = {}
    for name, m in model.named_modules():
        if isinstance(m, LoRALayer):
            prefix = f"{name}." if name else ""
            params = m.named_parameters(recurse=False)
            r = {state.get(prefix + n, p).shape[rank_dim(n)] for n, p in params if lora_factor(n)}
            if len(r) != 1 or 0 in r:
                raise ValueError(
                    f"adapter: the LoRA factors of {name or 'the model'} have ranks {sorted(r)}; "
                    f"A and B must share one rank >= 1"
                )
            ranks[m] = r.pop()
    return ranks


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor], allow_rank_change: bool = False) -> None:
    """Copy an adapter state into the model's trainable tensors; check everything first (check_state), so a bad
    state never loads partially. allow_rank_change=True replaces LoRA factors whose rank differs (the rank-2r
    adapters of potara.merge_adapters(space="delta")): each layer's r becomes the new rank and its scaling stays
    as created, so alpha becomes scaling * r (alpha / r is the scaling actually applied, as peft reads it)."""
    if any(m.merged for m in lora_layers(model)):
        raise ValueError("cannot load an adapter into a merged model: call unmerge_lora(model) first")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    check_state(state, params, "adapter", rank_free=allow_rank_change)
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
    """Plain-data description of the model's LoRA layers (what an adapter file stores beside the tensors)."""
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
