#!/usr/bin/env python3
"""Regenerate examples/data/: the demo's tokenizer and its two pretokenized corpora.

    .venv/bin/python scripts/make_demo_data.py [--output-dir examples/data]

Deterministic: the same code and pinned libraries give the same bytes, which
tests/trainer/test_data_demo.py checks against what is committed. The corpora go through
the same code path as `bloomctl data prepare` (JSONL -> tokenizer -> .bin/.idx).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bloomrun.trainer.data.prepare import prepare_dataset  # noqa: E402
from bloomrun.trainer.data.synthetic import generate  # noqa: E402
from bloomrun.trainer.data.tokenizer import train_bpe  # noqa: E402

SEED = 2022  # the year BLOOM was trained
# Documents per corpus: ~320k tokens in all, about one pass at the demo's 300 steps of
# 16 x 64 tokens, so the loss it shows is mostly on text it has not seen before.
NUM_DOCUMENTS = {"stories": 2000, "arithmetic": 1500}
VOCAB_SIZE = 1024  # the tiny preset's vocabSize
TOKENIZER_SAMPLE = 2000  # documents per corpus the tokenizer learns its merges from


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    parser.add_argument("--output-dir", type=Path, default=Path(__file__).resolve().parents[1] / "examples/data")
    args = parser.parse_args(argv)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    corpora = {name: list(generate(name, count, SEED)) for name, count in NUM_DOCUMENTS.items()}
    tokenizer = train_bpe([doc for docs in corpora.values() for doc in docs[:TOKENIZER_SAMPLE]], VOCAB_SIZE)
    tokenizer_path = args.output_dir / "tokenizer.json"
    tokenizer.save(str(tokenizer_path), pretty=True)

    with tempfile.TemporaryDirectory() as scratch:
        for name, docs in corpora.items():
            jsonl = Path(scratch) / f"{name}.jsonl"
            jsonl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
            summary = prepare_dataset(jsonl, tokenizer_path, args.output_dir / f"{name}_text_document",
                                      append_eod=True)
            print(f"{name}: {summary.num_documents} documents, {summary.num_tokens} tokens ({summary.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
