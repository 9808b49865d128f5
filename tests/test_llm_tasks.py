"""llm_tasks: the synthetic client tasks and the public corpus are deterministic, well formed, disjoint, and
every answer is the right one (recomputed here from the prompt text alone)."""

import random
import re

import pytest

from potara_harness.llm_tasks import FEMALE, POSITIVE, public_corpus, synthetic_tasks


def test_synthetic_tasks_are_deterministic_and_well_formed():
    a, b = synthetic_tasks(30, seed=3), synthetic_tasks(30, seed=3)
    assert a == b and len(a) == 8
    for name, examples in a.items():
        assert len(examples) == 30 and len({e.prompt for e in examples}) == 30, name  # distinct prompts
        for e in examples:
            assert e.options is None or e.answer in e.options
    pub = public_corpus(50, random.Random(0))
    client_prompts = {e.prompt for exs in a.values() for e in exs}
    assert not client_prompts & {e.prompt for e in pub}  # the public corpus never holds a client task's format


def facts(prompt: str) -> dict[str, str]:
    return dict(re.findall(r"([a-z]+)=(\d)", prompt.split(".")[0]))


def answer_from_prompt(task: str, p: str) -> str:
    """The answer of a client task, read off its prompt by rules written independently of llm_tasks."""
    words = p.replace(".", " ").replace(":", " ").replace("?", " ").split()
    if task == "sentiment":
        return "positive" if sum(w in POSITIVE for w in words[1:4]) >= 2 else "negative"
    if task == "duplicate":
        return "yes" if sorted(words[1:3]) == sorted(words[4:6]) else "no"
    if task == "entailment":
        name, value = re.search(r"so ([a-z]+)=(\d)\?", p).groups()
        known = facts(p)
        return "maybe" if name not in known else "yes" if known[name] == value else "no"
    if task == "pronoun":
        first, second, pronoun = words[0], words[2], words[4]
        return first if (first in FEMALE) == (pronoun == "she") else second
    if task == "largest":
        return max(words[2:6])
    if task == "continuation":
        text = words[2]
        period = next(k for k in range(1, len(text) + 1) if all(text[i] == text[i % k] for i in range(len(text))))
        return "".join(text[(len(text) + i) % period] for i in range(3))
    if task == "who_has":
        return {v: n for n, v in facts(p).items()}[re.search(r"who has (\d)", p).group(1)]
    return facts(p)[re.search(r"what has ([a-z]+)\?", p).group(1)]


def test_every_synthetic_answer_follows_from_its_prompt():
    for task, examples in synthetic_tasks(200, seed=5).items():
        for e in examples:
            assert e.answer == answer_from_prompt(task, e.prompt), (task, e)


def test_synthetic_tasks_hold_distinct_prompts_up_to_the_bound_and_say_when_they_cannot():
    from potara_harness.config import MAX_SYNTHETIC_EXAMPLES
    from potara_harness.llm_data import DataError

    tasks = synthetic_tasks(MAX_SYNTHETIC_EXAMPLES, seed=1234)
    assert all(len({e.prompt for e in exs}) == MAX_SYNTHETIC_EXAMPLES for exs in tasks.values())
    with pytest.raises(DataError, match="synthetic task pronoun: fewer than 1200 distinct prompts"):
        synthetic_tasks(1200, seed=1234)  # pronoun has 2 x 6 x 6 pairs x 2 pronouns x 8 verbs = 1,152
