"""Every script answers --help and a bad argument before torch loads, and its help reads right.

Each script runs in a subprocess whose PYTHONPATH puts first a folder holding a `torch` package that raises
on import: --help must still print the help (exit 0) and a bad argument its one-line error (exit 2), so
neither waits for torch and torchvision (13-86 s on a loaded 2-core machine). The help texts are checked for
the exact strings a reader sees: no "(default: True)" after a negated flag, no default twice, no word or
hyphenated name split by the line wrapping.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = {  # name -> (command, a bad argument, its one-line error after argparse's "<prog>: ")
    "run_cifar": (
        [str(REPO / "run_cifar.py")],
        ["--rounds", "0"],
        "error: argument --rounds: must be an integer in [1, 100,000], got 0",
    ),
    "run_llm": (
        [str(REPO / "run_llm.py")],
        ["--max-len", "0"],
        "error: argument --max-len: must be an integer in [1, 32,768], got 0",
    ),
    "ablation": (["-m", "potara_studies.ablation"], ["--scenarios", "nope"], "error: --scenarios 'nope': expected"),
    "studies.bench": (["-m", "potara_studies.bench"], ["--only", "nope"], "error: --only: unknown section(s)"),
    "claims": (["-m", "potara_studies.claims"], ["--claims", "4"], "error: --claims '4': expected"),
    "flower.bench": (
        ["-m", "potara_flower.bench"],
        ["--backbone", "/no/such/file"],
        "error: --backbone /no/such/file: no such file",
    ),
    "flower.fleet": (
        ["-m", "potara_flower.fleet"],
        ["--backbone", "/no/such/file"],
        "error: --backbone /no/such/file: no such file",
    ),
}


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory) -> dict:
    """An environment in which `import torch` raises."""
    folder = tmp_path_factory.mktemp("no_torch")
    (folder / "torch").mkdir()
    (folder / "torch" / "__init__.py").write_text(
        "raise ImportError('torch was imported before the command line was checked')\n"
    )
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(folder), str(REPO)])}


def run(env: dict, cwd, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def helps_at(env: dict, cwd, columns: int) -> dict[str, str]:
    out = {}
    for name, (cmd, _, _) in SCRIPTS.items():
        r = run({**env, "COLUMNS": str(columns)}, cwd, *cmd, "--help")
        assert r.returncode == 0 and r.stderr == "", f"{name} --help: exit {r.returncode}\n{r.stderr[-2000:]}"
        out[name] = r.stdout
    return out


@pytest.fixture(scope="module")
def helps(no_torch, tmp_path_factory) -> dict[str, str]:
    """Each script's --help at 80 columns, run without torch (in an empty folder: nothing may be written)."""
    cwd = tmp_path_factory.mktemp("cwd")
    out = helps_at(no_torch, cwd, 80)
    assert list(cwd.iterdir()) == []
    return out


def test_help_answers_without_torch(helps):
    for name, text in helps.items():
        assert text.startswith("usage: ") and "options:" in text, name


@pytest.mark.parametrize("name", SCRIPTS)
def test_a_bad_argument_is_one_line_without_torch(no_torch, tmp_path, name):
    cmd, bad, message = SCRIPTS[name]
    r = run(no_torch, tmp_path, *cmd, *bad)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and message in lines[0], r.stderr[-2000:]  # no usage block above it
    assert list(tmp_path.iterdir()) == []  # refused before any folder was made


def options(text: str) -> dict[str, str]:
    """--option -> its help text joined onto one line (the lines argparse wrapped, spaces collapsed)."""
    entries = re.split(r"\n  (?=-)", text.split("options:", 1)[1].split("\n\n")[0])
    out = {}
    for e in entries:
        flags, _, rest = e.strip().partition("  ")
        for flag in re.findall(r"--[\w-]+", flags):
            out.setdefault(flag, " ".join(rest.split()))
    return out


def test_negated_flags_show_no_default(helps):
    for name, text in helps.items():
        for flag, help_text in options(text).items():
            if flag.startswith("--no-"):
                assert "default" not in help_text, (name, flag, help_text)
    cifar = options(helps["run_cifar"])
    assert cifar["--no-fedsa"] == "skip the FedSA-LoRA baseline (a second federated run)"
    assert cifar["--no-progress"] == "no progress bars (they are drawn only when stderr is a terminal)"


def test_no_default_is_shown_twice(helps):
    """No help adds "(default: x)" after a parenthesis that already gave it, and none reads "(default: None)"."""
    for name, text in helps.items():
        for flag, help_text in options(text).items():
            assert not re.search(r"default[^()]*\) \(default", help_text), (name, flag, help_text)
            assert "(default: None)" not in help_text, (name, flag, help_text)
    ablation = options(helps["ablation"])
    assert ablation["--threads"] == (
        "CPU threads for torch (default: half the cores). On a CPU shared with other work, torch's own default, one "
        "thread per core, can be several times slower than one thread (10 FedIT rounds of the tiny demo: 8.35 s "
        "against 2.19 s on a busy 2-core machine); calling the library (fed.run_fedit, fed.train_adapter) directly, "
        "set it with torch.set_num_threads"
    )
    assert ablation["--scenarios"].endswith("real: ['conflict', 'dirichlet-0.5'] (default: all)")


def test_wrapping_splits_no_word_or_hyphenated_name(helps, no_torch, tmp_path):
    """Wrapped at 80 columns, each help holds the same words as unwrapped (10000 columns): lines break at spaces
    only, never inside a word, a number or a hyphenated name."""
    wide = helps_at(no_torch, tmp_path, 10000)
    for name, text in helps.items():
        assert text.split() == wide[name].split(), name
    assert "(default: dirichlet-0.1,dirichlet-1.0,fewshot,superclass,conflict)" in " ".join(helps["ablation"].split())
