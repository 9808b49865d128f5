"""Safe file I/O: how every part of the project writes and reads the files of a run.

    atomic_write("out/results.json", lambda f: f.write(b"{}"))   # random temp beside it, fsync, os.replace
    data = read_regular("data/flan/sst2.jsonl", 64 << 20)           # a regular file, at most N bytes, or refused
    state = load_torch_file("backbone.pt")                           # the same, then torch.load(weights_only=True)
    lock = open_lock("out/.lock")                                    # created or opened, never through a link
    make_folder("out/adapters")                                      # made, or checked: a real, writable folder

A trusted run folder (the one definition; as tensor_checks.check_tensors is the one validator of tensors):
  * where the run writes, no links: the target of a write must be absent or a regular file of one name, never a
    symbolic or hard link (write_target_problem), and the temporary file is a new name opened
    O_CREAT|O_EXCL|O_NOFOLLOW, so a link planted under any name is neither followed nor overwritten;
  * a folder the run writes into is made or checked first (make_folder, folder_problem): a real directory it
    can write, never a link to another folder;
  * where the run reads, regular files only: opened with O_NOFOLLOW|O_NONBLOCK, then fstat must say S_ISREG
    (a link, /dev/zero, a FIFO or a folder is refused at once: nothing hangs), and at most N bytes are read
    (a file that grows past N while being read is refused too);
  * the --out lock is opened the same way (open_lock), so a planted `.lock -> ../victim` (or a hard link) is refused.
A refused path is an UnsafeFile (an OSError: one line naming the file). A write that fails on the way
(disk full, file-size limit, a missing or read-only folder) is a WriteError naming the file the caller gave
(never the temporary) and saying the previous version is intact.

Leftovers of killed writers (`.<name>.<pid>.<random>.tmp`, the older `<name>.tmp<pid>`, and the folders
`.<name>.partial-<pid>` / `.<name>.old-<pid>` of run_llm's exports) are removed by the next write of the same
name once their pid is no longer running (remove_leftovers); they are never read.
Imports no torch at its top (load_torch_file imports it when called): the command-line checks use this module
and answer before torch is loaded.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from typing import IO, BinaryIO, Callable

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # POSIX; elsewhere links are refused by write_target_problem's lstat only
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
MAX_TORCH_FILE = 16 << 30  # a checkpoint, backbone, model or cache file: 16 GiB (vit_h_14 in float32 is 2.5 GiB)


class UnsafeFile(OSError):
    """A path the run refuses to read or write: a link, not a regular file, or larger than its bound."""


class WriteError(OSError):
    """A write that failed on the way (no space, file-size limit, I/O error); the previous file is intact."""


# ----------------------------------------------------------------------------- the trusted run folder
def write_target_problem(path: str | os.PathLike) -> str | None:
    """Why the run must not write `path` (None if absent or a regular file of one name): a symbolic link (even to a
    file inside the folder: the run never writes through links), a file with other names (a hard link: its bytes
    live outside too), or anything that is not a regular file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (the run writes no file through a link): remove it"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (a {_kind(st.st_mode)}): move it away"
    if st.st_nlink > 1:
        return _HARD_LINKED.format(n=st.st_nlink)
    return None


_HARD_LINKED = "has {n} hard links (another name shares its bytes; the run writes no file through a link): remove it"


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why the run must not write into the folder `path` (None if absent, to be made, or a real directory it
    may write): a symbolic link (what is written there would land in the folder it points to), anything but a
    directory, or a directory it cannot write."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link (the run writes into no folder through a link): remove it"
    if not stat.S_ISDIR(st.st_mode):
        return f"is not a directory (a {_kind(st.st_mode)}): move it away"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is a folder this user cannot write: make it writable or move it away"
    return None


def make_folder(path: str | os.PathLike) -> None:
    """Create the folder `path` (its parent must exist) or check the one there (folder_problem): UnsafeFile, one
    line naming `path`, when it cannot serve; WriteError when it cannot be created."""
    path = os.fspath(path)
    for _ in range(2):  # a second look when something appeared between the check and mkdir
        problem = folder_problem(path)
        if problem:
            raise UnsafeFile(f"{path}: {problem}")
        try:
            os.mkdir(path)
            return
        except FileExistsError:
            if os.path.isdir(path) and not os.path.islink(path):
                return
        except OSError as e:
            raise WriteError(f"cannot create the folder {path} ({e.strerror or type(e).__name__})") from None
    raise UnsafeFile(f"{path}: {folder_problem(path) or 'appeared while it was being made'}")


def run_folder_problem(folder: str, names) -> str | None:
    """The first of folder/<name> the run must not write, as "<name> in it <why>" (None if all are fine)."""
    for name in names:
        problem = write_target_problem(os.path.join(folder, name))
        if problem:
            return f"{name} in it {problem}"
    return None


def _kind(mode: int) -> str:
    kinds = (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
        (stat.S_ISREG, "regular file"),
    )
    return next((name for test, name in kinds if test(mode)), "special file")


def _open_checked(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open without following a link at the last component; the descriptor must be a regular file, and, when
    opened for writing, have no other name (a hard link)."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)
    except OSError as e:
        if e.errno == errno.ELOOP:  # O_NOFOLLOW met a link
            raise UnsafeFile(
                f"{path}: is a symbolic link (the run reads and writes regular files only, never "
                "through a link: copy the file, or link its folder instead)"
            ) from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(f"{path}: is not a regular file (a {_kind(st.st_mode)})")
    if flags & (os.O_WRONLY | os.O_RDWR) and st.st_nlink > 1:
        os.close(fd)
        raise UnsafeFile(f"{path}: {_HARD_LINKED.format(n=st.st_nlink)}")
    return fd


def open_regular(path: str | os.PathLike, max_bytes: int) -> BinaryIO:
    """`path` opened for reading when it is a regular file of at most max_bytes (fstat's size), else
    UnsafeFile. O_NONBLOCK: opening a FIFO returns at once (then refused), where a blocking open would hang."""
    path = os.fspath(path)
    fd = _open_checked(path, os.O_RDONLY | _NONBLOCK)
    size = os.fstat(fd).st_size
    if size > max_bytes:
        os.close(fd)
        raise UnsafeFile(f"{path}: {size:,} bytes, larger than the {max_bytes:,} this file may hold")
    return os.fdopen(fd, "rb")


def read_regular(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most max_bytes (open_regular), reading at most max_bytes + 1: a file
    that grows while it is read is refused, never read without end."""
    with open_regular(path, max_bytes) as f:
        payload = f.read(max_bytes + 1)
    if len(payload) > max_bytes:
        raise UnsafeFile(f"{os.fspath(path)}: larger than the {max_bytes:,} bytes this file may hold")
    return payload


def load_torch_file(path: str | os.PathLike, max_bytes: int = MAX_TORCH_FILE):
    """torch.load(weights_only=True) of a regular file of at most max_bytes (open_regular): never runs code, never
    follows a link, never waits on a FIFO or reads /dev/zero. The caller turns any exception into its one line."""
    import torch

    with open_regular(path, max_bytes) as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def open_lock(path: str | os.PathLike) -> IO[str]:
    """The lock file, created if absent (mode 0644), opened read-write without following a link and only if
    it is a regular file with no other name: a planted `.lock -> ../victim.txt`, or a hard link to it, is refused,
    not truncated."""
    return os.fdopen(_open_checked(os.fspath(path), os.O_RDWR | os.O_CREAT), "r+")


# ----------------------------------------------------------------------------- writing atomically
def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    """write(f) into a new temporary file beside `path`, fsync, os.replace, fsync of the folder: whenever the
    process dies (SIGKILL, power loss), `path` holds the previous complete file or the new one, never a part.
    The temporary name is random (.<name>.<pid>.<12 hex>.tmp) and opened O_CREAT|O_EXCL|O_NOFOLLOW: nothing
    planted under a predictable name is followed. A `path` that is a link or not a regular file is refused
    (UnsafeFile) before anything is written; a failed write (disk full, `ulimit -f`) is one WriteError."""
    path = os.fspath(path)
    problem = write_target_problem(path)
    if problem:
        raise UnsafeFile(f"{path}: {problem}")
    folder, name = os.path.split(os.path.abspath(path))
    remove_leftovers(folder, name)
    tmp = None
    try:
        fd, tmp = _new_temporary(folder, name)  # inside the try: a missing or read-only folder is a WriteError too
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _remove_quietly(tmp)
        cause = _os_error(e)
        if cause is None or isinstance(e, UnsafeFile):
            raise
        raise WriteError(
            f"cannot write {path} ({cause.strerror or str(cause)[:200] or type(cause).__name__}): nothing "
            f"was replaced, the previous file is intact; {_remedy(cause, folder)}, then rerun (with --resume to "
            "continue a run)"
        ) from None
    sync_folder(folder)


def _remedy(cause: OSError, folder: str) -> str:
    """What to do about a failed write, by its errno (the message names the target, never the temporary)."""
    if cause.errno == errno.ENOENT:
        return f"its folder {folder} does not exist: create it"
    if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"its folder {folder} is not writable: make it writable"
    return "free space or raise the file-size limit (ulimit -f)"


def _new_temporary(folder: str, name: str) -> tuple[int, str]:
    for _ in range(100):  # a collision of 48 random bits is refused by O_EXCL and another name drawn
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o666
            ), tmp  # 0o666 less the umask: the same permissions as open(path, "wb")
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name")


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: e itself, or one in its chain (torch.save reports a failed
    f.write as a RuntimeError whose context is the OSError)."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError):
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def sync_folder(folder: str) -> None:
    """fsync a folder: a rename in it reaches the disk only then (POSIX; a no-op elsewhere)."""
    if os.name == "posix":
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _pid_running(pid: int) -> bool:
    if not 0 < pid < 2**31:  # os.kill(0, ...) would mean the process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_leftovers(folder: str, name: str) -> list[str]:
    """Remove what killed writers of `name` left in `folder` (temporary files and export folders named with
    their pid) when that pid is not running; returns the names removed. A live writer's are kept."""
    n = re.escape(name)
    pattern = re.compile(rf"(?:\.{n}\.(\d+)\.[0-9a-f]+\.tmp|{n}\.tmp(\d+)|\.{n}\.(?:partial|old)-(\d+))")
    removed = []
    try:
        entries = os.listdir(folder)
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry)
        if not m or _pid_running(int(next(g for g in m.groups() if g))):
            continue
        full = os.path.join(folder, entry)
        try:
            if os.path.isdir(full) and not os.path.islink(full):
                shutil.rmtree(full)
            else:
                os.remove(full)
            removed.append(entry)
        except OSError:
            pass
    return removed
