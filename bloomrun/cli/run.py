"""`bloomctl run MANIFEST`: train a BloomRun manifest on this machine with torchrun.

Everything about the manifest and the data is checked before a worker starts; then torchrun
runs the trainer with the resolved config, and this process shows progress and forwards
Ctrl-C/SIGTERM as SIGTERM, on which the trainer saves a checkpoint and exits. Running the
same command again resumes from the newest complete checkpoint, or says at once that the
run is complete. One trainer writes a run folder at a time: a second is refused, naming
the first one's PID, and torchrun dies with this process however it is killed.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path


from bloomrun.cli import launch
from bloomrun.cli.main import UserError
from bloomrun.cli.progress import ProgressDisplay, parse_metrics
from bloomrun.trainer import elastic, runlock
from bloomrun.trainer.checkpoint_layout import newest_metadata

SCRAPE_EVERY_S = 1.0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "run",
        help="train a BloomRun manifest locally with torchrun (the embedded default)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("manifest", help="BloomRun manifest (YAML), e.g. examples/tiny.yaml")
    parser.add_argument("--nproc", type=positive_int, default=2, help="worker processes (default 2)")
    parser.add_argument("--output", help="run folder (default runs/<metadata.name>)")
    parser.add_argument("--steps", type=positive_int, help="train this many steps in all instead")
    parser.add_argument("--fresh", action="store_true", help="delete the run's checkpoints first")
    parser.add_argument(
        "--max-restarts", type=int, default=3, help="worker-group restarts torchrun may do (default 3)"
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show torchrun's and DeepSpeed's own output too (hidden unless a run fails)")
    parser.set_defaults(func=run)


@dataclass(frozen=True)
class Launch:
    name: str
    command: list[str]
    env: dict[str, str]
    run_dir: Path
    config_path: Path
    metrics_url: str
    checkpoint_dir: Path
    target_steps: int


def run(args: argparse.Namespace) -> int:
    plan = prepare(args, env=os.environ, cwd=Path.cwd())
    done = completed(plan)
    if done is not None:
        print(f"{plan.name}: already complete {done}", flush=True)
        return 0
    return supervise(plan, verbose=getattr(args, "verbose", False))


def prepare(args: argparse.Namespace, env, cwd: Path) -> Launch:
    """Load and check the manifest and its data, write the resolved config: every user
    error surfaces here as a UserError, before any worker starts."""
    from bloomrun.trainer.resolve import config_yaml, resolve_config
    from bloomrun.trainer.schedule import run_length

    manifest = Path(args.manifest)
    bloomrun = load(manifest)
    name = bloomrun.metadata.name
    out = launch.run_dir(name, args.output, cwd).absolute()
    rdzv_port, metrics_port = elastic.free_ports(2)
    config = resolve_config(bloomrun.spec.trainer_config(), base_dir=manifest.parent.absolute(),
                            checkpoint_dir=out / "checkpoints", runs_root=out.parent, metrics_port=metrics_port,
                            train_steps=args.steps)
    check_data(config, manifest)
    # Before --fresh deletes anything: a live trainer's folder is left alone (the trainer
    # takes the lock itself; this says so at once instead of after its start-up).
    in_use = runlock.holder(Path(config.checkpoint.dir))
    if in_use is not None:
        raise UserError(runlock.refusal(Path(config.checkpoint.dir), in_use))

    if args.fresh and (out / "checkpoints").exists():
        shutil.rmtree(out / "checkpoints")
    out.mkdir(parents=True, exist_ok=True)
    config_path = out / "config.yaml"
    config_path.write_text(config_yaml(config))
    cache = elastic.cache_dir(env)
    rendezvous = elastic.Rendezvous(f"127.0.0.1:{rdzv_port}", run_id=f"{name}-{uuid.uuid4().hex[:8]}")
    command = elastic.build_torchrun_command(elastic.Launch(
        str(config_path), rendezvous, nproc=args.nproc, max_restarts=args.max_restarts,
        launcher=(sys.executable, "-m", "torch.distributed.run"), log_dir=str(cache / "torchrun")))
    worker_env = launch.build_worker_env(env, cache=cache, nproc=args.nproc, num_cpus=usable_cpus(),
                                         run_name=name, metrics_port_file=out / "metrics-port")
    target_steps, _tokens = run_length(config.training, config.model.shape().seq_length)
    return Launch(name, command, worker_env, out, config_path, f"http://127.0.0.1:{metrics_port}/metrics",
                  Path(config.checkpoint.dir), target_steps)


def load(manifest: Path):
    from bloomrun.operator.spec import ManifestError, load_manifest

    if not manifest.is_file():
        raise UserError(f"{manifest}: no such manifest file")
    try:
        return load_manifest(manifest)
    except ManifestError as err:
        raise UserError(str(err)) from None


def check_data(config, manifest: Path) -> None:
    from bloomrun.trainer.data import DataError, data_cache_dir, validate_data

    shape = config.model.shape()
    try:
        # The run's data cache, as the trainer uses it: the full token scan happens once per
        # data file, not on every `bloomctl run` of a large corpus.
        validate_data(config.data, shape.vocab_size, seq_length=shape.seq_length,
                      cache_dir=data_cache_dir(config.checkpoint.dir))
    except (DataError, OSError) as err:
        # DataError names the field from the spec down (data.sources[1] ...).
        where = "spec." if str(err).startswith("data.") else ""
        raise UserError(f"{manifest}: {where}{err}") from None


def usable_cpus() -> int:
    """Cores this process may run on (a container's or taskset's limit, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def completed(plan: Launch) -> str | None:
    """'at step 300 (loss 1.4492, 307,200 tokens)' when the newest checkpoint reached the
    run's length, else None (then torchrun starts)."""
    newest = newest_metadata(plan.checkpoint_dir)
    return describe_checkpoint(newest) if newest and newest.get("step", -1) >= plan.target_steps else None


def describe_checkpoint(meta: dict, loss: float | None = None) -> str:
    loss = loss if meta.get("loss") is None else meta["loss"]  # None: non-finite, or an older checkpoint
    parts = ([f"loss {loss:.4f}"] if loss is not None else []) + [f"{meta.get('tokens', 0):,} tokens"]
    return f"at step {meta['step']} ({', '.join(parts)})"


def shorter(path: Path) -> str:
    """A path relative to the current folder when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


# ------------------------------------------------------------------------ supervising


def supervise(plan: Launch, verbose: bool = False) -> int:
    """Run torchrun, stream its output, show progress; return the training's exit code."""
    # Its own session: a terminal's Ctrl-C reaches only us, and we forward one SIGTERM, on
    # which torchrun stops its workers the way the trainer expects (checkpoint, exit 0).
    # If we die without forwarding (SIGKILL, an OOM kill), the kernel sends torchrun that
    # SIGTERM (runlock.die_with_parent; this is the main thread, which lives as long as we do).
    proc = subprocess.Popen(
        plan.command,
        env=plan.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        bufsize=1,
        start_new_session=True,
        preexec_fn=runlock.die_with_parent(signal.SIGTERM),
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=pump, args=(proc.stdout, lines), daemon=True).start()
    stopper = Stopper(proc)
    try:
        with stopper.installed(), ProgressDisplay(plan.name, verbose=verbose) as display:
            display.log(f"bloomctl run {plan.name}: {shorter(plan.run_dir)}/, metrics {plan.metrics_url}")
            stream(lines, display, plan.metrics_url, stopper)
            code = proc.wait()
            if code == 0 and stopper.signal is None:  # the trainer exits 0 unasked only once complete
                display.finish((newest_metadata(plan.checkpoint_dir) or {}).get("loss"))
    finally:
        if proc.poll() is None:  # we failed ourselves: leave no orphaned workers behind
            kill_tree(proc.pid)
    if stopper.signal:
        newest = newest_metadata(plan.checkpoint_dir)
        where = f" at step {newest['step']} (checkpoint saved)" if newest else ""
        print(f"{plan.name}: stopped by {stopper.signal.name}{where}; run the same command again to resume", flush=True)
        return 128 + stopper.signal.value
    if code != 0:
        if display.hidden and not verbose:
            print(f"torchrun exited {code}; its last {len(display.hidden)} lines of other output:", flush=True)
            print("\n".join(display.hidden), flush=True)
        return code
    print(summary(plan, display), flush=True)
    return code


def summary(plan: Launch, display: ProgressDisplay) -> str:
    newest = newest_metadata(plan.checkpoint_dir)
    loss = display.last.loss if display.last else None  # older checkpoints carry none
    return f"{plan.name}: complete {describe_checkpoint(newest, loss)}" if newest else f"{plan.name}: complete"


def pump(pipe, lines: queue.Queue) -> None:
    for line in pipe:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def stream(lines: queue.Queue, display: ProgressDisplay, metrics_url: str, stopper: Stopper | None = None) -> None:
    """Print worker lines as they come and refresh the bar every SCRAPE_EVERY_S, until EOF."""
    next_scrape = 0.0
    while True:
        try:
            line = lines.get(timeout=SCRAPE_EVERY_S / 2)
        except queue.Empty:
            line = ""
        if line is None:
            return
        if stopper is not None and (notice := stopper.notice()):
            display.log(notice)
        if line:
            display.worker_line(line)
        if time.monotonic() >= next_scrape:
            next_scrape = time.monotonic() + SCRAPE_EVERY_S
            snapshot = scrape(metrics_url)
            if snapshot:
                display.update(snapshot)


def scrape(url: str):
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return parse_metrics(response.read().decode())
    except (OSError, ValueError):  # not up yet, restarting, or gone
        return None


class Stopper:
    """First Ctrl-C/SIGTERM/SIGHUP: forward SIGTERM to torchrun (the trainer checkpoints and
    exits). A second one: SIGKILL torchrun and every worker."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.signal: signal.Signals | None = None
        self.announced = False

    def notice(self) -> str | None:
        """The line to show once a stop began. Shown by the main loop, not the handler: a
        print from a signal handler lands in the middle of the status line."""
        if self.signal is None or self.announced:
            return None
        self.announced = True
        return "stopping: the trainer saves a checkpoint (Ctrl-C again to kill)"

    def handle(self, signum, _frame) -> None:
        if self.signal is None:
            self.signal = signal.Signals(signum)
            self.proc.send_signal(signal.SIGTERM)
        else:
            kill_tree(self.proc.pid)

    def installed(self):
        stack = ExitStack()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            previous = signal.signal(signum, self.handle)
            stack.callback(signal.signal, signum, previous)
        return stack


def kill_tree(pid: int) -> None:
    import psutil

    try:
        root = psutil.Process(pid)
        for process in [*root.children(recursive=True), root]:
            process.kill()
    except psutil.NoSuchProcess:
        pass
