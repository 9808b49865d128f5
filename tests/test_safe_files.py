"""Specification of safe_files.py: no link followed where the run writes, regular files of a bounded size where it
reads, the lock opened without following links, one WriteError for a failed write, leftovers of dead writers
removed."""

import os
import subprocess
import sys

import pytest
import torch
from obstacles import unprivileged

from potara_guards import safe_files
from potara_guards.adapter_file import load_adapter, save_adapter
from potara_guards.safe_files import UnsafeFile, atomic_write, open_lock, read_regular, remove_leftovers
from potara_guards.tensor_checks import AdapterError


def test_writes_never_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    path = out / "a.pt"
    for name in (f"a.pt.tmp{os.getpid()}", f".a.pt.{os.getpid()}.tmp"):  # the old predictable name and more
        os.symlink(victim, out / name)
    save_adapter(path, {"w": torch.ones(2)})
    atomic_write(out / "results.json", lambda f: f.write(b"{}"))
    assert victim.read_text() == "precious" and load_adapter(path)[0]["w"].tolist() == [1.0, 1.0]
    os.symlink(victim, out / "results.md")  # the target itself a link: refused, nothing written anywhere
    with pytest.raises(UnsafeFile, match="results.md: is a symbolic link"):
        atomic_write(out / "results.md", lambda f: f.write(b"x"))
    (out / "plot.png").mkdir()
    with pytest.raises(UnsafeFile, match="not a regular file .a directory"):
        atomic_write(out / "plot.png", lambda f: f.write(b"x"))
    with pytest.raises(UnsafeFile, match="symbolic link"):
        save_adapter(out / "results.md", {"w": torch.ones(2)})
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(out)) == sorted(
        [f".a.pt.{os.getpid()}.tmp", "a.pt", f"a.pt.tmp{os.getpid()}", "plot.png", "results.json", "results.md"]
    )  # no temporary file left


def test_reads_take_regular_files_of_bounded_size_only(tmp_path, alarm):
    good = tmp_path / "good.bin"
    good.write_bytes(b"x" * 100)
    assert read_regular(good, 100) == b"x" * 100
    with pytest.raises(UnsafeFile, match="100 bytes, larger than the 99"):
        read_regular(good, 99)
    os.symlink(good, tmp_path / "link.bin")
    os.symlink("/dev/zero", tmp_path / "zero.bin")
    os.mkfifo(tmp_path / "fifo.bin")  # a blocking open would wait for a writer forever
    for name, why in (
        ("link.bin", "symbolic link"),
        ("zero.bin", "symbolic link"),
        ("fifo.bin", "a FIFO"),
        (".", "a directory"),
    ):
        with pytest.raises(UnsafeFile, match=why):
            read_regular(tmp_path / name, 1 << 20)
    with pytest.raises(UnsafeFile, match="character device"):
        read_regular("/dev/zero", 1 << 20)
    with pytest.raises(AdapterError, match="a FIFO"):
        load_adapter(tmp_path / "fifo.bin")


def test_the_lock_is_never_opened_through_a_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / ".lock")
    with pytest.raises(UnsafeFile, match="symbolic link"):
        open_lock(tmp_path / ".lock")
    assert victim.read_text() == "precious"
    with open_lock(tmp_path / "real.lock") as f:
        f.write("pid 1")
    assert (tmp_path / "real.lock").read_text() == "pid 1"


def test_a_failed_write_is_one_write_error_and_keeps_the_previous_file(tmp_path):
    """`ulimit -f`: the file-size limit makes torch.save's writes fail half way (EFBIG; Python ignores
    SIGXFSZ). A subprocess, so the limit binds nothing else."""
    path = tmp_path / "ck.pt"
    save_adapter(path, {"w": torch.ones(4)})
    code = (
        "import resource, torch\n"
        "from potara_guards import adapter_file\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))\n"
        f"adapter_file.save_adapter({str(path)!r}, {{'w': torch.zeros(100000)}})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=os.path.dirname(os.path.dirname(safe_files.__file__)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert (
        last.startswith("potara_guards.safe_files.WriteError: cannot write")
        and "File too large" in last
        and "intact" in last
    )
    assert done.stderr.count("Traceback") == 1, done.stderr  # no chain of torch's errors
    assert load_adapter(path)[0]["w"].tolist() == [1.0] * 4 and os.listdir(tmp_path) == ["ck.pt"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    mine, theirs = os.getpid(), dead.pid
    names = [
        f"results.json.tmp{theirs}",
        f".results.json.{theirs}.0a1b2c3d4e5f.tmp",
        f".results.json.partial-{theirs}",
        f".results.json.old-{theirs}",
    ]
    kept = [
        f".results.json.{mine}.0a1b2c3d4e5f.tmp",
        f"results.json.tmp{mine}",
        "results.json.tmpX",
        f".other.json.{theirs}.0a1b2c3d4e5f.tmp",
        "results.json",
    ]
    for n in names[:2] + kept:
        (tmp_path / n).write_text("left")
    for n in names[2:]:
        (tmp_path / n).mkdir()
        (tmp_path / n / "adapter_config.json").write_text("{}")
    assert sorted(remove_leftovers(str(tmp_path), "results.json")) == sorted(names)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    atomic_write(tmp_path / "other.json", lambda f: f.write(b"{}"))  # each write clears its own name's leftovers
    assert sorted(os.listdir(tmp_path)) == sorted(
        set(kept) - {f".other.json.{theirs}.0a1b2c3d4e5f.tmp"} | {"other.json"}
    )


def test_a_cache_file_that_is_a_fifo_is_pretrained_again_not_waited_on(tmp_path, alarm, capsys):
    from potara_harness.pretrain import cached_pretrain

    path = tmp_path / "tiny-0123456789ab.pt"
    os.mkfifo(path)
    restored, info, where = cached_pretrain(
        str(path), "tiny", lambda obj: obj["w"], lambda: {"w": 3, "info": {}}, lambda info: "ok"
    )
    out = capsys.readouterr().out
    assert restored == 3 and "is unusable (UnsafeFile" in out and "a FIFO" in out and "NOT cached" in out
    assert where == "(not cached)" and stat_is_fifo(path)  # the planted file is left alone, never written through


def stat_is_fifo(path) -> bool:
    import stat

    return stat.S_ISFIFO(os.lstat(path).st_mode)


def test_every_torch_file_the_project_reads_is_a_regular_file(tmp_path, alarm):
    """Checkpoints, backbones, the tiny model file and the device's split cache are read through
    safe_files.load_torch_file: a FIFO or a link to /dev/zero is a one-line refusal at once, never a hang or a read
    until memory runs out (under the alarm fixture)."""
    from potara_flower.task import read_cached_split
    from potara_harness import checkpoint, lm, vit
    from potara_harness.config import AppConfig

    fifo, zero = tmp_path / "fifo.pt", tmp_path / "zero.pt"
    os.mkfifo(fifo)
    os.symlink("/dev/zero", zero)
    for path in (fifo, zero):
        with pytest.raises(UnsafeFile):
            safe_files.load_torch_file(path)
        with pytest.raises(checkpoint.ResumeError, match="unreadable"):
            checkpoint._read(str(path), "start over")
        with pytest.raises(vit.BackboneError):
            vit.load_backbone_file(str(path), None)
        with pytest.raises(lm.DataError):
            lm.load_tiny_file(str(path), 32)
        assert read_cached_split(str(path), "key", AppConfig(), 0) is None


def test_a_hard_link_where_the_run_writes_is_refused_and_the_outside_file_kept(tmp_path):
    """`ln ../victim out/.lock`: opening the lock truncated the victim to `pid N`. A target with another name is
    refused by the lock and by every write, before anything is opened for writing."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    for name in (".lock", "results.json"):
        os.link(victim, out / name)
    with pytest.raises(UnsafeFile, match=r"\.lock: has 3 hard links"):
        open_lock(out / ".lock")
    with pytest.raises(UnsafeFile, match=r"results\.json: has 3 hard links"):
        atomic_write(out / "results.json", lambda f: f.write(b"{}"))
    assert safe_files.write_target_problem(out / "results.json").startswith("has 3 hard links")
    assert victim.read_text() == "precious" and victim.stat().st_nlink == 3
    (out / "mine.txt").write_text("x")  # a file of one name: written as before
    atomic_write(out / "mine.txt", lambda f: f.write(b"y"))
    assert (out / "mine.txt").read_text() == "y"


def test_a_folder_the_run_writes_into_is_made_or_checked(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "link").symlink_to(elsewhere)
    (tmp_path / "file").write_text("x")
    os.mkfifo(tmp_path / "fifo")
    for name, why in (
        ("link", "is a symbolic link"),
        ("file", "is not a directory .a regular file"),
        ("fifo", r"is not a directory \(a FIFO\)"),
    ):
        with pytest.raises(UnsafeFile, match=f"{name}: {why}"):
            safe_files.make_folder(tmp_path / name)
    safe_files.make_folder(tmp_path / "new")
    safe_files.make_folder(tmp_path / "new")  # there already: checked, kept
    assert (tmp_path / "new").is_dir() and os.listdir(elsewhere) == []
    with pytest.raises(safe_files.WriteError, match="cannot create the folder .*missing/new"):
        safe_files.make_folder(tmp_path / "missing" / "new")


def test_a_failed_temporary_is_a_write_error_naming_the_target(tmp_path):
    """save_adapter into a missing folder named its temporary (.a.pt.<pid>.<hex>.tmp); a read-only folder gave a
    bare PermissionError (the temporary was made outside the try). Both: one WriteError naming the path given,
    with what to do."""
    missing = tmp_path / "missing" / "a.pt"
    with pytest.raises(safe_files.WriteError) as e:
        save_adapter(missing, {"w": torch.ones(2)})
    msg = str(e.value)
    assert msg.startswith(f"cannot write {missing} (No such file or directory)") and ".tmp" not in msg, msg
    assert f"its folder {missing.parent} does not exist" in msg and "\n" not in msg
    path = tmp_path / "b.pt"
    save_adapter(path, {"w": torch.ones(2)})
    tmp_path.chmod(0o555)  # a folder that refuses new files (real permissions: unprivileged, as root too)
    try:
        with pytest.raises(safe_files.WriteError) as e:
            unprivileged(save_adapter, path, {"w": torch.zeros(2)})
    finally:
        tmp_path.chmod(0o755)
    msg = str(e.value)
    assert msg.startswith(f"cannot write {path} (Permission denied)") and ".tmp" not in msg, msg
    assert "is not writable" in msg and "previous file is intact" in msg
    assert load_adapter(path)[0]["w"].tolist() == [1.0, 1.0] and os.listdir(tmp_path) == ["b.pt"]
