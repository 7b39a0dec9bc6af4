"""`disagg plan FILE`: the highest per-GPU-goodput placement for a spec or DisaggServing manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `plan` subcommand."""
    parser = subparsers.add_parser(
        "plan", help="find the highest per-GPU-goodput placement for a spec or DisaggServing manifest",
        description="Search prefill/decode parallelism, replica counts and placement (DistServe's algorithms) "
        "by simulation, and print the plan with its colocated baseline. Exit 2 on a malformed spec, an "
        "infeasible problem, a plan below the attainment target (printed, with the shortfall on stderr) or a "
        "search past --deadline.",
    )
    parser.add_argument("file", type=Path, help="YAML/JSON: a DisaggServing manifest or a bare spec")
    add_search_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the Plan as JSON (the CR status form)")
    parser.set_defaults(run=run)
    return parser


def add_search_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every planning subcommand shares."""
    parser.add_argument("--profile", type=Path, help="latency profile JSON written by `disagg profile`")
    parser.add_argument("--workers", type=int, default=None, help="search processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated request sample")
    parser.add_argument("--affinity", choices=["auto", "high", "low"], default="auto",
                        help="force DistServe's high or low node-affinity placement (default: from the network)")
    parser.add_argument("--deadline", type=float, default=600.0, metavar="SECONDS",
                        help="stop the search after this long and exit 2 (default 600)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .planning import CliError, load_inputs, search
    from .render import print_plan

    err = Console(stderr=True)
    try:
        spec, profile = load_inputs(args.file, args.profile)
        plan = search(spec, profile, args, err)
    except CliError as exc:
        print(f"disagg plan: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(plan.model_dump_json(by_alias=True, indent=2))
    else:
        print_plan(plan, Console())
    from disagg_planner.search.shortfall import shortfall

    short = shortfall(plan, spec, profile)
    if short is not None:
        print(f"disagg plan: target not met: {short.message()}", file=sys.stderr)
        return 2
    return 0
