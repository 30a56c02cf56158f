"""`bloomctl data prepare`: tokenize JSONL or text into Megatron-DeepSpeed's .bin/.idx."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bloomrun.cli.main import UserError


def add_parser(subparsers) -> None:
    data = subparsers.add_parser(
        "data", help="prepare pretokenized data (Megatron-DeepSpeed .bin/.idx)",
        description="Pretokenized training data in Megatron-DeepSpeed's .bin/.idx format, which "
                    "the trainer reads unchanged (docs/data.md).")
    actions = data.add_subparsers(dest="data_command", required=True, metavar="ACTION",
                                  title="actions")
    prepare = actions.add_parser(
        "prepare", help="tokenize a .jsonl or .txt file into PREFIX.bin and PREFIX.idx",
        description="One document per JSON line (its text field) or per blank-line-separated "
                    "block of a text file. Token ids are stored as uint16 when the vocabulary "
                    "fits, else int32, exactly as Megatron-DeepSpeed's preprocess_data.py does.")
    prepare.add_argument("--input", required=True, type=Path, help=".jsonl or .txt file")
    prepare.add_argument("--tokenizer", required=True, type=Path, help="Hugging Face tokenizer.json")
    prepare.add_argument("--output-prefix", required=True, type=Path,
                         help="writes OUTPUT_PREFIX.bin and OUTPUT_PREFIX.idx")
    prepare.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    prepare.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto",
                         help="input format; auto goes by the file suffix")
    prepare.add_argument("--append-eod", action="store_true",
                         help="end every document with the end-of-document token (needed for GPT training)")
    prepare.add_argument("--eod-token", default=None,
                         help="the end-of-document token (default: the first of <|endoftext|>, </s>, <eod>)")
    prepare.set_defaults(func=run_prepare)

    tokenizer = actions.add_parser(
        "tokenizer", help="train a byte-level BPE tokenizer.json from .jsonl or .txt files, offline",
        description="Learns a byte-level BPE (as BLOOM's tokenizer is) with BLOOM's special tokens "
                    "<unk> <s> </s> <pad>, from documents read as data prepare reads them. The "
                    "model's vocabSize must be at least the size reached.")
    tokenizer.add_argument("--input", required=True, type=Path, action="append",
                           help=".jsonl or .txt file (repeat for several)")
    tokenizer.add_argument("--vocab-size", required=True, type=int, help="tokens in all, special ones included")
    tokenizer.add_argument("--output", required=True, type=Path, help="tokenizer.json to write")
    tokenizer.add_argument("--json-key", default="text", help="JSONL field holding the text (default: text)")
    tokenizer.add_argument("--format", choices=["auto", "jsonl", "text"], default="auto",
                           help="input format; auto goes by the file suffix")
    tokenizer.add_argument("--max-documents", type=int, default=None,
                           help="learn from the first N documents only (default: all)")
    tokenizer.set_defaults(func=run_tokenizer)


def run_tokenizer(args: argparse.Namespace) -> int:
    from bloomrun.trainer.data.indexed import DataError
    from bloomrun.trainer.data.tokenizer import train_tokenizer_file

    try:
        size = train_tokenizer_file(args.input, args.output, args.vocab_size, json_key=args.json_key,
                                    fmt=args.format, max_documents=args.max_documents)
    except DataError as err:
        raise UserError(str(err)) from None
    except UnicodeDecodeError as err:
        raise UserError(f"not UTF-8 text ({err.reason})") from None
    print(f"wrote {args.output}: {size} tokens (set the model's vocabSize to at least {size})")
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    from bloomrun.trainer.data.indexed import DataError
    from bloomrun.trainer.data.prepare import prepare_dataset

    try:
        summary = prepare_dataset(args.input, args.tokenizer, args.output_prefix, json_key=args.json_key,
                                  fmt=args.format, append_eod=args.append_eod, eod_token=args.eod_token)
    except DataError as err:
        raise UserError(str(err)) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{args.input}: not UTF-8 text ({err.reason})") from None
    if not args.append_eod:
        # Samples run across document boundaries; without an EOD the model never learns
        # where one document ends and the next, unrelated one begins.
        print("bloomctl data prepare: warning: no --append-eod: documents are not separated, "
              "which GPT-style training needs", file=sys.stderr)
    skipped = f", skipped {summary.num_skipped_empty} empty" if summary.num_skipped_empty else ""
    eod = f", EOD id {summary.eod_id} appended" if summary.eod_id is not None else ", no EOD"
    print(f"wrote {summary.num_documents} documents, {summary.num_tokens} tokens ({summary.dtype}{eod}"
          f"{skipped}) to {args.output_prefix}.bin and .idx")
    return 0
