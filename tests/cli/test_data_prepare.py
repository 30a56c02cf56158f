"""`bloomctl data prepare`: JSONL and text in, Megatron .bin/.idx out, one-line errors."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bloomrun.cli.main import main
from bloomrun.trainer.data import MMapIndexedDataset

TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer.json"
TEXTS = ["Mia had a red ball.", "", "12 + 30 = 42\n7 * 6 = 42", "Tom went to the park with Max."]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(TOKENIZER))


def prepare(*args: str) -> int:
    return main(["data", "prepare", "--tokenizer", str(TOKENIZER), *args])


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_jsonl_round_trips_through_the_tokenizer(tmp_path, tokenizer, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": t, "id": i} for i, t in enumerate(TEXTS)])
    assert prepare("--input", str(source), "--output-prefix", str(tmp_path / "out" / "c"), "--append-eod") == 0
    assert "wrote 3 documents" in capsys.readouterr().out
    ds = MMapIndexedDataset(tmp_path / "out" / "c")
    assert ds.dtype == np.uint16  # a 1024-token vocabulary fits, as Megatron would pick
    eod = tokenizer.token_to_id("</s>")
    non_empty = [t for t in TEXTS if t]
    for i, text in enumerate(non_empty):
        ids = ds[i].tolist()
        assert ids == tokenizer.encode(text, add_special_tokens=False).ids + [eod]
        assert tokenizer.decode(ids[:-1]) == text


def test_text_blocks_are_documents_and_json_key_is_configurable(tmp_path, tokenizer):
    (tmp_path / "in.txt").write_text("first line\nsame doc\n\n\n  \nsecond doc\n\nthird\n")
    assert prepare("--input", str(tmp_path / "in.txt"), "--output-prefix", str(tmp_path / "t")) == 0
    ds = MMapIndexedDataset(tmp_path / "t")
    assert [tokenizer.decode(ds[i].tolist()) for i in range(len(ds))] == ["first line\nsame doc", "second doc", "third"]

    write_jsonl(tmp_path / "k.jsonl", [{"content": "hello world"}])
    assert prepare("--input", str(tmp_path / "k.jsonl"), "--json-key", "content",
                   "--output-prefix", str(tmp_path / "k")) == 0
    assert tokenizer.decode(MMapIndexedDataset(tmp_path / "k")[0].tolist()) == "hello world"


def test_bad_json_line_names_the_line_and_writes_nothing(tmp_path, capsys):
    source = tmp_path / "bad.jsonl"
    source.write_text('{"text": "ok"}\n\n{"text": "broken\n')
    assert prepare("--input", str(source), "--output-prefix", str(tmp_path / "o")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:3: bad JSON" in err
    assert list(tmp_path.glob("o.*")) == []


@pytest.mark.parametrize("lines,message", [
    (['{"txt": "x"}'], "bad.jsonl:1: no 'text' field"),
    (['{"text": 5}'], "bad.jsonl:1: 'text' is int, not a string"),
    (['["text"]'], "bad.jsonl:1: no 'text' field"),
])
def test_records_without_text(tmp_path, capsys, lines, message):
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    assert prepare("--input", str(tmp_path / "bad.jsonl"), "--output-prefix", str(tmp_path / "o")) == 2
    assert message in capsys.readouterr().err


def test_missing_input_and_unknown_format(tmp_path, capsys):
    assert prepare("--input", str(tmp_path / "nope.jsonl"), "--output-prefix", str(tmp_path / "o")) == 2
    assert "nope.jsonl: no such input file" in capsys.readouterr().err
    (tmp_path / "data.csv").write_text("a,b\n")
    assert prepare("--input", str(tmp_path / "data.csv"), "--output-prefix", str(tmp_path / "o")) == 2
    assert "cannot tell the format from '.csv'" in capsys.readouterr().err


def test_tokenizer_problems(tmp_path, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"text": "hi"}])
    out = str(tmp_path / "o")
    assert main(["data", "prepare", "--input", str(source), "--tokenizer", str(tmp_path / "missing.json"),
                 "--output-prefix", out]) == 2
    assert "missing.json: tokenizer not found" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["data", "prepare", "--input", str(source), "--tokenizer", str(tmp_path / "broken.json"),
                 "--output-prefix", out]) == 2
    assert "broken.json: not a tokenizers JSON file" in capsys.readouterr().err
    assert prepare("--input", str(source), "--output-prefix", out, "--append-eod", "--eod-token", "<|eot|>") == 2
    assert "no end-of-document token (<|eot|>)" in capsys.readouterr().err


def test_not_utf8(tmp_path, capsys):
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    assert prepare("--input", str(tmp_path / "latin.txt"), "--output-prefix", str(tmp_path / "o")) == 2
    assert "latin.txt: not UTF-8 text" in capsys.readouterr().err


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", "import sys; from bloomrun.cli.main import main; sys.exit(main())", "data", "prepare", "--input", str(tmp_path / "x.jsonl"),
         "--tokenizer", str(TOKENIZER), "--output-prefix", str(tmp_path / "o")],
        capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"bloomctl data: error: {tmp_path / 'x.jsonl'}: no such input file"]
