"""Specification of data.py: CIFAR-100 read safely (the real layout, md5s, damaged and planted files as one
DataError), the synthetic stand-in in the same layout; label-skew (Dirichlet) and task (superclass) partitions are
deterministic, disjoint and of the asked sizes, and follow alpha; client splits are disjoint draws from each client's
part; the public set is fixed and disjoint from the client pool. Impossible requests are one-line DataErrors."""

import io
import json
import os
import pickle
import struct
import warnings
from urllib.error import URLError

import numpy as np
import pytest
import torch

import data
from data import (
    ClientSplits,
    DataError,
    class_split_partition,
    client_splits,
    dirichlet_partition,
    label_partition,
    load_cifar100,
    public_and_pool,
    split_client,
    unassigned,
    warn_held_out_overlap,
    warn_single_class,
    write_synthetic_cifar100,
)
from potara_guards import data_pickle


# ----------------------------------------------------------------------------- synthetic files + real loader
@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("syn"))
    write_synthetic_cifar100(root, train_per_class=12, test_per_class=3, seed=5)
    return root


def test_synthetic_files_have_the_cifar_layout_and_load(synthetic_root):
    folder = os.path.join(synthetic_root, "cifar-100-python")
    with open(os.path.join(folder, "train"), "rb") as f:
        raw = pickle.load(f, encoding="latin1")
    assert set(raw) == {"filenames", "batch_label", "fine_labels", "coarse_labels", "data"}
    assert raw["data"].dtype == np.uint8 and raw["data"].shape == (1200, 3072)
    with open(os.path.join(folder, "meta"), "rb") as f:
        meta = pickle.load(f, encoding="latin1")
    assert len(meta["fine_label_names"]) == 100 and len(meta["coarse_label_names"]) == 20

    d = load_cifar100(synthetic_root, download=False)  # torchvision's CIFAR100 reader
    assert d.synthetic and d.images.dtype == torch.uint8 and d.images.shape == (1500, 3, 32, 32)
    assert np.array_equal(np.bincount(d.labels, minlength=100), np.full(100, 15))
    assert np.array_equal(d.coarse_labels, d.labels // 5)
    assert d.classes == meta["fine_label_names"]
    # the loader's CHW images are the raw rows, train first
    assert torch.equal(d.images[:1200].reshape(1200, -1), torch.from_numpy(raw["data"]))
    assert np.array_equal(d.labels[:1200], raw["fine_labels"])


def test_synthetic_classes_are_learnable(synthetic_root):
    """Nearest class mean on raw pixels, 12 training images per class: far above chance (1%)."""
    d = load_cifar100(synthetic_root, download=False)
    x = d.images.float().reshape(len(d.labels), -1)
    y = torch.from_numpy(d.labels)
    means = torch.stack([x[:1200][y[:1200] == c].mean(0) for c in range(100)])
    acc = (torch.cdist(x[1200:], means).argmin(1) == y[1200:]).float().mean().item()
    assert acc > 0.2, acc


def test_synthetic_reuse_and_rewrite(synthetic_root, tmp_path):
    train = os.path.join(synthetic_root, "cifar-100-python", "train")
    before = os.stat(train).st_mtime_ns
    write_synthetic_cifar100(synthetic_root, train_per_class=12, test_per_class=3, seed=5)
    assert os.stat(train).st_mtime_ns == before  # same parameters: reused
    write_synthetic_cifar100(str(tmp_path), train_per_class=6, test_per_class=1, seed=5)
    assert load_cifar100(str(tmp_path), download=False).images.shape[0] == 700
    write_synthetic_cifar100(str(tmp_path), train_per_class=5, test_per_class=1, seed=5)  # other parameters
    assert load_cifar100(str(tmp_path), download=False).images.shape[0] == 600


def test_loader_offline_and_corrupt_errors(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise URLError("no network")

    monkeypatch.setattr(
        "torchvision.datasets.utils.download_and_extract_archive", offline
    )  # data.py imports it when it fetches
    with pytest.raises(DataError) as e:
        load_cifar100(str(tmp_path), download=True)
    msg = str(e.value)
    assert "cifar-100-python" in msg and "download failed (offline?" in msg and "\n" not in msg
    with pytest.raises(DataError, match="download=False"):
        load_cifar100(str(tmp_path), download=False)
    folder = tmp_path / "cifar-100-python"  # real layout but foreign bytes: md5 check fails
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="unreadable"):
        load_cifar100(str(tmp_path), download=False)


# ----------------------------------------------------------------------------- hostile data files
class Planted:
    """A pickle that creates `path` when unpickled by a plain pickle.load (what torchvision's reader does)."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def plant(folder, evidence, marker=None):
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"data": Planted(evidence), "fine_labels": [0]}))
    if marker is not None:
        (folder / data.SYNTHETIC_MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize(
    "how",
    ["empty marker (--data cifar reads it)", "marker of the synthetic writer (reuse)", "no marker (real CIFAR path)"],
)
def test_planted_pickles_are_refused_and_run_nothing(tmp_path, how):
    evidence = tmp_path / "evidence"
    folder = tmp_path / "root" / "cifar-100-python"
    if how.startswith("marker"):  # the parameters write_synthetic_cifar100 would write: it reuses the files
        write_synthetic_cifar100(str(tmp_path / "root"), train_per_class=1, test_per_class=1, seed=0)
        marker = json.loads((folder / data.SYNTHETIC_MARKER).read_text())
        plant(folder, evidence, marker)
        assert write_synthetic_cifar100(str(tmp_path / "root"), train_per_class=1, test_per_class=1, seed=0)
    else:
        plant(folder, evidence, {} if how.startswith("empty") else None)
    with pytest.raises(DataError) as e:
        load_cifar100(str(tmp_path / "root"), download=False)
    assert not evidence.exists()  # nothing was executed
    msg = str(e.value)
    assert "\n" not in msg and "unreadable" in msg and "delete the folder" in msg, msg
    assert ("refused to unpickle posix.system" in msg) == (how != "no marker (real CIFAR path)"), msg


class Py2Pickler(pickle._Pickler):
    """Writes bytes as Python 2's str (BINSTRING), as the real CIFAR-100 pickles (written by Python 2) hold them."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj):
        self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str


def write_cifar_files(folder, train, test, meta, protocol=2):
    folder.mkdir(parents=True, exist_ok=True)
    for name, obj in (("train", train), ("test", test), ("meta", meta)):
        f = io.BytesIO()
        Py2Pickler(f, protocol=protocol).dump(obj)
        (folder / name).write_bytes(f.getvalue())
    (folder / data.SYNTHETIC_MARKER).write_text("{}")


def batch(n, seed, **override):
    rng = np.random.default_rng(seed)
    fine = rng.integers(0, 100, n).tolist()
    return {
        "filenames": [f"{i}.png" for i in range(n)],
        "batch_label": "x",
        "fine_labels": fine,
        "coarse_labels": [c // 5 for c in fine],
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        **override,
    }


META = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}


def test_python2_layout_reads_like_torchvision(tmp_path):
    """Python-2-style pickles (numpy arrays via _reconstruct, raw bytes as latin-1 str) read with our restricted
    reader give what torchvision's own reader gives from the same files (md5 checks off)."""
    train, test = batch(7, 0), batch(3, 1)
    write_cifar_files(tmp_path / "cifar-100-python", train, test, META)
    d = load_cifar100(str(tmp_path), download=False)

    from torchvision.datasets import CIFAR100

    class Unchecked(CIFAR100):
        train_list, test_list, meta = [["train", None]], [["test", None]], {**CIFAR100.meta, "md5": None}

    ref = [Unchecked(str(tmp_path), train=t) for t in (True, False)]
    assert torch.equal(d.images, torch.from_numpy(np.concatenate([r.data for r in ref])).permute(0, 3, 1, 2))
    assert d.labels.tolist() == ref[0].targets + ref[1].targets
    assert d.coarse_labels.tolist() == train["coarse_labels"] + test["coarse_labels"] and d.classes == ref[0].classes


@pytest.mark.parametrize(
    "train, why",
    [
        (batch(4, 0, fine_labels=[0, 1, 2, 100]), "'fine_labels' must be 4 integers in [0, 100)"),
        (batch(4, 0, coarse_labels=[0, 1, 2]), "'coarse_labels' must be 4 integers in [0, 20)"),
        (batch(4, 0, fine_labels=[0.0, 1.0, 2.0, 3.0]), "'fine_labels' must be 4 integers"),
        (batch(4, 0, data=np.zeros((4, 3072), np.float32)), "'data' must be a uint8 array"),
        (batch(4, 0, data=np.zeros((4, 3071), np.uint8)), "'data' must be a uint8 array"),
        (batch(4, 0, data=np.array([None] * 4)), "unexpected array dtype"),
        ([1, 2, 3], "holds a list, not a dict"),
    ],
)
def test_malformed_files_are_refused(tmp_path, train, why):
    write_cifar_files(tmp_path / "cifar-100-python", train, batch(2, 1), META)
    with pytest.raises(DataError, match="unreadable") as e:
        load_cifar100(str(tmp_path), download=False)
    assert why in str(e.value)


@pytest.mark.parametrize(
    "payload, why",
    [
        # memo index 2**31: a dict memo, no 16 GB array
        (b"\x80\x02}r" + struct.pack("<I", 2**31) + b".", "'data' must be"),
        (
            b"\x80\x02cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n(J\x00\x00\x00\x7fJ\x00\x00\x00\x7ft"
            b"U\x01b\x87R.",
            "unexpected array reconstruction",
        ),  # _reconstruct(ndarray, (2**31, 2**31), 'b'): 4 EB
        (b"\x80\x02}q\x00(U\x04dataq\x01", "not a CIFAR-100 pickle (EOFError)"),  # truncated
    ],
)
def test_crafted_pickles_allocate_nothing(tmp_path, payload, why):
    folder = tmp_path / "cifar-100-python"
    write_cifar_files(folder, batch(2, 0), batch(2, 1), META)
    (folder / "train").write_bytes(payload)
    with pytest.raises(DataError, match="unreadable") as e:
        load_cifar100(str(tmp_path), download=False)
    assert why in str(e.value)


def test_oversized_file_and_memory_error_are_told_apart(tmp_path, monkeypatch):
    write_cifar_files(tmp_path / "cifar-100-python", batch(2, 0), batch(2, 1), META)
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 1000)
    size = os.path.getsize(tmp_path / "cifar-100-python" / "train")
    with pytest.raises(DataError, match=f"train: {size:,} bytes, larger than the 1,000"):
        load_cifar100(str(tmp_path), download=False)
    monkeypatch.undo()

    def out_of_memory(self):
        raise MemoryError()

    monkeypatch.setattr(data_pickle.DataUnpickler, "load", out_of_memory)
    with pytest.raises(MemoryError):  # not "unreadable ... delete the folder": the data may be fine
        load_cifar100(str(tmp_path), download=False)


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda p: os.symlink("/dev/zero", p), "train: is a symbolic link"),
        (lambda p: os.mkfifo(p), "train: is not a regular file .a FIFO"),
    ],
)
@pytest.mark.parametrize("synthetic", [True, False])
def test_special_files_under_cifar_names_are_refused_at_once(tmp_path, alarm, make, why, synthetic):
    """A synthetic folder with its marker and train -> /dev/zero bypassed the 1 GiB limit (getsize is 0);
    without the marker torchvision's md5 would read /dev/zero without end, and a FIFO hung either way."""
    folder = tmp_path / "cifar-100-python"
    write_cifar_files(folder, batch(2, 0), batch(2, 1), META)
    if synthetic:
        (folder / data.SYNTHETIC_MARKER).write_text("{}")
    (folder / "train").unlink()
    make(folder / "train")
    with pytest.raises(DataError, match=why):
        load_cifar100(str(tmp_path), download=False)


def test_a_single_class_held_out_split_is_warned_about():
    def split(name, val):
        x = torch.zeros(max(len(val), 2), 3)
        return ClientSplits(name, x[:2], torch.tensor([0, 1]), x[: len(val)], val, x[:1], torch.tensor([0]))

    splits = [
        split("a", torch.tensor([4, 4, 4])),
        split("b", torch.tensor([4, 5, 4])),
        split("c", torch.tensor([[1, -100], [1, -100]])),
        split("d", torch.tensor([[1, -100], [2, -100]])),
        split("e", torch.tensor([7])),
    ]  # one example: no class structure to speak of
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_single_class(splits) == ["a", "c"]
    assert [str(w.message).split(":")[0] for w in caught] == ["client a", "client c"]
    assert "single class" in str(caught[0].message)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert warn_single_class(splits, "train") == []  # train holds classes 0 and 1 everywhere


def test_held_out_overlap_is_exact():
    """A client is named when a validation sample equals a training sample byte for byte (images or token rows),
    never for a disjoint split however well the local adapter fits it; with fisher_split "train" every client
    is, unless the estimator is the paper's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (30, 3, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(30) % 3
    disjoint = ClientSplits("a", x[:10], y[:10], x[10:20], y[10:20], x[20:], y[20:])
    val = torch.cat([x[10:18], x[3:5]])  # two training images among the ten validation ones
    shared = ClientSplits("b", x[:10], y[:10], val, y[10:20], x[20:], y[20:])
    tokens = torch.randint(0, 50, (12, 7), generator=g)
    text = ClientSplits("c", tokens[:6], tokens[:6], tokens[[6, 7, 0]], tokens[:3], tokens[9:], tokens[9:])
    with pytest.warns(UserWarning) as seen:
        assert warn_held_out_overlap([disjoint, shared, text]) == ["b", "c"]
    assert [str(w.message).split(":")[0] for w in seen] == ["client b", "client c"]
    assert "2 of the 10 samples" in str(seen[0].message) and "1 of the 3 samples" in str(seen[1].message)
    with pytest.warns(UserWarning):
        assert warn_held_out_overlap([disjoint], "train", "verified") == ["a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert warn_held_out_overlap([disjoint]) == []
        assert warn_held_out_overlap([disjoint, shared], "train", "paper") == []


# ----------------------------------------------------------------------------- partitions
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
