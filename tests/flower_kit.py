"""What the Flower tests share (test_flower.py, test_flower_failures.py, test_flower_llm.py): the run config, a micro
backbone, a Grid that answers in this process as flwr's SuperLink does (their fixtures: conftest.py). A helper
module, not a test
module: no test module imports another."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from conftest import MICRO_VIT  # noqa: E402
from flwr.app import (  # noqa: E402
    Context,
    Error,
    Message,
    RecordDict,
)
from flwr.serverapp import Grid  # noqa: E402
from torchvision.models import VisionTransformer  # noqa: E402

from potara_flower import client_app as flower_client  # noqa: E402
from potara_flower import server_app as flower_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


RUN = {
    "num-clients": 3,
    "rounds": 2,
    "local-steps": 2,
    "clients-per-round": 2,
    "lr": 0.01,
    "batch-size": 8,
    "rank": 2,
    "lora-alpha": 4.0,
    "seed": 1,
    "synthetic-per-class": 20,
    "public": 0,
    "alpha": 0.5,
    "train": 40,
    "val": 20,
    "test": 20,
    "local-train-steps": 3,
    "finetune-steps": 2,
    "fisher-samples": 20,
    "grid-step": 0.25,
    "drop-prob": 0.3,
}


def micro_backbone(path: Path) -> None:
    """A micro ViT in the tiny backbone file format (random weights: nothing is pre-trained)."""
    torch.manual_seed(0)
    vit = VisionTransformer(**MICRO_VIT, num_classes=100)
    torch.save(
        {"format": "potara-backbone-v1", "vit": {**MICRO_VIT, "num_classes": 100}, "state_dict": vit.state_dict()}, path
    )


class LocalGrid(Grid):
    """A Grid answered in this process: subclasses give get_node_ids and send_and_receive (all a ServerApp calls);
    the rest of Grid's abstract interface is never used."""

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


class InProcessGrid(LocalGrid):
    """Flower's Grid with each node's ClientApp called in this process: the ServerApp's whole code path, fast,
    answering exactly as a real SuperLink does (flwr 1.42; potara_flower/replies.py has the whole account):

    - push: each message gets its id, msg.object_id, set on the caller's object (superlink/grid/http_grid.py:
      276-285); replies carry it as reply_to_message_id;
    - a ClientApp that raises: Error(CLIENT_APP_RAISED_EXCEPTION = 2, "<class 'X'>:<'text'>") from the node
      itself (supernode/runtime/run_clientapp.py:197-213);
    - a dead node (kill(k)): gone from get_node_ids() (the SuperLink lists ONLINE nodes only,
      server/superlink/linkstate/in_memory_linkstate.py:600-616); until it misses its heartbeats, nothing comes
      back for it (send_and_receive returns at its timeout, http_grid.py:384-413); after (detected=True), the
      SuperLink's own error reply, made by flwr's own create_message_error_unavailable_res_message: src_node_id
      SUPERLINK_NODE_ID, not the dead node's, code NODE_UNAVAILABLE (server/superlink/linkstate/utils.py:114-158,
      281-326; in_memory_linkstate.py:380-396);
    - revive(k): the node's SuperNode restarted; without a registered key it registers again under a new node id
      (supernode/fleet_http_connection.py:95-97, 220-230; in_memory_linkstate.py:507-511 draws a random id).

    `tamper(partition, msg, reply)` may replace a reply, return None (the node never answers) or a list of
    replies (several to one message). Replies come back in reverse order: arrival order must not matter."""

    def __init__(self, node_configs: list[dict], run_config: dict, tamper=None):
        self.configs = {1000 + 7 * i: c for i, c in enumerate(node_configs)}  # node ids are not partition ids
        self.states = {n: RecordDict() for n in self.configs}
        self.run_config, self.tamper, self.dead, self.detected = run_config, tamper, set(), set()

    def node_of(self, partition: int) -> int:
        return max(n for n, c in self.configs.items() if c.get("partition-id") == partition)  # the newest

    def kill(self, partition: int, detected: bool = True) -> None:
        """The node of `partition` dies (SIGKILL: no goodbye); detected: its heartbeats have run out."""
        n = self.node_of(partition)
        self.dead.add(n)
        (self.detected.add if detected else self.detected.discard)(n)

    def revive(self, partition: int) -> int:
        """The partition's SuperNode starts again: a new node id, the same node config."""
        n = self.node_of(partition)
        new = n + 1
        self.configs[new], self.states[new] = self.configs[n], RecordDict()
        return new

    def get_node_ids(self):
        return [n for n in self.configs if n not in self.dead]

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.constant import ErrorCode
        from flwr.server.superlink.linkstate.utils import (
            create_message_error_unavailable_res_message,
        )

        replies = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what HttpGrid.push_messages does
            n = m.metadata.dst_node_id
            if n in self.dead:
                if n in self.detected:
                    replies.append(create_message_error_unavailable_res_message(m.metadata, "node_unavail"))
                continue
            ctx = Context(
                run_id=1, node_id=n, node_config=self.configs[n], state=self.states[n], run_config=self.run_config
            )
            try:
                reply = flower_client.app(m, ctx)
            except Exception as e:  # what flwr's run_clientapp does with a ClientApp that raises
                reply = Message(
                    Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(type(e)) + ":<'" + str(e) + "'>"),
                    reply_to=m,
                )
            if self.tamper is not None:
                reply = self.tamper(self.configs[n].get("partition-id"), m, reply)
            replies.extend(reply if isinstance(reply, list) else [reply] if reply is not None else [])
        return replies[::-1]


def serve(world: Path, out: Path, tamper=None, nodes=None, grid=None, missing=(), **overrides) -> dict:
    """Run the ServerApp against 3 in-process clients (or `grid(nodes, run_config)`'s); results.json (or the
    exception the server raised). `missing`: the clients expected missing from the results; the server must then
    end normally (the run's completed status) after one log line for each naming it and the others' results.md."""
    run_config = {**RUN, "out-dir": str(out), **{k.replace("_", "-"): v for k, v in overrides.items()}}
    nodes = nodes or [
        {
            "partition-id": k,
            "num-partitions": 3,
            "backbone": str(world / "backbone.pt"),
            "data-dir": str(world / "data"),
        }
        for k in range(3)
    ]
    threads = torch.get_num_threads()
    try:
        grid = grid(nodes, run_config) if grid else InProcessGrid(nodes, run_config, tamper)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            flower_server.app(grid, Context(0, 0, {}, RecordDict(), run_config))
        print(log.getvalue(), end="")
        lines = [line for line in log.getvalue().splitlines() if line.startswith("MISSING ")]
        assert [line.split()[1].rstrip(":") for line in lines] == list(missing), lines
        n = run_config["num-clients"] - len(missing)
        whose = "the other client's" if n == 1 else f"the other {n} clients'"
        assert all(f"; {whose} results are in {out}/results.md" in line for line in lines), lines
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "results.json").read_text())


def final_adapter(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=True)["fedit"]["global_state"]


class Unpicklable:
    """Pickled as a call (os.getpid here, harmless): what a crafted file does to run code when unpickled."""

    def __reduce__(self):
        import os

        return (os.getpid, ())
