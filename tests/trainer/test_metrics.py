import math
import urllib.request

import pytest

from bloomrun.trainer.config import PRESETS
from bloomrun.trainer.metrics import TrainerMetrics, flops_per_token, peak_flops, throughput


def test_flops_formula_reproduces_the_issues_1b3_figure():
    # Issue 3: 52.0k tokens/s at the 1.3B ablation shape is 472 model TFLOP/s.
    shape = PRESETS["1b3"]
    padded_vocab = 50304
    h, layers = shape.hidden_size, shape.num_layers
    per_layer = 12 * h * h + 13 * h  # QKV + dense + 4h MLP weights, biases, two LayerNorms
    params = layers * per_layer + padded_vocab * h + 4 * h  # + embedding, embedding LN, ln_f
    rate = throughput(52_000, 25, 1.0, 1, flops_per_token(params, shape), 989e12)
    assert rate.tflops_per_device == pytest.approx(472, rel=0.01)
    assert rate.mfu == pytest.approx(472 / 989, rel=0.01)


def test_throughput_is_global_rate_and_per_device_flops():
    rate = throughput(tokens=8000, samples=4, seconds=2.0, num_devices=4, flops_token=1e9, peak=1e12)
    assert rate.tokens_per_second == 4000 and rate.samples_per_second == 2
    assert rate.tflops_per_device == pytest.approx(4000 * 1e9 / 4 / 1e12)
    assert rate.mfu == pytest.approx(1.0)


def test_peak_by_device_name_and_nan_on_cpu(monkeypatch):
    monkeypatch.delenv("BLOOMRUN_PEAK_TFLOPS", raising=False)
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert math.isnan(peak_flops("cpu", "fp32"))
    assert math.isnan(throughput(1, 1, 1.0, 1, 1.0, math.nan).mfu)
    monkeypatch.setenv("BLOOMRUN_PEAK_TFLOPS", "2.5")
    assert peak_flops("cpu", "fp32") == 2.5e12


def test_metrics_are_served_on_a_free_port_named_in_the_port_file(tmp_path):
    metrics = TrainerMetrics("ns", "run-a", node_rank=1)
    metrics.step.set(7)
    metrics.loss.set(math.nan)
    port = metrics.serve(0, str(tmp_path / "metrics-port"))
    assert int((tmp_path / "metrics-port").read_text()) == port > 0
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'bloomrun_train_step{namespace="ns",node_rank="1",run="run-a"} 7.0' in text
    assert 'bloomrun_train_loss{namespace="ns",node_rank="1",run="run-a"} NaN' in text
    assert "bloomrun_gpu_memory_bytes" not in text


def test_run_totals_are_exposed_as_counters_of_what_this_process_adds():
    """A counter starts at 0 with its process: a resumed run's restored totals must not
    arrive as one huge increase, and a rollback (totals going back) is no negative one."""
    from prometheus_client import generate_latest

    metrics = TrainerMetrics("team", "arm", 0)

    def exposed(name: str) -> float:
        line = next(l for l in generate_latest(metrics.registry).decode().splitlines()
                    if l.startswith(name + "{"))
        return float(line.rsplit(" ", 1)[1])

    text = generate_latest(metrics.registry).decode()
    for name in ("tokens", "skipped_steps", "rollbacks"):
        assert f"# TYPE bloomrun_train_{name}_total counter" in text
    metrics.start_totals(tokens=10_000, skipped_steps=2, rollbacks=1)  # resumed from a checkpoint
    assert exposed("bloomrun_train_tokens_total") == 0
    metrics.skipped_steps.set(3)  # a skip at the first step after the start counts
    metrics.tokens.set(10_512)
    metrics.tokens.set(9_000)  # a rollback restores an older checkpoint's total
    metrics.tokens.set(9_512)
    assert exposed("bloomrun_train_tokens_total") == 1024
    assert exposed("bloomrun_train_skipped_steps_total") == 1
    assert exposed("bloomrun_train_rollbacks_total") == 0
