"""What a device refuses: a model file replaced after set-up (every later message of that client fails with its
reason, the others go on), a task name the scripts refuse, a FIFO or a link to /dev/zero in a model folder."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

pytest.importorskip("flwr")

from flower_kit import serve  # noqa: E402

from potara_flower.task import model_sha256  # noqa: E402
from potara_guards.safe_files import UnsafeFile  # noqa: E402
from potara_harness.llm_data import DataError  # noqa: E402
from potara_harness.lm import client_task  # noqa: E402


def test_a_backbone_replaced_after_setup_fails_that_client_only(small_world, task_identity, tmp_path, capsys):
    """client1's backbone file is rewritten right after set-up (same shapes, other weights): every round and the
    final step refuse it with the reason, in the log and in results.md; client0 and client2 go on."""
    own = tmp_path / "client1-backbone.pt"
    shutil.copy(small_world / "backbone.pt", own)
    nodes = [
        {
            "partition-id": k,
            "num-partitions": 3,
            "backbone": str(own if k == 1 else small_world / "backbone.pt"),
            "data-dir": str(small_world / "data"),
        }
        for k in range(3)
    ]

    def replace_after_setup(k, msg, reply):
        if k == 1 and msg.metadata.message_type == "query":
            obj = torch.load(own, weights_only=True)
            name = next(iter(obj["state_dict"]))
            obj["state_dict"][name] = obj["state_dict"][name] + 1
            torch.save(obj, own)  # the preparation rerun with other settings
        return reply

    out = tmp_path / "out"
    res = serve(
        small_world,
        out,
        tamper=replace_after_setup,
        nodes=nodes,
        clients_per_round=3,
        drop_prob=0.0,
        missing=["client1"],
    )
    why = f"node config backbone={str(own)!r} changed since set-up"
    for h in res["fedit_history"]:
        [failed] = h["failed"]
        assert failed["client"] == "client1" and why in failed["reason"], failed
    [missing] = res["faults"]["personalization_failed"]
    assert missing["client"] == "client1" and why in missing["reason"]
    assert res["clients"] == ["client0", "client2"]
    assert why in (out / "results.md").read_text()
    assert why in capsys.readouterr().out


def test_a_device_applies_the_scripts_task_name_rule(tmp_path):
    """A <task>.jsonl whose name is 244 bytes (the scripts allow 200): refused when the client is built, before its
    file is read (so before any training or write)."""
    long = tmp_path / ("t" * 244 + ".jsonl")
    long.write_text(json.dumps({"prompt": "p", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match="the task name is longer than 200 bytes"):
        client_task(str(long), 10)
    ok = tmp_path / ("t" * 200 + ".jsonl")
    shutil.copy(long, ok)
    assert client_task(str(ok), 10)[0] == "t" * 200


def hash_within(folder, seconds: float = 30.0):
    """model_sha256(folder) in a thread: (finished, its exception). A hang shows as finished False (the thread is
    left behind: a daemon), not as a suite that never ends."""
    box = {}

    def work():
        try:
            box["sha"] = model_sha256(str(folder))
        except Exception as e:  # noqa: BLE001 -- the test looks at it
            box["error"] = e

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive(), box.get("error")


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="POSIX only")
@pytest.mark.parametrize("plant", ["fifo", "dev-zero-link"])
def test_a_model_folder_with_a_special_file_is_refused_at_once(tmp_path, plant):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    special = folder / "model.safetensors"
    if plant == "fifo":
        os.mkfifo(special)
    else:
        special.symlink_to("/dev/zero")
    try:
        finished, error = hash_within(folder)
    finally:
        if plant == "fifo":  # release a reader blocked on the FIFO (the old code's hang), if any
            try:
                os.close(os.open(special, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
    assert finished, "the model hash hung on a special file"
    assert isinstance(error, UnsafeFile) and "is not a regular file" in str(error), error
    assert "\n" not in str(error)


def test_a_model_folder_of_links_to_regular_files_still_hashes(tmp_path):
    """A Hugging Face cache snapshot is links to its blobs: hashed as the files they point to."""
    blobs, snap, plain = tmp_path / "blobs", tmp_path / "snap", tmp_path / "plain"
    for d in (blobs, snap, plain):
        d.mkdir()
    (blobs / "abc").write_bytes(b"weights")
    (plain / "model.bin").write_bytes(b"weights")
    (snap / "model.bin").symlink_to(blobs / "abc")
    assert model_sha256(str(snap)) == model_sha256(str(plain))
