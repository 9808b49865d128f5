"""Issue 6 end to end: a run killed with SIGKILL resumes bitwise, unreliable clients (drop-outs, rejected
updates) reach results.json, degenerate numerics never give a NaN adapter, every output is written
atomically, and bad CLI arguments, data files and --resume states fail in one line.

The CLI runs use a micro ViT given as --backbone (a potara backbone file), so subprocesses need no patching.
"""
import json
import os
import pickle
import signal
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn as nn
from torchvision.models import VisionTransformer

import data as data_module
import run_cifar
import vit
from checkpoint import RunState, _tensors, fingerprint, save_state
from data import write_synthetic_cifar100
from data import ClientSplits
from pipeline import ExperimentConfig, run_experiment
from report import atomic_write, write_outputs
from lora import add_lora, lora_factor, lora_state_dict, save_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from conftest import MICRO_VIT
CLIENTS, ROUNDS = 2, 3


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A data dir with the synthetic CIFAR files run_cifar would write, and a micro backbone file."""
    root = tmp_path_factory.mktemp("rel")
    write_synthetic_cifar100(str(root / "data" / "synthetic"), 12, 12 // 5)
    torch.manual_seed(0)
    vit = VisionTransformer(**MICRO_VIT, num_classes=100)
    torch.save({"format": "potara-backbone-v1", "vit": {**MICRO_VIT, "num_classes": 100},
                "state_dict": vit.state_dict(), "info": {}}, root / "micro.pt")
    return root


def argv(micro, out, *extra):
    return ["--data", "synthetic", "--data-dir", str(micro / "data"), "--synthetic-per-class", "12",
            "--backbone", str(micro / "micro.pt"), "--public", "0", "--out", str(out), "--clients", str(CLIENTS),
            "--train", "16", "--val", "8", "--test", "10", "--rounds", str(ROUNDS), "--local-steps", "2",
            "--local-train-steps", "3", "--finetune-steps", "2", "--fisher-samples", "8", "--batch-size", "8",
            "--rank", "2", "--lora-alpha", "4", "--grid-step", "0.25", "--snapshots", str(ROUNDS), "--threads", "1",
            "--seed", "1", "--no-progress", *extra]


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
    return r


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# ----------------------------------------------------------------------------- crash safety
def file_version(path):
    try:
        st = os.stat(path)
        return st.st_ino, st.st_mtime_ns  # os.replace: a new file each write
    except FileNotFoundError:
        return None


def run_and_kill(cmd, ckpt, writes, log):
    """Start cmd, SIGKILL it once it has (re)written checkpoint.pt `writes` times (polled every 2 ms)."""
    last, seen, deadline = file_version(ckpt), 0, time.time() + 120
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        try:
            while seen < writes:
                assert proc.poll() is None, f"the run ended before it was killed: {open(log).read()[-2000:]}"
                assert time.time() < deadline, "too few checkpoint writes in 120 s"
                now = file_version(ckpt)
                if now is not None and now != last:
                    seen, last = seen + 1, now
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_run_then_resume_is_bitwise_equal_to_an_uninterrupted_run(micro, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "run_cifar.py", *argv(micro, out)]
    ckpt = out / "checkpoint.pt"
    run_and_kill(cmd, ckpt, writes=1, log=tmp_path / "err1")  # in FedIT (its round 1 is the first checkpoint)
    assert not (out / "results.json").exists()
    first = torch.load(ckpt, weights_only=True)  # whatever instant the kill hit, the checkpoint is complete
    assert 1 <= first["fedit"]["round"] < ROUNDS
    # resumed, killed again in the local-training stage: FedIT's last rounds + FedSA's 3 + >= 1 local adapter
    run_and_kill(cmd + ["--resume"], ckpt, writes=ROUNDS - first["fedit"]["round"] + ROUNDS + 1, log=tmp_path / "err2")
    second = torch.load(ckpt, weights_only=True)
    assert second["fedsa"]["round"] == ROUNDS and len(second["local"]) >= 1 and not (out / "results.json").exists()
    (out / "checkpoint.pt.tmp999999").write_bytes(b"a partial write left by a killed process")
    done = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resuming from" in done.stdout
    assert load_results(out) == load_results(reference)
    ck, ref = (torch.load(o / "checkpoint.pt", weights_only=True) for o in (out, reference))
    for key in ("fedit", "fedsa", "snapshots", "local", "finetuned"):
        assert same(ck[key], ref[key]), key


def test_atomic_writes_never_leave_a_partial_file(reference, tmp_path, monkeypatch):
    """A crash between writing and renaming (simulated: os.replace fails) leaves the previous file whole
    and no temporary file behind; a writer that wrote in place would not raise here, or would clobber."""
    results = json.loads((reference / "results.json").read_text())
    write_outputs(results, str(tmp_path))
    old = {n: (tmp_path / n).read_bytes() for n in ("results.json", "results.md")}
    save_adapter(tmp_path / "adapter.pt", {"w": torch.ones(2)})
    old["adapter.pt"] = (tmp_path / "adapter.pt").read_bytes()
    save_state(RunState("a"), str(tmp_path / "checkpoint.pt"))
    old["checkpoint.pt"] = (tmp_path / "checkpoint.pt").read_bytes()
    syn = tmp_path / "syn"
    write_synthetic_cifar100(str(syn), 1, 1)
    folder = syn / "cifar-100-python"
    old_syn = {n: (folder / n).read_bytes() for n in ("train", "test", "meta")}

    def crash(src, dst):
        raise OSError("simulated crash before the rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated"):
        write_outputs({**results, "mean_abs_lam_diff": 1.0}, str(tmp_path))
    with pytest.raises(OSError, match="simulated"):
        save_adapter(tmp_path / "adapter.pt", {"w": torch.zeros(5)})
    with pytest.raises(OSError, match="simulated"):
        save_state(RunState("b"), str(tmp_path / "checkpoint.pt"))
    with pytest.raises(OSError, match="simulated"):
        atomic_write(str(tmp_path / "results.json"), lambda f: f.write(b"{"))
    with pytest.raises(OSError, match="simulated"):
        write_synthetic_cifar100(str(syn), 2, 1)  # other parameters: a rewrite
    monkeypatch.undo()
    for name, content in old.items():
        assert (tmp_path / name).read_bytes() == content, name
    assert {n: (folder / n).read_bytes() for n in old_syn} == old_syn
    assert not (folder / data_module.SYNTHETIC_MARKER).exists()  # the old set is no longer marked finished ...
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("results", "checkpoint")) and ".tmp" in p.name]
    write_synthetic_cifar100(str(syn), 2, 1)  # ... so the next call writes the new one completely
    assert data_module.load_cifar100(str(syn), download=False).images.shape[0] == 300


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


def test_cached_backbone_damaged_or_unwritable(tmp_path, monkeypatch, capsys):
    """The tiny preset's cached backbone: a damaged cache file is rebuilt (same weights), an unwritable
    cache directory only skips caching."""
    monkeypatch.setitem(vit.PRESETS["tiny"], "vit", MICRO_VIT)
    root = tmp_path / "data"
    base = argv(tmp_path, tmp_path / "o", "--public", "1000", "--pretrain-steps", "3", "--rounds", "1",
                "--snapshots", "1", "--no-fedsa")
    base = [a for i, a in enumerate(base) if a != "--backbone" and (i == 0 or base[i - 1] != "--backbone")]
    base[base.index("--data-dir") + 1] = str(root)
    first = run_cifar.main(base)
    cached = root / "backbones" / os.listdir(root / "backbones")[0]
    weights = torch.load(cached, weights_only=True)["state_dict"]
    cached.write_bytes(cached.read_bytes()[:200])
    second = run_cifar.main(base)
    assert "is unusable (" in capsys.readouterr().out
    assert same(torch.load(cached, weights_only=True)["state_dict"], weights)
    assert second["methods"] == first["methods"]
    for p in (root / "backbones").iterdir():
        p.unlink()
    (root / "backbones").rmdir()
    (root / "backbones").write_text("a file where the cache folder should be")
    third = run_cifar.main(base)
    assert "NOT cached" in capsys.readouterr().out and third["methods"] == first["methods"]


# ----------------------------------------------------------------------------- unreliable clients via the CLI
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
    assert 0 < dropped < ROUNDS * CLIENTS  # seed 1: some client-rounds dropped, not all
    sent = sum(h["bytes_down"] + h["bytes_up"] for h in saved["fedit_history"])
    assert saved["methods"]["fedit"]["bytes"] == sent < 2 * ROUNDS * CLIENTS * adapter
    assert saved["faults"]["drop_prob"] == 0.5 and saved["faults"]["fedit"]["dropped"] == dropped
    assert f"faults: FedIT: {dropped} client-rounds dropped, 0 updates rejected" in printed
    assert r["faults"] == saved["faults"]


def test_max_update_norm_rejects_and_keeps_the_global_adapter(micro, tmp_path, capsys, caplog):
    out = tmp_path / "norm"
    with caplog.at_level("WARNING", logger="potara.fed"):
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
    assert [(x["round"], x["client"]) for x in rejected] == [(t, f"client{k}") for t in range(ROUNDS)
                                                           for k in range(CLIENTS)]
    G = torch.load(out / "checkpoint.pt", weights_only=True)["fedit"]["global_state"]
    for k, v in G.items():  # still phi_0: LoRA B = 0 and the new head = 0; only the A factors are non-zero
        assert (v.abs().sum() > 0) == (lora_factor(k) == "A"), k
    assert f"0 client-rounds dropped, {ROUNDS * CLIENTS} updates rejected" in capsys.readouterr().out


# ----------------------------------------------------------------------------- degenerate numerics, end to end
def bias_free_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    add_lora(model, ["0", "2"], r=2, alpha=4)
    return model


def client(name, seed, train_fill=None):
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 6, generator=g)
    y = lambda n: torch.randint(0, 4, (n,), generator=g)
    tr = x(24)
    if train_fill is not None:
        tr = torch.full_like(tr, train_fill)
    return ClientSplits(name, tr, y(24), x(8), y(8), x(12), y(12))


MLP_CFG = dict(rounds=2, local_steps=3, lr=1e-2, batch_size=8, local_train_steps=4, finetune_steps=3,
               fisher_samples=8, grid_step=0.25, snapshots=2,
               estimator="paper", fisher_split="train")  # the inverse-Fisher path, on the degenerate train data


def test_zero_fisher_and_nan_client_warn_and_give_finite_adapters_and_results(tmp_path):
    """c_zero: all-zero inputs -> every LoRA gradient is 0 (bias-free layers) -> all-zero Fisher.
    c_nan: NaN inputs -> NaN updates, NaN local training, NaN statistics. Nothing NaN comes out."""
    healthy = [client("c0", 0), client("c1", 1), client("c_zero", 2, train_fill=0.0)]
    nan_client = client("c_nan", 3, train_fill=float("nan"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = run_experiment(bias_free_model(), healthy + [nan_client], ExperimentConfig(**MLP_CFG), str(tmp_path / "a"),
                           progress=False)
    text = "\n".join(str(w.message) for w in caught)
    for expected in ("client c_nan: local training gave NaN/Inf", "client c_nan: fine-tune training gave NaN/Inf",
                     "client c_nan: NaN/Inf in the Fisher", "client c_nan: non-finite variance terms",
                     "all zero"):
        assert expected in text, expected
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in _tensors(ck))
    init = lora_state_dict(bias_free_model())
    assert same(ck["local"]["c_nan"], init) and same(ck["finetuned"]["c_nan"], ck["fedit"]["global_state"])
    for m, res in r["methods"].items():
        assert all(0 <= a <= 1 for a in res["per_client"].values()), m
    assert r["per_client"]["c_nan"]["potara"]["lam"] == 0.5 and r["per_client"]["c_zero"]["potara"]["lam"] == 0.5
    assert [h["rejected"][0]["client"] for h in r["fedit_history"]] == ["c_nan"] * 2
    assert {(f["client"], f["stage"]) for f in r["faults"]["fallbacks"]} == {("c_nan", "local"), ("c_nan", "fine-tune")}
    saved = json.loads((tmp_path / "a" / "results.json").read_text(),
                       parse_constant=lambda c: pytest.fail(f"results.json holds {c}: not JSON"))
    assert saved["per_client"]["c_nan"]["potara"]["a"] is None  # NaN written as null
    assert "non-finite statistics for c_nan" in (tmp_path / "a" / "results.md").read_text()
    # the rejected client never touched the global adapter: same as a run without it (client indices unchanged)
    with pytest.warns(UserWarning, match="all zero"):
        clean = run_experiment(bias_free_model(), healthy, ExperimentConfig(**MLP_CFG), str(tmp_path / "b"),
                               progress=False)
    ck_clean = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert same(ck["fedit"]["global_state"], ck_clean["fedit"]["global_state"])
    assert r["methods"]["fedit"]["per_client"]["c0"] == clean["methods"]["fedit"]["per_client"]["c0"]


def test_fault_options_are_fingerprinted_only_when_set():
    model, splits = bias_free_model(), [client("c0", 0)]
    plain = fingerprint(model, splits, ExperimentConfig())
    assert "drop_prob" not in plain and "max_update_norm" not in plain  # checkpoints of older runs stay valid
    assert fingerprint(model, splits, ExperimentConfig(drop_prob=0.1)) != plain
    assert fingerprint(model, splits, ExperimentConfig(max_update_norm=3.0)) != plain


# ----------------------------------------------------------------------------- bad --resume states
class _Boom:  # unpickling this would create a marker file
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_bad_resume_states_fail_in_one_line(micro, reference, tmp_path):
    good = torch.load(reference / "checkpoint.pt", weights_only=True)
    out = tmp_path / "r"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    marker = tmp_path / "pwned"
    nan_local = {k: v * float("nan") for k, v in good["local"]["client0"].items()}
    nan = {**good, "local": {**good["local"], "client0": nan_local}}
    cases = [
        (lambda: ckpt.write_bytes((reference / "checkpoint.pt").read_bytes()[:4000]), "is unreadable (truncated"),
        (lambda: torch.save({"some": torch.ones(2)}, ckpt), "is not a potara experiment checkpoint"),
        (lambda: save_adapter(ckpt, {"w": torch.ones(2)}), "is not a potara experiment checkpoint"),
        (lambda: torch.save({**good, "fedit": _Boom(str(marker))}, ckpt), "unsafe"),
        (lambda: torch.save(nan, ckpt), "holds NaN or Inf tensors"),
        (lambda: torch.save(good, ckpt), "other training settings"),  # resumed with another --drop-prob
    ]
    for i, (make, msg) in enumerate(cases):
        make()
        extra = ["--drop-prob", "0.3"] if i == len(cases) - 1 else []
        with pytest.raises(SystemExit) as e:
            run_cifar.main(argv(micro, out, "--resume", *extra))
        assert msg in str(e.value) and "\n" not in str(e.value), (i, str(e.value))
        assert not (out / "results.json").exists()
    assert not marker.exists()


# ----------------------------------------------------------------------------- CLI arguments
@pytest.mark.parametrize("extra, msg", [
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--drop-prob", "1"], "--drop-prob must be in [0, 1)"),
    (["--drop-prob", "-0.1"], "--drop-prob must be in [0, 1)"),
    (["--drop-prob", "nan"], "--drop-prob must be in [0, 1)"),
    (["--max-update-norm", "0"], "--max-update-norm must be a positive number"),
    (["--max-update-norm", "-2"], "--max-update-norm must be a positive number"),
    (["--max-update-norm", "inf"], "--max-update-norm must be a positive number"),
    (["--train", "-3"], "--train must be >= 1"),
    (["--test", "0"], "--test must be >= 1"),
    (["--local-steps", "0"], "--local-steps must be >= 1"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--rank", "0"], "--rank must be >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--public", "-1"], "--public must be >= 0"),
    (["--snapshots", "-1"], "--clients-per-round, --snapshots and --seed must be >= 0"),
    (["--lora-alpha", "0"], "--lora-alpha must be a positive number"),
    (["--eps", "-0.001"], "--eps must be a positive number"),
    (["--lr", "inf"], "--lr must be a positive number"),
    (["--grid-step", "0"], "--grid-step must be 1/n"),
    (["--synthetic-per-class", "3"], "--synthetic-per-class must be >= 5"),
    (["--clients", "50"], "images available"),  # 50 clients x 34 images > the 1440 synthetic ones
    (["--partition", "nope"], "invalid choice: 'nope'"),
    (["--rounds", "x"], "invalid int value: 'x'"),
])
def test_cli_rejects_bad_arguments(extra, msg, micro, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run_cifar.main(argv(micro, tmp_path / "x", *extra))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert msg in err, err


def test_cli_rejects_unusable_directories(micro, tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("")
    for flag, path, msg in (("--out", a_file, "exists and is not a directory"),
                            ("--data-dir", a_file, "exists and is not a directory"),
                            ("--out", a_file / "sub", f"cannot be created ({a_file} is a file)")):
        args = argv(micro, tmp_path / "o")
        args[args.index(flag) + 1] = str(path)
        with pytest.raises(SystemExit):
            run_cifar.main(args)
        assert msg in capsys.readouterr().err.strip().splitlines()[-1]
    # root may write anywhere: simulate unreadable / read-only folders
    data_dir = str(micro / "data")
    for flag, allowed, msg in (("--data-dir", lambda p: not str(p).startswith(data_dir), "permission denied"),
                               ("--out", lambda p: str(p).startswith(data_dir), f"({tmp_path} is not writable)")):
        monkeypatch.setattr(os, "access", lambda path, mode: allowed(path))
        with pytest.raises(SystemExit):
            run_cifar.main(argv(micro, tmp_path / "missing" / "o"))
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"{flag} " in err and msg in err, err
