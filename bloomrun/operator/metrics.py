"""The operator's Prometheus metrics (names and meanings: docs/metrics.md)."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from bloomrun.operator.goodput import BUCKETS
from bloomrun.operator.spec import Goodput

from bloomrun.operator.spec import PHASES, BloomRunStatus, Evaluation

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
        self.goodput_ratio = Gauge("bloomrun_run_goodput_ratio", "productive GPU-hours / all the run's GPU-hours",
                                   ["namespace", "run"], registry=r)
        self.goodput_seconds = Gauge("bloomrun_run_goodput_gpu_seconds", "the run's GPU-seconds by use (status.goodput)",
                                     ["namespace", "run", "use"], registry=r)
        self.restarts = Counter("bloomrun_operator_restarts", "worker replacements by failure class",
                                ["namespace", "run", "reason"], registry=r)
        self.reconcile_seconds = Histogram(
            "bloomrun_operator_reconcile_duration_seconds", "time of one reconcile", registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.time_to_running = Histogram(
            "bloomrun_operator_time_to_running_seconds", "creation to all pods Running", registry=r,
            buckets=(1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600))
        # Evaluation: the newest checkpoint scored. Its step and tokens are values, not labels:
        # a label per checkpoint would leave one series per task per checkpoint (27 x 63 for
        # one of the paper's runs), each a single point; Grafana plots accuracy against the
        # tokens series instead (docs/metrics.md).
        self.eval_accuracy = Gauge("bloomrun_run_eval_accuracy_ratio", "zero-shot accuracy per task of the "
                                   "newest checkpoint scored", ["namespace", "run", "task"], registry=r)
        self.eval_mean = Gauge("bloomrun_run_eval_mean_accuracy_ratio", "mean zero-shot accuracy over the tasks",
                               ["namespace", "run"], registry=r)
        self.eval_normalised_mean = Gauge(
            "bloomrun_run_eval_normalised_mean_accuracy_ratio",
            "mean of (accuracy - random) / (1 - random) over the tasks", ["namespace", "run"], registry=r)
        self.eval_step = Gauge("bloomrun_run_eval_checkpoint_step", "step of the newest checkpoint scored",
                               ["namespace", "run"], registry=r)
        self.eval_tokens = Gauge("bloomrun_run_eval_checkpoint_tokens", "tokens trained on up to the newest "
                                 "checkpoint scored", ["namespace", "run"], registry=r)
        self.eval_checkpoints = Gauge("bloomrun_run_eval_checkpoints", "checkpoints by evaluation state "
                                      "(scored, failed, running, queued)", ["namespace", "run", "state"], registry=r)
        self._eval_tasks: dict[tuple[str, str], set[str]] = {}
        self.api_errors = Counter("bloomrun_operator_api_errors", "failed API calls", ["verb"], registry=r)
        # Studies: which run is which arm of which study, as an info series (value 1) the
        # dashboard joins the runs' own series with (`* on (namespace, run) group_left (study,
        # arm)`), so no run series needs a study label and a run outside a study is unchanged.
        self.study_arm_info = Gauge("bloomrun_study_arm_info", "1 for each arm run of a BloomStudy",
                                    ["namespace", "study", "arm", "run"], registry=r)
        self.study_budget_seconds = Gauge("bloomrun_study_gpu_budget_seconds", "the study's spec.budget.gpuHours "
                                          "in GPU-seconds", ["namespace", "study"], registry=r)
        self._study_arms: dict[tuple[str, str], dict[str, str]] = {}
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
        self._observe_goodput(labels, status.goodput)
        if budget:
            self.gpu_budget_seconds.labels(**labels).set(budget * 3600)
        if status.evaluation is not None:
            self._observe_evaluation(namespace, name, status.evaluation)
        with self._lock:
            if status.phase:
                self._phases[(namespace, name)] = status.phase
            self._publish_counts()

    def _observe_evaluation(self, namespace: str, name: str, evaluation: Evaluation) -> None:
        labels = {"namespace": namespace, "run": name}
        counts = {"scored": evaluation.scored, "failed": evaluation.failed,
                  "running": len(evaluation.running), "queued": len(evaluation.queued)}
        for state, count in counts.items():
            self.eval_checkpoints.labels(state=state, **labels).set(count)
        if evaluation.step is None:
            return
        self.eval_step.labels(**labels).set(evaluation.step)
        if evaluation.tokens is not None:
            self.eval_tokens.labels(**labels).set(evaluation.tokens)
        for gauge, value in ((self.eval_mean, evaluation.mean), (self.eval_normalised_mean, evaluation.normalised_mean)):
            if value is not None:
                gauge.labels(**labels).set(value)
        with self._lock:
            for task in self._eval_tasks.get((namespace, name), set()) - set(evaluation.tasks):
                self.eval_accuracy.remove(namespace, name, task)
            self._eval_tasks[(namespace, name)] = set(evaluation.tasks)
        for task, value in evaluation.tasks.items():
            self.eval_accuracy.labels(task=task, **labels).set(value)

    def _observe_goodput(self, labels: dict, goodput: Goodput) -> None:
        if goodput.ratio is not None:
            self.goodput_ratio.labels(**labels).set(goodput.ratio)
        for use in BUCKETS:
            self.goodput_seconds.labels(use=use, **labels).set(getattr(goodput, use) * 3600)

    def forget_run(self, namespace: str, name: str) -> None:
        """The run is gone: drop its series so dashboards do not show ghosts."""
        for use in BUCKETS:
            try:
                self.goodput_seconds.remove(namespace, name, use)
            except KeyError:
                pass
        try:
            self.goodput_ratio.remove(namespace, name)
        except KeyError:
            pass
        for gauge in (self.nodes_desired, self.nodes_ready, self.gpu_used_seconds, self.gpu_budget_seconds,
                      self.eval_mean, self.eval_normalised_mean, self.eval_step, self.eval_tokens):
            try:
                gauge.remove(namespace, name)
            except KeyError:
                pass
        for phase in PHASES:
            try:
                self.run_phase.remove(namespace, name, phase)
            except KeyError:
                pass
        for state in ("scored", "failed", "running", "queued"):
            try:
                self.eval_checkpoints.remove(namespace, name, state)
            except KeyError:
                pass
        with self._lock:
            for task in self._eval_tasks.pop((namespace, name), set()):
                self.eval_accuracy.remove(namespace, name, task)
            self._phases.pop((namespace, name), None)
            self._publish_counts()

    def _publish_counts(self) -> None:
        for phase in PHASES:
            self.runs.labels(phase=phase).set(sum(1 for p in self._phases.values() if p == phase))

    def observe_study(self, namespace: str, study: str, arms: dict[str, str], budget_hours: float | None) -> None:
        """The study's arm runs (arm -> BloomRun name) and budget; an arm no longer among them
        (its run not controlled by the study, the study refused, an arm renamed) is dropped."""
        with self._lock:
            for arm, run in self._study_arms.get((namespace, study), {}).items():
                if arms.get(arm) != run:
                    self.study_arm_info.remove(namespace, study, arm, run)
            for arm, run in arms.items():
                self.study_arm_info.labels(namespace=namespace, study=study, arm=arm, run=run).set(1)
            self._study_arms[(namespace, study)] = dict(arms)
        if budget_hours:
            self.study_budget_seconds.labels(namespace=namespace, study=study).set(budget_hours * 3600)
        else:
            self._remove(self.study_budget_seconds, namespace, study)

    def forget_study(self, namespace: str, study: str) -> None:
        """The study is gone (or being deleted): drop its series."""
        self.observe_study(namespace, study, {}, None)
        with self._lock:
            self._study_arms.pop((namespace, study), None)

    @staticmethod
    def _remove(gauge: Gauge, *labels: str) -> None:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass
