"""The run folder (--out, the Flower server's out-dir): checked and created before any work, locked while a run
uses it, left empty-handed by a run that wrote nothing. What may be written there and read from it is
safe_files.py's rule (write_target_problem, folder_problem, open_lock, remove_leftovers); this module applies it to
the run folder, the same way for the two scripts, the studies and the Flower server.

    prepare_out_dir(ap, args.out)          # a one-line parser error if --out cannot serve (exit 2)
    with out_dir_lock(args.out):           # a second run on the same --out fails in one line
        run(...)

    problem = out_dir_problem(out, "out-dir")   # the same checks, as a message (the Flower server raises it)
    with run_lock(out, "out-dir"):              # the same lock; RunFolderError (one line) if held or unsafe

    prepare_out_dir(ap, out, files=("ablation.json",), dirs=("cache",))   # a study's folder: its own outputs
    prepare_out_file(ap, args.out)         # one output file (a benchmark's JSON): its folder, never a link
"""

from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import ExitStack, contextmanager

try:
    import fcntl  # POSIX: the --out lock; elsewhere runs are not locked
except ImportError:  # pragma: no cover
    fcntl = None

from potara_guards.safe_files import (
    UnsafeFile,
    folder_problem,
    open_lock,
    remove_leftovers,
    run_folder_problem,
    write_target_problem,
)

OUTPUT_FILES = ("checkpoint.pt", "results.json", "results.md", "lambda.png", "communication.png")  # in --out
OUTPUT_DIRS = ("adapters",)  # in --out: checkpoint.PARTS_DIR, every file in it a part (or a leftover of one)
LOCK_FILE = ".lock"  # in --out: held by the run using it (out_dir_lock)


class RunFolderError(Exception):
    """The run folder cannot serve this run (held by another run, or a link planted at its lock): one line."""


def check_dirs(ap: argparse.ArgumentParser, *flag_path_mode) -> None:
    """(flag, path, mode) triples: a one-line parser error for the first path unusable as a directory."""
    for flag, path, mode in flag_path_mode:
        problem = path and dir_problem(path, mode)
        if problem:
            ap.error(f"{flag} {path}: {problem}")


def dir_problem(path: str, mode: int = os.W_OK | os.X_OK) -> str | None:
    """Why `path` cannot serve as a directory with access `mode` (None if it can, or can be created):
    for a one-line CLI error before any work is done."""
    if os.path.exists(path):
        if not os.path.isdir(path):
            return "exists and is not a directory"
        return None if os.access(path, mode) else "permission denied"
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"cannot be created ({parent} is a file)"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be created ({parent} is not writable)"


_CREATED_DIRS: dict[str, list[str]] = {}  # out_dir_problem: abspath(out) -> the folders it created, deepest first


def prepare_out_dir(
    ap: argparse.ArgumentParser, out: str, flag: str = "--out", files=OUTPUT_FILES, dirs=OUTPUT_DIRS, folders=()
) -> None:
    """out_dir_problem as a one-line parser error (exit 2), before any work."""
    problem = out_dir_problem(out, flag, files, dirs, folders)
    if problem:
        ap.error(problem)


def prepare_out_file(ap: argparse.ArgumentParser, path: str, flag: str = "--out") -> None:
    """out_file_problem as a one-line parser error (exit 2), before any work."""
    problem = out_file_problem(path, flag)
    if problem:
        ap.error(problem)


def out_file_problem(path: str, flag: str = "--out") -> str | None:
    """Before any work, for a single output file (written at the end with safe_files.atomic_write): its folder
    can serve (dir_problem; created now) and `path` is absent or a regular file with one name, never a link, a
    folder or a special file (write_target_problem). The first problem as "<flag> <path>: ..." (one line)."""
    folder = os.path.dirname(os.path.abspath(path))
    problem = dir_problem(folder)
    if problem:
        return f"{flag} {path}: its folder {folder} {problem}"
    problem = write_target_problem(path)
    if problem:
        return f"{flag} {path}: {problem}"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"{flag} {path}: its folder {folder} cannot be created ({e.strerror or type(e).__name__})"
    return None


def out_dir_problem(
    out: str, flag: str = "--out", files=OUTPUT_FILES, dirs=OUTPUT_DIRS, folders: tuple[str, ...] = ()
) -> str | None:
    """Before any work: `out` exists (created; the folders created are remembered so that a run that did
    nothing removes them, see run_lock) and is writable, and it is a trusted run folder: no output file
    (`files`: a run's OUTPUT_FILES unless a study names its own; and LOCK_FILE) is a link or anything but a
    regular file, no output folder (`dirs`: OUTPUT_DIRS) a link or a folder it cannot write, nothing in one a
    link or a special file (safe_files.write_target_problem, folder_problem), so nothing outside `out` is written
    or deleted through a planted link; `folders` (a tool's subfolders that another part fills and checks, e.g.
    a Flower server's out-dir) are folders it can write, never links. The first problem as "<flag> <out>: ..."
    (one line), or None."""
    problem = dir_problem(out)
    if problem:
        return f"{flag} {out}: {problem}"
    missing, d = [], os.path.abspath(out)
    while not os.path.lexists(d):
        missing.append(d)
        d = os.path.dirname(d)
    try:
        os.makedirs(out, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        return f"{flag} {out}: cannot be created or written ({e.strerror or type(e).__name__})"
    if missing:
        _CREATED_DIRS[os.path.abspath(out)] = missing
    problem = run_folder_problem(out, tuple(files) + (LOCK_FILE,)) or _output_dirs_problem(out, dirs)
    for name in folders if not problem else ():
        problem = folder_problem(os.path.join(out, name))
        problem = problem and f"{name} in it {problem}"
        if problem:
            break
    return f"{flag} {out}: {problem}" if problem else None


def _output_dirs_problem(out: str, dirs=OUTPUT_DIRS) -> str | None:
    """The first output folder in `out` (or file in one) the run must not write, as "<name> in it <why>"."""
    for name in dirs:
        folder = os.path.join(out, name)
        problem = folder_problem(folder)
        if problem:
            return f"{name} in it {problem}"
        for entry in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            problem = write_target_problem(os.path.join(folder, entry))
            if problem:
                return f"{name}/{entry} in it {problem}"
    return None


@contextmanager
def out_dir_lock(out: str, flag: str = "--out", files=OUTPUT_FILES):
    """run_lock for a script: a folder held by another run, or a planted lock, is one line on stderr, exit 2
    (cli.fail)."""
    from potara_harness.cli import fail

    with ExitStack() as stack:
        try:
            stack.enter_context(run_lock(out, flag, files))
        except RunFolderError as e:
            fail(str(e))
        yield


@contextmanager
def run_lock(out: str, flag: str = "--out", files=OUTPUT_FILES):
    """Hold an exclusive lock on out/LOCK_FILE for the run (fcntl.flock: released when the process ends,
    even killed), so two runs (a script's, the Flower server's) never write the same folder; the second gets
    RunFolderError, one line. The lock file is opened by safe_files.open_lock (never through a link, symbolic or
    hard: a planted `.lock -> ../victim` is refused, the victim untouched).
    Under the lock, what killed runs left (temporary files of the output `files`, safe_files.remove_leftovers) is
    removed; at the end, a run that wrote nothing leaves nothing: the lock file, and the folders
    out_dir_problem created, are removed when the lock file is all that `out` holds."""
    if fcntl is None:
        yield
        return
    try:
        f = open_lock(os.path.join(out, LOCK_FILE))
    except UnsafeFile as e:
        raise RunFolderError(f"{flag} {out}: {LOCK_FILE} in it {str(e).split(': ', 1)[-1]}") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: held by another process (or another open of it in this one)
            f.seek(0)
            holder = f.read().strip()[:40] or "another process"
            raise RunFolderError(
                f"{flag} {out} is in use by another run ({holder}): wait for it to end or choose another {flag}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        for name in files:
            remove_leftovers(out, name)
        try:
            yield
        finally:
            _remove_if_nothing_written(out)
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_if_nothing_written(out: str) -> None:
    """While the lock is held: when LOCK_FILE is all --out holds, remove it and the folders prepare_out_dir
    created (deepest first; a folder something else wrote into stays)."""
    try:
        if os.listdir(out) != [LOCK_FILE]:
            return
        os.remove(os.path.join(out, LOCK_FILE))
    except OSError:
        return
    for folder in _CREATED_DIRS.pop(os.path.abspath(out), []):
        try:
            os.rmdir(folder)
        except OSError:
            break
