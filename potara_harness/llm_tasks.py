"""Synthetic text tasks for run_llm.py (`--data synthetic`): one task per client, plus the public corpus the
tiny model is pre-trained on, all offline and deterministic for a seed.

    tasks = synthetic_tasks(600, seed=1234)          # {"sentiment": [llm_data.Example, ...], ...}: 8 tasks
    corpus = public_corpus(2000, random.Random(0))   # the generic skills, never a client task

A closed world of 12 names (6 "she", 6 "he"), 16 mood words (8 positive, 8 negative), 8 verbs, digits and
letters. A task's examples have distinct prompts, so its train, val and test splits never share one.
Eight client tasks, stand-ins for the paper's 8 FLAN tasks, each in its own format (e.g. sentiment:
"review: fun bad nice. sentiment:" -> positive | negative).
The public corpus (pre-training of the tiny model) holds the world's generic single-step skills in one
shared "q: ... ?" format (a word's mood, a name's pronoun, look-up by name and by value, the larger of two
digits, continuing a pattern, equality of word lists); the clients' tasks compose these skills (a majority
of moods, a look-up followed by a comparison, ...) and never appear in it.
"""

from __future__ import annotations

import random

from potara_harness.llm_data import DataError, Example

# A small closed world (names with genders, mood words with polarities, digits, letters). The public
# corpus teaches the tiny model this world's generic skills; each client's task composes them in its own
# format, as the paper's FLAN clients each hold one task (the FLAN name in brackets is the analogue).
FEMALE = ("ann", "eve", "fay", "amy", "ivy", "zoe")
MALE = ("bob", "tom", "dan", "gus", "hal", "max")
NAMES = FEMALE + MALE
POSITIVE = ("good", "fun", "nice", "warm", "kind", "calm", "glad", "neat")
NEGATIVE = ("bad", "sad", "dull", "mean", "cold", "rude", "grim", "ugly")
MOODS = POSITIVE + NEGATIVE
VERBS = ("waved", "smiled", "left", "sang", "laughed", "nodded", "sat", "spoke")
DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _facts(r: random.Random, k: int, distinct_values: bool = False) -> tuple[list[str], list[str], str]:
    names = r.sample(NAMES, k)
    values = r.sample(DIGITS, k) if distinct_values else [r.choice(DIGITS) for _ in names]
    return names, values, " ".join(f"{n}={v}" for n, v in zip(names, values)) + "."


def _other(r: random.Random, pool, exclude) -> str:
    return r.choice([x for x in pool if x not in exclude])


def _sentiment(r):  # [sst2] majority polarity of three mood words
    pos = r.random() < 0.5
    k = r.choice((2, 3))
    words = list(r.sample(POSITIVE if pos else NEGATIVE, k) + r.sample(NEGATIVE if pos else POSITIVE, 3 - k))
    r.shuffle(words)
    return Example(
        f"review: {' '.join(words)}. sentiment:", "positive" if pos else "negative", ("negative", "positive")
    )


def _duplicate(r):  # [glue_qqp] are two word pairs the same words, in any order?
    a = r.sample(MOODS, 2)
    b = r.sample(a, 2)
    same = r.random() < 0.5
    if not same:
        b[r.randrange(2)] = _other(r, MOODS, a)
    return Example(f"a: {' '.join(a)}. b: {' '.join(b)}. same?", "yes" if same else "no", ("no", "yes"))


def _entailment(r):  # [mnli] does the premise entail, contradict or not decide the hypothesis?
    names, values, premise = _facts(r, 2)
    i, kind = r.randrange(2), r.randrange(3)
    if kind == 0:
        hyp, label = f"{names[i]}={values[i]}", "yes"
    elif kind == 1:
        hyp, label = f"{names[i]}={_other(r, DIGITS, values[i])}", "no"
    else:
        hyp, label = f"{_other(r, NAMES, names)}={values[i]}", "maybe"
    return Example(f"{premise} so {hyp}?", label, ("yes", "maybe", "no"))


def _pronoun(r):  # [definite_pronoun_resolution] who does the pronoun refer to?
    pair = [r.choice(FEMALE), r.choice(MALE)]
    r.shuffle(pair)
    who = r.choice(pair)
    pronoun = "she" if who in FEMALE else "he"
    verb = r.choice(VERBS)
    return Example(f"{pair[0]} met {pair[1]} and {pronoun} {verb}. {pronoun} is", who, tuple(pair))


def _largest(r):  # [arc_challenge] pick the largest of four digits
    ds = r.sample(DIGITS, 4)
    return Example(f"max of {' '.join(ds)}:", max(ds), tuple(ds))


def _continuation(r):  # [hellaswag] which ending continues the pattern?
    pattern = "".join(r.sample(LETTERS, 3))
    n = r.randrange(4, 8)
    text, ending = (pattern * 4)[:n], (pattern * 4)[n : n + 3]
    options = {ending}
    while len(options) < 4:
        options.add("".join(r.sample(pattern, 3)) if r.random() < 0.7 else "".join(r.sample(LETTERS, 3)))
    return Example(f"go on: {text}", ending, tuple(sorted(options)))


def _who_has(r):  # [cosmos_qa] reading comprehension: who has the value?
    names, values, facts = _facts(r, 2, distinct_values=True)
    i = r.randrange(2)
    others = r.sample([n for n in NAMES if n not in names], 2)
    return Example(f"{facts} who has {values[i]}?", names[i], tuple(sorted(names + others)))


def _what_has(r):  # [squad_v1] extractive QA, free-form answer
    names, values, facts = _facts(r, 2)
    i = r.randrange(2)
    return Example(f"{facts} what has {names[i]}?", values[i])


SYNTHETIC_TASKS = {
    "sentiment": _sentiment,
    "duplicate": _duplicate,
    "entailment": _entailment,
    "pronoun": _pronoun,
    "largest": _largest,
    "continuation": _continuation,
    "who_has": _who_has,
    "what_has": _what_has,
}


def synthetic_tasks(n: int, seed: int = 0) -> dict[str, list[Example]]:
    """n examples of every synthetic task, no two with the same prompt (so no train, val and test split can
    share one), deterministic for a seed, keyed by task name. Draw i of a task is seeded "<seed>/<task>/<i>"; a
    prompt already drawn is skipped. DataError if a task has fewer than n distinct prompts in 20 n draws (the
    smallest, pronoun, has 1,152)."""
    tasks = {}
    for name, make in SYNTHETIC_TASKS.items():
        seen: dict[str, Example] = {}
        for i in range(20 * n):
            if len(seen) == n:
                break
            example = make(random.Random(f"{seed}/{name}/{i}"))
            seen.setdefault(example.prompt, example)
        if len(seen) < n:
            raise DataError(f"synthetic task {name}: fewer than {n} distinct prompts in {20 * n} draws")
        tasks[name] = list(seen.values())
    return tasks


def _generic(r):  # one example of the world's generic skills, in one generic "q: ... a:" format
    kind = r.randrange(7)
    if kind == 0:
        w = r.choice(MOODS)
        return Example(f"q: mood of {w}?", "positive" if w in POSITIVE else "negative")
    if kind == 1:
        n = r.choice(NAMES)
        return Example(f"q: pronoun of {n}?", "she" if n in FEMALE else "he")
    if kind == 2:
        names, values, facts = _facts(r, r.randrange(1, 4))
        i = r.randrange(len(names))
        return Example(f"{facts} q: {names[i]}?", values[i])
    if kind == 3:
        names, values, facts = _facts(r, r.randrange(1, 4), distinct_values=True)
        i = r.randrange(len(names))
        return Example(f"{facts} q: who is {values[i]}?", names[i])
    if kind == 4:
        a, b = r.sample(DIGITS, 2)
        return Example(f"q: larger of {a} {b}?", max(a, b))
    if kind == 5:
        pattern = "".join(r.sample(LETTERS, r.randrange(2, 4)))
        text = (pattern * 5)[: r.randrange(4, 9)]
        return Example(f"q: next of {text}?", (pattern * 5)[len(text) : len(text) + 3])
    a = r.sample(MOODS, 2)
    b = a[:] if r.random() < 0.5 else [a[0], _other(r, MOODS, a)]
    return Example(f"q: {' '.join(a)} = {' '.join(b)}?", "yes" if a == b else "no")


def public_corpus(n: int, r: random.Random) -> list[Example]:
    """n examples of the public pre-training mixture: the tasks' generic form (single-step skills:
    word polarity, name gender, lookup by name and by value, comparing two digits, continuing a pattern,
    equality of word lists), never a client task's own format or composition."""
    return [_generic(r) for _ in range(n)]
