# The chart's copy of the generated CRDs, in its crds subchart (helm reads nothing outside
# the chart folder; the subchart lets crds.enabled=false skip them).
# It regenerates crds/ first; tests/chart/test_render.py fails when the copy drifts.
CHART_DIR := charts/bloomrun-operator

.PHONY: chart-crds chart-docs
chart-crds: crds
	cp crds/*.yaml $(CHART_DIR)/charts/crds/crds/
	$(PY) -m bloomrun.operator.policy $(CHART_DIR)/files/trainer-status-validation.cel
	$(PY) -m bloomrun.operator.admission $(CHART_DIR)/files/run-policy-validations.yaml

# The values table of docs/chart.md, from the `# --` comments of values.yaml.
chart-docs:
	$(PY) scripts/values_doc.py
