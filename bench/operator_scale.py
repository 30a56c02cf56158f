"""Operator performance on the kwok cluster with the real apiserver and scheduler.

Measures (issue 5, Performance):
  1. `create` -> all pods bound, for one run of --big nodes;
  2. the same for --runs concurrent runs of --run-size nodes (p50/p99 over runs);
  3. pod failure -> replacement pod created (p50/p99 over --failures failures);
  4. the operator process's CPU seconds and peak RSS over the whole benchmark.

    .venv/bin/python bench/operator_scale.py --nodes 2000 --runs 200 --run-size 8 --big 64

Not part of the test suite. Prints a Markdown block for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kubernetes import client, watch  # noqa: E402

from bloomrun.operator.spec import GROUP, PLURAL, VERSION  # noqa: E402
from tests.cluster.control_plane import start_cluster  # noqa: E402
from tests.cluster.nodes import POOLS, node_manifest  # noqa: E402
from tests.operator.e2e import Operator  # noqa: E402

POOL = "bench"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class PodClock:
    """Watches pods and remembers when each pod UID was first seen and first bound."""

    def __init__(self, core: client.CoreV1Api, namespace: str):
        self.core, self.namespace = core, namespace
        self.created: dict[str, float] = {}  # uid -> time first seen
        self.bound: dict[str, float] = {}
        self.by_name: dict[str, list[str]] = {}
        self.lock = threading.Lock()
        self.stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self.stop:
            try:
                for event in watch.Watch().stream(self.core.list_namespaced_pod, self.namespace, timeout_seconds=60):
                    pod, now = event["object"], time.monotonic()
                    with self.lock:
                        if pod.metadata.uid not in self.created:
                            self.created[pod.metadata.uid] = now
                            self.by_name.setdefault(pod.metadata.name, []).append(pod.metadata.uid)
                        if pod.spec.node_name and pod.metadata.uid not in self.bound:
                            self.bound[pod.metadata.uid] = now
                    if self.stop:
                        return
            except Exception as err:  # a dropped watch: reopen
                print(f"watch reopened: {err}", file=sys.stderr)

    def bound_count(self, prefix: str) -> int:
        with self.lock:
            return sum(1 for name, uids in self.by_name.items() if name.startswith(prefix) and uids[-1] in self.bound)

    def last_created(self, prefix: str) -> float:
        with self.lock:
            return max(self.created[uids[-1]] for name, uids in self.by_name.items() if name.startswith(prefix))

    def last_bound(self, prefix: str) -> float:
        with self.lock:
            return max(self.bound[uids[-1]] for name, uids in self.by_name.items()
                       if name.startswith(prefix) and uids[-1] in self.bound)


CHECKPOINT_CLAIM = "checkpoints"


def manifest(name: str, namespace: str, size: int) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BloomRun", "metadata": {"name": name, "namespace": namespace},
            "spec": {"data": {"sources": [{"path": "/data/x"}]}, "training": {"trainSteps": 10},
                     "nodes": {"min": size, "max": size}, "gpusPerNode": 8,
                     # The nodes of a run share their checkpoints through a claim (main() creates it).
                     "checkpointVolume": {"claimName": CHECKPOINT_CLAIM},
                     "pool": {"nodeSelector": {"bloomrun.io/pool": POOL}},
                     "restartPolicy": {"backoffSeconds": 0, "maxRestarts": 1000}}}


def process_usage(pid: int) -> tuple[float, int]:
    """CPU seconds (user+system) and peak RSS bytes of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    peak = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("VmHWM:"))
    return cpu, peak


def wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise TimeoutError(what)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--run-size", type=int, default=8)
    parser.add_argument("--big", type=int, default=64)
    parser.add_argument("--failures", type=int, default=20)
    args = parser.parse_args()

    started = time.monotonic()
    cluster = start_cluster()
    try:
        core = client.CoreV1Api(cluster.api())
        custom = client.CustomObjectsApi(cluster.api())
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "bloomrun.io_bloomruns.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", "crd/bloomruns.bloomrun.io", "--timeout=60s")
        pool = POOLS["a100-80gb"]
        bench_pool = type(pool)(name=POOL, capacity=pool.capacity, allocatable=pool.allocatable,
                                labels=pool.labels, taints=pool.taints)
        t0 = time.monotonic()
        with ThreadPoolExecutor(16) as pool_exec:
            list(pool_exec.map(lambda i: core.create_node(node_manifest(f"a100-{i:04d}", bench_pool)), range(args.nodes)))
        wait(lambda: sum(1 for n in core.list_node(label_selector=f"bloomrun.io/pool={POOL}").items
                         if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])) == args.nodes,
             600, "nodes Ready")
        print(f"{args.nodes} kwok nodes Ready in {time.monotonic() - t0:.1f} s", file=sys.stderr)

        namespace = cluster.new_namespace("bench")
        cluster.create_pvc(namespace, CHECKPOINT_CLAIM)
        clock = PodClock(core, namespace)
        operator = Operator(cluster, "--standalone", timer_interval=None)  # the operator's own timer interval
        # Measure a warm operator: one small run first, so start-up (watches, the pod index)
        # is not counted in the first figure.
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("warmup", namespace, 1))
        wait(lambda: clock.bound_count("warmup-worker-") == 1, 300, "warm-up run bound")
        results: dict[str, str] = {}

        # 1. one big run
        t_create = time.monotonic()
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest("big", namespace, args.big))
        wait(lambda: clock.bound_count("big-worker-") == args.big, 600, "big run bound")
        big_s = clock.last_bound("big-worker-") - t_create
        results[f"1 run x {args.big} nodes: create -> all pods created (operator)"] = \
            f"{clock.last_created('big-worker-') - t_create:.2f} s"
        results[f"1 run x {args.big} nodes: create -> all pods bound"] = f"{big_s:.2f} s"
        print(results, file=sys.stderr)

        # 2. many concurrent runs
        names = [f"r{i:03d}" for i in range(args.runs)]
        created_at: dict[str, float] = {}

        def create(name: str) -> None:
            created_at[name] = time.monotonic()
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL,
                                                   manifest(name, namespace, args.run_size))
        with ThreadPoolExecutor(16) as pool_exec:
            list(pool_exec.map(create, names))
        wait(lambda: all(clock.bound_count(f"{n}-worker-") == args.run_size for n in names), 1200, "runs bound")
        per_run = [clock.last_bound(f"{n}-worker-") - created_at[n] for n in names]
        per_run_created = [clock.last_created(f"{n}-worker-") - created_at[n] for n in names]
        for q in (50, 99):
            results[f"{args.runs} concurrent runs x {args.run_size} nodes: create -> all pods created "
                    f"(operator), p{q}"] = f"{percentile(per_run_created, q):.2f} s"
        results[f"{args.runs} concurrent runs x {args.run_size} nodes: create -> all bound, p50"] = \
            f"{percentile(per_run, 50):.2f} s"
        results[f"{args.runs} concurrent runs x {args.run_size} nodes: create -> all bound, p99"] = \
            f"{percentile(per_run, 99):.2f} s"
        print(results, file=sys.stderr)

        # 3. failure -> replacement created
        replace = []
        for i in range(args.failures):
            name = f"{names[i % len(names)]}-worker-{i % args.run_size}"
            with clock.lock:
                old = clock.by_name[name][-1]
            t_fail = time.monotonic()
            cluster.fail_pod(namespace, name, exit_code=137)
            wait(lambda: clock.by_name[name][-1] != old, 120, f"replacement of {name}")
            replace.append(clock.created[clock.by_name[name][-1]] - t_fail)
        results["pod failure -> replacement created, p50"] = f"{percentile(replace, 50):.2f} s"
        results["pod failure -> replacement created, p99"] = f"{percentile(replace, 99):.2f} s"

        cpu, peak = process_usage(operator.child.process.pid)
        results["operator CPU over the benchmark"] = f"{cpu:.1f} s (wall {time.monotonic() - started:.0f} s)"
        results["operator peak RSS"] = f"{peak / 2**20:.0f} MiB"
        clock.stop = True
        operator.stop()
    finally:
        cluster.stop()

    print(f"\n### Operator scale ({date.today().isoformat()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; kwok nodes, real kube-apiserver/scheduler)\n")
    print(f"Command: `.venv/bin/python bench/operator_scale.py --nodes {args.nodes} --runs {args.runs} "
          f"--run-size {args.run_size} --big {args.big} --failures {args.failures}`\n")
    print("| measure | value |\n| --- | --- |")
    for key, value in results.items():
        print(f"| {key} | {value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
