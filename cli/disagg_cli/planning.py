"""What `plan` and `simulate` share: reading the inputs and running the search, with errors made user-facing."""

from __future__ import annotations

import argparse
from pathlib import Path

from disagg_planner.api import DisaggServingSpec, LatencyProfile, Plan
from disagg_planner.errors import PlannerError
from pydantic import ValidationError
from rich.console import Console

from .render import search_progress
from .specfile import SpecFileError, format_validation_error, load_spec


class CliError(Exception):
    """A problem the user fixes (bad file, infeasible spec); printed without a traceback, exit code 2."""


def load_inputs(spec_path: Path, profile_path: Path | None) -> tuple[DisaggServingSpec, LatencyProfile | None]:
    """The spec and the optional latency profile, each validated with field-named errors."""
    try:
        spec = load_spec(spec_path)
    except SpecFileError as exc:
        raise CliError(str(exc)) from None
    if profile_path is None:
        return spec, None
    try:
        return spec, LatencyProfile.load(profile_path)
    except OSError as exc:
        raise CliError(f"{profile_path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        lines = format_validation_error(exc).replace("  spec.", "  profile.")
        raise CliError(f"{profile_path}: invalid latency profile\n{lines}") from None


def search(spec: DisaggServingSpec, profile: LatencyProfile | None, args: argparse.Namespace, err: Console,
           colocated: bool = False) -> Plan:
    """find_plan (or find_colocated_plan) with a progress bar on stderr; planner errors become CliError."""
    from disagg_planner.search import find_colocated_plan, find_plan
    from disagg_planner.search.deadline import plan_within

    if args.workers is not None and args.workers < 1:
        raise CliError(f"--workers must be at least 1, got {args.workers}")
    deadline = getattr(args, "deadline", None)
    if deadline is not None and not deadline > 0:
        raise CliError(f"--deadline must be a positive number of seconds, got {deadline}")
    try:
        with search_progress("colocated baseline" if colocated else "searching placements", err) as progress:
            fn, kwargs = find_plan, {"affinity": None if args.affinity == "auto" else args.affinity}
            if colocated:
                fn, kwargs = find_colocated_plan, {}
            if deadline is None:
                return fn(spec, profile, workers=args.workers, progress=progress, seed=args.seed, **kwargs)
            return plan_within(fn, spec, profile, deadline_s=deadline, progress=progress, workers=args.workers,
                               seed=args.seed, **kwargs)
    except PlannerError as exc:
        raise CliError(str(exc)) from None
