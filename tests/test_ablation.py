"""ablation.py (the command line) and estimator_study.py (the study) on micro problems (a shrunk tiny ViT,
2 clients, 2 rounds, one seed; real digits, 2 rounds): seconds."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import MICRO_VIT

from potara import PaperFisher, personalize
from potara_harness import config
from potara_harness.evaluation import lam_grid
from potara_studies import ablation, estimator_study

TEST, STEP = 10, 0.25
SCENS = ["dirichlet-0.1", "conflict"]


def micro_argv(data_dir, out, *extra):
    return [
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        "--synthetic-per-class",
        "12",
        "--public",
        "1000",
        "--pretrain-steps",
        "3",
        "--clients",
        "2",
        "--train",
        "16",
        "--val",
        "8",
        "--test",
        str(TEST),
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--local-train-steps",
        "3",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--lora-alpha",
        "4",
        "--grid-step",
        str(STEP),
        "--seeds",
        "0",
        "--threads",
        "1",
        "--no-progress",
        "--conflict-classes",
        "30",
        "--scenarios",
        ",".join(SCENS),
        "--sources",
        "train32,val",
        *extra,
    ]


pytestmark = pytest.mark.usefixtures("micro_preset")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    data_dir, out = tmp_path_factory.mktemp("data"), tmp_path_factory.mktemp("ablation")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config.VIT_PRESETS["tiny"], "vit", MICRO_VIT)
        results = ablation.main(micro_argv(data_dir, out))
    return data_dir, out, results


def test_the_study_writes_only_what_its_checks_cover(micro):
    """The folder a real study wrote: its outputs (config.ABLATION_OUTPUTS), its cache folder of part files and the
    lock, nothing else (run_folder.out_dir_problem checks exactly these before any work: a new output goes there)."""
    _, out, _ = micro
    assert sorted(p.name for p in out.iterdir()) == sorted([*config.ABLATION_OUTPUTS, config.ABLATION_CACHE, ".lock"])
    cached = list((out / config.ABLATION_CACHE).iterdir())
    assert len(cached) == len(SCENS) and all(p.is_file() and p.suffix == ".pt" for p in cached), cached


def test_per_client_figures_and_summary(micro):
    data_dir, out, returned = micro
    r = json.loads((out / "ablation.json").read_text())
    assert list(r["runs"]) == SCENS and r["summary"] == returned["summary"]
    grid = lam_grid(STEP)
    for scen in SCENS:
        clients = list(r["runs"][scen]["0"].values())
        assert len(clients) == 2
        for c in clients:
            val, test = c["grid"]["val"], c["grid"]["test"]
            assert c["grid"]["lam"] == grid and c["local"] == test[0] and c["fedit"] == test[-1]
            best = [lam for lam, v in zip(grid, val) if v == max(val)]  # ties: nearest 0.5, then smaller
            assert c["lam_grid"] == sorted(best, key=lambda lam: (abs(lam - 0.5), lam))[0]
            assert c["grid_val"] == test[grid.index(c["lam_grid"])] and c["grid_oracle"] == max(test)
            assert set(c["estimators"]) == {f"{e}@{s}" for e in config.ABLATION_ESTIMATORS for s in ("train32", "val")}
            loss = c["grid"]["val_loss"]
            assert c["barrier"] == pytest.approx(
                max(f - ((1 - lam) * loss[0] + lam * loss[-1]) for lam, f in zip(grid, loss))
            )
            for name, e in c["estimators"].items():
                assert 0 <= e["lam"] <= 1 and e["abs_lam_diff"] == pytest.approx(abs(e["lam"] - c["lam_grid"]))
                assert abs(e["acc"] * TEST - round(e["acc"] * TEST)) < 1e-9  # a count of correct test images
                if e["lam"] in grid:
                    assert e["acc"] == test[grid.index(e["lam"])]
                assert e["n_samples"] == (16 if name.endswith("train32") else 8)  # 32 capped at the split
        row = r["summary"][scen]
        for m in ("local", "fedit", "grid_val"):
            assert row[m]["acc"] == pytest.approx(np.mean([c[m] for c in clients]))
        acc = np.mean([c["estimators"]["verified@val"]["acc"] for c in clients])
        assert row["verified@val"]["acc"] == pytest.approx(acc)
        assert row["verified@val"]["ratio"] == pytest.approx(acc / row["grid_val"]["acc"])
        checks = row["verified@val"]["default"]
        assert sum(checks["candidates"].values()) == len(clients) and checks["above_better_end"] == 0
    md = (out / "ablation.md").read_text()
    assert md.startswith("SYNTHETIC DATA") and all(f"| {m} |" in md for m in ("local", "grid_val", "verified@val"))
    command = " ".join(["python", "-m", "potara_studies.ablation", *micro_argv(data_dir, out)])
    assert md.split("\n\n")[1] == f"Command: `{command}`" and r["settings"]["command"] == command


def test_estimator_weights_are_what_the_library_gives(micro):
    # "verified@val" must be the library's default personalize() on the client's val split, "paper@train32" the
    # paper's weight on 32 (here 16) training samples, and the study-only ones must follow from the default's info
    data_dir, out, r = micro
    args, p = ablation.resolve(ablation.build_parser(), micro_argv(data_dir, out))
    data, pool, backbone, info = estimator_study.setup(args, p)
    spec = estimator_study.scenario_spec(args, "conflict")
    splits = estimator_study.make_splits(spec, data, pool, args, 0)
    model = estimator_study.fresh_model(backbone, p, args, 0)
    cache = estimator_study.cache_path(args, "conflict", spec, 0, info)
    G, local = estimator_study.train_adapters(model, splits, args, 0, cache)
    for s in splits:
        got = r["runs"]["conflict"]["0"][s.name]["estimators"]
        _, default = personalize(model, G, local[s.name], held_out=[(s.val_inputs, s.val_targets)])
        assert got["verified@val"]["lam"] == pytest.approx(default["lam"])
        assert got["hermite@val"]["lam"] == pytest.approx(default["lam_hermite"])
        _, paper = personalize(
            model, G, local[s.name], held_out=[(s.train_inputs, s.train_targets)], n_samples=32, estimator=PaperFisher()
        )
        assert got["paper@train32"]["lam"] == pytest.approx(paper["lam"])
        assert int(s.val_targets.max()) < 100


def test_study_only_estimators_by_hand():
    info = lambda f0, f1, d0, d1, fh=None, lh=None: {
        "loss_local": f0,
        "loss_federated": f1,
        "slope_local": d0,
        "slope_federated": d1,
        "loss_at_hermite": fh,
        "lam_hermite": lh,
    }
    assert estimator_study.quadratic_lam(info(1.0, 1.0, -1.0, 3.0)) == pytest.approx(0.25)  # f' = -1 + 4 t: 0 at 1/4
    assert estimator_study.quadratic_lam(info(1.0, 0.5, 0.5, 2.0)) == 0.0  # rising from the local end
    assert estimator_study.quadratic_lam(info(1.0, 0.5, -2.0, -0.5)) == 1.0  # still falling at the federated end
    assert estimator_study.quadratic_lam(info(1.0, 0.5, 1.0, -1.0)) == 1.0  # concave: the lower end
    assert estimator_study.loss_only_lam(info(0.48, 1.06, -1.0, 2.0, 0.9, 0.3)) == 0.0  # the barrier: lower end
    assert estimator_study.loss_only_lam(info(0.48, 1.06, -1.0, 2.0, 0.4, 0.3)) == 0.3  # below both ends: taken


def test_real_suite_runs_on_the_digits(tmp_path):
    pytest.importorskip("sklearn")
    r = ablation.main(
        [
            "--suite",
            "real",
            "--out",
            str(tmp_path),
            "--seeds",
            "0",
            "--rounds",
            "2",
            "--local-train-steps",
            "5",
            "--clients",
            "3",
            "--threads",
            "1",
            "--no-progress",
            "--sources",
            "val",
            "--estimators",
            "verified,paper",
        ]
    )
    assert list(r["runs"]) == ["conflict", "dirichlet-0.5"]
    for scen in r["runs"]:
        clients = r["runs"][scen]["0"]
        assert len(clients) == 3 and r["summary"][scen]["clients_x_seeds"] == 3
        for c in clients.values():
            assert set(c["estimators"]) == {"verified@val", "paper@val"}
            assert c["estimators"]["verified@val"]["n_samples"] == 50  # digits.DigitsConfig().val
            assert len(c["grid"]["val_loss"]) == 21
    assert (tmp_path / "ablation.md").read_text().startswith("REAL DATA")
    with pytest.raises(SystemExit):
        ablation.main(["--suite", "real", "--out", str(tmp_path), "--synthetic-per-class", "3"])


def test_second_run_reuses_the_cached_adapters(micro, monkeypatch):
    data_dir, out, first = micro

    def no_training(*a, **k):
        raise AssertionError("retrained although the adapters are cached")

    monkeypatch.setattr(estimator_study, "run_fedit", no_training)
    again = ablation.main(micro_argv(data_dir, out))
    assert again["runs"] == first["runs"]


def test_a_cache_file_that_is_not_the_studys_is_one_line(micro, tmp_path, capsys):
    """A cache file of other bytes (a torch pickle of another object, or none at all) is refused in one line
    naming it (safe_files.load_torch_file: weights only, a bounded regular file), not trained over or trusted."""
    data_dir, out, _ = micro
    for i, payload in enumerate([b"not a torch file", None]):
        copy = tmp_path / f"o{i}"
        shutil.copytree(out, copy)
        os.remove(copy / ".lock")
        for cached in (copy / config.ABLATION_CACHE).iterdir():
            if payload is None:
                torch.save({"global": [1, 2]}, cached)
            else:
                cached.write_bytes(payload)
        with pytest.raises(SystemExit) as e:
            ablation.main(micro_argv(data_dir, copy))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and err[-1].startswith("error: the study's cache ") and "(remove it)" in err[-1], err
        assert str(copy / config.ABLATION_CACHE) in err[-1] and not any("Traceback" in line for line in err)


def test_conflict_partition_same_classes_own_labelling():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 10))
    parts, relabel = estimator_study.conflict_partition(labels, 3, 15, classes=5, seed=1)
    flat = np.concatenate(parts)
    assert [len(p) for p in parts] == [15] * 3 and len(np.unique(flat)) == len(flat)
    chosen = np.unique(labels[flat])
    assert len(chosen) <= 5
    for table in relabel:
        outside = np.setdiff1d(np.arange(100), chosen)
        assert np.array_equal(table[outside], outside)  # identity off the chosen classes
    assert len({tuple(t) for t in relabel}) > 1  # the clients label the same inputs differently
    for table in relabel:  # a permutation of the chosen classes onto themselves
        moved = np.flatnonzero(table != np.arange(100))
        assert set(table[moved]) == set(moved)
    with pytest.raises(estimator_study.DataError, match="clients x"):
        estimator_study.conflict_partition(labels, 3, 17, classes=5, seed=1)


def test_goal_and_table_by_hand():
    row = lambda local, fedit, grid, acc: {
        "local": {"acc": local},
        "fedit": {"acc": fedit},
        "uniform": {"acc": 0},
        "grid_val": {"acc": grid},
        "grid_oracle": {"acc": grid},
        "x@val": {"acc": acc, "ratio": acc / grid, "abs_lam_diff": 0.1},
        "lam_grid": 0.3,
        "clients_x_seeds": 5,
    }
    ok, too_low, below_local = row(0.8, 0.5, 0.9, 0.885), row(0.8, 0.5, 0.9, 0.87), row(0.8, 0.5, 0.805, 0.794)
    just_below = row(0.8, 0.5, 0.805, 0.7951)  # 0.0049 below local: within the 0.005 the goal allows
    assert estimator_study.goal_met(ok, "x@val") and not estimator_study.goal_met(too_low, "x@val")
    assert not estimator_study.goal_met(below_local, "x@val")  # 0.986 of the grid, but 0.006 below local
    assert estimator_study.goal_met(just_below, "x@val")
    for r_ in (ok, below_local):
        r_["barrier"] = {"mean": 0.5, "max": 2.0, "clients_above_0.1": 3}
    md = estimator_study.markdown({"a": ok, "b": below_local})
    assert "| 0.983 | no: b |" in md and "0.885 (0.983; 0.10)" in md and "a mean 0.50, max 2.00, 3 clients" in md


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--scenarios", "nope"], "--scenarios"),
        (["--seeds", "x"], "--seeds"),
        (["--estimators", "magic"], "--estimators"),
        (["--rounds", "0"], "--rounds"),
        (
            ["--threads", "100000"],
            f"argument --threads: must be an integer in [1, {os.cpu_count() or 1:,}] (the CPU cores of this machine), "
            "got 100000",
        ),
        (["--seeds", "-3"], "--seeds '-3': expected"),
        (["--out", "/proc/x"], "--out /proc/x: cannot be created or written"),
    ],
)
def test_bad_arguments_fail_in_one_line(tmp_path, capsys, extra, msg):
    with pytest.raises(SystemExit) as e:
        ablation.main(micro_argv(tmp_path / "d", tmp_path / "o", *extra))
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_defaults_per_suite(tmp_path):
    args, _ = ablation.resolve(ablation.build_parser(), ["--out", str(tmp_path), "--data-dir", str(tmp_path)])
    assert args.synthetic_per_class == 500 and args.rounds == 50 and args.seeds == [0, 1, 2]  # run_cifar's data
    assert args.scenarios == ["dirichlet-0.1", "dirichlet-1.0", "fewshot", "superclass", "conflict"]
    real, _ = ablation.resolve(ablation.build_parser(), ["--suite", "real", "--out", str(tmp_path)])
    assert real.seeds == list(range(10)) and real.scenarios == ["conflict", "dirichlet-0.5"]
    assert estimator_study.digits_config(real) == config.DigitsConfig()  # docs/estimator-study.md's table: DigitsConfig
