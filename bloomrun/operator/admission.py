"""What an install lets a BloomRun ask of its cluster: pure checks, and their CEL twin.

The CRD's rules (spec.py) hold on every cluster and for `bloomctl run` too. These do not:
they depend on the install (the chart's `runPolicy` values) or concern pods only (a local
run reads /tmp/corpus quite rightly), so they live here:

- scheduling (issue 20): a PriorityClass named `system-*` (node- and cluster-critical, which
  preempt anything) only when the install allows it, or only the allowed classes when it
  lists some; no toleration of a denied taint key, and so no toleration without a key
  (`operator: Exists` alone tolerates every taint); no node selector or node-affinity term
  that selects a denied node label key (In, Exists, Gt, Lt; NotIn and DoesNotExist steer
  away from those nodes and stay allowed). The defaults deny the control-plane keys.
- size: at most `maxNodes` workers (each pod is an etcd object; spec.py bounds what each holds).
- paths in pods (issue 19): a data path either lies on the data volume (relative paths are
  inside dataVolume.mountPath; no `..` may climb out) or in the image, and then not under a
  folder the pod mounts over (the checkpoint volume, the scratch /tmp, the config folder,
  /dev/shm), where the image's files are hidden; the two volumes' mount paths avoid those
  folders and each other (a pod with two mounts at one path is refused at creation).

Three enforcers, one source: the operator (the chart passes the values as flags: a run that
breaks a rule fails with reason PolicyViolation), `bloomctl validate` (the chart's default
values), and the API server, through the chart's ValidatingAdmissionPolicy, whose CEL is
generated here beside each check (`python -m bloomrun.operator.admission`, run by `make
chart-crds`; a test fails when the chart's copy drifts).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from bloomrun.operator.spec import DEFAULT_CHECKPOINT_MOUNT, MAX_NODES, BloomRunSpec, Pool

CHART_FILE = Path("charts/bloomrun-operator/files/run-policy-validations.yaml")
CONTROL_PLANE_KEYS = ("node-role.kubernetes.io/control-plane", "node-role.kubernetes.io/master")
DEFAULT_MAX_NODES = 128  # BLOOM-176B trained on 48 nodes of 8 GPUs
# Folders every worker pod mounts over (bloomrun.operator.desired): scratch, config, shm.
POD_MOUNTS = ("/tmp", "/etc/bloomrun", "/dev/shm")
SELECTING_OPERATORS = ("In", "Exists", "Gt", "Lt")  # NotIn, DoesNotExist steer away
PARENT_SEGMENT = r"(^|/)\.\.(/|$)"
POLICY_VIOLATION = "PolicyViolation"  # the Failed reason of a run that breaks one of these rules


@dataclass(frozen=True)
class RunPolicy:
    """The chart's `runPolicy` values (passed to the operator as flags)."""

    allowed_priority_classes: tuple[str, ...] = ()
    """Empty: any class but `system-*`; else exactly these."""
    denied_taint_keys: tuple[str, ...] = CONTROL_PLANE_KEYS
    denied_node_label_keys: tuple[str, ...] = CONTROL_PLANE_KEYS
    max_nodes: int = DEFAULT_MAX_NODES

    def __post_init__(self):
        if isinstance(self.max_nodes, bool) or not isinstance(self.max_nodes, int) \
                or not 1 <= self.max_nodes <= MAX_NODES:
            raise ValueError(f"maxNodes must be an integer 1-{MAX_NODES}, got {self.max_nodes!r}")
        for field in ("allowed_priority_classes", "denied_taint_keys", "denied_node_label_keys"):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not all(isinstance(v, str) and v for v in values):
                raise ValueError(f"{field} must be a list of names, got {values!r}")


# ------------------------------------------------------------------------ the checks


def _priority_refusal(field: str, name: str | None, policy: RunPolicy) -> str | None:
    if name is None:
        return None
    if policy.allowed_priority_classes:
        if name not in policy.allowed_priority_classes:
            return f"{field}: {name!r} is not one of this install's PriorityClasses " \
                   f"({', '.join(policy.allowed_priority_classes)})"
    elif name.startswith("system-"):
        return f"{field}: {name!r} is a system PriorityClass, which this install does not allow"
    return None


def _pool_refusals(field: str, pool: Pool, policy: RunPolicy) -> list[str]:
    denied_taints, denied_labels = set(policy.denied_taint_keys), set(policy.denied_node_label_keys)
    refusals = []
    for index, toleration in enumerate(pool.tolerations):
        if not toleration.key and denied_taints:
            refusals.append(f"{field}.tolerations[{index}]: a toleration without a key tolerates every taint, "
                            f"including the denied {', '.join(sorted(denied_taints))}")
        elif toleration.key in denied_taints:
            refusals.append(f"{field}.tolerations[{index}]: taint key {toleration.key!r} is denied by this install")
    for key in pool.node_selector:
        if key in denied_labels:
            refusals.append(f"{field}.nodeSelector: node label key {key!r} is denied by this install")
    node = pool.affinity.node_affinity if pool.affinity else None
    if node is not None:
        required = node.required_during_scheduling_ignored_during_execution
        terms = [*(required.node_selector_terms if required else ()),
                 *(w.preference for w in node.preferred_during_scheduling_ignored_during_execution or ())]
        for term in terms:
            for requirement in term.match_expressions or ():
                if requirement.key in denied_labels and requirement.operator in SELECTING_OPERATORS:
                    refusals.append(f"{field}.affinity.nodeAffinity: node label key {requirement.key!r} "
                                    f"({requirement.operator}) is denied by this install")
    return refusals


def _under(path: str, folder: str) -> bool:
    """`path` is `folder` or inside it, by the text (what CEL can do too)."""
    return path == folder or path.startswith(folder if folder.endswith("/") else folder + "/")


def _mounts(spec: BloomRunSpec) -> list[str]:
    return [spec.checkpoint_volume.mount_path, *POD_MOUNTS]


def _path_refusal(field: str, path: str, spec: BloomRunSpec) -> str | None:
    if re.search(PARENT_SEGMENT, path):
        return f"{field}: {path!r} has a '..' segment: in a pod a data path is on the data volume or in the image"
    if path.startswith("/") and not _under(path, spec.data_volume.mount_path):
        hidden = next((m for m in _mounts(spec) if _under(path, m)), None)
        if hidden is not None:
            return (f"{field}: {path!r} is under {hidden}, which every worker pod mounts over: put data on the "
                    "data volume (dataVolume.mountPath) or elsewhere in the image")
    return None


def _mount_refusal(spec: BloomRunSpec) -> str | None:
    data, checkpoints = spec.data_volume.mount_path, spec.checkpoint_volume.mount_path
    for field, mount in (("dataVolume.mountPath", data), ("checkpointVolume.mountPath", checkpoints)):
        clash = next((m for m in POD_MOUNTS if _under(mount, m) or _under(m, mount)), None)
        if clash is not None:
            return f"spec.{field}: {mount!r} overlaps {clash}, which the operator mounts in every worker"
    if _under(data, checkpoints) or _under(checkpoints, data):
        return f"spec.dataVolume.mountPath: {data!r} overlaps checkpointVolume.mountPath {checkpoints!r}"
    return None


def refusals(spec: BloomRunSpec, policy: RunPolicy) -> list[str]:
    """Every rule of this install the spec breaks, each naming its field; empty: allowed."""
    found: list[str] = []
    if spec.nodes.max > policy.max_nodes:
        found.append(f"spec.nodes.max: {spec.nodes.max} nodes, this install allows at most {policy.max_nodes}")
    found += filter(None, [_priority_refusal("spec.priorityClassName", spec.priority_class_name, policy)])
    found += _pool_refusals("spec.pool", spec.pool, policy)
    evaluation = getattr(spec, "eval", None)  # the evaluation Jobs' own placement, when given
    if getattr(evaluation, "pool", None) is not None:
        found += _pool_refusals("spec.eval.pool", evaluation.pool, policy)
    found += filter(None, [_priority_refusal("spec.eval.priorityClassName",
                                             getattr(evaluation, "priority_class_name", None), policy)])
    found += filter(None, [_mount_refusal(spec)])
    paths = [(f"spec.data.sources[{i}].path", s.path) for i, s in enumerate(spec.data.sources)]
    if spec.data.tokenizer:
        paths.append(("spec.data.tokenizer", spec.data.tokenizer))
    found += filter(None, (_path_refusal(field, path, spec) for field, path in paths))
    return found


def refusal(spec: BloomRunSpec, policy: RunPolicy) -> str | None:
    """All of `refusals` as one line, or None."""
    found = refusals(spec, policy)
    return "; ".join(found) if found else None


# ------------------------------------------------------------------------ CEL twins
#
# Expressions of the chart's ValidatingAdmissionPolicy over `object.spec`, with the values as
# `variables` the template renders (allowedPriorityClasses, deniedTaintKeys,
# deniedNodeLabelKeys: lists of strings; maxNodes: an int). Optional fields are tested with
# has(): the policy sees the stored object, defaults applied, but an object written by an
# older CRD may lack them.

S = "object.spec"


def _cel_list(values) -> str:
    return "[" + ", ".join(f"'{v}'" for v in values) + "]"


def _cel_priority(path: str) -> str:
    return (f"!has({path}) || (size(variables.allowedPriorityClasses) > 0"
            f" ? {path} in variables.allowedPriorityClasses : !{path}.startsWith('system-'))")


def _cel_pool(pool: str) -> list[tuple[str, str]]:
    tolerations = (f"!has({pool}.tolerations) || {pool}.tolerations.all(t, has(t.key) && t.key != ''"
                   " ? !(t.key in variables.deniedTaintKeys) : size(variables.deniedTaintKeys) == 0)")
    selector = f"!has({pool}.nodeSelector) || {pool}.nodeSelector.all(k, !(k in variables.deniedNodeLabelKeys))"
    selects = (f"!has(TERM.matchExpressions) || TERM.matchExpressions.all(r, !(r.key in variables.deniedNodeLabelKeys)"
               f" || !(r.operator in {_cel_list(SELECTING_OPERATORS)}))")
    node = f"{pool}.affinity.nodeAffinity"
    required = f"{node}.requiredDuringSchedulingIgnoredDuringExecution"
    preferred = f"{node}.preferredDuringSchedulingIgnoredDuringExecution"
    affinity = (f"!has({pool}.affinity) || !has({node}) || "
                f"((!has({required}) || {required}.nodeSelectorTerms.all(t, {selects.replace('TERM', 't')}))"
                f" && (!has({preferred}) || {preferred}.all(w, {selects.replace('TERM', 'w.preference')})))")
    where = pool.replace("object.", "")
    return [
        (tolerations, f"{where}.tolerations: a denied taint key is tolerated (a toleration without a key "
                      "tolerates every taint)"),
        (selector, f"{where}.nodeSelector: a node label key this install denies"),
        (affinity, f"{where}.affinity.nodeAffinity: selects a node label key this install denies"),
    ]


def _cel_path_ok(path: str) -> str:
    data = f"{S}.dataVolume.mountPath"
    # string(): `object` is untyped in a policy, and a list literal must have one element type.
    mounts = f"[string({S}.checkpointVolume.mountPath), {', '.join(repr(m) for m in POD_MOUNTS)}]"
    return (f"!{path}.matches('{PARENT_SEGMENT}') && (!{path}.startsWith('/') || {_cel_under(path, data)}"
            f" || !{mounts}.exists(m, {_cel_under(path, 'm')}))").replace("\\", "\\\\")


def _cel_under(path: str, folder: str) -> str:
    return f"({path} == {folder} || {path}.startsWith({folder}.endsWith('/') ? {folder} : {folder} + '/'))"


def _cel_mounts_ok() -> str:
    data, checkpoints = f"{S}.dataVolume.mountPath", f"{S}.checkpointVolume.mountPath"
    mounts = _cel_list(POD_MOUNTS)
    return (f"[{data}, {checkpoints}].all(v, !{mounts}.exists(m, {_cel_under('v', 'm')} || {_cel_under('m', 'v')}))"
            f" && !{_cel_under(data, checkpoints)} && !{_cel_under(checkpoints, data)}")


def validations() -> list[dict]:
    """The policy's validations: one per rule of `refusals`, in its order."""
    rules = [
        (f"!has({S}.nodes) || {S}.nodes.max <= variables.maxNodes",
         "spec.nodes.max: more nodes than this install allows (runPolicy.maxNodes)"),
        (_cel_priority(f"{S}.priorityClassName"), "spec.priorityClassName: a PriorityClass this install does not "
                                                  "allow (system-* ones unless runPolicy.allowedPriorityClasses lists them)"),
        *[(f"!has({S}.pool) || ({rule})", message) for rule, message in _cel_pool(f"{S}.pool")],
        *[(f"!has({S}.eval) || !has({S}.eval.pool) || ({rule})", message.replace("spec.pool", "spec.eval.pool"))
          for rule, message in _cel_pool(f"{S}.eval.pool")],
        (f"!has({S}.eval) || {_cel_priority(f'{S}.eval.priorityClassName')}",
         "spec.eval.priorityClassName: a PriorityClass this install does not allow"),
        (_cel_mounts_ok(), "spec.dataVolume.mountPath and checkpointVolume.mountPath must not overlap each other "
                           "or the folders every worker mounts (/tmp, /etc/bloomrun, /dev/shm)"),
        (f"{S}.data.sources.all(s, {_cel_path_ok('s.path')})",
         "spec.data.sources: a path with a '..' segment, or under a folder every worker pod mounts over "
         "(the checkpoint volume, /tmp, /etc/bloomrun, /dev/shm): data is on the data volume or in the image"),
        (f"!has({S}.data.tokenizer) || {_cel_path_ok(f'{S}.data.tokenizer')}",
         "spec.data.tokenizer: a path with a '..' segment, or under a folder every worker pod mounts over"),
    ]
    return [{"expression": rule, "message": message, "reason": "Forbidden"} for rule, message in rules]


def render_validations() -> str:
    header = ("# Generated by `make chart-crds` (python -m bloomrun.operator.admission) from "
              "bloomrun/operator/admission.py. Do not edit.\n")
    return header + yaml.safe_dump(validations(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else CHART_FILE
    path.write_text(render_validations())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
