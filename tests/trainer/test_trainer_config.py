"""The pure parts of the engine set-up: DeepSpeed config, optimizer groups, the step guard."""

import pytest
import torch

from bloomrun.trainer import parallel
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.faults import FaultHooks, parse_poison
from bloomrun.trainer.trainer import run_labels

CPU2 = parallel.World(rank=0, local_rank=0, world_size=2, node_rank=0, device="cpu")
GPU8 = parallel.World(rank=0, local_rank=0, world_size=8, node_rank=0, device="cuda")


def trainer_config(**training):
    return TrainerConfig.model_validate({
        "data": {"sources": [{"path": "x"}]},
        "training": {"globalBatchSize": 64, "microBatchSize": 4, "trainSteps": 10, **training},
    })


def test_batch_is_micro_times_accumulation_times_ranks():
    ds = parallel.build_deepspeed_config(trainer_config(zeroStage=2), CPU2, 64)
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (64, 4, 8)
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["contiguous_gradients"]
    assert ds["gradient_clipping"] == 1.0
    with pytest.raises(ValueError, match="not a multiple of microBatchSize"):
        parallel.build_deepspeed_config(trainer_config(), parallel.World(0, 0, 3, 0, "cpu"), 64)


def test_one_rank_runs_without_zero_partitioning():
    one = parallel.World(rank=0, local_rank=0, world_size=1, node_rank=0, device="cuda")
    ds = parallel.build_deepspeed_config(trainer_config(zeroStage=3), one, 64)
    assert ds["zero_optimization"] == {"stage": 0}
    # Stage 0 clips in the optimizer's fused step, so DeepSpeed must not clip a second time.
    assert ds["gradient_clipping"] == 0.0
    model = torch.nn.Linear(2, 2)
    assert parallel.build_optimizer(model, trainer_config(zeroStage=3), one).grad_clip == 1.0
    assert parallel.build_optimizer(model, trainer_config(zeroStage=3), GPU8).grad_clip == 0.0
    assert parallel.build_deepspeed_config(trainer_config(zeroStage=3), GPU8, 64)["zero_optimization"]["stage"] == 3


def test_precision_auto_is_bf16_autocast_on_gpu_and_fp32_on_cpu():
    cfg = trainer_config()
    assert "torch_autocast" not in parallel.build_deepspeed_config(cfg, CPU2, 64)
    gpu = parallel.build_deepspeed_config(cfg, GPU8, 64)
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert "bf16" not in gpu, "DeepSpeed's bf16 optimizer wrapper is the slow path (issue 3)"
    assert parallel.build_deepspeed_config(trainer_config(precision="bf16"), CPU2, 64)["torch_autocast"]["enabled"]


def test_no_weight_decay_on_biases_and_layernorms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = parallel.weight_decay_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def guarded(value=1.0):
    weight = torch.nn.Parameter(torch.full((3,), value))
    return weight, parallel.GuardedAdamW([weight], lr=0.1, foreach=True)


def test_guard_skips_a_non_finite_gradient_and_leaves_state_untouched():
    weight, opt = guarded()
    weight.grad = torch.tensor([1.0, float("inf"), 1.0])
    opt.step()
    assert not opt.take_applied() and weight.eq(1.0).all() and not opt.state
    weight.grad = torch.ones(3)
    opt.step()
    assert opt.take_applied() and weight.lt(1.0).all() and int(opt.state[weight]["step"]) == 1
    assert opt.take_applied() is False, "an outcome is read once"


def test_guard_skips_when_the_loss_was_non_finite_even_with_finite_gradients():
    weight, opt = guarded()
    weight.grad = torch.ones(3)
    opt.guard_next_step(loss=torch.tensor(float("nan")))
    opt.step()
    assert not opt.take_applied() and weight.eq(1.0).all()


def test_fault_hooks_come_from_the_environment_and_do_nothing_by_default():
    assert parse_poison("16:25") == (16, 25) and parse_poison(None) is None
    with pytest.raises(ValueError, match="START:END"):
        parse_poison("16")
    assert FaultHooks.from_env({}) == FaultHooks()
    hooks = FaultHooks.from_env({"BLOOMRUN_POISON_SAMPLES": "16:25", "BLOOMRUN_TEST_HANG_AFTER_STEP": "3"})
    assert (hooks.poison, hooks.hang_after_step, hooks.trace_file) == ((16, 25), 3, None)
    loss = torch.tensor(2.0)
    assert FaultHooks().poisoned_loss(loss, [20]) is loss
    assert hooks.poisoned_loss(loss, [14, 15]) is loss and hooks.poisoned_loss(loss, [24, 25]).isnan()


def test_labels():
    assert run_labels({}) == ("local", "local")
    assert run_labels({"BLOOMRUN_RUN_NAMESPACE": "team", "BLOOMRUN_RUN_NAME": "r1"}) == ("team", "r1")
    assert run_labels({"BLOOMRUN_NAMESPACE": "team", "BLOOMRUN_RUN": "r2"}) == ("team", "r2")


def fused_guarded(grad_clip=1.0):
    weight = torch.nn.Parameter(torch.full((3,), 1.0))
    return weight, parallel.GuardedAdamW([weight], grad_clip=grad_clip, lr=0.1, fused=True)


def test_with_the_gradient_norm_given_the_fused_step_clips_like_deepspeed():
    """Under stage 0 the trainer hands over the norm it measured; the update must equal
    DeepSpeed's clip (gradients times max_norm / (norm + 1e-6)) followed by AdamW."""
    grad = torch.tensor([3.0, -4.0, 12.0])  # norm 13
    weight, opt = fused_guarded(grad_clip=1.0)
    weight.grad = grad.clone()
    opt.guard_next_step(grad_norm=grad.norm())
    opt.step()
    reference = torch.nn.Parameter(torch.full((3,), 1.0))
    reference.grad = grad * (1.0 / (13.0 + 1e-6))
    expected_opt = torch.optim.AdamW([reference], lr=0.1)
    expected_opt.step()
    assert bool(opt.take_applied())
    torch.testing.assert_close(opt.state[weight]["exp_avg"], expected_opt.state[reference]["exp_avg"])
    torch.testing.assert_close(weight.data, reference.data)
    torch.testing.assert_close(weight.grad, reference.grad)  # clipped in place, as DeepSpeed's clip does


def test_with_the_gradient_norm_given_small_gradients_are_not_scaled_up():
    grad = torch.tensor([0.1, 0.2, -0.2])
    weight, opt = fused_guarded(grad_clip=1.0)
    weight.grad = grad.clone()
    opt.guard_next_step(grad_norm=grad.norm())
    opt.step()
    torch.testing.assert_close(opt.state[weight]["exp_avg"], 0.1 * grad)  # (1 - beta1) * grad, unscaled


@pytest.mark.parametrize("bad", ["norm", "loss"])
def test_with_the_gradient_norm_given_a_non_finite_norm_or_loss_skips_on_the_device(bad):
    weight, opt = fused_guarded()
    weight.grad = torch.ones(3)
    opt.guard_next_step(loss=torch.tensor(float("nan") if bad == "loss" else 2.0),
                        grad_norm=torch.tensor(float("nan") if bad == "norm" else 1.7))
    opt.step()
    applied = opt.take_applied()
    assert isinstance(applied, torch.Tensor) and not bool(applied)
    assert weight.eq(1.0).all() and int(opt.state[weight]["step"]) == 0
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale"), "one step's flags must not linger"
    opt.guard_next_step(loss=torch.tensor(2.0), grad_norm=torch.tensor(1.7))
    opt.step()
    assert bool(opt.take_applied()) and weight.lt(1.0).all() and int(opt.state[weight]["step"]) == 1
