"""Specification of rounds.py: a client's update checked with a reason and never a raise; the seeded sampling of
clients."""

import pytest
import torch

from fed import derive_seed, sample_clients
from potara_guards.updates import validate_update


def test_validate_update_rejects_crafted_tensors_with_a_reason_and_never_raises():
    ref = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    crafted = {
        "sparse": torch.zeros(3, 4).to_sparse(),
        "meta": torch.empty(3, 4, device="meta"),
        "expanded": torch.zeros(1, 4).expand(3, 4),
        "int": torch.zeros(3, 4, dtype=torch.int64),
        "huge": torch.zeros(1).expand(200000, 200000),
        "list": [[0.0] * 4] * 3,
    }
    for name, t in crafted.items():
        reason = validate_update({"w": t, "b": torch.zeros(4)}, ref)
        assert isinstance(reason, str) and reason.startswith("update: w"), (name, reason)
    assert validate_update("not a dict", ref) == "update: expected a dict of tensors, got str"
    assert validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref) is None
    assert "exceeds max_update_norm 3" in validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref, 3.0)
    assert validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref, 3.5) is None  # sqrt(12) = 3.46


def test_sample_clients_is_seeded_sorted_and_drops_a_subset():
    selected, dropped = sample_clients(seed=4, round=2, num_clients=10, clients_per_round=6, drop_prob=0.5)
    g = torch.Generator().manual_seed(derive_seed(4, 2))  # the documented draw, by hand
    assert selected == sorted(torch.randperm(10, generator=g)[:6].tolist())
    u = torch.rand(6, generator=g)
    assert dropped == [k for k, x in zip(selected, u.tolist()) if x < 0.5]
    assert sample_clients(4, 2, 10, 6, 0.5) == (selected, dropped)  # any process draws the same S_t
    assert sample_clients(4, 3, 10, 6, 0.0)[1] == []
    with pytest.raises(ValueError, match="clients_per_round"):
        sample_clients(0, 0, 3, 4)
    with pytest.raises(ValueError, match="drop_prob"):
        sample_clients(0, 0, 3, 2, drop_prob=1.0)
