"""Pod statuses a kubelet would report when a pod ends, for the fault levers.

Shapes follow what the kubelet writes: an OOM-killed container is terminated with reason
OOMKilled and exit code 137 (SIGKILL); an evicted pod is Failed with pod-level reason
Evicted, a DisruptionTarget condition, and its containers' state lost (137).
"""

from datetime import datetime, timezone

SIGKILL_EXIT = 137
_DEFAULT_EXIT = {"OOMKilled": SIGKILL_EXIT, "Evicted": SIGKILL_EXIT}
_CONTAINER_REASON = {"Evicted": "ContainerStatusUnknown"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _terminated(pod: dict, exit_code: int, reason: str, message: str | None) -> list[dict]:
    started = {c["name"]: c.get("state", {}).get("running", {}).get("startedAt")
               for c in pod.get("status", {}).get("containerStatuses") or []}
    now = _now()
    statuses = []
    for container in pod["spec"]["containers"]:
        terminated = {"exitCode": exit_code, "reason": reason, "finishedAt": now,
                      "startedAt": started.get(container["name"]) or now}
        if message:
            terminated["message"] = message
        statuses.append({
            "name": container["name"], "image": container.get("image", ""),
            "imageID": "", "ready": False, "started": False, "restartCount": 0,
            "state": {"terminated": terminated},
        })
    return statuses


def _conditions(reason: str, extra: list[dict]) -> list[dict]:
    now = _now()
    return extra + [{"type": kind, "status": "False", "reason": reason,
                     "lastTransitionTime": now}
                    for kind in ("Ready", "ContainersReady")]


def failed_status(pod: dict, exit_code: int | None = None, reason: str | None = None,
                  message: str | None = None) -> dict:
    """The status of `pod` after its containers failed (with `reason` such as OOMKilled) or
    after the kubelet evicted it (`reason="Evicted"`). exit_code None means 1, or 137 for
    OOMKilled and Evicted; `message` is the containers' termination message."""
    code = exit_code if exit_code is not None else _DEFAULT_EXIT.get(reason or "", 1)
    status: dict = {"phase": "Failed"}
    if reason == "Evicted":
        message = "The node was low on resource: memory."
        status |= {"reason": "Evicted", "message": message}
        disruption = [{"type": "DisruptionTarget", "status": "True",
                       "reason": "TerminationByKubelet", "message": message,
                       "lastTransitionTime": _now()}]
        status["conditions"] = _conditions("PodFailed", disruption)
        status["containerStatuses"] = _terminated(
            pod, code, _CONTAINER_REASON["Evicted"], "The container could not be located "
            "when the pod was terminated")
    else:
        status["conditions"] = _conditions("PodFailed", [])
        status["containerStatuses"] = _terminated(pod, code, reason or "Error", message)
    return status


def succeeded_status(pod: dict, message: str | None = None) -> dict:
    return {"phase": "Succeeded", "conditions": _conditions("PodCompleted", []),
            "containerStatuses": _terminated(pod, 0, "Completed", message)}
