"""The trainer as a worker pod runs it: the operator's ConfigMap, command and environment
(desired.py) for a tiny single-node, single-worker CPU run, started as a non-root user in a
read-only working directory, trains two steps and writes its checkpoint.

The kwok tests never start a container, so this is what catches a trainer that cannot run
in its pod: it once wrote its metrics port to <checkpoint.dir>/../metrics-port, which is
/metrics-port in a pod, and local rank 0 exited 1 on every real node. What is swapped for
this machine: the folders where volumes would be mounted (named by the run's own
checkpointVolume/dataVolume mount paths; the ConfigMap's is the operator's constant), the
image's venv and /tmp, and the rendezvous host's DNS name (a headless Service's)."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from bloomrun.operator import desired
from bloomrun.operator.spec import parse_manifest
from bloomrun.trainer import checkpoint as ckpt
from bloomrun.trainer import elastic

REPO = Path(__file__).resolve().parents[2]
STEPS = 2


def image_env(home: Path, tmp: Path) -> dict[str, str]:
    """The trainer image's own ENV (Dockerfile, final stage), its venv and /tmp swapped for
    this machine's, and HOME the read-only working directory (a read-only root filesystem)."""
    final_stage = (REPO / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1].replace("\\\n", " ")
    env = {}
    for line in final_stage.splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    # /tmp first: the venv swapped in may itself live under /tmp (a clone there).
    swapped = {key: value.replace("/tmp", str(tmp)).replace("/opt/venv/bin", str(Path(sys.executable).parent))
               .replace("$PATH", "/usr/bin:/bin") for key, value in env.items()}
    assert {"PATH", "HOME", "TRITON_CACHE_DIR", "TORCH_EXTENSIONS_DIR"} <= set(swapped), env
    return swapped | {"HOME": str(home), "TMPDIR": str(tmp)}


def pod_user() -> tuple[list[str], pwd.struct_passwd | None]:
    """A command prefix that drops to `nobody` when we are root (the pod runs as uid 1000 with
    runAsNonRoot), and that user; a non-root test user is non-root already. Here the
    interpreter may live under /root (mode 0700): CAP_DAC_READ_SEARCH lets the user read and
    traverse it, and write nothing a plain non-root user could not."""
    if os.geteuid() != 0:
        return [], None
    nobody = pwd.getpwnam("nobody")
    assert shutil.which("setpriv"), "setpriv (util-linux) is needed to drop root"
    return ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
            "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"], nobody


def folders(root: Path) -> dict[str, Path]:
    """The checkpoint volume and /tmp writable by the pod's user (fsGroup does that in a pod),
    the working directory and everything else read-only to it."""
    paths = {name: root / name for name in ("checkpoints", "config", "home", "tmp")}
    for path in paths.values():
        path.mkdir()
    _, user = pod_user()
    for name in ("checkpoints", "tmp"):
        if user:
            os.chown(paths[name], user.pw_uid, user.pw_gid)
    paths["home"].chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
    return paths


def tiny_run(checkpoints: Path) -> desired.Run:
    """examples/tiny.yaml (one CPU worker pod) for two steps, its data volume being the
    examples folder (the manifest's data paths are relative to it)."""
    document = yaml.safe_load((REPO / "examples" / "tiny.yaml").read_text())
    spec = document["spec"]
    spec["training"]["trainSteps"] = STEPS
    spec["optim"]["warmupTokens"] = STEPS * spec["training"]["globalBatchSize"] * 64  # within the run
    spec["checkpoint"]["everySteps"] = STEPS
    spec["metrics"]["port"] = 0  # a free port: tests share this machine
    spec["checkpointVolume"] = {"claimName": "checkpoints", "mountPath": str(checkpoints)}
    spec["dataVolume"] = {"claimName": "demo-data", "mountPath": str(REPO / "examples")}
    spec = parse_manifest(document).spec
    return desired.Run("tiny", "team-a", "0f6c1a2e-uid", 1, spec)


def store_command(run: desired.Run, port: int) -> list[str]:
    """The rendezvous store pod's command (its Deployment's), on a local port."""
    store = next(o for o in desired.desired_infra(run) if o["kind"] == "Deployment")
    command = store["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[0] == "python"
    return [sys.executable, *command[1:-1], f"--port={port}"]


def pod_command(run: desired.Run, config_dir: Path, endpoint: str) -> tuple[list[str], dict[str, str]]:
    """The worker container's command and env, and its ConfigMap written where it is mounted."""
    config_map = next(o for o in desired.desired_infra(run) if o["kind"] == "ConfigMap")
    for name, text in config_map["data"].items():
        (config_dir / name).write_text(text)
    container = desired.desired_worker(run, 0)["spec"]["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["config"] == desired.CONFIG_DIR
    command = [arg.replace(desired.CONFIG_DIR, str(config_dir))
               .replace(desired.rendezvous_endpoint(run), endpoint) for arg in container["command"]]
    assert command != container["command"]
    return command, {e["name"]: e["value"] for e in container["env"]}


def test_the_worker_pods_trainer_trains_and_checkpoints_as_non_root_in_a_read_only_directory():
    with tempfile.TemporaryDirectory(prefix="bloomrun-pod-") as root:
        Path(root).chmod(0o755)  # the pod's user reaches its folders (mkdtemp makes it 0700)
        paths = folders(Path(root))
        run = tiny_run(paths["checkpoints"])
        port = elastic.free_ports(1)[0]
        command, pod_env = pod_command(run, paths["config"], f"127.0.0.1:{port}")
        env = image_env(paths["home"], paths["tmp"]) | pod_env
        prefix, _ = pod_user()
        # The run's rendezvous store, as its own pod would run it (the worker only joins it).
        store = subprocess.Popen([*prefix, *store_command(run, port)], cwd=paths["home"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            result = subprocess.run([*prefix, *command], cwd=paths["home"], env=env, capture_output=True,
                                    text=True, timeout=600)
        finally:
            store.terminate()
            store_code = store.wait(30)
        output = result.stdout + result.stderr
        assert result.returncode == 0, output[-4000:]
        assert store_code == 0  # SIGTERM ends the store cleanly
        found = ckpt.newest_complete(paths["checkpoints"] / "team-a" / "tiny" / "0f6c1a2e-uid")  # the run's own
        assert found is not None and found[1]["step"] == STEPS, output[-4000:]
        assert found[1]["run"] == {"namespace": "team-a", "name": "tiny", "uid": "0f6c1a2e-uid"}
        assert not any(Path(root).rglob("metrics-port*"))  # the operator does not ask for one
