"""Flower's floor: the Potara app's FedIT round with the work taken out. The ServerApp sends an array of
`numel` float32 numbers (the size of the adapter) to every SuperNode each round; the ClientApp sends it
straight back. What a round costs here is what Flower itself costs: a fresh ClientApp process per message
(interpreter, flwr-clientapp, its hand-shake), the SuperNodes' polling, and moving the arrays. It imports
flwr and numpy only (no torch), so it is the least any ClientApp can cost; potara_flower/bench.py runs it
on the same federation as the Potara app and prints both.

Run config `imports` (comma-separated module names, default none): the ClientApp imports them before it
answers. Flower starts a process per message, so a round then also pays for what a device of an experiment
cannot do without (torch and torchvision for the vision model, torch and transformers' Llama for the
language one): the floor a torch app is measured against.
"""

import importlib
import json
import os
import tempfile
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

app = ClientApp()  # one name per line: flwr finds components by reading the file (ast), not importing it
server = ServerApp()


@app.train()
def echo(msg: Message, context: Context) -> Message:
    for name in str(context.run_config.get("imports", "")).split(","):
        if name.strip():
            importlib.import_module(name.strip())
    return Message(msg.content, reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    """`rounds` rounds over num-clients SuperNodes; out-dir/floor.json holds each round's seconds and whether
    every node answered."""
    cfg = context.run_config
    k, deadline = int(cfg["num-clients"]), time.time() + 300
    while len(nodes := sorted(grid.get_node_ids())) < k:
        if time.time() > deadline:
            raise RuntimeError(f"only {len(nodes)} of num-clients={k} SuperNodes connected within 300 s")
        time.sleep(1.0)
    record = ArrayRecord({"adapter": Array(np.zeros(int(cfg["numel"]), np.float32))})
    rounds = []
    for t in range(int(cfg["rounds"])):
        t0 = time.time()
        msgs = [
            Message(
                RecordDict({"adapter": record, "config": ConfigRecord({"round": t})}),
                dst_node_id=n,
                message_type="train",
            )
            for n in nodes[:k]
        ]
        replies = list(grid.send_and_receive(msgs, timeout=600))
        ok = len(replies) == k and not any(r.has_error() for r in replies)
        rounds.append({"seconds": time.time() - t0, "answered": ok})
        print(f"floor round {t + 1}: {rounds[-1]['seconds']:.2f} s, all answered: {ok}")
    out = os.path.abspath(cfg["out-dir"])
    os.makedirs(out, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out, prefix=".floor.json.", suffix=".tmp")  # a new, random name (O_EXCL)
    with os.fdopen(fd, "w") as f:
        json.dump({"rounds": rounds}, f)
    os.replace(tmp, os.path.join(out, "floor.json"))  # replaces a link planted at floor.json, never follows it
