"""Size bounds (config.SIZE_BOUNDS): every size-like option is checked before any work against what the program
can hold; the synthetic CIFAR bound is held against the reader's file limit by measuring the files written."""

import os
import re

import pytest

import data
import run_cifar
import run_llm
from potara_harness.config import MAX_SYNTHETIC_PER_CLASS, SIZE_BOUNDS, AppConfig, ConfigError


def test_the_synthetic_bound_writes_a_train_file_the_reader_accepts(tmp_path):
    """The train file grows linearly in images per class: measured at 2 and 4, extrapolated to the bound
    (--synthetic-per-class above ~3495 wrote a file the reader then refused as too large)."""
    sizes = {}
    for n in (2, 4):
        folder = data.write_synthetic_cifar100(str(tmp_path / str(n)), n, 1)
        sizes[n] = os.path.getsize(os.path.join(folder, "train"))
    per_n = (sizes[4] - sizes[2]) / 2
    at_bound = sizes[2] + per_n * (MAX_SYNTHETIC_PER_CLASS - 2)
    assert per_n > 100 * 3072  # 100 classes of 3 x 32 x 32 bytes, and labels and names
    assert at_bound < data.MAX_FILE_BYTES < sizes[2] + per_n * (1.2 * MAX_SYNTHETIC_PER_CLASS - 2)  # not far below


@pytest.mark.parametrize(
    "script, option, value",
    [
        (run_cifar, "--synthetic-per-class", 10**6),
        (run_llm, "--synthetic-examples", 10**9),
        (run_llm, "--max-len", 10**9),
        (run_llm, "--max-new-tokens", 10**7),
    ],
)
def test_size_options_above_their_bound_are_parser_errors(tmp_path, capsys, script, option, value):
    ap = script.build_parser()
    bound = SIZE_BOUNDS[option[2:].replace("-", "_")][0]
    out = str(tmp_path / "o")
    script.resolve_args(ap, [option, str(bound), "--out", out, "--threads", "1"])  # the bound itself is fine
    with pytest.raises(SystemExit) as e:
        script.resolve_args(ap, [option, str(value), "--out", out, "--threads", "1"])
    assert e.value.code == 2
    low = 5 if option == "--synthetic-per-class" else 1  # the synthetic test set holds a fifth of it
    assert f"argument {option}: must be an integer in [{low}, {bound:,}]" in capsys.readouterr().err


def test_the_flower_run_config_bounds_synthetic_per_class():
    AppConfig.from_run_config({"synthetic-per-class": MAX_SYNTHETIC_PER_CLASS})
    with pytest.raises(
        ConfigError, match=re.escape(f"synthetic-per-class must be an integer in [5, {MAX_SYNTHETIC_PER_CLASS:,}]")
    ):
        AppConfig.from_run_config({"synthetic-per-class": 10**6})
