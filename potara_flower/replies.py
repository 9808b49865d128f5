"""What the ServerApp (server_app.py) accepts from its clients: which reply answers which message, and what a
train or evaluate reply must hold before anything of it is used. A client is not trusted: every reply is either
used whole or recorded as that client's failure, with one line saying why; nothing in a reply can end the run.

Which reply is whose. A real SuperLink (flwr 1.42) hands the ServerApp, for a message sent to node n:

    - n's reply: src_node_id = n, reply_to_message_id = the message's id; an error reply when the ClientApp
      raised (ErrorCode.CLIENT_APP_RAISED_EXCEPTION = 2, supernode/runtime/run_clientapp.py:197-213) or its
      process died (CLIENT_APP_CRASHED = 8, supernode/nodestate/in_memory_nodestate.py:36-37, 226-234);
    - for a dead node, the SuperLink's own error reply: src_node_id = SUPERLINK_NODE_ID (1), not n, with
      reply_to_message_id = the message's id and NODE_UNAVAILABLE = 5, once n has missed its heartbeats
      (server/superlink/linkstate/utils.py:114-158 and :281-326, called from in_memory_linkstate.py:380-396 on
      every pull; a node is online until last heartbeat + HEARTBEAT_PATIENCE (2) x 30 s, common/constant.py:44-51);
      MESSAGE_UNAVAILABLE = 3 / REPLY_MESSAGE_UNAVAILABLE = 4 the same way for an expired message or reply;
    - nothing at all before that: Grid.send_and_receive returns when its timeout is up
      (superlink/grid/http_grid.py:384-413), so a hung node and a freshly dead one both just miss the round.

So replies are matched to the messages they answer by reply_to_message_id (as flwr's grid itself does,
http_grid.py:406-408), never by src_node_id; the SuperLink stores no reply from another node than the
message's destination (server/superlink/linkstate/in_memory_linkstate.py:295-302), so a reply from a third
node, or a second reply to one message, means a Grid that is not a SuperLink's: the client is recorded failed.
"""

from __future__ import annotations

import math

from flwr.app import Message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from fed import ClientReply
from potara_flower.task import ADAPTER, METRICS, from_record, record_bytes
from potara_harness.evaluation import lam_grid
from potara_harness.report import METHOD_LABELS

ERROR_NAMES = {v: k for k, v in vars(ErrorCode).items() if isinstance(v, int)}  # 5 -> "NODE_UNAVAILABLE"
REPLIED_METHODS = tuple(m for m in METHOD_LABELS if m != "fedsa")  # every method the Flower client scores


def short(text, limit: int = 300) -> str:
    """A client's text as one printable line of at most `limit` characters (it goes into the log and results.md)."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


def ask(grid, node_ids, message_type: str, content, timeout: float) -> tuple[dict, dict]:
    """Send content(n) to every node n; returns ({n: its reply}, {n: why it failed}), every node in exactly one.
    Replies are matched by reply_to_message_id (module docstring); the Grid gives each message its id on push."""
    msgs = [Message(content(n), dst_node_id=n, message_type=message_type) for n in node_ids]
    replies = list(grid.send_and_receive(msgs, timeout=timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    if len(sent) != len(msgs) or "" in sent:
        raise RuntimeError("the Grid did not give every message its own id: replies cannot be matched")
    answers, failed, seen = {}, {}, {}
    for r in replies:
        md = r.metadata
        n = sent.get(md.reply_to_message_id)
        if n is None:
            print(f"warning: ignored a reply from node {md.src_node_id} to no message of this step")
            continue
        seen[n] = seen.get(n, 0) + 1
        if seen[n] > 1:
            answers.pop(n, None)
            failed[n] = f"{seen[n]} replies to one message"
        elif md.src_node_id == n:
            if r.has_error():
                failed[n] = f"client error: {short(r.error.reason)}"
            else:
                answers[n] = r
        elif md.src_node_id == SUPERLINK_NODE_ID and r.has_error():
            code = ERROR_NAMES.get(r.error.code, r.error.code)
            failed[n] = f"{code} (from the SuperLink): {short(r.error.reason)}"
        else:
            failed[n] = f"a reply from node {md.src_node_id}, not from node {n}"
    for n in node_ids:
        if n not in answers and n not in failed:
            failed[n] = f"no reply within {timeout:g} s"
    return answers, failed


def number(x, what: str, low: float = -math.inf, high: float = math.inf, finite: bool = True) -> float:
    """x as a float if it is an int or float (not a bool) within [low, high] (NaN/Inf only if not `finite`)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"{what} = {short(repr(x), 60)}: not a number")
    x = float(x)
    if math.isfinite(x) and not low <= x <= high or not math.isfinite(x) and finite:
        raise ValueError(f"{what} = {x!r}: outside [{low:g}, {high:g}]")
    return x


def timings(metrics, keys) -> dict[str, float]:
    """A train reply's optional '<key>-seconds' metrics, each a finite number >= 0."""
    return {k: number(metrics[f"{k}-seconds"], f"{k}-seconds", 0.0) for k in keys if f"{k}-seconds" in metrics}


def train_reply(r, n_k: int, timing_keys) -> tuple[ClientReply, dict[str, float], int]:
    """A train reply -> (fed.ClientReply with the set-up's n_k, its timings, its adapter's wire bytes), parsed
    whole before any of it is kept. The count must be n_k (the weight is fixed at set-up), the loss a number
    (fed.server_round rejects a non-finite one), the timings finite and >= 0; the adapter is only read here
    (updates.validate_update checks it against phi^t)."""
    metrics = r.content[METRICS]
    count = metrics["num-examples"]
    if type(count) is not int or count != n_k:
        raise ValueError(f"num-examples {short(count, 40)} is not the {n_k} of set-up")
    reply = ClientReply(from_record(r.content[ADAPTER]), n_k, number(metrics["train-loss"], "train-loss", finite=False))
    return reply, timings(metrics, timing_keys), record_bytes(r.content[ADAPTER])


def check_evaluation(tree, grid_step: float) -> dict:
    """A client's unflattened evaluate reply, checked before any of it is used (report.collect_results, results.md,
    the plots read exactly these fields): acc[m] in [0, 1] for every method the client scores; record with
    lam_potara, lam_grid_val, lam_grid_oracle in [0, 1], abs_lam_diff = |lam_potara - lam_grid_val|, the grid's
    curves on the run's lam grid (accuracies in [0, 1], val losses numbers), Potara's info (its lam in [0, 1],
    what results.md prints of it), fallbacks and bad statistics as short strings. Returns the tree; ValueError else."""
    if not isinstance(tree, dict) or not {"acc", "record"} <= set(tree) <= {
        "acc",
        "record",
        "fallbacks",
        "bad-statistics",
    }:
        raise ValueError(f"keys {sorted(tree)[:6] if isinstance(tree, dict) else tree!r} are not an evaluation's")
    acc, rec = tree["acc"], tree["record"]
    if not isinstance(acc, dict) or set(acc) != set(REPLIED_METHODS):
        raise ValueError(
            f"acc has methods {sorted(acc) if isinstance(acc, dict) else acc!r}, not {list(REPLIED_METHODS)}"
        )
    tree["acc"] = {m: number(acc[m], f"acc/{m}", 0.0, 1.0) for m in REPLIED_METHODS}
    need = {"potara", "lam_potara", "lam_grid_val", "lam_grid_oracle", "abs_lam_diff", "barrier", "grid"}
    if not isinstance(rec, dict) or not need - {"barrier"} <= set(rec) <= need:
        raise ValueError(f"record keys {sorted(rec) if isinstance(rec, dict) else rec!r} are not {sorted(need)}")
    lam = {k: number(rec[k], k, 0.0, 1.0) for k in ("lam_potara", "lam_grid_val", "lam_grid_oracle", "abs_lam_diff")}
    if lam["abs_lam_diff"] != abs(lam["lam_potara"] - lam["lam_grid_val"]):
        raise ValueError(f"abs_lam_diff = {lam['abs_lam_diff']!r} is not |lam_potara - lam_grid_val|")
    if "barrier" in rec:
        number(rec["barrier"], "barrier", 0.0, finite=False)
    check_grid(rec["grid"], lam_grid(grid_step), lam)
    check_potara(rec["potara"], lam["lam_potara"])
    for key in ("fallbacks", "bad-statistics"):
        items = tree.get(key, [])
        if not isinstance(items, list) or len(items) > 10 or not all(isinstance(s, str) for s in items):
            raise ValueError(f"{key} is not a short list of strings")
        tree[key] = [short(s) for s in items]
    return tree


def check_grid(grid, lams: list[float], chosen: dict) -> None:
    """The grid search's curves: lam exactly the run's grid, val/test accuracies and val losses one per lam."""
    if not isinstance(grid, dict) or not {"lam", "val", "test"} <= set(grid) <= {"lam", "val", "test", "val_loss"}:
        raise ValueError("grid is not {lam, val, test, val_loss}")
    if grid["lam"] != lams:
        raise ValueError("grid/lam is not the run's lam grid")
    for key in ("val", "test", "val_loss"):
        curve = grid.get(key, [])
        if not isinstance(curve, list) or len(curve) != len(lams) and (key != "val_loss" or curve):
            raise ValueError(f"grid/{key} does not hold one value per lam")
        high, finite = (1.0, True) if key != "val_loss" else (math.inf, False)
        grid[key] = [number(v, f"grid/{key}", 0.0 if finite else -math.inf, high, finite) for v in curve]
    if chosen["lam_grid_val"] not in lams or chosen["lam_grid_oracle"] not in lams:
        raise ValueError("lam_grid_val / lam_grid_oracle are not points of the lam grid")


def check_potara(info, lam_potara: float) -> None:
    """Potara's info: lam (a number, or one per module whose mean is lam_potara) in [0, 1], and what results.md
    prints: the paper's a, b, c, or the default's candidate, barrier and Hermite lam."""
    if not isinstance(info, dict) or "lam" not in info:
        raise ValueError("record/potara has no lam")
    lam = info["lam"]
    values = list(lam.values()) if isinstance(lam, dict) and lam else [lam]
    values = [number(v, "potara/lam", 0.0, 1.0) for v in values]
    if (sum(values) / len(values) if isinstance(lam, dict) else values[0]) != lam_potara:
        raise ValueError("lam_potara is not Potara's lam")
    if "a" in info:
        for t in "abc":
            terms = info.get(t)
            for v in terms.values() if isinstance(terms, dict) and terms else [terms]:
                number(v, f"potara/{t}", finite=False)
    else:
        if not isinstance(info.get("candidate"), str):
            raise ValueError("potara/candidate is not a string")
        info["candidate"] = short(info["candidate"], 80)
        number(info.get("barrier"), "potara/barrier", finite=False)
        if info.get("lam_hermite") is not None:
            number(info["lam_hermite"], "potara/lam_hermite", finite=False)
