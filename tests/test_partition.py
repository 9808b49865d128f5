"""Specification of partition.py: label-skew (Dirichlet) and task (superclass) partitions are deterministic,
disjoint and of the asked sizes, and follow alpha; client splits are disjoint draws from each client's part;
the public set is fixed and disjoint from the client pool. Impossible requests are one-line DataErrors."""

import numpy as np
import pytest
import torch

from potara_harness.data import DataError
from potara_harness.partition import (
    class_split_partition,
    client_splits,
    dirichlet_partition,
    label_partition,
    public_and_pool,
    split_client,
    unassigned,
)


def labels_of(num_classes, per_class, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(num_classes), per_class))


# ----------------------------------------------------------------------------- Dirichlet partition
def test_dirichlet_partition_deterministic_disjoint_sizes():
    labels = labels_of(20, 100)
    a = dirichlet_partition(labels, 7, alpha=0.3, samples_per_client=150, seed=3)
    b = dirichlet_partition(labels, 7, alpha=0.3, samples_per_client=150, seed=3)
    c = dirichlet_partition(labels, 7, alpha=0.3, samples_per_client=150, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    assert [len(p) for p in a] == [150] * 7
    flat = np.concatenate(a)
    assert len(np.unique(flat)) == len(flat)  # disjoint, no repeats
    assert flat.min() >= 0 and flat.max() < len(labels)


def test_dirichlet_partition_uses_everything_when_asked_for_all():
    labels = labels_of(10, 30)  # 300 samples, 6 x 50: classes run out and q is renormalised
    parts = dirichlet_partition(labels, 6, alpha=0.05, samples_per_client=50, seed=0)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(300))
    default = dirichlet_partition(labels, 4, alpha=1.0, seed=0)  # default size: an equal share
    assert [len(p) for p in default] == [75] * 4


def test_dirichlet_label_concentration_follows_alpha():
    """Mean Herfindahl index sum_c p_c^2 of the clients' label histograms against its expectation under
    q ~ Dir(alpha 1_C) and n draws: E = (1 - 1/n) (alpha + 1) / (C alpha + 1) + 1/n (pools never run out)."""
    C, n, K = 10, 50, 150
    labels = labels_of(C, 2000)
    means = []
    for alpha in (0.1, 1.0, 10.0):
        parts = dirichlet_partition(labels, K, alpha=alpha, samples_per_client=n, seed=1)
        hhi = [np.sum((np.bincount(labels[p], minlength=C) / n) ** 2) for p in parts]
        expected = (1 - 1 / n) * (alpha + 1) / (C * alpha + 1) + 1 / n
        assert abs(np.mean(hhi) - expected) < 0.05, (alpha, np.mean(hhi), expected)
        means.append(np.mean(hhi))
    assert means[0] > means[1] > means[2]  # smaller alpha: more concentrated clients
    # alpha -> inf: every client looks like the global (uniform) label distribution
    parts = dirichlet_partition(labels, 20, alpha=1e4, samples_per_client=500, seed=2)
    tv = [0.5 * np.abs(np.bincount(labels[p], minlength=C) / 500 - 1 / C).sum() for p in parts]
    assert max(tv) < 0.12


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (dict(num_clients=3, alpha=0.0), "alpha must be a positive"),
        (dict(num_clients=3, alpha=-1.0), "alpha must be a positive"),
        (dict(num_clients=3, alpha=float("nan")), "alpha must be a positive"),
        (dict(num_clients=0, alpha=1.0, samples_per_client=5), "num_clients >= 1"),
        (dict(num_clients=11, alpha=1.0, samples_per_client=10), "> the 100 samples"),
        (dict(num_clients=101, alpha=1.0), "samples_per_client >= 1"),
    ],
)
def test_dirichlet_partition_errors(kwargs, msg):
    with pytest.raises(DataError, match=msg):
        dirichlet_partition(labels_of(10, 10), **kwargs)


# ----------------------------------------------------------------------------- other splits
def test_class_split_partition_gives_disjoint_groups():
    fine = labels_of(100, 12)
    coarse = fine // 5
    parts = class_split_partition(fine, coarse, 6, 100, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, class_split_partition(fine, coarse, 6, 100, seed=0)))
    owned = [set(coarse[p].tolist()) for p in parts]
    assert all(len(p) == 100 for p in parts)
    for i in range(6):
        for j in range(i + 1, 6):
            assert not owned[i] & owned[j]
    assert sorted(len(o) for o in owned) == [3, 3, 3, 3, 4, 4]  # 20 superclasses dealt out to 6 clients
    with pytest.raises(DataError, match="clients <= the 20 groups"):
        class_split_partition(fine, coarse, 21, 10)
    with pytest.raises(DataError, match="fewer than"):
        class_split_partition(fine, coarse, 7, 121)  # a client owning 2 superclasses has 2 x 5 x 12 = 120


def test_split_client_and_unassigned():
    idx = np.arange(100, 160)
    tr, va, te = split_client(idx, (30, 10, 15), seed=1)
    assert (len(tr), len(va), len(te)) == (30, 10, 15)
    allp = np.concatenate([tr, va, te])
    assert len(np.unique(allp)) == 55 and set(allp) <= set(idx)
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), split_client(idx, (30, 10, 15), seed=1)))
    with pytest.raises(DataError, match="cannot split 60"):
        split_client(idx, (40, 20, 1))
    rest = unassigned(200, [tr, va, te])
    assert len(rest) == 145 and not set(rest) & set(allp)


# ----------------------------------------------------------------------------- the public set and client splits
def test_public_and_pool_is_fixed_disjoint_and_complete():
    public, pool = public_and_pool(1000, 150)
    assert len(public) == 150 and len(pool) == 850 and not set(public) & set(pool)
    assert sorted(np.concatenate([public, pool]).tolist()) == list(range(1000))
    again, _ = public_and_pool(1000, 150)
    assert np.array_equal(public, again)  # no seed argument: the same public set on every run


def test_client_splits_take_each_clients_own_part_and_relabel():
    images = torch.arange(300).view(300, 1)  # image i holds the number i: the split can be read back
    labels = np.arange(300) % 7
    pool = np.arange(100, 300)  # parts index into the pool
    parts = [np.arange(0, 40), np.arange(40, 80)]
    relabel = [np.arange(7), (np.arange(7) + 1) % 7]
    splits = client_splits(images, labels, pool, parts, (20, 5, 10), seed=3, relabel=relabel)
    for k, s in enumerate(splits):
        assert s.name == f"client{k}"
        ids = [x.flatten().numpy() for x in (s.train_inputs, s.val_inputs, s.test_inputs)]
        assert [len(i) for i in ids] == [20, 5, 10]
        taken = np.concatenate(ids)
        assert len(set(taken)) == 35 and set(taken) <= set(pool[parts[k]].tolist())
        expected = [pool[i] for i in split_client(parts[k], (20, 5, 10), seed=3 * 1000 + k)]
        assert all(np.array_equal(i, e) for i, e in zip(ids, expected))
        for x, y in ((s.train_inputs, s.train_targets), (s.val_inputs, s.val_targets), (s.test_inputs, s.test_targets)):
            assert torch.equal(y, torch.from_numpy((x.flatten().numpy() % 7 + k) % 7))  # client 1's labels shifted


def test_label_partition_is_the_pipelines_choice_of_partition():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(100), 12))
    coarse = labels // 5
    got = label_partition("dirichlet", labels, coarse, 4, 0.5, 30, seed=2)
    want = dirichlet_partition(labels, 4, 0.5, 30, 2)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == 4
    got = label_partition("superclass", labels, coarse, 4, 0.5, 30, seed=2)
    want = class_split_partition(labels, coarse, 4, 30, 2)
    assert all(np.array_equal(a, b) for a, b in zip(got, want)) and len(got) == 4
    with pytest.raises(DataError, match="unknown partition 'nope'"):
        label_partition("nope", labels, coarse, 4, 0.5, 30, seed=2)
