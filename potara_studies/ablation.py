"""Does the merge weight track the grid search? Every estimator x statistics source, scenario by scenario, on
synthetic images (--suite synthetic) and on real handwritten digits (--suite real): the command line.

    python -m potara_studies.ablation                                  # synthetic: 5 scenarios x 3 seeds
    python -m potara_studies.ablation --suite real                     # real digits: 2 scenarios x 10 seeds
    python -m potara_studies.ablation --scenarios conflict --seeds 0   # one scenario, one seed
    python -m potara_studies.ablation --estimators verified,paper --sources train32,val --scenarios all

What a run does (its measured time: docs/estimator-study.md). Real suite: 2 x 10 x 6 = 120 client runs, each
FedIT 30 rounds x 10 local steps plus 150 local steps, then every estimator and a 21-point grid. Synthetic suite:
15 federations of 5 clients, FedIT 50 rounds x 5 local steps, 100 local steps per client, after the one-off
pre-training of the tiny backbone (cached afterwards).
The study itself (suites, scenarios, estimators, sources, outputs): estimator_study.py. The command line is
parsed and checked here before torch loads (--help and a bad option answer at once); run() loads the study.
"""

from __future__ import annotations

import argparse
import math
import os

from potara_harness import cli, run_folder
from potara_harness.config import (
    ABLATION_CACHE,
    ABLATION_ESTIMATORS,
    ABLATION_OUTPUTS,
    ABLATION_SCENARIOS,
    ABLATION_SOURCES,
    ABLATION_SUITES,
    DIGITS_SCENARIOS,
    VIT_PRESETS,
    DigitsConfig,
    ExperimentConfig,
    grid_step_problem,
)

DEFAULTS = dict(sources="train32,val32,val", rounds=50, synthetic_per_class=500)  # run_cifar.py's


# ----------------------------------------------------------------------------- command line
FLOATS = ("lr", "lora_alpha", "eps", "grid_step")
SHARED = (
    "clients",
    "train",
    "val",
    "test",
    "public",
    "pretrain_steps",
    "synthetic_per_class",
    "local_steps",
    "local_train_steps",
    "batch_size",
    "rank",
    "lr",
    "lora_alpha",
    "eps",
    "grid_step",
)
REAL_FIELDS = (
    "clients",
    "train",
    "val",
    "test",
    "public",
    "pretrain_steps",
    "local_steps",
    "local_train_steps",
    "batch_size",
    "rank",
    "lr",
    "lora_alpha",
    "rounds",
)  # options the real suite takes (DigitsConfig)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Options showing no default take the suite's value: VIT_PRESETS['tiny'] "
        "(synthetic) or DigitsConfig (real), in potara_harness/config.py.",
    )
    a, synthetic = ap.add_argument, ABLATION_SUITES["synthetic"]
    a(
        "--suite",
        choices=list(ABLATION_SUITES),
        default="synthetic",
        help="synthetic images + tiny ViT, or real digits + MLP",
    )
    a(
        "--scenarios",
        help=f"comma-separated, or 'all'; synthetic: {list(ABLATION_SCENARIOS)} (default: "
        f"{synthetic['default']}); real: {list(DIGITS_SCENARIOS)} (default: all)",
    )
    a("--seeds", help=f"comma-separated integer seeds (default: synthetic {synthetic['seeds']}, real 0-9)")
    a("--estimators", default=",".join(ABLATION_ESTIMATORS), help=f"comma-separated from {list(ABLATION_ESTIMATORS)}")
    a(
        "--sources",
        default=DEFAULTS["sources"],
        help=f"comma-separated statistics sources from {list(ABLATION_SOURCES)}",
    )
    a("--out", help="output folder (ablation.json, ablation.md, cache/; default: runs/ablation or runs/ablation-real)")
    a("--data-dir", default="data", help="where synthetic/ and the cached tiny backbone live")
    a("--rounds", type=int, help=f"FedIT rounds (synthetic: {DEFAULTS['rounds']})")
    a(
        "--conflict-classes",
        type=int,
        default=ABLATION_SCENARIOS["conflict"]["classes"],
        help="classes of synthetic 'conflict'",
    )
    for k in SHARED:
        a(f"--{k.replace('_', '-')}", type=float if k in FLOATS else int, help="as in run_cifar.py")
    cli.add_run_options(ap, seed=False)  # --seeds instead
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


def resolve(ap: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, dict]:
    """Parse, fill None from the suite's defaults, and reject every impossible value with a one-line error."""
    args = ap.parse_args(argv)
    suite = ABLATION_SUITES[args.suite]

    def names(flag: str, text: str, known) -> list[str]:
        items = list(known) if text == "all" else [x.strip() for x in text.split(",") if x.strip()]
        if not items or any(x not in known for x in items):
            ap.error(f"--{flag} {text!r}: expected a comma-separated list from {list(known)}")
        return items

    args.scenarios = names("scenarios", args.scenarios or suite["default"], suite["scenarios"])
    args.estimators = names("estimators", args.estimators, ABLATION_ESTIMATORS)
    args.sources = names("sources", args.sources, ABLATION_SOURCES)
    seeds = args.seeds or suite["seeds"]
    try:
        args.seeds = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        args.seeds = []
    if not args.seeds or not all(0 <= x < cli.MAX_SEED for x in args.seeds):
        ap.error(f"--seeds {seeds!r}: expected comma-separated integers in [0, 2**63)")
    args.out = args.out or os.path.join("runs", "ablation" if args.suite == "synthetic" else "ablation-real")
    p = VIT_PRESETS["tiny"]
    if args.suite == "real":
        given = [k for k in SHARED if k not in REAL_FIELDS + ("eps", "grid_step") and getattr(args, k) is not None]
        if given:
            ap.error(f"--{given[0].replace('_', '-')} applies to the synthetic suite only")
        cli.fill_from_preset(
            args, {**vars(DigitsConfig()), "eps": ExperimentConfig.eps, "grid_step": ExperimentConfig.grid_step}
        )
    else:
        cli.fill_from_preset(
            args,
            {
                **p,
                "eps": ExperimentConfig.eps,
                "grid_step": ExperimentConfig.grid_step,
                "rounds": DEFAULTS["rounds"],
                "synthetic_per_class": DEFAULTS["synthetic_per_class"],
            },
        )
    cli.require_positive(
        ap,
        args,
        (
            "rounds",
            "clients",
            "train",
            "val",
            "test",
            "pretrain_steps",
            "local_steps",
            "local_train_steps",
            "batch_size",
            "rank",
            "threads",
            "synthetic_per_class",
        ),
    )
    cli.require_positive(ap, args, ("conflict_classes",), minimum=2)
    cli.check_sizes(ap, args, ("synthetic_per_class",))
    cli.check_run_options(ap, args)
    for k in FLOATS:
        if not (getattr(args, k) > 0 and math.isfinite(getattr(args, k))):
            ap.error(f"--{k.replace('_', '-')} must be a positive number, got {getattr(args, k)}")
    grid = grid_step_problem(args.grid_step)
    if grid:
        ap.error(f"--grid-step {grid}")
    if args.suite == "synthetic" and args.public < 1000:
        ap.error(f"--public must be >= 1000 (the tiny backbone is pre-trained on it), got {args.public}")
    run_folder.check_dirs(ap, ("--data-dir", args.data_dir if args.suite == "synthetic" else "", os.R_OK | os.X_OK))
    # created and probed now: an unusable --out, or a link or special file where its outputs go, fails before any
    # training (run_folder's rule, for the study's own files and cache folder)
    run_folder.prepare_out_dir(ap, args.out, files=ABLATION_OUTPUTS, dirs=(ABLATION_CACHE,))
    args.data = args.suite
    return args, p


def main(argv=None) -> dict:
    """Check the command line, then start torch and run the study (estimator_study.run)."""
    args, p = resolve(build_parser(), argv)
    args.device, args.command = "cpu", cli.command_line("-m potara_studies.ablation", argv)
    cli.start_torch(args)
    from potara_studies.estimator_study import run

    with run_folder.out_dir_lock(args.out, files=ABLATION_OUTPUTS):  # a second study on the same --out: one line
        return run(args, p)


if __name__ == "__main__":
    main()
