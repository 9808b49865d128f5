"""Obstacles planted in a folder a run wrote, and what is checked after (test_run_folder.py, test_run_llm.py,
test_flower_llm.py): a link out, a hard link, a directory, a FIFO where a file goes; a link out, a regular file, a
FIFO, a read-only folder where a folder goes; a file and a folder outside whose bytes must not change. A helper
module, not a test module: no test module imports another."""

import os
import shutil
import stat

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


def plant(out, rel, kind, outside, monkeypatch):
    """Put obstacle `kind` at out/rel (replacing what the run wrote there)."""
    path = os.path.join(out, rel.rstrip("/")) if rel != "./" else str(out)
    if kind == "read-only folder":  # as root, permissions do not apply: os.access answers as for another user
        os.chmod(path, 0o555)
        real_access = os.access
        monkeypatch.setattr(
            os,
            "access",
            lambda p, mode: (
                real_access(p, mode) and not (mode & os.W_OK and os.path.abspath(p) == os.path.abspath(path))
            ),
        )
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
