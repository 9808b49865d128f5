"""Shared test helpers, as fixtures: a file of the project copied alone into an empty folder and run there
(run_alone), the micro ViT standing in for the tiny preset's backbone, a tiny MLP
problem (a bias-free LoRA MLP and its clients) for pipeline-level tests, nested tensor equality, and the
untrusted-file fuzzing kit (bounded cases, corrupted tensors, crafted and corrupted torch files). Module-level
helpers of a test file that cannot take fixtures import the plain functions from here."""

import contextlib
import io
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torchvision.models import VisionTransformer

from data import ClientSplits
from lora import add_lora
from potara_harness import config

ROOT = Path(__file__).resolve().parents[1]
# One torch thread for the session: the tests' tensors are tiny, and the real federations running in the background
# take the other core (two OpenMP threads on two busy cores wait on each other: a study's reduced run took 134 s
# in the suite at torch's default of one thread per core, 29 s alone).
torch.set_num_threads(1)
NOT_FROM_THE_REPOSITORY = f"""
import sys
_ours = [m for m in list(sys.modules.values())
         if (getattr(m, "__file__", None) or "").startswith({str(ROOT) + os.sep!r})
         and "site-packages" not in m.__file__]
assert not _ours, f"modules read from the repository: {{[m.__name__ for m in _ours]}}"
"""


def run_alone(folder: Path, files, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """Copy `files` of the repository (a file, or a folder with its .py files) into `folder`, then run `code` there
    in a fresh Python with the repository absent from sys.path (no PYTHONPATH; nothing of the project is installed),
    checking at its end that no module was read from the repository."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, folder / name)
    (folder / "alone.py").write_text(code + NOT_FROM_THE_REPOSITORY)
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}  # as this session
    return subprocess.run(
        [sys.executable, "alone.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=timeout
    )


def script_errors(script: str, args, env: dict | None = None, timeout: float = 300) -> tuple[int, list[str]]:
    """`python <script> <args>` in a fresh process from the repository root (nothing imported or cached in this
    one): its exit status and the lines of its stderr (a mistake's whole report must be one error line: no usage
    block, warning, log line or traceback before or after it). `env` adds to this process's
    environment; a value None removes the variable."""
    env = {**os.environ, "NO_PROXY": "127.0.0.1,localhost", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, script, *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in env.items() if v is not None},
    )
    return done.returncode, done.stderr.splitlines()


MICRO_VIT = dict(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.fixture
def micro_preset(monkeypatch):
    """vit.py's tiny preset with the micro ViT; torch's thread count restored afterwards (the CLI sets it)."""
    monkeypatch.setitem(config.VIT_PRESETS["tiny"], "vit", MICRO_VIT)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tensors_equal(a, b) -> bool:
    """Nested dicts / lists of tensors and plain values: equal types, keys, dtypes and values (bitwise)."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.fixture
def same():
    return tensors_equal


def bias_free_model():
    """A 6 -> 16 -> 4 MLP without biases, LoRA (r = 2) on both layers: all-zero inputs give all-zero gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16, bias=False), nn.ReLU(), nn.Linear(16, 4, bias=False))
    add_lora(model, ["0", "2"], r=2, alpha=4)
    return model


def mlp_client(name, seed, train_fill=None):
    """24 / 8 / 12 random examples of the MLP problem; train_fill replaces every training input value."""
    g = torch.Generator().manual_seed(seed)
    x = lambda n: torch.randn(n, 6, generator=g)
    y = lambda n: torch.randint(0, 4, (n,), generator=g)
    tr = x(24)
    if train_fill is not None:
        tr = torch.full_like(tr, train_fill)
    return ClientSplits(name, tr, y(24), x(8), y(8), x(12), y(12))


@pytest.fixture
def mlp_problem():
    """(a fresh bias_free_model() each call, mlp_client) for pipeline-level tests that take seconds."""
    return bias_free_model, mlp_client


# ----------------------------------------------------------------------------- language models (the llm extra)
SMALL_LLAMA = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


@pytest.fixture
def small_llama():
    """A factory: small_llama(seed) -> a 2-layer tiny Llama (lm.tiny_llama) in eval mode."""
    pytest.importorskip("transformers")
    from potara_harness import lm
    from potara_harness.llm_data import ByteTokenizer

    def make(seed=0):
        torch.manual_seed(seed)
        return lm.tiny_llama(ByteTokenizer.vocab_size, **SMALL_LLAMA).eval()

    return make


@pytest.fixture
def randomize_lora():
    """randomize_lora(model, seed, scale): every trainable tensor drawn from N(0, scale^2) (a trained adapter)."""

    def randomize(model, seed=1, scale=0.3):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * scale)

    return randomize


# ----------------------------------------------------------------------------- untrusted files (fuzz tests)
@contextlib.contextmanager
def bounded_case(seconds: int = 5, headroom: int = 2 << 30):
    """Fail a case that runs longer than `seconds`, or allocates more than `headroom` bytes at once."""
    limit_as = sys.platform.startswith("linux")
    if limit_as:
        used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = used + headroom if hard == resource.RLIM_INFINITY else min(used + headroom, hard)
        resource.setrlimit(resource.RLIMIT_AS, (cap, hard))

    def timeout(*_):
        raise TimeoutError(f"a fuzz case ran longer than {seconds} s")

    alarm = hasattr(signal, "SIGALRM")  # POSIX only
    if alarm:
        old = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(seconds)
    try:
        yield
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        if limit_as:
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@pytest.fixture
def bounded():
    """`with bounded(): ...` runs one fuzz case under a time limit (5 s) and an address-space cap (+2 GiB)."""
    return bounded_case


def corrupt_tensor(rng: random.Random, t: torch.Tensor, kind: str | None = None):
    """One randomly chosen way to make a tensor untrustworthy (or not a tensor at all)."""
    kind = kind or rng.choice(
        [
            "dtype",
            "shape",
            "expand",
            "zero stride",
            "huge",
            "sparse",
            "meta",
            "nan",
            "inf",
            "scalar",
            "string",
            "list",
            "none",
            "nested",
            "subclass",
        ]
    )
    if kind == "dtype":
        return t.to(rng.choice([torch.int64, torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn]))
    if kind == "shape":
        return torch.zeros(t.shape[0] + rng.randint(1, 3), *t.shape[1:])
    if kind == "expand":
        return t.flatten()[:1].expand(t.shape)
    if kind == "zero stride":
        return t.flatten()[: t.shape[-1]].as_strided(t.shape, (0, 1))
    if kind == "huge":
        return torch.zeros(1).expand(rng.choice([200000, 2**20]), rng.choice([200000, 2**20]))
    if kind == "sparse":
        return t.to_sparse()
    if kind == "meta":
        return torch.empty(t.shape, device="meta")
    if kind in ("nan", "inf"):
        bad = t.clone()
        bad.view(-1)[rng.randrange(bad.numel())] = float("nan") if kind == "nan" else -float("inf")
        return bad
    if kind == "nested":
        return torch.nested.nested_tensor([row.clone() for row in t])
    if kind == "subclass":
        return t.clone().as_subclass(type("Sub", (torch.Tensor,), {}))
    return {"scalar": 1.0, "string": "w", "list": t.tolist(), "none": None}[kind]


def damaged_bytes(rng: random.Random, template: bytes, kind: str) -> bytes:
    """The file's bytes cut at a random point ("truncate"), with 1-8 bit flips, or with a run of 8 random bytes."""
    data = bytearray(template)
    if kind == "truncate":
        return bytes(data[: rng.randrange(len(data))])
    if kind == "bit flips":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        return bytes(data)
    i = rng.randrange(len(data))
    data[i : i + 8] = bytes(rng.randrange(256) for _ in range(8))
    return bytes(data)


class FakeStorage:
    """Pickled as torch's own storage reference (persistent id), with the numel we choose."""

    def __init__(self, numel: int):
        self.numel = numel


class CraftedView:
    """Pickled as torch._utils._rebuild_tensor_v2(storage, offset, size, stride): sizes/strides we choose."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


class CraftedPickler(torch.serialization.pickle.Pickler):
    def persistent_id(self, obj):
        return ("storage", torch.FloatStorage, "0", "cpu", obj.numel) if isinstance(obj, FakeStorage) else None


def crafted_torch_file(payload, numel: int, template: bytes | None = None) -> bytes:
    """A torch.save zip (by default that of torch.zeros(numel)) whose pickle is `payload` (its CraftedViews:
    tensors over one storage of numel floats, data/0), any other stored tensor data left out."""
    if template is None:
        zeros = io.BytesIO()
        torch.save(torch.zeros(numel), zeros)
        template = zeros.getvalue()
    pkl = io.BytesIO()
    CraftedPickler(pkl, protocol=2).dump(payload)
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(template)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = pkl.getvalue()
            elif info.filename.endswith("data/0"):
                data = struct.pack(f"<{numel}f", *range(numel))
            elif "/data/" in info.filename:
                continue
            zout.writestr(info, data)
    return out.getvalue()


def as_views(obj, storage):
    """obj with every tensor replaced by a contiguous CraftedView of `storage`."""
    if isinstance(obj, torch.Tensor):
        strides = [1] * obj.dim()
        for i in range(obj.dim() - 2, -1, -1):
            strides[i] = strides[i + 1] * obj.shape[i + 1]
        return CraftedView(storage, 0, obj.shape, strides)
    if isinstance(obj, dict):
        return {k: as_views(v, storage) for k, v in obj.items()}
    if isinstance(obj, list):
        return [as_views(v, storage) for v in obj]
    return obj


def copy_nested(obj):
    if isinstance(obj, dict):
        return {k: copy_nested(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_nested(v) for v in obj]
    return obj


def tensor_paths(obj, prefix=()):
    """The key paths of every tensor in nested dicts."""
    if isinstance(obj, torch.Tensor):
        return [prefix]
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in tensor_paths(v, prefix + (k,))]
    return []


def crafted_view_file(rng: random.Random, obj: dict, path: tuple, numel: int) -> bytes:
    """obj as a torch file whose tensor at `path` is a view with huge or zero strides / sizes / offset."""
    big = lambda: rng.choice([0, 1, 3, 2**20, 2**31 - 1, 2**40, 2**62])
    size = [big() if rng.random() < 0.5 else rng.randint(0, 4) for _ in range(rng.randint(1, 3))]
    stride = [big() if rng.random() < 0.5 else rng.randint(0, 4) for _ in size]
    storage = FakeStorage(numel)
    obj = as_views(obj, storage)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = CraftedView(storage, big() if rng.random() < 0.3 else 0, size, stride)
    return crafted_torch_file(obj, numel)


def corrupt_torch_file(rng: random.Random, template: bytes, plain: dict, numel: int) -> bytes:
    """One random corruption of a torch file holding the dict `plain`: truncation, bit flips, a byte run, one
    tensor made untrustworthy (corrupt_tensor), a crafted view (crafted_view_file), or one field replaced by junk."""
    kind = rng.choice(["truncate", "bit flips", "byte run", "tensor", "tensor", "crafted view", "junk field"])
    if kind in ("truncate", "bit flips", "byte run"):
        return damaged_bytes(rng, template, kind)
    path = rng.choice(tensor_paths(plain))
    obj = copy_nested(plain)
    if kind == "crafted view":
        return crafted_view_file(rng, obj, path, numel)
    parent = obj
    for k in path[:-1]:
        parent = parent[k]
    if kind == "junk field":  # the tensor, or a top-level field, replaced by a value of another type
        holder, key = (parent, path[-1]) if rng.random() < 0.5 else (obj, rng.choice(sorted(obj)))
        holder[key] = rng.choice(["x", -3, None, [1, 2], {"a": 1}, True, 10**30, 1e308])
    else:
        try:
            parent[path[-1]] = corrupt_tensor(rng, parent[path[-1]])
        except RuntimeError:  # its "zero stride" corruption is written for 2-D tensors
            parent[path[-1]] = corrupt_tensor(rng, parent[path[-1]], "expand")
    buf = io.BytesIO()
    try:
        torch.save(obj, buf)
    except Exception:  # torch cannot write it (a nested or subclassed tensor): truncate instead
        return template[: len(template) // 2]
    return buf.getvalue()


@pytest.fixture
def corrupted_torch_file():
    """corrupted_torch_file(rng, template, plain, numel): one random corruption of a torch file (corrupt_torch_file)."""
    return corrupt_torch_file


# ----------------------------------------------------------------------------- small models and hostile pickles
def lora_vit(seed: int = 0, targets=("self_attention",)) -> nn.Module:
    """A 2-layer 16 px ViT with LoRA (r = 2) on `targets` and a trainable 5-class head, every adapter tensor
    drawn from N(0, 0.3^2): a trained-looking adapter, so every gradient is non-zero. In eval mode."""
    torch.manual_seed(seed)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=5
    )
    add_lora(model, list(targets), r=2, alpha=4, trainable=["heads"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    return model.eval()


def tiny_vit(num_classes: int = 5) -> nn.Module:
    """A 2-layer 16 px ViT without LoRA, its head drawn from N(0, 0.5^2) (torchvision zero-inits it: no signal
    would pass)."""
    torch.manual_seed(0)
    model = VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=num_classes
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model


def randomize_trainable(model: nn.Module, scale: float = 0.5) -> None:
    """Every trainable tensor drawn in place from N(0, scale^2) with torch's global generator."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, scale)


def perturbed(state: dict, seed: int, scale: float = 0.3) -> dict:
    """state + N(0, scale^2) noise drawn from `seed`: a second adapter near the first."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


class PlantedPickle:
    """Unpickling this creates the file `path` (open(path, "w")): a file that would run code if trusted."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def alarm():
    """Fail instead of hanging: a read of a FIFO or /dev/zero that blocks or never ends (or anything else that
    hangs on a planted file) is a test failure after 30 s; the previous SIGALRM handler is put back."""
    old = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("blocked: something hung on a planted file"))
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# ---- the Flower tests' fixtures (their kit: flower_kit.py, imported here only when a Flower test asks) ----


@pytest.fixture
def task_identity(monkeypatch):
    """What a Flower task process sets before a ServerApp runs (Message() reads it); restored afterwards."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    """A micro backbone file and synthetic data written once for the in-process Flower tests."""
    from flower_kit import RUN, micro_backbone

    from data import load_images

    tmp = tmp_path_factory.mktemp("world")
    micro_backbone(tmp / "backbone.pt")
    load_images("synthetic", str(tmp / "data"), RUN["synthetic-per-class"])
    return tmp


@pytest.fixture
def federation(tmp_path):
    """A loopback federation in tmp_path (loopback.LocalFederation), stopped in teardown whatever happens."""
    from potara_flower.loopback import LocalFederation

    fed = LocalFederation(tmp_path)
    try:
        yield fed
    finally:
        fed.stop()


# ----------------------------------------------------------------------------- real federations, in the background
BACKGROUND = None  # background.Background once the session's tests are collected


LATE = ("test_claims.py", "test_ablation.py")  # long single-core studies: after the federations' busy start


def pytest_collection_modifyitems(session, config, items):
    """The tests of background federations last: the others run while those federations do. The LATE modules just
    before them: the federations start many processes at first and mostly wait on Flower's clocks after, so a long
    study run then meets idle cores (the suite's wall time, not its work, is what this changes)."""
    items.sort(key=lambda item: (item.get_closest_marker("federation") is not None, item.path.name in LATE))


def pytest_collection_finish(session):
    """Start the real federations of the selected tests (background.py) before the first test runs."""
    global BACKGROUND
    import background

    names = list(dict.fromkeys(m.args[0] for item in session.items for m in item.iter_markers("federation")))
    if names and not session.config.option.collectonly:
        factory = session.config._tmp_path_factory  # pytest's own tmp_path_factory (fixtures are not up yet)
        BACKGROUND = background.Background(names, lambda name: factory.mktemp(name))


def pytest_sessionfinish(session):
    if BACKGROUND is not None:
        BACKGROUND.stop()


@pytest.fixture
def federation_result(request):
    """(what the test's real federation returned, its folder): the test's federation marker names it."""
    [name] = [m.args[0] for m in request.node.iter_markers("federation")]
    return BACKGROUND.result(name), BACKGROUND.folders[name]
