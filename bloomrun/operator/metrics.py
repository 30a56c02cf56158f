"""The operator's Prometheus metrics (names and meanings: docs/metrics.md)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bloomrun.operator.spec import PHASES, BloomRunStatus

DEFAULT_PORT = 8080


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.runs = Gauge("bloomrun_operator_runs", "BloomRuns by phase", ["phase"], registry=r)
        self.run_phase = Gauge("bloomrun_run_phase", "1 for the run's current phase",
                               ["namespace", "run", "phase"], registry=r)
        self.nodes_desired = Gauge("bloomrun_run_nodes_desired", "worker pods the run wants",
                                   ["namespace", "run"], registry=r)
        self.nodes_ready = Gauge("bloomrun_run_nodes_ready", "worker pods Running", ["namespace", "run"], registry=r)
        self.gpu_used_seconds = Gauge("bloomrun_run_gpu_used_seconds", "GPU time spent (nodes x GPUs x running time)",
                                    ["namespace", "run"], registry=r)
        self.gpu_budget_seconds = Gauge("bloomrun_run_gpu_budget_seconds", "spec.budget.gpuHours in GPU-seconds",
                                      ["namespace", "run"], registry=r)
        self.restarts = Counter("bloomrun_operator_restarts", "worker replacements by failure class",
                                ["namespace", "run", "reason"], registry=r)
        self.reconcile_seconds = Histogram(
            "bloomrun_operator_reconcile_duration_seconds", "time of one reconcile", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.time_to_running = Histogram(
            "bloomrun_operator_time_to_running_seconds", "creation to all pods Running", registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600))
        self.api_errors = Counter("bloomrun_operator_api_errors", "failed API calls", ["verb"], registry=r)
        for phase in PHASES:
            self.runs.labels(phase=phase).set(0)
        self._phases: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def serve(self, port: int = DEFAULT_PORT) -> None:
        start_http_server(port, registry=self.registry)

    def observe_run(self, namespace: str, name: str, status: BloomRunStatus, budget: float | None) -> None:
        labels = {"namespace": namespace, "run": name}
        for phase in PHASES:
            self.run_phase.labels(phase=phase, **labels).set(1 if status.phase == phase else 0)
        self.nodes_desired.labels(**labels).set(status.nodes.desired)
        self.nodes_ready.labels(**labels).set(status.nodes.ready)
        self.gpu_used_seconds.labels(**labels).set(status.gpu_hours.used * 3600)
        if budget:
            self.gpu_budget_seconds.labels(**labels).set(budget * 3600)
        with self._lock:
            if status.phase:
                self._phases[(namespace, name)] = status.phase
            self._publish_counts()

    def forget_run(self, namespace: str, name: str) -> None:
        """The run is gone: drop its series so dashboards do not show ghosts."""
        for gauge in (self.nodes_desired, self.nodes_ready, self.gpu_used_seconds, self.gpu_budget_seconds):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        for phase in PHASES:
            try:
                self.run_phase.remove(namespace, name, phase)
            except KeyError:
                pass
        with self._lock:
            self._phases.pop((namespace, name), None)
            self._publish_counts()

    def _publish_counts(self) -> None:
        for phase in PHASES:
            self.runs.labels(phase=phase).set(sum(1 for p in self._phases.values() if p == phase))
