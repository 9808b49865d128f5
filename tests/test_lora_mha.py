"""Specification of lora_mha.py: LoRA on nn.MultiheadAttention's packed in-projection adapts q and v only."""

import torch
import torch.nn as nn
from conftest import randomize_trainable, tiny_vit

from potara.lora import (
    add_lora,
    merge_lora,
    unmerge_lora,
)
from potara.lora_mha import LORA_LAYERS, LoRAPackedQKV


def test_packed_qv_changes_q_and_v_only():
    model = tiny_vit()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    names = add_lora(model, ["self_attention"], r=2, alpha=4, layers=LORA_LAYERS)
    assert all(isinstance(model.get_submodule(n), LoRAPackedQKV) for n in names)
    torch.testing.assert_close(model(x), ref)  # fresh adapter: unchanged
    randomize_trainable(model)
    attn = model.get_submodule(names[0])
    E = attn.base.embed_dim
    delta = attn.delta_weight()
    assert delta[:E].abs().sum() > 0 and delta[2 * E :].abs().sum() > 0
    assert torch.equal(delta[E : 2 * E], torch.zeros(E, E))  # k untouched
    torch.testing.assert_close(delta[:E], 2.0 * attn.lora_B_q @ attn.lora_A_q)
    # forward equals a MultiheadAttention whose in_proj_weight holds W0 + delta (independent path)
    h = torch.randn(2, 5, E)
    plain = nn.MultiheadAttention(E, attn.base.num_heads, batch_first=True)
    plain.load_state_dict(attn.base.state_dict())
    with torch.no_grad():
        plain.in_proj_weight += delta
    torch.testing.assert_close(attn(h, h, h, need_weights=False)[0], plain(h, h, h, need_weights=False)[0])
    out = model(x)
    assert not torch.allclose(out, ref)
    merge_lora(model)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)
    # gradients reach q and v factors
    model.zero_grad()
    model(x).sum().backward()
    assert attn.lora_A_q.grad.abs().sum() > 0 and attn.lora_B_v.grad.abs().sum() > 0
