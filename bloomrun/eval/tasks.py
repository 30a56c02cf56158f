"""bloomrun's own lm-eval tasks, made from the shipped example corpora's generator.

Nothing is downloaded: the documents come from bloomrun.trainer.data.synthetic with random
streams of their own (examples/data was drawn from `<corpus>:2022`, scripts/make_demo_data.py),
so the tasks are in-distribution for a model trained on the examples, not its training text.
Each task is an lm-eval YAML with `dataset_path: json` over a local .jsonl, registered with
`TaskManager(include_path=FOLDER)`:

- bloomrun_stories_order (multiple choice, 4): a story's opening, then its next sentence or
  one of three word-shuffles of that sentence. Every choice has the same tokens-as-words, so
  a unigram model (or an untrained one) is at chance: only word order tells them apart.
- bloomrun_arithmetic (multiple choice, 4): "a + b =" with the answer and three near misses.
- bloomrun_stories_ppl (loglikelihood_rolling): whole stories; word/byte perplexity and
  bits per byte, the perplexity-style measure.

`python -m bloomrun.eval.tasks DIR` writes them into DIR (a cluster's task data volume).
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from bloomrun.trainer.data.synthetic import arithmetic_line, story

NUM_DOCS = 200
SEED = "bloomrun-eval-1"
NUM_CHOICES = 4


def stories_order_doc(rng: random.Random) -> dict:
    sentences = split_sentences(story(rng))
    # Two or three sentences of context: with the answer, about 50 tokens, inside the tiny
    # example's 64-token training window.
    cut = rng.randint(2, 3)
    answer = sentences[cut]
    words = answer.split()
    choices = [answer]
    while len(choices) < NUM_CHOICES:
        shuffled = " ".join(rng.sample(words, len(words)))
        if shuffled not in choices:
            choices.append(shuffled)
    rng.shuffle(choices)
    return {"context": " ".join(sentences[:cut]), "choices": choices, "label": choices.index(answer)}


def split_sentences(text: str) -> list[str]:
    """The generator ends every sentence with '. ' and uses no other full stop."""
    return [s if s.endswith(".") else s + "." for s in text.split(". ")]


def arithmetic_doc(rng: random.Random) -> dict:
    question, answer = arithmetic_line(rng).split(" = ")
    value = int(answer)
    choices = {value}
    while len(choices) < NUM_CHOICES:
        miss = value + rng.choice((-1, 1)) * rng.randint(1, 10)
        if miss >= 0:
            choices.add(miss)
    order = sorted(choices, key=lambda _: rng.random())
    return {"context": f"{question} =", "choices": [str(c) for c in order], "label": order.index(value)}


def stories_ppl_doc(rng: random.Random) -> dict:
    return {"text": story(rng)}


MULTIPLE_CHOICE = {
    "output_type": "multiple_choice",
    "doc_to_text": "{{context}}",
    "doc_to_choice": "choices",
    "doc_to_target": "label",
    "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                    {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}],
}
ROLLING = {
    "output_type": "loglikelihood_rolling",
    "doc_to_text": "",
    "doc_to_target": "{{text}}",
    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"}, {"metric": "bits_per_byte"}],
}

# task name -> (document maker, the task's lm-eval settings)
TASKS: dict[str, tuple[Callable[[random.Random], dict], dict]] = {
    "bloomrun_stories_order": (stories_order_doc, MULTIPLE_CHOICE),
    "bloomrun_arithmetic": (arithmetic_doc, MULTIPLE_CHOICE),
    "bloomrun_stories_ppl": (stories_ppl_doc, ROLLING),
}


def build_docs(name: str, num_docs: int = NUM_DOCS) -> list[dict]:
    """The task's documents: the same on every machine (random.Random is seeded by name)."""
    make, _settings = TASKS[name]
    rng = random.Random(f"{SEED}:{name}")
    return [make(rng) for _ in range(num_docs)]


def build_task_yaml(name: str, data_file: Path) -> dict:
    """The lm-eval task config for `name` over a local .jsonl (an absolute path: the json
    loader resolves relative ones against the working directory, not the YAML)."""
    _make, settings = TASKS[name]
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file.resolve())}},
        "test_split": "test",
        **settings,
        "metadata": {"version": 1.0},
    }


def write_tasks(folder: Path, names: list[str] | None = None) -> list[str]:
    """Write NAME.jsonl and NAME.yaml for each task into `folder`; returns the names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(TASKS) if names is None else names
    for name in names:
        data = folder / f"{name}.jsonl"
        data.write_text("".join(json.dumps(doc) + "\n" for doc in build_docs(name)))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(build_task_yaml(name, data), sort_keys=False))
    return names


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bloomrun.eval.tasks DIR")
    print("\n".join(write_tasks(Path(sys.argv[1]))))
