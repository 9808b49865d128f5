"""Every number of every entry point -- run_cifar.py's and run_llm.py's options, the studies' and benchmarks'
(potara_studies.ablation, .bench, .claims, .scale; potara_flower.bench, .fleet), export_flan's, the Flower run
config and the node config -- is range-checked before any work, in one line naming the option and its range.

The oracle is this file's own, not config.BOUNDS: -1, 10**30, nan and inf are refused for every number, 0 for every
number but those ZERO_ALLOWED names (written here from what each option means), and a plain valid value (1, or
VALID's) is accepted and parsed to itself. The number of cases is asserted, so a number that loses its check, or
its type, fails here rather than leaving the test with fewer cases."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from pathlib import Path

import pytest

import run_cifar
import run_llm
from potara_harness import cli, export_flan
from potara_harness.config import BOUNDS, AppConfig, ConfigError
from potara_studies import ablation, bench, claims, scale

try:  # the flower extra: its tools' command lines
    from potara_flower import bench as flower_bench
    from potara_flower import fleet
except ImportError:
    flower_bench = fleet = None

REPO = Path(__file__).resolve().parents[1]
ALWAYS_REFUSED = [-1, 10**30, math.nan, math.inf]  # for every number of every entry point, no exception
ZERO_ALLOWED = {  # 0 means something here: none, all, unbounded, the first partition, a seed
    "public",  # no public images (a backbone from a file)
    "pretrain_steps",  # no pre-training (a Hugging Face model)
    "clients_per_round",  # every client every round
    "max_update_norm",  # no bound
    "drop_prob",  # no drop-outs
    "snapshots",  # no snapshots
    "seed",
    "partition_id",
    "personalize_timeout",  # scaled from round-timeout
}
VALID = {"drop_prob": 0.5, "conflict_classes": 2, "nodes": 2, "restart_nodes": 2, "synthetic_per_class": 5}
# How many numbers each entry point takes: an option that stops being a number (or is dropped) is seen here.
NUMBERS = {"run_cifar": 26, "run_llm": 27, "ablation": 18, "bench": 2, "claims": 1, "scale": 1, "export_flan": 1}
NUMBERS_FLOWER = {"flower_bench": 4, "fleet": 4}
APP_NUMBERS, NODE_NUMBERS = 28, 3
REQUIRED = {"export_flan": ["folder"], "flower_bench": ["--backbone", "b.pt"], "fleet": ["--backbone", "b.pt"]}

BUILT = {  # built once: parsing is read-only
    "run_cifar": run_cifar.build_parser(),
    "run_llm": run_llm.build_parser(),
    "ablation": ablation.build_parser(),
    "bench": bench.build_parser(),
    "claims": claims.build_parser(),
    "scale": scale.build_parser(),
    "export_flan": export_flan.build_parser(),
}
if flower_bench is not None:
    BUILT.update(flower_bench=flower_bench.build_parser(), fleet=fleet.build_parser())


def refused(name: str) -> list:
    return ALWAYS_REFUSED + ([] if name in ZERO_ALLOWED else [0])


def app_numbers() -> list[str]:
    return [f.name for f in fields(AppConfig) if f.type in ("int", "float")]


def node_numbers() -> list[str]:
    """The node config's integer keys, as client_app reads them (node_value(node, "<key>", int))."""
    source = (REPO / "potara_flower" / "client_app.py").read_text()
    return sorted(set(re.findall(r'node_value\(\w+, "([a-z-]+)", int', source)))


def parse(script: str, option: str, value):
    """The parser's value for `option` given alone (with what the parser requires besides); SystemExit if refused."""
    ap = BUILT[script]
    if option.startswith("-"):
        argv = [*REQUIRED.get(script, []), option, str(value)]
    else:  # a positional number (export_flan's per_task), after its folder
        argv = ["folder", str(value)]
    dest = next(a.dest for a in ap._actions if option in a.option_strings or a.dest == option)
    return getattr(ap.parse_args(argv), dest)


def command_line_numbers() -> list[tuple[str, str, str]]:
    return [
        (name, (a.option_strings or [a.dest])[-1], a.dest)
        for name, ap in BUILT.items()
        for a in cli.numeric_options(ap)
    ]


CASES = [(s, o, d, v) for s, o, d in command_line_numbers() for v in refused(d)]


def test_every_entry_point_has_the_numbers_this_file_counts_and_the_cases_cover_them():
    counts = {name: len(cli.numeric_options(ap)) for name, ap in BUILT.items()}
    assert counts == {**NUMBERS, **(NUMBERS_FLOWER if flower_bench is not None else {})}
    assert len(app_numbers()) == APP_NUMBERS and len(node_numbers()) == NODE_NUMBERS
    zero_ok = sum(d in ZERO_ALLOWED for _, _, d in command_line_numbers())
    assert len(CASES) == 5 * sum(counts.values()) - zero_ok  # -1, 10**30, nan, inf everywhere; 0 but where allowed
    for name in ZERO_ALLOWED | set(VALID):
        assert name in BOUNDS, f"{name}: a name this file knows that no entry point has"
    for name, ap in BUILT.items():  # each number is parsed by its range check (cli.bound_numbers)
        for action in cli.numeric_options(ap):
            assert hasattr(action.type, "kind"), f"{name} {action.option_strings[-1]} is parsed without its range"


@pytest.mark.parametrize("script, option, dest, value", CASES)
def test_every_command_line_number_out_of_range_is_one_parser_line(capsys, script, option, dest, value):
    with pytest.raises(SystemExit) as e:
        parse(script, option, value)  # parse time: nothing runs
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: argument {option}: must be " in err[0], err
    got = err[0].rsplit("got ", 1)[
        1
    ]  # the value as given back: "-1", "-1.0", "nan", "1e+30", "100000000000... (31 digits)"
    same = (
        got == "100000000000... (31 digits)"
        if "digits" in got
        else math.isnan(value) or math.isclose(float(got), value)
    )
    assert same and (got == "nan") == math.isnan(value), err
    assert BOUNDS[dest].text() in err[0], err  # the one range of that name, as every message states it


@pytest.mark.parametrize("script, option, dest", command_line_numbers())
def test_every_command_line_number_takes_a_valid_value(script, option, dest):
    for value in [VALID.get(dest, 1)] + ([0] if dest in ZERO_ALLOWED else []):
        got = parse(script, option, value)
        assert (got[0] if isinstance(got, list) else got) == value, (option, value, got)


@pytest.mark.parametrize("key", app_numbers())
def test_every_run_config_number_out_of_range_is_one_config_line_and_a_valid_one_is_taken(key):
    flower_key = key.replace("_", "-")
    for value in refused(key):
        with pytest.raises(ConfigError) as e:
            AppConfig.from_run_config({flower_key: value})
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"run config {flower_key} "), message
        assert BOUNDS[key].text() in message, message
    valid = {**VALID, "val": 100}.get(key, 1)  # the run config checks its cross rules too: fisher-samples 100 <= val
    assert getattr(AppConfig.from_run_config({flower_key: valid}), key) == valid


@pytest.mark.parametrize("key", node_numbers())
def test_every_node_config_number_out_of_range_is_one_config_line_and_a_valid_one_is_taken(key):
    pytest.importorskip("flwr")
    from potara_flower.client_app import node_value

    name = key.replace("-", "_")
    for value in refused(name):
        with pytest.raises(ConfigError) as e:
            node_value({key: value}, key, int)
        message = str(e.value)
        assert "\n" not in message and message.startswith(f"node config {key} "), message
        assert BOUNDS[name].text() in message, message
    assert node_value({key: 1}, key, int) == 1
    if name in ZERO_ALLOWED:
        assert node_value({key: 0}, key, int) == 0


def test_defaults_and_presets_are_inside_the_table():
    cfg = AppConfig()
    for key in app_numbers():
        value = getattr(cfg, key)
        assert value is None or BOUNDS[key].lo <= value <= BOUNDS[key].hi, key
    for ap in BUILT.values():
        for action in cli.numeric_options(ap):
            defaults = action.default if isinstance(action.default, list) else [action.default]  # nargs: each
            b = BOUNDS[action.dest]
            assert all(d is None or b.lo <= d <= b.hi for d in defaults), action.dest
