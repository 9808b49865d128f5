"""The whole CLI path on a micro problem: synthetic CIFAR files, a shrunk tiny ViT, 2 clients, 2 rounds."""
import functools
import json
import os
import shutil
from urllib.error import URLError

import pytest
import torch

import run_cifar
import vit
from pipeline import METHODS, lam_grid

from conftest import MICRO_VIT
ROUNDS, CLIENTS, RANK, TEST = 2, 2, 2, 10


def micro_argv(data_dir, out, *extra):
    return ["--data", "synthetic", "--data-dir", str(data_dir), "--synthetic-per-class", "12", "--out", str(out),
            "--clients", str(CLIENTS), "--train", "16", "--val", "8", "--test", str(TEST), "--public", "1000",
            "--pretrain-steps", "10", "--rounds", str(ROUNDS), "--local-steps", "2", "--local-train-steps", "3",
            "--finetune-steps", "2", "--fisher-samples", "8", "--batch-size", "8", "--rank", str(RANK),
            "--lora-alpha", "4", "--grid-step", "0.25", "--snapshots", "2", "--threads", "1", "--no-progress", *extra]


pytestmark = pytest.mark.usefixtures("micro_preset")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def micro_run(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(vit.PRESETS["tiny"], "vit", MICRO_VIT)
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
        assert 0 <= p["lam"] <= 1 and 0 <= p["c"] <= min(p["a"], p["b"])
        assert p["lam"] == pytest.approx((p["b"] - p["c"]) / (p["a"] + p["b"] - 2 * p["c"]))
        assert c["lam_grid_val"] in grid and c["lam_grid_oracle"] in grid and c["grid"]["lam"] == grid
        assert c["abs_lam_diff"] == pytest.approx(abs(p["lam"] - c["lam_grid_val"]))
        test_curve, acc = c["grid"]["test"], {m: r["methods"][m]["per_client"][name] for m in METHODS}
        # the same adapters reached by two routes: the grid's end points and midpoint are three methods
        assert acc["local"] == test_curve[0] and acc["fedit"] == test_curve[-1] and acc["uniform"] == test_curve[2]
        assert acc["grid_oracle"] == max(test_curve) >= acc["grid_val"] == test_curve[grid.index(c["lam_grid_val"])]
        val_best = max(c["grid"]["val"])
        assert c["grid"]["val"][grid.index(c["lam_grid_val"])] == val_best


def test_byte_counts_follow_from_adapter_sizes(micro_run):
    """FedIT sends the whole adapter both ways to every participant every round; FedSA-LoRA only the A factors."""
    r = json.loads((micro_run[0] / "results.json").read_text())
    D, L, classes = MICRO_VIT["hidden_dim"], MICRO_VIT["num_layers"], 100
    lora_a = L * 2 * RANK * D * 4          # q and v A factors (r x D), float32, per layer
    adapter = 2 * lora_a + (D * classes + classes) * 4  # + the B factors (D x r) + the new head
    assert r["adapter"]["bytes"] == adapter and r["adapter"]["fedsa_shared_bytes"] == lora_a
    fedit = ROUNDS * CLIENTS * 2 * adapter
    for m, res in r["methods"].items():
        assert res["bytes"] == {"local": 0, "fedsa": ROUNDS * CLIENTS * 2 * lora_a}.get(m, fedit), m
    curve = r["communication"]
    assert [p["round"] for p in curve] == [0, 1, 2]
    assert [p["bytes"] for p in curve] == [0, fedit // 2, fedit]
    assert curve[-1]["fedit"] == r["methods"]["fedit"]["mean"] and curve[-1]["potara"] == r["methods"]["potara_ab"]["mean"]


def test_plots_written_when_matplotlib_is_installed(micro_run):
    pytest.importorskip("matplotlib")
    assert (micro_run[0] / "lambda.png").stat().st_size > 0 and (micro_run[0] / "communication.png").stat().st_size > 0


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_interrupted_run_resumes_to_the_same_result(micro_run, data_dir, tmp_path):
    out_a, _ = micro_run
    out_b = tmp_path / "b"

    def interrupt(stage, state):
        if stage == "fedit" and state.round == 1:
            raise KeyboardInterrupt
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_cifar, "run_experiment", functools.partial(run_cifar.run_experiment, on_round=interrupt))
        with pytest.raises(KeyboardInterrupt):
            run_cifar.main(micro_argv(data_dir, out_b))
    ck = torch.load(out_b / "checkpoint.pt", weights_only=True)
    assert ck["fedit"]["round"] == 1 and not (out_b / "results.json").exists()

    seen = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_cifar, "run_experiment", functools.partial(
            run_cifar.run_experiment, on_round=lambda stage, state: seen.append((stage, state.round))))
        run_cifar.main(micro_argv(data_dir, out_b, "--resume"))
    assert seen == [("fedit", 2), ("fedsa", 1), ("fedsa", 2)]  # FedIT went on from its checkpoint
    a, b = (json.loads((o / "results.json").read_text()) for o in (out_a, out_b))
    for key in ("methods", "per_client", "communication", "fedit_history", "fedsa_history", "adapter"):
        assert a[key] == b[key], key
    ck_a, ck_b = (torch.load(o / "checkpoint.pt", weights_only=True) for o in (out_a, out_b))
    for key in ("fedit", "fedsa", "snapshots", "local", "finetuned"):
        assert _tensors_equal(ck_a[key], ck_b[key]), key


def test_resume_checks_training_settings_and_reevaluates_other_options(micro_run, data_dir, tmp_path):
    out_a, _ = micro_run
    out_c = tmp_path / "c"
    shutil.copytree(out_a, out_c)
    with pytest.raises(SystemExit, match="other training settings"):
        run_cifar.main(micro_argv(data_dir, out_c, "--resume", "--local-train-steps", "4"))
    # Potara's options are not training settings: the trained adapters are reused, only evaluation reruns
    r = run_cifar.main(micro_argv(data_dir, out_c, "--resume", "--fisher-split", "val", "--eps", "0.1"))
    a = json.loads((out_a / "results.json").read_text())
    for m in ("local", "fedit", "fedit_ft", "fedsa", "uniform", "grid_val"):
        assert r["methods"][m] == a["methods"][m], m
    assert all(c["potara"]["eps"] == 0.1 for c in r["per_client"].values())


@pytest.mark.parametrize("extra, msg", [
    (["--clients", "0"], "--clients must be >= 1"),
    (["--alpha", "0"], "--alpha must be a positive number"),
    (["--alpha", "-0.5"], "--alpha must be a positive number"),
    (["--lr", "nan"], "--lr must be a positive number"),
    (["--rounds", "-1"], "--rounds must be >= 1"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--grid-step", "0.3"], "--grid-step must be 1/n"),
    (["--clients-per-round", "3"], "--clients-per-round must be in [0, --clients=2]"),
    (["--fisher-samples", "17"], "--fisher-samples 17 exceeds the client's val split"),
    (["--estimator", "hermite", "--granularity", "module"], "gives one weight per client"),
    (["--estimator", "nope"], "--estimator must be one of"),
    (["--partition", "superclass", "--clients", "21"], "--clients must be <= 20"),
    (["--backbone", "/nonexistent/backbone.pt"], "no such file"),
    (["--public", "500"], "--public >= 1000"),
    (["--clients", "20", "--train", "10"], "images available"),
])
def test_cli_rejects_bad_arguments(extra, msg, data_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cifar.main(micro_argv(data_dir, tmp_path / "x", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg in err, err


def test_offline_errors_are_one_line(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise URLError("no network")
    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        run_cifar.main(["--data", "cifar", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--threads", "1"])
    assert "CIFAR-100 not found under" in str(e.value) and "--data synthetic" in str(e.value)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(vit.torchvision.models, "vit_b_16", offline)
    with pytest.raises(SystemExit, match=r"ImageNet weights of vit_b_16 \(offline\?.*--backbone PATH"):
        vit.imagenet_vit_b_16()


def test_backbone_file_round_trip(micro_run, data_dir, tmp_path):
    """--backbone loads a saved backbone (the cached tiny one) and a plain state_dict alike."""
    cached = [p for p in os.listdir(data_dir / "backbones") if p.endswith(".pt")]
    assert len(cached) == 1
    path = str(data_dir / "backbones" / cached[0])
    backbone = vit.load_backbone_file(path, None)
    plain = tmp_path / "plain.pt"
    torch.save(backbone.state_dict(), plain)
    again = vit.load_backbone_file(str(plain), {**MICRO_VIT, "num_classes": 100})
    for (n, p), (_, q) in zip(backbone.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), n
    bad = tmp_path / "bad.pt"
    torch.save({"encoder.nope": torch.zeros(1)}, bad)
    with pytest.raises(SystemExit, match="does not fit the ViT"):
        vit.load_backbone_file(str(bad), {**MICRO_VIT, "num_classes": 100})
    torch.save(torch.zeros(3), bad)
    with pytest.raises(SystemExit, match="neither a potara backbone file nor a state_dict"):
        vit.load_backbone_file(str(bad), None)
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit, match="not a readable torch file"):
        vit.load_backbone_file(str(bad), None)
