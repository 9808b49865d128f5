"""The Flower app (potara_flower/server_app.py, client_app.py) run for real: a flower-superlink and flower-supernode
processes on 127.0.0.1, `flwr run` of this repository, checked against the in-process code.

Every process is started in its own process group and stopped in teardown by its pid (SIGINT, then
SIGKILL after a bound), whatever happens; every wait is bounded. Skipped only when flwr is not installed.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import fields
from pathlib import Path

import background
import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

try:
    import tomllib  # Python 3.11+
except ImportError:  # Python 3.10: tomli, which flwr depends on
    import tomli as tomllib
from conftest import MICRO_VIT  # noqa: E402
from flower_kit import (  # noqa: E402
    REPO,
    RUN,
    Unpicklable,
    final_adapter,
    micro_backbone,
    serve,
)
from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    RecordDict,
)
from obstacles import outside_world, paths_of, planted_cases, snapshot, unprivileged  # noqa: E402
from torchvision.models import VisionTransformer  # noqa: E402

from data import (  # noqa: E402
    client_splits,
    dirichlet_partition,
    load_images,  # noqa: E402
    public_and_pool,
)
from fed import Client, FedConfig, run_fedit, sample_clients  # noqa: E402
from potara_flower.task import ADAPTER, CONFIG, METRICS, from_record, to_record  # noqa: E402
from potara_guards.adapter_file import load_adapter  # noqa: E402
from potara_harness.checkpoint import ResumeError  # noqa: E402
from potara_harness.config import (  # noqa: E402
    VIT_PRESETS,
    AppConfig,
    ConfigError,
    ExperimentConfig,  # noqa: E402
)
from potara_harness.pipeline import run_experiment  # noqa: E402
from potara_harness.vit import build_model, load_backbone_file  # noqa: E402

# ----------------------------------------------------------------------------- the run, and its in-process reference


def check_against_in_process(out: Path, data_dir: Path, backbone: Path, run: dict, tmp: Path) -> dict:
    """The app's outputs in `out` against one process on the same data, backbone file and seeds: the final
    global adapter bitwise fed.run_fedit's; participants, drop-outs and byte counts its history's; every
    client's accuracies, lam and grid curves pipeline.run_experiment's. Returns results.json."""
    K, R, cpr = run["num-clients"], run["rounds"], run["clients-per-round"] or run["num-clients"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the clients ran (node config threads=1): same kernels, same sums
    data, _ = load_images("synthetic", str(data_dir), run["synthetic-per-class"])
    _, pool = public_and_pool(len(data.labels), run["public"])
    sizes = (run["train"], run["val"], run["test"])
    parts = dirichlet_partition(data.labels[pool], K, run["alpha"], sum(sizes), run["seed"])
    splits = client_splits(data.images, data.labels, pool, parts, sizes, run["seed"])
    model = build_model(
        load_backbone_file(str(backbone), None), VIT_PRESETS["tiny"], run["rank"], run["lora-alpha"], run["seed"]
    )
    fed_cfg = FedConfig(
        R,
        run["local-steps"],
        run["lr"],
        run["batch-size"],
        clients_per_round=cpr,
        seed=run["seed"],
        drop_prob=run["drop-prob"],
    )
    ref = run_fedit(model, [Client(s.name, s.train_inputs, s.train_targets) for s in splits], fed_cfg, progress=False)
    cfg = ExperimentConfig(
        rounds=R,
        local_steps=run["local-steps"],
        clients_per_round=run["clients-per-round"],
        lr=run["lr"],
        batch_size=run["batch-size"],
        local_train_steps=run["local-train-steps"],
        finetune_steps=run["finetune-steps"],
        fisher_samples=run["fisher-samples"],
        grid_step=run["grid-step"],
        fedsa=False,
        snapshots=1,
        seed=run["seed"],
        drop_prob=run["drop-prob"],
    )
    pipeline = run_experiment(model, splits, cfg, str(tmp / "in-process"), progress=False)
    torch.set_num_threads(threads)

    got = torch.load(out / "checkpoint.pt", weights_only=True)["fedit"]["global_state"]
    assert sorted(got) == sorted(ref.global_state)
    for k, v in ref.global_state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)  # it trained
    results = json.loads((out / "results.json").read_text())
    assert len(results["fedit_history"]) == R
    for mine, theirs in zip(results["fedit_history"], ref.history):
        for key in ("round", "clients", "dropped", "rejected", "bytes_down", "bytes_up"):
            assert mine[key] == theirs[key], key
        assert mine["wire_bytes_down"] > mine["bytes_down"]  # npy headers and keys on top of the tensors
    for m, r in results["methods"].items():
        assert r["per_client"] == pipeline["methods"][m]["per_client"], m
        assert r["bytes"] == pipeline["methods"][m]["bytes"], m
    for name, c in results["per_client"].items():
        assert c["lam_potara"] == pipeline["per_client"][name]["lam_potara"], name
        assert c["grid"] == pipeline["per_client"][name]["grid"], name
    assert (out / "results.md").read_text().startswith("| method | mean acc |")
    return results


# ----------------------------------------------------------------------------- in process (no network)


def test_resume_continues_the_checkpoint_bitwise(small_world, task_identity, tmp_path):
    """1 round, then resume=true with rounds=2 == 2 rounds at once (adapter and history); a checkpoint of
    another run is refused in one line."""
    whole = serve(small_world, tmp_path / "whole", rounds=2)
    serve(small_world, tmp_path / "split", rounds=1)
    resumed = serve(small_world, tmp_path / "split", rounds=2, resume=True)
    a, b = final_adapter(tmp_path / "whole"), final_adapter(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("seconds", "client_seconds")} for r in h]
    assert strip(resumed["fedit_history"]) == strip(whole["fedit_history"])
    assert resumed["methods"]["potara_ab"] == whole["methods"]["potara_ab"]
    with pytest.raises(ResumeError, match=r"was written by a run with other lr \([0-9.e-]+ there, 0.02 now\); rerun"):
        serve(small_world, tmp_path / "split", rounds=3, resume=True, lr=0.02)


def test_failed_silent_and_lying_clients_are_recorded(small_world, task_identity, tmp_path):
    """Round 0: client1 raises, client2 never answers; round 1: a NaN adapter, an infinite loss, and a FedAvg
    weight other than set-up's; at the end an unreadable personalisation reply. Each is recorded with its reason
    (failed / rejected / personalization_failed), the round averages the rest, nobody vanishes, and the client
    missing from the results is named in results.md and in one log line, and the run ends normally."""

    def tamper(k, msg, reply):
        t = msg.content[CONFIG]["round"] if msg.metadata.message_type == "train" else None
        if t == 0 and k == 1:
            return Message(Error(code=0, reason="RuntimeError: out of memory"), reply_to=msg)
        if t == 0 and k == 2:
            return None
        if msg.metadata.message_type == "evaluate" and k == 1:  # accuracies that are not numbers
            return Message(
                RecordDict({CONFIG: ConfigRecord({"acc/local": "all of them", "record/x": 1})}), reply_to=msg
            )
        if t == 1 and reply.has_content() and ADAPTER in reply.content:
            if k == 0:
                state = from_record(reply.content[ADAPTER])
                reply.content[ADAPTER] = to_record({key: torch.full_like(v, float("nan")) for key, v in state.items()})
            if k == 1:
                reply.content[METRICS]["train-loss"] = float("inf")  # a non-finite loss: rejected by server_round
            if k == 2:
                reply.content[METRICS]["num-examples"] = 10**9  # n_k is fixed at set-up: failed
        return reply

    res = serve(
        small_world,
        tmp_path / "out",
        tamper=tamper,
        clients_per_round=3,
        drop_prob=0.0,
        round_timeout=5.0,
        missing=["client1"],
    )
    h0, h1 = res["fedit_history"]
    assert h0["failed"] == [
        {"client": "client1", "reason": "client error: RuntimeError: out of memory"},
        {"client": "client2", "reason": "no reply within 5 s"},
    ]
    assert h0["dropped"] == ["client1", "client2"] and h0["bytes_up"] == res["adapter"]["bytes"]
    assert h0["mean_train_loss"] is not None  # client0's update was averaged
    assert [r["client"] for r in h1["rejected"]] == ["client0", "client1"]
    assert "NaN" in h1["rejected"][0]["reason"] and "finite" in h1["rejected"][1]["reason"]
    assert h1["failed"] == [
        {"client": "client2", "reason": "unreadable reply: ValueError: num-examples 1000000000 is not the 40 of set-up"}
    ]
    assert res["faults"]["fedit"]["failed"] == [{"round": 0, **f} for f in h0["failed"]] + [
        {"round": 1, **h1["failed"][0]}
    ]
    assert res["clients"] == ["client0", "client2"]  # client1's personalisation reply was unreadable...
    [why] = res["faults"]["personalization_failed"]  # ...and says so
    assert why["client"] == "client1" and why["reason"].startswith(
        "unreadable reply: ValueError: acc has methods ['local'], not "
    )
    md = (tmp_path / "out" / "results.md").read_text()
    assert "3 client-rounds dropped, 2 updates rejected" in md and "3 client-rounds failed (client1, client2)" in md
    assert f"MISSING from the results: client1 ({why['reason']})" in md


def test_setup_refuses_a_misconfigured_federation(small_world, task_identity, tmp_path):
    """Too few SuperNodes, duplicate partition ids, a node without a backbone, with another backbone, or with a
    backbone file crafted to run code (refused unread), bad node settings, an unreadable set-up reply: the run
    stops at set-up with one line (naming the node)."""
    node = lambda k, **kw: {
        "partition-id": k,
        "num-partitions": 3,
        "backbone": str(small_world / "backbone.pt"),
        "data-dir": str(small_world / "data"),
        **kw,
    }
    with pytest.raises(RuntimeError, match="only 2 of num-clients=3 SuperNodes connected within connect-timeout=1 s"):
        serve(small_world, tmp_path / "z", nodes=[node(0), node(1)], connect_timeout=1.0)
    with pytest.raises(RuntimeError, match=r"partition ids \[0, 1, 1\] are not 0..2 once each"):
        serve(small_world, tmp_path / "a", nodes=[node(0), node(1), node(1)])
    missing = node(2)
    del missing["backbone"]
    with pytest.raises(RuntimeError, match="node config backbone is missing"):
        serve(small_world, tmp_path / "b", nodes=[node(0), node(1), missing])
    other = tmp_path / "other.pt"
    torch.manual_seed(1)
    torch.save(
        {
            "format": "potara-backbone-v1",
            "vit": {**MICRO_VIT, "num_classes": 100},
            "state_dict": VisionTransformer(**MICRO_VIT, num_classes=100).state_dict(),
        },
        other,
    )
    with pytest.raises(RuntimeError, match="client2 holds another backbone file"):
        serve(small_world, tmp_path / "c", nodes=[node(0), node(1), node(2, backbone=str(other))])
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"format": "potara-backbone-v1", "vit": Unpicklable()}, unsafe)  # would call os.getpid if loaded
    with pytest.raises(
        RuntimeError, match="node .*: client error: <class '.*BackboneError'>:<'.*not a readable, safe torch file"
    ):
        serve(small_world, tmp_path / "d", nodes=[node(0), node(1, backbone=str(unsafe)), node(2)])
    for bad, message in (
        ({"device": "tpu"}, "node config device='tpu'"),
        (
            {"threads": 0},
            re.escape(
                f"node config threads must be an integer in [1, {os.cpu_count() or 1:,}] (the CPU cores of this "
            ),
        ),
        ({"partition-id": 5}, "partition-id=5 num-partitions=3"),
    ):
        with pytest.raises(RuntimeError, match=message):
            serve(small_world, tmp_path / "f", nodes=[node(0), node(1), node(2, **bad)])
    liar = lambda k, msg, reply: (
        Message(RecordDict({CONFIG: ConfigRecord({"partition-id": "two"})}), reply_to=msg)
        if k == 2 and msg.metadata.message_type == "query"
        else reply
    )
    with pytest.raises(RuntimeError, match="setup failed: node .*: unreadable reply"):
        serve(small_world, tmp_path / "e", tamper=liar)


def test_run_config_is_typed_and_pyproject_matches_the_defaults():
    """[tool.flwr.app.config] holds exactly AppConfig's fields at their defaults; bad values are one-line errors."""
    with open(REPO / "pyproject.toml", "rb") as f:
        table = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    assert table == {f.name.replace("_", "-"): f.default for f in fields(AppConfig)}
    assert AppConfig.from_run_config(table) == AppConfig()
    for bad, message in (
        ({"rounds": "3"}, "rounds = '3': expected a int"),
        ({"lr": True}, "expected a float"),
        ({"rounds": 0}, re.escape("run config rounds must be an integer in [1, 100,000], got 0")),
        ({"clients-per-round": 5}, "clients-per-round"),
        ({"drop-prob": 1.0}, "drop-prob"),
        ({"data": "imagenet"}, "data must be"),
    ):
        with pytest.raises(ConfigError, match=message):
            AppConfig.from_run_config({**table, **bad})


def test_adapters_cross_the_wire_as_float32_bitwise():
    """to_record / from_record: float32 bitwise; bfloat16 sent as float32 (ArrayRecord has no bfloat16); an
    integer tensor refused; a record that is not numeric refused."""
    state = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16)}
    back = from_record(to_record(state))
    assert back["a"].dtype == torch.float32 and torch.equal(back["a"], state["a"])
    assert back["b"].dtype == torch.float32 and torch.equal(back["b"], state["b"].float())
    with pytest.raises(ValueError, match="only floating tensors"):
        to_record({"n": torch.arange(3)})
    with pytest.raises(ValueError, match="not a numeric array"):
        from_record(ArrayRecord({"s": Array(np.array(["x"]))}))


def test_in_process_app_equals_run_fedit_with_drop_outs(small_world, task_identity, tmp_path):
    """3 clients, 2 rounds of 2 sampled clients, a simulated drop-out: the ServerApp + ClientApp code path (no
    network) gives fed.run_fedit's adapter bitwise and the pipeline's numbers."""
    picks = [sample_clients(RUN["seed"], t, 3, 2, RUN["drop-prob"]) for t in range(2)]
    assert any(d for _, d in picks) and all(len(d) < len(s) for s, d in picks), picks  # the case is covered
    devices = tmp_path / "devices"
    nodes = [
        {
            "partition-id": k,
            "num-partitions": 3,
            "backbone": str(small_world / "backbone.pt"),
            "data-dir": str(small_world / "data"),
            "device": "cpu",
            "adapter-dir": str(devices / f"node{k}"),
            "threads": 1,
        }  # as the reference runs: the same kernels, the same float sums, whatever ran before
        for k in range(3)
    ]
    serve(small_world, tmp_path / "out", nodes=nodes)
    results = check_against_in_process(
        tmp_path / "out", small_world / "data", small_world / "backbone.pt", RUN, tmp_path
    )
    assert any(h["dropped"] for h in results["fedit_history"])
    for k in range(3):  # each device kept its personalised adapter (and only its own)
        [path] = (devices / f"node{k}").iterdir()
        state, meta = load_adapter(path)
        assert path.name == f"client{k}-potara.pt" and meta["lam"] == results["per_client"][f"client{k}"]["lam_potara"]
        assert sorted(state) == sorted(final_adapter(tmp_path / "out"))


def test_every_obstacle_in_a_devices_adapter_dir_is_one_line_at_setup_and_at_the_write(
    small_world, task_identity, tmp_path
):
    """The adapter-dir a real vision device writes (the in-process app's final step: <client>-potara.pt), with
    each obstacle at every path in it (tests/obstacles.py): set-up (client_app.load_client, which every message
    runs first) refuses it with one ConfigError line naming adapter-dir and the path; the same obstacle met by the
    final write itself (planted after that check) is one UnsafeFile or WriteError line naming the file. Nothing
    outside changes either way."""
    from potara_flower import client_app
    from potara_guards.adapter_file import save_adapter
    from potara_guards.safe_files import UnsafeFile, WriteError

    world = {"backbone": str(small_world / "backbone.pt"), "data-dir": str(small_world / "data"), "threads": 1}
    nodes = [{"partition-id": k, "num-partitions": 3, **world} for k in range(3)]
    nodes[0]["adapter-dir"] = str(tmp_path / "device")
    serve(small_world, tmp_path / "out", nodes=nodes)
    tree = tmp_path / "device"
    assert paths_of(tree) == ["./", "client0-potara.pt"]
    run_config = {**RUN, "out-dir": str(tmp_path / "out")}
    _, client = client_app.load_client(Context(1, 1, nodes[1], RecordDict(), run_config))
    done = []
    for case in planted_cases(tree, tmp_path / "cases"):
        adapter_dir, rel, kind = case.folder, case.rel, case.kind
        context = Context(1, 1, {**nodes[0], "adapter-dir": str(adapter_dir)}, RecordDict(), run_config)
        with pytest.raises(ConfigError) as e:
            unprivileged(client_app.load_client, context)
        assert snapshot(adapter_dir) == case.planted, (rel, kind)
        msg = str(e.value)
        assert msg.startswith(f"node config adapter-dir='{adapter_dir}': ") and "\n" not in msg, (rel, kind, msg)
        assert rel.rstrip("/").lstrip(".") in msg, (rel, kind, msg)
        with pytest.raises((UnsafeFile, WriteError)) as e:
            unprivileged(save_adapter, str(adapter_dir / "client0-potara.pt"), client.phi0, {"lam": 0.5})
        msg = str(e.value)
        assert str(adapter_dir / "client0-potara.pt") in msg and "\n" not in msg, (rel, kind, msg)
        done.append((rel, kind))
    assert len(done) == 1 + 4, done


def test_an_unusable_adapter_dir_is_refused_before_the_model_is_read(tmp_path, monkeypatch):
    """A device's adapter-dir that is a file, under a file, or a folder it cannot write: one ConfigError line at
    set-up before the backbone or model is read (either experiment)."""
    from potara_flower import client_app

    def model_read(*args, **kwargs):
        raise AssertionError("the model was read before the adapter-dir was refused")

    monkeypatch.setattr(client_app, "load_vision", model_read)
    monkeypatch.setattr(client_app, "load_language", model_read)
    (tmp_path / "a-file").write_bytes(b"x")
    (tmp_path / "read-only").mkdir(mode=0o555)
    for adapter_dir, why in (
        (tmp_path / "a-file", "exists and is not a directory"),
        (tmp_path / "a-file" / "sub", "is a file)"),
        (tmp_path / "read-only", "permission denied"),
    ):
        for experiment in ("vision", "language"):
            node = {"partition-id": 0, "num-partitions": 3, "adapter-dir": str(adapter_dir)}
            context = Context(1, 1, node, RecordDict(), {**RUN, "experiment": experiment})
            with pytest.raises(ConfigError) as e:
                unprivileged(client_app.load_client, context)
            msg = str(e.value)
            assert msg.startswith(f"node config adapter-dir='{adapter_dir}': ") and why in msg, (experiment, msg)
    (tmp_path / "read-only").chmod(0o755)


# ----------------------------------------------------------------------------- the loopback run
def test_a_federation_folder_with_planted_links_writes_nothing_outside(tmp_path):
    """LocalFederation (the tools' and tests' federation) in a folder where an earlier one left links: flwr-home
    -> another folder, a log -> an outside file, a log hard-linked to one. Its state and logs are new files in
    the folder; nothing outside changes."""
    from potara_flower.loopback import LocalFederation

    outside, folder = outside_world(tmp_path / "x"), tmp_path / "fed"
    folder.mkdir()
    os.symlink(outside / "folder", folder / "flwr-home")
    os.symlink(outside / "victim.bin", folder / "echo.log")
    os.link(outside / "folder" / "results.json", folder / "hard.log")
    before = snapshot(outside)
    fed = LocalFederation(folder)
    try:
        for name in ("echo", "hard"):
            assert fed.start(name, Path(sys.executable).name, "-c", "print('hello')").wait(timeout=60) == 0
            log = folder / f"{name}.log"
            assert not log.is_symlink() and os.stat(log).st_nlink == 1 and log.read_text() == "hello\n", name
    finally:
        fed.stop()
    home = folder / "flwr-home"
    assert home.is_dir() and not home.is_symlink() and (home / "config.toml").is_file()
    assert snapshot(outside) == before


def test_the_log_watch_sees_each_finished_line_of_its_run_once_even_when_written_in_pieces(tmp_path):
    """LocalFederation.run asks `flwr list` when the SuperLink's log says the run's task finished: the watch matches
    a line of this run only (not run 12, whose id begins with 1), a line written in two pieces once it is whole, and
    each line once; a log that does not exist yet is no match. Checked against the lines written, by hand."""
    from potara_flower.loopback import LocalFederation, run_finished_line

    fed = LocalFederation(tmp_path)
    watch = fed.log_watch("superlink", run_finished_line("1"))
    log = tmp_path / "superlink.log"
    assert watch() is False
    log.write_text("INFO: Started task 7 of run 1\nINFO: Finished task 8 of run 12\n")
    assert watch() is False
    with open(log, "a") as f:
        f.write("INFO: Finished task 7 of ")
    assert watch() is False  # half a line: not yet
    with open(log, "a") as f:
        f.write("run 1\nINFO: Fleet.PushMessages\n")
    assert watch() is True
    assert watch() is False  # that line was read
    log.write_text(log.read_text() + "INFO: Finished task 9 of run 1\n")
    assert watch() is True


LOOPBACK = {**RUN, "num-clients": 2, "clients-per-round": 1, "drop-prob": 0.0}  # 2 processes: CI has 2 cores


def prepare_loopback(folder):
    """In the main thread, before any test: the backbone file and the federation."""
    from potara_flower.loopback import LocalFederation

    micro_backbone(folder / "backbone.pt")
    return LocalFederation(folder), {}


def run_loopback(federation, folder, made: dict) -> dict:
    """In the background (tests/background.py): a SuperLink, 2 SuperNodes, `flwr run`; its final status."""
    federation.superlink()
    for k in range(2):
        federation.supernode(
            f"node{k}",
            f"partition-id={k} num-partitions=2 backbone='{folder / 'backbone.pt'}' data-dir='{folder / 'data'}' "
            "threads=1",
        )
    status = federation.run(REPO, {**LOOPBACK, "out-dir": str(folder / "out")}, timeout=400)
    return {"status": status, "superlink": federation.log("superlink")[-3000:]}


background.register("loopback", prepare_loopback, run_loopback)


@pytest.mark.federation("loopback")
def test_loopback_fedit_bitwise_equals_in_process(federation_result):
    """The real thing on 127.0.0.1: a SuperLink, 2 SuperNodes (one sampled per round), `flwr run` for 2
    rounds and the Potara step: check_against_in_process (bitwise FedIT, same participants and bytes, the
    pipeline's accuracies and lam)."""
    picks = [sample_clients(LOOPBACK["seed"], t, 2, 1) for t in range(2)]
    assert sorted(s[0] for s, _ in picks) == [0, 1], picks  # each client trains once: both in the average
    got, folder = federation_result
    assert got["status"]["status"] == "finished:completed", got["superlink"]
    results = check_against_in_process(folder / "out", folder / "data", folder / "backbone.pt", LOOPBACK, folder)
    assert all(h["failed"] == [] for h in results["fedit_history"])
