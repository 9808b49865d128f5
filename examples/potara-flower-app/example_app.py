"""Potara in your own Flower app: your model, your data, your FedAvg (Flower's own strategy), and one call,
potara.personalize, in your ClientApp's evaluate handler; the ServerApp prints each client's lam and
accuracies. A whole Flower app with pyproject.toml beside it: `flwr run examples/potara-flower-app <connection>`
(docs/flower-your-app.md). tests/test_flower_example.py runs it through Flower's own app loader, in-process
against an independent FedAvg and a direct personalize, and on a real SuperLink with 2 SuperNodes.

Nothing here is this project's pipeline: a user's MLP, a user's training loop, a user's data (each client
swaps two labels: a concept shift that one global model cannot fit for everyone; few samples each, so the
client's own model alone is noisy). What Potara adds:

    phi_0   the model every client and the server start from (make_model(seed): the same on every device)
    phi_G   the global model after your FedAvg rounds (what the evaluate message carries)
    phi_L   the client's own model: YOUR training loop from phi_0 on the client's train split, once,
            kept on the device in context.state (Flower keeps a node's state between messages of a run)
    lam     potara.personalize(model, phi_G, phi_L, held_out=validation batches): the weight on phi_G,
            read off the client's HELD-OUT validation split (never its train split: on the data phi_L was
            trained on, phi_L always looks best), then phi = lam phi_G + (1 - lam) phi_L
    test    every model scored on the client's test split, reported as numbers

The "adapter" Potara merges is every trainable tensor of the model: here the whole MLP. With a large
pre-trained model you would federate LoRA adapters instead (lora.add_lora) and pass those states.

On the wire: train, the global model down and the trained model up (+ n_k, the mean loss: what FedAvg
needs); evaluate, the global model down and numbers up (lam, accuracies, n_test). Never: the data, phi_L,
the merged model, the validation losses and slopes Potara reads.

This one module is both apps (pyproject.toml: serverapp = "example_app:server", clientapp = "example_app:app"),
so the ServerApp's process imports potara too. potara.py is copied beside this file (`cp potara.py
examples/potara-flower-app/`): `flwr run` ships it with the app to the server and to every device.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from potara import personalize

FEATURES, CLASSES, SPLITS = 16, 4, {"train": 32, "val": 96, "test": 200}


# ----------------------------------------------------------------------------- the user's model, data, training
def make_model(seed: int) -> nn.Module:
    """phi_0: the same weights on every device for the same seed (the caller's RNG is left alone)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(FEATURES, 32), nn.ReLU(), nn.Linear(32, CLASSES))


def client_data(k: int, seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Client k's train / val / test: Gaussian classes around means shared by all clients; odd clients swap
    labels 0 and 1 (the same inputs, other answers: what personalisation is for)."""
    means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(1000 * seed + k + 1)
    out = {}
    for split, n in SPLITS.items():
        y = torch.randint(0, CLASSES, (n,), generator=g)
        x = means[y] + torch.randn(n, FEATURES, generator=g)
        out[split] = (x, torch.where(y < 2, y ^ (k % 2), y))
    return out


def fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, seed: int) -> float:
    """The user's own loop: `steps` Adam steps on minibatches of 16; returns the mean loss."""
    opt, g, total = torch.optim.Adam(model.parameters(), lr=lr), torch.Generator().manual_seed(seed), 0.0
    for _ in range(steps):
        idx = torch.randint(0, len(y), (16,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()
    return total / steps


def accuracy(model: nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor) -> float:
    model.load_state_dict(state)
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


# ----------------------------------------------------------------------------- the ClientApp
app = ClientApp()


def who(context: Context) -> tuple[int, int]:
    """(partition-id, seed): the node config says which client this SuperNode is, the run config the seed."""
    k, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    if not 0 <= k < n:
        raise ValueError(f"node config: partition-id={k} is not in 0..num-partitions-1 ({n})")
    return k, int(context.run_config["seed"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Plain FedAvg training: phi^t in, `local-steps` of the user's loop, phi_k^{t+1} and n_k out."""
    (k, seed), t = who(context), int(msg.content["config"]["server-round"])
    x, y = client_data(k, seed)["train"]
    model = make_model(seed)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loss = fit(
        model, x, y, int(context.run_config["local-steps"]), float(context.run_config["lr"]), seed=10_000 * t + k
    )
    metrics = MetricRecord({"num-examples": len(y), "train-loss": loss})
    return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)


def local_model(context: Context, data: dict, seed: int) -> dict[str, torch.Tensor]:
    """phi_L: the user's loop from phi_0 on the train split, trained on the first evaluate message and kept
    in the node's state (context.state survives between the messages of a run; it never leaves the device)."""
    if "potara-local" not in context.state:
        model = make_model(seed)
        fit(
            model,
            *data["train"],
            int(context.run_config["local-train-steps"]),
            float(context.run_config["lr"]),
            seed=99_999 - who(context)[0],
        )
        context.state["potara-local"] = ArrayRecord(model.state_dict())
    return context.state["potara-local"].to_torch_state_dict()


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """The Potara step: lam from the held-out validation split, the merge, and the test accuracies of
    phi_G, phi_L and the merge. Only numbers go back."""
    k, seed = who(context)
    data, model = client_data(k, seed), make_model(seed)
    G, L = msg.content["arrays"].to_torch_state_dict(), local_model(context, data, seed)
    merged, info = personalize(model, G, L, held_out=[data["val"]])  # held out: never the train split
    x, y = data["test"]
    metrics = {
        "num-examples": len(y),
        "lam": float(info["lam"]),
        "acc-global": accuracy(model, G, x, y),
        "acc-local": accuracy(model, L, x, y),
        "acc-potara": accuracy(model, merged, x, y),
    }
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


# ----------------------------------------------------------------------------- the ServerApp: Flower's own FedAvg
class PerClientFedAvg(FedAvg):
    """Flower's FedAvg, plus one line per client after each round's evaluate: its lam and test accuracies
    (FedAvg alone logs only their mean, weighted by num-examples). Full precision, so runs compare exactly."""

    def aggregate_evaluate(self, server_round: int, replies):
        replies = list(replies)
        for r in sorted((r for r in replies if r.has_content()), key=lambda r: r.metadata.src_node_id):
            m = r.content["metrics"]
            print(
                f"round {server_round} node {r.metadata.src_node_id}: lam {m['lam']!r} acc-potara {m['acc-potara']!r}"
                f" acc-local {m['acc-local']!r} acc-global {m['acc-global']!r}",
                flush=True,
            )
        return super().aggregate_evaluate(server_round, replies)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    """Flower's FedAvg for `rounds` rounds; every round's evaluate is the clients' Potara step (each client's
    line printed, then their mean weighted by n_test: the personalised accuracy of the federation)."""
    cfg, n = context.run_config, int(context.run_config["num-clients"])
    strategy = PerClientFedAvg(fraction_evaluate=1.0, min_train_nodes=n, min_evaluate_nodes=n, min_available_nodes=n)
    result = strategy.start(
        grid, ArrayRecord(make_model(int(cfg["seed"])).state_dict()), int(cfg["rounds"]), train_config=ConfigRecord({})
    )
    print(result.evaluate_metrics_clientapp[int(cfg["rounds"])])
