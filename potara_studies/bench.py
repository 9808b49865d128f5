"""Benchmarks: where potara's time and memory go, as ratios measured in one run on one device.

    python -m potara_studies.bench                              # every section (CPU here, CUDA when present;
                                                                # its time: docs/performance.md)
    python -m potara_studies.bench --only lora,fisher --reps 9  # some sections; figures also in --out (JSON)

Sections (each with the goal it checks):
  lora      LoRA layer forward+backward against the plain frozen layer of the same shape (ViT-B: 768x768,
            768x3072, and the attention's packed q/v in-projection), and against peft's LoRA layer when peft
            is installed. Goal: our overhead no larger than peft's.
  merged    inference of a ViT-B/16 whose adapter is merged (lora.merge_lora) against the plain model. Goal: 1.00x.
  fisher    potara.diag_fisher (torch.func) against a naive one-sample-at-a-time loop and against one ordinary
            training pass (AdamW steps on batches of 32) over the same samples, on run_cifar's tiny-preset ViT and
            a larger small ViT; and per_sample_grads with the math attention kernel against the default one.
            Goals: >= 5x faster than the loop at 32 samples; within 2x of the training pass.
  clients   loading one client's adapter into the shared backbone; resident memory with 10 and 100 clients'
            adapters held (in a fresh process). Goal: memory grows by the adapters' bytes only, no model copy.
  potara    the default weight (potara.personalize on held-out samples), and its worst case (2 forward-backward
            passes + 1 forward pass), against one forward-backward pass over the same samples, the 21-point grid
            search scored on them, and the local training it follows (tiny preset). Goals: worst case <= 2.5x
            the pass and <= 0.25 of the grid search; personalize < 5 percent of local training.
  pipeline  stage-by-stage wall time of `run_cifar.py --preset tiny --data synthetic`, read from that run's
            results.json (--pipeline-results), or run first with --pipeline-run (minutes; more without the
            cached tiny backbone).

Method: each timed variant is first called untimed (warm-up: once on a CPU, 3 times on a GPU), then --reps
rounds in which all variants of a comparison run once each in rotating order, so drift caused by other
processes hits them alike (variants shorter than a quarter second are repeated within their turn). A row gives
the variant's median time and the median over rounds of its ratio to the baseline measured in the same round; "noise" is
that ratio's min-max over the rounds. On a CPU the default is one thread (--threads): with several, every
small op waits for OpenMP threads, which on a machine shared with other jobs swamps the figures.
"""

from __future__ import annotations

import argparse

from potara_harness import cli, run_folder

# The command line is checked here before torch loads (--help and a bad option answer at once); the benchmarks
# themselves are benchmarks.py, imported once the checks passed.
SECTIONS = ("lora", "merged", "fisher", "clients", "potara", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        description=__doc__.split("\n")[0],
        epilog=__doc__.split("\n\n", 2)[2],
        formatter_class=cli.DocstringHelpFormatter,
    )
    a = ap.add_argument
    a("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {','.join(SECTIONS)}")
    a("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when present")
    a("--reps", type=int, help="timed rounds per comparison (default: 7 on CPU, 10 on CUDA)")
    a(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: stable ratios on a shared machine)",
    )
    a("--out", default="runs/bench.json", help="JSON output")
    a(
        "--pipeline-results",
        default="runs/tiny-synthetic-dirichlet-k5-s0/results.json",
        help="results.json of a `run_cifar.py --preset tiny --data synthetic` run",
    )
    a(
        "--pipeline-run",
        action="store_true",
        help="run that command first, into --pipeline-out (minutes; longer when the backbone is not cached)",
    )
    a("--pipeline-out", default="runs/bench-pipeline", help="output folder of --pipeline-run")
    cli.bound_numbers(ap)  # --reps, --threads: their ranges (config.BOUNDS), checked as they are parsed
    return ap


def main(argv=None) -> dict:
    """Check the command line, then run the chosen sections (benchmarks.run)."""
    ap = build_parser()
    args = ap.parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown or not sections:
        ap.error(f"--only: unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    run_folder.prepare_out_file(ap, args.out)  # its folder made now, no link where the JSON goes: before any timing
    if args.pipeline_run and "pipeline" in sections:
        run_folder.prepare_out_dir(ap, args.pipeline_out, "--pipeline-out")  # run_cifar.py's own check, up front
    if args.device == "cuda":
        import torch  # only here: asking for CUDA is the one check that needs it

        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device is available")
    from potara_studies.benchmarks import run

    return run(args, sections, cli.command_line("-m potara_studies.bench", argv))


if __name__ == "__main__":
    main()
