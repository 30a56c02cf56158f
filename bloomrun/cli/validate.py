"""`bloomctl validate FILE...`: the API server's checks on a BloomRun or BloomStudy manifest, offline.

The CRD's schema and CEL rules are generated beside the pydantic validators they mirror
(bloomrun/operator/crd.py), so a manifest this command accepts is one the API server
accepts, and one it refuses gets the same field named. So are the install's rules
(bloomrun/operator/admission.py: PriorityClasses, taints, node labels, node count, data
paths in pods), which the chart's admission policy and the operator enforce: checked with
the chart's defaults, or the `runPolicy` of `--values FILE`. `--render` also prints the
children the operator would create (with a placeholder UID), for review before applying.
A BloomStudy (dispatched on `kind`) gets every rule of bloomrun/study/spec.py, the install's
rules on each arm's run, and `--render` prints the arms' BloomRuns.
"""

from __future__ import annotations

import argparse
import re
import sys

import yaml


STUDY_KIND = re.compile(r"""^kind:[ \t]*["']?BloomStudy["']?[ \t]*(#.*)?$""", re.MULTILINE)
MAX_PEEK = 3 * 1024 * 1024  # a manifest is at most ~1.5 MB (the loaders refuse larger ones)


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="check a BloomRun or BloomStudy manifest offline with the API "
                                                    "server's rules",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE",
                        help="BloomRun or BloomStudy manifest (YAML); - reads standard input")
    parser.add_argument("--render", action="store_true",
                        help="print the Service, ConfigMap, RBAC and worker pods the operator would create")
    parser.add_argument("-n", "--namespace", default="default", help="namespace assumed by --render")
    parser.add_argument("--values", metavar="FILE", help="the chart's values file of the install: its runPolicy "
                                                         "rules instead of the chart's defaults")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Checks every file and reports each (one line on stdout if valid, on stderr if not);
    exit 2 if any failed."""
    from bloomrun.cli.main import EXIT_USAGE
    from bloomrun.operator import admission
    from bloomrun.operator.spec import ManifestError, load_manifest, load_manifest_text

    policy = run_policy(args.values)
    failed = 0
    for path in args.files:
        text = sys.stdin.read() if path == "-" else None
        if _is_study(path, text):
            failed += not validate_study(path, text, policy, args.render)
            continue
        try:
            manifest = load_manifest_text(text, "-") if path == "-" else load_manifest(path)
            refused = admission.refusal(manifest.spec, policy)
            if refused is not None:
                raise ManifestError(f"{path}: {refused}")
        except ManifestError as err:
            print(f"bloomctl validate: error: {err}", file=sys.stderr)
            failed += 1
            continue
        spec = manifest.spec
        shape = spec.model.shape()
        # With --render the line is a YAML comment, so stdout stays a stream `kubectl` can read.
        print(f"{'# ' if args.render else ''}{path}: valid BloomRun {manifest.metadata.name!r}: "
              f"{shape.num_layers} layers x {shape.hidden_size} hidden x {shape.num_heads} heads, "
              f"position={spec.model.position}, nodes {spec.nodes.min}-{spec.nodes.max} x "
              f"{spec.gpus_per_node} GPUs", flush=True)
        if args.render:
            print(yaml.safe_dump_all(render(manifest, args.namespace), sort_keys=False), end="", flush=True)
    return EXIT_USAGE if failed else 0


def _is_study(path: str, text: str | None) -> bool:
    """Whether the manifest says `kind: BloomStudy` at the top level. A line scan, not a
    parse: the loaders parse with their guards (depth, size, aliases), and anything else goes
    the BloomRun way, whose loader reports it."""
    try:
        if text is None:
            with open(path, errors="replace") as file:
                text = file.read(MAX_PEEK)
    except OSError:
        return False
    return STUDY_KIND.search(text[:MAX_PEEK]) is not None


def validate_study(path: str, text: str | None, policy, render_arms: bool) -> bool:
    """One BloomStudy: its rules, then the install's on each arm's run; True if valid."""
    from bloomrun.operator import admission
    from bloomrun.study.spec import StudyError, arm_manifest, arm_specs, load_study, load_study_text

    try:
        study = load_study_text(text, "-") if path == "-" else load_study(path)
        specs = arm_specs(study.spec)
        for index, (arm, spec) in enumerate(specs.items()):
            refused = admission.refusal(spec, policy)
            if refused is not None:
                raise StudyError(f"{path}: spec.arms[{index}] ({arm}): {refused}")
    except StudyError as err:
        print(f"bloomctl validate: error: {err}", file=sys.stderr)
        return False
    print(f"{'# ' if render_arms else ''}{path}: valid BloomStudy {study.metadata.name!r}: "
          f"{len(specs)} arms ({', '.join(specs)}) to {study.spec.compare_at_tokens:,} tokens, "
          f"{study.spec.budget.gpu_hours:g} GPU-hours, {study.spec.max_concurrent} at once", flush=True)
    if render_arms:
        print(yaml.safe_dump_all([arm_manifest(study, arm, spec) for arm, spec in specs.items()],
                                 sort_keys=False), end="", flush=True)
    return True


def run_policy(values_file: str | None):
    """The install's rules: the chart's defaults, or the runPolicy of a values file."""
    from bloomrun.cli.main import UserError
    from bloomrun.operator.admission import RunPolicy

    if values_file is None:
        return RunPolicy()
    try:
        values = (yaml.safe_load(open(values_file)) or {}).get("runPolicy") or {}
        fields = {"allowedPriorityClasses": "allowed_priority_classes", "deniedTaintKeys": "denied_taint_keys",
                  "deniedNodeLabelKeys": "denied_node_label_keys", "maxNodes": "max_nodes"}
        given = {fields[k]: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in fields}
        return RunPolicy(**given)
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError) as err:
        raise UserError(f"--values {values_file}: {err}") from None


def render(manifest, namespace: str) -> list[dict]:
    from bloomrun.operator import desired

    run = desired.Run(name=manifest.metadata.name, namespace=manifest.metadata.namespace or namespace,
                      uid="00000000-0000-0000-0000-000000000000", generation=1, spec=manifest.spec)
    return [*desired.desired_infra(run), *(desired.desired_worker(run, i) for i in range(manifest.spec.nodes.max))]
