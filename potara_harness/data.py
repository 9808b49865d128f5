"""CIFAR-100 for federated personalisation: the safe loader, the data containers every pipeline shares
(ClientSplits, the one DataError), and an offline synthetic stand-in written in the real
`cifar-100-python` layout and read back by the same loader.

    data = load_cifar100("data")                       # torchvision downloads and md5-checks; we read
    data, folder = load_images("synthetic", "data")    # or "cifar"; checked by check_images
    write_synthetic_cifar100("data/synthetic")        # offline: same files, learnable classes

Which client holds which images (Dirichlet / superclass partitions, the public set, ClientSplits per
client) is partition.py. Images stay uint8 tensors (N, 3, 32, 32); resizing and normalisation happen
inside the model. Data files are untrusted input: CIFAR-100's pickles are read by a restricted
unpickler that runs nothing (_CifarUnpickler), then checked for layout, dtype and label ranges.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from potara.safe_files import UnsafeFile, atomic_write, open_regular, read_regular

SYNTHETIC_MARKER = "potara-synthetic.json"  # inside cifar-100-python/: synthetic files, no md5s to check
MAX_FILE_BYTES = 1 << 30  # the real train file is 155 MB: anything larger is not CIFAR-100


class DataError(ValueError):
    """Data that cannot be loaded or a partition that cannot be made (one-line message)."""


@dataclass
class CifarData:
    images: torch.Tensor  # uint8 (N, 3, 32, 32): the 50000 train then the 10000 test images
    labels: np.ndarray  # fine labels (N,), 0..99
    coarse_labels: np.ndarray  # superclass labels (N,), 0..19
    classes: list[str]
    synthetic: bool


@dataclass
class ClientSplits:
    """One client's data, drawn from its own distribution: train (its FedIT/local data), val (held out:
    Potara's statistics and the grid search's choice), test (what every method is scored on)."""

    name: str
    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor
    test_inputs: torch.Tensor
    test_targets: torch.Tensor

    def __post_init__(self):
        for part in ("train", "val", "test"):
            x, y = getattr(self, f"{part}_inputs"), getattr(self, f"{part}_targets")
            if len(x) != len(y) or len(x) == 0:
                raise ValueError(
                    f"client {self.name}: {part} split needs as many inputs as targets and at "
                    f"least one example, got {len(x)} inputs and {len(y)} targets"
                )


def warn_single_class(splits, fisher_split: str = "val") -> list[str]:
    """Warn (warnings.warn, one line per client) when a client's held-out split (the one Potara's statistics and
    the grid search read: `fisher_split`) holds a single class (every target equal; for a language model every
    answer row equal): its loss cannot tell the adapters apart on anything but that class, so lam follows that
    class alone (lam 1.0 where the grid on test chose 0.0 was seen). Returns the clients warned about."""
    single = []
    for s in splits:
        y = s.train_targets if fisher_split == "train" else s.val_targets
        if len(y) > 1 and len(torch.unique(y.reshape(len(y), -1), dim=0)) == 1:
            single.append(s.name)
            warnings.warn(
                f"client {s.name}: its {fisher_split} split holds a single class ({len(y)} examples, one "
                "target): Potara's weight and the grid's choice see only that class"
            )
    return single


def _sample_bytes(x: torch.Tensor) -> list[bytes]:
    """Each sample's exact bytes (an image, a row of tokens), for an exact overlap test."""
    return [row.numpy().tobytes() for row in x.detach().to("cpu").contiguous().reshape(len(x), -1)]


def warn_held_out_overlap(splits, fisher_split: str = "val", estimator: str = "verified") -> list[str]:
    """Warn (one line per client) when the samples Potara's weight reads are the local adapter's own training
    samples: there phi_L sits at a minimum (loss and slope ~0), which always favours it. Exact, not guessed
    from the losses (a task phi_L has learned perfectly looks the same): with fisher_split "val", a client is
    named when one of its validation samples equals one of its training samples, byte for byte; with "train"
    (the paper's setting), every client is, unless the estimator is the paper's (defined on training samples).
    Returns the clients warned about."""
    named = []
    for s in splits:
        if fisher_split == "train":
            if estimator == "paper":
                continue
            shared, total = len(s.train_targets), len(s.train_targets)
        else:
            train = set(_sample_bytes(s.train_inputs))
            shared, total = sum(row in train for row in _sample_bytes(s.val_inputs)), len(s.val_targets)
        if shared:
            named.append(s.name)
            warnings.warn(
                f"client {s.name}: {shared} of the {total} samples Potara's weight reads ({fisher_split} split) "
                "are in its training split, where the local adapter sits at a minimum: the weight then favours it"
            )
    return named


# ----------------------------------------------------------------------------- reading CIFAR-100 safely
class _Unreadable(Exception):
    """A file that is not a well-formed CIFAR-100 pickle (the message says why)."""


class _ArrayType:  # stands in for numpy.ndarray inside a pickle: an argument of _reconstruct, never callable
    pass


def _empty_array(subtype, shape, dtype) -> np.ndarray:
    """numpy.core.multiarray._reconstruct as numpy's pickles use it: an empty array that BUILD then fills
    from the pickle's own bytes (so memory is bounded by the file). Any other use is refused."""
    if not isinstance(subtype, _ArrayType) or tuple(shape) != (0,):
        raise _Unreadable(f"unexpected array reconstruction {shape!r}")
    return np.empty(0, np.uint8)


def _plain_dtype(code, align=False, copy=True) -> np.dtype:
    if not isinstance(code, str) or code not in ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8"):
        raise _Unreadable(f"unexpected array dtype {str(code)[:20]!r}")
    return np.dtype(code)


class _CifarUnpickler(pickle._Unpickler):
    """Reads the objects CIFAR-100's pickles hold (dicts, lists, strings, ints, numpy arrays of numbers) and
    nothing else: a pickle naming any other global (os.system, builtins.eval, ...) is refused before
    anything is called, so a planted file cannot run code. It is pickle's pure-Python unpickler: its memo
    is a dict, where the C unpickler's memo array grows to whatever index a crafted pickle names."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "_reconstruct":
            return _empty_array
        if (module, name) == ("numpy", "ndarray"):
            return _ArrayType()
        if (module, name) == ("numpy", "dtype"):
            return _plain_dtype
        raise _Unreadable(f"refused to unpickle {module[:40]}.{name[:40]} (CIFAR-100 files hold only data)")


def _read_pickle(path: str) -> dict:
    """A regular file of at most MAX_FILE_BYTES (safe_files.read_regular: a link, /dev/zero or a FIFO planted under
    a CIFAR name is refused at once, and the bytes actually read are bounded), unpickled by _CifarUnpickler."""
    try:
        payload = read_regular(path, MAX_FILE_BYTES)
    except UnsafeFile as e:
        raise _Unreadable(f"{os.path.basename(path)}: {str(e).split(': ', 1)[-1]}") from None
    try:
        obj = _CifarUnpickler(io.BytesIO(payload), encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        AttributeError,
        OverflowError,
        struct.error,
    ) as e:  # what a truncated or garbled pickle raises; not MemoryError
        raise _Unreadable(f"{os.path.basename(path)}: not a CIFAR-100 pickle ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise _Unreadable(f"{os.path.basename(path)} holds a {type(obj).__name__}, not a dict")
    return obj


def _labels(batch: dict, key: str, n: int, classes: int, name: str) -> np.ndarray:
    y = np.asarray(batch.get(key))
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and not 0 <= y.min() <= y.max() < classes):
        raise _Unreadable(f"{name}: '{key}' must be {n} integers in [0, {classes})")
    return y.astype(np.int64)


def _read_cifar_files(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """train then test: uint8 images (N, 3, 32, 32), fine and coarse labels; and the fine class names."""
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        batch = _read_pickle(os.path.join(folder, name))
        x = batch.get("data")
        if (
            not isinstance(x, np.ndarray)
            or x.dtype != np.uint8
            or x.ndim != 2
            or x.shape[1] != 3 * 32 * 32
            or len(x) == 0
        ):
            raise _Unreadable(f"{name}: 'data' must be a uint8 array of rows of 3 x 32 x 32 pixels")
        images.append(x.reshape(-1, 3, 32, 32))  # each row: the R, G, B planes, row-major
        fine.append(_labels(batch, "fine_labels", len(x), 100, name))
        coarse.append(_labels(batch, "coarse_labels", len(x), 20, name))
    names = _read_pickle(os.path.join(folder, "meta")).get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100 or not all(isinstance(c, str) for c in names):
        raise _Unreadable("meta: 'fine_label_names' must be 100 strings")
    return np.concatenate(images), np.concatenate(fine), np.concatenate(coarse), names


def _cifar100():
    """torchvision's record of CIFAR-100 (folder and file names, md5s, url). Imported where the files are named,
    checked or fetched, not at the top: a module that needs only ClientSplits (a language device's) imports no
    torchvision."""
    from torchvision.datasets import CIFAR100

    return CIFAR100


def _intact(folder: str) -> bool:
    """torchvision's md5s of the real files (train, test, meta)."""
    from torchvision.datasets.utils import check_integrity

    CIFAR100 = _cifar100()
    files = CIFAR100.train_list + CIFAR100.test_list + [[CIFAR100.meta["filename"], CIFAR100.meta["md5"]]]
    for name, _ in files:  # torchvision's md5 reads to the end: only regular files of a bounded size get there
        try:
            open_regular(os.path.join(folder, name), MAX_FILE_BYTES).close()
        except FileNotFoundError:
            return False
        except UnsafeFile as e:
            raise _Unreadable(f"{name}: {str(e).split(': ', 1)[-1]}") from None
    return all(check_integrity(os.path.join(folder, name), md5) for name, md5 in files)


def load_cifar100(root: str, download: bool = True) -> CifarData:
    """Train + test images of CIFAR-100 under root/cifar-100-python: the real files must pass torchvision's
    md5 checks (downloaded by torchvision when missing or damaged and `download`); synthetic files
    (write_synthetic_cifar100, marked by SYNTHETIC_MARKER) have none. Either way the pickles are read by
    _CifarUnpickler, which executes nothing, and checked for layout, dtype and label ranges. Errors are
    one-line DataErrors; MemoryError is not bad data and propagates as is."""
    from torchvision.datasets.utils import download_and_extract_archive

    CIFAR100 = _cifar100()
    folder = os.path.join(root, CIFAR100.base_folder)
    synthetic = os.path.exists(os.path.join(folder, SYNTHETIC_MARKER))
    if not synthetic and download and not _intact(folder):
        try:
            download_and_extract_archive(CIFAR100.url, root, filename=CIFAR100.filename, md5=CIFAR100.tgz_md5)
        except (OSError, RuntimeError, ValueError) as e:  # URLError, no space, md5 mismatch, bad archive
            if not os.path.isdir(folder):
                raise DataError(
                    f"CIFAR-100 not found under {folder} and download failed (offline?: "
                    f"{type(e).__name__}): put the extracted cifar-100-python folder under {root} "
                    "or pass --data synthetic"
                ) from None
    if not synthetic and not os.path.isdir(folder):
        raise DataError(
            f"CIFAR-100 not found under {folder} and download=False: put the extracted "
            f"cifar-100-python folder under {root} or pass --data synthetic"
        )
    try:
        if not synthetic and not _intact(folder):
            raise _Unreadable("its files fail torchvision's md5 check")
        images, labels, coarse, classes = _read_cifar_files(folder)
    except (_Unreadable, OSError) as e:
        fix = (
            "delete the folder to write it again"
            if synthetic
            else "delete the folder to download it again, or pass --data synthetic"
        )
        raise DataError(
            f"CIFAR-100{' (synthetic)' if synthetic else ''} under {folder} is unreadable "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}): {fix}"
        ) from None
    return CifarData(torch.from_numpy(images), labels, coarse, classes, synthetic)


def load_images(source: str, data_dir: str, synthetic_per_class: int = 500) -> tuple[CifarData, str]:
    """source "cifar": CIFAR-100 under data_dir (downloaded when missing); "synthetic": the stand-in under
    data_dir/synthetic (written once). Checked (check_images); returns (data, the folder read)."""
    root = os.path.join(data_dir, "synthetic") if source == "synthetic" else data_dir
    if source == "synthetic":
        write_synthetic_cifar100(root, synthetic_per_class, synthetic_per_class // 5)
    data = load_cifar100(root)
    check_images(data, root)
    return data, root


def check_images(data: CifarData, where: str) -> None:
    """Images and labels as the pipelines need them (foreign or edited files fail here, in one line)."""
    n, problem = len(data.labels), None
    if data.images.dtype != torch.uint8 or data.images.dim() != 4 or tuple(data.images.shape[1:]) != (3, 32, 32):
        problem = f"images are {data.images.dtype} {tuple(data.images.shape)}, expected uint8 (N, 3, 32, 32)"
    elif len(data.images) != n or len(data.coarse_labels) != n:
        problem = f"{len(data.images)} images, {n} labels and {len(data.coarse_labels)} superclass labels"
    elif n and not (0 <= data.labels.min() and data.labels.max() < 100):
        problem = f"labels outside 0..99 (min {data.labels.min()}, max {data.labels.max()})"
    elif n and not (0 <= data.coarse_labels.min() and data.coarse_labels.max() < 20):
        problem = "superclass labels outside 0..19"
    if problem:
        raise DataError(f"the CIFAR-100 files under {where} are malformed: {problem}")


# ----------------------------------------------------------------------------- synthetic source
def _smooth_fields(rng: np.random.Generator, n: int, grid: int) -> np.ndarray:
    """n random low-frequency colour fields (n, 3, 32, 32): N(0, 1) on a grid x grid lattice, bilinear up."""
    coarse = torch.from_numpy(rng.standard_normal((n, 3, grid, grid)).astype(np.float32))
    return F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False).numpy()


def write_synthetic_cifar100(
    root: str, train_per_class: int = 500, test_per_class: int = 100, seed: int = 0, noise: float = 0.5
) -> str:
    """Write root/cifar-100-python/{train,test,meta} in the real pickle layout (uint8 rows of 3072 =
    3 x 32 x 32 planes, fine and coarse labels, label names), reused when already written with the same
    parameters. Generative model (no class is easier for any method by design):
      superclass s = 0..19:  S_s, a smooth field (4 x 4 lattice, bilinear up to 32 x 32)
      fine class c = 5s..5s+4: P_c = S_s + 0.7 D_c, D_c a finer smooth field (8 x 8 lattice): fine classes
                               share their superclass's structure, so they are confusable
      image i of class c:    x = g_i roll(P_c, shift_i) + beta_i + 0.6 N_i + noise * e_i
                               g_i ~ U(0.7, 1.3) contrast, shift_i uniform in [-3, 3]^2 pixels (wrapping),
                               beta_i ~ N(0, 0.3^2) per channel brightness, N_i a smooth nuisance field
                               (4 x 4 lattice, like a superclass pattern), e_i ~ N(0, 1) pixel noise
      pixel = clip(128 + 48 x, 0, 255) as uint8.
    Learnable (class means differ) but not separable from one image (shift, nuisance, noise)."""
    folder = os.path.join(root, _cifar100().base_folder)
    params = {
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "seed": seed,
        "noise": noise,
        "version": 1,
    }
    marker = os.path.join(folder, SYNTHETIC_MARKER)
    try:
        if json.loads(read_regular(marker, 4096)) == params:
            return folder
    except (OSError, ValueError):  # absent or unreadable (UnsafeFile too: the write below refuses a link): rewrite
        pass
    if train_per_class < 1 or test_per_class < 1:
        raise DataError(f"synthetic data needs >= 1 image per class and split, got {train_per_class}, {test_per_class}")
    os.makedirs(folder, exist_ok=True)
    if os.path.lexists(marker):
        os.remove(marker)  # written last: a half-written set of files is never taken for a finished one
    rng = np.random.default_rng(seed)
    proto = np.repeat(_smooth_fields(rng, 20, 4), 5, axis=0) + 0.7 * _smooth_fields(rng, 100, 8)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        rows, fine = [], []
        for c in range(100):
            g = rng.uniform(0.7, 1.3, (per_class, 1, 1, 1)).astype(np.float32)
            shifts = rng.integers(-3, 4, (per_class, 2))
            x = np.stack([np.roll(proto[c], tuple(s), axis=(1, 2)) for s in shifts]) * g
            x += rng.normal(0, 0.3, (per_class, 3, 1, 1)) + 0.6 * _smooth_fields(rng, per_class, 4)
            x += noise * rng.standard_normal(x.shape)
            rows.append(np.clip(128 + 48 * x, 0, 255).astype(np.uint8).reshape(per_class, -1))
            fine += [c] * per_class
        order = rng.permutation(len(fine))
        fine = np.asarray(fine)[order]
        entry = {
            "filenames": [f"synthetic_{name}_{i}.png" for i in range(len(fine))],
            "batch_label": f"synthetic {name} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "data": np.concatenate(rows)[order],
        }
        atomic_write(os.path.join(folder, name), lambda f: f.write(pickle.dumps(entry, protocol=4)))
    names = pickle.dumps(
        {
            "fine_label_names": [f"synthetic_class_{c:02d}" for c in range(100)],
            "coarse_label_names": [f"synthetic_superclass_{s:02d}" for s in range(20)],
        },
        protocol=4,
    )
    atomic_write(os.path.join(folder, "meta"), lambda f: f.write(names))
    atomic_write(marker, lambda f: f.write(json.dumps(params).encode()))
    return folder
