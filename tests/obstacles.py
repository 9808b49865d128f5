"""Obstacles planted in a folder a run wrote, and what is checked after (test_run_folder.py, test_run_llm.py,
test_flower.py, test_flower_llm.py): a link out, a hard link, a directory, a FIFO where a file goes; a link out, a
regular file, a FIFO, a read-only folder where a folder goes; a file and a folder outside whose bytes must not
change. The code under test runs `unprivileged`: a read-only folder is read-only to it, as root too. The paths a
run writes are recorded as it writes them (recorded_writes), so a test can hold its tree to cover each one. A
helper module, not a test module: no test module imports another."""

import contextlib
import ctypes
import dataclasses
import os
import shutil
import stat
import sys
import threading

FILE_OBSTACLES = ("link out", "hard link", "directory", "FIFO")
FOLDER_OBSTACLES = ("link out", "regular file", "FIFO", "read-only folder")


def paths_of(out):
    """Every path in the run folder, relative, folders with a trailing "/", the folder itself as "./"."""
    found = ["./"]
    for root, dirs, files in os.walk(out):
        rel = os.path.relpath(root, out)
        found += [os.path.normpath(os.path.join(rel, d)) + "/" for d in dirs]
        found += [os.path.normpath(os.path.join(rel, f)) for f in files]
    return sorted(found)


@contextlib.contextmanager
def recorded_writes(root):
    """Yield the set that, once the block ends, holds every file written under `root` during it (relative paths),
    as the run names them, not by what is left at the end: the target of each os.replace / os.rename (every
    atomic write ends in one; a folder moved into place counts with the files in it) and each file os.open
    creates (the lock). Temporary names (a leading dot, but the lock's) are left out: they are random."""
    root, written = os.path.abspath(root), set()
    real = {name: getattr(os, name) for name in ("replace", "rename", "open")}

    def note(path):
        full = os.path.abspath(os.fspath(path))
        if not full.startswith(root + os.sep):
            return
        rel = os.path.relpath(full, root)
        if any(part.startswith(".") and part != ".lock" for part in rel.split(os.sep)):
            return
        if os.path.isdir(full):
            files = [p for p in paths_of(full) if not p.endswith("/")]
            written.update(os.path.normpath(os.path.join(rel, p)) for p in files)
        else:
            written.add(rel)

    def moved(name):
        def move(src, dst, *args, **kwargs):
            real[name](src, dst, *args, **kwargs)
            note(dst)

        return move

    def opened(path, flags, *args, **kwargs):
        fd = real["open"](path, flags, *args, **kwargs)
        if flags & os.O_CREAT and not kwargs.get("dir_fd"):
            note(path)
        return fd

    try:
        os.replace, os.rename, os.open = moved("replace"), moved("rename"), opened
        yield written
    finally:
        os.replace, os.rename, os.open = real["replace"], real["rename"], real["open"]


def cases(out):
    for rel in paths_of(out):
        kinds = ("read-only folder",) if rel == "./" else FOLDER_OBSTACLES if rel.endswith("/") else FILE_OBSTACLES
        yield from ((rel, kind) for kind in kinds)


def outside_world(tmp_path):
    """A file and a folder outside the run folder (a part file and a result in it), and their bytes."""
    outside = tmp_path / "outside"
    (outside / "folder").mkdir(parents=True)
    (outside / "victim.bin").write_bytes(b"precious")
    (outside / "folder" / "local-0000.pt").write_bytes(b"not yours")
    (outside / "folder" / "results.json").write_bytes(b"{}")
    return outside


def snapshot(folder):
    """{relative path: bytes} of the regular files under `folder` (anything else: its mode), never opening a
    FIFO or following a link."""

    def content(path):
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return stat.S_IFMT(st.st_mode)
        with open(path, "rb") as f:
            return f.read()

    return {
        os.path.relpath(os.path.join(r, f), folder): content(os.path.join(r, f))
        for r, _, fs in os.walk(folder)
        for f in fs
    }


def plant(out, rel, kind, outside):
    """Put obstacle `kind` at out/rel (replacing what the run wrote there)."""
    path = os.path.join(out, rel.rstrip("/")) if rel != "./" else str(out)
    if kind == "read-only folder":  # read-only to `unprivileged` code (root's own calls still write there)
        os.chmod(path, 0o555)
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)
    if kind == "link out":
        os.symlink(outside / ("folder" if rel.endswith("/") else "victim.bin"), path)
    elif kind == "hard link":
        os.link(outside / "victim.bin", path)
    elif kind == "directory":
        os.mkdir(path)
    elif kind == "FIFO":
        os.mkfifo(path)
    elif kind == "regular file":
        with open(path, "wb") as f:
            f.write(b"x")


def fresh_copy(tree_out, dest):
    shutil.copytree(tree_out, dest, symlinks=True)
    return dest


@dataclasses.dataclass
class Case:
    rel: str  # the path in the tree, as paths_of gives it
    kind: str  # the obstacle planted there
    folder: object  # the planted copy of the tree
    planted: dict  # snapshot(folder) right after planting


def planted_cases(tree, where):
    """For each (rel, kind) of cases(tree): a fresh copy of the tree in where/<i>/planted with the obstacle planted,
    outside_world in where/<i>/outside. When the caller moves on, the outside's bytes are checked unchanged and
    the copy made writable again."""
    for i, (rel, kind) in enumerate(cases(tree)):
        folder = fresh_copy(tree, where / str(i) / "planted")
        outside = outside_world(where / str(i))
        before = snapshot(outside)
        plant(folder, rel, kind, outside)
        yield Case(rel, kind, folder, snapshot(folder))
        assert snapshot(outside) == before, (rel, kind)
        os.chmod(folder, 0o755)


# Linux capabilities that let root ignore file permissions (linux/capability.h)
CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2
LINUX_CAPABILITY_VERSION_3 = 0x20080522


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _drop_permission_override():
    """Remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the calling thread's effective and permitted sets
    (capset(2) acts on one thread; access(2) for real uid 0 uses the permitted set, so both go)."""
    libc = ctypes.CDLL(None, use_errno=True)
    header, data = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0), (_CapData * 2)()
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    data[0].effective &= keep
    data[0].permitted &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def unprivileged(fn, *args, **kwargs):
    """fn(*args, **kwargs) as a user that file permissions apply to: as root on Linux, in a thread of its own that
    dropped the capabilities overriding them (the rest of the process keeps them; the thread ends with the call);
    as anyone else, directly. Its result is returned, its exception raised here."""
    if os.geteuid() != 0:
        return fn(*args, **kwargs)
    assert sys.platform == "linux", "as root, read-only folders are tested on Linux only"
    outcome = {}

    def call():
        try:
            _drop_permission_override()
            outcome["result"] = fn(*args, **kwargs)
        except BaseException as e:  # SystemExit included: the caller's pytest.raises sees it
            outcome["error"] = e

    thread = threading.Thread(target=call, name="unprivileged")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
