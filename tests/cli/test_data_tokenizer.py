"""`bloomctl data tokenizer`: a tokenizer trained offline that `data prepare` and the model use,
and the warning `data prepare` gives without --append-eod."""

import json
from pathlib import Path

from bloomrun.cli.main import main
from bloomrun.trainer.data import MMapIndexedDataset
from bloomrun.trainer.data.synthetic import generate

DEMO_TOKENIZER = Path(__file__).resolve().parents[2] / "examples" / "data" / "tokenizer.json"


def write_corpus(path: Path, count: int) -> Path:
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in generate("stories", count, 7)))
    return path


def test_trains_a_tokenizer_that_prepare_uses_and_round_trips_text(tmp_path, capsys):
    from tokenizers import Tokenizer

    corpus = write_corpus(tmp_path / "c.jsonl", 200)
    out = tmp_path / "tok" / "tokenizer.json"
    assert main(["data", "tokenizer", "--input", str(corpus), "--vocab-size", "400", "--output", str(out)]) == 0
    size = int(capsys.readouterr().out.split(": ")[1].split()[0])
    tokenizer = Tokenizer.from_file(str(out))
    assert 260 < size <= 400 and tokenizer.get_vocab_size() == size
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<unk>", "<s>", "</s>", "<pad>"]
    text = "Zoë's 17 kites: ünïcode too"  # unseen characters still encode (byte level, no <unk>)
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert 0 not in ids and tokenizer.decode(ids) == text

    assert main(["data", "prepare", "--input", str(corpus), "--tokenizer", str(out),
                 "--output-prefix", str(tmp_path / "d"), "--append-eod"]) == 0
    ds = MMapIndexedDataset(tmp_path / "d")
    assert len(ds) == 200 and int(ds[0][-1]) == 2  # </s> ends every document


def test_same_settings_as_the_demo_give_the_demo_tokenizer(tmp_path):
    """scripts/make_demo_data.py trains examples/data/tokenizer.json through the same function."""
    import subprocess
    import sys

    repo = DEMO_TOKENIZER.parents[2]
    subprocess.run([sys.executable, str(repo / "scripts/make_demo_data.py"), "--output-dir", str(tmp_path)],
                   check=True, capture_output=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == DEMO_TOKENIZER.read_bytes()


def test_bad_inputs_are_one_line_errors_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "tokenizer.json"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    for args, message in [
        (["--input", str(tmp_path / "nope.jsonl"), "--vocab-size", "400"], "no such input file"),
        (["--input", str(write_corpus(tmp_path / "c.jsonl", 5)), "--vocab-size", "100"], "below 260"),
        (["--input", str(empty), "--vocab-size", "400"], "no documents to learn from"),
    ]:
        assert main(["data", "tokenizer", *args, "--output", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_prepare_warns_without_append_eod(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.jsonl", 3)
    common = ["data", "prepare", "--input", str(corpus), "--tokenizer", str(DEMO_TOKENIZER)]
    assert main([*common, "--output-prefix", str(tmp_path / "a")]) == 0
    assert "no --append-eod" in capsys.readouterr().err
    assert main([*common, "--output-prefix", str(tmp_path / "b"), "--append-eod"]) == 0
    assert "warning" not in capsys.readouterr().err
