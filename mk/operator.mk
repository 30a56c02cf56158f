# The BloomRun CRD is generated from bloomrun/operator/spec.py; tests/operator/test_crd.py
# fails when crds/ drifts from the models, so CI catches a forgotten `make crds`.
.PHONY: crds crds-check
crds: venv
	$(PY) -m bloomrun.operator.crd crds

crds-check: venv
	$(PY) -m pytest -q tests/operator/test_crd.py
