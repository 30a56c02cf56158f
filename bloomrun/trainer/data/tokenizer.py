"""Training a tokenizer offline: what `bloomctl data tokenizer` runs, and how the demo's
tokenizer (examples/data/tokenizer.json, scripts/make_demo_data.py) was made.

Byte-level BPE, as BLOOM's tokenizer is, so any text encodes without `<unk>`; BLOOM's
special tokens in BLOOM's order, `</s>` (id 2) ending every document under
`data prepare --append-eod`. The `tokenizers` library trains it on this machine's cores;
nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import chain, islice
from pathlib import Path

from .indexed import DataError
from .prepare import read_documents

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
# Below this a byte-level BPE has no room for merges: 256 byte symbols + the special tokens.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE tokenizer learnt from `texts`, at most `vocab_size` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(f"vocabulary size {vocab_size} is below {MIN_VOCAB_SIZE} "
                        "(256 byte symbols and the special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def train_tokenizer_file(inputs: list[Path], output: Path, vocab_size: int, *, json_key: str = "text",
                         fmt: str = "auto", max_documents: int | None = None) -> int:
    """Train on the documents of `inputs` (read as `data prepare` reads them) and write
    `output` atomically; returns the vocabulary size reached."""
    for path in inputs:  # every input is checked before minutes of training start
        read_documents(path, fmt, json_key)
    texts = chain.from_iterable(read_documents(path, fmt, json_key) for path in inputs)
    seen = []

    def counted(stream: Iterable[str]) -> Iterable[str]:
        for text in stream:
            seen.append(None)
            yield text

    tokenizer = train_bpe(counted(islice(texts, max_documents)), vocab_size)
    if not seen:
        raise DataError(f"{', '.join(map(str, inputs))}: no documents to learn from")
    reached = tokenizer.get_vocab_size(with_added_tokens=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tokenizer.save(str(tmp), pretty=True)
    tmp.replace(output)  # a reader sees the old file or the new one, never half of one
    return reached
