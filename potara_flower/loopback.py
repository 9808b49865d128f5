"""A Flower federation on this machine's loopback: a flower-superlink and flower-supernode processes on
127.0.0.1, for trying the app (server_app.py / client_app.py), its tests and potara_flower/bench.py.

    with LocalFederation("/tmp/fl") as fed:                       # FLWR_HOME, logs and keys live there
        fed.superlink()                                          # --insecure (tls=... for TLS)
        for k in range(2):
            fed.supernode(f"node{k}", f"partition-id={k} num-partitions=2 backbone='/abs/tiny.pt'")
        status = fed.run(".", {"num-clients": 2, "rounds": 5, "out-dir": "/abs/runs/flower"})
    # every process stopped here, whatever happened: SIGINT to its process group, SIGKILL after 10 s

Each process is started in its own process group (its pid leads it: the SuperNode's helpers, such as
the flwr-clientapp process of each message, go with it) and stopped by that pid, never by name. The
executables are the ones beside this Python interpreter (Flower starts its helpers by name, so that
folder also goes first on PATH). Every wait is bounded. On a real deployment, run the same commands
on each machine instead (docs/flower.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

BIN = Path(sys.executable).parent  # flwr, flower-superlink, flower-supernode


GIVEN_PORTS: set[int] = set()  # handed out by this process: federations started side by side never share one


def free_port() -> int:
    """A TCP port nothing listens on now (the OS's choice) on 127.0.0.1, and not handed out before here."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in GIVEN_PORTS:
            GIVEN_PORTS.add(port)
            return port


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, details: Callable[[], str] = lambda: "") -> None:
    """Poll predicate() every 0.5 s; TimeoutError naming `what` (and the tail of details()) after `timeout` s."""
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}\n{details()[-3000:]}")
        time.sleep(0.5)


def toml_value(v) -> str:
    """A Python value as a TOML literal for --run-config (strings single-quoted, booleans lowercase)."""
    return f"'{v}'" if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


def run_finished_line(run_id: str) -> re.Pattern:
    """The SuperLink's log line when a task of run `run_id` reports its end, completed or failed (flwr's runtime
    handler logs it after storing the task's status): "Finished task 123 of run 456". A ServerApp killed outright
    reports nothing: run() also asks on a timer."""
    return re.compile(rf"Finished task \d+ of run {run_id}\b")


class LocalFederation:
    """A SuperLink and SuperNodes on 127.0.0.1 under one folder; a context manager that stops them all.
    tls = {"ca": ..., "cert": ..., "key": ...} (PEM paths) runs the SuperLink with TLS instead of --insecure.
    nice > 0 starts every process (and so their helpers) at that niceness, through `nice` and, each being a session
    of its own, its autogroup's (/proc/PID/autogroup): the test suite runs its federations at 10 so that its own
    single-threaded tests keep a core while the devices take the rest."""

    def __init__(self, folder: str | os.PathLike, tls: dict | None = None, nice: int = 0):
        self.dir, self.tls, self.nice, self.procs = Path(folder), tls, nice, []
        self.home = self.dir / "flwr-home"
        if self.home.is_symlink() or self.home.is_file():  # an earlier federation's state is never reused or
            self.home.unlink()  # followed: a planted link is removed, not written through
        elif self.home.exists():
            shutil.rmtree(self.home)  # rmtree removes links inside, never what they point to
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "PYTHONUNBUFFERED": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }  # loopback only: no calls out
        certs = f'root-certificates = "{tls["ca"]}"' if tls else "insecure = true"
        (self.home / "config.toml").write_text(  # the connection `flwr` commands name: "local"
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\n{certs}\n'
        )

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def niced(self) -> list[str]:
        """The prefix of every command started here: [] or `nice -n N` (which execs the command: same pid)."""
        return ["nice", "-n", str(self.nice)] if self.nice else []

    def start(self, name: str, *args: str) -> subprocess.Popen:
        """Start BIN/args[0] with its output in <folder>/<name>.log (a new file: a link or hard link planted
        there is removed, not written through), in a new process group."""
        path = self.dir / f"{name}.log"
        if path.is_symlink() or path.is_file():
            path.unlink()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with open(fd, "wb") as log:
            p = subprocess.Popen(
                [*self.niced(), str(BIN / args[0]), *args[1:]],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.dir,
                start_new_session=True,
            )
        self.procs.append(p)
        if self.nice:  # Linux's autogroups share CPU between sessions before niceness counts: the new session's too
            try:
                with open(f"/proc/{p.pid}/autogroup", "w") as f:
                    f.write(str(self.nice))
            except OSError:
                pass  # no autogroups here: `nice` alone does it
        return p

    def log(self, name: str) -> str:
        path = self.dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def superlink(self, *extra: str, timeout: float = 60) -> subprocess.Popen:
        """flower-superlink on 127.0.0.1:<port>, not installing app dependencies; returns once it listens."""
        security = (
            ["--ssl-ca-certfile", self.tls["ca"], "--ssl-certfile", self.tls["cert"], "--ssl-keyfile", self.tls["key"]]
            if self.tls
            else ["--insecure"]
        )
        p = self.start(
            "superlink",
            "flower-superlink",
            *security,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
            *extra,
        )
        wait_for(
            lambda: "Uvicorn running" in self.log("superlink") or p.poll() is not None,
            timeout,
            "the SuperLink to listen",
            lambda: self.log("superlink"),
        )
        if p.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {p.returncode}:\n{self.log('superlink')[-3000:]}")
        return p

    def supernode(self, name: str, node_config: str, *extra: str) -> subprocess.Popen:
        """flower-supernode connecting to the SuperLink, its own Runtime API port, the given node config. It runs
        in this federation's folder: relative paths in node_config (backbone, data-dir, adapter-dir) are relative
        to it, as they are to the folder a SuperNode is started in on a device; so is a relative out-dir to the
        folder the SuperLink was started in (the ServerApp is its child process)."""
        security = ["--root-certificates", self.tls["ca"]] if self.tls else ["--insecure"]
        return self.start(
            name,
            "flower-supernode",
            *security,
            "--superlink",
            f"127.0.0.1:{self.port}",
            "--port",
            str(free_port()),
            "--node-config",
            node_config,
            *extra,
        )

    def flwr(self, *args: str, timeout: float = 60) -> dict:
        """A `flwr` CLI command with --format json; its parsed output."""
        out = subprocess.run(
            [*self.niced(), str(BIN / "flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.dir,
            timeout=timeout,
        )
        try:
            return json.loads(out.stdout)
        except ValueError:
            raise RuntimeError(
                f"flwr {' '.join(args)} (exit {out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}"
            ) from None

    def run_log(self, run_id: int | str, timeout: float = 60) -> str:
        """`flwr log RUN_ID local --show`: what the operator reads of a run (the ServerApp's output)."""
        out = subprocess.run(
            [*self.niced(), str(BIN / "flwr"), "log", str(run_id), "local", "--show"],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.dir,
            timeout=timeout,
        )
        return out.stdout + out.stderr

    def run(
        self,
        app: str | os.PathLike,
        run_config: dict,
        timeout: float = 600,
        poll: float = 1.0,
        during: Callable[[dict], None] | None = None,
        status_every: float = 30.0,
    ) -> dict:
        """`flwr run app local --run-config ...` (it returns at once), then wait for the run's status to be
        finished:*; returns that final status (a dict of `flwr list`'s JSON: "status", "status-details", ...).
        during(last status), if given, is called every `poll` s before the end (a test's hook: kill a SuperNode
        mid-run). The status is asked for (`flwr list --run-id`) when the SuperLink's log says a task of the run
        finished, and every `status_every` s besides (a ServerApp that died without saying so): each `flwr` call
        is a new Python process (~1.5 s of CPU, measured here), and asked every few seconds they would take a
        core from the devices a benchmark times and the tests run beside."""
        overrides = " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())
        # builds the FAB from the app's folder first (seconds; a minute and more on a loaded machine)
        started = self.flwr("run", str(Path(app).resolve()), "local", "--run-config", overrides, timeout=180)
        if not started.get("success"):
            raise RuntimeError(f"flwr run failed: {started}")
        run_id, status, asked = str(started["run-id"]), {}, time.time()
        said_finished = self.log_watch("superlink", run_finished_line(run_id))

        def finished() -> bool:
            nonlocal status, asked
            if not said_finished() and time.time() - asked < status_every:
                return False
            status, asked = self.flwr("list", "local", "--run-id", run_id)["runs"][0], time.time()
            return status["status"].startswith("finished")

        deadline = time.time() + timeout
        while not finished():
            if time.time() > deadline:
                raise TimeoutError(
                    f"run {run_id} not finished after {timeout:g} s (status {status.get('status')})\n"
                    f"{self.log('superlink')[-3000:]}"
                )
            if during is not None:
                during(status)
            time.sleep(poll)
        return status

    def log_watch(self, name: str, pattern: re.Pattern) -> Callable[[], bool]:
        """A function that says whether <name>.log got a line matching `pattern` since it was last called (the
        first call: since the file began); it reads only what was appended, so asking often costs next to nothing."""
        path, offset, partial = self.dir / f"{name}.log", 0, b""

        def appended_match() -> bool:
            nonlocal offset, partial
            if not path.exists():
                return False
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = partial + f.read()
            offset += len(chunk) - len(partial)
            *lines, partial = chunk.split(b"\n")
            return any(pattern.search(line.decode(errors="replace")) for line in lines)

        return appended_match

    def stop(self, grace: float = 10) -> None:
        """SIGINT to every process group started here (newest first), SIGKILL to what is left after `grace` s."""
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        for p in reversed(self.procs):
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)  # helpers of the group that outlived their leader, if any
            except ProcessLookupError:
                pass
            p.wait(timeout=grace)
        self.procs.clear()


def tls_and_keys(tmp: Path, names: tuple[str, ...] = ("member", "stranger")) -> dict:
    """In folder tmp: a CA, a SuperLink certificate for 127.0.0.1 signed by it (openssl), and a SuperNode key
    pair per name (ssh-keygen, ECDSA P-384: tmp/<name>, tmp/<name>.pub): docs/flower.md's commands. Returns
    LocalFederation's `tls`."""

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True, timeout=60)

    sh(
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=potara test CA",
    )
    sh(
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    )
    (tmp / "san.ext").write_text("subjectAltName = IP:127.0.0.1, DNS:localhost\n")
    sh(
        "openssl",
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "san.ext",
    )
    for name in names:
        sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", name, "-C", name)
    return {"ca": str(tmp / "ca.crt"), "cert": str(tmp / "server.pem"), "key": str(tmp / "server.key")}
