"""Text data for run_llm.py: the JSONL task format, a byte-level tokenizer, answer-only token labels,
all offline.

JSONL format (one file per client task, `<task>.jsonl`, one JSON object per line):
    {"prompt": "Review: a gripping, funny film.\\nSentiment:", "answer": "positive",
     "options": ["negative", "positive"]}                      # multiple choice: answer is one option
    {"prompt": "Context: ... Question: who wrote it?\\nAnswer:", "answer": "Tolkien"}   # free-form
The model reads  prompt + " " + answer + <eos>  (the space is the harness-style target delimiter);
only the answer tokens (and <eos>) carry a label, everything else is -100. Empty lines are skipped.

    tasks = read_task_dir("data/flan")                # {"arc_challenge": [Example, ...], ...}
    tok = ByteTokenizer()                             # bytes + <pad>/<bos>/<eos>: no download
    ids, labels = encode_examples(tok, tasks["sst2"], max_len=128)   # right-padded [n, T] tensors

Synthetic tasks (`--data synthetic`) and their public pre-training corpus: llm_tasks.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import string
import unicodedata
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from data import DataError
from potara_guards.safe_files import UnsafeFile, open_regular
from potara_harness.config import MAX_LINE_BYTES, MAX_TASK_FILE_BYTES, MAX_TASK_NAME_BYTES

IGNORE = -100  # label of tokens that are not scored (prompt, padding): the convention of HF and potara


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    options: tuple[str, ...] | None = None  # multiple choice when given; `answer` is one of them


# ----------------------------------------------------------------------------- JSONL
class _DuplicateKey(ValueError):
    pass


def _object_without_duplicates(pairs: list[tuple[str, object]]) -> dict:
    """json's object hook: {"answer": "a", "answer": "b"} is ambiguous (json keeps the last), so refuse it."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey(next(k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])))
    return obj


def _text(value: object, where: str, field: str) -> str:
    """A non-empty string that is valid Unicode: JSON's escapes can spell a lone surrogate ("\\ud800"), which
    json accepts but no tokenizer can encode."""
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: '{field}' must be a non-empty string")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{where}: '{field}' is not valid Unicode ({e.reason} at character {e.start})") from None
    return value


def parse_line(text: str, where: str) -> Example:
    """One JSONL line -> Example; anything else is a one-line DataError prefixed with `where` (file:line)."""
    try:
        obj = json.loads(text, object_pairs_hook=_object_without_duplicates)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    except _DuplicateKey as e:
        raise DataError(f"{where}: field {e.args[0]!r} appears twice") from None
    except RecursionError:  # json's decoder recurses once per bracket
        raise DataError(f"{where}: JSON nested too deeply (expected a flat object)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"prompt", "answer", "options"})
    if unknown:
        raise DataError(
            f"{where}: unknown field(s) {[u[:40] for u in unknown[:5]]!r}; allowed: prompt, answer, options"
        )
    prompt, answer = _text(obj.get("prompt"), where, "prompt"), _text(obj.get("answer"), where, "answer")
    options = obj.get("options")
    if options is not None:
        if not isinstance(options, list) or len(options) < 2:
            raise DataError(f"{where}: 'options' must be a list of at least 2 non-empty strings")
        options = tuple(_text(o, where, "options") for o in options)
        if len(set(options)) != len(options):
            raise DataError(f"{where}: 'options' has duplicates")
        if answer not in options:
            raise DataError(f"{where}: 'answer' {answer[:40]!r} is not one of the options")
    return Example(prompt, answer, options)


def read_jsonl(path: str, max_bytes: int = MAX_TASK_FILE_BYTES, max_line: int = MAX_LINE_BYTES) -> list[Example]:
    """Every example of one JSONL file; a malformed line raises DataError naming the file and line. Only a regular
    file of at most max_bytes is read (safe_files.open_regular: a link, /dev/zero or a FIFO named <task>.jsonl is one
    line at once), a line of at most max_line bytes (each costs ~10x its bytes once parsed). Lines are split on
    b"\\n" and decoded one at a time, so a bad UTF-8 byte is reported with its line and column (a UTF-8
    byte-order mark on line 1 is allowed)."""
    examples, total = [], 0
    try:
        with open_regular(path, max_bytes) as f:
            for number, raw in enumerate(iter(lambda: f.readline(max_line + 1), b""), start=1):
                where, total = f"{path}:{number}", total + len(raw)
                if len(raw) > max_line and not raw.endswith(b"\n"):
                    raise DataError(f"{where}: line longer than {max_line:,} bytes")
                if total > max_bytes:  # the file grew while it was read
                    raise DataError(f"{path}: larger than {max_bytes:,} bytes")
                try:
                    line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    bad = f"byte 0x{raw[e.start]:02x} at column {e.start + 1}"
                    raise DataError(f"{where}: not UTF-8 text ({bad})") from None
                if line.strip():
                    examples.append(parse_line(line, where))
    except UnsafeFile as e:
        raise DataError(str(e)) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    if not examples:
        raise DataError(f"{path}: no examples")
    return examples


def task_name_problem(name: str) -> str | None:
    """Why `name` (a <name>.jsonl file's) cannot be a task name (None if it can): it names a client in the tables
    and an --export-peft folder, so it must be a plain folder name that reads as what it is. At most
    MAX_TASK_NAME_BYTES of UTF-8; no path separator; no control or format character (Unicode Cc/Cf: tabs,
    newlines, zero-width characters, bidi overrides such as U+202E that display a name reversed); no leading
    '-' (an option to a shell command) or '.' (hidden; ".", ".." would be the folder itself or above)."""
    if not name or name.startswith((".", "-")):
        return "must not be empty or start with '.' or '-'"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_TASK_NAME_BYTES:
        return f"is longer than {MAX_TASK_NAME_BYTES} bytes"
    bad = next((c for c in name if c in "/\\" or unicodedata.category(c) in ("Cc", "Cf", "Cs")), None)
    if bad is not None:
        return f"holds the character U+{ord(bad):04X} (a path separator, control or format character)"
    return None


def read_task_dir(directory: str) -> dict[str, list[Example]]:
    """One client task per `<task>.jsonl` file of `directory`, in sorted file-name order; every task name is
    checked (task_name_problem) before any file is read."""
    if not os.path.isdir(directory):
        raise DataError(
            f"--data {directory}: not a directory (expected one <task>.jsonl file per client, or 'synthetic')"
        )
    files = sorted(f for f in os.listdir(directory) if f.endswith(".jsonl"))
    if not files:
        raise DataError(f"--data {directory}: no .jsonl files in it (one <task>.jsonl file per client)")
    for f in files:
        problem = task_name_problem(f[: -len(".jsonl")])
        if problem:
            raise DataError(
                f"--data {directory}: {f[:60]!a} gives no usable task name (it {problem}): rename it <task>.jsonl"
            )
    return {f[: -len(".jsonl")]: read_jsonl(os.path.join(directory, f)) for f in files}


def split_tasks(
    tasks: dict[str, list[Example]], sizes: tuple[int, int, int], seed: int
) -> dict[str, tuple[list[Example], list[Example], list[Example]]]:
    """Each task's (train, val, test) examples: a prompt that repeats is kept once (its first example), so no
    split holds a prompt of another (a validation or test prompt seen in training would favour the local
    adapter and flatter every score); then shuffled with the seed "<seed>/<task>", and test, val and train taken
    in that order (so --train does not change the test set). Every task is checked before any is split."""
    n_train, n_val, n_test = sizes
    distinct = {}
    for name, examples in tasks.items():
        first: dict[str, Example] = {}
        for e in examples:
            first.setdefault(e.prompt, e)
        distinct[name] = list(first.values())
        if len(first) < n_train + n_val + n_test:
            repeats = f" ({len(examples) - len(first)} repeated prompts dropped)" if len(first) < len(examples) else ""
            raise DataError(
                f"task {name}: {len(first)} distinct examples{repeats}, fewer than --train {n_train} + --val "
                f"{n_val} + --test {n_test}"
            )
    out = {}
    for name, examples in distinct.items():
        order = list(range(len(examples)))
        random.Random(f"{seed}/{name}").shuffle(order)
        test, val, train = (
            [examples[i] for i in order[a:b]]
            for a, b in ((0, n_test), (n_test, n_test + n_val), (n_test + n_val, n_test + n_val + n_train))
        )
        out[name] = (train, val, test)
    return out


# ----------------------------------------------------------------------------- tokenizers
class Tokenizer(Protocol):
    bos_id: int | None
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 3..258, with <pad> = 0, <bos> = 1, <eos> = 2. Needs no vocabulary file."""

    pad_id, bos_id, eos_id, offset, vocab_size = 0, 1, 2, 3, 259

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", errors="replace")


class HFTokenizer:
    """A transformers tokenizer behind the same small interface (bos only if the model's tokenizer adds one)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        self.bos_id = tokenizer.bos_token_id if adds_bos else None
        if tokenizer.eos_token_id is None:
            raise DataError("the model's tokenizer has no eos token: answers could not be terminated")
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


# ----------------------------------------------------------------------------- encoding
def encode_pair(tok: Tokenizer, prompt: str, answer: str, max_len: int) -> tuple[list[int], int]:
    """Token ids of <bos> prompt " " answer <eos> and the index where the answer starts. The prompt
    is tokenized apart from the answer (as evaluation harnesses do: context + continuation) and cut
    from the left when the whole does not fit in max_len (the question is usually at its end)."""
    head, a = _head(tok), _answer_ids(tok, answer)
    room = max_len - len(head) - len(a)
    if room < 1:
        raise DataError(f"answer {answer[:40]!r} needs {len(a)} tokens, more than --max-len {max_len} allows")
    p = tok.encode(prompt)[-room:]
    return head + p + a, len(head) + len(p)


def _head(tok: Tokenizer) -> list[int]:
    return [tok.bos_id] if tok.bos_id is not None else []


def _answer_ids(tok: Tokenizer, answer: str) -> list[int]:
    return tok.encode(" " + answer) + [tok.eos_id]


def check_fits(tasks: dict[str, Sequence[Example]], tok: Tokenizer, max_len: int) -> None:
    """Up front (before a model is loaded or pre-trained): every example must fit in max_len tokens as
    <bos> + at least one prompt token + " " answer <eos> (encode_pair cuts longer prompts from the left).
    A DataError names the longest answer and the smallest --max-len that fits them all."""
    worst = max(
        (
            (len(_head(tok)) + len(_answer_ids(tok, ex.answer)) + 1, name, ex)
            for name, exs in tasks.items()
            for ex in exs
        ),
        key=lambda t: t[0],
        default=None,
    )
    if worst is not None and worst[0] > max_len:
        need, name, ex = worst
        raise DataError(
            f"{name}: answer {ex.answer[:40]!r} needs {need} tokens with its prompt, more than --max-len "
            f"{max_len}: use --max-len {need} or more"
        )


def encode_examples(
    tok: Tokenizer, examples: Sequence[Example], max_len: int, answers: Sequence[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [n, T] right-padded with pad_id and labels [n, T]: the answer tokens and <eos>, -100
    elsewhere. Right padding + causal attention: padding never influences a scored position, so no
    attention mask is needed. `answers` overrides each example's answer (used to score options)."""
    rows = [
        encode_pair(tok, ex.prompt, ans, max_len)
        for ex, ans in zip(examples, answers if answers is not None else [e.answer for e in examples])
    ]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (ids, start) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, start : len(ids)] = torch.tensor(ids[start:])
    return input_ids, labels


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation for exact match: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())
