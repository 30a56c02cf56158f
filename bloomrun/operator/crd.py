"""Generate the BloomRun CustomResourceDefinition from the pydantic models in spec.py.

`python -m bloomrun.operator.crd [DIR]` writes DIR/bloomrun.io_bloomruns.yaml (default
crds/); `make crds` runs it and the test suite fails when crds/ differs from the output.

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

CRD_FILE = f"{GROUP}_{PLURAL}.yaml"


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

# Fields whose pydantic default the CRD does not write into the stored object, so that a CEL
# rule can tell a value the manifest gives from the default (the operator's pydantic parse
# fills it in): see BloomRunSpec._check_schedule.
IMPLICIT_DEFAULTS: dict[str, set[str]] = {"OptimConfig": {"warmupTokens"}}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Nodes", "type": "string", "jsonPath": ".status.nodes.display", "description": "ready/desired workers"},
    {"name": "Step", "type": "integer", "jsonPath": ".status.progress.step"},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Tokens/s", "type": "number", "jsonPath": ".status.progress.tokensPerSecond"},
    {"name": "Restarts", "type": "integer", "jsonPath": ".status.restarts"},
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


def build_crd() -> dict:
    """The CustomResourceDefinition object (pure)."""
    spec_schema = schema_of(BloomRunSpec)
    status_schema = schema_of(BloomRunStatus)
    root = {
        "type": "object",
        "description": "A BLOOM-style training run: the trainer's config plus where and how to run it.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
        "x-kubernetes-validations": [
            {
                "rule": f"self.metadata.name.size() <= {MAX_RUN_NAME}",
                "message": f"metadata.name must be at most {MAX_RUN_NAME} characters (children append -worker-N)",
            },
            {
                "rule": f"self.metadata.name.matches('{RUN_NAME_PATTERN}')",
                "message": "metadata.name must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter)",
            },
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": [SHORT_NAME],
                "categories": ["all", "bloomrun"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


def render_crd() -> str:
    header = "# Generated by `make crds` (python -m bloomrun.operator.crd) from bloomrun/operator/spec.py. Do not edit.\n"
    return header + yaml.safe_dump(build_crd(), sort_keys=False, width=120)


def main(argv: list[str]) -> int:
    out_dir = Path(argv[0] if argv else "crds")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / CRD_FILE).write_text(render_crd())
    print(f"wrote {out_dir / CRD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
