"""Zero-shot evaluation with EleutherAI's lm-evaluation-harness, the paper's measure.

adapter.py is the lm-eval LM over bloomrun's own model; tasks.py writes bloomrun's own task
files from the example corpora; runner.py runs lm-eval on a checkpoint and summarises its
results (per-task accuracy, the mean, the random-baseline-normalised mean). Only this package
imports lm_eval (see docs/eval.md).
"""
