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

from potara_harness import data
from potara_harness.data import (
    ClientSplits,
    DataError,
    load_cifar100,
    warn_held_out_overlap,
    warn_single_class,
    write_synthetic_cifar100,
)


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

    monkeypatch.setattr(data._CifarUnpickler, "load", out_of_memory)
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
