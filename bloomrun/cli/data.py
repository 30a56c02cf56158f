"""`bloomctl data prepare`: tokenize JSONL or text into Megatron-DeepSpeed's .bin/.idx."""

from __future__ import annotations

import argparse
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
    skipped = f", skipped {summary.num_skipped_empty} empty" if summary.num_skipped_empty else ""
    eod = f", EOD id {summary.eod_id} appended" if summary.eod_id is not None else ", no EOD"
    print(f"wrote {summary.num_documents} documents, {summary.num_tokens} tokens ({summary.dtype}{eod}"
          f"{skipped}) to {args.output_prefix}.bin and .idx")
    return 0
