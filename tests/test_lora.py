"""Specification of lora.py: LoRALinear's formula and zero start, merge and unmerge, add_lora and the adapter state,
LoRA on nn.MultiheadAttention's packed in-projection (q and v only), factor names (ours and peft's), rank changes,
a caller's mistakes as one ValueError; lora.py copied alone."""

import pytest
import torch
import torch.nn as nn
from conftest import randomize_trainable, run_alone, tiny_vit

from lora import (
    LoRALinear,
    LoRAPackedQKV,
    add_lora,
    load_lora_state_dict,
    lora_factor,
    lora_meta,
    lora_state_dict,
    merge_lora,
    unmerge_lora,
)


# ----------------------------------------------------------------------------- LoRALinear, add_lora, the adapter state
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
    randomize_trainable(model)
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
        "not tensor": ({**good, "heads.head.bias": [0.0] * 5}, "not a dense tensor"),
    }
    for name, (state, msg) in cases.items():
        # make the first tensors valid-but-different so a partial load would show
        state = {
            k: (v + 1 if isinstance(v, torch.Tensor) and v.is_floating_point() and k != "heads.head.weight" else v)
            for k, v in state.items()
        }
        with pytest.raises(ValueError, match=msg):
            load_lora_state_dict(model, state)
        assert_unchanged()
    load_lora_state_dict(model, good)
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, good[k])
    merge_lora(model)
    with pytest.raises(ValueError, match="merged"):
        load_lora_state_dict(model, good)


def test_lora_factor_recognises_exactly_our_and_peft_factor_keys():
    ours = {"enc.0.lora_A": "A", "enc.0.lora_B": "B", "attn.lora_A_q": "A", "attn.lora_B_v": "B", "lora_A": "A"}
    peft = {
        "base_model.model.q_proj.lora_A.weight": "A",
        "q_proj.lora_B.weight": "B",
        "q_proj.lora_A.default.weight": "A",
        "q_proj.lora_B.default.weight": "B",
    }
    others = [
        "enc.0.lora_Alpha",
        "enc.0.lora_Bias",
        "enc.lora_A_x",
        "enc.lora_A.bias",
        "enc.xlora_A",
        "heads.head.weight",
        "enc.lora_A.default.bias",
        "lora_A.weight.extra",
        "enc.lora_a",
    ]
    for name, factor in {**ours, **peft}.items():
        assert lora_factor(name) == factor, name
    for name in others:
        assert lora_factor(name) is None, name


def _rank_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.MultiheadAttention(8, 2, batch_first=True))
    add_lora(model, ["0", "2"], r=2, alpha=6, trainable=[])
    return model


def test_rank_change_keeps_r_alpha_and_meta_true_to_the_installed_factors():
    model = _rank_model()
    original = lora_state_dict(model)
    lin, attn = model[0], model[2]
    scaling = lin.scaling
    wide = {
        k: (torch.randn(4, v.shape[1]) if lora_factor(k) == "A" else torch.randn(v.shape[0], 4))
        for k, v in original.items()
    }
    with pytest.raises(
        ValueError, match=r"has shape \(4, 6\), expected \(2, 6\) \(a delta-space merge: pass allow_rank_change=True\)"
    ):
        load_lora_state_dict(model, wide)  # the error says how a rank-2r merge loads
    load_lora_state_dict(model, wide, allow_rank_change=True)
    assert lin.r == attn.r == 4 and lin.lora_A.shape == (4, 6) and attn.lora_B_v.shape == (8, 4)
    assert lin.scaling == scaling and lin.alpha / lin.r == scaling  # scaling as created; alpha / r says it
    meta = lora_meta(model)["layers"]
    assert meta["0"]["r"] == 4 and meta["0"]["alpha"] / meta["0"]["r"] == meta["0"]["scaling"] == scaling
    x = torch.randn(3, 6)
    expected = x @ lin.base.weight.T + lin.base.bias + scaling * x @ wide["0.lora_A"].T @ wide["0.lora_B"].T
    torch.testing.assert_close(lin(x), expected)
    assert "r=4" in repr(lin)
    load_lora_state_dict(model, original, allow_rank_change=True)  # and back
    assert lin.r == attn.r == 2 and lin.alpha == 6 and lora_meta(model)["layers"]["2"]["r"] == 2


def test_rank_change_refuses_A_and_B_of_different_ranks_and_leaves_the_model_unchanged():
    model = _rank_model()
    original = lora_state_dict(model)
    bad = dict(original, **{"0.lora_A": torch.randn(3, 6), "0.lora_B": torch.randn(5, 5)})
    with pytest.raises(ValueError, match=r"LoRA factors of 0 have ranks \[3, 5\]"):
        load_lora_state_dict(model, bad, allow_rank_change=True)
    half = dict(original, **{"2.lora_A_q": torch.randn(4, 8), "2.lora_B_q": torch.randn(8, 4)})  # v stays 2
    with pytest.raises(ValueError, match=r"ranks \[2, 4\]"):
        load_lora_state_dict(model, half, allow_rank_change=True)
    zero = dict(original, **{"0.lora_A": torch.randn(0, 6), "0.lora_B": torch.randn(5, 0)})
    with pytest.raises(ValueError, match=r"rank >= 1"):
        load_lora_state_dict(model, zero, allow_rank_change=True)
    assert model[0].r == 2 and all(torch.equal(v, original[k]) for k, v in lora_state_dict(model).items())
    model[0](torch.randn(2, 6))  # the forward still runs ...
    load_lora_state_dict(model, original)  # ... and the original adapter still loads


def test_lora_py_alone_serves_a_model_of_linear_layers_and_attention(tmp_path):
    """Copied alone into an empty folder (torch only), lora.py wraps an MLP's linear layers and an attention block,
    reloads its adapter and merges: the merged output equals the unmerged one, for both kinds of layer."""
    code = (
        "import torch, torch.nn as nn\n"
        "import lora\n"
        "torch.manual_seed(0)\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.attn, self.fc = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(self.attn(x, x, x, need_weights=False)[0])\n"
        "m = Net()\n"
        "names = lora.add_lora(m, ['attn', 'fc'], r=2, alpha=4)\n"
        "with torch.no_grad():\n"
        "    for p in m.parameters():\n"
        "        if p.requires_grad: p.normal_()\n"
        "state = lora.lora_state_dict(m)\n"
        "lora.load_lora_state_dict(m, state)\n"
        "x = torch.randn(5, 4, 8)\n"
        "y = m(x)\n"
        "lora.merge_lora(m)\n"
        "print(names, sorted(state), float((m(x) - y).abs().max() / y.abs().max()))\n"
    )
    out = run_alone(tmp_path, ["lora.py"], code)
    assert out.returncode == 0, out.stderr[-2000:]
    head, diff = out.stdout.rsplit("] ", 1)
    assert "['attn', 'fc']" in head and head.count("lora_A") == 3 and head.count("lora_B") == 3
    assert float(diff) < 1e-5


# ----------------------------------------------------------------------------- LoRA on nn.MultiheadAttention
def test_packed_qv_changes_q_and_v_only():
    model = tiny_vit()
    model.eval()
    x = torch.randn(2, 3, 16, 16)
    ref = model(x)
    names = add_lora(model, ["self_attention"], r=2, alpha=4)
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
