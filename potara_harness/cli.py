"""The command-line plumbing the pipeline scripts share (run_cifar.py, run_llm.py, potara_studies/ablation.py): the
experiment's options and their checks, preset filling, device choice, and the main() wrapper (the --out folder:
run_folder.py).

    ap = cli.Parser(...); add_experiment_options(ap)
    args = ap.parse_args(argv); fill_from_preset(args, VIT_PRESETS["tiny"]); check_experiment_options(ap, args)
    cfg = config_from_args(args)                     # a config.ExperimentConfig
    if __name__ == "__main__": run_main(main)        # one-line errors, Ctrl-C tells how to resume

Every impossible option is a one-line parser error before any work is done (ap.error, exit status 2; Parser
prints that line alone, without argparse's usage block).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import textwrap
import warnings
from contextlib import contextmanager
from typing import Callable, NoReturn

from potara_guards.safe_files import UnsafeFile, WriteError
from potara_harness.config import (
    BOUNDS,
    ESTIMATORS,
    ExperimentConfig,
    bound_problem,
    grid_step_problem,
    size_problem,
    update_bound,
)

# This module imports no torch (nor anything that does) at its top: a script parses and checks its command line
# first, so --help and a bad option answer at once; start_torch then loads torch.

MAX_SEED = 2**63


class Parser(argparse.ArgumentParser):
    """argparse's parser, with HelpFormatter, whose errors are one line: `<prog>: error: <message>`, exit status 2
    (argparse prints its whole usage block above it first: 17 lines for run_cifar.py; --help has the usage)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help as a reader wants it: each option's default once, and lines broken only at spaces.

    The default is shown, as "(default: x)", except where it is None (a preset fills it: describe_presets puts
    every preset's value in the help), for a flag (--no-fedsa's stored False is no "default: True" to read) and
    where the help already says it ("default" in it). argparse's wrapping (textwrap) breaks a word longer than a
    line and after a hyphen ("dirichle" / "t-0.1"); here a line breaks at a space only, so a long token sticks
    out past the width instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.nargs == 0 or "default" in text:
            return text
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_long_words=False, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(
            " ".join(text.split()),
            width,
            initial_indent=indent,
            subsequent_indent=indent,
            break_long_words=False,
            break_on_hyphens=False,
        )


class DocstringHelpFormatter(HelpFormatter):
    """HelpFormatter whose description and epilog are printed as written (a module docstring's own lines)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def describe_presets(ap: argparse.ArgumentParser, presets: dict[str, dict], flag: str = "--preset") -> None:
    """Append "(<flag> a: x; b: y)" to the help of every option a preset fills (default None)."""
    for action in ap._actions:  # argparse has no public accessor for its options
        values = {name: p[action.dest] for name, p in presets.items() if p.get(action.dest) is not None}
        if action.default is None and values:
            action.help = (action.help or "") + " (" + "; ".join(f"{name}: {v}" for name, v in values.items()) + ")"


def add_experiment_options(ap: argparse.ArgumentParser) -> None:
    """The options every pipeline script shares: training, Potara, evaluation and run control. Options
    left at None are filled by the script's preset; Potara's defaults are ExperimentConfig's."""
    d, a = ExperimentConfig(), ap.add_argument
    a("--rounds", type=int, help="FedIT rounds R")
    a("--local-steps", type=int, help="local steps per client per round")
    a("--clients-per-round", type=int, default=0, help="clients sampled per round (0 = all)")
    a(
        "--max-update-norm",
        type=float,
        default=None,
        help="reject a client update whose L2 distance to the global adapter exceeds this (unset or 0: no bound)",
    )
    a(
        "--drop-prob",
        type=float,
        default=0.0,
        help="probability that a selected client never returns its update in a round (simulated drop-out)",
    )
    a("--local-train-steps", type=int, help="steps of the local-only adapter")
    a("--finetune-steps", type=int, help="steps of local fine-tuning after FedIT")
    a("--lr", type=float, help="AdamW learning rate of every adapter training")
    a("--batch-size", type=int, help="training batch size")
    a("--rank", type=int, help="LoRA rank r")
    a("--lora-alpha", type=float, help="LoRA alpha (scaling alpha / r)")
    a(
        "--estimator",
        default=d.estimator,
        help=f"how Potara chooses its weight: one of {sorted(ESTIMATORS)} "
        "(verified: needs held-out samples; paper: the paper's Fisher estimate; docs/algorithm.md)",
    )
    a(
        "--fisher-split",
        choices=["train", "val"],
        default=d.fisher_split,
        help="client split Potara's statistics use (val: held out, what verified needs; train: the paper's setting)",
    )
    a(
        "--fisher-samples",
        type=int,
        default=None,
        help=f"samples of that split for the statistics (default: {d.fisher_samples}, or the whole split if smaller)",
    )
    a(
        "--fisher-chunk",
        type=int,
        default=None,
        help="per-sample gradients held at once (lower it for a large model on one GPU; default: all)",
    )
    a(
        "--labels",
        choices=["empirical", "sampled"],
        default=d.fisher_labels,
        help="Fisher labels: data's or model-sampled",
    )
    a("--eps", type=float, default=d.eps, help="relative Fisher floor of the paper estimator")
    a(
        "--granularity",
        choices=["client", "module"],
        default=d.granularity,
        help="one lam per client or per adapted module (paper estimator only)",
    )
    a("--grid-step", type=float, default=d.grid_step, help="lam grid step (1/step must be an integer)")
    a("--snapshots", type=int, default=d.snapshots, help="FedIT round counts for the communication curve")
    a("--no-fedsa", dest="fedsa", action="store_false", help="skip the FedSA-LoRA baseline (a second federated run)")
    a("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: CUDA when present (bf16 autocast)")
    add_run_options(ap)
    a("--resume", action="store_true", help="continue from --out/checkpoint.pt (same arguments)")


def add_run_options(ap: argparse.ArgumentParser, seed: bool = True) -> None:
    """--threads, --seed (unless seed=False: a script with its own seeds option), --no-progress."""
    a = ap.add_argument
    a(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="CPU threads for torch (default: half the cores). On a CPU shared with other work, torch's own default, "
        "one thread per core, can be several times slower than one thread (10 FedIT rounds of the tiny demo: 8.35 s "
        "against 2.19 s on a busy 2-core machine); calling the library (fed.run_fedit, fed.train_adapter) directly, "
        "set it with torch.set_num_threads",
    )
    if seed:
        a("--seed", type=int, default=0, help="seed of the run: partition, initial adapter, batches, sampling")
    a(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bars (they are drawn only when stderr is a terminal)",
    )


def check_run_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """add_run_options' bounds (config.BOUNDS, for a parser without bound_numbers): 0 <= --seed < 2**63
    (torch.manual_seed and fed.derive_seed take 63-bit seeds) and 1 <= --threads <= the machine's cores (more only
    oversubscribes them)."""
    for name in ("seed", "threads"):
        problem = bound_problem(name, getattr(args, name, None))
        if problem:
            ap.error(f"--{name} {problem}")


def command_line(script: str, argv=None) -> str:
    """The command a run was started with, for its output files: "python <script> <arguments>", each argument
    shell-quoted (argv None: this process's sys.argv[1:])."""
    return " ".join(["python", script, *map(shlex.quote, sys.argv[1:] if argv is None else argv)])


def fill_from_preset(args: argparse.Namespace, preset: dict) -> None:
    """Options the user left at None take the preset's value (keys the parser does not have are skipped)."""
    for k, v in preset.items():
        if getattr(args, k, "absent") is None:
            setattr(args, k, v)


def require_positive(ap: argparse.ArgumentParser, args: argparse.Namespace, names, minimum: int = 1) -> None:
    """A one-line parser error for the first option in `names` below `minimum` (None: not set, skipped), stating
    the option's config.BOUNDS range where that range already starts at `minimum` or above (one range per option)."""
    for k in names:
        v = getattr(args, k)
        if v is not None and v < minimum:
            problem = bound_problem(k, v) if k in BOUNDS and BOUNDS[k].lo >= minimum else None
            ap.error(f"--{k.replace('_', '-')} {problem or f'must be >= {minimum}, got {v}'}")


def numeric_options(ap: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's options that take an int or a float (what config.BOUNDS must cover)."""
    return [x for x in ap._actions if getattr(x.type, "kind", x.type) in (int, float)]  # no public accessor


def bound_numbers(ap: argparse.ArgumentParser) -> None:
    """Give every int or float option of `ap` with a config.BOUNDS entry a type that parses and range-checks
    it, so that a bad number ("nan" for an int as well as 10**30) is refused by the parser itself, in one line
    naming the option and its range. Called once a script has added all its options."""
    for action in numeric_options(ap):
        if action.dest in BOUNDS and not hasattr(action.type, "kind"):
            action.type = _bounded(getattr(action.type, "kind", action.type), action.dest)


def _bounded(kind: type, dest: str) -> Callable[[str], int | float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = text
        problem = bound_problem(dest, value)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return value

    parse.kind, parse.__name__ = kind, kind.__name__  # argparse names the type in its messages
    return parse


def check_bounds(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A one-line parser error for the first numeric option outside its range (config.BOUNDS, the table every
    entry point shares: 0, -1, 10**30, nan, inf are each refused there), before any other check or work."""
    for action in numeric_options(ap):
        problem = bound_problem(action.dest, getattr(args, action.dest, None)) if action.dest in BOUNDS else None
        if problem:
            ap.error(f"{action.option_strings[-1]} {problem}")


def check_sizes(ap: argparse.ArgumentParser, args: argparse.Namespace, names) -> None:
    """A one-line parser error for the first size-like option in `names` above its bound (config.SIZE_BOUNDS:
    what the program can hold), before any work."""
    for k in names:
        problem = size_problem(k, getattr(args, k))
        if problem:
            ap.error(f"--{k.replace('_', '-')} {problem}")


def check_experiment_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject impossible shared options with a one-line parser error (after the preset filled args.train
    and args.val): every number in its config.BOUNDS range first (the range the parser states), then the rules
    between options; fills --fisher-samples' default."""
    check_bounds(ap, args)
    check_run_options(ap, args)
    grid = grid_step_problem(args.grid_step)
    if grid:
        ap.error(f"--grid-step {grid}")
    if args.estimator not in ESTIMATORS:
        ap.error(f"--estimator must be one of {sorted(ESTIMATORS)}, got {args.estimator!r}")
    if (
        args.estimator != "paper" and args.granularity == "module"
    ):  # the rule of the estimator types (potara.merge), before training
        ap.error(
            f"--estimator {args.estimator} gives one weight per client: use --granularity client (or --estimator paper)"
        )
    split = args.train if args.fisher_split == "train" else args.val
    if args.fisher_samples is None:
        args.fisher_samples = min(ExperimentConfig.fisher_samples, split)
    elif args.fisher_samples > split:
        ap.error(f"--fisher-samples {args.fisher_samples} exceeds the client's {args.fisher_split} split ({split})")
    if args.device == "cuda":
        import torch  # only here: asking for CUDA is the one check that needs it

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available (use --device cpu or auto)")


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The ExperimentConfig the shared options describe."""
    return ExperimentConfig(
        rounds=args.rounds,
        local_steps=args.local_steps,
        clients_per_round=args.clients_per_round,
        lr=args.lr,
        batch_size=args.batch_size,
        local_train_steps=args.local_train_steps,
        finetune_steps=args.finetune_steps,
        fisher_samples=args.fisher_samples,
        fisher_labels=args.labels,
        fisher_split=args.fisher_split,
        fisher_chunk=args.fisher_chunk,
        eps=args.eps,
        granularity=args.granularity,
        estimator=args.estimator,
        grid_step=args.grid_step,
        snapshots=args.snapshots,
        fedsa=args.fedsa,
        seed=args.seed,
        drop_prob=args.drop_prob,
        max_update_norm=update_bound(args.max_update_norm),
    )


class CliError(SystemExit):
    """Exit with `status` after `error: <message>` was printed to stderr (see fail)."""

    def __init__(self, message: str, status: int = 2):
        super().__init__(status)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def fail(message: str, status: int = 2) -> NoReturn:
    """One line `error: <message>` on stderr, then exit `status` (2: a bad argument or input file, as
    argparse; 1: the run failed, e.g. out of memory)."""
    message = " ".join(str(message).split())  # one line, whatever the exception said
    print(f"error: {message}", file=sys.stderr)
    raise CliError(message, status)


def start_torch(args: argparse.Namespace):
    """Load torch for the run, once the command line is checked: idle OpenMP threads set to sleep, threads,
    the torch.func fallback warning silenced; returns the device (--device auto: CUDA when present)."""
    # Idle OpenMP threads sleep instead of spinning: on a shared machine, spinning threads of an oversubscribed
    # pool slowed training here 20x. The OpenMP runtime reads this when it loads (with torch): set it first.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="There is a performance drop")  # torch.func's SDPA fallback (Fisher)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if cuda else "cpu")


def check_resume(args: argparse.Namespace) -> None:
    """--resume, before any data is read or model built: the training settings, LoRA rank and alpha of
    --out/checkpoint.pt against the command line's (checkpoint.check_settings: a ResumeError naming each one that
    differs, with both values)."""
    if args.resume:
        from potara_harness.checkpoint import check_settings

        check_settings(os.path.join(args.out, "checkpoint.pt"), config_from_args(args), args.rank, args.lora_alpha)


def finished(seconds: float, device, threads: int, out: str) -> str:
    """The run's last line: its time, device and threads, and where the results are."""
    return f"{seconds:.0f}s on {device} ({threads} thread{'' if threads == 1 else 's'}); results in {out}/results.json"


def autocast_dtype(device):
    """bf16 autocast on CUDA, full precision on the CPU."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else None


@contextmanager
def one_line_errors(*errors: type[BaseException]):
    """Bad input found during the run (data.DataError, checkpoint.ResumeError, tensor_checks.AdapterError,
    safe_files.UnsafeFile
    and `errors`) -> fail(..., 2); a failed write (safe_files.WriteError) and MemoryError -> fail(..., 1), saying
    the previous files are intact / it is not bad data."""
    from data import DataError
    from potara_guards.tensor_checks import AdapterError
    from potara_harness.checkpoint import ResumeError

    try:
        yield
    except WriteError as e:  # disk full, file-size limit: the previous files are intact (safe_files.atomic_write)
        fail(str(e), status=1)
    except (DataError, ResumeError, AdapterError, UnsafeFile, *errors) as e:  # UnsafeFile: a planted link or FIFO
        fail(str(e))
    except (MemoryError, RuntimeError) as e:  # torch reports a failed allocation as a RuntimeError
        if isinstance(e, RuntimeError) and not _out_of_memory(e):
            raise
        fail(
            f"out of memory ({' '.join(str(e).split())[:200] or 'MemoryError'}): lower --rank, --batch-size, "
            "--eval-batch-size or --fisher-chunk, or use a machine with more memory (the input files were not the "
            "problem)",
            status=1,
        )


def _out_of_memory(e: RuntimeError) -> bool:
    """torch.OutOfMemoryError (CUDA) or the CPU allocator's "can't allocate memory"."""
    import torch

    return (
        isinstance(e, getattr(torch, "OutOfMemoryError", ()))
        or "can't allocate memory" in str(e)
        or "out of memory" in str(e).lower()
    )


def run_main(main: Callable[[], object]) -> None:
    """A script's __main__: Ctrl-C says how to continue (the checkpoint is written after every round and
    client: nothing is lost)."""
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit("interrupted: rerun the same command with --resume to continue") from None
