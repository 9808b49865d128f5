"""cli.py: --help says what each preset gives, impossible options and unusable --out folders are one-line
parser errors before any work, a second run on the same --out is refused, and errors found during a run
leave in one line with the exit status docs/failure-behaviour.md gives (2: bad input, 1: out of memory)."""

import argparse
import os

import pytest

from data import DataError
from potara_guards.safe_files import WriteError
from potara_guards.tensor_checks import AdapterError
from potara_harness import cli, run_folder
from potara_harness.checkpoint import ResumeError
from potara_harness.config import BOUNDS, bound_problem


def parser(presets=None):
    ap = argparse.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
    ap.add_argument("--train", type=int, help="train examples")
    ap.add_argument("--out", default=None, help="output folder (default: runs/<name>)")
    ap.add_argument("--clients", type=int, default=3, help="clients")
    cli.add_experiment_options(ap)
    cli.describe_presets(
        ap,
        presets
        or {"tiny": {"train": 400, "rounds": 100, "lr": 3e-3}, "paper": {"train": 1000, "rounds": 400, "lr": 1e-3}},
    )
    return ap


def test_help_names_each_presets_value_and_never_none(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text and "(default: runs/<name>) (default" not in text
    assert "train examples (tiny: 400; paper: 1000)" in text and "(tiny: 100; paper: 400)" in text
    assert "clients (default: 3)" in text  # a real default is still shown


def args_for(ap, *argv):
    args = ap.parse_args(
        [
            "--train",
            "10",
            "--rounds",
            "1",
            "--local-steps",
            "1",
            "--local-train-steps",
            "1",
            "--finetune-steps",
            "1",
            "--lr",
            "0.1",
            "--batch-size",
            "2",
            "--rank",
            "1",
            "--lora-alpha",
            "1",
            *argv,
        ]
    )
    args.val = 5
    return args


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", str(10**29)], "--seed must be an integer in [0, 9,223,372,036,854,775,807], got 1000"),
        (
            ["--seed", str(2**63)],
            "--seed must be an integer in [0, 9,223,372,036,854,775,807], got 9223372036854775808",
        ),
        (
            ["--threads", "1000"],
            f"--threads must be an integer in [1, {os.cpu_count() or 1:,}] (the CPU cores of this machine), got 1000",
        ),
    ],
)
def test_seed_and_threads_are_bounded(capsys, argv, message):
    """Checked after parsing (a parser without cli.bound_numbers), each states the range the parser states."""
    ap = parser()
    with pytest.raises(SystemExit) as e:
        cli.check_experiment_options(ap, args_for(ap, *argv))
    assert e.value.code == 2 and message in capsys.readouterr().err.strip().splitlines()[-1]
    cli.check_experiment_options(ap, args_for(ap, "--seed", str(2**63 - 1), "--threads", str(os.cpu_count() or 1)))


def later_checked():
    ap = parser()  # no cli.bound_numbers: every value reaches check_experiment_options
    return [(a.option_strings[-1], a.dest) for a in cli.numeric_options(ap) if a.dest in BOUNDS]


@pytest.mark.parametrize("option, dest", later_checked())
def test_a_later_check_states_the_range_the_parser_states(capsys, option, dest):
    """One range per option: --clients abc said "must be an integer in [0, 100,000]" (the parser) and --clients 0
    "--clients must be >= 1" (a later check). Every number check_experiment_options refuses is refused with its
    config.BOUNDS range, the words the parser uses (test_bounds.py)."""
    ap = parser()
    kind = next(a.type for a in ap._actions if a.dest == dest)
    refused = 0
    for value in (0, -1, 10**30):
        if bound_problem(dest, value) is None:
            continue
        with pytest.raises(SystemExit) as e:
            cli.check_experiment_options(ap, args_for(ap, option, str(value)))
        last = capsys.readouterr().err.strip().splitlines()[-1]
        what = "an integer" if kind is int else "a number"
        assert e.value.code == 2 and f"error: {option} must be {what} in {BOUNDS[dest].text()}, got " in last, last
        refused += 1
    assert refused >= 1, option


def test_the_last_line_counts_threads_in_english():
    assert cli.finished(12.4, "cpu", 1, "runs/x") == "12s on cpu (1 thread); results in runs/x/results.json"
    assert cli.finished(3, "cuda", 2, "o").startswith("3s on cuda (2 threads); ")


def test_seed_1e29_is_a_parser_error(capsys):
    with pytest.raises(SystemExit) as e:
        parser().parse_args(["--seed", "1e29"])
    assert e.value.code == 2 and "invalid int value: '1e29'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda tmp: "/proc/potara-x", "cannot be created or written"),
        (
            lambda tmp: (tmp / "o" / "results.json").mkdir(parents=True) or tmp / "o",
            "results.json in it is not a regular file",
        ),
        (
            lambda tmp: (tmp / "o" / "checkpoint.pt").mkdir(parents=True) or tmp / "o",
            "checkpoint.pt in it is not a regular file",
        ),
        (lambda tmp: (tmp / "o" / ".lock").mkdir(parents=True) or tmp / "o", ".lock in it is not a regular file"),
        (lambda tmp: (tmp / "f").write_text("x") and tmp / "f", "exists and is not a directory"),
    ],
)
def test_unusable_out_dirs_are_parser_errors(tmp_path, capsys, make, message):
    out = make(tmp_path)
    with pytest.raises(SystemExit) as e:
        run_folder.prepare_out_dir(parser(), str(out))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--out {out}" in err and message in err, err


def test_prepare_out_dir_creates_it_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "a" / "b"
    run_folder.prepare_out_dir(parser(), str(out))
    assert out.is_dir() and os.listdir(out) == []  # the write probe is gone


@pytest.mark.parametrize("name", [".lock", "results.json", "checkpoint.pt", "communication.png"])
def test_links_where_the_run_writes_are_refused_before_any_work(tmp_path, capsys, name):
    """`ln -s ../victim.txt out/.lock`: the lock opened "a+" through the link wrote `pid N` into the victim."""
    victim, out = tmp_path / "victim.txt", tmp_path / "out"
    victim.write_text("precious")
    out.mkdir()
    os.symlink("../victim.txt", out / name)
    with pytest.raises(SystemExit) as e:
        run_folder.prepare_out_dir(parser(), str(out))
    assert e.value.code == 2
    assert f"--out {out}: {name} in it is a symbolic link" in capsys.readouterr().err
    if name == ".lock":  # the lock itself refuses it too (a link planted after the check)
        with pytest.raises(SystemExit) as e:
            with run_folder.out_dir_lock(str(out)):
                pass
        assert e.value.code == 2 and ".lock in it is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_a_run_that_did_nothing_leaves_nothing(tmp_path, capsys):
    out = tmp_path / "a" / "b" / "out"
    run_folder.prepare_out_dir(parser(), str(out))
    with pytest.raises(SystemExit):
        with cli.one_line_errors(), run_folder.out_dir_lock(str(out)):
            raise DataError("--data missing: not a directory")
    assert os.listdir(tmp_path) == []  # the folders prepare_out_dir created are gone with the lock
    mine = tmp_path / "mine"
    mine.mkdir()
    run_folder.prepare_out_dir(parser(), str(mine))
    with pytest.raises(SystemExit):
        with cli.one_line_errors(), run_folder.out_dir_lock(str(mine)):
            raise DataError("bad")
    assert mine.is_dir() and os.listdir(mine) == []  # a folder the user made stays; only the lock goes
    with run_folder.out_dir_lock(str(mine)):
        (mine / "results.json").write_text("{}")
    assert sorted(os.listdir(mine)) == [".lock", "results.json"]  # a run that wrote keeps its lock file


def test_a_run_with_a_missing_data_folder_leaves_no_out_folder(tmp_path, capsys):
    import run_llm

    out = tmp_path / "runs" / "x"
    with pytest.raises(SystemExit) as e:
        run_llm.main(["--data", str(tmp_path / "missing"), "--out", str(out), "--threads", "1", "--no-progress"])
    assert e.value.code == 2 and f"--data {tmp_path / 'missing'}: no such folder" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    with run_folder.out_dir_lock(str(tmp_path)):
        assert (tmp_path / run_folder.LOCK_FILE).read_text() == f"pid {os.getpid()}"
        with pytest.raises(SystemExit) as e:  # another open file description: flock refuses it like another process
            with run_folder.out_dir_lock(str(tmp_path)):
                pass
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: --out {tmp_path} is in use by another run (pid {os.getpid()}): wait for it to end "
            "or choose another --out"
        )
    with run_folder.out_dir_lock(str(tmp_path)):  # released when the first run ended
        pass


@pytest.mark.parametrize(
    "error, status",
    [
        (DataError("x.jsonl:3: not valid JSON"), 2),
        (ResumeError("ck: edited"), 2),
        (AdapterError("w holds NaN"), 2),
        (MemoryError(), 1),
        (WriteError("cannot write ck.pt (File too large): the previous file is intact"), 1),
        (
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                "allocate 6400000000000 bytes"
            ),
            1,
        ),  # what --rank 10**11 gave: torch's CPU allocator
    ],
)
def test_errors_during_a_run_are_one_line_with_their_status(capsys, error, status):
    with pytest.raises(SystemExit) as e:
        with cli.one_line_errors():
            raise error
    assert e.value.code == status
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    if isinstance(error, WriteError):
        assert err == f"error: {error}\n"
    else:
        assert ("out of memory" in err and "not the problem" in err) if status == 1 else str(error) in err


def test_other_runtime_errors_are_not_called_out_of_memory():
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with cli.one_line_errors():
            raise RuntimeError("shape mismatch")


def test_snapshots_beyond_the_rounds_are_every_round(capsys):
    """--snapshots 10**20 with 2 rounds: the same round counts as --snapshots 2 (every round), no endless loop; the
    option keeps the value given (a resume with other --rounds names --rounds alone, not --snapshots too)."""
    from potara_harness.pipeline import snapshot_rounds

    ap = parser()
    args = args_for(ap, "--snapshots", "100000", "--rounds", "2")
    cli.check_experiment_options(ap, args)
    assert args.snapshots == 100000 and snapshot_rounds(2, 10**20) == snapshot_rounds(2, 7) == [1, 2]
    assert snapshot_rounds(3, 4) == [1, 2, 3] and snapshot_rounds(100, 4) == [25, 50, 75, 100]
    assert snapshot_rounds(5, 0) == [5]
