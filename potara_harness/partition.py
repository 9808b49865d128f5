"""Client partitions: which samples each federated client holds, and its train / val / test split.

    parts = dirichlet_partition(labels, num_clients=10, alpha=0.5, samples_per_client=1500, seed=0)
    parts = class_split_partition(labels, coarse_labels, 10, 1500, seed=0)   # task split (superclasses)
    train, val, test = split_client(parts[0], (1000, 100, 400), seed=0)
    public, pool = public_and_pool(len(labels), 5000)    # images no client holds (backbone pre-training)
    splits = client_splits(images, labels, pool, parts, (1000, 100, 400), seed=0)   # data.ClientSplits

Works on any labelled set (CIFAR-100 from data.py, the digits of digits.py): indices in, index arrays out.
All partitions are deterministic for a seed (numpy Generator); an impossible request is one DataError.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from potara_harness.data import ClientSplits, DataError


# ----------------------------------------------------------------------------- partitions
def _check_sizes(num_samples: int, num_clients: int, samples_per_client: int) -> None:
    if num_clients < 1 or samples_per_client < 1:
        raise DataError(f"need num_clients >= 1 and samples_per_client >= 1, got {num_clients}, {samples_per_client}")
    if num_clients * samples_per_client > num_samples:
        raise DataError(
            f"{num_clients} clients x {samples_per_client} samples = {num_clients * samples_per_client} "
            f"> the {num_samples} samples available"
        )


def dirichlet_partition(
    labels: Sequence[int], num_clients: int, alpha: float, samples_per_client: int | None = None, seed: int = 0
) -> list[np.ndarray]:
    """Label-skew partition (the paper's setting): client k draws its class mix q_k ~ Dir(alpha * 1_C)
    and then samples_per_client disjoint samples with labels ~ q_k, without replacement; when a class
    runs out, q_k is renormalised over the classes left. Small alpha: a few classes per client;
    alpha -> inf: every client sees the global label distribution. Default size: an equal share."""
    labels = np.asarray(labels)
    if not alpha > 0 or not np.isfinite(alpha):
        raise DataError(f"Dirichlet alpha must be a positive number, got {alpha}")
    n = samples_per_client if samples_per_client is not None else len(labels) // max(num_clients, 1)
    _check_sizes(len(labels), num_clients, n)
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    used = np.zeros(len(classes), dtype=np.int64)
    avail_total = np.array([len(p) for p in pools])
    parts = []
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(len(classes), float(alpha)))
        if not np.isfinite(q).all() or q.sum() <= 0:  # alpha so small that every gamma draw underflowed
            q = np.eye(len(classes))[rng.integers(len(classes))]
        take, need = np.zeros(len(classes), dtype=np.int64), n
        while need > 0:
            avail = avail_total - used - take
            w = q * (avail > 0)
            w = w if w.sum() > 0 else (avail > 0).astype(float)  # its classes are exhausted: any class left
            draw = np.minimum(rng.multinomial(need, w / w.sum()), avail)
            take += draw
            need -= int(draw.sum())
        parts.append(np.sort(np.concatenate([pools[c][used[c] : used[c] + take[c]] for c in range(len(classes))])))
        used += take
    return parts


def class_split_partition(
    labels: Sequence[int], groups: Sequence[int], num_clients: int, samples_per_client: int, seed: int = 0
) -> list[np.ndarray]:
    """Task split: the groups (e.g. CIFAR-100's 20 superclasses, `groups` = coarse label of each sample)
    are dealt out to clients, each client owning disjoint groups; it samples uniformly from its groups'
    images. `labels` is only used to check that sizes match."""
    groups = np.asarray(groups)
    if len(groups) != len(labels):
        raise DataError(f"{len(labels)} labels but {len(groups)} group ids")
    ids = np.unique(groups)
    if not 1 <= num_clients <= len(ids):
        raise DataError(f"a class split needs 1 <= clients <= the {len(ids)} groups, got {num_clients} clients")
    _check_sizes(len(groups), num_clients, samples_per_client)
    rng = np.random.default_rng(seed)
    parts = []
    for owned in np.array_split(rng.permutation(ids), num_clients):
        pool = np.flatnonzero(np.isin(groups, owned))
        if len(pool) < samples_per_client:
            raise DataError(
                f"groups {sorted(owned.tolist())} hold {len(pool)} samples, fewer than the "
                f"{samples_per_client} asked per client"
            )
        parts.append(np.sort(rng.choice(pool, samples_per_client, replace=False)))
    return parts


def label_partition(
    kind: str,
    labels: np.ndarray,
    coarse_labels: np.ndarray,
    num_clients: int,
    alpha: float,
    samples_per_client: int,
    seed: int,
) -> list[np.ndarray]:
    """The CIFAR pipelines' choice: "dirichlet" (label skew, dirichlet_partition with `alpha`) or "superclass"
    (each client its own superclasses, class_split_partition over `coarse_labels`)."""
    if kind == "dirichlet":
        return dirichlet_partition(labels, num_clients, alpha, samples_per_client, seed)
    if kind == "superclass":
        return class_split_partition(labels, coarse_labels, num_clients, samples_per_client, seed)
    raise DataError(f"unknown partition {kind!r}: 'dirichlet' or 'superclass'")


def split_client(indices: np.ndarray, sizes: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """A client's indices -> disjoint random parts of the given sizes (train, val, test), all drawn from
    the same client distribution."""
    if any(s < 0 for s in sizes) or sum(sizes) > len(indices):
        raise DataError(f"cannot split {len(indices)} samples into parts of sizes {list(sizes)}")
    perm = np.random.default_rng(seed).permutation(np.asarray(indices))
    return [np.sort(p) for p in np.split(perm[: sum(sizes)], np.cumsum(sizes)[:-1])]


def unassigned(num_samples: int, parts: Sequence[np.ndarray]) -> np.ndarray:
    """Indices no client holds (the public pool, e.g. for pre-training a backbone)."""
    mask = np.ones(num_samples, dtype=bool)
    for p in parts:
        mask[p] = False
    return np.flatnonzero(mask)


# ----------------------------------------------------------------------------- public set and client splits
PUBLIC_SEED = 12345  # fixed: the public set (and so a backbone pre-trained on it) does not depend on --seed


def public_and_pool(num_samples: int, public: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random `public` images no client holds (backbone pre-training), and the rest (the client pool)."""
    order = np.random.default_rng(PUBLIC_SEED).permutation(num_samples)
    return np.sort(order[:public]), np.sort(order[public:])


def client_splits(
    images: torch.Tensor,
    labels: np.ndarray,
    pool: np.ndarray,
    parts: Sequence[np.ndarray],
    sizes: Sequence[int],
    seed: int,
    relabel: Sequence[np.ndarray] | None = None,
) -> list[ClientSplits]:
    """Client k's partition parts[k] (indices into `pool`) -> ClientSplits client<k> with train / val / test of
    `sizes` (split_client, seeded with seed * 1000 + k); relabel[k], when given, maps client k's labels."""
    splits = []
    for k, part in enumerate(parts):
        idx = [pool[i] for i in split_client(part, sizes, seed=seed * 1000 + k)]
        x = [images[torch.from_numpy(i)] for i in idx]
        y = [torch.from_numpy(labels[i] if relabel is None else relabel[k][labels[i]]) for i in idx]
        splits.append(ClientSplits(f"client{k}", x[0], y[0], x[1], y[1], x[2], y[2]))
    return splits
