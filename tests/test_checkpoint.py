"""checkpoint.py: the fingerprint names what the adapters depend on; a checkpoint that is not this run's
or not sound is refused in one line, without running code."""
import pytest
import torch

from potara_harness.checkpoint import ResumeError, RunState, fingerprint, load_state, save_state
from potara_harness.config import ExperimentConfig


def test_fault_options_are_fingerprinted_only_when_set(mlp_problem):
    bias_free_model, client = mlp_problem
    model, splits = bias_free_model(), [client("c0", 0)]
    plain = fingerprint(model, splits, ExperimentConfig())
    assert "drop_prob" not in plain and "max_update_norm" not in plain  # checkpoints of older runs stay valid
    assert fingerprint(model, splits, ExperimentConfig(drop_prob=0.1)) != plain
    assert fingerprint(model, splits, ExperimentConfig(max_update_norm=3.0)) != plain


def test_saved_state_loads_back_and_foreign_states_are_refused(tmp_path, same):
    path = str(tmp_path / "checkpoint.pt")
    state = RunState("fp", fedit={"round": 0, "global_state": {"w": torch.ones(2)}, "private_states": {},
                                  "history": []}, local={"c0": {"w": torch.arange(3.0)}})
    save_state(state, path)
    back = load_state(path, "fp")
    assert same(back.fedit, state.fedit) and same(back.local, state.local) and back.fallbacks == []
    with pytest.raises(ResumeError, match="other training settings"):
        load_state(path, "another run")
    torch.save({"fingerprint": "fp"}, path)
    with pytest.raises(ResumeError, match="not a potara experiment checkpoint"):
        load_state(path, "fp")


# ----------------------------------------------------------------------------- the fingerprint (issue 13, item 2)
def test_fingerprint_covers_lora_alpha_every_weight_byte_and_buffers(mlp_problem):
    import copy

    import torch.nn as nn

    from lora import add_lora
    bias_free_model, client = mlp_problem
    splits, cfg = [client("c0", 0)], ExperimentConfig()
    model = bias_free_model()
    fp = fingerprint(model, splits, cfg)
    assert fingerprint(bias_free_model(), splits, cfg) == fp  # the same run: the same fingerprint

    torch.manual_seed(0)  # bias_free_model with alpha 1000 instead of 4: same tensors, another scaling
    other = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    add_lora(other, ["0", "2"], r=2, alpha=1000)
    assert [torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values())] == [True] * 6
    assert fingerprint(other, splits, cfg) != fp

    flipped = copy.deepcopy(model)  # rows of a base weight reversed: every per-tensor sum stays the same
    w = flipped[0].base.weight
    with torch.no_grad():
        w.copy_(w.flip(0))
    assert float(w.double().sum()) == float(model[0].base.weight.double().sum())
    assert fingerprint(flipped, splits, cfg) != fp

    buffered = copy.deepcopy(model)  # a non-persistent buffer (e.g. a normalisation constant) counts too
    buffered.register_buffer("mean", torch.zeros(3), persistent=False)
    fp_buffer = fingerprint(buffered, splits, cfg)
    buffered.mean += 1
    assert fingerprint(buffered, splits, cfg) != fp_buffer


@pytest.mark.parametrize("change, fingerprinted", [
    (dict(rounds=3), True), (dict(local_steps=3), True), (dict(clients_per_round=1), True), (dict(lr=0.5), True),
    (dict(weight_decay=0.1), True), (dict(batch_size=5), True), (dict(local_train_steps=7), True),
    (dict(finetune_steps=7), True), (dict(snapshots=1), True), (dict(fedsa=False), True), (dict(seed=5), True),
    (dict(estimator="paper"), False), (dict(fisher_samples=3), False), (dict(grid_step=0.5), False),
    (dict(eps=0.1), False), (dict(granularity="module"), False),  # Potara / grid options only re-evaluate
])
def test_fingerprint_holds_every_training_setting(mlp_problem, change, fingerprinted):
    bias_free_model, client = mlp_problem
    model, splits = bias_free_model(), [client("c0", 0)]
    assert (fingerprint(model, splits, ExperimentConfig(**change)) != fingerprint(model, splits, ExperimentConfig())) \
        == fingerprinted


# ----------------------------------------------------------------------------- edited checkpoints (item 7)
def sound_state(model, fp):
    """A checkpoint as the pipeline writes it after FedIT round 1 of 2 (FedSA-LoRA not started)."""
    from lora import lora_state_dict
    adapter = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
    record = {"round": 0, "clients": ["c0"], "dropped": [], "rejected": [], "mean_train_loss": 1.5,
              "bytes_down": 10, "bytes_up": 10}
    return adapter, RunState(fp, fedit={"round": 1, "global_state": dict(adapter), "private_states": {"c0": {}},
                                        "history": [record]},
                             snapshots={1: dict(adapter)}, local={"c0": dict(adapter)})


def edits(adapter):
    k = next(iter(adapter))
    return [
        ("fedit", lambda f: {**f, "global_state": {**f["global_state"], k: f["global_state"][k].double()}}, "dtype torch.float64"),
        ("fedit", lambda f: {**f, "global_state": {**f["global_state"], k: torch.zeros(7, 7)}}, "has shape (7, 7)"),
        ("fedit", lambda f: {**f, "global_state": {kk: v for kk, v in f["global_state"].items() if kk != k}}, "are not the model's"),
        ("fedit", lambda f: {**f, "round": "1"}, "round '1' is not a count"),
        ("fedit", lambda f: {**f, "round": -3}, "round -3 is not a count"),
        ("fedit", lambda f: {**f, "round": 5}, "round 5 is not a count in [0, 2]"),
        ("fedit", lambda f: {**f, "history": "junk"}, "history must list one record"),
        ("fedit", lambda f: {**f, "history": [{"round": 0, "bytes_down": "x"}]}, "history[0] bytes"),
        ("fedit", lambda f: {**f, "private_states": {"mallory": {}}}, "private states of other clients"),
        ("snapshots", lambda s: {99: s[1]}, "snapshots: rounds must be counts"),
        ("local", lambda s: {"c0": {kk: v * float("nan") for kk, v in s["c0"].items()}}, "holds NaN or Inf"),
        ("local", lambda s: {"c0": {kk: torch.zeros(1).expand(v.shape) for kk, v in s["c0"].items()}}, "expanded view"),
        ("local", lambda s: {"mallory": s["c0"]}, "local: adapters of unknown clients"),
        ("fallbacks", lambda f: [{"client": "c0"}], "fallbacks: malformed"),
    ]


@pytest.mark.parametrize("case", range(14))
def test_edited_checkpoint_with_a_valid_fingerprint_is_refused(tmp_path, mlp_problem, same, case):
    bias_free_model, client = mlp_problem
    model = bias_free_model()
    adapter, state = sound_state(model, "fp")
    path = str(tmp_path / "checkpoint.pt")
    save_state(state, path)
    back = load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2)  # the sound one loads
    assert same(back.fedit, state.fedit) and same(back.snapshots, state.snapshots)
    part, edit, why = edits(adapter)[case]
    setattr(state, part, edit(getattr(state, part)))
    save_state(state, path)
    with pytest.raises(ResumeError) as e:
        load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2)
    msg = str(e.value)
    assert "is damaged or edited" in msg and why in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- fuzz: randomly corrupted checkpoints
def test_fuzz_checkpoints_give_one_clear_error_or_a_sound_state(tmp_path, mlp_problem, bounded, corrupted_torch_file):
    """300 seeded corruptions of a sound checkpoint: each ends in a one-line ResumeError or loads a state that is
    sound by the validator; none hangs, allocates gigabytes (RLIMIT_AS) or writes anything."""
    import os
    import random

    from lora import check_tensors
    bias_free_model, _ = mlp_problem
    adapter, state = sound_state(bias_free_model(), "fp")
    good = tmp_path / "good.pt"
    save_state(state, str(good))
    template = good.read_bytes()
    plain = torch.load(good, weights_only=True)
    numel = max(t.numel() for t in adapter.values())
    rng, accepted = random.Random(0), 0
    for case in range(300):
        path = tmp_path / "checkpoint.pt"
        path.write_bytes(corrupted_torch_file(rng, template, plain, numel))
        before = sorted(os.listdir(tmp_path))
        with bounded():
            try:
                back = load_state(str(path), "fp", adapter=adapter, clients=["c0"], rounds=2)
            except ResumeError as e:
                assert str(e).startswith(str(path)) and "\n" not in str(e), (case, str(e))
            else:  # a flip in a value or in zip padding: still a sound state
                accepted += 1
                for part in (back.local, back.snapshots):
                    for s in part.values():
                        check_tensors(s, adapter)
        assert sorted(os.listdir(tmp_path)) == before, case
    assert accepted < 100, accepted  # as test_fuzz.py: most are caught; flips inside values stay sound
    print(f"{accepted} of 300 corrupted checkpoints were still sound")
