"""The vision demo's data: CIFAR-100 (downloaded once, md5-checked), an offline synthetic stand-in written in its
exact file layout, and which client holds which images (Dirichlet label skew, superclass task split, train / val /
test per client).

    data, folder = load_images("synthetic", "data")    # or "cifar": torchvision downloads, we read and check
    parts = dirichlet_partition(labels, num_clients=10, alpha=0.5, samples_per_client=1500, seed=0)
    parts = class_split_partition(labels, coarse_labels, 10, 1500, seed=0)   # each client its own superclasses
    public, pool = public_and_pool(len(labels), 5000)    # images no client holds (backbone pre-training)
    splits = client_splits(images, labels, pool, parts, (1000, 100, 400), seed=0)   # a ClientSplits per client

Images stay uint8 tensors (N, 3, 32, 32); resizing and normalisation happen inside the model. The partitions work
on any labelled set (indices in, index arrays out) and are deterministic for a seed. Downloaded files are untrusted:
CIFAR-100's pickles are read by potara_guards.data_pickle, which runs nothing, then checked for layout, dtype and
label ranges. Any problem is one DataError line.
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from potara_guards.data_pickle import Unreadable, read_data_pickle
from potara_guards.safe_files import UnsafeFile, atomic_write, open_regular, read_regular

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
def _labels(batch: dict, key: str, n: int, classes: int, name: str) -> np.ndarray:
    y = np.asarray(batch.get(key))
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and not 0 <= y.min() <= y.max() < classes):
        raise Unreadable(f"{name}: '{key}' must be {n} integers in [0, {classes})")
    return y.astype(np.int64)


def _read_cifar_files(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """train then test: uint8 images (N, 3, 32, 32), fine and coarse labels; and the fine class names."""
    images, fine, coarse = [], [], []
    for name in ("train", "test"):
        batch = read_data_pickle(os.path.join(folder, name), MAX_FILE_BYTES)
        x = batch.get("data")
        if (
            not isinstance(x, np.ndarray)
            or x.dtype != np.uint8
            or x.ndim != 2
            or x.shape[1] != 3 * 32 * 32
            or len(x) == 0
        ):
            raise Unreadable(f"{name}: 'data' must be a uint8 array of rows of 3 x 32 x 32 pixels")
        images.append(x.reshape(-1, 3, 32, 32))  # each row: the R, G, B planes, row-major
        fine.append(_labels(batch, "fine_labels", len(x), 100, name))
        coarse.append(_labels(batch, "coarse_labels", len(x), 20, name))
    names = read_data_pickle(os.path.join(folder, "meta"), MAX_FILE_BYTES).get("fine_label_names")
    if not isinstance(names, list) or len(names) != 100 or not all(isinstance(c, str) for c in names):
        raise Unreadable("meta: 'fine_label_names' must be 100 strings")
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
            raise Unreadable(f"{name}: {str(e).split(': ', 1)[-1]}") from None
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
            raise Unreadable("its files fail torchvision's md5 check")
        images, labels, coarse, classes = _read_cifar_files(folder)
    except (Unreadable, OSError) as e:
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
