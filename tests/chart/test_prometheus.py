"""A real Prometheus scrapes a real CPU training run and the real operator reconciling a
BloomRun on the test cluster, with the chart's alert rules loaded: every dashboard query and
every alert's inputs return data, and alerts provoked on purpose fire."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from tests.chart.helm import DASHBOARD_SOURCE, REPO, rendered_rules
from bloomrun.eval import message
from tests.chart.operator_process import apply_run, chart_release, probe_run, running_operator, wait_for_phase
from tests.cluster.nodes import POOLS
from tests.cluster.processes import Child, free_port, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

TRAINED_RUN = "prom-trainer"  # the local training run (namespace "local")
STUDY = "prom"  # a BloomStudy whose first arm, "operator", is the cluster run below
CLUSTER_RUN = "prom-operator"  # the BloomRun the operator reconciles on the test cluster
# Thresholds that make three alerts fire within seconds on healthy data: the run's MFU is
# far below 1e6, its budget of 1 GPU-hour is more than 0.001 spent after ~0.5 s on 8 GPUs,
# and a poisoned data range gives the trainer a non-finite loss it must skip.
PROVOKING_THRESHOLDS = {"mfuMinRatio": 1000000, "mfuFor": "2s", "budgetUsedRatio": 0.001}
PROVOKED = {"BloomRunLowMFU": TRAINED_RUN, "BloomRunLossNonFinite": TRAINED_RUN,
            "BloomRunBudgetNearlySpent": CLUSTER_RUN}
METRIC = re.compile(r"\bbloomrun_[a-z0-9_]+\b")


def trainer_config(folder: Path, metrics_port: int) -> dict:
    data = REPO / "examples" / "data"
    return {
        "model": {"preset": "tiny", "kernels": "torch"},
        "data": {"tokenizer": str(data / "tokenizer.json"), "sources": [
            {"name": "stories", "path": str(data / "stories_text_document"), "weight": 0.6},
            {"name": "arithmetic", "path": str(data / "arithmetic_text_document"), "weight": 0.4}]},
        "optim": {"lr": 3.0e-3, "minLr": 3.0e-4, "warmupTokens": 5120},
        "training": {"globalBatchSize": 8, "microBatchSize": 8, "trainSteps": 100000,
                     "zeroStage": 0, "precision": "fp32"},
        # Saved by steps and by time, so the checkpoint-age series (interval > 0) exist.
        "checkpoint": {"dir": str(folder / "checkpoints"), "everySteps": 5, "everyMinutes": 0.1, "keepLast": 1},
        "metrics": {"port": metrics_port},
    }


def start_trainer(folder: Path, metrics_port: int) -> Child:
    config = folder / "trainer.yaml"
    config.write_text(yaml.safe_dump(trainer_config(folder, metrics_port)))
    port_file = folder / "metrics.port"
    env = {**os.environ, "BLOOMRUN_RUN_NAME": TRAINED_RUN, "BLOOMRUN_METRICS_PORT_FILE": str(port_file),
           # A CPU has no datasheet peak; name one so MFU is a number, not NaN.
           "BLOOMRUN_PEAK_TFLOPS": "0.01",
           # Step 201's batch (samples 1600..1607) gets a NaN loss, as corrupt data would.
           # The alert's increase() needs a scrape of the skipped-steps counter at 0 first:
           # step 11 (0.4 s into training) raced the 1 s scrapes on a loaded machine, while
           # 200 steps take several seconds even when the tiny model runs at full speed.
           "BLOOMRUN_POISON_SAMPLES": "1600:1608"}
    child = Child("trainer", [sys.executable, "-m", "bloomrun.trainer.train", "--config", str(config)],
                  folder / "trainer.log", env=env).start()

    def serving() -> bool:
        if not child.alive():
            raise RuntimeError(f"trainer exited:\n{child.log_tail()}")
        return port_file.exists()
    wait_until(serving, 120, "the trainer's metrics endpoint", 0.5)
    return child


@pytest.fixture(scope="module")
def team_namespace(cluster):
    return cluster.new_namespace("prom-team")


@pytest.fixture(scope="module")
def stack(cluster, tmp_path_factory, team_namespace):
    folder = tmp_path_factory.mktemp("prometheus-stack")
    team = team_namespace
    trainer_port, operator_port = free_port(), free_port()
    # Prometheus first, so it sees every series from its first value on (the skipped-steps
    # counter going from 0 to 1, say).
    rules = folder / "bloomrun-alerts.yaml"
    rules.write_text(yaml.safe_dump(rendered_rules({"alerts": PROVOKING_THRESHOLDS})))
    prometheus = cluster.start_prometheus([
        {"job_name": "trainer", "honor_labels": True,
         # The cluster run's pods run no trainer (kwok), so the local trainer is scraped a
         # second time as that run's trainer, as its pods would report: the study panels join
         # the arm's loss by (namespace, run).
         "static_configs": [{"targets": [f"127.0.0.1:{trainer_port}"]},
                            {"targets": [f"127.0.0.1:{trainer_port}"], "labels": {"as_run": f"{team}/{CLUSTER_RUN}"}}],
         "metric_relabel_configs": [
             {"source_labels": ["as_run"], "regex": "(.+)/(.+)", "target_label": "namespace", "replacement": "$1"},
             {"source_labels": ["as_run"], "regex": "(.+)/(.+)", "target_label": "run", "replacement": "$2"},
             {"action": "labeldrop", "regex": "as_run"}]},
        {"job_name": "operator", "honor_labels": True,
         "static_configs": [{"targets": [f"127.0.0.1:{operator_port}"]}]},
    ], rule_files=[str(rules)])
    trainer = start_trainer(folder, trainer_port)
    try:
        with chart_release(cluster, {"watchNamespaces": [team]}) as release, \
                running_operator(cluster, release, metrics_port=operator_port):
            manifest = probe_run(CLUSTER_RUN, gpu_hours_budget=1)
            manifest["spec"]["restartPolicy"] = {"backoffSeconds": 0}
            # Evaluation on the CPU pool, so the evaluation series exist (one checkpoint scored).
            cluster.create_pvc(team, "checkpoints")
            manifest["spec"]["checkpointVolume"] = {"claimName": "checkpoints"}
            manifest["spec"]["eval"] = {"tasks": ["bloomrun_stories_order", "arc_easy"], "gpus": 0, "pool": {
                "nodeSelector": POOLS["cpu"].selector, "tolerations": POOLS["cpu"].tolerations}}
            # The run is the study's first arm: the study creates it (so the operator exports
            # bloomrun_study_arm_info for it), then gets the evaluation's CPU pool, which a
            # study's eval does not carry.
            apply_run(cluster, team, study_manifest(manifest))
            wait_until(lambda: cluster.kubectl("get", "bloomrun", CLUSTER_RUN, "-n", team, check=False).returncode == 0,
                       60, f"the study creates {CLUSTER_RUN}", 0.5)
            cluster.kubectl("patch", "bloomrun", CLUSTER_RUN, "-n", team, "--type", "merge",
                            "-p", json.dumps({"spec": {"eval": manifest["spec"]["eval"]}}))
            wait_for_phase(cluster, team, CLUSTER_RUN, "Running")
            # One worker failure, so restarts by reason have a series.
            core = client.CoreV1Api(cluster.api())
            pod = core.list_namespaced_pod(team, label_selector=f"bloomrun.io/run={CLUSTER_RUN}").items[0]
            cluster.fail_pod(team, pod.metadata.name, reason="OOMKilled")
            score_a_checkpoint(cluster, team, CLUSTER_RUN)
            try:
                yield prometheus
            finally:
                # The study's runs go with it (owner references).
                cluster.kubectl("delete", "bloomstudy", STUDY, "-n", team, "--wait=false")
    finally:
        trainer.stop()
        prometheus.stop()


def study_manifest(run: dict) -> dict:
    """A BloomStudy whose arm "operator" is `run` (named <study>-<arm>) and whose second arm
    waits for a slot (maxConcurrent 1; the first never finishes here), so nothing else runs."""
    base = {key: value for key, value in run["spec"].items() if key not in ("eval", "budget")}
    training = base["training"]
    return {"apiVersion": "bloomrun.io/v1alpha1", "kind": "BloomStudy", "metadata": {"name": STUDY},
            "spec": {"base": base, "maxConcurrent": 1,
                     "arms": [{"name": CLUSTER_RUN.removeprefix(f"{STUDY}-"), "patch": {}},
                              {"name": "rotary", "patch": {"model": {"position": "rotary"}}}],
                     "compareAtTokens": training["trainSteps"] * training["globalBatchSize"] * 64,  # tiny: seq 64
                     # Two arms of equal cost: each run's share is the run's budget as before.
                     "budget": {"gpuHours": 2 * run["spec"]["budget"]["gpuHours"]},
                     "eval": {"tasks": run["spec"]["eval"]["tasks"]}}}


def score_a_checkpoint(cluster, namespace: str, run: str) -> None:
    """The trainer reports checkpoint 10; its evaluation Job's pod ends with the summary
    `bloomctl eval --summary-file` writes (kwok runs no container)."""
    progress = {"step": 10, "targetSteps": 20, "tokens": 10240, "checkpointStep": 10, "checkpointTokens": 10240}
    custom = client.CustomObjectsApi(cluster.api())
    custom.patch_namespaced_custom_object_status("bloomrun.io", "v1alpha1", namespace, "bloomruns", run,
                                                 {"status": {"progress": progress}})
    core = client.CoreV1Api(cluster.api())

    def running_eval_pod():
        pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={run}-eval-10").items
        return next((p.metadata.name for p in pods if p.status.phase == "Running"), None)
    pod = wait_until(running_eval_pod, 60, "the evaluation pod of checkpoint 10", 0.5)
    cluster.succeed_pod(namespace, pod, message=message.encode(10, 10240, 0.3, 0.0667,
                                                                 {"bloomrun_stories_order": 0.35, "arc_easy": 0.25}))
    custom_status = lambda: ((custom.get_namespaced_custom_object_status(  # noqa: E731
        "bloomrun.io", "v1alpha1", namespace, "bloomruns", run).get("status") or {}).get("evaluation") or {})
    wait_until(lambda: custom_status().get("scored") == 1, 60, "checkpoint 10 scored", 0.5)


def dashboard_queries() -> list[tuple[str, str]]:
    board = json.loads(DASHBOARD_SOURCE.read_text())
    return [(panel["title"], target["expr"]) for panel in board["panels"] for target in panel.get("targets", [])]


def with_all_selected(query: str) -> str:
    """A panel query as Grafana sends it with "All" chosen for every variable."""
    return query.replace("$namespace", ".*").replace("$run", ".*").replace("$study", ".*")


@pytest.mark.parametrize(("title", "query"), dashboard_queries(),
                         ids=[f"{title}-{n}" for n, (title, _) in enumerate(dashboard_queries())])
def test_every_dashboard_query_returns_data(stack, title, query):
    result = stack.wait_for(with_all_selected(query), timeout=90)
    assert result, title


def test_template_variables_list_the_trained_and_the_reconciled_run(stack, team_namespace):
    board = json.loads(DASHBOARD_SOURCE.read_text())
    expected = {"namespace": {"local", team_namespace}, "run": {TRAINED_RUN, CLUSTER_RUN}, "study": {STUDY}}
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        selector, label = re.fullmatch(r"label_values\((.*), (\w+)\)", var["definition"]).groups()

        def listed(selector=selector, label=label):
            return {s["metric"].get(label) for s in stack.query(with_all_selected(selector))}
        wait_until(lambda: listed() >= expected[var["name"]], 60, f"${var['name']} lists {expected[var['name']]}")


def test_every_alert_rule_evaluates_cleanly_on_series_that_exist(stack):
    groups = rendered_rules({"alerts": PROVOKING_THRESHOLDS})["groups"]
    for group in groups:
        for rule in group["rules"]:
            for metric in set(METRIC.findall(rule["expr"])):
                assert stack.wait_for(f'{{__name__="{metric}"}}', timeout=90), (rule["alert"], metric)

    def all_evaluated():
        with urllib.request.urlopen(f"{stack.url}/api/v1/rules", timeout=10) as response:
            loaded = [r for g in json.load(response)["data"]["groups"] for r in g["rules"]]
        return loaded if loaded and all(r.get("lastEvaluation", "").startswith("2") and
                                        not r["lastEvaluation"].startswith("0001") for r in loaded) else None
    loaded = wait_until(all_evaluated, 30, "every rule evaluated once")
    assert {r["name"] for r in loaded} == {r["alert"] for g in groups for r in g["rules"]}
    for rule in loaded:
        assert rule["health"] == "ok" and not rule.get("lastError"), rule


@pytest.mark.parametrize(("alert", "run"), PROVOKED.items())
def test_provoked_alert_fires(stack, alert, run):
    def firing():
        return [a for a in stack.alerts()
                if a["labels"]["alertname"] == alert and a["labels"].get("run") == run and a["state"] == "firing"]
    fired = wait_until(firing, 90, f"{alert} firing for {run}", 1.0)
    assert fired[0]["labels"]["namespace"]


def metric_types(stack) -> dict[str, str]:
    """Prometheus' metadata of what it scraped: family name -> counter, gauge, histogram..."""
    with urllib.request.urlopen(f"{stack.url}/api/v1/metadata", timeout=10) as response:
        return {name: entries[0]["type"] for name, entries in json.load(response)["data"].items()}


def metric_type(types: dict[str, str], series: str) -> str | None:
    # OpenMetrics names a counter's family without `_total` and a histogram's without
    # `_bucket`/`_sum`/`_count`; the text format names the counter with it.
    return types.get(series) or types.get(re.sub(r"_(total|bucket|sum|count)$", "", series))


def test_no_panel_plots_a_raw_counter(stack):
    """A counter's raw value resets with the process that exposes it and only ever grows: a
    panel must plot its rate() or increase(). The types are Prometheus' own, not guessed."""
    used = {m for _, query in dashboard_queries() for m in METRIC.findall(query)}

    def complete() -> dict[str, str] | None:
        types = metric_types(stack)
        return types if all(metric_type(types, m) for m in used) else None
    types = wait_until(complete, 90, "Prometheus has metadata for every metric the dashboard uses")
    for title, query in dashboard_queries():
        for metric in set(METRIC.findall(query)):
            if metric_type(types, metric) in ("counter", "histogram", "summary"):
                assert re.search(rf"\b(rate|irate|increase)\(\s*{metric}\b", query), (
                    f"panel {title!r} plots the raw counter {metric}: {query}")


def test_every_exposed_metric_passes_promtools_linter(stack):
    """`promtool check metrics` on what the trainer and the operator really expose: counters
    end in _total, base units, help text."""
    from tests.chart.helm import tool

    with urllib.request.urlopen(f"{stack.url}/api/v1/targets", timeout=10) as response:
        targets = json.load(response)["data"]["activeTargets"]
    assert {t["labels"]["job"] for t in targets} == {"trainer", "operator"}
    for target in targets:
        with urllib.request.urlopen(target["scrapeUrl"], timeout=10) as response:
            exposition = response.read()
        assert b"bloomrun_" in exposition, target["scrapeUrl"]
        out = subprocess.run([tool("promtool"), "check", "metrics"], input=exposition, capture_output=True)
        problems = (out.stdout + out.stderr).decode().strip()
        assert out.returncode == 0 and not problems, f"{target['labels']['job']}: {problems}"
