"""Typed status conditions of a BloomRun, and how they change."""

from __future__ import annotations

from enum import Enum

from bloomrun.operator.spec import Condition


class ConditionType(str, Enum):
    CREATED = "Created"
    """The run's Service, ConfigMap and trainer RBAC exist."""
    SCHEDULED = "Scheduled"
    """At least nodes.min workers are bound to nodes."""
    RUNNING = "Running"
    """At least nodes.min workers are running."""
    RESTARTING = "Restarting"
    """A failed worker is being replaced (backoff or waiting for the new pod)."""
    SUSPENDED = "Suspended"
    """spec.suspend is true: no workers, checkpoints kept."""
    SUCCEEDED = "Succeeded"
    """Training finished (or stopped cleanly on its GPU-hour budget)."""
    FAILED = "Failed"
    """The run cannot go on: a permanent error or too many restarts."""


# The order conditions are listed in status.
ORDER = list(ConditionType)


def set_condition(conditions: list[Condition], kind: ConditionType, true: bool, reason: str, message: str,
                  generation: int, now: str) -> list[Condition]:
    """`conditions` with `kind` set; lastTransitionTime moves only when the status flips."""
    status = "True" if true else "False"
    previous = next((c for c in conditions if c.type == kind.value), None)
    transition = previous.last_transition_time if previous and previous.status == status else now
    updated = Condition(type=kind.value, status=status, reason=reason, message=message,
                        last_transition_time=transition, observed_generation=generation)
    others = [c for c in conditions if c.type != kind.value]
    return sorted([*others, updated], key=lambda c: ORDER.index(ConditionType(c.type))
                  if c.type in ConditionType._value2member_map_ else len(ORDER))
