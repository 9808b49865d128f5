"""Specification of run_folder.py, generically: take the tree a real micro run_cifar.py run writes, plant at every
path in it each obstacle (a link out, a hard link, a directory, a FIFO, a regular file where a folder goes, a
read-only folder) and check the outcome is one line naming the path given, before any work, and that nothing
outside the run folder changes. The same tree for the Flower server's out-dir: the same checks, the same lock,
before any message is sent."""

import contextlib
import io
import os
import stat

import pytest
import torch
from conftest import MICRO_VIT
from obstacles import (
    fresh_copy,
    outside_world,
    paths_of,
    plant,
    planted_cases,
    recorded_writes,
    snapshot,
    unprivileged,
)
from torchvision.models import VisionTransformer

import run_cifar
from data import write_synthetic_cifar100
from potara_guards.safe_files import UnsafeFile
from potara_harness import config, run_folder
from potara_harness.checkpoint import PARTS_DIR, Parts, RunState


def argv(world, out):
    """A micro run: 2 clients, 1 round, a micro backbone file (no pre-training), every step at its minimum."""
    return [
        *("--data", "synthetic", "--data-dir", str(world / "data"), "--synthetic-per-class", "12"),
        *("--backbone", str(world / "micro.pt"), "--public", "0", "--out", str(out), "--clients", "2"),
        *("--train", "16", "--val", "8", "--test", "10", "--rounds", "1", "--local-steps", "1"),
        *("--local-train-steps", "1", "--finetune-steps", "1", "--fisher-samples", "8", "--batch-size", "8"),
        *("--rank", "2", "--lora-alpha", "4", "--grid-step", "0.5", "--snapshots", "1", "--threads", "1"),
        "--no-progress",
    ]


@pytest.fixture(scope="module")
def written_tree(tmp_path_factory):
    """(world, out, written): the folder a real micro run wrote (checkpoint.pt, results.*, plots, .lock,
    adapters/*.pt) and every file path the run wrote there, recorded as it wrote them (obstacles.recorded_writes)."""
    world = tmp_path_factory.mktemp("world")
    write_synthetic_cifar100(str(world / "data" / "synthetic"), 12, 12 // 5)
    torch.manual_seed(0)
    vit = VisionTransformer(**MICRO_VIT, num_classes=100)
    backbone = {"format": "potara-backbone-v1", "vit": {**MICRO_VIT, "num_classes": 100}, "info": {}}
    torch.save({**backbone, "state_dict": vit.state_dict()}, world / "micro.pt")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()):
        mp.setitem(config.VIT_PRESETS["tiny"], "vit", MICRO_VIT)
        with recorded_writes(world / "run") as written:
            run_cifar.main(argv(world, world / "run"))
    torch.set_num_threads(threads)
    return world, world / "run", written


@pytest.fixture(scope="module")
def tree(written_tree):
    """(world, out): written_tree's folder."""
    return written_tree[:2]


def test_the_tree_of_a_real_run_is_what_the_checks_cover(written_tree):
    """The run folder's paths are the checked ones: its files (run_folder.OUTPUT_FILES, LOCK_FILE) and folders
    (OUTPUT_DIRS, the part files of checkpoint.PARTS_DIR in them): a new output must be added there. Every file
    the run wrote, as it wrote it, is one the tree holds: the obstacle tests below plant at each one."""
    _, out, written = written_tree
    assert written == {p for p in paths_of(out) if not p.endswith("/")}, written
    files = {p for p in paths_of(out) if "/" not in p}
    assert files == set(run_folder.OUTPUT_FILES + (run_folder.LOCK_FILE,)), files
    assert {p for p in paths_of(out) if p.endswith("/") and p != "./"} == {f"{PARTS_DIR}/"}
    assert run_folder.OUTPUT_DIRS == (PARTS_DIR,)
    assert len([p for p in paths_of(out) if p.startswith(f"{PARTS_DIR}/") and p.endswith(".pt")]) == 5


def test_every_obstacle_at_every_path_of_a_run_folder_is_one_line_before_any_work(written_tree, tmp_path, capsys):
    """run_cifar.py on a folder a run wrote, with one obstacle planted: exit 2, one error line naming --out and
    the path, no traceback, nothing outside changed, the run folder's own files as they were. Among them a
    directory at each file path the run writes (a run over adapters/local-0000.pt/ ended in IsADirectoryError)."""
    world, tree_out, written = written_tree
    done = []
    for case in planted_cases(tree_out, tmp_path):
        with pytest.raises(SystemExit) as e:
            unprivileged(run_cifar.main, argv(world, case.folder))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (case.rel, case.kind, err)
        name = case.rel.rstrip("/") if case.rel != "./" else ""
        assert f"--out {case.folder}" in errors[0] and name in errors[0], (case.rel, case.kind, errors)
        assert snapshot(case.folder) == case.planted, case  # refused before anything in it was written or deleted
        done.append((case.rel, case.kind))
    assert len(done) >= 4 * 11 + 4 + 1, len(done)
    assert {rel for rel, kind in done if kind == "directory"} >= written, written


def test_a_part_folder_planted_after_the_checks_is_refused_when_written_or_cleared(tmp_path):
    """adapters/ a link to another folder: the run deleted local-0000.pt there and wrote 5 parts into it. Planted
    after the up-front checks, it is still refused at the write (Parts.save) and the clear (Parts.clear), the
    other folder untouched; so is a directory where a part goes, at the clear, in one line."""
    outside = outside_world(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(outside / "folder", out / PARTS_DIR)
    parts = Parts(str(out / "checkpoint.pt"), RunState("fp"))
    for call in (parts.clear, lambda: parts.save("local", 0, {"w": torch.ones(2)})):
        with pytest.raises(UnsafeFile, match=f"{PARTS_DIR}: is a symbolic link"):
            call()
    assert snapshot(outside / "folder") == {"local-0000.pt": b"not yours", "results.json": b"{}"}
    os.remove(out / PARTS_DIR)
    (out / PARTS_DIR).write_bytes(b"x")  # a regular file where the folder goes: one line, not FileExistsError
    with pytest.raises(UnsafeFile, match=f"{PARTS_DIR}: is not a directory"):
        parts.save("local", 0, {"w": torch.ones(2)})
    os.remove(out / PARTS_DIR)  # a directory where a part goes, beside a part: the clear (a run started over)
    (out / PARTS_DIR / "local-0000.pt").mkdir(parents=True)  # ended in IsADirectoryError, the parts half removed
    (out / PARTS_DIR / "local-0001.pt").write_bytes(b"an earlier part")
    with pytest.raises(UnsafeFile, match=r"local-0000.pt: is not a regular file \(a directory\)"):
        parts.clear()
    assert sorted(os.listdir(out / PARTS_DIR)) == ["local-0000.pt", "local-0001.pt"]  # refused before any removal


def test_a_hard_linked_lock_is_refused_and_the_outside_file_kept(tree, tmp_path, capsys):
    """`ln ../victim out/.lock`: the outside file was truncated to `pid N`. The checks and the lock refuse it."""
    world, _ = tree
    outside = outside_world(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    os.link(outside / "victim.bin", out / run_folder.LOCK_FILE)
    with pytest.raises(SystemExit) as e:
        run_cifar.main(argv(world, out))
    assert e.value.code == 2 and ".lock in it has 2 hard links" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # the lock alone (a link planted after the checks)
        with run_folder.out_dir_lock(str(out)):
            pass
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.count("\n") == 0 and ".lock in it has 2 hard links" in err, err
    assert (outside / "victim.bin").read_bytes() == b"precious"


# ----------------------------------------------------------------------------- the Flower server's out-dir
def serve_refused(out):
    """The ServerApp on out-dir `out`, with a Grid that fails any call (a message sent before the out-dir was
    refused): the RunFolderError it raised, one line."""
    pytest.importorskip("flwr")
    from flower_kit import RUN, LocalGrid
    from flwr.app import Context, RecordDict

    from potara_flower import server_app

    class UntouchedGrid(LocalGrid):
        def get_node_ids(self):
            raise AssertionError("the server asked for its nodes before refusing its out-dir")

        def send_and_receive(self, messages, *, timeout=None):
            raise AssertionError("the server sent a message before refusing its out-dir")

    run_config = {**RUN, "out-dir": str(out)}
    with pytest.raises(run_folder.RunFolderError) as e:
        server_app.app(UntouchedGrid(), Context(0, 0, {}, RecordDict(), run_config))
    assert "\n" not in str(e.value)
    return str(e.value)


def test_the_flower_server_refuses_a_folder_a_run_holds_before_any_round(tree, tmp_path):
    """A run_cifar.py run holding the folder had its checkpoint.pt, results.* and plots overwritten by the server.
    Now the server takes the same lock: refused at once, the holder's files as they were."""
    _, tree_out = tree
    out = fresh_copy(tree_out, tmp_path / "held")
    os.remove(out / run_folder.LOCK_FILE)
    before = snapshot(out)
    with run_folder.out_dir_lock(str(out)):  # the run holding it (another process is the same: flock)
        msg = serve_refused(out)
        assert {k: v for k, v in snapshot(out).items() if k != ".lock"} == before
    assert f"out-dir {out} is in use by another run (pid {os.getpid()})" in msg, msg


def test_every_obstacle_at_every_path_of_the_servers_out_dir_is_refused_before_any_round(tree, tmp_path):
    """results.json -> elsewhere was refused only after every round and every client's final step. Now every
    obstacle of the run folder's tree is one line before the grid is touched, nothing outside changed."""
    _, tree_out = tree
    for case in planted_cases(tree_out, tmp_path):
        msg = unprivileged(serve_refused, case.folder)
        name = case.rel.rstrip("/") if case.rel != "./" else ""
        assert msg.startswith(f"out-dir {case.folder}") and name in msg, (case.rel, case.kind, msg)


def test_obstacles_cover_every_kind(tmp_path):
    """The planting helper makes what it says, and a read-only folder is read-only to `unprivileged` code while
    the test process itself keeps its rights (a test of the test: a silently missing obstacle tests nothing)."""
    outside = outside_world(tmp_path)
    out = tmp_path / "out"
    (out / "d").mkdir(parents=True)
    (out / "f").write_bytes(b"x")
    for rel, kind, test in (
        ("f", "link out", os.path.islink),
        ("f", "hard link", lambda p: os.stat(p).st_nlink == 2),
        ("f", "directory", os.path.isdir),
        ("f", "FIFO", lambda p: stat.S_ISFIFO(os.lstat(p).st_mode)),
        ("d/", "regular file", os.path.isfile),
    ):
        plant(out, rel, kind, outside)
        assert test(os.path.join(out, rel.rstrip("/"))), (rel, kind)
    os.remove(out / "d")
    (out / "d").mkdir()
    plant(out, "d/", "read-only folder", outside)
    assert not unprivileged(os.access, out / "d", os.W_OK) and unprivileged(os.access, out, os.W_OK)
    with pytest.raises(PermissionError):
        unprivileged(open, out / "d" / "new", "wb")
    assert os.access(out / "d", os.W_OK) == (os.geteuid() == 0)  # this thread's rights are its own
    (out / "d").chmod(0o755)


# ----------------------------------------------------------------------------- the studies' and tools' outputs
def tool_trees(tmp_path):
    """(name, main, argv(out), tree, where its work begins as (module, attribute)): each study or tool that
    writes, with the tree its outputs make (every file and folder it names: a file holds bytes, a folder it fills
    holds one file) and a command line that would run it on `out`."""
    from potara_harness.config import ABLATION_CACHE, ABLATION_OUTPUTS
    from potara_studies import ablation, bench, benchmarks, claims, claims_study, estimator_study, scale
    from potara_studies.claims_config import CLAIM1_FOLDERS
    from potara_studies.claims_config import OUTPUT_FILES as CLAIMS_OUTPUTS

    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(b"only its existence is checked before the folder")
    tools = [
        (
            "ablation",
            ablation.main,
            lambda out: ["--out", str(out), "--data-dir", str(tmp_path / "data")],
            (ABLATION_OUTPUTS, {ABLATION_CACHE: ["conflict-s0-0123456789ab.pt"]}),
            (estimator_study, "run"),
        ),
        (
            "claims",
            claims.main,
            lambda out: ["--suites", "real", "--out", str(out), "--data-dir", str(tmp_path / "data")],
            (CLAIMS_OUTPUTS, {CLAIM1_FOLDERS["real"]: list(ABLATION_OUTPUTS)}),
            (claims_study, "run"),
        ),
        (
            "bench",
            bench.main,
            lambda out: ["--only", "lora", "--out", str(out / "bench.json")],
            (("bench.json",), {}),
            (benchmarks, "run"),
        ),
        (
            "scale",
            scale.main,
            lambda out: ["--clients", "1", "--out", str(out / "scale.json")],
            (("scale.json",), {}),
            (scale, "measure"),
        ),
    ]
    try:
        from potara_flower import bench as flower_bench
        from potara_flower import fleet
    except ImportError:  # the flower extra
        pass
    else:
        folders = {name: [] for name in flower_bench.OUTPUT_FOLDERS}
        folders.update({name: ["results.json"] for name in flower_bench.SERVER_FOLDERS})
        folders.update({name: ["floor.json"] for name in flower_bench.FLOOR_FOLDERS})
        tools += [
            (
                "flower bench",
                flower_bench.main,
                lambda out: ["--backbone", str(backbone), "--out", str(out)],
                (flower_bench.OUTPUT_FILES, folders),
                (flower_bench, "bench"),
            ),
            (
                "fleet",
                fleet.main,
                lambda out: ["--backbone", str(backbone), "--nodes", "3", "--restart", "--out", str(out)],
                (fleet.OUTPUT_FILES, {"K3": [], "restart": []}),
                (fleet, "measure"),
            ),
        ]
    for name, main, argv, (files, folders), work in tools:
        tree = tmp_path / "trees" / name.replace(" ", "-")
        tree.mkdir(parents=True)
        for f in files:
            (tree / f).write_bytes(b"an earlier output")
        for folder, entries in folders.items():
            (tree / folder).mkdir()
            for entry in entries:
                (tree / folder / entry).write_bytes(b"an earlier cache")
        yield name, main, argv, tree, work


def test_every_obstacle_where_a_study_or_tool_writes_is_one_line_before_any_work(tmp_path, capsys):
    """The studies (ablation, bench, scale) and the Flower tools (bench, fleet) wrote their JSON at the end,
    through a link planted there (open(path, "w")), and the ablation's cache/ -> elsewhere took its cache files.
    Now every obstacle at every path of their outputs is one line, exit 2, before any work: nothing outside
    changed, the folder as planted. Where each tool's work begins fails: a guard that let one through fails
    fast."""

    def work_began(*args, **kwargs):
        raise AssertionError("the work began before the obstacle was refused")

    done = []
    for name, main, argv, tree, (module, attribute) in tool_trees(tmp_path):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(module, attribute, work_began)
            done += obstacles_refused(name, main, argv, tree, tmp_path, capsys)
    assert {n for n, _, _ in done} >= {"ablation", "bench", "claims", "scale"}, done


def obstacles_refused(name, main, argv, tree, tmp_path, capsys) -> list[tuple[str, str, str]]:
    """Each obstacle in `tree` met by `main`: exit 2, one error line naming --out and the path, the folder as
    planted (planted_cases: nothing outside changed)."""
    done = []
    for case in planted_cases(tree, tmp_path / "cases" / tree.name):
        with pytest.raises(SystemExit) as e:
            unprivileged(main, argv(case.folder))
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert e.value.code == 2 and len(errors) == 1 and "Traceback" not in err, (name, case.rel, case.kind, err)
        # each part of the path: a server out-dir's file is "--out <folder>/vision: results.json in it ..."
        parts = case.rel.rstrip("/").split("/") if case.rel != "./" else []
        assert f"--out {case.folder}" in errors[0] and all(p in errors[0] for p in parts), (name, case, errors)
        assert snapshot(case.folder) == case.planted, (name, case.rel, case.kind)
        done.append((name, case.rel, case.kind))
    return done
