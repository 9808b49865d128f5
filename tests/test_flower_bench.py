"""potara_flower/bench.py: the per-round breakdown it prints, and its one-line errors. (The run itself is the
loopback run of test_flower.py; the benchmark's numbers are in docs/flower.md, from one run.)"""

import pytest

pytest.importorskip("flwr")

from potara_flower import bench as flower_bench  # noqa: E402


def test_breakdown_charges_the_rest_of_a_round_to_messaging():
    """Per round: the slowest client's start-up, loading and training (clients run in parallel), and what is
    left of the server's round time; means over rounds. Hand-computed."""
    c = lambda start, imports, hand, load, train: {
        "flower-start": start,
        "imports": imports,
        "handover": hand,
        "load": load,
        "train": train,
    }
    history = [
        {
            "seconds": 10.0,
            "client_seconds": {
                "client0": c(2.0, 2.5, 0.5, 1.0, 0.5),  # 6.5
                "client1": c(2.0, 3.0, 1.0, 1.0, 1.0),
            },
        },  # 8.0: slowest
        {"seconds": 6.0, "client_seconds": {"client1": c(1.0, 1.5, 0.5, 0.5, 0.5)}},
    ]  # 4.0
    got = flower_bench.breakdown({"fedit_history": history})
    want = {
        "round": 8.0,
        "flower-start": 1.5,
        "imports": 2.25,
        "handover": 0.75,
        "load": 0.75,
        "train": 0.75,
        "messaging": (2.0 + 2.0) / 2,
    }
    assert got == pytest.approx(want)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "missing.pt")])
    assert e.value.code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "b.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "b.pt"), "--rounds", "0"])
    err = capsys.readouterr().err  # the parser itself (config.BOUNDS, as run_cifar.py's --rounds)
    assert e.value.code == 2 and "argument --rounds: must be an integer in [1, 100,000], got 0" in err, err
    with pytest.raises(SystemExit) as e:
        flower_bench.main(["--backbone", str(tmp_path / "b.pt"), "--clients", "9", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--clients 9: 1 to 8" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before --out was made


# ----------------------------------------------------------------------------- the device's split cache (task.py)
import os  # noqa: E402

import torch  # noqa: E402

from data import load_images  # noqa: E402
from potara_flower import task  # noqa: E402
from potara_harness.config import AppConfig  # noqa: E402

SMALL = AppConfig(num_clients=3, synthetic_per_class=20, public=0, train=40, val=20, test=20, fisher_samples=20, seed=1)
PARTS = [f"{p}_{kind}" for p in ("train", "val", "test") for kind in ("inputs", "targets")]


class Unpicklable:
    """Pickled as a call (os.getpid: harmless): what a crafted file does to run code when unpickled."""

    def __reduce__(self):
        return (os.getpid, ())


def test_the_split_cache_gives_the_drawn_split_and_refuses_what_does_not_match(tmp_path, monkeypatch):
    """A cached split is bitwise the drawn one and is read without drawing; another setting, a touched data
    file, a tampered or code-carrying file are not used (drawn again, file rewritten)."""
    data, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    load_images("synthetic", data, SMALL.synthetic_per_class)
    want = task.draw_split(SMALL, data, 1, 3)
    draws = []
    real_draw = task.draw_split
    monkeypatch.setattr(task, "draw_split", lambda *a: draws.append(a) or real_draw(*a))

    def same(split):
        return split.name == want.name and all(torch.equal(getattr(split, p), getattr(want, p)) for p in PARTS)

    assert same(task.client_split(SMALL, data, 1, 3, cache)) and len(draws) == 1  # drawn and written
    [path] = [os.path.join(cache, f) for f in os.listdir(cache)]
    assert os.path.getsize(path) < 2 * 80 * 3072  # its 80 images, not a view of all 2400
    assert same(task.client_split(SMALL, data, 1, 3, cache)) and len(draws) == 1  # read, not drawn
    other = AppConfig(**{**SMALL.__dict__, "seed": 2})
    task.client_split(other, data, 1, 3, cache)
    assert len(draws) == 2  # another seed: another key

    obj = torch.load(path, weights_only=True)
    obj["train_targets"] = obj["train_targets"] + 100  # labels out of range, same key
    torch.save(obj, path)
    assert same(task.client_split(SMALL, data, 1, 3, cache)) and len(draws) == 3
    torch.save({"format": "potara-split-v1", "key": Unpicklable()}, path)
    assert same(task.client_split(SMALL, data, 1, 3, cache)) and len(draws) == 4
    assert same(task.client_split(SMALL, data, 1, 3, cache)) and len(draws) == 4  # rewritten sound

    folder = os.path.join(data, "synthetic", "cifar-100-python")
    f = os.path.join(folder, sorted(os.listdir(folder))[0])
    os.utime(f, ns=(os.stat(f).st_atime_ns, os.stat(f).st_mtime_ns + 10**9))  # the data changed on disk
    task.client_split(SMALL, data, 1, 3, cache)
    assert len(draws) == 5


def test_the_app_round_is_set_against_the_import_floor():
    """The goal is app <= 1.15 x (import floor + the app's loading + training); ratios to both floors. By hand."""
    got = flower_bench.against_floor({"round": 9.0, "load": 0.25, "train": 0.75}, 6.0, 4.0)
    assert got == pytest.approx(
        {
            "echo_floor_round_s": 4.0,
            "import_floor_round_s": 6.0,
            "ratio_to_echo_floor": 2.25,
            "ratio_to_import_floor": 1.5,
            "ratio_to_goal_base": 9.0 / 7.0,
            "goal_bound_s": 1.15 * 7.0,
            "goal_met": False,
        }
    )
    assert flower_bench.against_floor({"round": 8.0, "load": 0.25, "train": 0.75}, 6.0, 4.0)["goal_met"]


def test_each_experiment_has_its_import_floor():
    """The import floors name what each device's model needs, and a language device's has no torchvision."""
    assert flower_bench.IMPORT_FLOORS["vision"].split(",") == ["torch", "torchvision"]
    assert "torchvision" not in flower_bench.IMPORT_FLOORS["language"]
    assert "transformers" in flower_bench.IMPORT_FLOORS["language"]


def test_the_floor_app_echoes_its_input(tmp_path):
    """The floor's ClientApp sends back exactly what it received (no torch in that app)."""
    import importlib.util
    import sys

    from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    spec = importlib.util.spec_from_file_location("floor_app", flower_bench.FLOOR / "floor_app.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    old = {a: getattr(TaskIdentity, a) for a in ("_run_id", "_node_id", "_task_id")}
    try:
        for a in old:
            setattr(TaskIdentity, a, 1)
        import numpy as np

        x = np.arange(7, dtype=np.float32)
        msg = Message(RecordDict({"adapter": ArrayRecord({"a": Array(x)})}), dst_node_id=5, message_type="train")
        reply = floor.app(msg, Context(1, 5, {}, RecordDict(), {}))
        sys.modules.pop("colorsys", None)
        floor.app(msg, Context(1, 5, {}, RecordDict(), {"imports": "json, colorsys"}))  # the import floor's ClientApp
        assert "colorsys" in sys.modules
    finally:
        for a, v in old.items():
            setattr(TaskIdentity, a, v)
    assert np.array_equal(reply.content["adapter"]["a"].numpy(), x)
    assert "import torch" not in (flower_bench.FLOOR / "floor_app.py").read_text()


def test_the_floor_server_writes_floor_json_through_no_planted_link(tmp_path, task_identity):
    """floor.json is written under a new random temporary name and renamed over: a link planted at the old
    fixed temporary (floor.json.tmp) or at floor.json itself is never written through."""
    import importlib.util

    from flower_kit import LocalGrid
    from flwr.app import Context, RecordDict
    from obstacles import outside_world, snapshot

    class SilentGrid(LocalGrid):  # one node that never answers: the rounds are timed, nothing comes back
        def get_node_ids(self):
            return [7]

        def send_and_receive(self, messages, *, timeout=None):
            return []

    spec = importlib.util.spec_from_file_location("floor_app", flower_bench.FLOOR / "floor_app.py")
    floor = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(floor)
    outside, out = outside_world(tmp_path / "x"), tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "victim.bin", out / "floor.json.tmp")
    os.symlink(outside / "folder" / "results.json", out / "floor.json")
    before = snapshot(outside)
    run_config = {"num-clients": 1, "numel": 3, "rounds": 2, "out-dir": str(out)}
    floor.server(SilentGrid(), Context(0, 0, {}, RecordDict(), run_config))
    import json

    written = out / "floor.json"
    rounds = json.loads(written.read_text())["rounds"]
    assert not written.is_symlink() and [r["answered"] for r in rounds] == [False, False]
    assert snapshot(outside) == before and sorted(p.name for p in out.iterdir()) == ["floor.json", "floor.json.tmp"]
