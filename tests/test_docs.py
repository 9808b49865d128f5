"""The documentation: every command in README.md and docs/*.md is checked, so none goes stale.

Commands are every line of a ```bash block (continuations joined, comments dropped, `&&` chains split) and
every inline `python run_*.py ...` / `python -m potara_*...` span of the prose. Each one is, by its program:

- a project script (`python run_cifar.py ...`, `python -m potara_studies.ablation ...`): its own `main` is
  called with the documented arguments and stopped right after its argument parser has parsed them (the
  parser main really uses; `--help` lines run to the end of the help). Every `--option` must be spelled
  exactly as the parser knows it: argparse would accept an abbreviation of a renamed option.
- `python -m pytest`, `python3 -m venv`, `. .venv/bin/activate`, `pip install ".[extras]"`: what .ci/run does
  (never `-e`: nothing is installed); the extras must exist in pyproject.toml, named packages must be
  dependencies (or be the one external package a project module imports, `datasets` for export_flan).
- `cp FILE FOLDER`: a file of the repository copied into a folder of it (potara.py into an app).
- `flower-superlink`, `flower-supernode`, `flwr`, `openssl`, `ssh-keygen`: each option (and flwr/openssl
  subcommand) must be one that the loopback tests run (its literals, and those of the
  potara_flower/loopback.py methods it drives). `--run-config` keys must be keys of pyproject's
  [tool.flwr.app.config] (of the app folder `flwr run` names), `--node-config` keys ones the page's app reads
  (client_app.py; docs/flower-your-app.md: its example). flwr subcommands no test runs
  (NOT_RUN_BY_TESTS) are checked against the installed flwr's own `--help`.
- anything else fails: add a check here.

`test_a_broken_command_is_caught` feeds the checker wrong lines, so the checker itself cannot rot into
accepting everything. Also: the README's size, links that stay inside the repository, and
potara_harness/export_flan.py run against a stand-in `datasets` module.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

OUTSIDE = "../" + "shared"  # a folder beside the checkout, which a clone does not have (written apart: not a link)

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_LIMIT = 12 * 1024  # bytes
FLOWER_TOOLS = ("flower-superlink", "flower-supernode", "flwr", "openssl", "ssh-keygen")
NOT_RUN_BY_TESTS = {("log",), ("stop",)}  # flwr subcommands the docs name and no test runs
EXTERNAL = {"datasets": "potara_harness/export_flan.py"}  # pip packages the project does not depend on
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
EXAMPLE = REPO / "examples" / "potara-flower-app"
CLIENT_OF_PAGE = {"docs/flower-your-app.md": EXAMPLE / "example_app.py"}  # default: potara_flower/client_app.py
INLINE = re.compile(r"`(python3? (?:run_\w+\.py|-m potara_\w+\.\w+)[^`]*)`")


# ----------------------------------------------------------------------------- extracting the commands
def doc_commands(path: Path) -> list[tuple[str, str]]:
    """(where, command) for every command line of a markdown file."""
    out, block, pending = [], None, ""
    for n, line in enumerate(path.read_text().splitlines(), 1):
        where = f"{path.relative_to(REPO)}:{n}"
        if line.startswith("```"):
            block = None if block is not None else line[3:].strip()
            continue
        if block == "bash":
            pending += line.rstrip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            text, pending = pending, ""
            for cmd in split_chain(shlex.split(text, comments=True)):
                out.append((where, cmd))
        elif block is None:
            out += [(where, m.group(1)) for m in INLINE.finditer(line)]
    return out


def split_chain(tokens: list[str]) -> list[str]:
    cmds, cur = [], []
    for t in tokens + ["&&"]:
        if t == "&&":
            if cur:
                cmds.append(shlex.join(cur))
            cur = []
        else:
            cur.append(t)
    return cmds


ALL = [(w, c) for p in DOCS for w, c in doc_commands(p)]


# ----------------------------------------------------------------------------- checking one command
class _Parsed(Exception):
    pass


def check_script(module: str, argv: list[str]) -> str | None:
    """Call module.main(argv) until its parser has parsed argv; the problem, or None."""
    mod = importlib.import_module(module)
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        known = set(self._option_string_actions)
        unknown = [a.split("=")[0] for a in (args or []) if a.startswith("--") and a.split("=")[0] not in known]
        if unknown:
            raise _Parsed(f"{module}: no option {unknown} (an abbreviation or a removed option)")
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_only
    try:
        mod.main(argv)
    except _Parsed as e:
        return e.args[0] if isinstance(e.args[0], str) else None
    except SystemExit as e:  # argparse: --help exits 0, a bad argument 2 with its message on stderr
        return None if e.code == 0 else f"{module}: its parser refused {argv} (exit {e.code})"
    finally:
        argparse.ArgumentParser.parse_args = original
    return f"{module}.main returned without parsing its arguments"


def check_pip(args: list[str]) -> str | None:
    if args[:1] != ["install"]:
        return f"pip {args[:1]}: only `pip install` is documented"
    deps = {re.split(r"[<>=\[; ]", d)[0].lower() for d in PYPROJECT["project"]["dependencies"]}
    extras = PYPROJECT["project"]["optional-dependencies"]
    rest = iter(args[1:])
    for a in rest:
        if a == "--index-url":
            next(rest)
        elif a == "-e":  # an editable install would put this folder's generic names (data, fed) on every path
            return "pip install -e: the project installs no module; `pip install .[extras]` installs its dependencies"
        elif a.startswith("."):
            m = re.fullmatch(r"\.(?:\[([\w,]+)\])?", a)
            if not m:
                return f"pip install {a}: expected . or .[extras]"
            missing = sorted(set((m.group(1) or "").split(",")) - set(extras) - {""})
            if missing:
                return f"pip install {a}: no extra {missing} in pyproject.toml"
        elif a.startswith("-"):
            return f"pip install {a}: not an option these docs use"
        elif a.lower() not in deps and not (
            a in EXTERNAL and re.search(rf"^\s*import {a}\b", (REPO / EXTERNAL[a]).read_text(), re.M)
        ):
            return f"pip install {a}: neither a dependency in pyproject.toml nor imported by {EXTERNAL.get(a)}"
    return None


def strings_in(path: Path, *names: str) -> set[str]:
    """Every string literal in the named functions (or methods) of a Python file; no names: in the whole file."""
    tree = ast.parse(path.read_text())
    nodes = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name in names] if names else [tree]
    return {
        c.value for node in nodes for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)
    }


def flower_literals() -> dict[str, set[str]]:
    """Per tool, the words the loopback tests pass to it (the TLS-and-authentication kill test in
    tests/test_flower_failures.py, directly or through loopback.LocalFederation)."""
    test, loop = REPO / "tests" / "test_flower_failures.py", REPO / "potara_flower" / "loopback.py"
    auth = strings_in(test, "prepare_kill", "run_kill", "test_loopback_kill_one_supernode_mid_run")
    keys = strings_in(loop, "tls_and_keys")
    return {
        "openssl": keys,
        "ssh-keygen": keys,
        "flower-superlink": strings_in(loop, "superlink") | auth,
        "flower-supernode": strings_in(loop, "supernode") | auth,
        "flwr": strings_in(loop, "flwr", "run") | auth,
    }


def config_keys(text: str) -> list[str]:
    return [kv.split("=")[0] for kv in shlex.split(text)]


def check_flower(tool: str, args: list[str], client: Path = REPO / "potara_flower" / "client_app.py") -> str | None:
    seen = flower_literals()[tool]
    words = [a for a in args if re.fullmatch(r"[a-z][a-z0-9-]*", a) and a not in ("potara", "RUN_ID")]
    if tool == "flwr":
        sub = tuple(w for w in words[:2] if w in ("run", "list", "log", "stop", "supernode", "register"))
        if sub in NOT_RUN_BY_TESTS:
            help_text = subprocess.run(
                [str(Path(sys.executable).parent / "flwr"), *sub, "--help"], capture_output=True, text=True, timeout=60
            ).stdout
            bad = [a for a in args if a.startswith("-") and a not in help_text]
            return (
                f"flwr {' '.join(sub)}: not in flwr's help: {bad or sub}" if bad or "Usage" not in help_text else None
            )
        if not sub or not set(sub) <= seen:
            return f"flwr {' '.join(words[:2])}: no test runs this subcommand (add it to NOT_RUN_BY_TESTS?)"
    if tool == "openssl" and (not words or words[0] not in seen):
        return f"openssl {words[:1]}: no test runs this subcommand"
    flags = [a for a in args if a.startswith("-") and len(a) > 1]
    missing = [f for f in flags if f not in seen]
    if missing:
        return f"{tool}: options no loopback test passes: {missing}"
    app = args[1] if tool == "flwr" and args[:1] == ["run"] else "."
    if not (REPO / app / "pyproject.toml").is_file():
        return f"flwr run {app}: no pyproject.toml there"
    run_keys = tomllib.loads((REPO / app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    for flag, known, what in (
        ("--run-config", run_keys, f"{app}/pyproject.toml's [tool.flwr.app.config]"),
        ("--node-config", strings_in(client), str(client.relative_to(REPO))),
    ):
        if flag in args:
            bad = [k for k in config_keys(args[args.index(flag) + 1]) if k not in known]
            if bad:
                return f"{tool} {flag}: keys {bad} are not in {what}"
    return None


def check(cmd: str, where: str = "") -> str | None:
    """Why a documented command would not work as written (on the page `where`, path:line), or None."""
    tokens = shlex.split(cmd)
    prog, args = tokens[0], tokens[1:]
    ci = (REPO / ".ci" / "run").read_text()
    if prog in ("python", "python3"):
        if args[:2] == ["-m", "venv"]:
            return None if "python3 -m venv" in ci else ".ci/run no longer makes a virtual environment"
        if args[:2] == ["-m", "pytest"]:
            paths = [a for i, a in enumerate(args[2:]) if not a.startswith("-") and args[1 + i] not in ("-m", "-k")]
            missing = [a for a in paths if not (REPO / a.split("::")[0]).exists()]
            return (
                f"pytest: no {missing}"
                if missing
                else None
                if "python -m pytest" in ci
                else ".ci/run no longer runs python -m pytest"
            )
        if args[:1] == ["-m"]:
            module, argv = args[1], args[2:]
        elif args and args[0].endswith(".py"):
            if not (REPO / args[0]).is_file():
                return f"no script {args[0]}"
            module, argv = args[0][:-3].replace("/", "."), args[1:]
        else:
            return f"python {args[:1]}: unknown form"
        if importlib.util.find_spec(module) is None:
            return f"no module {module}"
        return check_script(module, argv)
    if prog in (".", "source"):
        return None if args == [".venv/bin/activate"] and "bin/activate" in ci else f"{cmd}: unexpected"
    if prog == "pip":
        return check_pip(args)
    if prog in FLOWER_TOOLS:
        client = CLIENT_OF_PAGE.get(where.split(":")[0])
        return check_flower(prog, args, client) if client else check_flower(prog, args)
    if prog == "cp":  # a file of the repository copied into a folder of it (potara.py into an app)
        ok = len(args) == 2 and (REPO / args[0]).is_file() and (REPO / args[1]).is_dir()
        return None if ok else f"cp {args}: expected a file of the repository and a folder of it"
    if prog == "printf":  # the SAN file of the TLS recipe: loopback.tls_and_keys writes the same one
        return None if "san.ext" in flower_literals()["openssl"] else "printf: the test no longer writes san.ext"
    return f"{prog}: no check for this program in tests/test_docs.py"


# ----------------------------------------------------------------------------- the tests
def test_the_docs_have_commands_and_the_readme_links_every_page():
    assert len(ALL) > 30 and any("run_cifar.py" in c for _, c in ALL)
    readme = (REPO / "README.md").read_text()
    unlinked = [p.name for p in DOCS[1:] if f"docs/{p.name}" not in readme]
    assert not unlinked, f"README.md links no {unlinked}"


@pytest.mark.parametrize("where,cmd", ALL, ids=[f"{w} {c[:60]}" for w, c in ALL])
def test_documented_command(where, cmd, capsys):
    problem = check(cmd, where)
    capsys.readouterr()  # --help output
    assert problem is None, f"{where}: `{cmd}`: {problem}"


@pytest.mark.parametrize(
    "cmd",
    [
        "python run_cifar.py --preset tiny --no-such-option",
        "python run_cifar.py --pres tiny",  # an abbreviation: breaks when --preset is renamed
        "python run_cifar.py --preset huge",
        "python -m potara_studies.ablation --suite imaginary",
        "python -m potara_flower.bench --clients 2",  # --backbone is required
        "python -m potara_harness.no_such_module",
        "python no_such_script.py",
        'pip install ".[dev,nonexistent]"',
        'pip install -e ".[dev]"',
        "pip install leftpad",
        "flower-superlink --insecure --no-such-flag",
        "flwr frobnicate potara",
        'flwr run . potara --run-config "num-clients=2 no-such-key=1"',
        'flwr run examples/potara-flower-app potara --run-config "batch-size=8"',  # the project app's key
        "flwr run examples/no-such-app potara",
        "flower-supernode --insecure --superlink SERVER:9093 --node-config \"partition-id=0 colour='red'\"",
        "openssl genpkey -algorithm ed25519",
        "rm -rf data",
        "cp potara.py examples/no-such-app/",
        "cp no_such_file.py examples/potara-flower-app/",
    ],
)
def test_a_broken_command_is_caught(cmd, capsys):
    assert check(cmd) is not None, cmd
    capsys.readouterr()


def test_the_example_pages_node_config_and_pyproject_are_the_apps():
    """docs/flower-your-app.md: its --node-config keys are the example's (not the project app's); the
    pyproject.toml and the handler it prints are the example's, byte for byte, and its line count is right."""
    bad = "flower-supernode --insecure --superlink SERVER:9093 --node-config \"partition-id=0 backbone='x.pt'\""
    assert check(bad, "docs/flower-your-app.md:1") is not None and check(bad) is None
    page = (REPO / "docs" / "flower-your-app.md").read_text()
    shown = page.split("```toml\n", 1)[1].split("```", 1)[0]
    assert shown == (EXAMPLE / "pyproject.toml").read_text()
    code = (EXAMPLE / "example_app.py").read_text()
    lines = re.search(r"`example_app.py` \((\d+) lines\)", page)
    assert lines and int(lines.group(1)) == len(code.splitlines()), "the page's line count of example_app.py"
    handler = page.split("```python\n", 1)[1].split("```", 1)[0]
    missing = [line for line in handler.splitlines() if line not in code.splitlines()]  # its docstring left out
    assert not missing, f"the page's handler is not example_app.py's: {missing}"


def test_the_readme_stays_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes; move detail to docs/ (limit {README_LIMIT})"


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_stay_inside_the_repository_and_resolve():
    for path in DOCS:
        text = path.read_text()
        assert OUTSIDE not in text and "/work/" not in text, path
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"https?://", target):
                continue
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            assert dest.exists() and REPO in dest.parents or dest == REPO, f"{path.name}: link {target}"
            if anchor and dest.suffix == ".md":
                slugs = {slug(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
                assert anchor in slugs, f"{path.name}: link {target}: no heading #{anchor} in {dest.name}"


FOLDERS = ("potara_guards", "potara_harness", "potara_flower", "potara_studies")


def project_module_names() -> dict[str, list[str]]:
    """Each module's short name (a top file's stem, a folder's own name, a folder file's stem) -> its dotted names."""
    names: dict[str, list[str]] = {p.stem: [p.stem] for p in REPO.glob("*.py")}
    for folder in FOLDERS:
        names.setdefault(folder, []).append(folder)
        for file in sorted((REPO / folder).glob("*.py")):
            if file.stem != "__init__":
                names.setdefault(file.stem, []).append(f"{folder}.{file.stem}")
    return names


def resolves(dotted: str, modules: dict[str, list[str]]) -> bool:
    """`module.name[.attr...]` (module a short or dotted name of the project's) names something that exists;
    `module.py` a file that exists."""
    head, *rest = dotted.split(".")
    if rest == ["py"]:
        return any(module != head or (REPO / f"{head}.py").is_file() for module in modules[head])
    for module in modules[head]:
        obj = importlib.import_module(module)
        for part in rest:
            if isinstance(obj, type(sys)) and not hasattr(obj, part):
                try:
                    obj = importlib.import_module(f"{obj.__name__}.{part}")
                    continue
                except ImportError:
                    break
            if not hasattr(obj, part):
                break
            obj = getattr(obj, part)
        else:
            return True
    return False


FILE_NAME = re.compile(r"`((?:[\w.-]+/)*\w+\.py)\b")  # an inline code span naming a Python file (maybe a path)


def file_exists(name: str) -> bool:
    """A Python file the docs name: a tracked file of the repository (by its path, or the end of its path), or a
    path inside the installed flwr (the docs cite flwr's own source)."""
    if (REPO / name).is_file():
        return True
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if any(t == name or t.endswith("/" + name) for t in tracked):  # a file name, or a path inside a folder
        return True
    flwr = importlib.util.find_spec("flwr")
    root = Path(flwr.origin).parent if flwr and flwr.origin else None
    return root is not None and any((root / name.removeprefix(p)).is_file() for p in ("flwr/", ""))


DOTTED = re.compile(r"`([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+)")  # the leading dotted name of an inline code span


FILE_SUFFIXES = {"json", "jsonl", "md", "pt", "png", "txt", "toml", "log", "tmp", "old", "partial", "lock"}


def documented_names(text: str, modules: dict[str, list[str]]) -> list[str]:
    """The dotted names in inline code that start with a project module (a run's file, `checkpoint.pt`, is not)."""
    return [d for d in DOTTED.findall(text) if d.split(".")[0] in modules and d.split(".")[-1] not in FILE_SUFFIXES]


def test_every_name_the_docs_give_exists():
    """`fed.run_fedit`, `potara.personalize`, `config.AppConfig`, `merge.py`: each module, function, class
    and file the README and docs/ name in inline code exists under that name (a renamed function or a moved
    module fails here, not in a reader's hands)."""
    modules = project_module_names()
    missing = [
        f"{path.name}: {name}"
        for path in DOCS
        for name in documented_names(path.read_text(), modules)
        if not resolves(name, modules)
    ]
    assert not missing, "\n".join(missing)


def test_every_python_file_the_docs_name_exists():
    """`merge.py`, `potara_harness/data.py`: a file a page names in inline code is one of the repository (or, for
    a path, of the installed flwr, whose source the pages cite): a file moved or merged away fails here."""
    missing = [f"{p.name}: {f}" for p in DOCS for f in FILE_NAME.findall(p.read_text()) if not file_exists(f)]
    assert not missing, "\n".join(missing)


def test_a_stale_name_in_the_docs_is_caught():
    modules = project_module_names()
    text = "`potara.causal_lm_likelihood` `fed.no_such_function` `nothere.py` `potara.no_such_name` `potara.py`"
    names = documented_names(text, modules)
    assert names == ["potara.causal_lm_likelihood", "fed.no_such_function", "potara.no_such_name", "potara.py"]
    assert [resolves(n, modules) for n in names] == [True, False, False, True]
    stale = "`fedit.py` `potara_harness/data.py` `potara/lora.py` `data.py` `supernode/start_client_internal.py`"
    assert [file_exists(f) for f in FILE_NAME.findall(stale)] == [False, False, False, True, True]


# ----------------------------------------------------------------------------- export_flan.py
STUB_ROWS = {  # (dataset id, config) -> {split: rows}; the shuffle of the stub keeps the order
    ("allenai/ai2_arc", "ARC-Challenge"): {
        "train": [
            {
                "question": "Which is a metal?",
                "choices": {"text": ["wood", "iron"], "label": ["A", "B"]},
                "answerKey": "B",
            },
            {"question": "No key?", "choices": {"text": ["x", "y"], "label": ["A", "B"]}, "answerKey": "E"},
        ]
    },
    ("allenai/cosmos_qa", None): {
        "train": [
            {"context": "It rained.", "question": "Why wet?", **{f"answer{i}": f"a{i}" for i in range(4)}, "label": 2}
        ]
    },
    ("community-datasets/definite_pronoun_resolution", "plain_text"): {
        "train": [
            {
                "sentence": "Tom thanked Bob because he helped.",
                "pronoun": "he",
                "candidates": ["Tom", "Bob"],
                "label": 1,
            }
        ]
    },
    ("nyu-mll/glue", "qqp"): {
        "train": [{"question1": "a?", "question2": "b?", "label": 0}],
        "test": [{"question1": "c?", "question2": "d?", "label": -1}],
    },
    ("Rowan/hellaswag", None): {
        "train": [{"activity_label": "Cooking", "ctx": "He stirs", "endings": list("abcd"), "label": "3"}],
        "test": [{"activity_label": "Cooking", "ctx": "She", "endings": list("abcd"), "label": ""}],
    },
    ("nyu-mll/glue", "mnli"): {
        "train": [{"premise": "p", "hypothesis": "h", "label": 1}, {"premise": "q", "hypothesis": "h", "label": 2}]
    },
    ("rajpurkar/squad", None): {
        "train": [
            {
                "context": "Paris is in France.",
                "question": "Where is Paris?",
                "answers": {"text": ["France", "in France"]},
            },
            {"context": "c", "question": "q", "answers": {"text": []}},
            {"context": "c", "question": "q", "answers": {"text": ["  "]}},
        ]
    },
    ("nyu-mll/glue", "sst2"): {
        "train": [
            {"sentence": "great", "label": 1},
            {"sentence": "awful", "label": 0},
            {"sentence": "fine", "label": 1},
        ],
        "validation": [{"sentence": "dull", "label": 0}],
    },
}
STUB = """
ROWS = {rows!r}
class Rows(list):
    def shuffle(self, seed):
        assert seed == 0
        return self
def get_dataset_split_names(hub, cfg=None):
    return list(ROWS[(hub, cfg)])
def load_dataset(hub, cfg=None, split=None):
    return Rows(ROWS[(hub, cfg)][split])
def concatenate_datasets(parts):
    return Rows(r for p in parts for r in p)
"""


def run_export(tmp_path, *args, stub: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "datasets").mkdir(exist_ok=True)
    (tmp_path / "datasets" / "__init__.py").write_text(
        stub if stub is not None else "raise ImportError('No module named datasets')"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    return subprocess.run(
        [sys.executable, "-m", "potara_harness.export_flan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )


def test_export_flan_writes_run_llm_data_and_drops_unlabelled_rows(tmp_path):
    out = tmp_path / "flan"
    r = run_export(tmp_path, str(out), "3", stub=STUB.format(rows=STUB_ROWS))
    assert r.returncode == 0, r.stderr
    got = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in out.glob("*.jsonl")}
    assert sorted(got) == sorted(
        [
            "arc_challenge",
            "cosmos_qa",
            "definite_pronoun_resolution",
            "glue_qqp",
            "hellaswag",
            "mnli",
            "squad_v1",
            "sst2",
        ]
    )
    assert got["arc_challenge"] == [
        {"prompt": "Question: Which is a metal?\nAnswer:", "answer": "iron", "options": ["wood", "iron"]}
    ]  # the key naming no choice: dropped
    assert got["glue_qqp"] == [
        {
            "prompt": "Question 1: a?\nQuestion 2: b?\nDo they ask the same thing?\nAnswer:",
            "answer": "no",
            "options": ["no", "yes"],
        }
    ]  # the test split's -1: dropped
    assert [e["answer"] for e in got["hellaswag"]] == ["d"]  # label "3" kept, "" dropped
    assert got["squad_v1"] == [
        {"prompt": "Paris is in France.\nQuestion: Where is Paris?\nAnswer:", "answer": "France"}
    ]  # free-form; none or a blank one: dropped
    assert [e["answer"] for e in got["mnli"]] == ["maybe", "no"]
    assert got["cosmos_qa"][0]["answer"] == "a2" and got["definite_pronoun_resolution"][0]["answer"] == "Bob"
    assert [e["prompt"] for e in got["sst2"]] == [f"Review: {s}\nSentiment:" for s in ("great", "awful", "fine")]
    for task, examples in got.items():  # at most N, every answer among its options
        assert 1 <= len(examples) <= 3
        assert all(e["answer"] in e["options"] for e in examples if "options" in e), task
    from potara_harness.llm_data import read_task_dir  # what run_llm.py --data reads

    assert {k: len(v) for k, v in read_task_dir(str(out)).items()} == {k: len(v) for k, v in got.items()}
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_export_flan_without_datasets_is_one_line(tmp_path):
    r = run_export(tmp_path, str(tmp_path / "flan"), stub=None)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "pip install datasets" in r.stderr
    assert not (tmp_path / "flan").exists()
    r = run_export(tmp_path, "--help", stub=None)
    assert r.returncode == 0 and "per_task" in r.stdout


def stub_datasets(monkeypatch):
    """The stand-in `datasets` module, in this process (for export_flan.main called in-process)."""
    import types

    module = types.ModuleType("datasets")
    exec(STUB.format(rows=STUB_ROWS), module.__dict__)
    monkeypatch.setitem(sys.modules, "datasets", module)


def test_export_flan_never_writes_through_a_planted_temporary(tmp_path, monkeypatch, capsys):
    """`<task>.jsonl.tmp<pid>` -> outside: the export overwrote the outside file and made <task>.jsonl that link.
    Now the temporary is a new random name (safe_files.atomic_write): the planted link is never opened."""
    from potara_harness import export_flan

    stub_datasets(monkeypatch)
    victim, out = tmp_path / "victim.txt", tmp_path / "flan"
    victim.write_text("precious")
    out.mkdir()
    os.symlink(victim, out / f"sst2.jsonl.tmp{os.getpid()}")
    kept = export_flan.main([str(out), "2"])
    assert kept["sst2"] == 2 and victim.read_text() == "precious"
    assert not os.path.islink(out / "sst2.jsonl") and len((out / "sst2.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("kind", ["link out", "hard link", "directory", "FIFO", "DIR a file"])
def test_export_flan_refuses_an_obstacle_in_one_line_before_reading_a_dataset(tmp_path, monkeypatch, capsys, kind):
    from potara_harness import export_flan

    stub_datasets(monkeypatch)
    victim, out = tmp_path / "victim.txt", tmp_path / "flan"
    victim.write_text("precious")
    out.mkdir()
    target = out / "mnli.jsonl"
    if kind == "link out":
        os.symlink(victim, target)
    elif kind == "hard link":
        os.link(victim, target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "FIFO":
        os.mkfifo(target)
    else:
        out.rmdir()
        out.write_text("a file")
    with pytest.raises(SystemExit) as e:
        export_flan.main([str(out), "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "Traceback" not in "\n".join(err), err
    assert err[-1].count("error:") == 1 and str(out) in err[-1], err
    assert kind == "DIR a file" or "mnli.jsonl in it" in err[-1], err
    assert victim.read_text() == "precious"
    assert kind == "DIR a file" or sorted(os.listdir(out)) == ["mnli.jsonl"]  # nothing written before the check


# ----------------------------------------------------------------------------- the README's program
def test_the_readmes_program_runs_as_written_and_prints_what_the_readme_says(tmp_path):
    """The README's python block, run from the repository root as a user would, prints the line the README
    quotes; phi_L's and phi_G's accuracies are the ones the README gives; both
    merges load back into the model (the delta one at rank 2r)."""
    readme = (REPO / "README.md").read_text()
    program = readme.split("```python\n", 1)[1].split("```", 1)[0]
    check_after = """
lora.load_lora_state_dict(model, phi_L, allow_rank_change=True)
print(f"phi_L {(model(x).argmax(1) == y).float().mean():.2f}")
lora.load_lora_state_dict(model, phi_G)
print(f"phi_G {(model(x).argmax(1) == y).float().mean():.2f}")
ranks = sorted({v.shape[0] for k, v in merged.items() if k.endswith("lora_A")})
print("ranks", sorted({m.r for m in lora.lora_layers(model)}), ranks)
"""
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(  # python -c from the root: the folder is on sys.path, as for a script saved there
        [sys.executable, "-c", program + check_after], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout.splitlines()
    text = " ".join(readme.split())
    quoted = re.search(r"prints `(lam [\d.]+, accuracy [\d.]+)` \(phi_L alone: ([\d.]+), phi_G: ([\d.]+)\)", text)
    assert quoted, "the README quotes what its program prints"
    assert printed[0] == quoted.group(1), (printed, quoted.group(1))
    assert printed[1:3] == [f"phi_L {quoted.group(2)}", f"phi_G {quoted.group(3)}"], printed
    assert printed[3] == "ranks [4] [8]", printed  # phi_L at rank r loaded back; the delta merge held rank 2r


# ----------------------------------------------------------------------------- docs/modules.md against the tree
def module_tables(text: str) -> dict[str, list[tuple[str, list[str]]]]:
    """{folder ('' for the top): [(file, [names in its third column])]} from modules.md's tables: a section's
    heading names its folder (`## \\`potara_guards/\\`: ...`); "The reference" is the top."""
    tables, folder = {}, None
    for line in text.splitlines():
        if line.startswith("## "):
            m = re.match(r"## `([\w/]+)/`", line)
            folder = m.group(1) if m else "" if line.startswith("## The reference") else None
        elif folder is not None and line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            file = re.match(r"`([\w/]+\.py)`", cells[0])
            if file:
                names = re.findall(r"`(\w+)\*?`", cells[2]) if len(cells) > 2 else []
                tables.setdefault(folder, []).append((file.group(1), names))
    return tables


def defined_names(path: Path) -> set[str]:
    """The names a module defines at its top level (functions, classes, assignments), read without importing it."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def modules_page_problems(text: str) -> list[str]:
    tables, problems = module_tables(text), []
    folders = ["", "potara_guards", "potara_harness", "potara_flower", "potara_studies"]
    for folder in folders:
        listed = {f for f, _ in tables.get(folder, [])}
        tree = {str(p.relative_to(REPO / folder)) for p in (REPO / folder).rglob("*.py") if p.name != "__init__.py"}
        tree = {t for t in tree if ".venv" not in t and not t.startswith(("tests/", ".ci/", "examples/", "potara_"))}
        if missing := sorted(tree - listed):
            problems.append(f"{folder or 'the top'}: files not in the table: {missing}")
        if extra := sorted(listed - tree):
            problems.append(f"{folder or 'the top'}: the table lists files that do not exist: {extra}")
        for file, names in tables.get(folder, []):
            path = REPO / folder / file
            if path.exists() and (absent := sorted(set(names) - defined_names(path) - {"CLI", "SALT_"})):
                problems.append(f"{folder}/{file}: names it does not define: {absent}")
    return problems


def test_the_modules_page_lists_every_file_and_names_that_exist():
    """docs/modules.md's tables against the tree: every module of the top and of each folder has its row, every
    row's file exists, and every name in its "main names" column is defined in that file."""
    problems = modules_page_problems((REPO / "docs" / "modules.md").read_text())
    assert not problems, "\n".join(problems)


def test_a_stale_modules_table_is_caught():
    page = (REPO / "docs" / "modules.md").read_text()
    dropped = page.replace("| `updates.py` |", "| `replies_of_old.py` |")
    renamed = page.replace("`personalize`, `Verified`", "`personalise`, `Verified`")
    assert any("updates.py" in p for p in modules_page_problems(dropped))
    assert any("replies_of_old.py" in p for p in modules_page_problems(dropped))
    assert modules_page_problems(renamed) == ["/potara.py: names it does not define: ['personalise']"]


# ----------------------------------------------------------------------------- bounds the pages state
BOUND_CLAIM = re.compile(r"`--([\w-]+)` (<=|>=) ([\d,.]+\d)")


def bound_claim_problems(text: str) -> list[str]:
    """Each "`--option` <= N" (or >= N) a page states, held against config.BOUNDS: N must be the option's upper
    (lower) bound."""
    from potara_harness.config import BOUNDS

    problems = []
    for name, op, number in BOUND_CLAIM.findall(text):
        bound = BOUNDS.get(name.replace("-", "_"))
        if bound is None:
            problems.append(f"--{name}: no bound in config.BOUNDS")
            continue
        said, actual = float(number.replace(",", "")), bound.hi if op == "<=" else bound.lo
        if said != actual:
            problems.append(f"--{name} {op} {number}: config.BOUNDS says {actual:g}")
    return problems


def test_every_bound_a_page_states_is_config_bounds():
    claims = [(p.name, c) for p in DOCS for c in BOUND_CLAIM.findall(p.read_text())]
    assert len(claims) >= 4, claims  # the size bounds of failure-behaviour.md at least
    problems = [f"{p.name}: {x}" for p in DOCS for x in bound_claim_problems(p.read_text())]
    assert not problems, "\n".join(problems)


def test_a_stale_bound_on_a_page_is_caught():
    assert bound_claim_problems("`--synthetic-examples` <= 20000") == [
        "--synthetic-examples <= 20000: config.BOUNDS says 1000"
    ]
    assert bound_claim_problems("`--rank` >= 1, `--max-len` <= 32768") == []


# ----------------------------------------------------------------------------- the README's count of the tests
def test_the_readmes_test_counts_are_the_suites(request):
    """The README counts test functions, collected items, the range checks of test_bounds.py and the documented
    commands: each number as pytest collects the suite now (this session's items when it runs the whole suite,
    else a subprocess's `pytest --co -q`)."""
    text = " ".join((REPO / "README.md").read_text().split())
    said = re.search(
        r"runs ([\d,]+) test functions as ([\d,]+) items \(one more, slow, with `-m slow`\)\. Of the items, ([\d,]+) "
        r"\((\d+)%\) are one property, checked for every number of every entry point by (\d+) functions of "
        r"`tests/test_bounds.py`, and ([\d,]+) are the documented commands",
        text,
    )
    assert said, "the README's sentence counting the tests"
    functions, items, bounds, share, bound_functions, commands = (int(g.replace(",", "")) for g in said.groups())
    files = {f"tests/{p.name}" for p in (REPO / "tests").glob("test_*.py")}
    ids = [item.nodeid for item in request.session.items]
    chosen = request.config.getoption("deselect") or request.config.getoption("keyword")
    if chosen or {i.split("::")[0] for i in ids} != files:  # a part of the suite runs: collect the whole
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        ids = [line for line in done.stdout.splitlines() if "::" in line]
    tests = [
        n for p in (REPO / "tests").glob("test_*.py") for n in ast.walk(ast.parse(p.read_text()))
        if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")
    ]  # fmt: skip
    slow = [n for n in tests if any("slow" in ast.unparse(d) for d in n.decorator_list)]
    in_bounds = [i for i in ids if i.startswith("tests/test_bounds.py::")]
    assert len(slow) == 1 and items == len(ids) and not any(n.name in i for n in slow for i in ids), (items, len(ids))
    assert functions == len(tests) and bounds == len(in_bounds) and share == round(100 * bounds / items)
    assert bound_functions == len({i.split("::")[1].split("[")[0] for i in in_bounds})
    assert commands == sum("test_documented_command" in i or "test_a_broken_command" in i for i in ids)
