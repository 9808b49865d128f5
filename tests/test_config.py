"""potara_harness/config.py: every default in one place, and what it mirrors from the core held equal to it."""

import subprocess
import sys

import potara
from potara_harness import config


def test_the_estimator_names_mirror_potaras():
    """config writes potara's estimator names out (so --help needs no torch): they must be potara's own."""
    assert config.ESTIMATORS == tuple(potara.ESTIMATORS) and config.DEFAULT_ESTIMATOR == potara.DEFAULT_ESTIMATOR
    assert config.ExperimentConfig().estimator == potara.DEFAULT_ESTIMATOR == potara.Verified.name
    assert all(cls.name == name for name, cls in potara.ESTIMATORS.items())


def test_config_imports_no_torch():
    code = "import sys, potara_harness.config, potara_harness.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


def test_the_flower_defaults_are_the_tiny_presets():
    """AppConfig's training settings are read from VIT_PRESETS["tiny"] and ExperimentConfig, not written twice."""
    app, tiny, exp = config.AppConfig(), config.VIT_PRESETS["tiny"], config.ExperimentConfig()
    for k in (
        "local_steps",
        "lr",
        "batch_size",
        "rank",
        "alpha",
        "public",
        "train",
        "val",
        "test",
        "local_train_steps",
        "finetune_steps",
    ):
        assert getattr(app, k) == tiny[k], k
    assert app.fisher_samples == exp.fisher_samples and app.grid_step == exp.grid_step
    assert app.pipeline_config().max_update_norm is None and config.update_bound(0.0) is None


def test_grid_step_rule():
    assert config.grid_step_problem(0.05) is None and config.grid_step_problem(1) is None
    assert config.grid_step_problem(0.001) is None
    for bad in (0.0, -0.1, 0.3, 1.5, float("nan"), float("inf"), 1e-9, 0.0005):
        assert config.grid_step_problem(bad), bad
    assert "at most 1000" in config.grid_step_problem(1e-9)


def test_the_cli_refuses_exactly_what_potara_refuses():
    """cli checks --estimator/--granularity before torch loads; the estimator types are the rule (an option the
    estimator does not take cannot be passed; its default is not passed at all): they agree."""
    import argparse
    import dataclasses

    import pytest

    from potara_harness import cli

    for estimator in config.ESTIMATORS:
        for granularity in ("client", "module"):
            ap = argparse.ArgumentParser()
            cli.add_experiment_options(ap)
            args = ap.parse_args(["--estimator", estimator, "--granularity", granularity])
            cli.fill_from_preset(args, config.VIT_PRESETS["tiny"])
            args.train = args.val = 10
            cls = potara.ESTIMATORS[estimator]
            takes = "granularity" in {f.name for f in dataclasses.fields(cls)}
            try:
                cls(granularity=granularity) if takes else (granularity == "client" or cls(granularity=granularity))
                potara_ok = True
            except (TypeError, ValueError):
                potara_ok = False
            if potara_ok:
                cli.check_experiment_options(ap, args)
            else:
                with pytest.raises(SystemExit):
                    cli.check_experiment_options(ap, args)
