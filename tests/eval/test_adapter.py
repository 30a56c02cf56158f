"""The lm-eval adapter against lm-eval's own HFLM on the model's HF export (ALiBi), and on the
arms the export cannot represent (rotary) against the model's own logits."""

import pytest
import torch
import torch.nn.functional as F

from bloomrun.cli.export import copy_tokenizer, special_token_ids
from bloomrun.eval import runner, tasks
from bloomrun.eval.adapter import BloomLM, load_model
from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer.config import ModelConfig
from bloomrun.trainer.export import export_hf
from bloomrun.trainer.model import build_model
from tests.eval.conftest import TOKENIZER

LIMIT = 24  # documents per task: 96 + 96 + 24 requests


def perturbed(cfg: ModelConfig, seed: int = 0):
    """A model whose LayerNorms and biases are not at their init either (so a mix-up shows)."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def publish(folder, model, step=10):
    weights = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {f"{n}.{k}": torch.zeros_like(p) for n, p in weights.items() for k in ("exp_avg", "exp_avg_sq")}
    state = ckpt.TrainState(step=step, consumed_samples=16 * step, tokens=1024 * step)
    return ckpt.publish(folder, state, weights, moments, {"torch": torch.get_rng_state()})


def responses(results, task):
    """Per request, in lm-eval's document order: (log-likelihood, is greedy) or a rolling sum."""
    return [resp for sample in results["samples"][task] for resp in sample["resps"]]


@pytest.fixture(scope="module")
def alibi(tmp_path_factory):
    folder = tmp_path_factory.mktemp("alibi")
    cfg = ModelConfig(preset="tiny", kernels="torch")
    model = perturbed(cfg)
    export_hf(model, cfg, folder / "hf", **special_token_ids(TOKENIZER))
    copy_tokenizer(TOKENIZER, folder / "hf", cfg.shape().seq_length)
    step_dir = publish(folder / "checkpoints", model)
    return cfg, step_dir, folder / "hf"


def test_adapter_equals_hflm_on_the_export_request_by_request(alibi):
    from lm_eval.models.huggingface import HFLM

    cfg, step_dir, hf_dir = alibi
    names = list(tasks.TASKS)
    ours, ours_summary = runner.evaluate(BloomLM(load_model(step_dir, cfg), TOKENIZER, batch_size=7), names,
                                         limit=LIMIT, log_samples=True)
    hflm = HFLM(pretrained=str(hf_dir), batch_size=7, device="cpu", dtype="float32")
    assert hflm.max_length == cfg.shape().seq_length  # the export's tokenizer says so
    theirs, theirs_summary = runner.evaluate(hflm, names, limit=LIMIT, log_samples=True)
    for task in names:
        a, b = responses(ours, task), responses(theirs, task)
        assert len(a) == len(b) > 0
        for mine, hf in zip(a, b):
            mine, hf = (mine, hf) if isinstance(mine, float) else (mine[0], hf[0])
            if isinstance(mine, (tuple, list)):
                assert mine[1] == hf[1]  # is greedy
                mine, hf = mine[0], hf[0]
            assert abs(mine - hf) <= 1e-4, (task, mine, hf)
    for a, b in zip(ours_summary.scores, theirs_summary.scores):
        assert (a.task, a.metric, a.random) == (b.task, b.metric, b.random)
        if a.random is not None:  # an accuracy: the same choices were picked
            assert a.value == b.value
        else:  # a perplexity: the exp of a sum of log-likelihoods equal to 1e-4
            assert a.value == pytest.approx(b.value, rel=1e-6)
    # The stories task's contexts are long enough that some requests are truncated from the
    # left (the 64-token window): the comparison covers that path too.
    assert ours["results"]["bloomrun_stories_order"]["sample_len"] == LIMIT


def test_loglikelihood_is_the_models_own_log_probability_for_a_rotary_model(tmp_path):
    cfg = ModelConfig(preset="tiny", position="rotary", activation="swiglu", embedding_layernorm=False,
                      kernels="torch")
    model = perturbed(cfg, seed=1)
    lm = BloomLM(load_model(publish(tmp_path, model), cfg), TOKENIZER, batch_size=3)
    pairs = [("Mia had a red ball.", " Then Mia went home."), ("17 + 25 =", " 42"), ("Tom", " saw a cat")]
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (logprob, _greedy) in zip(pairs, got):
        ctx, whole = lm.tok_encode(context), lm.tok_encode(context + continuation)
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = F.log_softmax(model(ids)[0, :-1], dim=-1)
        expected = sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))
        assert abs(logprob - expected) <= 1e-4
    # and through lm-eval, a task of each kind runs on this arm
    results, summary = runner.evaluate(lm, ["bloomrun_arithmetic", "bloomrun_stories_ppl"], limit=8)
    assert {s.task for s in summary.scores} == {"bloomrun_arithmetic", "bloomrun_stories_ppl"}
    assert results["results"]["bloomrun_stories_ppl"]["word_perplexity,none"] > 1


def test_generate_until_is_greedy_and_stops_at_the_stop_string(tmp_path):
    from lm_eval.api.instance import Instance

    cfg = ModelConfig(preset="tiny", kernels="torch")
    model = perturbed(cfg, seed=2)
    lm = BloomLM(load_model(publish(tmp_path, model), cfg), TOKENIZER, batch_size=4)
    contexts = ["Mia had a", "Tom saw a", "17 + 25 =", "One day, Leo went to the"]
    requests = [Instance("generate_until", {}, (c, {"until": ["\n"], "max_gen_toks": 6}), i)
                for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    for context, text in zip(contexts, got):
        ids = lm.tok_encode(context)
        new = []
        for _ in range(6):
            with torch.no_grad():
                token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == lm.eot_token_id:
                break
            new.append(token)
            if "\n" in lm.tok_decode(new):
                break
        assert text == lm.tok_decode(new).split("\n")[0]


def test_a_checkpoint_of_another_shape_is_refused_naming_tensors(tmp_path):
    step_dir = publish(tmp_path, perturbed(ModelConfig(preset="tiny", kernels="torch")))
    with pytest.raises(ValueError, match="weights do not fit"):
        load_model(step_dir, ModelConfig(preset="tiny", numLayers=3, kernels="torch"))
