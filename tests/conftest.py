"""Shared test helpers, as fixtures: the micro ViT standing in for the tiny preset's backbone, a tiny MLP
problem (a bias-free LoRA MLP and its clients) for pipeline-level tests, nested tensor equality."""
import pytest
import torch
import torch.nn as nn

import vit
from data import ClientSplits
from lora import add_lora

MICRO_VIT = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.fixture
def micro_preset(monkeypatch):
    """vit.py's tiny preset with the micro ViT; torch's thread count restored afterwards (the CLI sets it)."""
    monkeypatch.setitem(vit.PRESETS["tiny"], "vit", MICRO_VIT)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tensors_equal(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values: equal types, keys, dtypes and values (bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def same():
    return tensors_equal


def bias_free_model():
    """A 6 -> 16 -> 4 MLP without biases, LoRA (r = 2) on both layers: all-zero inputs give all-zero gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    add_lora(model, ["0", "2"], r=2, alpha=4)
    return model


def mlp_client(name, seed, train_fill=None):
    """24 / 8 / 12 random examples of the MLP problem; train_fill replaces every training input value."""
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 6, generator=g)
    y = lambda n: torch.randint(0, 4, (n,), generator=g)
    tr = x(24)
    if train_fill is not None:
        tr = torch.full_like(tr, train_fill)
    return ClientSplits(name, tr, y(24), x(8), y(8), x(12), y(12))


@pytest.fixture
def mlp_problem():
    """(a fresh bias_free_model() each call, mlp_client) for pipeline-level tests that take seconds."""
    return bias_free_model, mlp_client


# ----------------------------------------------------------------------------- language models (the llm extra)
SMALL_LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2)


@pytest.fixture
def small_llama():
    """A factory: small_llama(seed) -> a 2-layer tiny Llama (lm.tiny_llama) in eval mode."""
    pytest.importorskip("transformers")
    import lm
    from llm_data import ByteTokenizer

    def make(seed=0):
        torch.manual_seed(seed)
        return lm.tiny_llama(ByteTokenizer.vocab_size, **SMALL_LLAMA).eval()
    return make


@pytest.fixture
def randomize_lora():
    """randomize_lora(model, seed, scale): every trainable tensor drawn from N(0, scale^2) (a trained adapter)."""
    def randomize(model, seed=1, scale=0.3):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)
    return randomize
