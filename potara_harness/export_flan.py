"""The paper's 8 FLAN tasks as run_llm.py data: one <task>.jsonl per client (docs/language-models.md).

    pip install datasets                                 # Hugging Face datasets: not a dependency of potara
    python -m potara_harness.export_flan data/flan 2000  # 8 files of up to 2000 examples each
    python run_llm.py --model Qwen/Qwen3-1.7B --data data/flan

For each task: every split the dataset has, concatenated and shuffled (seed 0); the first N rows that
convert are written, one JSON object a line, in llm_data.py's format:
    multiple choice  {"prompt": ..., "answer": <one of the options>, "options": [...]}
    free-form        {"prompt": ..., "answer": ...}                                (squad_v1)
A multiple-choice row converts only with an integer gold index inside its options and distinct options,
so unlabelled rows (GLUE and HellaSwag test splits: label -1 or ""; an ARC answer key naming no choice)
are dropped, as are a SQuAD row without an answer and any row with an empty prompt or answer.
Each file is written as the runs write theirs (safe_files.atomic_write: a new random temporary name beside it,
never through a link, renamed: whole or not at all). The folder and every file's place in it are checked before
any dataset is read: a folder that cannot serve, or a link or special file where a file goes, is one line.

The dataset ids and field names were written from the datasets' public descriptions and not checked
against the hub from the machine this was written on (no network); tests/test_docs.py runs the export
against a stand-in `datasets` module.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

from potara_guards.safe_files import UnsafeFile, WriteError, atomic_write, write_target_problem
from potara_harness import cli
from potara_harness.cli import bound_numbers


def mc(prompt: str, options, gold) -> dict | None:
    """A multiple-choice example, or None for a row without a usable label."""
    options = list(options)
    ok = (
        isinstance(gold, int)
        and not isinstance(gold, bool)
        and 0 <= gold < len(options)
        and len(set(options)) == len(options)
    )
    return {"prompt": prompt, "answer": options[gold], "options": options} if ok else None


def _arc(r: dict) -> dict | None:
    labels = list(r["choices"]["label"])
    gold = labels.index(r["answerKey"]) if r["answerKey"] in labels else None
    return mc(f"Question: {r['question']}\nAnswer:", r["choices"]["text"], gold)


def _hellaswag(r: dict) -> dict | None:
    label = str(r["label"]).strip()
    return mc(f"{r['activity_label']}: {r['ctx']}", r["endings"], int(label) if label.isdigit() else None)


def _squad(r: dict) -> dict | None:
    answers = r["answers"]["text"]
    return {"prompt": f"{r['context']}\nQuestion: {r['question']}\nAnswer:", "answer": answers[0]} if answers else None


# task (file name) -> (dataset id, config or None, row -> example or None)
TASKS: dict[str, tuple[str, str | None, Callable[[dict], dict | None]]] = {
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge", _arc),
    "cosmos_qa": (
        "allenai/cosmos_qa",
        None,
        lambda r: mc(
            f"{r['context']}\nQuestion: {r['question']}\nAnswer:", [r[f"answer{i}"] for i in range(4)], r["label"]
        ),
    ),
    "definite_pronoun_resolution": (
        "community-datasets/definite_pronoun_resolution",
        "plain_text",
        lambda r: mc(f'{r["sentence"]}\nWho is "{r["pronoun"]}"?\nAnswer:', r["candidates"], r["label"]),
    ),
    "glue_qqp": (
        "nyu-mll/glue",
        "qqp",
        lambda r: mc(
            f"Question 1: {r['question1']}\nQuestion 2: {r['question2']}\nDo they ask the same thing?\nAnswer:",
            ["no", "yes"],
            r["label"],
        ),
    ),
    "hellaswag": ("Rowan/hellaswag", None, _hellaswag),
    "mnli": (
        "nyu-mll/glue",
        "mnli",
        lambda r: mc(
            f"Premise: {r['premise']}\nHypothesis: {r['hypothesis']}\nDoes the premise entail the hypothesis?\nAnswer:",
            ["yes", "maybe", "no"],
            r["label"],
        ),
    ),
    "squad_v1": ("rajpurkar/squad", None, _squad),
    "sst2": (
        "nyu-mll/glue",
        "sst2",
        lambda r: mc(f"Review: {r['sentence']}\nSentiment:", ["negative", "positive"], r["label"]),
    ),
}


def convert(task: str, row: dict) -> dict | None:
    """One dataset row as an example of `task`, or None when the row has no usable label or text."""
    ex = TASKS[task][2](row)
    return ex if ex and ex["prompt"].strip() and ex["answer"].strip() else None


def export(out: str, per_task: int, datasets) -> dict[str, int]:
    """Write out/<task>.jsonl for every task (atomic_write); `datasets` is the Hugging Face module. Returns rows
    kept per task."""
    os.makedirs(out, exist_ok=True)
    kept = {}
    for task, (hub, cfg, _) in TASKS.items():
        splits = datasets.get_dataset_split_names(hub, cfg)
        rows = datasets.concatenate_datasets([datasets.load_dataset(hub, cfg, split=s) for s in splits]).shuffle(seed=0)
        path = os.path.join(out, f"{task}.jsonl")
        n = 0

        def write(f) -> None:
            nonlocal n
            for row in rows:
                ex = convert(task, row)
                if ex is not None:
                    f.write((json.dumps(ex, ensure_ascii=False) + "\n").encode("utf-8"))
                    n += 1
                    if n == per_task:
                        break

        atomic_write(path, write)
        kept[task] = n
        print(f"{path}: {n} examples", flush=True)
    return kept


def out_problem(out: str) -> str | None:
    """Why `out` cannot take the export (run_folder.dir_problem; then a link, a folder or a special file
    where a <task>.jsonl goes), as one line naming `out`; None if it can."""
    from potara_harness.run_folder import dir_problem

    problem = dir_problem(out)
    if problem:
        return f"{out}: {problem}"
    for task in TASKS:
        problem = write_target_problem(os.path.join(out, f"{task}.jsonl"))
        if problem:
            return f"{out}: {task}.jsonl in it {problem}"
    return None


def build_parser() -> argparse.ArgumentParser:
    ap = cli.Parser(
        prog="python -m potara_harness.export_flan",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("out", nargs="?", default=os.path.join("data", "flan"), help="output folder (run_llm.py --data)")
    ap.add_argument("per_task", nargs="?", type=int, default=2000, help="examples per task, at most")
    bound_numbers(ap)  # per_task's range (config.BOUNDS), checked as it is parsed
    return ap


def main(argv=None) -> dict[str, int]:
    ap = build_parser()
    args = ap.parse_args(argv)
    problem = out_problem(args.out)
    if problem:
        ap.error(problem)
    try:
        import datasets
    except ImportError:
        print("error: the Hugging Face `datasets` package is not installed: pip install datasets", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        return export(args.out, args.per_task, datasets)
    except (UnsafeFile, WriteError) as e:  # planted after the check, or a failed write: one line, the file intact
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        raise SystemExit(1 if isinstance(e, WriteError) else 2) from None


if __name__ == "__main__":
    main()
