"""pipeline.run_experiment on the tiny MLP problem: degenerate numerics never give a NaN adapter, faults
reach results.json, and each adapter is written once and the checkpoint once a round. (That the pipeline's
numbers are the library's is checked end to end elsewhere: bitwise resume in test_run_cifar.py, the Flower app
against the in-process run in test_flower.py.)"""

import json
import os
import warnings

import pytest
import torch

from lora import lora_state_dict
from potara_harness.checkpoint import read_run
from potara_harness.config import ExperimentConfig
from potara_harness.pipeline import run_experiment


def _tensors(obj):
    """Every tensor in nested dicts / lists (a run folder's, read_run)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (dict, list, tuple)):
        for v in obj.values() if isinstance(obj, dict) else obj:
            yield from _tensors(v)


MLP_CFG = dict(
    rounds=2,
    local_steps=3,
    lr=1e-2,
    batch_size=8,
    local_train_steps=4,
    finetune_steps=3,
    fisher_samples=8,
    grid_step=0.25,
    snapshots=2,
    estimator="paper",
    fisher_split="train",
)  # the inverse-Fisher path, on the degenerate train data


def test_zero_fisher_and_nan_client_warn_and_give_finite_adapters_and_results(tmp_path, mlp_problem, same):
    bias_free_model, client = mlp_problem
    """c_zero: all-zero inputs -> every LoRA gradient is 0 (bias-free layers) -> all-zero Fisher.
    c_nan: NaN inputs -> NaN updates, NaN local training, NaN statistics. Nothing NaN comes out."""
    healthy = [client("c0", 0), client("c1", 1), client("c_zero", 2, train_fill=0.0)]
    nan_client = client("c_nan", 3, train_fill=float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_experiment(
            bias_free_model(), healthy + [nan_client], ExperimentConfig(**MLP_CFG), str(tmp_path / "a"), progress=False
        )
    text = "\n".join(str(w.message) for w in caught)
    for expected in (
        "client c_nan: local training gave NaN/Inf",
        "client c_nan: fine-tune training gave NaN/Inf",
        "client c_nan: NaN/Inf in the Fisher",
        "client c_nan: non-finite variance terms",
        "all zero",
    ):
        assert expected in text, expected
    ck = read_run(str(tmp_path / "a"))
    assert all(torch.isfinite(t).all() for t in _tensors(ck))
    init = lora_state_dict(bias_free_model())
    assert same(ck["local"]["c_nan"], init) and same(ck["finetuned"]["c_nan"], ck["fedit"]["global_state"])
    for m, res in r["methods"].items():
        assert all(0 <= a <= 1 for a in res["per_client"].values()), m
    assert r["per_client"]["c_nan"]["potara"]["lam"] == 0.5 and r["per_client"]["c_zero"]["potara"]["lam"] == 0.5
    assert [h["rejected"][0]["client"] for h in r["fedit_history"]] == ["c_nan"] * 2
    assert {(f["client"], f["stage"]) for f in r["faults"]["fallbacks"]} == {("c_nan", "local"), ("c_nan", "fine-tune")}
    saved = json.loads(
        (tmp_path / "a" / "results.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not JSON"),
    )
    assert saved["per_client"]["c_nan"]["potara"]["a"] is None  # NaN written as null
    assert "non-finite statistics for c_nan" in (tmp_path / "a" / "results.md").read_text()
    # the rejected client never touched the global adapter: same as a run without it (client indices unchanged)
    with pytest.warns(UserWarning, match="all zero"):
        clean = run_experiment(
            bias_free_model(), healthy, ExperimentConfig(**MLP_CFG), str(tmp_path / "b"), progress=False
        )
    ck_clean = read_run(str(tmp_path / "b"))
    assert same(ck["fedit"]["global_state"], ck_clean["fedit"]["global_state"])
    assert r["methods"]["fedit"]["per_client"]["c0"] == clean["methods"]["fedit"]["per_client"]["c0"]


@pytest.mark.parametrize("clients", [2, 4])
def test_each_adapter_is_written_once_and_the_checkpoint_once_a_round(tmp_path, mlp_problem, monkeypatch, clients):
    """Bytes written linear in the clients. checkpoint.pt is written once at the start and once per
    federated round (never per client), every client's local and fine-tuned adapter and every snapshot once."""
    from potara_harness import checkpoint

    bias_free_model, client = mlp_problem
    writes, real = [], checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write", lambda path, write: writes.append(path) or real(path, write))
    run_experiment(
        bias_free_model(),
        [client(f"c{k}", k) for k in range(clients)],
        ExperimentConfig(**{**MLP_CFG, "estimator": "verified"}),
        str(tmp_path),
        progress=False,
    )
    names = sorted(os.path.relpath(p, tmp_path) for p in writes)
    R = MLP_CFG["rounds"]
    expected = sorted(
        ["checkpoint.pt"] * (1 + 2 * R)
        + [f"adapters/snapshot-{r:04d}.pt" for r in (1, 2)]
        + [f"adapters/{kind}-{i:04d}.pt" for kind in ("local", "finetuned") for i in range(clients)]
    )
    assert names == expected
