"""run_cifar.py end to end on micro problems (synthetic CIFAR files, a micro ViT, 2 clients, 2-3 rounds): the
results it writes, resuming (also after SIGKILL) bitwise, unreliable clients, and one-line errors for bad
arguments, data files and --resume states."""

import functools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from urllib.error import URLError

import pytest
import torch
from conftest import MICRO_VIT, PlantedPickle, script_errors
from obstacles import unprivileged
from torchvision.models import VisionTransformer

import data as data_module
import run_cifar
from data import client_splits, public_and_pool, write_synthetic_cifar100
from lora import lora_factor, lora_state_dict
from potara import merge_adapters
from potara_guards.adapter_file import save_adapter
from potara_harness import config, pipeline, vit
from potara_harness.checkpoint import read_run
from potara_harness.evaluation import lam_grid, score_adapter
from potara_harness.report import METHODS

ROUNDS, CLIENTS, RANK, TEST = 2, 2, 2, 10
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- a micro run with the tiny preset
def micro_argv(data_dir, out, *extra):
    return [
        "--data",
        "synthetic",
        "--data-dir",
        str(data_dir),
        "--synthetic-per-class",
        "12",
        "--out",
        str(out),
        "--clients",
        str(CLIENTS),
        "--train",
        "16",
        "--val",
        "8",
        "--test",
        str(TEST),
        "--public",
        "1000",
        "--pretrain-steps",
        "10",
        "--rounds",
        str(ROUNDS),
        "--local-steps",
        "2",
        "--local-train-steps",
        "3",
        "--finetune-steps",
        "2",
        "--fisher-samples",
        "8",
        "--batch-size",
        "8",
        "--rank",
        str(RANK),
        "--lora-alpha",
        "4",
        "--grid-step",
        "0.25",
        "--snapshots",
        "2",
        "--threads",
        "1",
        "--no-progress",
        *extra,
    ]


pytestmark = pytest.mark.usefixtures("micro_preset")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def micro_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(config.VIT_PRESETS["tiny"], "vit", MICRO_VIT)
        results = run_cifar.main(micro_argv(data_dir, out))
    return out, results


def test_results_json_structure_and_sanity(micro_run):
    out, returned = micro_run
    for name in ("results.json", "results.md", "checkpoint.pt"):
        assert (out / name).is_file()
    r = json.loads((out / "results.json").read_text())
    assert r["methods"].keys() == set(METHODS) and r["clients"] == ["client0", "client1"]
    assert r["config"]["synthetic_data"] is True and r["seed"] == 0
    assert r["methods"]["potara_ab"]["mean"] == returned["methods"]["potara_ab"]["mean"]
    grid = lam_grid(0.25)
    for m, res in r["methods"].items():
        accs = list(res["per_client"].values())
        assert len(accs) == CLIENTS and all(0 <= a <= 1 for a in accs)
        assert all(abs(a * TEST - round(a * TEST)) < 1e-9 for a in accs)  # a count of correct test images
        assert abs(res["mean"] - sum(accs) / CLIENTS) < 1e-12
    for name, c in r["per_client"].items():
        p = c["potara"]
        assert 0 <= p["lam"] <= 1 and c["lam_potara"] == p["lam"]
        assert c["lam_grid_val"] in grid and c["lam_grid_oracle"] in grid and c["grid"]["lam"] == grid
        assert c["abs_lam_diff"] == pytest.approx(abs(p["lam"] - c["lam_grid_val"]))
        test_curve, acc = c["grid"]["test"], {m: r["methods"][m]["per_client"][name] for m in METHODS}
        # the same adapters reached by two routes: the grid's end points and midpoint are three methods
        assert acc["local"] == test_curve[0] and acc["fedit"] == test_curve[-1] and acc["uniform"] == test_curve[2]
        assert acc["grid_oracle"] == max(test_curve) >= acc["grid_val"] == test_curve[grid.index(c["lam_grid_val"])]
        val_best = max(c["grid"]["val"])
        assert c["grid"]["val"][grid.index(c["lam_grid_val"])] == val_best


def test_potara_scores_are_the_merges_at_its_lam_rescored_from_the_checkpoint(micro_run, data_dir):
    """Rebuild the clients, the model and the two adapters from the run's files and score the A/B and delta
    merges at the reported lam: they must give the reported Potara accuracies."""
    out, r = micro_run
    ap = run_cifar.build_parser()
    args, p = run_cifar.resolve_args(ap, micro_argv(data_dir, out))
    data = run_cifar.load_data(args)
    public, pool = public_and_pool(len(data.labels), args.public)
    splits = client_splits(
        data.images,
        data.labels,
        pool,
        run_cifar.partition(ap, args, data, pool),
        (args.train, args.val, args.test),
        args.seed,
    )
    backbone, _ = run_cifar.get_backbone(args, p, data, public, torch.device("cpu"))
    model = vit.build_model(backbone, p, args.rank, args.lora_alpha, args.seed)
    init, ck = lora_state_dict(model), read_run(str(out))
    G = ck["fedit"]["global_state"]
    for s in splits:
        lam = r["per_client"][s.name]["lam_potara"]
        for space in ("ab", "delta"):
            got = score_adapter(
                model, merge_adapters(G, ck["local"][s.name], lam, space), init, s.test_inputs, s.test_targets
            )
            assert got == r["methods"][f"potara_{space}"]["per_client"][s.name], (s.name, space)


def test_byte_counts_follow_from_adapter_sizes(micro_run):
    """FedIT sends the whole adapter both ways to every participant every round; FedSA-LoRA only the A factors."""
    r = json.loads((micro_run[0] / "results.json").read_text())
    D, L, classes = MICRO_VIT["hidden_dim"], MICRO_VIT["num_layers"], 100
    lora_a = L * 2 * RANK * D * 4  # q and v A factors (r x D), float32, per layer
    adapter = 2 * lora_a + (D * classes + classes) * 4  # + the B factors (D x r) + the new head
    assert r["adapter"]["bytes"] == adapter and r["adapter"]["fedsa_shared_bytes"] == lora_a
    fedit = ROUNDS * CLIENTS * 2 * adapter
    for m, res in r["methods"].items():
        assert res["bytes"] == {"local": 0, "fedsa": ROUNDS * CLIENTS * 2 * lora_a}.get(m, fedit), m
    curve = r["communication"]
    assert [p["round"] for p in curve] == [0, 1, 2]
    assert [p["bytes"] for p in curve] == [0, fedit // 2, fedit]
    assert (
        curve[-1]["fedit"] == r["methods"]["fedit"]["mean"] and curve[-1]["potara"] == r["methods"]["potara_ab"]["mean"]
    )


def test_interrupted_run_resumes_to_the_same_result(micro_run, data_dir, tmp_path, same):
    out_a, _ = micro_run
    out_b = tmp_path / "b"

    def interrupt(stage, state):
        if stage == "fedit" and state.round == 1:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "run_experiment", functools.partial(pipeline.run_experiment, on_round=interrupt))
        with pytest.raises(KeyboardInterrupt):
            run_cifar.main(micro_argv(data_dir, out_b))
    ck = torch.load(out_b / "checkpoint.pt", weights_only=True)
    assert ck["fedit"]["round"] == 1 and not (out_b / "results.json").exists()

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            pipeline,
            "run_experiment",
            functools.partial(pipeline.run_experiment, on_round=lambda stage, state: seen.append((stage, state.round))),
        )
        run_cifar.main(micro_argv(data_dir, out_b, "--resume"))
    assert seen == [("fedit", 2), ("fedsa", 1), ("fedsa", 2)]  # FedIT went on from its checkpoint
    a, b = (json.loads((o / "results.json").read_text()) for o in (out_a, out_b))
    for key in ("methods", "per_client", "communication", "fedit_history", "fedsa_history", "adapter"):
        assert a[key] == b[key], key
    ck_a, ck_b = (read_run(str(o)) for o in (out_a, out_b))
    for key in ("fedit", "fedsa", "snapshots", "local", "finetuned"):
        assert same(ck_a[key], ck_b[key]), key


def test_resume_checks_training_settings_and_reevaluates_other_options(micro_run, data_dir, tmp_path):
    out_a, _ = micro_run
    out_c = tmp_path / "c"
    shutil.copytree(out_a, out_c)
    with pytest.raises(SystemExit, match=r"other local-train-steps \(3 there, 4 now\); rerun"):
        run_cifar.main(micro_argv(data_dir, out_c, "--resume", "--local-train-steps", "4"))
    with pytest.raises(SystemExit, match=r"other LoRA rank/alpha \(r=2 alpha=4 there, r=2 alpha=1000 now\); rerun"):
        run_cifar.main(micro_argv(data_dir, out_c, "--resume", "--lora-alpha", "1000"))  # no tensor: apart
    # Potara's options are not training settings: the trained adapters are reused, only evaluation reruns
    r = run_cifar.main(micro_argv(data_dir, out_c, "--resume", "--estimator", "paper", "--eps", "0.1"))
    a = json.loads((out_a / "results.json").read_text())
    for m in ("local", "fedit", "fedit_ft", "fedsa", "uniform", "grid_val"):
        assert r["methods"][m] == a["methods"][m], m
    assert all(c["potara"]["eps"] == 0.1 for c in r["per_client"].values())


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--clients", "0"], "argument --clients: must be an integer in [1, 100,000], got 0"),
        (["--alpha", "0"], "argument --alpha: must be a number in (0, 1e+06]"),
        (["--alpha", "-0.5"], "argument --alpha: must be a number in (0, 1e+06]"),
        (["--lr", "nan"], "argument --lr: must be a number in (0, 10]"),
        (["--rounds", "-1"], "argument --rounds: must be an integer in [1, 100,000]"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--grid-step", "0.3"], "--grid-step must be 1/n"),
        (["--clients-per-round", "3"], "--clients-per-round must be <= --clients (2), got 3"),
        (["--fisher-samples", "17"], "--fisher-samples 17 exceeds the client's val split"),
        (["--estimator", "verified", "--granularity", "module"], "gives one weight per client"),
        (["--estimator", "nope"], "--estimator must be one of"),
        (["--partition", "superclass", "--clients", "21"], "--clients must be <= 20"),
        (["--backbone", "/nonexistent/backbone.pt"], "no such file"),
        (["--public", "500"], "--public >= 1000"),
        (
            ["--clients", "20", "--train", "10"],
            "20 clients x 28 images (--train + --val + --test) + 1000 public images > the synthetic set's "
            "(--synthetic-per-class 12) 1,200 training images",
        ),
    ],
)
def test_cli_rejects_bad_arguments(extra, msg, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cifar.main(micro_argv(data_dir, tmp_path / "x", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg in err, err


def test_offline_errors_are_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise URLError("no network")

    monkeypatch.setattr(
        "torchvision.datasets.utils.download_and_extract_archive", offline
    )  # data.py imports it when it fetches
    with pytest.raises(SystemExit) as e:
        run_cifar.main(["--data", "cifar", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "1"])
    assert "CIFAR-100 not found under" in str(e.value) and "--data synthetic" in str(e.value)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- a micro backbone file (--backbone), 3
# rounds
REL_ROUNDS = 3


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A data dir with the synthetic CIFAR files run_cifar would write, and a micro backbone file."""
    root = tmp_path_factory.mktemp("rel")
    write_synthetic_cifar100(str(root / "data" / "synthetic"), 12, 12 // 5)
    torch.manual_seed(0)
    vit = VisionTransformer(**MICRO_VIT, num_classes=100)
    torch.save(
        {
            "format": "potara-backbone-v1",
            "vit": {**MICRO_VIT, "num_classes": 100},
            "state_dict": vit.state_dict(),
            "info": {},
        },
        root / "micro.pt",
    )
    return root


def argv(micro, out, *extra):
    return [
        "--data",
        "synthetic",
        "--data-dir",
        str(micro / "data"),
        "--synthetic-per-class",
        "12",
        "--backbone",
        str(micro / "micro.pt"),
        "--public",
        "0",
        "--out",
        str(out),
        "--clients",
        str(CLIENTS),
        "--train",
        "16",
        "--val",
        "8",
        "--test",
        "10",
        "--rounds",
        str(REL_ROUNDS),
        "--local-steps",
        "2",
        "--local-train-steps",
        "3",
        "--finetune-steps",
        "2",
        "--fisher-samples",
        "8",
        "--batch-size",
        "8",
        "--rank",
        "2",
        "--lora-alpha",
        "4",
        "--grid-step",
        "0.25",
        "--snapshots",
        str(REL_ROUNDS),
        "--threads",
        "1",
        "--seed",
        "1",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(micro):
    """The uninterrupted run (in this process)."""
    out = micro / "reference"
    threads = torch.get_num_threads()
    run_cifar.main(argv(micro, out))
    torch.set_num_threads(threads)
    return out


def load_results(out):
    r = json.loads((out / "results.json").read_text())
    r.pop("timing_s")
    r["config"]["args"].pop("out")
    r["config"].pop("command")  # names --out (and --resume)
    return r


def file_version(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns  # os.replace: a new file each write
    except FileNotFoundError:
        return None


def run_and_kill(cmd, when, log):
    """Start cmd, SIGKILL it as soon as when() is true (polled every 2 ms)."""
    deadline = time.time() + 120
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while not when():
                assert proc.poll() is None, f"the run ended before it was killed: {open(log).read()[-2000:]}"
                assert time.time() < deadline, "the kill's moment did not come in 120 s"
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def writes_of(path, count):
    """A when() for run_and_kill: true once `path` has been (re)written `count` times from now."""
    seen = {"n": 0, "last": file_version(path)}

    def when():
        now = file_version(path)
        if now is not None and now != seen["last"]:
            seen["n"], seen["last"] = seen["n"] + 1, now
        return seen["n"] >= count

    return when


def test_sigkill_in_each_stage_then_resume_is_bitwise_equal_to_an_uninterrupted_run(micro, reference, tmp_path, same):
    """SIGKILL in FedIT, in FedSA-LoRA, in the local adapters, in the evaluation; each time --resume goes on from
    what was written (whatever instant the kill hit, every file is complete or absent), and the last one ends with
    the files and results of the uninterrupted run, bitwise."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "run_cifar.py", *argv(micro, out)]
    ckpt, parts = out / "checkpoint.pt", out / "adapters"
    made = lambda: sorted(p.name for p in parts.glob("*.pt")) if parts.is_dir() else []
    clients = [f"{kind}-{i:04d}.pt" for kind in ("finetuned", "local") for i in range(CLIENTS)]
    run_and_kill(cmd, writes_of(ckpt, 2), tmp_path / "err1")  # the run's start + FedIT round 1
    first = torch.load(ckpt, weights_only=True)
    assert 1 <= first["fedit"]["round"] < REL_ROUNDS and first["fedsa"] is None
    run_and_kill(cmd + ["--resume"], writes_of(ckpt, REL_ROUNDS - first["fedit"]["round"] + 1), tmp_path / "err2")
    second = torch.load(ckpt, weights_only=True)
    assert second["fedit"]["round"] == REL_ROUNDS and 1 <= second["fedsa"]["round"] < REL_ROUNDS
    run_and_kill(cmd + ["--resume"], lambda: (parts / "local-0000.pt").exists(), tmp_path / "err3")
    assert "local-0000.pt" in made() and not set(clients) <= set(made())  # killed among the local adapters
    run_and_kill(cmd + ["--resume"], lambda: set(clients) <= set(made()), tmp_path / "err4")
    assert not (out / "results.json").exists()  # killed in the evaluation
    (out / "checkpoint.pt.tmp999999").write_bytes(b"a partial write left by a killed process")
    (parts / "local-0001.pt.tmp999999").write_bytes(b"a partial write left by a killed process")
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    assert load_results(out) == load_results(reference)
    ck, ref = read_run(str(out)), read_run(str(reference))
    for key in ("fedit", "fedsa", "snapshots", "local", "finetuned", "fallbacks"):
        assert same(ck[key], ref[key]), key


def test_a_missing_snapshot_or_a_part_of_another_run_is_refused_at_resume(micro, reference, tmp_path):
    """An edited checkpoint (--rounds 4 --snapshots 2 without the snapshot of round 2: once a bare KeyError in the
    communication curve after all the evaluation) and a client's adapter file of another run:
    refused when loading, in one line, exit 2, nothing written."""
    out = tmp_path / "four"
    run_cifar.main(argv(micro, out, "--rounds", "4", "--snapshots", "2"))
    os.remove(out / "results.json")
    cases = [
        (
            lambda: shutil.copy(reference / "adapters" / "local-0000.pt", out / "adapters" / "local-0000.pt"),
            "local-0000.pt is damaged, edited or another run's (a part of another run)",
        ),
        (lambda: os.remove(out / "adapters" / "snapshot-0002.pt"), "the snapshot of round 2 is missing"),
    ]
    for make, msg in cases:
        make()
        with pytest.raises(SystemExit) as e:
            run_cifar.main(argv(micro, out, "--rounds", "4", "--snapshots", "2", "--resume"))
        assert e.value.code == 2 and msg in str(e.value) and "\n" not in str(e.value), str(e.value)
        assert not (out / "results.json").exists()


def test_damaged_synthetic_files_and_marker_are_handled(tmp_path, capsys, micro):
    root = tmp_path / "data"
    syn = root / "synthetic"
    write_synthetic_cifar100(str(syn), 12, 2)
    folder = syn / "cifar-100-python"
    (folder / data_module.SYNTHETIC_MARKER).write_text('{"train_per_')  # a truncated marker: rewritten
    write_synthetic_cifar100(str(syn), 12, 2)
    assert json.loads((folder / data_module.SYNTHETIC_MARKER).read_text())["train_per_class"] == 12
    entry = pickle.loads((folder / "train").read_bytes())
    entry["fine_labels"][0] = 150  # an edited file with a label the 100-way head cannot have
    (folder / "train").write_bytes(pickle.dumps(entry))
    args = argv(micro, tmp_path / "o")
    args[args.index("--data-dir") + 1] = str(root)
    with pytest.raises(SystemExit) as e:
        run_cifar.main(args)
    assert "'fine_labels' must be 1200 integers in [0, 100)" in str(e.value) and "\n" not in str(e.value)
    (folder / "train").write_bytes((folder / "train").read_bytes()[:1000])  # truncated
    with pytest.raises(SystemExit) as e:
        run_cifar.main(args)
    assert "is unreadable" in str(e.value) and "delete the folder to write it again" in str(e.value)


def test_drop_prob_reaches_history_bytes_and_summary(micro, tmp_path, capsys):
    out = tmp_path / "drop"
    r = run_cifar.main(argv(micro, out, "--drop-prob", "0.5"))
    printed = capsys.readouterr().out
    saved = json.loads((out / "results.json").read_text())
    adapter, shared_a = saved["adapter"]["bytes"], saved["adapter"]["fedsa_shared_bytes"]
    for key, size in (("fedit_history", adapter), ("fedsa_history", shared_a)):
        for h in saved[key]:
            assert set(h["dropped"]) <= set(h["clients"]) and h["rejected"] == []
            assert h["bytes_down"] == len(h["clients"]) * size  # sent to every selected client
            assert h["bytes_up"] == (len(h["clients"]) - len(h["dropped"])) * size  # only what came back
    dropped = sum(len(h["dropped"]) for h in saved["fedit_history"])
    assert 0 < dropped < REL_ROUNDS * CLIENTS  # seed 1: some client-rounds dropped, not all
    sent = sum(h["bytes_down"] + h["bytes_up"] for h in saved["fedit_history"])
    assert saved["methods"]["fedit"]["bytes"] == sent < 2 * REL_ROUNDS * CLIENTS * adapter
    assert saved["faults"]["drop_prob"] == 0.5 and saved["faults"]["fedit"]["dropped"] == dropped
    assert f"faults: FedIT: {dropped} client-rounds dropped, 0 updates rejected" in printed
    assert r["faults"] == saved["faults"]


def test_max_update_norm_rejects_and_keeps_the_global_adapter(micro, tmp_path, capsys, caplog):
    out = tmp_path / "norm"
    with caplog.at_level("WARNING", logger="fed"):
        run_cifar.main(argv(micro, out, "--max-update-norm", "1e-9"))
    assert "rejected the update of client client0" in caplog.text
    saved = json.loads((out / "results.json").read_text())
    for key in ("fedit_history", "fedsa_history"):
        for h in saved[key]:
            if key == "fedsa_history" and h["round"] == 0:
                # FedSA shares only A; from B = 0 and a zero head, A's gradient is 0 for the first 2 local steps:
                # its update equals phi^0 (norm 0 <= the bound) and is accepted
                assert h["rejected"] == []
                continue
            assert [x["client"] for x in h["rejected"]] == h["clients"] and h["mean_train_loss"] is None
            assert all("exceeds max_update_norm 1e-09" in x["reason"] for x in h["rejected"])
            assert h["bytes_up"] > 0  # rejected updates were still sent
    rejected = saved["faults"]["fedit"]["rejected"]
    assert [(x["round"], x["client"]) for x in rejected] == [
        (t, f"client{k}") for t in range(REL_ROUNDS) for k in range(CLIENTS)
    ]
    G = torch.load(out / "checkpoint.pt", weights_only=True)["fedit"]["global_state"]
    for k, v in G.items():  # still phi_0: LoRA B = 0 and the new head = 0; only the A factors are non-zero
        assert (v.abs().sum() > 0) == (lora_factor(k) == "A"), k
    assert f"0 client-rounds dropped, {REL_ROUNDS * CLIENTS} updates rejected" in capsys.readouterr().out


def test_bad_resume_states_fail_in_one_line(micro, reference, tmp_path):
    good = torch.load(reference / "checkpoint.pt", weights_only=True)
    out = tmp_path / "r"
    shutil.copytree(reference, out)
    os.remove(out / "results.json")
    ckpt, local = out / "checkpoint.pt", out / "adapters" / "local-0000.pt"
    marker = tmp_path / "pwned"
    part = torch.load(local, weights_only=True)
    nan = {**part, "adapter": {k: v * float("nan") for k, v in part["adapter"].items()}}
    wide = {**part, "adapter": {k: v.double() for k, v in part["adapter"].items()}}
    back = {**good, "fedit": {**good["fedit"], "round": -3}}
    cases = [
        (lambda: ckpt.write_bytes((reference / "checkpoint.pt").read_bytes()[:4000]), "is unreadable (truncated"),
        (lambda: torch.save({"some": torch.ones(2)}, ckpt), "is not a potara experiment checkpoint"),
        (lambda: save_adapter(ckpt, {"w": torch.ones(2)}), "is not a potara experiment checkpoint"),
        (lambda: torch.save({**good, "fedit": PlantedPickle(str(marker))}, ckpt), "unsafe"),
        (lambda: torch.save(good, ckpt) or torch.save(nan, local), "holds NaN or Inf values"),
        (lambda: torch.save(wide, local), "has dtype torch.float64, expected torch.float32"),
        (
            lambda: torch.save(part, local) or torch.save({**part, "adapter": PlantedPickle(str(marker))}, local),
            "unsafe",
        ),
        (lambda: torch.save(part, local) or torch.save(back, ckpt), "fedit: round -3 is not a count in [0, 3]"),
        (lambda: torch.save(good, ckpt), "other drop-prob (0.0 there, 0.3 now); rerun"),  # another --drop-prob
    ]
    for i, (make, msg) in enumerate(cases):
        make()
        extra = ["--drop-prob", "0.3"] if i == len(cases) - 1 else []
        with pytest.raises(SystemExit) as e:
            run_cifar.main(argv(micro, out, "--resume", *extra))
        assert msg in str(e.value) and "\n" not in str(e.value), (i, str(e.value))
        assert not (out / "results.json").exists()
    assert not marker.exists()


@pytest.mark.parametrize(
    "extra, msg",
    [
        (["--seed", "-1"], "argument --seed: must be an integer in [0, "),
        (["--seed", "1e29"], "argument --seed: must be an integer in [0, 9,223,372,036,854,775,807], got 1e29"),
        (["--seed", str(10**29)], "argument --seed: must be an integer in [0, 9,223,372,036,854,775,807]"),
        (["--threads", "1000"], f"argument --threads: must be an integer in [1, {os.cpu_count() or 1:,}]"),
        (["--drop-prob", "1"], "argument --drop-prob: must be a number in [0, 1)"),
        (["--drop-prob", "-0.1"], "argument --drop-prob: must be a number in [0, 1)"),
        (["--drop-prob", "nan"], "argument --drop-prob: must be a number in [0, 1)"),
        (["--max-update-norm", "nan"], "argument --max-update-norm: must be a number in [0, 1e+12]"),
        (["--max-update-norm", "-2"], "argument --max-update-norm: must be a number in [0, 1e+12]"),
        (["--max-update-norm", "inf"], "argument --max-update-norm: must be a number in [0, 1e+12]"),
        (["--train", "-3"], "argument --train: must be an integer in [1, "),
        (["--test", "0"], "argument --test: must be an integer in [1, "),
        (["--local-steps", "0"], "argument --local-steps: must be an integer in [1, "),
        (["--batch-size", "0"], "argument --batch-size: must be an integer in [1, 65,536]"),
        (["--rank", "0"], "argument --rank: must be an integer in [1, 4,096]"),
        (["--threads", "0"], "argument --threads: must be an integer in [1, "),
        (["--public", "-1"], "argument --public: must be an integer in [0, "),
        (["--snapshots", "-1"], "argument --snapshots: must be an integer in [0, "),
        (["--lora-alpha", "0"], "argument --lora-alpha: must be a number in (0, "),
        (["--eps", "-0.001"], "argument --eps: must be a number in (0, "),
        (["--lr", "inf"], "argument --lr: must be a number in (0, 10]"),
        (["--grid-step", "0"], "argument --grid-step: must be a number in (0, 1]"),
        (["--synthetic-per-class", "3"], "argument --synthetic-per-class: must be an integer in [5, 3,000], got 3"),
        (["--clients", "50"], "50 clients x 34 images (--train + --val + --test) + 0 public images > the synthetic"),
        (["--partition", "nope"], "invalid choice: 'nope'"),
        (["--rounds", "x"], "argument --rounds: must be an integer in [1, 100,000], got x"),
    ],
)
def test_cli_rejects_bad_fault_and_size_arguments(extra, msg, micro, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cifar.main(argv(micro, tmp_path / "x", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg in err, err


# ----------------------------------------------------------------------------- the first minutes: each mistake
class _Stopped(BaseException):
    """Raised where FedIT would begin (BaseException: no handler of the script's turns it into an exit code)."""


def without_snapshots(args: list[str]) -> list[str]:
    """The arguments with --snapshots (and its value) left out: its default, 4."""
    i = args.index("--snapshots")
    return args[:i] + args[i + 2 :]


@pytest.fixture(scope="module")
def stopped_run(micro):
    """--out of a run stopped where FedIT begins (checkpoint.pt written, nothing trained), with --rounds 2 and the
    default --snapshots (4), as a user who then asks for --rounds 3 --resume left it."""
    out = micro / "stopped"

    def stop(*args, **kwargs):
        raise _Stopped

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "federated_training", stop)
        with pytest.raises(_Stopped):
            run_cifar.main(without_snapshots(argv(micro, out, "--rounds", "2")))
    torch.set_num_threads(threads)
    assert (out / "checkpoint.pt").is_file()
    return out


CIFAR_MISTAKES = {  # name: (arguments, what the one line says)
    "a number that is no number": (
        ["--clients", "abc"],
        "argument --clients: must be an integer in [1, 100,000], got abc",
    ),
    "a number out of range": (["--clients", "0"], "argument --clients: must be an integer in [1, 100,000], got 0"),
    "a size below its range": (
        ["--synthetic-per-class", "3"],
        "argument --synthetic-per-class: must be an integer in [5, 3,000], got 3",
    ),
    "a size that is no number": (
        ["--synthetic-per-class", "x"],
        "argument --synthetic-per-class: must be an integer in [5, 3,000], got x",
    ),
    "threads beyond the cores": (
        ["--threads", "100000"],
        f"argument --threads: must be an integer in [1, {os.cpu_count() or 1:,}] (the CPU cores of this machine)",
    ),
    "split sizes, synthetic data": (
        ["--clients", "50"],
        "error: 50 clients x 700 images (--train + --val + --test) + 30000 public images > the synthetic set's "
        "(--synthetic-per-class 500) 50,000 training images",
    ),
    "split sizes, CIFAR-100 (before its download)": (
        ["--data", "cifar", "--clients", "100"],
        "error: 100 clients x 700 images (--train + --val + --test) + 30000 public images > CIFAR-100's 50,000",
    ),
    "a backbone path": (
        ["--backbone", "/nonexistent/backbone.pt"],
        "error: --backbone /nonexistent/backbone.pt: no such file",
    ),
    "a resume with other rounds": (
        ["RESUME"],
        "checkpoint.pt was written by a run with other rounds (2 there, 3 now); rerun with the same arguments",
    ),
    "a directory where a part goes": (
        ["DIR-PART"],
        "-dir-part: adapters/local-0000.pt in it is not a regular file (a directory): move it away",
    ),
}


@pytest.mark.parametrize("mistake", list(CIFAR_MISTAKES))
def test_each_mistake_is_one_line_naming_its_cause_before_any_work(mistake, micro, stopped_run, tmp_path):
    """run_cifar.py in a fresh process with nothing cached (a new --data-dir): each mistake is exit 2 and one line on
    stderr naming it, nothing downloaded, written or pre-trained (--data-dir never made). --clients abc and 0 gave
    two ranges; the images the clients ask for were counted after the data was loaded (for CIFAR-100, after its
    download); --rounds 3 --resume named rounds and snapshots. (Its time to the error is measured, not asserted.)"""
    args, says = CIFAR_MISTAKES[mistake]
    data_dir = tmp_path / "data"
    plain = ["--data-dir", str(data_dir), "--out", str(tmp_path / "out"), "--threads", "1", "--no-progress"]
    if args == ["RESUME"]:  # the stopped run's own arguments, but --rounds 3 and its --data-dir a new one
        argv_ = without_snapshots(argv(micro, stopped_run, "--rounds", "3", "--resume", "--data-dir", str(data_dir)))
    elif args == ["DIR-PART"]:  # a run folder whose adapters/local-0000.pt is a directory, no --resume
        shutil.copytree(stopped_run, tmp_path / "run-dir-part")
        (tmp_path / "run-dir-part" / "adapters" / "local-0000.pt").mkdir(parents=True)
        argv_ = plain + ["--out", str(tmp_path / "run-dir-part")]
    else:
        argv_ = plain + args
    status, lines = script_errors("run_cifar.py", argv_)
    assert status == 2 and len(lines) == 1 and says in lines[0], (mistake, lines)
    assert "snapshots" not in lines[0] and not data_dir.exists(), (mistake, lines)


def test_cli_rejects_unusable_directories(micro, tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for flag, path, msg in (
        ("--out", a_file, "exists and is not a directory"),
        ("--data-dir", a_file, "exists and is not a directory"),
        ("--out", a_file / "sub", f"cannot be created ({a_file} is a file)"),
    ):
        args = argv(micro, tmp_path / "o")
        args[args.index(flag) + 1] = str(path)
        with pytest.raises(SystemExit):
            run_cifar.main(args)
        assert msg in capsys.readouterr().err.strip().splitlines()[-1]
    # an unreadable --data-dir, a --out under a folder no one may write (real permissions, as root too)
    for flag, folder, msg in (
        ("--data-dir", micro / "data", "permission denied"),
        ("--out", tmp_path, f"({tmp_path} is not writable)"),
    ):
        mode = folder.stat().st_mode
        folder.chmod(0o300 if flag == "--data-dir" else 0o555)
        try:
            with pytest.raises(SystemExit):
                unprivileged(run_cifar.main, argv(micro, tmp_path / "missing" / "o"))
        finally:
            folder.chmod(mode)
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag} " in err and msg in err, err


# ----------------------------------------------------------------------------- hostile backbones, busy --out
def test_a_nan_or_edited_backbone_is_refused_and_a_flipped_one_is_another_model(micro, reference, tmp_path, capsys):
    obj = torch.load(micro / "micro.pt", weights_only=True)
    w = "encoder.layers.encoder_layer_0.self_attention.out_proj.weight"
    for i, (edit, msg) in enumerate(
        [
            (lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), f"{w} holds NaN or Inf values"),
            (lambda t: t.to(torch.complex64), "has dtype torch.complex64, expected torch.float32"),
        ]
    ):
        bad = tmp_path / f"bad{i}.pt"
        torch.save({**obj, "state_dict": {**obj["state_dict"], w: edit(obj["state_dict"][w])}}, bad)
        args = argv(micro, tmp_path / f"o{i}")
        args[args.index("--backbone") + 1] = str(bad)
        with pytest.raises(SystemExit) as e:
            run_cifar.main(args)
        assert e.value.code == 2 and msg in capsys.readouterr().err.strip().splitlines()[-1]
        assert not (tmp_path / f"o{i}" / "checkpoint.pt").exists()
    flipped = tmp_path / "flipped.pt"  # same per-tensor sums as micro.pt, so the old fingerprint could not tell
    torch.save({**obj, "state_dict": {**obj["state_dict"], w: obj["state_dict"][w].flip(0)}}, flipped)
    out = tmp_path / "resumed"
    shutil.copytree(reference, out)
    args = argv(micro, out, "--resume")
    args[args.index("--backbone") + 1] = str(flipped)
    with pytest.raises(SystemExit) as e:
        run_cifar.main(args)
    assert e.value.code == 2 and "other model (backbone or initial adapter)" in capsys.readouterr().err


def test_a_second_run_on_the_same_out_is_refused(micro, tmp_path, capsys):
    from potara_harness import run_folder

    out = tmp_path / "busy"
    out.mkdir()
    with run_folder.out_dir_lock(str(out)):  # a run holding --out (another process behaves the same: flock)
        with pytest.raises(SystemExit) as e:
            run_cifar.main(argv(micro, out))
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written by the refused run
    assert e.value.code == 2 and "is in use by another run" in capsys.readouterr().err
    assert os.listdir(out) == []  # the holder wrote nothing either: its lock went with it


def test_planted_cifar_pickles_run_nothing_with_data_cifar(micro, tmp_path, capsys):
    """End to end: train/test/meta pickles whose unpickling would create a file, beside an empty
    synthetic marker (which switches off the md5 checks): exit 2 in one line, the file is never created."""
    evidence = tmp_path / "evidence"
    folder = tmp_path / "d" / "cifar-100-python"
    folder.mkdir(parents=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": PlantedPickle(str(evidence))}))
    (folder / data_module.SYNTHETIC_MARKER).write_text("{}")
    args = argv(micro, tmp_path / "o")
    args[args.index("--data") + 1] = "cifar"
    args[args.index("--data-dir") + 1] = str(tmp_path / "d")
    with pytest.raises(SystemExit) as e:
        run_cifar.main(args)
    assert not evidence.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "refused to unpickle io.open" in err[0], err


# ----------------------------------------------------------------------------- what a log and results.md hold
def test_a_log_gets_one_line_per_stage_not_a_bar_per_step(micro, tmp_path):
    """stderr to a file (not a terminal), progress on: at most one short line per stage (FedIT, FedSA-LoRA, local
    training, evaluation, communication curve), where bars redrawn per step of 10 rounds x 2 clients x 5 steps
    and of every local training filled the log."""
    cmd = [
        c
        for c in argv(micro, tmp_path / "out", "--rounds", "10", "--snapshots", "2", "--local-steps", "5")
        if c != "--no-progress"
    ]
    with open(tmp_path / "err.log", "wb") as err:
        subprocess.run(
            [sys.executable, "run_cifar.py", *cmd],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            check=True,
            timeout=600,
        )
    log = (tmp_path / "err.log").read_text()
    lines = log.splitlines()
    assert "\r" not in log and len(lines) <= 5 and all(len(line) < 80 for line in lines), log[:2000]
    assert any(line.startswith("FedIT") for line in lines) and any("FedSA" in line for line in lines), log


def test_no_progress_writes_nothing_and_a_log_gets_the_stage_line(capsys):
    """fed.progress_bar: progress=False is silent, stage or not; progress on, not a terminal: one line."""
    from fed import progress_bar

    list(progress_bar(range(3), "FedIT rounds", progress=False, stage=True))
    assert capsys.readouterr().err == ""
    list(progress_bar(range(3), "FedIT rounds", progress=True, stage=True))  # pytest's stderr: not a terminal
    assert capsys.readouterr().err == "FedIT rounds: 0/3\n"


def test_results_md_names_its_data_and_command(micro, reference):
    """results.md starts with what the data was and the command that made it (a shared file says what it is)."""
    md = (reference / "results.md").read_text()
    expected_command = " ".join(["python", "run_cifar.py", *argv(micro, reference)])
    assert md.startswith("Data: SYNTHETIC DATA (not CIFAR-100)")
    assert f"Command: `{expected_command}`" in md.split("| method |")[0]
    config = json.loads((reference / "results.json").read_text())["config"]
    assert config["command"] == expected_command and config["data_source"].startswith("SYNTHETIC DATA")


def test_the_default_data_is_the_offline_synthetic_set(tmp_path, monkeypatch):
    """No --data: the embedded synthetic stand-in (the README's first command runs offline); --data cifar is
    the real set, and its output folder says so."""
    ap = run_cifar.build_parser()
    args, _ = run_cifar.resolve_args(ap, ["--out", str(tmp_path / "o"), "--data-dir", str(tmp_path)])
    assert args.data == "synthetic"
    assert run_cifar.data_source(args).startswith("SYNTHETIC DATA (not CIFAR-100)")
    args, _ = run_cifar.resolve_args(ap, ["--data", "cifar", "--data-dir", str(tmp_path), "--out", str(tmp_path / "c")])
    assert run_cifar.data_source(args).startswith("CIFAR-100 (real)")
    monkeypatch.chdir(tmp_path)  # the default --out is made under the current folder
    args, _ = run_cifar.resolve_args(ap, ["--data-dir", str(tmp_path)])
    assert args.out == os.path.join("runs", "tiny-synthetic-dirichlet-k5-s0")
