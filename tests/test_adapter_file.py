"""Specification of adapter_file.py: an adapter's tensors and metadata round-trip exactly; a bad, foreign, crafted
or hostile file is refused without running code or allocating from it; a save is atomic."""

import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import PlantedPickle

from lora import add_lora, lora_meta, lora_state_dict
from potara_guards import safe_files
from potara_guards.adapter_file import load_adapter, save_adapter
from potara_guards.tensor_checks import AdapterError


def test_save_load_adapter_round_trip(tmp_path, randomize_lora):
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "head": nn.Linear(8, 3)})
    add_lora(model, ["attn"], r=2, alpha=8, trainable=["head"])
    randomize_lora(model)
    state, meta = lora_state_dict(model), lora_meta(model)
    assert meta["layers"]["attn"] == {"r": 2, "alpha": 8.0, "scaling": 4.0, "kind": "LoRAPackedQKV", "parts": "qv"}
    path = tmp_path / "client0.pt"
    save_adapter(path, state, meta)
    loaded, loaded_meta = load_adapter(path)
    assert loaded_meta == meta and set(loaded) == set(state) == {
        "attn.lora_A_q",
        "attn.lora_B_q",
        "attn.lora_A_v",
        "attn.lora_B_v",
        "head.weight",
        "head.bias",
    }
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
    crafted = {
        "expanded": (torch.zeros(1).expand(200000, 200000), "more than the limit"),  # 160 GB if read
        "sparse": (torch.eye(3).to_sparse(), "not a dense strided tensor"),
        "meta": (torch.empty(2, 2, device="meta"), "meta device"),
        "int": (torch.ones(3, dtype=torch.int32), "dtype torch.int32"),
    }
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
    monkeypatch.setattr(
        safe_files.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1]
    )
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
