"""digits.py: the real handwritten digits, the clients' tasks and partitions, the backbone and the client model."""

import sys

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from data import (
    DataError,  # noqa: E402
    public_and_pool,  # noqa: E402
)
from potara_harness.config import DigitsConfig  # noqa: E402
from potara_studies.digits import (  # noqa: E402
    build_model,
    load_digits_data,
    pretrain_backbone,
    scenario_splits,
    task_tables,
)


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits_data()
    cfg = DigitsConfig()
    public, pool = public_and_pool(len(y), cfg.public)
    return x, y, cfg, public, pool


def rows_of(x: torch.Tensor, images: torch.Tensor) -> np.ndarray:
    """Index into x of every image (the 1797 digits have no duplicate images: an exact match is unique)."""
    hits = (images[:, None, :] == x[None, :, :]).all(-1)
    assert (hits.sum(1) == 1).all()
    return hits.float().argmax(1).numpy()


def test_load_digits_is_the_bundled_uci_set(digits):
    x, y, *_ = digits
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # 4-bit pixel counts 0..16, scaled by 1/16
    assert np.array_equal(np.bincount(y), [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])  # UCI's class counts
    assert torch.equal(x * 16, torch.round(x * 16))


def test_missing_scikit_learn_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import then raises ImportError
    with pytest.raises(DataError, match=r"scikit-learn.*\[study\]"):
        load_digits_data()


def test_task_tables_by_hand():
    t = task_tables(7)
    assert t[0].tolist() == list(range(10))
    assert t[1].tolist() == [0, 1] * 5
    assert t[2].tolist() == [0] * 5 + [1] * 5
    assert t[3].tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert t[4].tolist() == list(range(9, -1, -1))
    assert t[5].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert t[6].tolist() == t[0].tolist()  # the tasks cycle


@pytest.mark.parametrize("scenario", ["conflict", "dirichlet-0.5"])
def test_scenario_clients_are_disjoint_sized_and_labelled_by_their_task(digits, scenario):
    x, y, cfg, public, pool = digits
    splits = scenario_splits(scenario, x, y, pool, cfg, seed=3)
    assert len(splits) == cfg.clients
    seen = set(public.tolist())
    tables = task_tables(cfg.clients)
    for k, s in enumerate(splits):
        for part, size in (("train", cfg.train), ("val", cfg.val), ("test", cfg.test)):
            inputs, targets = getattr(s, f"{part}_inputs"), getattr(s, f"{part}_targets")
            assert len(inputs) == size
            idx = rows_of(x, inputs)
            assert not seen & set(idx.tolist())  # no image twice, none from the public split
            seen |= set(idx.tolist())
            expected = tables[k][y[idx]] if scenario == "conflict" else y[idx]
            assert np.array_equal(targets.numpy(), expected)
    if scenario == "dirichlet-0.5":  # label skew: some client's most frequent digit is far above 1/10
        top = [np.bincount(s.train_targets.numpy(), minlength=10).max() / cfg.train for s in splits]
        assert max(top) > 0.3
    with pytest.raises(DataError, match="unknown real-data scenario"):
        scenario_splits("nope", x, y, pool, cfg, 0)


def test_too_many_clients_is_a_data_error(digits):
    x, y, cfg, public, pool = digits
    big = DigitsConfig(clients=20)
    with pytest.raises(DataError, match="20 clients"):
        scenario_splits("conflict", x, y, pool, big, 0)


def test_backbone_learns_the_digits_and_the_client_model_starts_at_zero(digits):
    x, y, cfg, public, pool = digits
    torch.set_num_threads(1)
    backbone = pretrain_backbone(x[public], y[public], cfg, seed=0)
    again = pretrain_backbone(x[public], y[public], cfg, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(backbone.state_dict().values(), again.state_dict().values()))
    with torch.no_grad():
        acc = float((backbone(x[pool]).argmax(-1) == torch.from_numpy(y[pool])).float().mean())
    assert acc > 0.85  # digits it never saw: a useful pre-trained backbone
    model = build_model(backbone, cfg, seed=0)
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["body.0.lora_A", "body.0.lora_B", "body.2.lora_A", "body.2.lora_B", "head.bias", "head.weight"]
    with torch.no_grad():
        assert torch.equal(model(x[:5]), torch.zeros(5, 10))  # zero head (and B = 0): phi_0 predicts nothing yet
        assert torch.equal(model.body(x[:5]), backbone.body(x[:5]))
    assert torch.equal(build_model(backbone, cfg, 0).body[0].lora_A, model.body[0].lora_A)
    assert not torch.equal(build_model(backbone, cfg, 1).body[0].lora_A, model.body[0].lora_A)
