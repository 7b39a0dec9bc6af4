"""Dispatch of `disagg serve` after parsing: the launcher or one role; ServeError becomes exit code 2."""

from __future__ import annotations

import argparse
import sys

from .options import ServeError, check_serve_arguments


def run_serve(args: argparse.Namespace) -> int:
    """Run what the parsed flags ask for; the process's exit code."""
    try:
        check_serve_arguments(args)
        if args.local:
            from .local import run_local

            return run_local(args)
        from .roles import run_role

        return run_role(args)
    except ServeError as e:
        print(f"disagg serve: {e}", file=sys.stderr)
        return 2
    return 0
