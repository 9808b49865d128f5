"""Specification of safe_files.py: the trusted run folder (no links where the run writes, regular files of a
bounded size where it reads, the lock opened without following links, one WriteError for a failed write,
leftovers of dead writers removed) and the adapter file: an adapter's tensors and metadata round-trip exactly; a bad, foreign,
truncated, crafted or code-running file is one AdapterError (nothing executed, nothing allocated); writes are
atomic and fsynced; a bad state or non-plain meta writes nothing. (Randomised files: test_fuzz.py.)"""
import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import PlantedPickle

from potara import safe_files
from potara.adapter_file import load_adapter, save_adapter
from potara.safe_files import atomic_write, open_lock, read_regular, remove_leftovers, UnsafeFile
from potara.lora import add_lora, lora_meta, lora_state_dict
from potara.tensor_checks import AdapterError
from potara.lora_mha import LORA_LAYERS


def test_save_load_adapter_round_trip(tmp_path, randomize_lora):
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 3)})
    add_lora(model, ["attn"], r=2, alpha=8, trainable=["head"], layers=LORA_LAYERS)
    randomize_lora(model)
    state, meta = lora_state_dict(model), lora_meta(model)
    assert meta["layers"]["attn"] == {"r": 2, "alpha": 8.0, "scaling": 4.0, "kind": "LoRAPackedQKV", "parts": "qv"}
    path = tmp_path / "client0.pt"
    save_adapter(path, state, meta)
    loaded, loaded_meta = load_adapter(path)
    assert loaded_meta == meta and set(loaded) == set(state) == {"attn.lora_A_q", "attn.lora_B_q", "attn.lora_A_v",
                                                                 "attn.lora_B_v", "head.weight", "head.bias"}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_load_adapter_refuses_bad_files(tmp_path):
    with pytest.raises(AdapterError, match="no such"):
        load_adapter(tmp_path / "absent.pt")
    good = tmp_path / "good.pt"
    save_adapter(good, {"w": torch.ones(3)}, {"r": 2})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:50])
    with pytest.raises(AdapterError, match="not a readable"):
        load_adapter(truncated)
    foreign = tmp_path / "foreign.pt"
    torch.save({"some": torch.ones(2)}, foreign)
    with pytest.raises(AdapterError, match="not a potara adapter"):
        load_adapter(foreign)
    text = tmp_path / "text.pt"
    text.write_text("hello")
    with pytest.raises(AdapterError):
        load_adapter(text)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "potara-adapter-v1", "meta": {}, "state": {"w": PlantedPickle(str(marker))}}, evil)
    with pytest.raises(AdapterError, match="unsafe"):
        load_adapter(evil)
    assert not marker.exists()
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(PlantedPickle(str(marker))))
    with pytest.raises(AdapterError):
        load_adapter(raw)
    assert not marker.exists()
    nan = tmp_path / "nan.pt"
    torch.save({"format": "potara-adapter-v1", "meta": {}, "state": {"w": torch.tensor([float("inf")])}}, nan)
    with pytest.raises(AdapterError, match="NaN or Inf"):
        load_adapter(nan)


def test_load_adapter_refuses_crafted_tensors_before_allocating(tmp_path):
    crafted = {"expanded": (torch.zeros(1).expand(200000, 200000), "more than the limit"),  # 160 GB if read
               "sparse": (torch.eye(3).to_sparse(), "not a dense strided tensor"),
               "meta": (torch.empty(2, 2, device="meta"), "meta device"),
               "int": (torch.ones(3, dtype=torch.int32), "dtype torch.int32")}
    for name, (t, msg) in crafted.items():
        path = tmp_path / f"{name}.pt"
        torch.save({"format": "potara-adapter-v1", "meta": {}, "state": {"w": t}}, path)
        with pytest.raises(AdapterError, match=f"{name}.pt: w .*{msg}"):
            load_adapter(path)
    big = tmp_path / "big.pt"
    save_adapter(big, {"w": torch.zeros(3, 4)})
    with pytest.raises(AdapterError, match="12 elements, more than the limit of 11"):
        load_adapter(big, max_numel=11)


def test_save_adapter_is_atomic_fsyncs_and_refuses_bad_states(tmp_path, monkeypatch):
    path = tmp_path / "a.pt"
    save_adapter(path, {"w": torch.ones(2)}, {"r": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(safe_files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                      real_fsync(fd))[1])
    save_adapter(path, {"w": torch.full((2,), 2.0)}, {"r": 2})
    assert len(synced) == 2 and synced[1] == str(tmp_path)  # the data, then the folder after the rename
    assert re.fullmatch(rf"{tmp_path}/\.a\.pt\.{os.getpid()}\.[0-9a-f]{{12}}\.tmp", synced[0]), synced[0]
    assert load_adapter(path)[1] == {"r": 2}
    monkeypatch.setattr(torch, "save", lambda obj, f: (f.write(b"half a file"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        save_adapter(path, {"w": torch.zeros(2)}, {"r": 3})
    assert load_adapter(path)[1] == {"r": 2} and os.listdir(tmp_path) == ["a.pt"]  # old file kept, no temp left
    with pytest.raises(AdapterError, match="NaN or Inf"):
        save_adapter(tmp_path / "nan.pt", {"w": torch.tensor([float("nan")])})
    for meta in ({"lam": np.float64(0.5)}, {"lam": torch.tensor(0.5)}, {1: "r"}, {"f": [print]}):
        with pytest.raises(AdapterError, match="meta must be plain data"):  # load_adapter could not read it back
            save_adapter(tmp_path / "meta.pt", {"w": torch.ones(1)}, meta)
    assert os.listdir(tmp_path) == ["a.pt"]
    monkeypatch.undo()
    plain = {"lam": {"g0": 0.25}, "targets": ["q", "v"], "pair": (1, 2), "none": None, "ok": True}
    save_adapter(tmp_path / "meta.pt", {"w": torch.ones(1)}, plain)
    assert load_adapter(tmp_path / "meta.pt")[1] == plain



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
    assert sorted(os.listdir(out)) == sorted([f".a.pt.{os.getpid()}.tmp", "a.pt", f"a.pt.tmp{os.getpid()}", "plot.png",
                                              "results.json", "results.md"])  # no temporary file left


def test_reads_take_regular_files_of_bounded_size_only(tmp_path, alarm):
    good = tmp_path / "good.bin"
    good.write_bytes(b"x" * 100)
    assert read_regular(good, 100) == b"x" * 100
    with pytest.raises(UnsafeFile, match="100 bytes, larger than the 99"):
        read_regular(good, 99)
    os.symlink(good, tmp_path / "link.bin")
    os.symlink("/dev/zero", tmp_path / "zero.bin")
    os.mkfifo(tmp_path / "fifo.bin")  # a blocking open would wait for a writer forever
    for name, why in (("link.bin", "symbolic link"), ("zero.bin", "symbolic link"), ("fifo.bin", "a FIFO"),
                      (".", "a directory")):
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
    code = ("import resource, torch\n"
            "from potara import adapter_file\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, 200 * 1024))\n"
            f"adapter_file.save_adapter({str(path)!r}, {{'w': torch.zeros(100000)}})\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(safe_files.__file__)), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("potara.safe_files.WriteError: cannot write") and "File too large" in last and "intact" in last
    assert done.stderr.count("Traceback") == 1, done.stderr  # no chain of torch's errors
    assert load_adapter(path)[0]["w"].tolist() == [1.0] * 4 and os.listdir(tmp_path) == ["ck.pt"]


def test_leftovers_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now
    mine, theirs = os.getpid(), dead.pid
    names = [f"results.json.tmp{theirs}", f".results.json.{theirs}.0a1b2c3d4e5f.tmp", f".results.json.partial-{theirs}",
             f".results.json.old-{theirs}"]
    kept = [f".results.json.{mine}.0a1b2c3d4e5f.tmp", f"results.json.tmp{mine}", "results.json.tmpX",
            f".other.json.{theirs}.0a1b2c3d4e5f.tmp", "results.json"]
    for n in names[:2] + kept:
        (tmp_path / n).write_text("left")
    for n in names[2:]:
        (tmp_path / n).mkdir()
        (tmp_path / n / "adapter_config.json").write_text("{}")
    assert sorted(remove_leftovers(str(tmp_path), "results.json")) == sorted(names)
    assert sorted(os.listdir(tmp_path)) == sorted(kept)
    atomic_write(tmp_path / "other.json", lambda f: f.write(b"{}"))  # each write clears its own name's leftovers
    assert sorted(os.listdir(tmp_path)) == sorted(set(kept) - {f".other.json.{theirs}.0a1b2c3d4e5f.tmp"} | {"other.json"})


def test_a_cache_file_that_is_a_fifo_is_pretrained_again_not_waited_on(tmp_path, alarm, capsys):
    from potara_harness.pretrain import cached_pretrain

    path = tmp_path / "tiny-0123456789ab.pt"
    os.mkfifo(path)
    restored, info, where = cached_pretrain(str(path), "tiny", lambda obj: obj["w"], lambda: {"w": 3, "info": {}},
                                            lambda info: "ok")
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
