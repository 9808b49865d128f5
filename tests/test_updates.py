"""Specification of potara_guards/updates.py: a client's update from a peer is checked with a reason and never a
raise: crafted tensors (sparse, meta, expanded views posing as huge ones, wrong dtypes, not tensors) refused before
any value is read; the norm bound; a whole reply through fed.server_round's `problem` hook."""

import torch

from fed import ClientReply, server_round
from potara_guards.updates import reply_problem, validate_update


def test_validate_update_rejects_crafted_tensors_with_a_reason_and_never_raises():
    ref = {"w": torch.zeros(3, 4), "b": torch.zeros(4)}
    crafted = {
        "sparse": torch.zeros(3, 4).to_sparse(),
        "meta": torch.empty(3, 4, device="meta"),
        "expanded": torch.zeros(1, 4).expand(3, 4),
        "int": torch.zeros(3, 4, dtype=torch.int64),
        "huge": torch.zeros(1).expand(200000, 200000),
        "list": [[0.0] * 4] * 3,
    }
    for name, t in crafted.items():
        reason = validate_update({"w": t, "b": torch.zeros(4)}, ref)
        assert isinstance(reason, str) and reason.startswith("update: w"), (name, reason)
    assert validate_update("not a dict", ref) == "update: expected a dict of tensors, got str"
    assert validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref) is None
    assert "exceeds max_update_norm 3" in validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref, 3.0)
    assert validate_update({"w": torch.ones(3, 4), "b": torch.zeros(4)}, ref, 3.5) is None  # sqrt(12) = 3.46


def test_the_servers_round_with_the_guards_rejects_a_crafted_reply_the_plain_check_would_read():
    """fed.server_round with problem=reply_problem: a reply whose tensor is a 200000 x 200000 view of one stored
    element is refused by its metadata, with its reason; the good reply is averaged alone."""
    g = {"w": torch.zeros(3)}
    crafted = {"w": torch.zeros(1).expand(3)}  # the right shape, one element stored three times
    replies = {0: ClientReply({"w": torch.ones(3)}, 2, 0.5), 1: ClientReply(crafted, 2, 0.5)}
    out = server_round(0, g, [0, 1], replies, ["c0", "c1"], problem=reply_problem)
    assert out.accepted == [0] and "overlapping or expanded view" in out.history["rejected"][0]["reason"]
    assert torch.equal(out.global_state["w"], torch.ones(3))
    plain = server_round(0, g, [0, 1], replies, ["c0", "c1"])  # the method's own check: a caller's honest values
    assert plain.accepted == [0, 1]
