"""LoRA on nn.MultiheadAttention's packed q/k/v in-projection (torchvision's ViT attention): LoRAPackedQKV,
which lora.add_lora puts on every targeted nn.MultiheadAttention when given LORA_LAYERS (it imports lora.py;
lora.py never imports it).

    add_lora(vit, ["self_attention"], r=8, alpha=16, layers=LORA_LAYERS)   # LoRAPackedQKV on q and v
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .lora import LORA_LAYERS as LINEAR_LAYERS
from .lora import LoRALayer, init_factors


class LoRAPackedQKV(LoRALayer):
    """LoRA on parts of nn.MultiheadAttention's packed in-projection (default: q and v, k untouched).

    MultiheadAttention stores W_q, W_k, W_v stacked as one in_proj_weight (3E x E) and runs its
    own fused kernel, so in general we adapt in weight space: W = W0 + (alpha/r) [B_q A_q; 0; B_v A_v],
    and call the wrapped module with W swapped in (torch.func.functional_call), gradients flowing to
    the factors. For plain self-attention (the ViT case: query is key is value, no masks, no attention
    weights returned) the forward instead runs in activation space, q = x W_q^T + b_q + (alpha/r) x A_q^T B_q^T,
    then attention exactly as MultiheadAttention computes it: the same function, but autograd never forms
    the full 3E x E weight gradient (per sample, under torch.func) -- potara_studies/bench.py sections "lora" and
    "fisher".
    The q part is mathematically the same as LoRALinear on a separate q projection.
    Input dropout cannot be applied in weight space, so `dropout` is not offered here.
    Factors are named lora_A_q, lora_B_q, lora_A_v, lora_B_v.
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

    def delta_weight(self) -> torch.Tensor:
        E, W0 = self.base.embed_dim, self.base.in_proj_weight
        return self.scaling * torch.cat(
            [
                self.getattr_lora("B", p) @ self.getattr_lora("A", p) if p in self.parts else W0.new_zeros(E, E)
                for p in "qkv"
            ],
            dim=0,
        )

    def getattr_lora(self, which: str, part: str) -> torch.Tensor:
        return getattr(self, f"lora_{which}_{part}")

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
        if (
            query is key
            and key is value
            and not need_weights
            and key_padding_mask is None
            and attn_mask is None
            and not is_causal
            and mha.bias_k is None
            and not mha.add_zero_attn
        ):
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
                y = torch.addmm(
                    y,
                    F.linear(x2, self.getattr_lora("A", p)),
                    self.getattr_lora("B", p).t().contiguous(),
                    alpha=self.scaling,
                )
            heads.append(y.view(n, t, mha.num_heads, mha.head_dim).transpose(1, 2))  # [batch, heads, tokens, dim]
        o = F.scaled_dot_product_attention(*heads, dropout_p=mha.dropout if mha.training else 0.0)
        o = mha.out_proj(o.transpose(1, 2).reshape(n * t, E)).view(n, t, E)
        return o.squeeze(0) if unbatched else o if mha.batch_first else o.transpose(0, 1)


def packed_qv(base: nn.MultiheadAttention, r: int, alpha: float, dropout: float = 0.0) -> LoRAPackedQKV:
    """lora.add_lora's builder for attention: LoRAPackedQKV on q and v (no input dropout in weight space)."""
    if dropout:
        raise ValueError("LoRA on nn.MultiheadAttention takes no dropout (it adapts the packed weight)")
    return LoRAPackedQKV(base, r, alpha, "qv")


LORA_LAYERS = {**LINEAR_LAYERS, nn.MultiheadAttention: packed_qv}  # for lora.add_lora(..., layers=LORA_LAYERS)
