"""`bloomctl validate FILE...`: the API server's checks on a BloomRun manifest, offline.

The CRD's schema and CEL rules are generated beside the pydantic validators they mirror
(bloomrun/operator/crd.py), so a manifest this command accepts is one the API server
accepts, and one it refuses gets the same field named. `--render` also prints the
children the operator would create (with a placeholder UID), for review before applying.
"""

from __future__ import annotations

import argparse
import sys

import yaml


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("validate", help="check a BloomRun manifest offline with the API server's rules",
                                   description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", metavar="FILE", help="BloomRun manifest (YAML); - reads standard input")
    parser.add_argument("--render", action="store_true",
                        help="print the Service, ConfigMap, RBAC and worker pods the operator would create")
    parser.add_argument("-n", "--namespace", default="default", help="namespace assumed by --render")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Checks every file and reports each (one line on stdout if valid, on stderr if not);
    exit 2 if any failed."""
    from bloomrun.cli.main import EXIT_USAGE
    from bloomrun.operator.spec import ManifestError, load_manifest, load_manifest_text

    failed = 0
    for path in args.files:
        try:
            manifest = load_manifest_text(sys.stdin.read(), "-") if path == "-" else load_manifest(path)
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


def render(manifest, namespace: str) -> list[dict]:
    from bloomrun.operator import desired

    run = desired.Run(name=manifest.metadata.name, namespace=manifest.metadata.namespace or namespace,
                      uid="00000000-0000-0000-0000-000000000000", generation=1, spec=manifest.spec)
    return [*desired.desired_infra(run), *(desired.desired_worker(run, i) for i in range(manifest.spec.nodes.max))]
