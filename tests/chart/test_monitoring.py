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
    "BloomRunStraggler", "BloomRunLowGoodput",
}
REQUIRED_PANELS = {
    "Tokens/s", "Model TFLOP/s per GPU", "MFU", "Loss", "Learning rate", "Gradient norm",
    "Step progress", "ETA", "Nodes ready vs desired", "Restarts by reason", "Checkpoint age",
    "Checkpoint save time", "GPU-hours used vs budget", "Goodput", "GPU-hours by use", "Per-rank compute time",
}
REQUIRED_STUDY_PANELS = {"Loss per arm", "Zero-shot accuracy vs tokens per arm", "GPU-hours per arm vs the study's budget"}
STUDY_ARMS = 'bloomrun_study_arm_info{namespace=~"$namespace", study=~"$study"}'


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
    return {panel["title"]: [target["expr"] for target in panel["targets"]]
            for panel in board["panels"] if panel["type"] != "row"}


def study_row_titles(board: dict) -> set[str]:
    """The panels below the "Study" row (an expanded row holds the panels under it, by position)."""
    row = next(panel for panel in board["panels"] if panel["type"] == "row" and panel["title"] == "Study")
    return {panel["title"] for panel in board["panels"]
            if panel["type"] != "row" and panel["gridPos"]["y"] > row["gridPos"]["y"]}


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
    assert {"namespace", "run", "study"} <= variables
    exprs = panel_exprs(board)
    assert REQUIRED_PANELS <= set(exprs)
    study_panels = study_row_titles(board)
    assert study_panels == REQUIRED_STUDY_PANELS
    operator_wide = {"bloomrun_operator_runs", "bloomrun_operator_reconcile_duration_seconds_bucket"}
    for title, queries in exprs.items():
        for query in queries:
            if title in study_panels:
                assert_filtered_by_the_study(title, query)
                continue
            for metric in set(METRIC.findall(query)) - operator_wide:
                assert re.search(rf'{metric}\{{namespace=~"\$namespace", run=~"\$run"', query), (title, metric)
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"


def assert_filtered_by_the_study(title: str, query: str) -> None:
    """A study panel picks its runs by $study, not $run: a study's metric is filtered by the
    study, a run's metric by the namespace and joined to the arms of the chosen studies (the
    join keeps only their runs and names each by its arm)."""
    for metric in set(METRIC.findall(query)):
        if metric.startswith("bloomrun_study_"):
            assert re.search(rf'{metric}\{{namespace=~"\$namespace", study=~"\$study"\}}', query), (title, metric)
        else:
            assert re.search(rf'{metric}\{{namespace=~"\$namespace"\}}', query), (title, metric)
            assert f"on (namespace, run) group_left (study, arm) {STUDY_ARMS}" in query, (title, metric)


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
          # Three ranks of r1; rank 2 (on node n2) computes 3x as long from 5m on.
          - series: 'bloomrun_train_rank_compute_seconds{{{TRAINER}, rank="0", host="n0"}}'
            values: '0.1x35'
          - series: 'bloomrun_train_rank_compute_seconds{{{TRAINER}, rank="1", host="n0"}}'
            values: '0.1x35'
          - series: 'bloomrun_train_rank_compute_seconds{{namespace="team", run="r1", node_rank="1", rank="2", host="n2"}}'
            values: '0.1x5 0.3x30'
          # r3 runs at 95% goodput, then 50% from 10m; r4 ended at 50% and must stay quiet.
          - series: 'bloomrun_run_goodput_ratio{{namespace="team", run="r3"}}'
            values: '0.95x10 0.5x80'
          - series: 'bloomrun_run_phase{{namespace="team", run="r3", phase="Running"}}'
            values: '1x90'
          - series: 'bloomrun_run_goodput_ratio{{namespace="team", run="r4"}}'
            values: '0.5x90'
          - series: 'bloomrun_run_phase{{namespace="team", run="r4", phase="Running"}}'
            values: '0x90'
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
          - {{eval_time: 19m, alertname: BloomRunStraggler, exp_alerts: []}}
          - eval_time: 21m
            alertname: BloomRunStraggler
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r1, rank: "2", host: n2}}}}]
          - {{eval_time: 69m, alertname: BloomRunLowGoodput, exp_alerts: []}}
          - eval_time: 71m
            alertname: BloomRunLowGoodput
            exp_alerts: [{{exp_labels: {{severity: warning, namespace: team, run: r3}}}}]
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
