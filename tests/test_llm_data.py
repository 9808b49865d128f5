"""llm_data: hostile JSONL lines end in one-line DataErrors naming file and line; task files that are links,
FIFOs or too large, lines too long and unusable task names are one line before anything is kept; the up-front checks
(enough examples, answers that fit --max-len) agree with what encoding the splits would do."""

import json
import os
import re

import pytest

import data
from potara_harness.llm_data import (
    IGNORE,
    ByteTokenizer,
    DataError,
    Example,
    check_fits,
    encode_examples,
    encode_pair,
    normalize_answer,
    read_jsonl,
    read_task_dir,
    split_tasks,
)
from potara_harness.llm_tasks import synthetic_tasks

GOOD = json.dumps({"prompt": "p", "answer": "a"}).encode()


def write_lines(path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def one_line_error(path) -> str:
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_data_error_is_the_one_of_data_py():
    assert DataError is data.DataError  # `except data.DataError` catches text-data errors too


def test_lone_surrogate_is_refused_with_its_line(tmp_path):
    bad = b'{"prompt": "x \\ud800 y", "answer": "a"}'  # json accepts it; UTF-8 encoding (tokenizers) would not
    msg = one_line_error(write_lines(tmp_path / "t.jsonl", [GOOD, bad]))
    assert msg.startswith(f"{tmp_path / 't.jsonl'}:2: 'prompt' is not valid Unicode"), msg
    bad_option = b'{"prompt": "p", "answer": "a", "options": ["a", "\\udfff"]}'
    error = one_line_error(write_lines(tmp_path / "t2.jsonl", [bad_option]))
    assert "t2.jsonl:1: 'options' is not valid Unicode" in error


def test_deep_nesting_is_refused_with_its_line(tmp_path):
    deep = b"[" * 100_000 + b"]" * 100_000  # json's decoder recurses once per bracket: RecursionError
    msg = one_line_error(write_lines(tmp_path / "t.jsonl", [GOOD, GOOD, GOOD, deep]))
    assert "t.jsonl:4: JSON nested too deeply" in msg


def test_invalid_utf8_is_reported_at_its_line_and_column(tmp_path):
    """Enough text before the bad byte that a chunked decoder's offset would differ from the line's column."""
    lines = [json.dumps({"prompt": "p" * 5000, "answer": "a"}).encode()] * 3
    bad = b'{"prompt": "ab\xffc", "answer": "a"}'
    msg = one_line_error(write_lines(tmp_path / "t.jsonl", lines + [bad, GOOD]))
    column = bad.index(b"\xff") + 1
    assert msg.endswith(f"t.jsonl:4: not UTF-8 text (byte 0xff at column {column})"), msg


def test_bom_is_allowed_and_duplicate_fields_are_not(tmp_path):
    assert read_jsonl(write_lines(tmp_path / "bom.jsonl", [b"\xef\xbb\xbf" + GOOD, GOOD])) == [Example("p", "a")] * 2
    dup = b'{"prompt": "p", "answer": "a", "answer": "b"}'
    assert "d.jsonl:2: field 'answer' appears twice" in one_line_error(write_lines(tmp_path / "d.jsonl", [GOOD, dup]))


def test_split_tasks_checks_every_task_first_and_keeps_test_fixed():
    tasks = synthetic_tasks(20, seed=3)
    splits = split_tasks(tasks, (8, 4, 6), seed=1)
    for name, (train, val, test) in splits.items():
        assert (len(train), len(val), len(test)) == (8, 4, 6)
        taken = {e.prompt for e in train + val + test}  # 18 distinct prompts: no split holds another's
        assert len(taken) == 18 and taken <= {e.prompt for e in tasks[name]}
    again = split_tasks(tasks, (2, 4, 6), seed=1)  # fewer train examples: val and test are the same
    assert all(again[n][1:] == splits[n][1:] and again[n][0] == splits[n][0][:2] for n in tasks)
    assert any(split_tasks(tasks, (8, 4, 6), seed=2)[n][2] != splits[n][2] for n in tasks)
    short = dict(tasks, zz=tasks["sentiment"][:5])
    with pytest.raises(DataError, match="task zz: 5 distinct examples, fewer than --train 8 \\+ --val 4 \\+ --test 6"):
        split_tasks(short, (8, 4, 6), seed=1)


def test_split_tasks_keeps_a_repeated_prompt_once_so_no_split_holds_anothers():
    """A task file whose prompts repeat (a FLAN export can hold the same question twice): each prompt is kept
    once, its first example, before the split; too few distinct prompts is one DataError that says so."""
    rows = [Example(f"q{i % 12}", f"a{i}") for i in range(30)]  # 12 distinct prompts, each 2-3 times
    (train, val, test) = split_tasks({"t": rows}, (6, 2, 4), seed=0)["t"]
    prompts = [e.prompt for e in train + val + test]
    assert sorted(prompts) == sorted(f"q{i}" for i in range(12))  # all 12, each once
    assert all(e == rows[int(e.prompt[1:])] for e in train + val + test)  # the first example of each prompt
    with pytest.raises(DataError, match="task t: 12 distinct examples \\(18 repeated prompts dropped\\), fewer"):
        split_tasks({"t": rows}, (8, 2, 4), seed=0)


def test_check_fits_agrees_with_encode_pair():
    """The smallest --max-len check_fits accepts is exactly the one at which encode_pair first succeeds."""
    tok = ByteTokenizer()
    tasks = {"a": [Example("prompt", "yes"), Example("another prompt", "a longer answer")], "b": [Example("p", "x")]}
    need = 1 + len(" a longer answer".encode()) + 1 + 1  # <bos> + answer bytes + <eos> + one prompt token
    check_fits(tasks, tok, need)
    encode_pair(tok, "another prompt", "a longer answer", need)
    with pytest.raises(DataError) as e:
        check_fits(tasks, tok, need - 1)
    assert str(e.value) == (
        f"a: answer 'a longer answer' needs {need} tokens with its prompt, more than --max-len "
        f"{need - 1}: use --max-len {need} or more"
    )
    with pytest.raises(DataError, match="more than --max-len"):
        encode_pair(tok, "another prompt", "a longer answer", need - 1)
    check_fits({}, tok, 1)  # nothing to check


# ----------------------------------------------------------------------------- readers and encoding
def write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_jsonl_reader_reads_both_kinds(tmp_path):
    path = write(
        tmp_path / "t.jsonl",
        [
            json.dumps({"prompt": "p1", "answer": "b", "options": ["a", "b"]}),
            "",
            json.dumps({"prompt": "p2", "answer": "free"}),
        ],
    )
    assert read_jsonl(path) == [Example("p1", "b", ("a", "b")), Example("p2", "free", None)]


@pytest.mark.parametrize(
    "bad, why",
    [
        ('{"prompt": "p", "answer": ', "not valid JSON"),
        ('["p", "a"]', "expected a JSON object"),
        ('{"prompt": "p"}', "'answer' must be a non-empty string"),
        ('{"prompt": "", "answer": "a"}', "'prompt' must be a non-empty string"),
        ('{"prompt": "p", "answer": "c", "options": ["a", "b"]}', "is not one of the options"),
        ('{"prompt": "p", "answer": "a", "options": "a"}', "'options' must be a list"),
        ('{"prompt": "p", "answer": "a", "options": ["a", "a"]}', "duplicates"),
        ('{"prompt": "p", "answer": "a", "label": 1}', "unknown field"),
    ],
)
def test_jsonl_reader_names_the_bad_line(tmp_path, bad, why):
    good = json.dumps({"prompt": "p", "answer": "a"})
    path = write(tmp_path / "task.jsonl", [good, good, bad, good])
    with pytest.raises(DataError) as e:
        read_jsonl(path)
    assert "task.jsonl:3:" in str(e.value) and why in str(e.value)


def test_task_dir_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        read_task_dir(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no .jsonl files"):
        read_task_dir(str(tmp_path))
    write(tmp_path / "b.jsonl", [json.dumps({"prompt": "p", "answer": "a"})])
    write(tmp_path / "a.jsonl", [json.dumps({"prompt": "q", "answer": "z"})])
    assert list(read_task_dir(str(tmp_path))) == ["a", "b"]
    # task "." / ".." / "": its export folder would be DIR itself or above
    for odd in ("..jsonl", "...jsonl", ".jsonl"):
        write(tmp_path / odd, [json.dumps({"prompt": "q", "answer": "z"})])
        with pytest.raises(DataError, match=f"{odd!r} gives no usable task name"):
            read_task_dir(str(tmp_path))
        (tmp_path / odd).unlink()


def test_encoding_labels_only_the_answer_and_right_pads():
    tok = ByteTokenizer()
    ids, labels = encode_examples(tok, [Example("ab", "c"), Example("abcd", "xy")], max_len=16)
    # <bos> a b " " c <eos> | <bos> a b c d " " x y <eos>
    assert ids[0].tolist() == [1, 100, 101, 35, 102, 2, 0, 0, 0]
    assert labels[0].tolist() == [IGNORE] * 3 + [35, 102, 2] + [IGNORE] * 3
    assert labels[1].tolist() == [IGNORE] * 5 + [35, 123, 124, 2]
    short, short_labels = encode_examples(tok, [Example("abcdef", "z")], max_len=6)  # prompt cut from the left
    assert tok.decode(short[0].tolist()) == "ef z" and (short_labels[0] != IGNORE).sum() == 3
    with pytest.raises(DataError, match="more than --max-len"):
        encode_examples(tok, [Example("a", "long answer")], max_len=5)
    assert tok.decode(tok.encode("héllo")) == "héllo"
    assert normalize_answer(" The  Tolkien!") == "tolkien"


def test_task_files_that_are_not_regular_files_are_one_line(tmp_path, alarm):
    """a.jsonl -> /dev/zero was read until memory ran out; a FIFO named a.jsonl hung forever."""
    os.symlink("/dev/zero", tmp_path / "a.jsonl")
    with pytest.raises(DataError, match="a.jsonl: is a symbolic link"):
        read_task_dir(str(tmp_path))
    (tmp_path / "a.jsonl").unlink()
    os.mkfifo(tmp_path / "a.jsonl")
    with pytest.raises(DataError, match="a.jsonl: is not a regular file .a FIFO"):
        read_task_dir(str(tmp_path))


def test_file_and_line_sizes_are_bounded(tmp_path):
    good = json.dumps({"prompt": "p", "answer": "a"})
    path = write(tmp_path / "t.jsonl", [good, json.dumps({"prompt": "x" * 200, "answer": "a"}), good])
    with pytest.raises(DataError, match="t.jsonl:2: line longer than 100 bytes"):
        read_jsonl(path, max_line=100)
    assert len(read_jsonl(path, max_line=len(json.dumps({"prompt": "x" * 200, "answer": "a"})))) == 3  # \n not counted
    with pytest.raises(DataError, match=f"{os.path.getsize(path)} bytes, larger than the 50 this file may hold"):
        read_jsonl(path, max_bytes=50)


@pytest.mark.parametrize(
    "name, why",
    [
        ("x" * 201, "longer than 200 bytes"),
        ("é" * 101, "longer than 200 bytes"),
        ("abc\u202etxt", "U+202E"),
        ("a\tb", "U+0009"),
        ("a\u200bb", "U+200B"),
        ("a\\b", "U+005C"),
        ("-rf", "start with '.' or '-'"),
        (".hidden", "start with '.' or '-'"),
    ],
)
def test_task_names_are_checked_before_any_file_is_read(tmp_path, name, why):
    """A 244-byte task name failed only after all the training (File name too long on .<name>.partial-PID)."""
    write(tmp_path / "a.jsonl", [json.dumps({"prompt": "q", "answer": "z"})])
    (tmp_path / "a.jsonl").chmod(0)  # never read: the names are checked first
    write(tmp_path / f"{name}.jsonl", [json.dumps({"prompt": "q", "answer": "z"})])
    with pytest.raises(DataError, match=f"gives no usable task name .it [^)]*{re.escape(why)}"):
        read_task_dir(str(tmp_path))
    assert "x" * 200 in read_task_dir_names(tmp_path, "x" * 200)


def read_task_dir_names(tmp_path, name):
    for f in tmp_path.iterdir():
        f.unlink()
    write(tmp_path / f"{name}.jsonl", [json.dumps({"prompt": "q", "answer": "z"})])
    return list(read_task_dir(str(tmp_path)))
