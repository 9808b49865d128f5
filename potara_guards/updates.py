"""A client's update, untrusted: what a server checks before it averages a reply that crossed a network.

    reason = validate_update(update, phi_t, max_norm)      # None, or why it must not be averaged; never raises
    outcome = fed.server_round(t, phi_t, selected, replies, names, max_update_norm, problem=reply_problem)

fed.reply_problem checks a reply's keys, shapes, dtypes and values, as a caller's own code may get them wrong.
A reply from a peer may be crafted: tensor_checks.check_tensors first reads only its metadata (a plain dense
tensor, no element addressed twice or beyond its storage, a bounded size), so an expanded view posing as a huge
tensor is refused before any value is read. Limits, by design: the reported n_k is trusted as the FedAvg weight
once it is an int in [1, 2**53] (a client can claim more data than it has), and a norm bound limits each update,
not a group of colluding clients that each stay under it.
"""

from __future__ import annotations

import fed
from potara_guards.tensor_checks import check_tensors


def validate_update(update, reference: dict, max_norm: float | None = None) -> str | None:
    """Why a client's update must not be aggregated, or None if it is fine: check_tensors against the reference
    (phi^t: keys, layout, dtype, shape, strides and storage, finite values), then the L2 distance
    ||update - reference|| over all tensors must be <= max_norm when given. Never raises."""
    try:
        check_tensors(update, reference, what="update")
    except ValueError as e:
        return str(e)
    return fed.reply_problem((update, 1, 0.0), reference, max_norm)


def reply_problem(reply, global_state: dict, max_update_norm: float | None = None) -> str | None:
    """fed.reply_problem for a reply from a peer: its tensors pass check_tensors first (validate_update)."""
    if isinstance(reply, tuple) and len(reply) == 3:
        reason = validate_update(reply[0], global_state)
        if reason is not None:
            return reason
    return fed.reply_problem(reply, global_state, max_update_norm)
