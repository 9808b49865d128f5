"""The house: the algorithm and the two demos at the top, every other module in a folder named for what it is,
and the import rules between them, read from the code's own import statements (ast). The core copied alone
into an empty folder runs a tiny FedIT + personalize end to end."""
import ast
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = {"lora", "lora_mha", "files", "training", "fed", "fisher", "potara", "data"}
DEMOS = {"run_cifar", "run_llm"}
HARNESS = "potara_harness"
FOLDERS = {HARNESS, "potara_flower", "potara_studies"}
CORE_DEPENDENCIES = {"torch", "numpy", "torchvision", "tqdm"}
OUTSIDE = "../" + "shared"  # a folder beside the checkout, which a clone does not have (written apart: not a link)


def project_modules() -> dict[str, Path]:
    """Every module of the project by its dotted name: the top-level files and the folders' files."""
    mods = {p.stem: p for p in ROOT.glob("*.py")}
    for folder in FOLDERS:
        mods.update({f"{folder}.{p.stem}": p for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"})
    return mods


def imports_of(path: Path) -> set[str]:
    """The absolute module names a file imports (anywhere in it: lazy imports count too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from folder import module
    return names


def project_imports(path: Path, mods: dict) -> set[str]:
    return {n for n in imports_of(path) if n in mods}


def test_the_top_holds_the_core_and_the_two_demos_only():
    top = {p.stem for p in ROOT.glob("*.py")}
    assert top <= CORE | DEMOS, f"modules at the top that are neither the core nor a demo: {sorted(top - CORE - DEMOS)}"
    assert len(top) <= 11 and DEMOS <= top and {"lora", "fed", "fisher", "potara", "data"} <= top
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == FOLDERS


def test_the_core_imports_only_itself_and_the_core_dependencies():
    stdlib = sys.stdlib_module_names
    for name in CORE & {p.stem for p in ROOT.glob("*.py")}:
        for imported in imports_of(ROOT / f"{name}.py"):
            root = imported.split(".")[0]
            assert root in CORE or root in stdlib or root in CORE_DEPENDENCIES or root == "__future__", \
                f"{name}.py imports {imported}: the core imports only itself, the standard library and " \
                f"{sorted(CORE_DEPENDENCIES)}"


def test_folders_import_the_top_and_the_harness_never_a_sibling():
    mods = project_modules()
    for name, path in mods.items():
        for imported in project_imports(path, mods):
            if "." not in name:  # a top-level module: the core never reaches into a folder
                assert name in DEMOS or "." not in imported, f"{name}.py (core) imports {imported}"
                continue
            folder = name.split(".")[0]
            other = imported.split(".")[0] if "." in imported else None
            assert other in (None, folder, HARNESS), f"{path.relative_to(ROOT)} imports the sibling {imported}"
            if folder == HARNESS:
                assert imported not in DEMOS, f"{name} imports the demo {imported}"
    demo_reach = {imp.split(".")[0] for d in DEMOS for imp in project_imports(ROOT / f"{d}.py", mods)}
    assert demo_reach <= CORE | {HARNESS}, f"a demo imports outside the core and the harness: {sorted(demo_reach)}"


def test_no_import_circles():
    mods = project_modules()
    graph = {name: {m for m in project_imports(path, mods) if m != name} for name, path in mods.items()}
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
    """The rules above see a sibling import and a circle when there is one (checked on a made-up tree)."""
    (tmp_path / "a.py").write_text("import b\n")
    (tmp_path / "b.py").write_text("from a import x\n")
    assert imports_of(tmp_path / "a.py") == {"b"} and imports_of(tmp_path / "b.py") == {"a", "a.x"}
    code = "from potara_flower import task\nimport potara_studies.bench\n"
    (tmp_path / "c.py").write_text(code)
    assert {"potara_flower.task", "potara_studies.bench"} <= imports_of(tmp_path / "c.py")


CORE_RUN = textwrap.dedent("""
    import torch, torch.nn as nn
    import fed, potara
    from lora import add_lora, lora_state_dict
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    add_lora(model, ["0"], r=2, alpha=4, trainable=["2"])
    g = torch.Generator().manual_seed(1)
    clients = []
    for k in range(3):
        x = torch.randn(40, 6, generator=g)
        clients.append(fed.Client(f"c{k}", x, (x[:, k] > 0).long()))
    phi0 = lora_state_dict(model)
    state = fed.run_fedit(model, clients, fed.FedConfig(rounds=3, local_steps=4, lr=0.05, batch_size=16),
                          progress=False)
    import training
    local = training.train_adapter(model, training.shuffled_batches(clients[0].inputs, clients[0].targets, 16, 0),
                                   20, 0.05, progress=False).state
    val = torch.randn(30, 6, generator=g)
    merged, info = potara.personalize(model, state.global_state, local, held_out=[(val, (val[:, 0] > 0).long())])
    assert 0.0 <= info["lam"] <= 1.0 and set(merged) == set(phi0)
    import os, sys
    here = os.path.dirname(os.path.abspath(__file__))
    mine = {n: m.__file__ for n, m in sys.modules.items() if n in ("lora", "fed", "fisher", "potara", "training")}
    assert all(os.path.dirname(f) == here for f in mine.values()), mine
    assert not any(n.startswith("potara_") for n in sys.modules), "the core reached into a folder"
    print("lam", info["lam"], "rounds", len(state.history))
""")


def test_the_core_copied_alone_runs_fedit_and_personalize(tmp_path):
    """The top algorithm modules copied into an empty folder, nothing else of the repository on the path: a
    tiny FedIT + Potara end to end."""
    core = [p for p in ROOT.glob("*.py") if p.stem in CORE]
    for p in core:
        (tmp_path / p.name).write_text(p.read_text())
    (tmp_path / "core_run.py").write_text(CORE_RUN)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "core_run.py"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "rounds 3" in out.stdout
    assert not any(n.startswith("potara_") for n in os.listdir(tmp_path))
