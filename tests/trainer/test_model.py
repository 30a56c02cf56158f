"""The BLOOM model on its own: ablation knobs, causality, ALiBi slopes, loss, init, op dispatch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bloomrun.kernels
from bloomrun.trainer.config import PRESETS, ModelConfig
from bloomrun.trainer.model import Bloom, ModelArgs, build_model, mlp_width, ops
from bloomrun.trainer.model.positions import alibi_slopes, rotary_cos_sin

POSITIONS = ("alibi", "rotary", "learned", "none")
VOCAB = 200


def small_cfg(**overrides) -> ModelConfig:
    fields = dict(preset=None, num_layers=2, hidden_size=48, num_heads=6, seq_length=16, vocab_size=VOCAB, kernels="torch")
    fields.update(overrides)
    return ModelConfig(**fields)


def build(seed: int = 0, **overrides) -> Bloom:
    torch.manual_seed(seed)
    return build_model(small_cfg(**overrides))


def random_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- ALiBi


@pytest.mark.parametrize("num_heads", [8, 12, 16, 112])
def test_alibi_slopes_follow_the_closed_form(num_heads):
    # Power of two n: 2^(-8 i / n), i = 1..n. Otherwise the n' = 2^floor(log2 n) slopes of n',
    # then the odd-numbered slopes of 2n': 2^(-8 (2j - 1) / (2n')), j = 1..n - n'.
    n_pow = 2 ** math.floor(math.log2(num_heads))
    expected = [2 ** (-8 * i / n_pow) for i in range(1, n_pow + 1)]
    expected += [2 ** (-8 * (2 * j - 1) / (2 * n_pow)) for j in range(1, num_heads - n_pow + 1)]
    got = alibi_slopes(num_heads)
    assert got.dtype == torch.float32 and got.shape == (num_heads,)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-7)


def test_alibi_slopes_known_values():
    assert alibi_slopes(8).tolist() == [2.0**-k for k in range(1, 9)]
    # 12 heads: the 8 of 8, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from 16.
    torch.testing.assert_close(alibi_slopes(12)[8:], torch.tensor([2**-0.5, 2**-1.5, 2**-2.5, 2**-3.5]))
    assert alibi_slopes(112)[0].item() == pytest.approx(2 ** (-1 / 8))


# -------------------------------------------------------------------------- ablations


@pytest.mark.parametrize("position", POSITIONS)
def test_every_position_variant_trains_a_step(position):
    model = build(position=position)
    ids = random_ids()
    loss = model(ids, labels=ids)
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"{name} gets no gradient"


@pytest.mark.parametrize("position", POSITIONS)
def test_a_future_token_never_changes_earlier_logits(position):
    model = build(position=position).eval()
    ids = random_ids(batch=1, length=12)
    changed = ids.clone()
    t = 7
    changed[0, t] = (ids[0, t] + 1) % VOCAB
    with torch.no_grad():
        before, after = model(ids), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    assert (before[:, t] - after[:, t]).abs().max() > 1e-3


@pytest.mark.parametrize("position", POSITIONS)
def test_only_position_none_ignores_the_order_of_earlier_tokens(position):
    # Without position information one attention layer is a set function of the visible keys,
    # so the last token's logits cannot depend on the order of the tokens before it. (With two
    # layers they can: the second layer's keys are causal prefixes.) A larger init makes
    # attention peaked enough for rotary's effect to be well above rounding.
    model = build(position=position, num_layers=1, init_std=0.3).eval()
    ids = random_ids(batch=1, length=10)
    swapped = ids.clone()
    swapped[0, [1, 5]] = ids[0, [5, 1]]
    assert ids[0, 1] != ids[0, 5]
    with torch.no_grad():
        last, last_swapped = model(ids)[0, -1], model(swapped)[0, -1]
    if position == "none":
        torch.testing.assert_close(last, last_swapped, rtol=0, atol=1e-5)
    else:
        assert (last - last_swapped).abs().max() > 1e-4


@pytest.mark.parametrize("position", ["rotary", "learned", "none"])
def test_position_variants_change_the_output_of_the_same_weights(position):
    alibi = build(position="alibi").eval()
    other = build(position=position).eval()
    shared = alibi.state_dict()
    missing, unexpected = other.load_state_dict(shared, strict=False)
    assert unexpected == []
    assert missing == (["position_embeddings.weight"] if position == "learned" else [])
    ids = random_ids()
    with torch.no_grad():
        assert (alibi(ids) - other(ids)).abs().max() > 1e-3


def test_learned_positions_refuse_sequences_longer_than_the_table():
    model = build(position="learned")
    with pytest.raises(ValueError, match="16 learned positions"):
        model(random_ids(length=17))


def test_embedding_layernorm_off_removes_it():
    with_ln, without_ln = build(), build(embedding_layernorm=False)
    assert without_ln.word_embeddings_layernorm is None
    assert not any(k.startswith("word_embeddings_layernorm") for k in without_ln.state_dict())
    assert with_ln.num_parameters() - without_ln.num_parameters() == 2 * 48
    # Same remaining weights, but the embedding no longer gets normalised.
    without_ln.load_state_dict(with_ln.state_dict(), strict=False)
    with torch.no_grad():
        with_ln.word_embeddings_layernorm.weight.fill_(0.5)  # make the LN visible in the output
        assert (with_ln(random_ids()) - without_ln(random_ids())).abs().max() > 1e-3


def test_swiglu_keeps_the_parameter_count_close_to_gelu():
    assert mlp_width(2048, "gelu") == 8192
    assert mlp_width(2048, "swiglu") == 5440  # 2/3 * 8192 = 5461.3, nearest multiple of 64
    assert mlp_width(48, "swiglu") == 128
    gelu, swiglu = build(), build(activation="swiglu")
    assert swiglu.h[0].mlp.dense_h_to_4h.weight.shape == (2 * 128, 48)
    assert swiglu.h[0].mlp.dense_4h_to_h.weight.shape == (48, 128)
    for preset in ("1b3", "7b1"):
        with torch.device("meta"):
            counts = [Bloom(ModelArgs.from_config(ModelConfig(preset=preset, activation=a))).num_parameters()
                      for a in ("gelu", "swiglu")]
        assert abs(counts[1] - counts[0]) / counts[0] < 0.005
    ids = random_ids()
    with torch.no_grad():
        assert (gelu(ids) - swiglu(ids)).abs().max() > 1e-3


def test_swiglu_mlp_computes_silu_gate_times_up():
    mlp = build(activation="swiglu").h[0].mlp
    x = torch.randn(3, 5, 48)
    w, b = mlp.dense_h_to_4h.weight, mlp.dense_h_to_4h.bias
    gate = x @ w[:128].T + b[:128]
    up = x @ w[128:].T + b[128:]
    expected = (gate * torch.sigmoid(gate) * up) @ mlp.dense_4h_to_h.weight.T + mlp.dense_4h_to_h.bias
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- loss, init


def test_loss_with_labels_is_cross_entropy_of_the_logits():
    model = build()
    ids = random_ids(batch=3, length=11)
    labels = random_ids(batch=3, length=11, seed=2)
    labels[0, :4] = -100
    labels[2, -1] = -100
    logits = model(ids)
    assert logits.shape == (3, 11, model.args.vocab_size)
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(model(ids, labels=labels), expected, rtol=1e-6, atol=1e-6)


def test_vocabulary_is_padded_to_a_multiple_of_128_and_tied():
    model = build()
    assert model.word_embeddings.weight.shape == (256, 48)
    assert not any("lm_head" in name for name, _ in model.named_parameters())


def test_init_is_deterministic_and_follows_the_recipe():
    a, b, c = build(seed=3), build(seed=3), build(seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.word_embeddings.weight, c.word_embeddings.weight)

    torch.manual_seed(0)
    big = build_model(ModelConfig(preset=None, num_layers=8, hidden_size=256, num_heads=4, seq_length=16, vocab_size=128, init_std=0.05))
    block = big.h[0]
    assert block.self_attention.query_key_value.weight.std().item() == pytest.approx(0.05, rel=0.05)
    scaled = 0.05 / math.sqrt(2 * 8)
    assert block.self_attention.dense.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.mlp.dense_4h_to_h.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.all(block.self_attention.query_key_value.bias == 0)
    assert torch.all(block.input_layernorm.weight == 1) and torch.all(big.ln_f.bias == 0)


def test_num_parameters_matches_the_closed_form():
    C, V, L = 48, 256, 2
    per_block = 12 * C * C + 13 * C
    model = build()
    assert model.num_parameters() == V * C + 2 * C + L * per_block + 2 * C
    assert model.num_parameters(exclude_embeddings=True) == 2 * C + L * per_block + 2 * C
    learned = build(position="learned")
    assert learned.num_parameters(exclude_embeddings=True) == model.num_parameters(exclude_embeddings=True)


def test_preset_parameter_counts_match_the_published_bloom_models():
    # Figures of the released bigscience/bloom-* checkpoints (tied head counted once).
    published = {
        "560m": 559_214_592,
        "1b1": 1_065_314_304,
        "3b": 3_002_557_440,
        "7b1": 7_069_016_064,
        "176b": 176_247_271_424,
    }
    for preset, count in published.items():
        with torch.device("meta"):  # shape only: nothing is allocated
            assert Bloom(ModelArgs.from_config(ModelConfig(preset=preset))).num_parameters() == count, preset
    assert set(published) | {"tiny", "1b3"} == set(PRESETS)


# ------------------------------------------------------------------------------ ops


def test_torch_attention_matches_the_explicit_alibi_math_on_strided_inputs():
    B, T, H, D = 2, 9, 3, 8
    qkv = torch.randn(B, T, H, 3, D)
    q, k, v = qkv.unbind(3)  # strided views, as the model passes them
    slopes = torch.tensor([0.5, 0.25, 0.125])
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(D) - slopes[:, None, None] * (i - j)
    scores = scores.masked_fill(j > i, float("-inf"))
    expected = torch.einsum("bhij,bjhd->bihd", scores.softmax(-1), v)
    torch.testing.assert_close(ops.attention(q, k, v, slopes), expected, rtol=1e-5, atol=1e-6)


def test_rotary_scores_depend_only_on_relative_position():
    D = 8
    cos, sin = rotary_cos_sin(12, D)
    q = torch.randn(1, 1, 1, D).expand(1, 12, 1, D)  # the same vector at every position
    k = torch.randn(1, 1, 1, D).expand(1, 12, 1, D)
    rq, rk = ops.apply_rotary(q, k, cos, sin)
    score = lambda m, n: (rq[0, m, 0] * rk[0, n, 0]).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(9, 6), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))


def test_auto_kernels_are_triton_on_cuda_and_torch_elsewhere():
    assert ops.resolve("auto", torch.device("cpu")) is ops.TORCH
    assert ops.resolve("auto", "cuda:1") is ops.TRITON
    assert ops.resolve("triton", "cpu") is ops.TRITON and ops.resolve("torch", "cuda") is ops.TORCH
    model = build_model(small_cfg(kernels="auto"))
    assert {m.kernels.name for m in model.modules() if hasattr(m, "kernels")} == {"torch"}


def test_triton_kernels_call_the_kernel_package(monkeypatch):
    calls = []

    def fake_bias_gelu(x, bias):
        calls.append((x.shape, bias.shape))
        return x

    monkeypatch.setitem(bloomrun.kernels.OPS, "bias_gelu", bloomrun.kernels.KernelOp(fake_bias_gelu, fake_bias_gelu))
    x = torch.randn(2, 6)
    assert ops.TRITON.bias_gelu(x, torch.zeros(6)) is x
    assert calls == [((2, 6), (6,))]


def test_missing_kernel_and_unknown_backend_are_clear_errors(monkeypatch):
    monkeypatch.delitem(bloomrun.kernels.OPS, "bias_swiglu")
    with pytest.raises(NotImplementedError, match="model.kernels: torch"):
        ops.TRITON.bias_swiglu(torch.randn(2, 4), torch.zeros(4))
    with pytest.raises(ValueError, match="kernels must be one of"):
        ops.resolve("cuda", "cuda")


@pytest.mark.parametrize("position, activation", [("alibi", "gelu"), ("rotary", "swiglu")])
def test_triton_kernels_train_the_same_model_as_torch(position, activation):
    # The model end to end through bloomrun.kernels (Triton's interpreter on a CPU-only machine,
    # see tests/conftest.py): same loss, same gradients as the torch ops, in fp32.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = small_cfg(num_layers=1, hidden_size=32, num_heads=2, position=position, activation=activation, init_std=0.2)
    torch.manual_seed(0)
    reference = build_model(cfg, device)
    fused = build_model(cfg.model_copy(update={"kernels": "triton"}), device)
    fused.load_state_dict(reference.state_dict())
    ids = random_ids(length=13).to(device)
    labels = random_ids(length=13, seed=5).to(device)
    labels[0, :3] = -100
    losses = [model(ids, labels=labels) for model in (reference, fused)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p_ref), p_fused in zip(reference.named_parameters(), fused.parameters()):
        torch.testing.assert_close(p_fused.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_under_autocast_layer_norms_before_a_matmul_write_its_dtype_and_the_residual_stays_fp32():
    """Every LayerNorm but the embedding one feeds only a matmul, so under autocast it writes
    the matmul's dtype (no separate cast); the embedding LayerNorm's output is the residual
    stream, which must stay fp32. The loss is the same as with the cast left to autocast."""
    model = build(embedding_layernorm=True, kernels="torch")
    seen = {}

    def record(name):
        def hook(module, args, out):
            seen[name] = out.dtype  # returns None: a hook's return value would replace the output
        return hook

    for name, module in model.named_modules():
        if name.endswith("layernorm") or name == "ln_f":
            module.register_forward_hook(record(name))
    ids = random_ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids)
    assert seen.pop("word_embeddings_layernorm") == torch.float32
    assert seen and set(seen.values()) == {torch.bfloat16}, seen

    for module in model.modules():
        if hasattr(module, "feeds_matmul"):
            module.feeds_matmul = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_by_autocast = model(ids, labels=ids)
    torch.testing.assert_close(loss, cast_by_autocast, rtol=0, atol=0)
