"""Claim: the 1.3B ablation shape trains at >= 62k tokens/s (>= 560 model TFLOP/s) on one
H100 with ALiBi, through the trainer's real training step.

Each variant builds a real `Trainer` (DeepSpeed engine as the manifest configures it,
GuardedAdamW, the non-finite guard, the agreed all-reduce) over a synthetic dataset with
GPT-2's 50,257-token vocabulary and times `Trainer.train_steps` after warm-up. Variants:
Triton kernels vs torch kernels (SDPA with an ALiBi bias tensor), each eager and, where
asked, torch.compile'd. The anchor is transformers' BloomForCausalLM in a plain loop
(autocast bf16, fused AdamW), run in the same process.
    python -m bench.model_throughput --out results/model.json [--variants triton,torch,hf]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import report
from bloomrun.trainer.config import DataConfig, DataSource, ModelConfig, TrainerConfig, TrainingConfig
from bloomrun.trainer.data.indexed import best_fitting_dtype
from bloomrun.trainer.metrics import flops_per_token
from tests.trainer.data_helpers import random_documents, write_dataset

VOCAB = 50257


def trainer_config(data_prefix: Path, preset: str, kernels: str, compile_model: bool, micro_batch: int,
                   zero_stage: int) -> TrainerConfig:
    return TrainerConfig(
        model=ModelConfig(preset=preset, vocab_size=VOCAB if preset == "1b3" else None, position="alibi",
                          kernels=kernels),
        data=DataConfig(sources=[DataSource(path=str(data_prefix))]),
        training=TrainingConfig(global_batch_size=micro_batch, micro_batch_size=micro_batch, train_steps=10_000,
                                zero_stage=zero_stage, compile=compile_model),
    )


def time_trainer(cfg: TrainerConfig, warmup: int, steps: int) -> dict:
    from bloomrun.trainer import parallel
    from bloomrun.trainer.trainer import Trainer

    started = time.perf_counter()
    trainer = Trainer(cfg, serve_metrics=False)
    built = time.perf_counter()
    trainer.train_steps(warmup)
    warmed = time.perf_counter()
    seconds = trainer.train_steps(steps)
    shape = cfg.model.shape()
    tokens = cfg.training.micro_batch_size * shape.seq_length
    median = statistics.median(seconds)
    result = dict(
        # What the engine ran, not what was asked: a single rank always runs stage 0.
        zero_stage=parallel.zero_stage(cfg, trainer.world),
        tokens_per_s=tokens / median,
        model_tflops=tokens / median * trainer.flops_per_token / 1e12,
        step_ms_median=median * 1e3,
        step_ms_all=[s * 1e3 for s in seconds],
        parameters=trainer.num_parameters,
        build_s=built - started,
        warmup_s=warmed - built,
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None,
    )
    trainer.close()
    del trainer
    return result


def time_hf_bloom(preset_shape, micro_batch: int, warmup: int, steps: int) -> dict:
    """transformers' BloomForCausalLM, plain torch: autocast bf16, fp32 weights, fused AdamW."""
    from transformers import BloomConfig, BloomForCausalLM

    config = BloomConfig(vocab_size=VOCAB, hidden_size=preset_shape.hidden_size, n_layer=preset_shape.num_layers,
                         n_head=preset_shape.num_heads)
    model = BloomForCausalLM(config).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, VOCAB, (micro_batch, preset_shape.seq_length + 1), device="cuda")
    times = []
    for index in range(warmup + steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids[:, :-1], labels=ids[:, :-1]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    parameters = sum(p.numel() for p in model.parameters())
    median = statistics.median(times)
    tokens = micro_batch * preset_shape.seq_length
    del model, optimizer
    return dict(tokens_per_s=tokens / median, step_ms_median=median * 1e3, parameters=parameters,
                model_tflops=tokens / median * flops_per_token(parameters, preset_shape) / 1e12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--preset", default="1b3")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--zero-stage", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--variants", default="triton,torch,hf",
                        help="comma list of triton, torch, triton-compile, torch-compile, hf")
    args = parser.parse_args()

    shape = ModelConfig(preset=args.preset, vocab_size=VOCAB if args.preset == "1b3" else None).shape()
    results = dict(preset=args.preset, micro_batch=args.micro_batch, zero_stage_asked=args.zero_stage,
                   seq_length=shape.seq_length, targets=dict(tokens_per_s=62_000, model_tflops=560))
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "random_text_document"
        write_dataset(prefix, random_documents(64, shape.seq_length + 1, shape.vocab_size), best_fitting_dtype(shape.vocab_size))
        for variant in args.variants.split(","):
            try:
                if variant == "hf":
                    results[variant] = time_hf_bloom(shape, args.micro_batch, args.warmup, args.steps)
                else:
                    kernels, _, compiled = variant.partition("-")
                    cfg = trainer_config(prefix, args.preset, kernels, compiled == "compile", args.micro_batch,
                                         args.zero_stage)
                    results[variant] = time_trainer(cfg, args.warmup, args.steps)
            except Exception as error:  # one failing variant must not lose the others' figures
                results[variant] = dict(error=repr(error)[:500])
            print(variant, results[variant], flush=True)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
    for name in ("torch", "hf", "torch-compile"):
        if "tokens_per_s" in results.get(name, {}) and "tokens_per_s" in results.get("triton", {}):
            results[f"speedup_triton_vs_{name}"] = results["triton"]["tokens_per_s"] / results[name]["tokens_per_s"]
    report("model_throughput", results, args.out)


if __name__ == "__main__":
    main()
