import os
import pickle

import pytest
import torch
import torch.nn as nn
from torchvision.models import VisionTransformer

from lora import (AdapterError, LoRALinear, LoRAPackedQKV, add_lora, load_adapter, load_lora_state_dict,
                  lora_meta, lora_state_dict, merge_lora, save_adapter, unmerge_lora)


def tiny_vit(num_classes=5):
    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                              mlp_dim=32, num_classes=num_classes)
    nn.init.normal_(model.heads.head.weight, std=0.5)  # torchvision zero-inits the head: no signal would pass
    return model


def randomize_lora(model, scale=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, scale)


def test_lora_linear_formula_and_zero_init():
    torch.manual_seed(0)
    base = nn.Linear(7, 5)
    x = torch.randn(3, 7)
    ref = base(x)
    layer = LoRALinear(base, r=2, alpha=6)
    assert torch.equal(layer(x), ref)  # B = 0: unchanged
    assert not base.weight.requires_grad and not base.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)  # alpha/r = 3
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_merge_unmerge_round_trip():
    torch.manual_seed(1)
    base = nn.Linear(8, 6)
    w0 = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, alpha=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base.weight, layer.base.bias))
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_add_lora_trainable_and_state_dict():
    model = tiny_vit()
    names = add_lora(model, ["mlp.0"], r=2, trainable=["heads"])
    assert names == ["encoder.layers.encoder_layer_0.mlp.0", "encoder.layers.encoder_layer_1.mlp.0"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    expected = {f"{m}.lora_{f}" for m in names for f in "AB"} | {"heads.head.weight", "heads.head.bias"}
    assert trainable == expected
    state = lora_state_dict(model)
    assert set(state) == expected
    assert all(t.device.type == "cpu" and not t.requires_grad for t in state.values())
    p = dict(model.named_parameters())["heads.head.weight"]
    state["heads.head.weight"] += 1  # a copy, not a view
    assert not torch.equal(p, state["heads.head.weight"])


def test_packed_qv_changes_q_and_v_only():
    model = tiny_vit()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    names = add_lora(model, ["self_attention"], r=2, alpha=4)
    assert all(isinstance(model.get_submodule(n), LoRAPackedQKV) for n in names)
    torch.testing.assert_close(model(x), ref)  # fresh adapter: unchanged
    randomize_lora(model)
    attn = model.get_submodule(names[0])
    E = attn.base.embed_dim
    delta = attn.delta_weight()
    assert delta[:E].abs().sum() > 0 and delta[2 * E:].abs().sum() > 0
    assert torch.equal(delta[E:2 * E], torch.zeros(E, E))  # k untouched
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


def test_merged_model_is_plain_linear_cost():
    base = nn.Linear(4, 4)
    layer = LoRALinear(base, r=2)
    layer.merge()
    calls = []
    layer.lora_A.register_hook(lambda g: calls.append(g))
    x = torch.randn(2, 4, requires_grad=True)
    layer(x).sum().backward()
    assert calls == []  # LoRA factors are not touched by a merged forward


def test_add_lora_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match="no module matches.*nope.*self_attention"):
        add_lora(model, ["nope"])
    with pytest.raises(ValueError, match="not nn.Linear.*LayerNorm"):
        add_lora(model, ["ln_1"])
    with pytest.raises(ValueError, match="trainable='missing'"):
        add_lora(tiny_vit(), ["mlp.0"], trainable=["missing"])
    with pytest.raises(ValueError, match="rank"):
        LoRALinear(nn.Linear(2, 2), r=0)


def test_load_state_checks_everything_and_never_loads_partially():
    model = tiny_vit()
    add_lora(model, ["self_attention"], r=2, trainable=["heads"])
    good = lora_state_dict(model)
    randomize_lora(model)
    before = lora_state_dict(model)

    def assert_unchanged():
        for k, v in lora_state_dict(model).items():
            assert torch.equal(v, before[k])

    cases = {
        "missing": ({k: v for k, v in list(good.items())[1:]}, "missing"),
        "extra": ({**good, "x.lora_A": torch.zeros(1)}, "unexpected"),
        "shape": ({**good, "heads.head.bias": torch.zeros(3)}, "shape"),
        "dtype": ({**good, "heads.head.bias": good["heads.head.bias"].double()}, "dtype"),
        "nan": ({**good, "heads.head.weight": good["heads.head.weight"].clone().fill_(float("nan"))}, "NaN"),
        "not tensor": ({**good, "heads.head.bias": [0.0] * 5}, "not a tensor"),
    }
    for name, (state, msg) in cases.items():
        # make the first tensors valid-but-different so a partial load would show
        state = {k: (v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "heads.head.weight"
                     else v) for k, v in state.items()}
        with pytest.raises(AdapterError, match=msg):
            load_lora_state_dict(model, state)
        assert_unchanged()
    load_lora_state_dict(model, good)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, good[k])
    merge_lora(model)
    with pytest.raises(AdapterError, match="merged"):
        load_lora_state_dict(model, good)


def test_save_load_adapter_round_trip(tmp_path):
    model = tiny_vit()
    add_lora(model, ["self_attention"], r=2, alpha=8, trainable=["heads"])
    randomize_lora(model)
    state, meta = lora_state_dict(model), lora_meta(model)
    assert meta["layers"]["encoder.layers.encoder_layer_0.self_attention"]["scaling"] == 4.0
    path = tmp_path / "client0.pt"
    save_adapter(path, state, meta)
    loaded, loaded_meta = load_adapter(path)
    assert loaded_meta == meta and set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


class _Boom:  # unpickling this would create a marker file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_load_adapter_refuses_bad_files(tmp_path):
    with pytest.raises(AdapterError, match="no such"):
        load_adapter(tmp_path / "absent.pt")
    good = tmp_path / "good.pt"
    save_adapter(good, {"w": torch.ones(3)}, {"r": 2})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(AdapterError, match="not a readable"):
        load_adapter(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"some": torch.ones(2)}, foreign)
    with pytest.raises(AdapterError, match="not a potara adapter"):
        load_adapter(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(AdapterError):
        load_adapter(text)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "potara-adapter-v1", "meta": {}, "state": {"w": _Boom(str(marker))}}, evil)
    with pytest.raises(AdapterError, match="unsafe"):
        load_adapter(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(AdapterError):
        load_adapter(raw)
    assert not marker.exists()
    nan = tmp_path / "nan.pt"
    save_adapter(nan, {"w": torch.tensor([float("inf")])}, {})
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_adapter(nan)
