"""Generate the CustomResourceDefinitions from the pydantic models: BloomRun from
bloomrun/operator/spec.py, BloomStudy from bloomrun/study/spec.py.

`python -m bloomrun.operator.crd [DIR]` writes DIR/bloomrun.io_bloomruns.yaml and
DIR/bloomrun.io_bloomstudies.yaml (default crds/); `make crds` runs it and the test suite
fails when crds/ differs from the output.

Pydantic emits JSON Schema 2020-12; the API server wants a *structural* OpenAPI v3 schema:
no $ref, no anyOf-with-null (nullable instead), boolean exclusive bounds, no
`additionalProperties` beside `properties`. Cross-field rules become CEL
x-kubernetes-validations: the models in spec.py carry theirs; the trainer's sections (whose
pydantic validators live in trainer/config.py) get theirs from `TRAINER_RULES` below.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import yaml

from bloomrun.trainer.config import PRESETS
from bloomrun.operator.spec import (
    GROUP,
    KIND,
    MAX_RUN_NAME,
    PLURAL,
    RUN_NAME_PATTERN,
    SHORT_NAME,
    VERSION,
    BloomRunSpec,
    BloomRunStatus,
)

from bloomrun.study import spec as study

CRD_FILE = f"{GROUP}_{PLURAL}.yaml"
STUDY_CRD_FILE = f"{GROUP}_{study.PLURAL}.yaml"


def _preset_lookup(field: str) -> str:
    """CEL: the field if given, else the preset's value (the same override rule as ModelConfig.shape)."""
    table = ", ".join(f"'{name}': {getattr(shape, field)}" for name, shape in PRESETS.items())
    camel = {"hidden_size": "hiddenSize", "num_heads": "numHeads"}[field]
    return f"(has(self.{camel}) ? self.{camel} : {{{table}}}[self.preset])"


_HIDDEN, _HEADS = _preset_lookup("hidden_size"), _preset_lookup("num_heads")
_SHAPE_FIELDS = ("numLayers", "hiddenSize", "numHeads", "seqLength", "vocabSize")
_BOTH_GIVEN = "has(self.hiddenSize) && has(self.numHeads)"

# The CEL twins of the pydantic validators in trainer/config.py, keyed by model name.
TRAINER_RULES: dict[str, list[tuple[str, str]]] = {
    "ModelConfig": [
        (
            "has(self.preset) || " + " && ".join(f"has(self.{f})" for f in _SHAPE_FIELDS),
            "without a preset, numLayers, hiddenSize, numHeads, seqLength and vocabSize are required",
        ),
        (
            f"{_BOTH_GIVEN} ? self.hiddenSize % self.numHeads == 0 : !has(self.preset) || {_HIDDEN} % {_HEADS} == 0",
            "hiddenSize must be divisible by numHeads",
        ),
        (
            f"self.position != 'rotary' || ({_BOTH_GIVEN} ? (self.hiddenSize / self.numHeads) % 2 == 0"
            f" : !has(self.preset) || ({_HIDDEN} / {_HEADS}) % 2 == 0)",
            "position 'rotary' needs an even head dimension (hiddenSize / numHeads)",
        ),
    ],
    "OptimConfig": [
        ("self.minLr <= self.lr", "minLr must not exceed lr"),
        ("!has(self.decayTokens) || !has(self.warmupTokens) || self.decayTokens >= self.warmupTokens",
         "decayTokens must not be shorter than warmupTokens: the decay counts from token 0"),
    ],
    "InitFrom": [("has(self.path) != has(self.run)", "give exactly one of path and run")],
    "EvalConfig": [
        ("has(self.tasks) != has(self.suite)", "give exactly one of tasks and suite"),
        ("!(has(self.everyCheckpoints) && has(self.everyTokens))",
         "give at most one of everyCheckpoints and everyTokens"),
    ],
    "TrainingConfig": [
        ("has(self.trainTokens) != has(self.trainSteps)", "give exactly one of trainTokens and trainSteps"),
        ("self.globalBatchSize % self.microBatchSize == 0", "globalBatchSize must be a multiple of microBatchSize"),
        ("!has(self.rampup) || self.rampup.start <= self.globalBatchSize", "rampup.start must not exceed globalBatchSize"),
        ("!has(self.rampup) || self.rampup.start > self.globalBatchSize"
         " || (self.globalBatchSize - self.rampup.start) % self.rampup.increment == 0",
         "rampup: globalBatchSize - start must be a multiple of increment"),
    ],
}

# A BloomRun's eval section is the trainer's plus the cluster's fields (spec.RunEvalConfig).
TRAINER_RULES["RunEvalConfig"] = TRAINER_RULES["EvalConfig"]

# Fields whose pydantic default the CRD does not write into the stored object, so that a CEL
# rule can tell a value the manifest gives from the default (the operator's pydantic parse
# fills it in): see BloomRunSpec._check_schedule.
IMPLICIT_DEFAULTS: dict[str, set[str]] = {"OptimConfig": {"warmupTokens"}}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "string", "jsonPath": ".status.nodes.display", "description": "ready/desired workers"},
    # Wide only (priority 1): most runs are 1x1xN, and the default table is already wide.
    {"name": "Layout", "type": "string", "jsonPath": ".status.layout.display", "priority": 1,
     "description": "tensor x pipeline x data-parallel degrees of the running world (status.layout)"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
    {"name": "Goodput", "type": "string", "jsonPath": ".status.goodput.display",
     "description": "productive share of the run's GPU-hours (status.goodput)"},
    {"name": "Eval", "type": "number", "jsonPath": ".status.evaluation.mean",
     "description": "mean zero-shot accuracy of the newest checkpoint scored"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

STUDY_PRINTER_COLUMNS = [
    {"name": "Arms", "type": "integer", "jsonPath": ".status.armCount"},
    {"name": "Done", "type": "integer", "jsonPath": ".status.done", "description": "arms trained and scored"},
    {"name": "Best", "type": "string", "jsonPath": ".status.comparison.best",
     "description": "arm with the best mean zero-shot accuracy at the comparison point"},
    {"name": "GPU-hours", "type": "number", "jsonPath": ".status.gpuHours"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP = {"title", "propertyNames", "$defs"}


def structural(schema: dict, defs: dict) -> dict:
    """Rewrite one pydantic JSON-schema node as a structural OpenAPI v3 node. One function
    with one case per JSON-schema construct, in the order the API server's structural rules
    list them: a little over 60 lines, kept whole so each rule sits beside the others."""
    node = copy.deepcopy(schema)
    if "$ref" in node:
        name = node.pop("$ref").rsplit("/", 1)[1]
        target = copy.deepcopy(defs[name])
        target.update({k: v for k, v in node.items() if k in ("description", "default")})
        node = target
        node.setdefault("x-kubernetes-validations", [])
        node["x-kubernetes-validations"] += [{"rule": r, "message": m} for r, m in TRAINER_RULES.get(name, [])]
        for field in IMPLICIT_DEFAULTS.get(name, ()):
            node["properties"][field].pop("default", None)
            if isinstance(node.get("default"), dict):
                node["default"].pop(field, None)
        if not node["x-kubernetes-validations"]:
            del node["x-kubernetes-validations"]
    nullable = False
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        nullable = len(branches) == 1
        assert len(branches) == 1, f"unsupported union: {branches}"
        merged = structural(branches[0], defs)
        merged.update({k: v for k, v in node.items() if k not in ("type",) or "type" not in merged})
        node = merged
    for key in list(node):
        if key in _DROP:
            del node[key]
    if "const" in node:
        node["enum"] = [node.pop("const")]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[bound.replace("exclusiveM", "m")] = node[bound]
            node[bound] = True
    if "properties" in node:
        node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
        node.pop("additionalProperties", None)  # unknown fields: refused by strict field validation
    elif isinstance(node.get("additionalProperties"), dict):
        node["additionalProperties"] = structural(node["additionalProperties"], defs)
    elif node.get("additionalProperties") is True:
        del node["additionalProperties"]
        node["x-kubernetes-preserve-unknown-fields"] = True
    if "items" in node:
        node["items"] = structural(node["items"], defs)
    if "anyOf" in node:
        # int-or-string: the branches may only restate types and formats, so their bounds move
        # to the node, where each applies to its own type (pattern and maxLength to a string,
        # minimum and maximum to an integer).
        branches = node["anyOf"]
        node["anyOf"] = [{k: v for k, v in b.items() if k == "type"} for b in branches]
        for branch in branches:
            node.update({k: v for k, v in branch.items() if k in ("pattern", "maxLength", "minimum", "maximum")})
    if "default" in node:
        default = node["default"]
        if default is None:
            del node["default"]
        elif isinstance(default, dict):
            # The API server checks a default against the CEL rules as written (nested
            # defaults are not applied to it first), so it must be complete.
            node["default"] = _without_nulls(default)
    if nullable and "default" in node:
        # A field that has a value by default but may be set to null on purpose
        # (preset: null, everySteps: null) keeps its null; others are simply optional.
        node["nullable"] = True
    return node


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def schema_of(model: type) -> dict:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.get("$defs", {}))


def _name_rules(max_length: int, why: str) -> list[dict]:
    return [
        {"rule": f"self.metadata.name.size() <= {max_length}",
         "message": f"metadata.name must be at most {max_length} characters ({why})"},
        {"rule": f"self.metadata.name.matches('{RUN_NAME_PATTERN}')",
         "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)"},
    ]


def _crd(kind: str, plural: str, short_name: str, description: str, spec_model: type, status_model: type,
         rules: list[dict], columns: list[dict]) -> dict:
    root = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": schema_of(spec_model),
            "status": schema_of(status_model),
        },
        "x-kubernetes-validations": rules,
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short_name],
                # `kubectl get bloom` lists runs and studies together. Not "bloomrun": a
                # category named like a kind's singular makes `kubectl delete bloomrun NAME`
                # expand to every kind of the category and refuse ("only one resource").
                "categories": ["all", "bloom"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def build_crd() -> dict:
    """The BloomRun CustomResourceDefinition object (pure)."""
    return _crd(KIND, PLURAL, SHORT_NAME,
                "A BLOOM-style training run: the trainer's config plus where and how to run it.",
                BloomRunSpec, BloomRunStatus, _name_rules(MAX_RUN_NAME, "children append -worker-N"),
                PRINTER_COLUMNS)


def build_study_crd() -> dict:
    """The BloomStudy CustomResourceDefinition object (pure). The arm count and unique arm
    names come from the schema (maxItems, a list map keyed by name); each arm's run name
    `<study>-<arm>` must itself be a valid run name."""
    arm_names = {
        "rule": f"self.spec.arms.all(a, self.metadata.name.size() + 1 + a.name.size() <= {MAX_RUN_NAME})",
        "message": f"each arm's run, metadata.name + '-' + arm name, must be at most {MAX_RUN_NAME} characters",
    }
    return _crd(study.KIND, study.PLURAL, study.SHORT_NAME,
                "An ablation study: arms of one base run, trained to equal tokens under one GPU-hour budget.",
                study.BloomStudySpec, study.BloomStudyStatus,
                _name_rules(MAX_RUN_NAME, "its arms' runs are named <study>-<arm>") + [arm_names],
                STUDY_PRINTER_COLUMNS)


def render_crd() -> str:
    header = "# Generated by `make crds` (python -m bloomrun.operator.crd) from bloomrun/operator/spec.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def render_study_crd() -> str:
    header = "# Generated by `make crds` (python -m bloomrun.operator.crd) from bloomrun/study/spec.py. Do not edit.\n"
    return header + yaml.safe_dump(build_study_crd(), sort_keys=False, width=120)


RENDERERS = {CRD_FILE: render_crd, STUDY_CRD_FILE: render_study_crd}


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0] if argv else "crds")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, render in RENDERERS.items():
        (out_dir / name).write_text(render())
        print(f"wrote {out_dir / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
