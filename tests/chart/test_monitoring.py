"""The alerts and the dashboard, checked without a cluster: names against docs/metrics.md,
syntax with promtool, and each alert's logic with `promtool test rules` on synthetic series."""

from __future__ import annotations

import json
import re
import subprocess
import textwrap
from pathlib import Path

import yaml

from tests.chart.helm import DASHBOARD_SOURCE, REPO, rendered_rules, tool

METRIC = re.compile(r"\bbloomrun_[a-z0-9_]+\b")
REQUIRED_ALERTS = {
    "BloomRunNoProgress", "BloomRunLossNonFinite", "BloomRunLossSpike", "BloomRunRestartsRising",
    "BloomRunCheckpointStale", "BloomRunLowMFU", "BloomRunStuckPending", "BloomRunBudgetNearlySpent",
}
REQUIRED_PANELS = {
    "Tokens/s", "Model TFLOP/s per GPU", "MFU", "Loss", "Learning rate", "Gradient norm",
    "Step progress", "ETA", "Nodes ready vs desired", "Restarts by reason", "Checkpoint age",
    "Checkpoint save time", "GPU-hours used vs budget",
}


def contract_metrics() -> set[str]:
    """Metric names of docs/metrics.md's tables."""
    text = (REPO / "docs" / "metrics.md").read_text()
    return set(re.findall(r"^\| (bloomrun_[a-z0-9_]+) \|", text, flags=re.MULTILINE))


def base_name(series: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", series)


def alert_exprs(groups: dict) -> dict[str, str]:
    return {rule["alert"]: rule["expr"] for group in groups["groups"] for rule in group["rules"]}


def dashboard() -> dict:
    return json.loads(DASHBOARD_SOURCE.read_text())


def panel_exprs(board: dict) -> dict[str, list[str]]:
    return {panel["title"]: [target["expr"] for target in panel["targets"]] for panel in board["panels"]}


def test_alerts_and_panels_use_only_metric_names_of_the_contract():
    known = contract_metrics()
    assert len(known) > 20, "could not read docs/metrics.md"
    used = set(METRIC.findall(json.dumps(alert_exprs(rendered_rules()))))
    used |= set(METRIC.findall(json.dumps(panel_exprs(dashboard()))))
    unknown = {name for name in used if base_name(name) not in known}
    assert not unknown, f"not in docs/metrics.md: {sorted(unknown)}"


def test_every_required_alert_exists_and_promtool_accepts_the_rules(tmp_path: Path):
    groups = rendered_rules()
    assert REQUIRED_ALERTS <= set(alert_exprs(groups))
    rule_file = tmp_path / "rules.yaml"
    rule_file.write_text(yaml.safe_dump(groups))
    out = subprocess.run([tool("promtool"), "check", "rules", str(rule_file)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_alert_thresholds_come_from_values():
    exprs = alert_exprs(rendered_rules({"alerts": {"mfuMinRatio": 0.77, "stalledFor": "42m"}}))
    assert "< 0.77" in exprs["BloomRunLowMFU"]
    assert "[42m]" in exprs["BloomRunNoProgress"]


def test_dashboard_has_the_required_panels_and_filters_every_run_query_by_the_variables():
    board = dashboard()
    variables = {var["name"] for var in board["templating"]["list"]}
    assert {"namespace", "run"} <= variables
    exprs = panel_exprs(board)
    assert REQUIRED_PANELS <= set(exprs)
    operator_wide = {"bloomrun_operator_runs", "bloomrun_operator_reconcile_duration_seconds_bucket"}
    for title, queries in exprs.items():
        for query in queries:
            for metric in set(METRIC.findall(query)) - operator_wide:
                assert re.search(rf'{metric}\{{namespace=~"\$namespace", run=~"\$run"', query), (title, metric)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


# Synthetic series, one per minute: `promtool test rules` evaluates the real rendered rules
# on them, so a wrong comparison or a wrong label match fails here, not in production.
TRAINER = 'namespace="team", run="r1", node_rank="0", job="trainer", instance="p0:9400"'
OPERATOR = 'namespace="team", run="r1", job="operator", instance="op:8080"'
ALERT_CASES = textwrap.dedent(f"""
    tests:
      - interval: 1m
        input_series:
          # r1 stalls at step 50 of 100; r2 finished (step == target) and must stay quiet.
          - series: 'bloomrun_train_step{{{TRAINER}}}'
            values: '0+10x5 50x30'
          - series: 'bloomrun_train_target_steps{{{TRAINER}}}'
            values: '100x35'
          - series: 'bloomrun_train_step{{namespace="team", run="r2", node_rank="0"}}'
            values: '100x35'
          - series: 'bloomrun_train_target_steps{{namespace="team", run="r2", node_rank="0"}}'
            values: '100x35'
          - series: 'bloomrun_train_loss{{{TRAINER}}}'
            values: '4 3.5 3 2.8 2.6 2.5x20 NaN 9x8'  # NaN at 26m, a spike from 27m
          - series: 'bloomrun_train_mfu_ratio{{{TRAINER}}}'
            values: '0.1x35'
          - series: 'bloomrun_checkpoint_interval_seconds{{{TRAINER}}}'
            values: '300x35'
          - series: 'bloomrun_checkpoint_last_timestamp_seconds{{{TRAINER}}}'
            values: '60x35'
          - series: 'bloomrun_operator_restarts_total{{{OPERATOR}, reason="oom-killed"}}'
            values: '0 0 1 2 3 3x30'
          - series: 'bloomrun_run_phase{{{OPERATOR}, phase="Pending"}}'
            values: '1x35'
          - series: 'bloomrun_run_gpu_used_seconds{{{OPERATOR}}}'
            values: '0+1x35'
          - series: 'bloomrun_run_gpu_budget_seconds{{{OPERATOR}}}'
            values: '32x35'
        alert_rule_test:
          - {{eval_time: 4m, alertname: BloomRunNoProgress, exp_alerts: []}}
          - eval_time: 30m
            alertname: BloomRunNoProgress
            exp_alerts: [{{exp_labels: {{severity: critical, namespace: team, run: r1}}}}]
          - {{eval_time: 25m, alertname: BloomRunLossNonFinite, exp_alerts: []}}
          - eval_time: 26m
            alertname: BloomRunLossNonFinite
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1}}}}]
          - {{eval_time: 20m, alertname: BloomRunLossSpike, exp_alerts: []}}
          - eval_time: 33m
            alertname: BloomRunLossSpike
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1}}}}]
          - {{eval_time: 9m, alertname: BloomRunCheckpointStale, exp_alerts: []}}
          - eval_time: 12m
            alertname: BloomRunCheckpointStale
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1}}}}]
          - {{eval_time: 29m, alertname: BloomRunLowMFU, exp_alerts: []}}
          - eval_time: 31m
            alertname: BloomRunLowMFU
            exp_alerts: [{{exp_labels: {{severity: info, namespace: team, run: r1}}}}]
          - {{eval_time: 3m, alertname: BloomRunRestartsRising, exp_alerts: []}}
          - eval_time: 5m
            alertname: BloomRunRestartsRising
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1}}}}]
          - {{eval_time: 29m, alertname: BloomRunStuckPending, exp_alerts: []}}
          - eval_time: 31m
            alertname: BloomRunStuckPending
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1}}}}]
          - {{eval_time: 28m, alertname: BloomRunBudgetNearlySpent, exp_alerts: []}}
          - eval_time: 30m
            alertname: BloomRunBudgetNearlySpent
            exp_alerts: [{{exp_labels: {{severity: info, namespace: team, run: r1}}}}]
""")


def test_each_alert_fires_on_its_condition_and_not_before(tmp_path: Path):
    groups = rendered_rules()
    for group in groups["groups"]:
        for rule in group["rules"]:
            # Prometheus' own templating must survive Helm's: the run's name is filled in late.
            assert "{{ $labels.run }}" in rule["annotations"]["summary"]
            del rule["annotations"]  # promtool would compare them verbatim
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    cases = yaml.safe_load(ALERT_CASES)
    cases["rule_files"] = ["rules.yaml"]
    (tmp_path / "cases.yaml").write_text(yaml.safe_dump(cases))
    out = subprocess.run([tool("promtool"), "test", "rules", "cases.yaml"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
