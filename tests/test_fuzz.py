"""Fuzz: randomly corrupted adapter files and client updates end in one clear error, never anything else.

Specifies the one validator of untrusted tensors (tensor_checks.check_tensors) through its users:
adapter_file.load_adapter
(files: truncations, bit flips, crafted sizes/strides/offsets, wrong dtypes, sparse/meta tensors, non-tensor
values), adapter_file.save_adapter (nothing written for a bad state), lora.load_lora_state_dict (a caller's mistake: one
ValueError, the model left as it was, also when a rank change is allowed), updates.validate_update /
fed.server_round (a bad update is rejected with a reason, never raised; a crafted one by the guards' reply_problem)
and fed.fedavg (a caller's mistake: ValueError, never a silent NaN or zero); and the trusted run folder
(safe_files.py, through run_folder.prepare_out_dir / out_dir_lock, safe_files.atomic_write and
llm_data.read_task_dir): links,
folders, FIFOs and devices planted under the run's file names are refused in one line or never touched, nothing
outside the folder is written, nothing hangs.
Each case must finish within a few seconds (no hang) under an address-space limit of current use + 2 GiB
(no huge allocation). Seeded: the same cases on every run. The kit (bounded, corrupt_tensor, crafted torch
files) is shared with the checkpoint and backbone fuzz tests in conftest.py.
"""

import io
import os
import random

import pytest
import torch
from conftest import CraftedView, FakeStorage, corrupt_tensor, crafted_torch_file, damaged_bytes

import fed
from fed import ClientReply, fedavg, server_round
from lora import add_lora, load_lora_state_dict, lora_state_dict
from potara_guards.adapter_file import load_adapter, save_adapter
from potara_guards.tensor_checks import AdapterError
from potara_guards.updates import reply_problem, validate_update

REFERENCE = {
    "enc.0.lora_A": torch.randn(2, 6, generator=torch.Generator().manual_seed(0)),
    "enc.0.lora_B": torch.zeros(5, 2),
    "head.weight": torch.ones(3, 5),
}


# ---- corrupted states ----


HONEST = ["dtype", "shape", "sparse", "nan", "inf", "scalar", "string", "list", "none"]  # a caller's own mistakes


def corrupt_state(rng: random.Random, state: dict, model_free: bool = False, honest: bool = False):
    """A state with one tensor corrupted, a key dropped or added, a non-str key, or not a dict at all.
    model_free: only what is wrong without a model to compare with (no changed shapes or key sets).
    honest: only the mistakes a caller's own code makes (HONEST), not crafted views or storages: what the method's
    files (lora.py, fed.py) check; the crafted ones are the guards' (potara_guards)."""
    kind = rng.choice(
        ["tensor"] * 6 + ([] if model_free else ["drop key", "extra key", "rank"] * 2) + ["int key", "not a dict"]
    )
    bad = dict(state)
    if kind == "rank":  # one LoRA factor at another rank than its partner (the same module's A or B)
        r = rng.choice([1, 3, 5])
        bad.update({"enc.0.lora_A": torch.zeros(r, 6)} if rng.random() < 0.5 else {"enc.0.lora_B": torch.zeros(5, r)})
    elif kind == "tensor":
        k = rng.choice(sorted(bad))
        kind = rng.choice(HONEST) if honest else "huge" if model_free and rng.random() < 0.1 else None
        bad[k] = corrupt_tensor(rng, bad[k], kind)
        # without a model another shape alone is not wrong (unless huge): corrupt it another way
        while (
            model_free
            and isinstance(bad[k], torch.Tensor)
            and not bad[k].is_nested
            and bad[k].shape != state[k].shape
            and bad[k].numel() < 2**28
        ):
            bad[k] = corrupt_tensor(rng, state[k])
    elif kind == "drop key":
        del bad[rng.choice(sorted(bad))]
    elif kind == "extra key":
        bad["enc.1.lora_A"] = torch.zeros(2, 6)
    elif kind == "int key":
        bad[7] = torch.zeros(1)
    else:
        return rng.choice([list(state.values()), "state", None, 3])
    return bad


def test_fuzz_updates_are_rejected_with_a_reason_and_never_averaged(bounded):
    rng = random.Random(0)
    good = {k: v + 0.1 for k, v in REFERENCE.items()}
    names = ["c0", "c1", "c2"]
    for case in range(300):
        honest = case % 2 == 0  # a caller's mistake (fed.reply_problem sees it) or a crafted peer's (the guards do)
        bad = corrupt_state(rng, good, honest=honest)
        with bounded():
            reason = validate_update(bad, REFERENCE)
            assert isinstance(reason, str) and reason.startswith("update") and "\n" not in reason, (case, reason)
            if honest:
                for states in ([good, bad], [bad, good]):
                    with pytest.raises(ValueError, match="fedavg: client state"):
                        fedavg(states, [1, 2])
            n_bad = rng.choice([1, 0, -3, True, 2.5, float("nan"), "4", None, 10**400, 2**53 + 1])
            out = server_round(
                case,
                REFERENCE,
                [0, 1, 2],
                {0: ClientReply(good, 4, 0.5), 1: ClientReply(bad, 4, 0.5), 2: ClientReply(dict(good), n_bad, 0.7)},
                names,
                problem=fed.reply_problem if honest else reply_problem,
            )
        assert [r["client"] for r in out.history["rejected"]][:1] == ["c1"], case
        assert 0 in out.accepted and 1 not in out.accepted
        assert all(torch.isfinite(v).all() for v in out.global_state.values())
    for counts in ([float("nan"), 1], [float("inf"), 1], [1e308, 1e308], [True, 1], [0, 0], [-1, 2]):
        with pytest.raises(ValueError, match="example counts"):
            fedavg([good, good], counts)


def test_fuzz_load_lora_state_dict_refuses_and_leaves_the_model_unchanged(bounded):
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.enc, model.head = torch.nn.Sequential(torch.nn.Linear(6, 5)), torch.nn.Linear(5, 3, bias=False)
    add_lora(model, ["enc.0"], r=2, alpha=4, trainable=["head"])
    assert {k: v.shape for k, v in lora_state_dict(model).items()} == {k: v.shape for k, v in REFERENCE.items()}
    load_lora_state_dict(model, REFERENCE)
    rng = random.Random(3)
    for case in range(200):
        bad = corrupt_state(rng, REFERENCE, honest=True)
        with bounded(), pytest.raises(ValueError):
            load_lora_state_dict(model, bad, allow_rank_change=rng.random() < 0.5)
        assert model.enc[0].r == 2, case
        assert all(torch.equal(v, REFERENCE[k]) for k, v in lora_state_dict(model).items()), case


# ---- corrupted adapter files ----


def crafted_file(template: bytes, numel: int, offset: int, size, stride) -> bytes:
    """A save_adapter file whose only tensor is the view we describe, over a storage of `numel` floats."""
    view = CraftedView(FakeStorage(numel), offset, size, stride)
    return crafted_torch_file({"format": "potara-adapter-v1", "meta": {}, "state": {"w": view}}, numel, template)


def mutated_file(rng: random.Random, template: bytes) -> bytes:
    kind = rng.choice(["truncate", "bit flips", "byte run", "crafted view", "payload"])
    if kind in ("truncate", "bit flips", "byte run"):
        return damaged_bytes(rng, template, kind)
    if kind == "crafted view":
        big = lambda: rng.choice([0, 1, 3, 12, 2**20, 2**31 - 1, 2**40, 2**62])
        size = [big() if rng.random() < 0.5 else rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
        stride = [big() if rng.random() < 0.5 else rng.randint(0, 4) for _ in size]
        return crafted_file(template, 12, big() if rng.random() < 0.3 else 0, size, stride)
    buf = io.BytesIO()
    state = corrupt_state(rng, REFERENCE)
    payload = rng.choice(
        [{"format": "potara-adapter-v1", "meta": {}, "state": state}] * 4
        + [
            {"format": "potara-adapter-v1", "meta": [], "state": dict(REFERENCE)},
            {"format": "other", "meta": {}, "state": dict(REFERENCE)},
            [1, 2],
            "adapter",
        ]
    )
    try:
        torch.save(payload, buf)
    except Exception:  # torch cannot write it (e.g. a nested or subclassed tensor): a crafted view instead
        return crafted_file(template, 12, 0, [200000, 200000], [0, 0])
    return buf.getvalue()


def test_fuzz_adapter_files_give_one_clear_error_and_write_nothing(tmp_path, bounded):
    rng = random.Random(1)
    good = tmp_path / "good.pt"
    save_adapter(good, REFERENCE, {"r": 2})
    template = good.read_bytes()
    accepted = 0
    for case in range(300):
        path = tmp_path / "case.pt"
        path.write_bytes(mutated_file(rng, template))
        before = sorted(os.listdir(tmp_path))
        with bounded():
            try:
                state, meta = load_adapter(path)
            except AdapterError as e:
                assert str(e).startswith(str(path)) and "\n" not in str(e), (case, str(e))
            else:  # a flip that left the file valid (in a value, in zip padding) or an in-bounds view: still safe
                accepted += 1
                assert isinstance(meta, dict) and all(isinstance(k, str) for k in state)
                assert all(
                    type(v) is torch.Tensor
                    and v.dtype.is_floating_point
                    and v.layout == torch.strided
                    and torch.isfinite(v).all()
                    for v in state.values()
                )
        assert sorted(os.listdir(tmp_path)) == before, case
    assert accepted < 100  # most corruptions must be caught, not survive by chance


def test_fuzz_save_adapter_writes_nothing_for_a_bad_state(tmp_path, bounded):
    rng = random.Random(2)
    for case in range(100):
        bad = corrupt_state(rng, REFERENCE, model_free=True)
        with bounded(), pytest.raises(AdapterError):
            save_adapter(tmp_path / "a.pt", bad)
        assert os.listdir(tmp_path) == [], case


# ---- the run folder: planted links and special files ----

PLANTS = ("link to a victim", "dangling link", "link to /dev/zero", "folder", "FIFO", "file", "absent")


def plant(rng: random.Random, path, victim) -> str:
    kind = rng.choice(PLANTS)
    if kind == "link to a victim":
        os.symlink(victim, path)
    elif kind == "dangling link":
        os.symlink(str(path) + ".nowhere", path)
    elif kind == "link to /dev/zero":
        os.symlink("/dev/zero", path)
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "file":
        path.write_bytes(b'{"prompt": "p", "answer": "a"}\n')
    return kind


def test_fuzz_run_folders_with_planted_files_never_write_outside_or_hang(tmp_path, alarm, capsys):
    from data import DataError
    from potara_guards.safe_files import atomic_write
    from potara_harness import run_folder
    from potara_harness.llm_data import read_task_dir

    rng = random.Random(17)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    names = run_folder.OUTPUT_FILES + (run_folder.LOCK_FILE,)
    for case in range(40):
        out = tmp_path / f"out{case}"
        out.mkdir()
        kinds = {name: plant(rng, out / name, victim) for name in rng.sample(names, rng.randint(1, 3))}
        unsafe = {n for n, k in kinds.items() if k not in ("file", "absent")}
        try:
            run_folder.prepare_out_dir(argparse_parser(), str(out))
            with run_folder.out_dir_lock(str(out)):
                atomic_write(out / "results.json", lambda f: f.write(b"{}"))
            assert not unsafe, kinds  # accepted: nothing planted where the run writes
        except SystemExit as e:
            assert e.code == 2 and unsafe, kinds
            err = capsys.readouterr().err.strip().splitlines()
            assert "error: --out" in err[-1] and any(f"{n} in it" in err[-1] for n in unsafe), err  # one error line
        assert victim.read_text() == "precious"
        tasks = tmp_path / f"tasks{case}"
        tasks.mkdir()
        kinds = {f"t{i}.jsonl": plant(rng, tasks / f"t{i}.jsonl", victim) for i in range(rng.randint(1, 3))}
        unsafe = sorted(n for n, k in kinds.items() if k not in ("file", "absent"))
        try:
            got = read_task_dir(str(tasks))
            assert not unsafe and got, kinds  # accepted: only regular task files were planted
        except DataError as e:  # refused: something unsafe was planted and the one line names it, or no task at all
            named = any(n in str(e) for n in unsafe) or not unsafe and "no .jsonl files" in str(e)
            assert "\n" not in str(e) and named and (unsafe or "file" not in kinds.values()), (kinds, str(e))


def argparse_parser():
    import argparse

    return argparse.ArgumentParser(prog="fuzz")
