"""The admission rule that keeps a run's trainer to its own corner of the status: pure.

A trainer's ServiceAccount (`<run>-trainer`) may patch `bloomruns/status` of its run, so
that progress (step, loss, tokens/s, checkpoints) reaches `kubectl get br` without the
operator in the path. Everything else in status is what the operator decides from: GPU-hours
used and when they were accounted (the budget), restarts (maxRestarts), phase, conditions,
the failures already counted. A compromised trainer container could forge those. This CEL
expression, enforced by the API server through a ValidatingAdmissionPolicy the chart
installs, refuses any change from such an account to a status field other than `progress`.

Generated from BloomRunStatus (every field but progress, field by field: status is a typed
object in the CRD's schema, so CEL cannot iterate over its keys), written into the chart by
`python -m bloomrun.operator.policy` (`make chart-crds`); a test fails when it drifts.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bloomrun.operator.spec import BloomRunStatus

CHART_FILE = Path("charts/bloomrun-operator/files/trainer-status-validation.cel")
# The trainers' accounts, named by bloomrun.operator.desired.service_account_name.
TRAINER_USERNAME = r"^system:serviceaccount:[a-z0-9.-]+:[a-z0-9.-]+-trainer$"
TRAINER_FIELDS = ("progress",)


def operator_status_fields() -> list[str]:
    """Status fields as the API sees them (camelCase), less the trainer's own."""
    fields = BloomRunStatus.model_fields
    return [info.alias or name for name, info in fields.items() if (info.alias or name) not in TRAINER_FIELDS]


def unchanged(field: str) -> str:
    """CEL: `status.<field>` is as it was (present with the same value, or absent in both)."""
    old, new = f"oldObject.status.{field}", f"object.status.{field}"
    return (f"(has(oldObject.status) && has({old}) ? has(object.status) && has({new}) && {new} == {old}"
            f" : !(has(object.status) && has({new})))")


def status_expression() -> str:
    return "\n&& ".join(unchanged(field) for field in operator_status_fields()) + "\n"


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else CHART_FILE
    path.write_text(status_expression())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
