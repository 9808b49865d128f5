"""report.py: outputs are written atomically (a crash never leaves a partial file), results.json is strict
JSON, the table shows every method."""

import json
import os

import pytest
import torch

import data as data_module
from data import write_synthetic_cifar100
from potara_guards.adapter_file import save_adapter
from potara_guards.safe_files import atomic_write
from potara_harness.checkpoint import RunState, save_state
from potara_harness.config import ExperimentConfig
from potara_harness.pipeline import run_experiment
from potara_harness.report import markdown_table, strict_json, write_outputs


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from conftest import bias_free_model, mlp_client

    cfg = ExperimentConfig(
        rounds=1,
        local_steps=2,
        lr=1e-2,
        batch_size=8,
        local_train_steps=2,
        finetune_steps=1,
        fisher_samples=8,
        grid_step=0.5,
        snapshots=1,
        fedsa=False,
    )
    return run_experiment(
        bias_free_model(),
        [mlp_client("c0", 0), mlp_client("c1", 1)],
        cfg,
        str(tmp_path_factory.mktemp("r")),
        progress=False,
    )


def test_atomic_writes_never_leave_a_partial_file(results, tmp_path, monkeypatch):
    """A crash between writing and renaming (simulated: os.replace fails) leaves the previous file whole
    and no temporary file behind; a writer that wrote in place would not raise here, or would clobber."""
    write_outputs(results, str(tmp_path))
    old = {n: (tmp_path / n).read_bytes() for n in ("results.json", "results.md")}
    save_adapter(tmp_path / "adapter.pt", {"w": torch.ones(2)})
    old["adapter.pt"] = (tmp_path / "adapter.pt").read_bytes()
    save_state(RunState("a"), str(tmp_path / "checkpoint.pt"))
    old["checkpoint.pt"] = (tmp_path / "checkpoint.pt").read_bytes()
    syn = tmp_path / "syn"
    write_synthetic_cifar100(str(syn), 1, 1)
    folder = syn / "cifar-100-python"
    old_syn = {n: (folder / n).read_bytes() for n in ("train", "test", "meta")}

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_outputs({**results, "mean_abs_lam_diff": 1.0}, str(tmp_path))
    with pytest.raises(OSError, match="simulated"):
        save_adapter(tmp_path / "adapter.pt", {"w": torch.zeros(5)})
    with pytest.raises(OSError, match="simulated"):
        save_state(RunState("b"), str(tmp_path / "checkpoint.pt"))
    with pytest.raises(OSError, match="simulated"):
        atomic_write(str(tmp_path / "results.json"), lambda f: f.write(b"{"))
    with pytest.raises(OSError, match="simulated"):
        write_synthetic_cifar100(str(syn), 2, 1)  # other parameters: a rewrite
    monkeypatch.undo()
    for name, content in old.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert {n: (folder / n).read_bytes() for n in old_syn} == old_syn
    assert not (folder / data_module.SYNTHETIC_MARKER).exists()  # the old set is no longer marked finished ...
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    write_synthetic_cifar100(str(syn), 2, 1)  # ... so the next call writes the new one completely
    assert data_module.load_cifar100(str(syn), download=False).images.shape[0] == 300


def test_results_json_is_strict_and_the_table_lists_every_method(results, tmp_path):
    assert strict_json({"a": [1.0, float("nan")], "b": {"c": float("inf")}}) == {"a": [1.0, None], "b": {"c": None}}
    write_outputs({**results, "mean_abs_lam_diff": float("nan")}, str(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert saved["mean_abs_lam_diff"] is None
    table = markdown_table(results)
    for m in results["methods"].values():
        assert f"| {m['label']} | {m['mean']:.3f} |" in table


def test_plots_written_when_matplotlib_is_installed(results, tmp_path):
    pytest.importorskip("matplotlib")
    write_outputs(results, str(tmp_path))
    assert (tmp_path / "lambda.png").stat().st_size > 0 and (tmp_path / "communication.png").stat().st_size > 0
