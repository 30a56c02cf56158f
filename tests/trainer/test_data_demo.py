"""The demo data shipped in examples/data/: reproducible from the generator, valid for the
tiny preset, and faithful to the text it was made from."""

import operator
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bloomrun.trainer.config import PRESETS, DataConfig, DataSource
from bloomrun.trainer.data import MMapIndexedDataset, build_train_samples, validate_data
from bloomrun.trainer.resolve import resolve_data

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "examples" / "data"
OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
FILES = ["tokenizer.json", "stories_text_document.bin", "stories_text_document.idx",
         "arithmetic_text_document.bin", "arithmetic_text_document.idx"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(DEMO / "tokenizer.json"))


def test_committed_demo_data_is_what_the_generator_makes(tmp_path):
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_demo_data.py"), "--output-dir", str(tmp_path)],
                   check=True, capture_output=True)
    for name in FILES:
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), \
            f"examples/data/{name} differs from scripts/make_demo_data.py's output: rerun it and commit"


def test_demo_data_fits_the_tiny_preset_and_lasts_the_demo(tokenizer):
    tiny = PRESETS["tiny"]
    assert tokenizer.get_vocab_size() <= tiny.vocab_size
    cfg = DataConfig(sources=[DataSource(path="stories_text_document"), DataSource(path="arithmetic_text_document")],
                     tokenizer="tokenizer.json")
    cfg = resolve_data(cfg, DEMO)
    validate_data(cfg, tiny.vocab_size, seq_length=tiny.seq_length)
    samples = build_train_samples(cfg, tiny.seq_length)
    # 300 steps of 16 samples should mostly see fresh samples.
    assert sum(len(s) for s in samples.sources) >= 300 * 16 * 0.75


def test_every_shipped_equation_decodes_and_is_correct(tokenizer):
    ds = MMapIndexedDataset(DEMO / "arithmetic_text_document")
    eod = tokenizer.token_to_id("</s>")
    checked = 0
    for i in range(0, len(ds), 37):
        ids = ds[i].tolist()
        assert ids[-1] == eod and eod not in ids[:-1]
        for line in tokenizer.decode(ids[:-1]).split("\n"):
            a, op, b, result = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (\d+)", line).groups()
            assert OPERATORS[op](int(a), int(b)) == int(result)
            checked += 1
    assert checked > 300


def test_stories_decode_to_sentences(tokenizer):
    ds = MMapIndexedDataset(DEMO / "stories_text_document")
    text = tokenizer.decode(ds[5].tolist())
    assert re.fullmatch(r"[A-Z][a-z]+ had a [a-z]+ [a-z]+\. .*\.", text)
