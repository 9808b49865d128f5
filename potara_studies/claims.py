"""The paper's three claims, each tested where this machine can test it, with a verdict: the command line.

    python -m potara_studies.claims                        # the whole study (its measured time: docs/paper-claims.md)
    python -m potara_studies.claims --reduced              # every step at toy size, minutes: its numbers mean nothing
    python -m potara_studies.claims --claims 2,3 --pipelines digits,text   # a part
    python -m potara_studies.claims --replot               # claims.md and the figures again from --out/claims.json

1. The closed-form weight is about as good as a grid search over lam: the estimator study (ablation.py) on its two
   suites, the default estimator and the paper's (PaperFisher on 32 training samples), against the grid search on
   val and the test oracle, in every regime.
2. Potara's gain grows with the number of FedIT rounds: Potara - local and Potara - max(local, FedIT) at 5-6 round
   counts spanning 10x or more, on four pipelines (vision, language, real digits, real text with a real
   pre-trained encoder), several seeds.
3. Potara needs fewer rounds, so fewer bytes, than FedIT + local fine-tuning and FedSA-LoRA for a given accuracy:
   accuracy against MB sent on the same runs, and the round count each method needs to reach a target.
The study itself: claims_study.py (pipelines: claims_config.py; the sweep: round_sweep.py; verdicts, tables and
figures: claims_report.py). The command line is parsed and checked here, every output path included, before torch
loads (--help and a bad option answer at once); run() loads the study.
"""

from __future__ import annotations

import argparse
import json
import os

from potara_harness import cli, run_folder
from potara_studies import ablation
from potara_studies.claims_config import (
    CLAIM1_ESTIMATORS,
    CLAIM1_FOLDERS,
    CLAIM1_FULL,
    CLAIM1_REDUCED,
    CLAIM1_SOURCES,
    CLAIMS,
    OUTPUT_FILES,
    PIPELINES,
    SUITES,
)


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        description=__doc__.split("\n\n")[0],
        formatter_class=cli.HelpFormatter,
        epilog="Round counts, seeds and sizes of each pipeline: potara_studies/claims_config.py.",
    )
    a = ap.add_argument
    a("--claims", default=",".join(CLAIMS), help="comma-separated claims to test (2 and 3 share their runs)")
    a("--pipelines", default=",".join(PIPELINES), help=f"claims 2 and 3: comma-separated from {list(PIPELINES)}")
    a("--suites", default=",".join(SUITES), help=f"claim 1: the estimator study's suites, from {list(SUITES)}")
    a("--seeds", help="claims 2 and 3: comma-separated integer seeds for every pipeline (default: each pipeline's own)")
    a("--reduced", action="store_true", help="every step at toy size (a few minutes; what the tests run)")
    a(
        "--out",
        help="output folder (claims.json, claims.md, claim1-3.png, claim1-*/; default: runs/claims or "
        "runs/claims-reduced)",
    )
    a(
        "--data-dir",
        help="where the synthetic images and the cached pre-trained models live (default: data, or data/reduced: "
        "the reduced study's small data never replaces the whole study's)",
    )
    a("--figures", help="also write the figures into this folder (e.g. the documentation's)")
    a("--replot", action="store_true", help="run nothing: claims.md and the figures again from --out/claims.json")
    a("--resume", action="store_true", help="keep what --out/claims.json holds of the same study; run the rest")
    cli.add_run_options(ap, seed=False)  # --seeds instead
    cli.bound_numbers(ap)  # every number's range (config.BOUNDS), checked as it is parsed
    return ap


def names(ap: argparse.ArgumentParser, flag: str, text: str, known) -> list[str]:
    """A comma-separated list of known names (in `known`'s order), or a one-line parser error."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or any(x not in known for x in items):
        ap.error(f"--{flag} {text!r}: expected a comma-separated list from {list(known)}")
    return [k for k in known if k in items]


def claim1_study(ap: argparse.ArgumentParser, args, suite: str) -> tuple:
    """The estimator study's checked command line for one suite (its own checks: its folder in --out is
    prepared now, before any work), and the command that runs it alone."""
    argv = ["--suite", suite, "--estimators", CLAIM1_ESTIMATORS, "--sources", CLAIM1_SOURCES]
    argv += ["--out", os.path.join(args.out, CLAIM1_FOLDERS[suite]), "--data-dir", args.data_dir]
    argv += ["--threads", str(args.threads)] + ([] if args.progress else ["--no-progress"])
    argv += (CLAIM1_REDUCED if args.reduced else CLAIM1_FULL)[suite]
    study = ablation.build_parser()
    study.error = ap.error  # its one-line errors under this command's name
    a, p = ablation.resolve(study, argv)
    a.device, a.command = "cpu", cli.command_line("-m potara_studies.ablation", argv)
    return a, p


def resolve(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse, and reject every impossible value or unusable output path with a one-line error."""
    args = ap.parse_args(argv)
    args.claims = names(ap, "claims", args.claims, CLAIMS)
    args.pipelines = names(ap, "pipelines", args.pipelines, PIPELINES)
    args.suites = names(ap, "suites", args.suites, SUITES)
    if args.seeds is not None:
        try:
            args.seeds = tuple(int(x) for x in args.seeds.split(",") if x.strip())
        except ValueError:
            args.seeds = ()
        if not args.seeds or not all(0 <= x < cli.MAX_SEED for x in args.seeds):
            ap.error(f"--seeds {args.seeds!r}: expected comma-separated integers in [0, 2**63)")
    cli.check_run_options(ap, args)
    args.out = args.out or os.path.join("runs", "claims-reduced" if args.reduced else "claims")
    args.data_dir = args.data_dir or (os.path.join("data", "reduced") if args.reduced else "data")
    args.key = {"reduced": args.reduced}  # with the seeds, what decides every unit's numbers (--resume)
    if args.replot and not os.path.isfile(os.path.join(args.out, OUTPUT_FILES[0])):
        ap.error(f"--replot: no {OUTPUT_FILES[0]} in --out {args.out}")
    run_folder.check_dirs(ap, ("--data-dir", args.data_dir, os.R_OK | os.X_OK))
    # the estimator study's folders in --out: never a link, a file or a folder it cannot write (then its own checks)
    run_folder.prepare_out_dir(ap, args.out, files=OUTPUT_FILES, dirs=(), folders=tuple(CLAIM1_FOLDERS.values()))
    if args.figures:
        run_folder.prepare_out_dir(ap, args.figures, flag="--figures", files=OUTPUT_FILES[2:], dirs=())
    runs_claim1 = "1" in args.claims and not args.replot
    args.claim1 = {s: claim1_study(ap, args, s) for s in args.suites} if runs_claim1 else {}
    return args


def replot(args) -> dict:
    """--replot: the tables and figures again from claims.json (no torch)."""
    from potara_guards.safe_files import read_regular
    from potara_harness.config import MAX_RESULTS_FILE_BYTES
    from potara_studies import claims_report

    path = os.path.join(args.out, OUTPUT_FILES[0])
    try:
        results = json.loads(read_regular(path, MAX_RESULTS_FILE_BYTES))
        print(claims_report.write(results, args.out, args.figures))
    except (OSError, ValueError, KeyError, TypeError) as e:
        cli.fail(f"--replot: {path}: {(str(e) or type(e).__name__).splitlines()[0][:200]}")
    return results


def main(argv=None) -> dict:
    """Check the command line, then start torch and run the study (claims_study.run)."""
    args = resolve(build_parser(), argv)
    args.command = cli.command_line("-m potara_studies.claims", argv)
    with run_folder.out_dir_lock(args.out, files=OUTPUT_FILES):  # a second study on the same --out: one line
        if args.replot:
            return replot(args)
        args.device = "cpu"
        cli.start_torch(args)
        from potara_studies.claims_study import run

        with cli.one_line_errors():
            return run(args)


if __name__ == "__main__":
    cli.run_main(main)
