"""checkpoint.py: the fingerprint names what the adapters depend on; a checkpoint that is not this run's
or not sound is refused in one line, without running code."""
import pytest
import torch

from checkpoint import ResumeError, RunState, fingerprint, load_state, save_state
from pipeline import ExperimentConfig


def test_fault_options_are_fingerprinted_only_when_set(mlp_problem):
    bias_free_model, client = mlp_problem
    model, splits = bias_free_model(), [client("c0", 0)]
    plain = fingerprint(model, splits, ExperimentConfig())
    assert "drop_prob" not in plain and "max_update_norm" not in plain  # checkpoints of older runs stay valid
    assert fingerprint(model, splits, ExperimentConfig(drop_prob=0.1)) != plain
    assert fingerprint(model, splits, ExperimentConfig(max_update_norm=3.0)) != plain



def test_saved_state_loads_back_and_foreign_states_are_refused(tmp_path, same):
    path = str(tmp_path / "checkpoint.pt")
    state = RunState("fp", fedit={"round": 1, "global_state": {"w": torch.ones(2)}, "private_states": {},
                                  "history": []}, local={"c0": {"w": torch.arange(3.0)}})
    save_state(state, path)
    back = load_state(path, "fp")
    assert same(back.fedit, state.fedit) and same(back.local, state.local) and back.fallbacks == []
    with pytest.raises(ResumeError, match="other training settings"):
        load_state(path, "another run")
    torch.save({"fingerprint": "fp"}, path)
    with pytest.raises(ResumeError, match="not a potara experiment checkpoint"):
        load_state(path, "fp")
