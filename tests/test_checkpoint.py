"""checkpoint.py: the fingerprint names what the adapters depend on; a checkpoint that is not this run's
or not sound is refused in one line, without running code."""

import json
import os
import re
import shutil

import pytest
import torch

from potara_harness.checkpoint import (
    Parts,
    ResumeError,
    RunState,
    check_settings,
    fingerprint,
    load_state,
    save_state,
)
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
    state = RunState(
        "fp", fedit={"round": 0, "global_state": {"w": torch.ones(2)}, "private_states": {}, "history": []}
    )
    save_state(state, path)
    back = load_state(path, "fp")
    assert same(back.fedit, state.fedit) and back.fedsa is None and back.run_id == state.run_id
    assert set(torch.load(path, weights_only=True)) == {"format", "fingerprint", "run_id", "fedit", "fedsa"}
    with pytest.raises(ResumeError, match="other training settings"):
        load_state(path, "another run")
    torch.save({"fingerprint": "fp"}, path)
    with pytest.raises(ResumeError, match="not a potara experiment checkpoint"):
        load_state(path, "fp")


# ----------------------------------------------------------------------------- the fingerprint
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


@pytest.mark.parametrize(
    "change, fingerprinted",
    [
        (dict(rounds=3), True),
        (dict(local_steps=3), True),
        (dict(clients_per_round=1), True),
        (dict(lr=0.5), True),
        (dict(weight_decay=0.1), True),
        (dict(batch_size=5), True),
        (dict(local_train_steps=7), True),
        (dict(finetune_steps=7), True),
        (dict(snapshots=1), True),
        (dict(fedsa=False), True),
        (dict(seed=5), True),
        (dict(estimator="paper"), False),
        (dict(fisher_samples=3), False),
        (dict(grid_step=0.5), False),
        (dict(eps=0.1), False),
        (dict(granularity="module"), False),  # Potara / grid options only re-evaluate
    ],
)
def test_fingerprint_holds_every_training_setting(mlp_problem, change, fingerprinted):
    bias_free_model, client = mlp_problem
    model, splits = bias_free_model(), [client("c0", 0)]
    assert (
        fingerprint(model, splits, ExperimentConfig(**change)) != fingerprint(model, splits, ExperimentConfig())
    ) == fingerprinted


# ----------------------------------------------------------------------------- what a resume names
def lora_mlp(r=2, alpha=4, flip=False):
    """bias_free_model with other LoRA settings, or a base weight's rows reversed (another backbone)."""
    import torch.nn as nn

    from lora import add_lora

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    if flip:
        with torch.no_grad():
            model[0].weight.copy_(model[0].weight.flip(0))
    add_lora(model, ["0", "2"], r=r, alpha=alpha)
    return model


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(cfg=dict(rounds=3)), "rounds (20 there, 3 now)"),  # snapshots stays 4 (no longer clamped to 3)
        (dict(cfg=dict(rounds=3, lr=0.01)), "rounds (20 there, 3 now), lr (0.001 there, 0.01 now)"),
        (dict(cfg=dict(drop_prob=0.25)), "drop-prob (0.0 there, 0.25 now)"),  # unset there: its default
        (dict(cfg=dict(fedsa=False)), "fedsa (True there, False now)"),
        (dict(model=dict(alpha=1000)), "LoRA rank/alpha (r=2 alpha=4 there, r=2 alpha=1000 now)"),
        (dict(model=dict(r=3)), "LoRA rank/alpha (r=2 alpha=4 there, r=3 alpha=4 now)"),  # not the model too
        (dict(model=dict(flip=True)), "model (backbone or initial adapter)"),
        (dict(seed=1), "client data"),
        (dict(cfg=dict(seed=5), seed=1), "seed (0 there, 5 now)"),  # the seed draws the data: that alone is named
    ],
)
def test_a_resume_names_only_what_changed_with_both_values(mlp_problem, tmp_path, change, named):
    """--rounds 3 --resume named "rounds, snapshots" (the snapshots the run clamped to the rounds), and another
    --rank named the model as well: each difference is named once, the way the command line spells it."""
    _, client = mlp_problem
    before = fingerprint(lora_mlp(), [client("c0", 0)], ExperimentConfig())
    after = fingerprint(
        lora_mlp(**change.get("model", {})),
        [client("c0", change.get("seed", 0))],
        ExperimentConfig(**change.get("cfg", {})),
    )
    path = str(tmp_path / "checkpoint.pt")
    save_state(RunState(before), path)
    with pytest.raises(ResumeError) as e:
        load_state(path, after)
    assert str(e.value) == (
        f"{path} was written by a run with other {named}; rerun with the same arguments, or without --resume to "
        "start over"
    )


def test_a_flower_checkpoint_names_its_settings_too(tmp_path):
    """The Flower server's fingerprint: its run config's settings, the backbone's and phi_0's digests, the clients."""
    saved = {"flower": {"lr": 0.003, "rank": 8, "seed": 0}, "backbone": "b", "phi0": "p", "clients": [10, 10]}
    cases = [
        ({"flower": {"lr": 0.02, "rank": 8, "seed": 0}}, "lr (0.003 there, 0.02 now)"),
        ({"backbone": "other"}, "model (backbone or initial adapter)"),
        ({"flower": {"lr": 0.003, "rank": 4, "seed": 0}, "phi0": "other"}, "rank (8 there, 4 now)"),
        ({"clients": [10, 12]}, "client data"),
    ]
    path = str(tmp_path / "checkpoint.pt")
    save_state(RunState(json.dumps(saved, sort_keys=True)), path)
    for now, named in cases:
        with pytest.raises(ResumeError, match=re.escape(f"written by a run with other {named}; rerun")):
            load_state(path, json.dumps({**saved, **now}, sort_keys=True))


def test_a_resumes_training_settings_are_checked_before_any_work(mlp_problem, tmp_path):
    """check_settings: the checkpoint's training settings and LoRA rank/alpha against the command line's, before
    the data or the model exists; a checkpoint of this run, or none, passes."""
    bias_free_model, client = mlp_problem
    path = str(tmp_path / "checkpoint.pt")
    check_settings(path, ExperimentConfig(rounds=3), 2, 4)  # no checkpoint: nothing to check
    save_state(RunState(fingerprint(bias_free_model(), [client("c0", 0)], ExperimentConfig(rounds=2))), path)
    check_settings(path, ExperimentConfig(rounds=2), 2, 4.0)
    with pytest.raises(ResumeError, match=re.escape("other rounds (2 there, 3 now); rerun")):
        check_settings(path, ExperimentConfig(rounds=3), 2, 4)
    with pytest.raises(ResumeError, match=re.escape("other LoRA rank/alpha (r=2 alpha=4 there, r=8 alpha=16 now)")):
        check_settings(path, ExperimentConfig(rounds=2), 8, 16)
    torch.save({"some": "thing"}, path)
    with pytest.raises(ResumeError, match="is not a potara experiment checkpoint"):
        check_settings(path, ExperimentConfig(rounds=2), 2, 4)


# ----------------------------------------------------------------------------- edited checkpoints
RECORD = {
    "round": 0,
    "clients": ["c0"],
    "dropped": [],
    "rejected": [],
    "mean_train_loss": 1.5,
    "bytes_down": 10,
    "bytes_up": 10,
}


def sound_run(model, folder, fp="fp", rounds=2):
    """A run folder as the pipeline leaves it after FedIT (rounds of rounds, snapshots at 1..rounds) and client c0's
    local adapter (FedSA-LoRA and fine-tuning not started): checkpoint.pt + adapters/snapshot-*.pt + local-0000.pt.
    Returns (phi_0, state, parts, checkpoint path)."""
    from lora import lora_state_dict

    adapter = {k: v.detach().clone() for k, v in lora_state_dict(model).items()}
    state = RunState(
        fp,
        fedit={
            "round": rounds,
            "global_state": dict(adapter),
            "private_states": {"c0": {}},
            "history": [{**RECORD, "round": t} for t in range(rounds)],
        },
    )
    path = str(folder / "checkpoint.pt")
    save_state(state, path)
    parts = Parts(path, state, adapter, ["c0"])
    for r in range(1, rounds + 1):
        parts.save("snapshot", r, dict(adapter))
    parts.save("local", 0, dict(adapter))
    return adapter, state, parts, path


def edits(adapter):
    """(what to edit: the checkpoint's fedit dict, or a function of (state, parts), the reason in the error)."""
    k = next(iter(adapter))
    nan = {kk: v * float("nan") for kk, v in adapter.items()}
    beside = lambda p, state, clients=("c0",): Parts(
        os.path.join(os.path.dirname(p.folder), "checkpoint.pt"), state, adapter, list(clients)
    )  # writes into the same folder
    return [
        (
            "fedit",
            lambda f: {**f, "global_state": {**f["global_state"], k: f["global_state"][k].double()}},
            "dtype torch.float64",
        ),
        ("fedit", lambda f: {**f, "global_state": {**f["global_state"], k: torch.zeros(7, 7)}}, "has shape (7, 7)"),
        (
            "fedit",
            lambda f: {**f, "global_state": {kk: v for kk, v in f["global_state"].items() if kk != k}},
            "are not the model's",
        ),
        ("fedit", lambda f: {**f, "round": "1"}, "round '1' is not a count"),
        ("fedit", lambda f: {**f, "round": -3}, "round -3 is not a count"),
        ("fedit", lambda f: {**f, "round": 5}, "round 5 is not a count in [0, 2]"),
        ("fedit", lambda f: {**f, "history": "junk"}, "history must list one record"),
        ("fedit", lambda f: {**f, "history": [{"round": 0, "bytes_down": "x"}, RECORD]}, "history[0] bytes"),
        ("fedit", lambda f: {**f, "private_states": {"mallory": {}}}, "private states of other clients"),
        ("parts", lambda st, p: os.remove(p.path("snapshot", 2)), "the snapshot of round 2 is missing"),
        ("parts", lambda st, p: p.save("snapshot", 99, adapter), "adapters/snapshot-0099.pt is no part of this run"),
        ("parts", lambda st, p: p.save("local", 0, nan), "holds NaN or Inf"),
        (
            "parts",
            lambda st, p: p.save("local", 0, {kk: torch.zeros(1).expand(v.shape) for kk, v in adapter.items()}),
            "expanded view",
        ),
        (
            "parts",
            lambda st, p: beside(p, st, "c0 c1 c2 c3".split()).save("local", 3, adapter),
            "adapters/local-0003.pt is no part of this run",
        ),
        ("parts", lambda st, p: p.save("local", 0, adapter, {"client": "c0"}), "fallback malformed"),
        (
            "parts",
            lambda st, p: beside(p, RunState("fp")).save("local", 0, adapter),
            "a part of another run",
        ),  # the same settings, started over: another run_id
        (
            "parts",
            lambda st, p: beside(p, RunState("other", run_id=st.run_id)).save("local", 0, adapter),
            "a part of another run",
        ),  # another fingerprint
        ("parts", lambda st, p: shutil.copy(p.path("snapshot", 1), p.path("local", 0)), "holds another part"),
    ]


EDIT_CASES = len(edits({"w": torch.zeros(2)}))  # every edit the list holds: a 19th runs without a change here


@pytest.mark.parametrize("case", range(EDIT_CASES))
def test_edited_checkpoint_with_a_valid_fingerprint_is_refused(tmp_path, mlp_problem, same, case):
    """Each edit of a sound run folder (checkpoint.pt or a part file) is refused by load_state, in one line, before
    anything is trained: a missing snapshot, a part of another run."""
    bias_free_model, _ = mlp_problem
    adapter, state, parts, path = sound_run(bias_free_model(), tmp_path)
    back = load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2, snapshots=[1, 2])  # the sound one loads
    assert same(back.fedit, state.fedit) and back.run_id == state.run_id
    part, edit, why = edits(adapter)[case]
    if part == "fedit":
        state.fedit = edit(state.fedit)
        save_state(state, path)
    else:
        edit(state, parts)
    with pytest.raises(ResumeError) as e:
        load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2, snapshots=[1, 2])
    msg = str(e.value)
    assert ("is damaged" in msg) and why in msg and "\n" not in msg, msg


def test_a_snapshot_or_adapter_not_yet_made_is_not_required(tmp_path, mlp_problem):
    """Killed after round 1 of 4 (snapshots at 2 and 4): nothing is missing; a snapshot file one round ahead of
    checkpoint.pt (killed between the two writes) is this run's and accepted (the round reruns and rewrites it)."""
    bias_free_model, _ = mlp_problem
    adapter, state, parts, path = sound_run(bias_free_model(), tmp_path, rounds=1)
    os.remove(parts.path("local", 0))
    os.remove(parts.path("snapshot", 1))
    load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=4, snapshots=[2, 4])
    parts.save("snapshot", 2, adapter)
    load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=4, snapshots=[2, 4])
    parts.save("local", 0, adapter)  # a client adapter before FedIT ended: an edited checkpoint.pt
    with pytest.raises(ResumeError, match="a client adapter before FedIT ended"):
        load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=4, snapshots=[2, 4])


FLOWER_RECORD = {
    **RECORD,
    "failed": [],
    "wire_bytes_down": 12,
    "wire_bytes_up": 12,
    "seconds": 0.5,
    "client_seconds": {"c0": {"train": 0.25}},
}


@pytest.mark.parametrize(
    "edit, why",
    [
        (lambda f: None, "fedit: missing"),
        (lambda f: {**f, "history": [{k: v for k, v in FLOWER_RECORD.items() if k != "failed"}]}, "history[0] failed"),
        (lambda f: {**f, "history": [{**FLOWER_RECORD, "failed": [{"client": "c0"}]}]}, "history[0] failed"),
        (lambda f: {**f, "history": [{**FLOWER_RECORD, "wire_bytes_up": -1}]}, "history[0] wire bytes or seconds"),
        (
            lambda f: {**f, "history": [{**FLOWER_RECORD, "client_seconds": {"c0": {"train": "x"}}}]},
            "wire bytes or seconds",
        ),
    ],
)
def test_edited_flower_checkpoint_is_refused_at_load(tmp_path, mlp_problem, edit, why):
    """The Flower server's checkpoint with fedit = None or history records without `failed`
    (TypeError / KeyError in the server before) is refused by load_state(flower=True) in one line."""
    from lora import lora_state_dict

    adapter = lora_state_dict(mlp_problem[0]())
    fedit = {"round": 1, "global_state": dict(adapter), "private_states": {"c0": {}}, "history": [FLOWER_RECORD]}
    path = str(tmp_path / "checkpoint.pt")
    save_state(RunState("fp", fedit=fedit), path)
    load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2, flower=True)  # the sound one loads
    save_state(RunState("fp", fedit=edit(fedit)), path)
    with pytest.raises(ResumeError) as e:
        load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2, flower=True)
    assert "is damaged or edited" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- fuzz: randomly corrupted checkpoints
def test_fuzz_checkpoints_give_one_clear_error_or_a_sound_state(tmp_path, mlp_problem, bounded, corrupted_torch_file):
    """300 seeded corruptions of a sound run folder (checkpoint.pt, or the local adapter's part file): each ends in
    a one-line ResumeError or loads a state that is sound by the validator; none hangs, allocates gigabytes
    (RLIMIT_AS) or writes anything."""
    import random

    from potara_guards.tensor_checks import check_tensors

    bias_free_model, _ = mlp_problem
    adapter, _, parts, path = sound_run(bias_free_model(), tmp_path)
    files = {
        name: (open(name, "rb").read(), torch.load(name, weights_only=True)) for name in (path, parts.path("local", 0))
    }
    numel = max(t.numel() for t in adapter.values())
    rng, accepted = random.Random(0), 0
    for case in range(300):
        target = sorted(files)[case % 2]
        template, plain = files[target]
        with open(target, "wb") as f:
            f.write(corrupted_torch_file(rng, template, plain, numel))
        before = sorted(os.listdir(tmp_path))
        with bounded():
            try:
                back = load_state(path, "fp", adapter=adapter, clients=["c0"], rounds=2, snapshots=[1, 2])
            except ResumeError as e:
                assert str(e).startswith(target) and "\n" not in str(e), (case, str(e))
            else:  # a flip in a value or in zip padding: still a sound state
                accepted += 1
                check_tensors(back.fedit["global_state"], adapter)
                check_tensors(parts.load("local", 0)[0], adapter)
        assert sorted(os.listdir(tmp_path)) == before, case
        with open(target, "wb") as f:
            f.write(template)
    assert accepted < 100, accepted  # as test_fuzz.py: most are caught; flips inside values stay sound
    print(f"{accepted} of 300 corrupted run folders were still sound")
