"""torch.compile over the model with kernels=triton: one graph, our kernels as custom ops.

A graph break per kernel call (what the autograd.Function path gives dynamo) would stop
Inductor from fusing the residual adds, bias adds and casts between kernels and rule out
CUDA graphs. So the micro model must compile with `fullgraph=True`, the compiled forward
and backward graphs must hold the `bloomrun::` ops (not the torch path traced silently),
and the loss and every gradient must equal the eager Triton run. `opcheck` is torch's own
test of each op's fake (shapes, dtypes, strides) and autograd registration.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.debugging import aot_eager, boxed_nop

import bloomrun.kernels  # noqa: F401  registers the bloomrun:: ops
from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.model import Bloom, build_model
from tests.kernels.conftest import DEVICE

REPO = Path(__file__).resolve().parents[2]

MICRO = dict(preset=None, num_layers=1, hidden_size=32, num_heads=2, seq_length=16, vocab_size=64,
             embedding_layernorm=True)
VARIANTS = {
    "alibi-gelu": dict(position="alibi", activation="gelu"),
    "rotary-swiglu": dict(position="rotary", activation="swiglu"),
}


def micro_model(knobs: dict) -> Bloom:
    torch.manual_seed(0)
    return build_model(ModelConfig(kernels="triton", **MICRO, **knobs), DEVICE)


def token_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MICRO["vocab_size"], (2, MICRO["seq_length"] + 1), generator=generator).to(DEVICE)
    labels = ids[:, 1:].clone()
    labels[0, :3] = -100  # ignored positions: the mean must count only the others
    return ids[:, :-1], labels


def loss_and_grads(model, inputs, labels) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    for p in model.parameters():
        p.grad = None
    loss = model(inputs, labels=labels)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def assert_same_run(compiled, eager) -> None:
    (loss, grads), (eager_loss, eager_grads) = compiled, eager
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"{name}: {m}")


def bloomrun_ops(graph_module: torch.fx.GraphModule) -> collections.Counter:
    """How often each bloomrun:: op is called in an aten-level graph."""
    return collections.Counter(
        str(node.target).split(".")[1]
        for node in graph_module.graph.nodes
        if node.op == "call_function" and str(node.target).startswith("bloomrun.")
    )


def recording_aot_eager(graphs: list):
    """The aot_eager backend, appending each aten-level graph (forward, then backward) it compiles."""

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return boxed_nop(graph_module, example_inputs)

    def backend(graph_module, example_inputs):
        return aot_eager(graph_module, example_inputs, fw_compiler=record, bw_compiler=record)

    return backend


@pytest.mark.parametrize("knobs", VARIANTS.values(), ids=VARIANTS.keys())
def test_fullgraph_compile_runs_the_custom_ops_and_matches_eager(knobs):
    model = micro_model(knobs)
    inputs, labels = token_batch()
    eager = loss_and_grads(model, inputs, labels)

    graphs = []
    torch._dynamo.reset()
    model.compile(backend=recording_aot_eager(graphs), fullgraph=True)  # in place, as the trainer does; a graph break raises
    assert_same_run(loss_and_grads(model, inputs, labels), eager)

    forward, backward = graphs
    rotary = {"rotary": 1} if knobs["position"] == "rotary" else {}
    activation = f"bias_{knobs['activation']}"
    # 4 LayerNorms: embedding, the block's two, ln_f. Rotary's backward is rotary inverted;
    # the cross-entropy's gradients come from its forward, scaled by a plain multiply.
    assert bloomrun_ops(forward) == {
        "layer_norm_forward": 4, "attention_forward": 1, f"{activation}_forward": 1,
        "linear_cross_entropy_forward": 1, **rotary,
    }
    assert bloomrun_ops(backward) == {
        "layer_norm_backward": 4, "attention_backward": 1, f"{activation}_backward": 1, **rotary,
    }


def test_fullgraph_compile_under_autocast_matches_eager():
    """The trainer's precision (autocast over fp32 weights; fp16 on the CPU, where the
    interpreter's bf16 tl.dot is wrong): custom ops see the autocast dtypes eager sees, and
    the cross-entropy casts its operands itself, as in eager."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    model = micro_model(VARIANTS["alibi-gelu"])
    inputs, labels = token_batch()

    def run():
        with torch.autocast(DEVICE, dtype=dtype):
            return loss_and_grads(model, inputs, labels)

    eager = run()
    torch._dynamo.reset()
    model.compile(backend="aot_eager", fullgraph=True)
    compiled = run()
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-4)
    for name, grad in compiled[1].items():
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, eager[1][name], atol=1e-4, rtol=1e-3, msg=lambda m: f"{name}: {m}")


def test_inductor_compile_matches_eager():
    """The default backend: Inductor generates the glue (C++ on the CPU) around our ops and
    passes them the strides it chose, here for q, k, v as strided views of the QKV buffer."""
    model = micro_model(VARIANTS["alibi-gelu"])
    inputs, labels = token_batch()
    eager = loss_and_grads(model, inputs, labels)
    torch._dynamo.reset()
    model.compile(fullgraph=True)
    assert_same_run(loss_and_grads(model, inputs, labels), eager)


def test_compiled_model_without_grad_skips_the_cross_entropy_gradients():
    """Evaluation under no_grad: the loss alone, no gradient buffers of the vocabulary's size."""
    model = micro_model(VARIANTS["alibi-gelu"])
    inputs, labels = token_batch()
    graphs = []
    with torch.no_grad():
        eager = model(inputs, labels=labels)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=recording_aot_eager(graphs), fullgraph=True)(inputs, labels=labels)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)
    (graph,) = graphs
    (cross_entropy,) = [node for node in graph.graph.nodes if "linear_cross_entropy" in str(node.target)]
    need_d_hidden, need_d_weight = cross_entropy.args[4:6]
    assert not need_d_hidden and not need_d_weight


# ---------------------------------------------------------------------- opcheck


def randn(*shape, grad=True):
    return torch.randn(*shape, device=DEVICE).requires_grad_(grad)


def qkv_views(batch=1, seq=5, heads=2, head_dim=16, grad=True):
    """q, k, v as the model makes them: strided views into one (B, T, H, 3, D) buffer."""
    qkv = torch.randn(batch, seq, heads, 3, head_dim, device=DEVICE).requires_grad_(grad)
    return qkv.unbind(dim=3)


def layer_norm_backward_args():
    x, weight, bias = randn(2, 3, 24), randn(24), randn(24)
    _, mean, rstd = torch.ops.bloomrun.layer_norm_forward(x, weight, bias, 1e-5, None)
    return (*plain(randn(2, 3, 24), x, weight), mean, rstd)


def attention_backward_args(slopes):
    q, k, v = qkv_views(grad=False)
    o, lse = torch.ops.bloomrun.attention_forward(q, k, v, slopes)
    return (randn(1, 5, 2, 16, grad=False), q, k, v, o, lse, slopes)


def plain(*tensors):
    """Inputs of a backward op, which has no autograd of its own (no double backward)."""
    return [t.detach() for t in tensors]


SLOPES = [0.5, 0.25]
OPCHECK_ARGS = {  # small odd shapes; q, k, v strided as in the model
    "layer_norm_forward": lambda: (randn(2, 3, 24), randn(24), randn(24), 1e-5, torch.float16),  # fp32 in, half out
    "layer_norm_backward": layer_norm_backward_args,
    "bias_gelu_forward": lambda: (randn(3, 5, 24), randn(24)),
    "bias_gelu_backward": lambda: plain(randn(3, 24), randn(3, 24), randn(24)),
    "bias_swiglu_forward": lambda: (randn(3, 5, 48), randn(48)),
    "bias_swiglu_backward": lambda: plain(randn(3, 24), randn(3, 48), randn(48)),
    "attention_forward": lambda: (*qkv_views(), torch.tensor(SLOPES, device=DEVICE)),
    "attention_backward": lambda: attention_backward_args(torch.tensor(SLOPES, device=DEVICE)),
    "rotary": lambda: (*qkv_views()[:2], randn(5, 8, grad=False), randn(5, 8, grad=False), False),
    "linear_cross_entropy_forward": lambda: (
        randn(7, 16), randn(37, 16), torch.tensor([1, 5, -100, 36, 0, 2, -100], device=DEVICE), -100, True, True),
}


@pytest.mark.parametrize("op_name", OPCHECK_ARGS.keys())
def test_opcheck(op_name):
    torch.library.opcheck(getattr(torch.ops.bloomrun, op_name), OPCHECK_ARGS[op_name]())


def test_every_registered_op_is_opchecked():
    # Wherever a kernel module registers one: the dispatcher lists every op of the namespace.
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("bloomrun::")}
    assert registered == OPCHECK_ARGS.keys()


# ---------------------------------------------------------------------- the trainer's path


def compare_trainer_runs(folder: str) -> None:
    """In a fresh process: the trainer with `training.compile` (model.compile(), then the
    DeepSpeed engine) against the same run without it; prints the result as JSON."""
    import json

    from torch._dynamo.utils import counters

    from bloomrun.trainer.config import TrainerConfig
    from bloomrun.trainer.trainer import Trainer
    from tests.trainer.trainer_runs import config, write_corpus

    corpus = write_corpus(Path(folder) / "corpus")
    result = {}
    for compile_model in (False, True):
        cfg = config(corpus, Path(folder) / f"compile-{compile_model}", steps=2, zero=0, micro=2,
                     compile=compile_model, precision="fp32")
        cfg["model"].update(kernels="triton", numHeads=2)  # head dim 16, attention's minimum
        cfg["training"]["globalBatchSize"] = 2  # one micro-batch a step
        trainer = Trainer(TrainerConfig.model_validate(cfg), serve_metrics=False)
        result[f"losses_compile_{compile_model}"] = [trainer.train_step().loss for _ in range(2)]
        trainer.close()
    result["graph_breaks"] = dict(counters["graph_break"])
    result["unique_graphs"] = counters["stats"]["unique_graphs"]
    print("RESULT " + json.dumps(result))


@pytest.mark.slow
def test_trainer_with_compile_runs_the_triton_model_in_one_graph(tmp_path):
    import json
    import subprocess
    import sys

    code = f"from tests.kernels.test_compile import compare_trainer_runs; compare_trainer_runs({str(tmp_path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    assert result["graph_breaks"] == {} and result["unique_graphs"] == 1, result
    torch.testing.assert_close(result["losses_compile_True"], result["losses_compile_False"], atol=1e-5, rtol=1e-5)
