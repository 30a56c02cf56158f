"""Log-likelihood requests per second: bloomrun's lm-eval adapter vs lm-eval's HFLM.

The claim (issue 13): the adapter over bloomrun's own model is not slower than HFLM on the
same weights exported to BloomForCausalLM, same process, same requests (bloomrun_stories_order:
a story's opening and four candidate next sentences), same batch size. Shapes: tiny and 560m
(random weights: throughput does not depend on them). Each side runs `rounds` times,
alternating, after one warm-up pass; the best round counts (the machine is shared).

    .venv/bin/python bench/eval_throughput.py --shape tiny --docs 64
    .venv/bin/python bench/eval_throughput.py --shape 560m --docs 8 --rounds 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bloomrun.cli.export import copy_tokenizer, special_token_ids  # noqa: E402
from bloomrun.eval.adapter import BloomLM  # noqa: E402
from bloomrun.eval.tasks import build_docs  # noqa: E402
from bloomrun.trainer.config import ModelConfig  # noqa: E402
from bloomrun.trainer.export import export_hf  # noqa: E402
from bloomrun.trainer.model import build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "examples" / "data" / "tokenizer.json"


def build_requests(num_docs: int):
    from lm_eval.api.instance import Instance

    requests = []
    for doc in build_docs("bloomrun_stories_order", num_docs):
        for choice in doc["choices"]:
            requests.append(Instance("loglikelihood", doc, (doc["context"], " " + choice), len(requests)))
    return requests


def requests_per_second(lm, requests) -> float:
    started = time.perf_counter()
    lm.loglikelihood(requests, disable_tqdm=True)
    return len(requests) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="tiny", help="a model preset: tiny, 560m, ...")
    parser.add_argument("--docs", type=int, default=64, help="documents (4 requests each)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    cfg = ModelConfig(preset=args.shape, kernels="torch")
    model = build_model(cfg).eval()
    requests = build_requests(args.docs)
    with tempfile.TemporaryDirectory() as folder:
        export_hf(model, cfg, folder, **special_token_ids(TOKENIZER))
        copy_tokenizer(TOKENIZER, Path(folder), cfg.shape().seq_length)
        sides = {
            "bloomrun adapter": BloomLM(model, TOKENIZER, batch_size=args.batch_size),
            "lm-eval HFLM": HFLM(pretrained=folder, batch_size=args.batch_size, device="cpu", dtype="float32"),
        }
        warm = build_requests(2)
        for lm in sides.values():
            lm.loglikelihood(warm, disable_tqdm=True)
        figures = {name: [] for name in sides}
        for _ in range(args.rounds):
            for name, lm in sides.items():
                figures[name].append(requests_per_second(lm, requests))
    best = {name: max(values) for name, values in figures.items()}
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "shape": args.shape, "requests": len(requests), "batch_size": args.batch_size,
        "requests_per_second": best, "all_rounds": figures,
        "adapter_over_hflm": best["bloomrun adapter"] / best["lm-eval HFLM"],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
