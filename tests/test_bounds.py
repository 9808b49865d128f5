"""Every number of every entry point -- run_cifar.py's and run_llm.py's options, the studies' and benchmarks'
(potara_studies.ablation, .bench, .claims, .scale; potara_flower.bench, .fleet), export_flan's, the Flower run config
and the node config -- has a range in config.BOUNDS, and 0, -1, 10**30, nan and inf are each refused where outside
it, in one line naming the option and the range, before any work (the parsers and AppConfig: no run)."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest

import run_cifar
import run_llm
from potara_harness import cli, export_flan
from potara_harness.config import BOUNDS, AppConfig, ConfigError, bound_problem
from potara_studies import ablation, bench, claims, scale

try:  # the flower extra: its tools' command lines
    from potara_flower import bench as flower_bench
    from potara_flower import fleet
except ImportError:
    flower_bench = fleet = None

REPO = Path(__file__).resolve().parents[1]
HOSTILE = [0, -1, 10**30, math.nan, math.inf]
BUILT = {  # built once: parsing is read-only
    "run_cifar": run_cifar.build_parser(),
    "run_llm": run_llm.build_parser(),
    "ablation": ablation.build_parser(),
    "claims": claims.build_parser(),
    "bench": bench.build_parser(),
    "scale": scale.build_parser(),
    "export_flan": export_flan.build_parser(),
}
if flower_bench is not None:
    BUILT.update(flower_bench=flower_bench.build_parser(), fleet=fleet.build_parser())
PARSERS = {name: (lambda ap=ap: ap) for name, ap in BUILT.items()}


def app_numbers() -> list[str]:
    return [f.name for f in fields(AppConfig) if f.type in ("int", "float")]


def node_numbers() -> list[str]:
    """The node config's integer keys, as client_app reads them (node_value(node, "<key>", int))."""
    source = (REPO / "potara_flower" / "client_app.py").read_text()
    return sorted(set(re.findall(r'node_value\(\w+, "([a-z-]+)", int', source)))


def test_the_table_covers_every_number_of_every_entry_point():
    """A numeric option added without a range fails here (and would get none of the checks below)."""
    for name, build in PARSERS.items():
        ap = build()
        options = cli.numeric_options(ap)
        assert options, name
        for action in options:
            assert action.dest in BOUNDS, f"{name} {action.option_strings[-1]} has no entry in config.BOUNDS"
            assert hasattr(action.type, "kind"), f"{name} {action.option_strings[-1]} is parsed without its range"
    for key in app_numbers():
        assert key in BOUNDS, f"run config {key} has no entry in config.BOUNDS"
    keys = node_numbers()
    assert {"partition-id", "num-partitions", "threads"} <= set(keys)
    for key in keys:
        assert key.replace("-", "_") in BOUNDS, f"node config {key} has no entry in config.BOUNDS"
    for name, b in BOUNDS.items():  # a lower AND an upper bound, both finite
        assert math.isfinite(b.lo) and math.isfinite(b.hi) and b.lo < b.hi, name


def test_defaults_and_presets_are_inside_the_table():
    cfg = AppConfig()
    for key in app_numbers():
        assert bound_problem(key, getattr(cfg, key)) is None, key
    for build in PARSERS.values():
        for action in cli.numeric_options(build()):
            defaults = action.default if isinstance(action.default, list) else [action.default]  # nargs: each
            assert all(bound_problem(action.dest, d) is None for d in defaults), action.dest


def cases():
    for name, build in PARSERS.items():
        for action in cli.numeric_options(build()):
            for v in HOSTILE:
                if bound_problem(action.dest, v):
                    yield name, (action.option_strings or [action.dest])[-1], action.dest, v


@pytest.mark.parametrize("script, option, dest, value", list(cases()))
def test_every_command_line_number_out_of_range_is_one_parser_line(capsys, script, option, dest, value):
    ap = PARSERS[script]()
    kind = next(a.type.kind for a in ap._actions if a.dest == dest)
    with pytest.raises(SystemExit) as e:
        positional = not option.startswith("-")  # export_flan's per_task: after its folder
        ap.parse_args(["folder", str(value)] if positional else [option, str(value)])  # parse time: nothing runs
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    what = "an integer" if kind is int else "a number"
    want = f"error: argument {option}: must be {what} in {BOUNDS[dest].text()}, got "
    assert want in last, last


@pytest.mark.parametrize("key", app_numbers())
@pytest.mark.parametrize("value", HOSTILE, ids=["0", "-1", "1e30", "nan", "inf"])
def test_every_run_config_number_out_of_range_is_one_config_line(key, value):
    if bound_problem(key, value) is None:
        return  # inside the range (0 for seed): other rules may still refuse it
    flower_key = key.replace("_", "-")
    with pytest.raises(ConfigError) as e:
        AppConfig.from_run_config({flower_key: value})
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"run config {flower_key} ")
    assert BOUNDS[key].text() in message, message


@pytest.mark.parametrize("key", node_numbers())
@pytest.mark.parametrize("value", HOSTILE, ids=["0", "-1", "1e30", "nan", "inf"])
def test_every_node_config_number_out_of_range_is_one_config_line(key, value):
    pytest.importorskip("flwr")
    from potara_flower.client_app import node_value

    if bound_problem(key.replace("-", "_"), value) is None and isinstance(value, int):
        assert node_value({key: value}, key, int) == value
        return
    with pytest.raises(ConfigError) as e:
        node_value({key: value}, key, int)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"node config {key} ")
    assert BOUNDS[key.replace("-", "_")].text() in message, message
