"""`disagg operator`: run the Kubernetes operator (kopf) that plans and rolls out DisaggServings."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from disagg_operator.runner import OperatorConfig


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `operator` subcommand."""
    parser = subparsers.add_parser(
        "operator", help="run the DisaggServing operator",
        description="Watch DisaggServing resources; plan, apply and report. Uses the in-cluster service "
        "account, or --kubeconfig / $KUBECONFIG outside a cluster.",
    )
    parser.add_argument("-n", "--namespace", action="append", default=[], dest="namespaces",
                        help="watch this namespace (repeatable); default: all namespaces")
    parser.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: $KUBECONFIG, ~/.kube/config)")
    parser.add_argument("--context", default=None, help="kubeconfig context")
    parser.add_argument("--plan-workers", type=int, default=1, help="processes one plan search may use")
    parser.add_argument("--plan-threads", type=int, default=2, help="plan searches that may run at once")
    parser.add_argument("--profiles-dir", type=Path, default=None,
                        help="directory of latency-profile JSON files (matched by model shape and GPU name)")
    parser.add_argument("--prometheus-url", default=None,
                        help="Prometheus for drift re-planning of resources whose spec.replan names none")
    parser.add_argument("--replan-tick", type=float, default=10.0,
                        help="seconds between re-planning passes (each resource keeps its own interval)")
    parser.add_argument("--gpu-product-label", default="nvidia.com/gpu.product",
                        help="node label selecting the GPU type ('' to select by spec.scheduling only)")
    parser.add_argument("--image-pull-policy", default="IfNotPresent", choices=["Always", "IfNotPresent", "Never"])
    parser.add_argument("--liveness", default=None, metavar="URL",
                        help="serve kopf's liveness probe, e.g. http://0.0.0.0:8080/healthz")
    parser.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve the operator's Prometheus metrics (plan in force, re-plans) on this port")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.set_defaults(run=run)
    return parser


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    from disagg_operator.render import RenderSettings
    from disagg_operator.runner import OperatorConfig

    if args.plan_workers < 1 or args.plan_threads < 1:
        raise SystemExit("--plan-workers and --plan-threads must be at least 1")
    return OperatorConfig(
        namespaces=tuple(args.namespaces), kubeconfig=args.kubeconfig, context=args.context,
        plan_workers=args.plan_workers, plan_threads=args.plan_threads, profiles_dir=args.profiles_dir,
        liveness_endpoint=args.liveness, metrics_port=args.metrics_port, prometheus_url=args.prometheus_url, replan_tick=args.replan_tick,
        render=RenderSettings(gpu_product_label=args.gpu_product_label, image_pull_policy=args.image_pull_policy),
    )


def run(args: argparse.Namespace) -> int:
    # kopf and the kubernetes client load only when the operator actually runs (see disagg_cli.main).
    from disagg_operator.runner import run_operator

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_operator(config_from_args(args)))
    except KeyboardInterrupt:
        return 130
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m disagg_cli.operator`), used by the container image and e2e tests."""
    parser = argparse.ArgumentParser(prog="disagg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["operator", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
