"""`python -m bloomrun.operator`: run the BloomRun operator."""

from __future__ import annotations

import argparse
import logging
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from bloomrun.operator.admission import RunPolicy
    from bloomrun.operator.metrics import DEFAULT_PORT
    from bloomrun.operator.spec import DEFAULT_IMAGE

    parser = argparse.ArgumentParser(prog="python -m bloomrun.operator", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[],
                        help="watch only this namespace (repeatable); default: all namespaces")
    parser.add_argument("--standalone", action="store_true",
                        help="no peering: for a single replica (several replicas need peering)")
    parser.add_argument("--peering", default="bloomrun",
                        help="KopfPeering/ClusterKopfPeering object the replicas coordinate through")
    parser.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    parser.add_argument("--liveness", default="http://0.0.0.0:8081/healthz",
                        help="liveness endpoint URL ('' for none)")
    parser.add_argument("--metrics-port", type=int, default=DEFAULT_PORT, help="Prometheus port (0: off)")
    parser.add_argument("--timer-interval", type=float, default=10.0, help="seconds between safety-net reconciles")
    parser.add_argument("--trainer-image", default=DEFAULT_IMAGE,
                        help=f"trainer image of runs whose spec names none (default {DEFAULT_IMAGE})")
    # What runs may ask of the cluster (bloomrun/operator/admission.py; the chart's runPolicy values).
    policy = RunPolicy()
    parser.add_argument("--max-nodes", type=int, default=policy.max_nodes, help="most worker pods one run may ask for")
    parser.add_argument("--allowed-priority-classes", type=names, default=policy.allowed_priority_classes,
                        help="comma-separated PriorityClasses runs may use; empty: any but system-*")
    parser.add_argument("--denied-taint-keys", type=names, default=policy.denied_taint_keys,
                        help="comma-separated taint keys runs may not tolerate (default: the control plane's)")
    parser.add_argument("--denied-node-label-keys", type=names, default=policy.denied_node_label_keys,
                        help="comma-separated node label keys runs may not select (default: the control plane's)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(argv)


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list; empty means none."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def run_policy(args: argparse.Namespace):
    from bloomrun.operator.admission import RunPolicy

    return RunPolicy(allowed_priority_classes=args.allowed_priority_classes, denied_taint_keys=args.denied_taint_keys,
                     denied_node_label_keys=args.denied_node_label_keys, max_nodes=args.max_nodes)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import kopf

    from bloomrun.operator.main import Options, register

    registry = register(Options(metrics_port=args.metrics_port, timer_interval_s=args.timer_interval,
                                namespaces=tuple(args.namespace), trainer_image=args.trainer_image,
                                run_policy=run_policy(args)))
    kopf.configure(verbose=args.verbose)
    logging.getLogger("kubernetes").setLevel(logging.WARNING)
    if not args.verbose:  # one INFO line per handler call costs more than the reconcile itself
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
        logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    kopf.run(
        registry=registry,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,  # a name makes peering mandatory
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
