"""`disagg simulate FILE`: a plan and its colocated baseline over a sweep of rates, as JSON and a PNG plot."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .plan import add_search_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `simulate` subcommand."""
    parser = subparsers.add_parser(
        "simulate", help="simulate a plan and its colocated baseline over a rate sweep",
        description="Simulate the plan (found by the search, or --plan) and the best colocated plan at each rate; "
        "write simulate.json (attainment vs rate) and attainment.png under --out.",
    )
    parser.add_argument("file", type=Path, help="YAML/JSON: a DisaggServing manifest or a bare spec")
    parser.add_argument("--plan", type=Path, help="a Plan JSON (from `disagg plan --json`) instead of searching")
    rates = parser.add_mutually_exclusive_group(required=True)
    rates.add_argument("--rates", help="comma-separated rates, req/s: 1,2,4")
    rates.add_argument("--sweep", metavar="LO:HI:N", help="N evenly spaced rates from LO to HI, req/s")
    parser.add_argument("--out", type=Path, required=True, help="directory for simulate.json and attainment.png")
    add_search_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .planning import CliError, load_inputs, search
    from .sweep import load_plan, parse_rates, run_sweep

    err = Console(stderr=True)
    try:
        rates = parse_rates(args.rates, args.sweep)
        spec, profile = load_inputs(args.file, args.profile)
        if args.plan is not None:
            plan = load_plan(args.plan)
            if plan.spec_hash and plan.spec_hash != spec.planning_hash():
                err.print(f"[yellow]warning: {args.plan} was planned for another spec (hash {plan.spec_hash}, "
                          f"this spec {spec.planning_hash()})[/yellow]")
        else:
            plan = search(spec, profile, args, err)
        baseline = search(spec, profile, args, err, colocated=True)
        report = run_sweep(spec, profile, plan, baseline, rates, args.out, args.seed)
    except CliError as exc:
        print(f"disagg simulate: {exc}", file=sys.stderr)
        return 2
    Console().print(report)
    return 0
