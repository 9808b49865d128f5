"""Shared test helpers: the micro ViT that stands in for the tiny preset's backbone in CLI-level tests."""
import pytest
import torch

import vit

MICRO_VIT = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.fixture
def micro_preset(monkeypatch):
    """vit.py's tiny preset with the micro ViT; torch's thread count restored afterwards (the CLI sets it)."""
    monkeypatch.setitem(vit.PRESETS["tiny"], "vit", MICRO_VIT)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
