"""From the manifest's data section to samples: paths, and every check made before any
worker starts."""

import numpy as np
import pytest

from bloomrun.trainer.config import DataConfig, DataSource
from bloomrun.trainer.data import DataError, build_train_samples, validate_data
from bloomrun.trainer.resolve import resolve_data

from .data_helpers import labelled_documents, write_dataset


def config(*paths, tokenizer=None, weights=None, base_dir=None):
    """Relative paths resolved against `base_dir` (the corpora fixture), as a launcher does."""
    weights = weights or [1.0] * len(paths)
    cfg = DataConfig(sources=[DataSource(path=p, weight=w) for p, w in zip(paths, weights)], tokenizer=tokenizer)
    return resolve_data(cfg, base_dir) if base_dir else cfg


@pytest.fixture
def corpora(tmp_path):
    write_dataset(tmp_path / "a", [np.arange(100) % 50])
    write_dataset(tmp_path / "sub" / "b", [np.arange(100) % 90])
    return tmp_path


def test_relative_paths_resolve_against_base_dir_absolute_ones_do_not(corpora):
    cfg = config("a", str(corpora / "sub" / "b"), weights=[3, 1], base_dir=corpora)
    validate_data(cfg, vocab_size=90, seq_length=8)
    samples = build_train_samples(cfg, 8)
    assert samples.names == ["a", "b"] and samples.weights.tolist() == [0.75, 0.25]
    assert samples[0].shape == (9,)


def test_missing_source_names_the_manifest_entry_and_file(corpora):
    with pytest.raises(DataError, match=r"data.sources\[1\] \(missing\): .*missing: no dataset here \(neither missing.bin nor missing.idx"):
        validate_data(config("a", "missing", base_dir=corpora), vocab_size=100)
    with pytest.raises(DataError, match=r"data.sources\[1\]"):
        build_train_samples(config("a", "missing", base_dir=corpora), 8)


def test_corrupt_source_is_reported_before_training(corpora):
    (corpora / "a.idx").write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match=r"data.sources\[0\] \(a\): .*a.idx: bad magic"):
        validate_data(config("a", base_dir=corpora), vocab_size=100)


def test_token_id_beyond_the_vocabulary(corpora):
    with pytest.raises(DataError, match=r"data.sources\[1\] \(b\): .*b.bin: token id 89 is not below "
                                        r"the model's vocabSize 64"):
        validate_data(config("a", "sub/b", base_dir=corpora), vocab_size=64)


def test_too_short_for_the_sequence_length(corpora):
    with pytest.raises(DataError, match="100 tokens is too few for one sample of 129 tokens"):
        validate_data(config("a", base_dir=corpora), vocab_size=100, seq_length=128)
    with pytest.raises(DataError, match=r"data.sources\[0\] \(a\): .*too few"):
        build_train_samples(config("a", base_dir=corpora), 128)


def test_empty_source(corpora):
    write_dataset(corpora / "empty", [])
    with pytest.raises(DataError, match="empty.bin: holds no tokens"):
        validate_data(config("empty", base_dir=corpora), vocab_size=100)


def test_tokenizer_larger_than_the_model_vocabulary(corpora):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0")).save(str(corpora / "tok.json"))
    validate_data(config("a", tokenizer="tok.json", base_dir=corpora), vocab_size=300)
    with pytest.raises(DataError, match="tok.json has 300 tokens, more than the model's vocabSize 256"):
        validate_data(config("a", tokenizer="tok.json", base_dir=corpora), vocab_size=256)
    with pytest.raises(DataError, match="data.tokenizer: .*nope.json: no such file"):
        validate_data(config("a", tokenizer="nope.json", base_dir=corpora), vocab_size=256)


def test_two_sources_on_one_file_are_shuffled_differently(corpora):
    write_dataset(corpora / "c", labelled_documents(40, seed=0))
    samples = build_train_samples(config("c", "c", base_dir=corpora), 8)
    first = [samples.locate(i) for i in range(20)]
    by_source = [[samples[i] for i, (s, _) in enumerate(first) if s == k][:5] for k in (0, 1)]
    assert not all(np.array_equal(x, y) for x, y in zip(*by_source))
