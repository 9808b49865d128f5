"""The Flower app (flower_server.py, flower_client.py) run for real: a flower-superlink and flower-supernode
processes on 127.0.0.1, `flwr run` of this repository, checked against the in-process code.

Every process is started in its own process group and stopped in teardown by its pid (SIGINT, then
SIGKILL after a bound), whatever happens; every wait is bounded. Skipped only when flwr is not installed.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from torchvision.models import VisionTransformer  # noqa: E402

from conftest import MICRO_VIT  # noqa: E402
from data import client_splits, dirichlet_partition, load_images, public_and_pool  # noqa: E402
from fed import Client, run_fedit  # noqa: E402
from pipeline import ExperimentConfig, run_experiment  # noqa: E402
from vit import PRESETS, build_model, load_backbone_file  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode; Flower starts helpers by name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Federation:
    """A SuperLink and SuperNodes on 127.0.0.1 under one tmp dir (FLWR_HOME, logs); stop() ends them all."""

    def __init__(self, tmp: Path, tls: dict | None = None):
        self.tmp, self.tls, self.procs = tmp, tls, []
        self.home = tmp / "flwr-home"
        self.home.mkdir()
        self.port = free_port()
        self.env = {**os.environ, "FLWR_HOME": str(self.home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        certs = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\n{certs}\n')

    def start(self, name: str, *args: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "wb")
        p = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT, env=self.env,
                             cwd=self.tmp, start_new_session=True)  # its own process group, led by p.pid
        log.close()
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def superlink(self, *extra: str) -> None:
        security = (["--ssl-ca-certfile", self.tls["ca"], "--ssl-certfile", self.tls["cert"], "--ssl-keyfile",
                     self.tls["key"]] if self.tls else ["--insecure"])
        self.start("superlink", "flower-superlink", *security, "--host", "127.0.0.1", "--port", str(self.port),
                   "--disable-runtime-dependency-installation", *extra)
        wait_for(lambda: "Uvicorn running" in self.log("superlink"), 30, "the SuperLink to listen",
                 lambda: self.log("superlink"))

    def supernode(self, name: str, node_config: str, *extra: str) -> subprocess.Popen:
        security = ["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"]
        return self.start(name, "flower-supernode", *security, "--superlink", f"127.0.0.1:{self.port}",
                          "--port", str(free_port()), "--node-config", node_config, *extra)

    def flwr(self, *args: str, timeout: float = 30) -> dict:
        out = subprocess.run([str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True,
                             env=self.env, cwd=self.tmp, timeout=timeout)
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"flwr {' '.join(args)}: {out.stdout[-2000:]} {out.stderr[-2000:]}") from None

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)  # the group p.pid leads: the node and its helpers
                except ProcessLookupError:
                    continue
        for p in reversed(self.procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # whatever is left of the group (helpers that ignored SIGINT)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def wait_for(predicate, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{details()[-3000:]}")
        time.sleep(0.5)


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()


# ----------------------------------------------------------------------------- the loopback run
RUN = {"num-clients": 3, "rounds": 2, "local-steps": 2, "clients-per-round": 2, "lr": 0.01, "batch-size": 8,
       "rank": 2, "lora-alpha": 4.0, "seed": 1, "synthetic-per-class": 20, "public": 0, "alpha": 0.5, "train": 40,
       "val": 20, "test": 20, "local-train-steps": 3, "finetune-steps": 2, "fisher-samples": 20, "grid-step": 0.25,
       "drop-prob": 0.3}


def micro_backbone(path: Path) -> None:
    """A micro ViT in the tiny backbone file format (random weights: nothing is pre-trained)."""
    torch.manual_seed(0)
    vit = VisionTransformer(**MICRO_VIT, num_classes=100)
    torch.save({"format": "potara-backbone-v1", "vit": {**MICRO_VIT, "num_classes": 100},
                "state_dict": vit.state_dict()}, path)


def toml_value(v) -> str:
    return f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


def flwr_run(fed: Federation, run_config: dict, timeout: float = 150) -> dict:
    """flwr run this repository, poll `flwr list --run-id` until the run is finished; its final status."""
    overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
    started = fed.flwr("run", str(REPO), "test", "--run-config", overrides)
    assert started.get("success"), started
    run_id = int(started["run-id"])
    status = {}

    def finished() -> bool:
        nonlocal status
        status = fed.flwr("list", "test", "--run-id", str(run_id))["runs"][0]
        return status["status"].startswith("finished")

    wait_for(finished, timeout, f"run {run_id} to finish",
             lambda: fed.log("superlink") + "\n".join(fed.log(f"node{k}") for k in range(3)))
    return status


def test_loopback_fedit_bitwise_equals_in_process(federation, tmp_path):
    """3 SuperNodes, 2 rounds of 2 sampled clients with a simulated drop-out: the final global adapter is
    bitwise fed.run_fedit's, the participants and byte counts are its history's, and every client's
    accuracies and lam are the in-process pipeline's (pipeline.run_experiment on the same clients)."""
    from fed import sample_clients
    picks = [sample_clients(RUN["seed"], t, 3, 2, RUN["drop-prob"]) for t in range(2)]
    assert any(d for _, d in picks) and all(len(d) < len(s) for s, d in picks), picks  # the case is covered
    data_dir, backbone, out = tmp_path / "data", tmp_path / "backbone.pt", tmp_path / "out"
    micro_backbone(backbone)
    federation.superlink()
    for k in range(3):
        federation.supernode(f"node{k}", f"partition-id={k} num-partitions=3 backbone='{backbone}' "
                                         f"data-dir='{data_dir}' threads=1")
    status = flwr_run(federation, {**RUN, "out-dir": str(out)})
    assert status["status"] == "finished:completed", federation.log("superlink")[-3000:]

    # the in-process reference: the same data, backbone file and seeds, one process
    torch.set_num_threads(1)
    data, _ = load_images("synthetic", str(data_dir), RUN["synthetic-per-class"])
    _, pool = public_and_pool(len(data.labels), RUN["public"])
    sizes = (RUN["train"], RUN["val"], RUN["test"])
    parts = dirichlet_partition(data.labels[pool], 3, RUN["alpha"], sum(sizes), RUN["seed"])
    splits = client_splits(data.images, data.labels, pool, parts, sizes, RUN["seed"])
    model = build_model(load_backbone_file(str(backbone), None), PRESETS["tiny"], RUN["rank"], RUN["lora-alpha"],
                        RUN["seed"])
    ref = run_fedit(model, [Client(s.name, s.train_inputs, s.train_targets) for s in splits], 2, RUN["local-steps"],
                    2, RUN["lr"], RUN["seed"], RUN["batch-size"], progress=False, drop_prob=RUN["drop-prob"])

    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    got = saved["fedit"]["global_state"]
    assert sorted(got) == sorted(ref.global_state)
    for k, v in ref.global_state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k
    assert not all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)  # it trained
    results = json.loads((out / "results.json").read_text())
    for mine, theirs in zip(results["fedit_history"], ref.history):
        for key in ("round", "clients", "dropped", "rejected", "bytes_down", "bytes_up"):
            assert mine[key] == theirs[key], key
        assert mine["failed"] == []
        assert mine["wire_bytes_down"] > mine["bytes_down"]  # npy headers and keys on top of the tensors
    assert len(results["fedit_history"]) == 2

    cfg = ExperimentConfig(rounds=2, local_steps=RUN["local-steps"], clients_per_round=2, lr=RUN["lr"],
                           batch_size=RUN["batch-size"], local_train_steps=RUN["local-train-steps"],
                           finetune_steps=RUN["finetune-steps"], fisher_samples=RUN["fisher-samples"],
                           grid_step=RUN["grid-step"], fedsa=False, snapshots=1, seed=RUN["seed"],
                           drop_prob=RUN["drop-prob"])
    pipeline = run_experiment(model, splits, cfg, str(tmp_path / "in-process"), progress=False)
    for m, r in results["methods"].items():
        assert r["per_client"] == pipeline["methods"][m]["per_client"], m
        assert r["bytes"] == pipeline["methods"][m]["bytes"], m
    for name, c in results["per_client"].items():
        assert c["lam_potara"] == pipeline["per_client"][name]["lam_potara"], name
        assert c["grid"] == pipeline["per_client"][name]["grid"], name
    assert (out / "results.md").read_text().startswith("| method | mean acc |")


# ----------------------------------------------------------------------------- security on the wire
def tls_and_keys(tmp: Path) -> dict:
    """A CA, a SuperLink certificate for 127.0.0.1 signed by it (openssl), and two SuperNode key pairs
    (ssh-keygen, ECDSA P-384): the README's commands."""
    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=60)

    sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
       "-subj", "/CN=potara test CA")
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
       "-subj", "/CN=127.0.0.1")
    (tmp / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
       "-out", "server.pem", "-days", "1", "-extfile", "san.ext")
    for name in ("member", "stranger"):
        sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name, "-C", name)
    return {"ca": str(tmp / "ca.crt"), "cert": str(tmp / "server.pem"), "key": str(tmp / "server.key")}


def test_unregistered_supernode_is_refused(tmp_path):
    """TLS + SuperNode authentication: the SuperNode whose public key was registered (flwr supernode
    register) comes online; one with an unregistered key, and one with no key, are refused and exit."""
    fed = Federation(tmp_path, tls=tls_and_keys(tmp_path))
    try:
        fed.superlink("--enable-supernode-auth")
        registered = fed.flwr("supernode", "register", str(tmp_path / "member.pub"), "test")
        assert registered.get("success"), registered
        stranger = fed.supernode("stranger", "partition-id=1 num-partitions=2", "--auth-supernode-private-key",
                                 str(tmp_path / "stranger"), "--max-retries", "1", "--max-wait-time", "20")
        anonymous = fed.supernode("anonymous", "partition-id=1 num-partitions=2", "--max-retries", "1",
                                  "--max-wait-time", "20")  # no key at all
        fed.supernode("member", "partition-id=0 num-partitions=2", "--auth-supernode-private-key",
                      str(tmp_path / "member"))
        online = lambda: [n["node-id"] for n in fed.flwr("supernode", "list", "test")["nodes"] if n["status"] == "online"]
        wait_for(lambda: online() and stranger.poll() is not None and anonymous.poll() is not None, 60,
                 "the member online, the stranger and the anonymous node gone",
                 lambda: fed.log("stranger") + fed.log("anonymous") + fed.log("superlink"))
        for refused in ("stranger", "anonymous"):
            assert "could not establish a connection to the SuperLink" in fed.log(refused), refused
        assert stranger.returncode != 0 and anonymous.returncode != 0
        assert online() == [str(registered["node-id"])]  # the member, and only the member
    finally:
        fed.stop()
