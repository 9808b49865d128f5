"""The house: the method's files and the vision demo's data at the top (lora.py, fed.py, potara.py, data.py) beside
the two demo scripts, everything else in a folder of its own (potara_guards, potara_harness, potara_flower,
potara_studies), and the import rules between them, read from the code's own import statements (ast): the method's
files import torch, numpy and tqdm only; an arrow runs from a folder to the top, never back (data.py's use of the
file guards is the one exception); no circles. Nothing is installed: the project runs from its folder.
(Copying each method file alone: test_lora.py, test_fed.py, test_potara.py, test_data.py.)"""

import ast
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
METHOD = {"lora", "fed", "potara"}  # stand alone: torch, numpy, tqdm and the standard library only
TOP = METHOD | {"data"}  # the reference's modules; data.py reads downloaded files through the guards
DEMOS = {"run_cifar", "run_llm"}
FOLDERS = ["potara_guards", "potara_harness", "potara_flower", "potara_studies"]  # each may import those before it
METHOD_DEPENDENCIES = {"torch", "numpy", "tqdm"}
ALLOWED_UP = {("data", "potara_guards")}  # (a top module, a folder it imports)
OUTSIDE = "../" + "shared"  # a folder beside the checkout, which a clone does not have (written apart: not a link)
README_LIMIT = 12 * 1024


def project_modules(root: Path = ROOT, folders=FOLDERS) -> dict[str, Path]:
    """Every module of the project by its dotted name: the files at the top and every folder's files."""
    mods = {p.stem: p for p in root.glob("*.py")}
    for folder in folders:
        mods.update({f"{folder}.{p.stem}": p for p in (root / folder).glob("*.py") if p.stem != "__init__"})
        mods[folder] = root / folder / "__init__.py"
    return mods


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """The absolute module names a file imports (anywhere in it: lazy imports count too); a relative import is
    resolved against `package` (from .safe_files import x -> potara_guards.safe_files, potara_guards.safe_files.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package and node.level == 1, f"{path}: only `from .module import ...` inside a folder"
                module = f"{package}.{node.module}" if node.module else package
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # from package import module
    return names


def room(name: str) -> str:
    """The room a module lives in: its folder, or the module itself at the top."""
    return name.split(".")[0]


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in mods.items():
        package = room(name) if "." in name or path.name == "__init__.py" else None
        graph[name] = {n for n in imports_of(path, package) if n in mods and n != name}
    for name, path in mods.items():  # a folder's __init__ is not a step of a circle through its own modules
        if path.name == "__init__.py":
            graph[name] = {m for m in graph[name] if room(m) != name}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path a -> ... -> a, or None (depth-first search: a grey node met again closes one)."""
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state:
                found = visit(nxt, trail + [node])
                if found:
                    return found
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node, [])
            if found:
                return found
    return None


def arrows_up(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(importer, imported) pairs against the house's order: the top's modules (0) < the guards (1) < the harness (2)
    < the Flower app, the studies and the demo scripts (3). A module imports only rooms of a lower rank (a room is
    a folder, or one file at the top: so the method's files never import each other), but for ALLOWED_UP."""
    rank = {m: 0 for m in TOP} | {f: i + 1 for i, f in enumerate(FOLDERS)} | {m: 3 for m in DEMOS}
    rank["potara_studies"] = 3
    bad = []
    for a, targets in graph.items():
        for b in targets:
            ra, rb = room(a), room(b)
            if ra != rb and (ra, rb) not in ALLOWED_UP and rank[rb] >= rank[ra]:
                bad.append((a, b))
    return sorted(bad)


def test_the_top_level_is_the_briefs():
    assert {p.stem for p in ROOT.glob("*.py")} == TOP | DEMOS
    assert sorted(p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()) == sorted(FOLDERS)
    assert (ROOT / "tests").is_dir() and (ROOT / "README.md").is_file()


def test_the_method_files_import_torch_numpy_and_tqdm_only():
    stdlib = sys.stdlib_module_names
    for name in sorted(METHOD):
        for imported in imports_of(ROOT / f"{name}.py"):
            root = imported.split(".")[0]
            assert root in stdlib or root in METHOD_DEPENDENCIES or root == "__future__", (
                f"{name}.py imports {imported}: the method's files import only the standard library and "
                f"{sorted(METHOD_DEPENDENCIES)}, so that each runs copied alone"
            )


def test_arrows_run_from_the_folders_to_the_top_and_never_back():
    bad = arrows_up(import_graph(project_modules()))
    assert not bad, f"imports against the house's order: {bad}"


def test_no_import_circles():
    circle = find_circle(import_graph(project_modules()))
    assert circle is None, f"import circle: {' -> '.join(circle)}"


def test_the_checks_can_fail(tmp_path):
    """The rules above see a circle, an arrow running back up and a relative import when there is one (a made-up
    tree): the checks are fed what they must refuse."""
    (tmp_path / "potara_guards").mkdir()
    (tmp_path / "potara_guards" / "__init__.py").write_text("")
    (tmp_path / "potara_guards" / "a.py").write_text("from .b import x\n")
    (tmp_path / "potara_guards" / "b.py").write_text("import fed\nfrom potara_guards import a\n")
    (tmp_path / "fed.py").write_text("from potara_guards.a import y\n")  # the method importing a folder: up
    mods = project_modules(tmp_path, ["potara_guards"])
    graph = import_graph(mods)
    assert graph["potara_guards.a"] == {"potara_guards.b"} and graph["fed"] == {"potara_guards.a"}
    circle = find_circle(graph)
    assert circle is not None and circle[-1] in circle[:-1], circle
    assert {"potara_guards.a", "potara_guards.b"} <= set(circle)
    assert ("fed", "potara_guards.a") in arrows_up(graph)
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_nothing_is_installed_and_the_flower_app_ships_what_it_imports():
    """pyproject installs no module (the dependencies only: a user's own lora.py or data.py never meets ours in
    site-packages), and the Flower app's files (fab-include) hold every module the app imports, directly or not."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["tool"]["setuptools"] == {"packages": [], "py-modules": []}
    include = project["tool"]["flwr"]["app"]["fab-include"]
    mods, graph = project_modules(), import_graph(project_modules())
    needed, todo = set(), [c.split(":")[0] for c in project["tool"]["flwr"]["app"]["components"].values()]
    while todo:
        m = todo.pop()
        if m not in needed:
            needed.add(m)
            todo.extend(graph[m] | ({room(m)} if "." in m else set()))
    shipped = {f"/{mods[m].relative_to(ROOT)}" for m in needed}
    covered = {f for f in shipped if f in include or f"/{Path(f).parent.name}/*.py" in include}
    assert covered == shipped, f"the app imports files the FAB leaves out: {sorted(shipped - covered)}"


def test_the_readme_is_short_and_nothing_points_outside_the_repository():
    assert (ROOT / "README.md").stat().st_size <= README_LIMIT, "README.md: long material belongs in docs/"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked, "not a git checkout"
    for f in tracked:
        path = ROOT / f
        if path.is_file() and path.suffix in (".py", ".md", ".toml", ""):
            assert OUTSIDE not in path.read_text(errors="ignore"), f"{f} points at {OUTSIDE}"


def test_the_method_files_own_copies_of_check_state_agree():
    """lora.py, fed.py and potara.py each carry check_state (a few lines repeated on purpose: each file stands
    alone). The copies must not drift: on the same states they raise the same message, or none (lora.py adds a
    hint for a LoRA factor of another rank, which no state here has)."""
    import torch

    import fed
    import lora
    import potara

    ref = {"m.lora_A": torch.zeros(2, 3), "head.weight": torch.zeros(4, 2)}
    states = [
        dict(ref),
        {"m.lora_A": torch.zeros(2, 3)},
        {**ref, "extra": torch.zeros(1)},
        {**ref, "head.weight": torch.zeros(4, 2, dtype=torch.float64)},
        {**ref, "head.weight": torch.zeros(5, 2)},
        {**ref, "head.weight": torch.full((4, 2), float("nan"))},
        {**ref, "head.weight": [[0.0] * 2] * 4},
        {**ref, "head.weight": torch.zeros(4, 2).to_sparse()},
        "not a dict",
    ]

    def outcome(check, state):
        try:
            check(state, ref, "adapter")
        except ValueError as e:
            return str(e)
        return None

    for state in states:
        got = {m.__name__: outcome(m.check_state, state) for m in (lora, fed, potara)}
        assert len(set(got.values())) == 1, got
    assert outcome(fed.check_state, states[0]) is None and all(outcome(fed.check_state, s) for s in states[1:])
