"""docs/flower-your-app.md's example, the Flower app in examples/potara-flower-app/, loaded as `flwr run` loads it
(its pyproject.toml read and checked by flwr, its components and run config through flwr's own loader). In-process:
its ServerApp (Flower's own FedAvg) against 3 of its ClientApps through a Grid that calls them in this process,
checked against an independent FedAvg loop and a direct potara.personalize call, and for what crosses the wire.
On a real SuperLink and 2 SuperNodes (slow): every client's printed lam and accuracies equal the in-process run's,
to the last digit."""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from flower_kit import LocalGrid  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402
from flwr.common.config import get_fused_config_from_dir, get_project_config  # noqa: E402
from flwr.supercore.object_ref import load_app  # noqa: E402

from potara import personalize  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "examples" / "potara-flower-app"
COMPONENTS = get_project_config(APP)["tool"]["flwr"]["app"]["components"]  # flwr validates the file here
client_app = load_app(COMPONENTS["clientapp"], ImportError, APP)  # what a SuperNode's ClientApp process does
server_app = load_app(COMPONENTS["serverapp"], ImportError, APP)  # and the SuperLink's ServerApp process
ex = sys.modules[COMPONENTS["clientapp"].split(":")[0]]
FEW = {"rounds": 2, "local-steps": 25}  # fewer, longer rounds than pyproject's: a 0 < lam < 1 by round 2
RUN = get_fused_config_from_dir(APP, {"num-clients": 3, **FEW})  # pyproject's defaults otherwise


class CallingGrid(LocalGrid):
    """Each message goes to the node's ClientApp, called here with that node's own Context (its state kept
    between messages, as a SuperNode keeps it); every message and reply is recorded."""

    def __init__(self, num_nodes: int, run: dict = RUN):
        self.contexts = {
            100 + k: Context(
                run_id=1,
                node_id=100 + k,
                node_config={"partition-id": k, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=run,
            )
            for k in range(num_nodes)
        }
        self.sent, self.replies = [], []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            self.sent.append(m)
            out.append(client_app(m, self.contexts[m.metadata.dst_node_id]))
        self.replies += out
        return out[::-1]  # arrival order must not matter


def naive_fedavg(seed: int) -> dict[str, torch.Tensor]:
    """The same rounds without Flower: each client's fit from phi^t with the example's seeds, then
    sum_k n_k phi_k / sum_k n_k in float64."""
    state = ex.make_model(seed).state_dict()
    for t in range(1, RUN["rounds"] + 1):
        updates = []
        for k in range(RUN["num-clients"]):
            model = ex.make_model(seed)
            model.load_state_dict(state)
            x, y = ex.client_data(k, seed)["train"]
            ex.fit(model, x, y, RUN["local-steps"], RUN["lr"], seed=10_000 * t + k)
            updates.append((len(y), model.state_dict()))
        total = sum(n for n, _ in updates)
        state = {key: sum(n / total * s[key].double() for n, s in updates).float() for key in state}
    return state


def test_potara_in_a_users_flower_app(task_identity, capsys):
    grid = CallingGrid(RUN["num-clients"])
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=RUN))
    printed = per_client_lines(capsys.readouterr().out)

    # the global model the last round's evaluate carried = an independent FedAvg of the same clients
    last = [m for m in grid.sent if m.metadata.message_type == "evaluate"][-RUN["num-clients"] :]
    G = last[0].content["arrays"].to_torch_state_dict()
    want = naive_fedavg(RUN["seed"])
    for key, v in want.items():
        torch.testing.assert_close(G[key], v, rtol=0, atol=1e-6)

    # each client's lam and test accuracies = personalize called directly on its held-out split
    replies = {r.metadata.src_node_id: r for r in grid.replies if r.metadata.message_type == "evaluate"}
    for node, ctx in grid.contexts.items():
        k, data = ctx.node_config["partition-id"], ex.client_data(ctx.node_config["partition-id"], RUN["seed"])
        L = ex.make_model(RUN["seed"])
        ex.fit(L, *data["train"], RUN["local-train-steps"], RUN["lr"], seed=99_999 - k)
        model = ex.make_model(RUN["seed"])
        merged, info = personalize(model, G, L.state_dict(), held_out=[data["val"]])
        x, y = data["test"]
        with torch.no_grad():
            model.load_state_dict(merged)
            acc = sum(int(model(x[i : i + 1]).argmax()) == int(y[i]) for i in range(len(y))) / len(y)
        got = replies[node].content["metrics"]
        assert got["lam"] == pytest.approx(info["lam"], abs=1e-12), k
        assert got["acc-potara"] == pytest.approx(acc, abs=1e-6), k
        # and the ServerApp printed this client's line, at full precision
        line = f"lam {info['lam']!r} acc-potara {got['acc-potara']!r} acc-local {got['acc-local']!r}"
        assert f"{line} acc-global {got['acc-global']!r}" in printed[RUN["rounds"]], (k, printed)

    lams = [r.content["metrics"]["lam"] for r in replies.values()]
    assert any(0 < lam < 1 for lam in lams), lams  # a real merge, not one end: the checks above see the merge

    # on the wire: train, model arrays and two numbers; evaluate, numbers only (no arrays, no data)
    keys = set(ex.make_model(0).state_dict())
    for r in grid.replies:
        if r.metadata.message_type == "train":
            assert set(r.content.array_records) == {"arrays"} and set(r.content["arrays"].keys()) == keys
            assert set(r.content["metrics"].keys()) == {"num-examples", "train-loss"}
        else:
            assert not r.content.array_records and not r.content.config_records
            assert set(r.content["metrics"].keys()) == {"num-examples", "lam", "acc-global", "acc-local", "acc-potara"}
    # phi_L stayed on the device, in the node's state
    assert all(set(c.state["potara-local"].keys()) == keys for c in grid.contexts.values())


def per_client_lines(log: str) -> dict[int, list[str]]:
    """The ServerApp's per-client lines by round, without the node id (a real SuperNode's is random), sorted."""
    rounds: dict[int, list[str]] = {}
    for t, rest in re.findall(r"^round (\d+) node \d+: (lam .*)$", log, re.M):
        rounds.setdefault(int(t), []).append(rest)
    return {t: sorted(lines) for t, lines in rounds.items()}


@pytest.mark.slow
def test_a_real_federation_prints_the_in_process_numbers(federation, task_identity, capsys):
    """The page's commands on 127.0.0.1 (LocalFederation: the SuperLink --insecure
    --disable-runtime-dependency-installation, 2 SuperNodes with `partition-id=k num-partitions=2`, then `flwr run`
    on the app's two files with only potara.py copied beside them; no PYTHONPATH, nothing of the repository
    installed: the processes read potara.py from the FAB): every round, every client's lam and accuracies, as the
    ServerApp printed them, equal the in-process run's to the last digit."""
    run = dict(FEW)
    app = federation.dir / "app"  # the app's own files and a copy of potara.py: nothing of this repository installed
    app.mkdir()
    for f in ("example_app.py", "pyproject.toml"):
        shutil.copy(APP / f, app / f)
    shutil.copy(APP.parents[1] / "potara.py", app / "potara.py")
    federation.superlink()
    for k in range(2):
        federation.supernode(f"node{k}", f"partition-id={k} num-partitions=2")
    start = time.time()
    status = federation.run(app, run, timeout=240)
    elapsed = time.time() - start
    assert status["status"] == "finished:completed", federation.log("superlink")[-3000:]
    real = per_client_lines(federation.run_log(status["run-id"]))

    run_config = get_fused_config_from_dir(APP, run)
    assert run_config["num-clients"] == 2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the SuperNodes run (LocalFederation: OMP_NUM_THREADS=1): the same float sums
    try:
        server_app(
            CallingGrid(2, run_config),
            Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config),
        )
    finally:
        torch.set_num_threads(threads)
    want = per_client_lines(capsys.readouterr().out)
    assert sorted(want) == [1, 2] and all(len(v) == 2 for v in want.values()), want
    assert all(" lam 0.0 " not in f" {line} " for line in want[2]), want  # both clients merge: lam > 0
    assert real == want
    print(f"real federation: {run['rounds']} rounds in {elapsed:.1f} s (flwr run to finished)", file=sys.stderr)
