"""The pure parts of `bloomctl run`: torchrun's command line (bloomrun.trainer.elastic, shared
with the operator), the workers' environment, the resolved config (bloomrun.trainer.resolve),
and the progress parsing. No process is started here."""

import dataclasses
import io
import math
import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest

from bloomrun.cli import launch
from bloomrun.cli.progress import ProgressDisplay, Snapshot, StepRate, describe, parse_metrics
from bloomrun.trainer import elastic
from bloomrun.trainer.config import TrainerConfig
from bloomrun.trainer.resolve import resolve_config


def tiny_config(**training) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"preset": "tiny"},
            "data": {
                "sources": [
                    {"path": "data/stories_text_document", "weight": 2},
                    {"path": "/abs/arithmetic_text_document", "weight": 1},
                ],
                "tokenizer": "data/tokenizer.json",
            },
            "training": {"globalBatchSize": 8, "microBatchSize": 4, **(training or {"trainSteps": 10})},
        }
    )


def option(command: list[str], name: str) -> str:
    """The value of --name=value or --name value in a command line."""
    for i, arg in enumerate(command):
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
        if arg == name:
            return command[i + 1]
    raise AssertionError(f"{name} not in {command}")


def local_launch(tmp_path, **overrides) -> elastic.Launch:
    values = dict(config_path=str(tmp_path / "config.yaml"),
                  rendezvous=elastic.Rendezvous("127.0.0.1:29411", "tiny-abc", nnodes="1:2"), nproc=2,
                  max_restarts=5, launcher=("/venv/bin/python", "-m", "torch.distributed.run"),
                  log_dir=str(tmp_path / "logs"))
    return elastic.Launch(**(values | overrides))


def test_torchrun_command_sets_the_elastic_settings_and_the_trainer_module(tmp_path):
    command = elastic.build_torchrun_command(local_launch(tmp_path))
    assert command[:3] == ["/venv/bin/python", "-m", "torch.distributed.run"]
    assert option(command, "--nnodes") == "1:2"
    assert option(command, "--nproc-per-node") == "2"
    assert option(command, "--rdzv-backend") == "c10d"
    assert option(command, "--rdzv-endpoint") == "127.0.0.1:29411"
    assert option(command, "--rdzv-id") == "tiny-abc"
    assert option(command, "--max-restarts") == "5"
    assert option(command, "--log-dir") == str(tmp_path / "logs")
    conf = dict(item.split("=") for item in option(command, "--rdzv-conf").split(","))
    assert conf == {"last_call_timeout": "2", "keep_alive_interval": "1", "keep_alive_max_attempt": "3"}
    # The script's own arguments come after the module, where torchrun passes them on.
    assert command[-4:] == ["-m", "bloomrun.trainer.train", "--config", str(tmp_path / "config.yaml")]


def test_torchrun_waits_for_the_sigterm_checkpoint_as_long_as_a_pods_grace_period_allows(tmp_path):
    timeout = int(option(elastic.build_torchrun_command(local_launch(tmp_path)), "--shutdown-timeout"))
    assert timeout == elastic.shutdown_timeout() == elastic.GRACE_PERIOD_S - elastic.TORCHRUN_EXIT_S
    assert elastic.SIGTERM_CHECKPOINT_S <= timeout < elastic.GRACE_PERIOD_S
    with pytest.raises(ValueError, match="grace period of 60 s leaves 45 s"):
        elastic.shutdown_timeout(grace_period_s=60, checkpoint_s=120)


def test_torchrun_command_can_pin_which_agent_hosts_the_store(tmp_path):
    for is_host, expected in ((True, "true"), (False, "false")):
        rendezvous = elastic.Rendezvous("127.0.0.1:1", "r", is_host=is_host)
        command = elastic.build_torchrun_command(local_launch(tmp_path, rendezvous=rendezvous))
        assert f"is_host={expected}" in option(command, "--rdzv-conf")


def worker_env(base, tmp_path, **kwargs):
    values = dict(cache=tmp_path, nproc=2, num_cpus=2, run_name="r", metrics_port_file=tmp_path / "metrics-port")
    return launch.build_worker_env(base, **(values | kwargs))


def test_worker_env_disables_the_shared_store_and_keeps_caches_in_the_repo(tmp_path):
    env = worker_env({"PATH": "/bin"}, tmp_path, run_name="tiny")
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert env["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    assert env["OMP_NUM_THREADS"] == "1"
    assert env["PATH"] == "/bin"
    assert env["BLOOMRUN_RUN"] == "tiny"
    assert env["BLOOMRUN_METRICS_PORT_FILE"] == str(tmp_path / "metrics-port")
    assert "BLOOMRUN_RUN_NAME" not in env  # no BloomRun status to report progress to


def test_worker_env_respects_an_explicit_thread_count_and_never_goes_below_one(tmp_path):
    assert worker_env({"OMP_NUM_THREADS": "3"}, tmp_path)["OMP_NUM_THREADS"] == "3"
    assert worker_env({}, tmp_path, nproc=4, num_cpus=2)["OMP_NUM_THREADS"] == "1"
    assert worker_env({}, tmp_path, nproc=2, num_cpus=8)["OMP_NUM_THREADS"] == "4"


def test_cache_dir_defaults_to_the_repo_and_follows_bloomrun_cache(tmp_path):
    assert elastic.cache_dir({}) == elastic.REPO_ROOT / ".cache"
    assert (elastic.REPO_ROOT / "bloomrun" / "trainer" / "elastic.py").is_file()
    assert elastic.cache_dir({"BLOOMRUN_CACHE": str(tmp_path)}) == tmp_path


def test_free_ports_are_distinct():
    ports = elastic.free_ports(3)
    assert len(set(ports)) == 3 and all(0 < port < 65536 for port in ports)


def test_resolved_config_has_manifest_relative_paths_and_local_run_settings(tmp_path):
    config = tiny_config()
    resolved = resolve_config(
        config,
        base_dir=tmp_path / "examples",
        checkpoint_dir=tmp_path / "runs" / "tiny" / "checkpoints",
        metrics_port=40123,
    )
    paths = [source.path for source in resolved.data.sources]
    assert paths == [str(tmp_path / "examples" / "data" / "stories_text_document"), "/abs/arithmetic_text_document"]
    assert resolved.data.tokenizer == str(tmp_path / "examples" / "data" / "tokenizer.json")
    assert resolved.checkpoint.dir == str(tmp_path / "runs" / "tiny" / "checkpoints")
    assert resolved.metrics.port == 40123
    assert [s.weight for s in resolved.data.sources] == [2, 1]
    assert resolved.training.train_steps == 10
    assert config.data.sources[0].path == "data/stories_text_document"  # the input is left as it was
    assert TrainerConfig.model_validate(resolved.model_dump(by_alias=True)) == resolved


def test_steps_override_replaces_a_token_budget(tmp_path):
    resolved = resolve_config(tiny_config(trainTokens=10_000), base_dir=tmp_path, train_steps=7)
    assert (resolved.training.train_steps, resolved.training.train_tokens) == (7, None)
    assert resolved.checkpoint.dir is None and resolved.metrics.port == 9400  # not asked: unchanged


def test_run_dir_defaults_to_runs_name_under_the_current_directory(tmp_path):
    assert launch.run_dir("tiny", None, tmp_path) == tmp_path / "runs" / "tiny"
    assert launch.run_dir("tiny", "out/x", tmp_path) == tmp_path / "out" / "x"
    assert launch.run_dir("tiny", "/abs/x", tmp_path) == Path("/abs/x")


# ------------------------------------------------------------------------- progress


def exposition(**values) -> str:
    """A real Prometheus exposition, labelled like the trainer's."""
    registry = CollectorRegistry()
    for name, value in values.items():
        gauge = Gauge(name, "doc", ["namespace", "run", "node_rank"], registry=registry)
        gauge.labels("local", "tiny", "0").set(value)
    return generate_latest(registry).decode()


def test_parse_metrics_reads_step_target_loss_and_throughput():
    text = exposition(
        bloomrun_train_step=42,
        bloomrun_train_target_steps=300,
        bloomrun_train_loss=3.25,
        bloomrun_train_tokens_per_second=12345.6,
        bloomrun_train_learning_rate=1e-3,
    )
    assert parse_metrics(text) == Snapshot(step=42, target_steps=300, loss=3.25, tokens_per_second=12345.6)


def test_parse_metrics_is_none_before_the_first_step_and_hides_a_nan_loss():
    assert parse_metrics(exposition(bloomrun_train_learning_rate=0.1)) is None
    snapshot = parse_metrics(exposition(bloomrun_train_step=3, bloomrun_train_loss=math.nan))
    assert snapshot.loss is None and snapshot.target_steps is None
    assert "loss -" in describe(snapshot, None)


def test_eta_comes_from_the_observed_pace_not_from_the_jump_to_a_resumed_step():
    rate = StepRate()
    rate.observe(0.0, 100)  # resumed at step 100: no pace known yet
    assert rate.eta_seconds(100, 300) is None
    rate.observe(10.0, 120)  # 2 steps/s
    assert rate.eta_seconds(120, 300) == pytest.approx(90.0)
    rate.observe(11.0, 50)  # rolled back: the old pace no longer applies
    assert rate.steps_per_second() is None


def test_progress_display_prints_plain_lines_when_not_on_a_terminal():
    out = io.StringIO()
    with ProgressDisplay("tiny", stream=out) as display:
        display.log("step 1 loss 6.9")
        display.update(Snapshot(step=1, target_steps=10, loss=6.9, tokens_per_second=100.0))
        display.log("step 2 loss 6.5")
    assert out.getvalue() == "step 1 loss 6.9\nstep 2 loss 6.5\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_display_draws_step_loss_throughput_and_eta_on_a_terminal():
    out = Terminal()
    with ProgressDisplay("tiny", stream=out) as display:
        display.update(Snapshot(step=10, target_steps=300, loss=4.0, tokens_per_second=900.0), now=0.0)
        display.log("a worker line")
        display.update(Snapshot(step=20, target_steps=300, loss=3.25, tokens_per_second=1234.0), now=5.0)
    text = out.getvalue()
    assert "a worker line" in text
    assert "20/300" in text and "loss 3.2500" in text and "tokens/s 1,234" in text
    assert "ETA 2:20" in text  # 280 steps at 2 steps/s


# ------------------------------------------------------------------------- prepare


def prepare_args(manifest, **overrides):
    import argparse

    values = {"manifest": str(manifest), "nproc": 2, "output": None, "steps": None, "fresh": False, "max_restarts": 3}
    return argparse.Namespace(**{**values, **overrides})


def test_prepare_writes_the_resolved_config_and_builds_the_launch(tmp_path):
    import yaml

    from bloomrun.cli.run import prepare

    manifest = elastic.REPO_ROOT / "examples" / "tiny.yaml"
    plan = prepare(prepare_args(manifest, steps=7), env={"BLOOMRUN_CACHE": str(tmp_path / "cache")}, cwd=tmp_path)
    assert plan.run_dir == tmp_path / "runs" / "tiny"
    written = TrainerConfig.model_validate(yaml.safe_load(plan.config_path.read_text()))
    assert written.checkpoint.dir == str(tmp_path / "runs" / "tiny" / "checkpoints")
    assert written.data.sources[0].path == str(elastic.REPO_ROOT / "examples" / "data" / "stories_text_document")
    assert written.training.train_steps == 7
    assert plan.metrics_url == f"http://127.0.0.1:{written.metrics.port}/metrics"
    assert option(plan.command, "--log-dir") == str(tmp_path / "cache" / "torchrun")
    assert plan.command[-1] == str(plan.config_path)
    assert plan.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert plan.env["BLOOMRUN_METRICS_PORT_FILE"] == str(tmp_path / "runs" / "tiny" / "metrics-port")


def test_fresh_deletes_old_checkpoints_but_only_once_the_input_is_valid(tmp_path):
    import yaml

    from bloomrun.cli.main import UserError
    from bloomrun.cli.run import prepare

    old = tmp_path / "runs" / "tiny" / "checkpoints" / "step-00000050"
    old.mkdir(parents=True)
    broken = tmp_path / "broken.yaml"
    document = yaml.safe_load((elastic.REPO_ROOT / "examples" / "tiny.yaml").read_text())
    document["spec"]["data"]["sources"][0]["path"] = "nowhere/corpus"
    broken.write_text(yaml.safe_dump(document))
    with pytest.raises(UserError, match=r"spec\.data\.(tokenizer|sources)"):
        prepare(prepare_args(broken, fresh=True), env={}, cwd=tmp_path)
    assert old.exists()
    prepare(prepare_args(elastic.REPO_ROOT / "examples" / "tiny.yaml", fresh=True), env={}, cwd=tmp_path)
    assert not old.exists()


# ------------------------------------------------------------------ terminal display

TRAINER = "2026-12-01 05:43:27,101 [rank 0] {level} bloomrun.trainer: {message}"
STEP = "step 50/300 | loss 3.2650 | grad_norm 0.458 | lr 2.924e-03 | tokens/s 16266 | TFLOP/s 0.01 | MFU n/a | mem 0.96 GB"


def test_trainer_lines_are_sorted_from_deepspeeds_and_torchruns_own_output():
    from bloomrun.cli.progress import sort_line

    step = sort_line(TRAINER.format(level="INFO", message=STEP))
    assert step.trainer and step.short == f"05:43:27 {STEP}"
    assert step.snapshot == Snapshot(step=50, target_steps=300, loss=3.265, tokens_per_second=16266.0)
    warning = sort_line(TRAINER.format(level="WARNING", message="SIGTERM: checkpoint at step 52 saved, stopping"))
    assert warning.short == "05:43:27 WARNING SIGTERM: checkpoint at step 52 saved, stopping"
    saved = sort_line(TRAINER.format(level="INFO", message="checkpoint step 52 saved to x in 0.1 s"))
    assert saved.step == 52 and saved.snapshot is None
    assert sort_line("error: /x/checkpoints is in use by another trainer (pid 7 on host h since ...)").trainer
    for noise in (
        "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
        "[2026-12-01 05:40:17,101] [WARNING] [engine.py:2304:_do_optimizer_sanity_check] **** You are using "
        "ZeRO with an untested optimizer, proceed with caution *****",
        "W1201 05:40:17.123000 123 torch/distributed/run.py:766] Setting OMP_NUM_THREADS ...",
        "Traceback (most recent call last):",
        "2026-12-01 05:43:27,101 [rank 0] INFO torch.distributed.distributed_c10d: Added key: store_based_barrier",
    ):
        assert not sort_line(noise).trainer, noise


def test_other_output_is_hidden_unless_verbose_and_kept_for_a_failure():
    out = io.StringIO()
    with ProgressDisplay("tiny", stream=out) as display:
        display.worker_line("DeepSpeed op built successfully")
        display.worker_line(TRAINER.format(level="INFO", message=STEP))
    assert out.getvalue() == TRAINER.format(level="INFO", message=STEP) + "\n"  # as written, off a terminal
    assert list(display.hidden) == ["DeepSpeed op built successfully"]
    out = io.StringIO()
    with ProgressDisplay("tiny", stream=out, verbose=True) as display:
        display.worker_line("DeepSpeed op built successfully")
    assert out.getvalue() == "DeepSpeed op built successfully\n"


@pytest.mark.parametrize("width", [30, 80, 160])
def test_the_status_line_never_exceeds_the_width(width):
    from bloomrun.cli.progress import StatusLine

    line = StatusLine("a-run-with-a-rather-long-name-indeed")
    assert len(line.text(width)) <= width
    line.step, line.total, line.info = 123456, 1000000, "loss 3.2500  tokens/s 1,234,567  ETA 123:45:00"
    text = line.text(width)
    assert len(text) <= width and (width < 80 or "step 123456/1000000" in text.plain)


def test_a_terminal_shows_the_trainer_lines_short_and_cut_to_its_width():
    out = Terminal()
    display = ProgressDisplay("tiny", stream=out)
    display.console.width = 40
    with display:
        display.worker_line(TRAINER.format(level="INFO", message=STEP))
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())  # the cursor moves
    shown = [line for line in plain.splitlines() if "step 50/300 |" in line]
    assert shown and all(len(line.rstrip()) <= 40 and line.rstrip().endswith("…") for line in shown)
    assert display.status.step == 50 and display.status.total == 300  # the bar follows the line at once


# ------------------------------------------------------------------ a finished run


def finished_run(tmp_path, step: int, meta: dict | None = None):
    import json

    from bloomrun.cli.run import Launch

    folder = tmp_path / "checkpoints" / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "metadata.json").write_text(json.dumps({"step": step, "tokens": step * 1024, **(meta or {})}))
    (tmp_path / "checkpoints" / f"step-{step + 50:08d}").mkdir()  # a newer one, never completed
    return Launch("tiny", [], {}, tmp_path, tmp_path / "config.yaml", "", tmp_path / "checkpoints", 300)


def test_a_run_whose_newest_complete_checkpoint_reached_its_length_is_complete(tmp_path):
    from bloomrun.cli.run import completed

    finished = finished_run(tmp_path / "a", 300, {"loss": 1.44921})
    assert completed(finished) == "at step 300 (loss 1.4492, 307,200 tokens)"
    assert completed(finished_run(tmp_path / "b", 300)) == "at step 300 (307,200 tokens)"  # older checkpoints
    assert completed(finished_run(tmp_path / "c", 250)) is None
    assert completed(dataclasses.replace(finished_run(tmp_path / "d", 300), checkpoint_dir=tmp_path / "none")) is None
