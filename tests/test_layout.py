"""The house: one installed package for the algorithm (`potara/`), every other installed module under a name of
this project's own (`potara_harness`, `potara_flower`, `potara_studies`), the two demo scripts at the top, and
the import rules between them, read from the code's own import statements (ast). The algorithm folder copied
alone runs a tiny FedIT + personalize; a user's folder full of generic module names does not disturb it."""

import ast
import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORE = "potara"
HARNESS = "potara_harness"
PACKAGES = {CORE, HARNESS, "potara_flower", "potara_studies"}
DEMOS = {"run_cifar", "run_llm"}
CORE_DEPENDENCIES = {"torch", "numpy", "tqdm"}
OUTSIDE = "../" + "shared"  # a folder beside the checkout, which a clone does not have (written apart: not a link)


def project_modules() -> dict[str, Path]:
    """Every module of the project by its dotted name: the scripts at the top and every package's files."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for package in PACKAGES:
        mods.update({f"{package}.{p.stem}": p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"})
        mods[package] = ROOT / package / "__init__.py"
    return mods


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """The absolute module names a file imports (anywhere in it: lazy imports count too); a relative import
    is resolved against `package` (from .lora import x -> potara.lora, potara.lora.x)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                assert package and node.level == 1, f"{path}: only `from .module import ...` inside a package"
                module = f"{package}.{node.module}" if node.module else package
            else:
                module = node.module
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # from package import module
    return names


def package_of(name: str) -> str | None:
    return name.split(".")[0] if "." in name or name in PACKAGES else None


def project_imports(name: str, path: Path, mods: dict) -> set[str]:
    return {n for n in imports_of(path, package_of(name)) if n in mods and n != name}


def test_one_algorithm_package_and_the_demos_at_the_top():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top == DEMOS, f"modules at the top other than the two demos: {sorted(top - DEMOS)}"
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == PACKAGES
    algorithm = {p.stem for p in (ROOT / CORE).glob("*.py")} - {"__init__"}
    assert {"lora", "fedit", "fisher", "weight", "merge", "training", "adapter_file"} <= algorithm


def test_import_potara_names_every_algorithm_file_and_the_four_steps():
    """`potara.<file>` reaches every file of the package, and `potara.<name>` each name of the four steps, from
    the module its listing says (checked against the files themselves)."""
    import potara

    algorithm = {p.stem for p in (ROOT / CORE).glob("*.py")} - {"__init__"}
    assert set(potara._MODULES) == algorithm
    for name, module in potara._WHERE.items():
        assert getattr(potara, name) is getattr(getattr(potara, module), name), name
    for step in ("add_lora", "run_fedit", "train_adapter", "personalize", "save_adapter", "load_adapter"):
        assert step in potara.__all__


def test_the_installed_names_are_the_projects_own():
    """What `pip install` puts at the top of a user's environment: the four packages, no module with a
    generic name and no script (the installed distribution's own record, and pyproject's table)."""
    import tomllib

    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert set(setuptools["packages"]) == PACKAGES and "py-modules" not in setuptools
    top_level = importlib.metadata.distribution("potara").read_text("top_level.txt")
    if top_level is not None:  # an installed wheel or an editable install records its top-level names
        assert set(top_level.split()) == PACKAGES, top_level


def test_the_algorithm_imports_only_itself_and_the_core_dependencies():
    stdlib = sys.stdlib_module_names
    mods = project_modules()
    for name, path in mods.items():
        if package_of(name) != CORE:
            continue
        for imported in imports_of(path, CORE):
            root = imported.split(".")[0]
            assert root == CORE or root in stdlib or root in CORE_DEPENDENCIES or root == "__future__", (
                f"{path.relative_to(ROOT)} imports {imported}: the algorithm imports only itself, the standard "
                f"library and {sorted(CORE_DEPENDENCIES)}"
            )
        if path.name != "__init__.py":  # relative imports only: the folder works under any name (copied, vendored)
            absolute = {n for n in imports_of(path, "<relative>") if n.split(".")[0] == CORE}
            assert not absolute, f"{path.relative_to(ROOT)} imports {sorted(absolute)} by the package's name"


def test_packages_import_the_algorithm_and_the_harness_never_a_sibling():
    mods = project_modules()
    for name, path in mods.items():
        package = package_of(name)
        for imported in project_imports(name, path, mods):
            other = imported.split(".")[0]
            assert imported not in DEMOS, f"{path.relative_to(ROOT)} imports the demo {imported}"
            if package is None:  # a demo
                assert other in (CORE, HARNESS), f"{name}.py imports {imported}"
            elif package == CORE:
                assert other == CORE, f"{path.relative_to(ROOT)} (the algorithm) imports {imported}"
            else:
                assert other in (CORE, HARNESS, package), f"{path.relative_to(ROOT)} imports the sibling {imported}"


def test_no_import_circles():
    mods = project_modules()
    graph = {name: project_imports(name, path, mods) for name, path in mods.items()}
    for name in PACKAGES:  # a package's __init__ is not a step of a circle through its own modules
        graph[name] = {m for m in graph[name] if package_of(m) != name}
    state: dict[str, int] = {}

    def visit(node, trail):  # depth-first search; a grey node met again closes a circle
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, f"import circle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_no_file_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert tracked, "not a git checkout"
    for f in tracked:
        path = ROOT / f
        if path.is_file() and path.suffix in (".py", ".md", ".toml", ""):
            assert OUTSIDE not in path.read_text(errors="ignore"), f"{f} points at {OUTSIDE}"


def test_the_check_can_fail(tmp_path):
    """The rules above see a sibling import, a relative import and a circle when there is one (a made-up tree)."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from a import x\n")
    assert imports_of(tmp_path / "a.py") == {"b"} and imports_of(tmp_path / "b.py") == {"a", "a.x"}
    (tmp_path / "c.py").write_text("from potara_flower import task\nimport potara_studies.bench\nfrom .lora import y\n")
    assert {"potara_flower.task", "potara_studies.bench", "potara.lora", "potara.lora.y"} <= imports_of(
        tmp_path / "c.py", "potara"
    )


CORE_RUN = textwrap.dedent("""
    import os, sys, torch, torch.nn as nn
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import potara
    from potara import fedit, lora, training
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    lora.add_lora(model, ["0"], r=2, alpha=4, trainable=["2"])
    g = torch.Generator().manual_seed(1)
    clients = []
    for k in range(3):
        x = torch.randn(40, 6, generator=g)
        clients.append(fedit.Client(f"c{k}", x, (x[:, k] > 0).long()))
    phi0 = lora.lora_state_dict(model)
    state = potara.run_fedit(model, clients, potara.FedConfig(rounds=3, local_steps=4, lr=0.05, batch_size=16),
                             progress=False)
    local = [training.train_adapter(model, training.shuffled_batches(c.inputs, c.targets, 16, 0), 20, 0.05,
                                    progress=False, start=phi0).state for c in clients]
    val = torch.randn(30, 6, generator=g)
    merged, info = potara.personalize(model, state.global_state, local[0],
                                      held_out=[(val, (val[:, 0] > 0).long())])
    assert 0.0 <= info["lam"] <= 1.0 and set(merged) == set(phi0)
    potara.save_adapter("merged.pt", merged, potara.lora_meta(model))
    assert all(torch.equal(potara.load_adapter("merged.pt")[0][k], merged[k]) for k in merged)
    mine = {n: m.__file__ for n, m in sys.modules.items() if n.split(".")[0] in ("potara",) and n != "potara"}
    print("loaded", sorted(mine.values()))
    print("lam", info["lam"], "rounds", len(state.history))
""")


def run_in(folder: Path, script: str, code: str, *path: str):
    (folder / script).write_text(code)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if path:
        env["PYTHONPATH"] = os.pathsep.join(path)
    return subprocess.run([sys.executable, script], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def test_the_algorithm_folder_copied_alone_runs_fedit_and_personalize(tmp_path):
    """potara/ copied into an empty folder, nothing else of the repository on the path (not even the installed
    project: the copy comes first): a tiny FedIT + Potara end to end, every module read from the copy."""
    shutil.copytree(ROOT / CORE, tmp_path / CORE, ignore=shutil.ignore_patterns("__pycache__"))
    out = run_in(tmp_path, "core_run.py", CORE_RUN)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rounds 3" in out.stdout
    loaded = out.stdout.split("loaded ", 1)[1].split("\n", 1)[0]
    assert str(tmp_path / CORE) in loaded and str(ROOT) not in loaded, loaded
    assert not any(n.startswith("potara_") for n in os.listdir(tmp_path))


GENERIC_NAMES = ("data", "training", "lora", "files", "fed", "fisher", "task", "merge", "weight", "rounds")


def test_a_users_generic_modules_never_shadow_potaras(tmp_path):
    """A user's folder holding its own data.py, training.py, lora.py, files.py, fed.py (and more), first on
    sys.path, runs `import potara` and a tiny FedIT + personalize against the installed project; both the user's
    modules and ours are the ones each side asked for."""
    for name in GENERIC_NAMES:
        (tmp_path / f"{name}.py").write_text(f"WHOSE = 'user'\nNAME = {name!r}\n")
    code = CORE_RUN.replace("sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))\n", "")
    code += textwrap.dedent(f"""
        import importlib
        for name in {GENERIC_NAMES!r}:
            assert importlib.import_module(name).WHOSE == "user", name
    """)
    out = run_in(tmp_path, "user_app.py", code)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = out.stdout.split("loaded ", 1)[1].split("\n", 1)[0]
    assert str(ROOT / CORE) in loaded and str(tmp_path) not in loaded, loaded


USER_CLIENT = textwrap.dedent("""
    import torch, torch.nn as nn
    {potara}
    {own}


    def run():
        torch.manual_seed(0)
        model = nn.Linear(4, 3)
        L = {{k: v.clone() for k, v in model.state_dict().items()}}
        G = {{k: v + 0.3 * torch.randn_like(v) for k, v in L.items()}}
        x = torch.randn(24, 4)
        merged, info = personalize(model, G, L, held_out=[(x, (x[:, 0] > 0).long())])
        assert 0.0 <= info["lam"] <= 1.0 and set(merged) == set(L)
        print("user", OWN_DATA, OWN_TASK, OWN_LORA)
        import sys
        print("potara", personalize.__module__, sys.modules[personalize.__module__].__file__)
        print("files", sorted({{getattr(m, "__file__", None) or "" for m in sys.modules.values()
                               if "/potara/" in (getattr(m, "__file__", None) or "")}}))
""")
LAYOUTS = {  # (where the user's modules live, potara copied to: None = the installed one, how they are imported)
    "flat, potara installed": ("", None, "from potara import personalize", "from {m} import OWN_{M}"),
    "flat, potara copied beside": ("", "potara", "from potara import personalize", "from {m} import OWN_{M}"),
    "package, potara installed": ("myapp", None, "from potara import personalize", "from .{m} import OWN_{M}"),
    "package, potara copied in": (
        "myapp",
        "myapp/potara",
        "from .potara import personalize",
        "from .{m} import OWN_{M}",
    ),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_potara_in_a_users_app_under_each_layout(layout, tmp_path):
    """A user's Flower-style app (client_app.py beside its own data.py, task.py and lora.py: flat, or a package
    like Flower's quickstarts, myapp/client_app.py) imports potara, installed or copied in, and runs
    personalize: each side's modules are the ones it asked for (run from the app's folder, which is what flwr's
    loader puts first on sys.path)."""
    package, copy_to, potara_import, own_import = LAYOUTS[layout]
    app = tmp_path / package
    app.mkdir(exist_ok=True)
    if package:
        (app / "__init__.py").write_text("")
    own = "\n".join(own_import.format(m=m, M=m.upper()) for m in ("data", "task", "lora"))
    for m in ("data", "task", "lora"):
        (app / f"{m}.py").write_text(f"OWN_{m.upper()} = 'user {m}'\n")
    (app / "client_app.py").write_text(USER_CLIENT.format(potara=potara_import, own=own))
    if copy_to:
        shutil.copytree(ROOT / CORE, tmp_path / copy_to, ignore=shutil.ignore_patterns("__pycache__"))
    module = f"{package}.client_app" if package else "client_app"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(
        [sys.executable, "-c", f"import {module} as c; c.run()"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "user user data user task user lora" in out.stdout, out.stdout
    module_name, where = out.stdout.split("potara ", 1)[1].split()[:2]
    files = ast.literal_eval(out.stdout.split("files ", 1)[1].split("\n", 1)[0])
    assert len(files) >= 5, files  # merge and what it imports: fisher, lora, tensor_checks, weight, ...
    if copy_to:  # the copy, under the name its place gives it, and nothing of the installed package
        assert Path(where) == tmp_path / copy_to / "merge.py", where
        assert module_name == copy_to.replace("/", ".") + ".merge", module_name
        assert all(f.startswith(str(tmp_path / copy_to)) for f in files), files
    else:  # the installed package, never something of the user's folder
        assert module_name == "potara.merge" and not any(str(tmp_path) in f for f in files), files
