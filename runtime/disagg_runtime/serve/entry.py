"""Dispatch of `disagg serve` after parsing: the launcher or one role; ServeError becomes exit code 2."""

from __future__ import annotations

import argparse
import sys

from .options import ServeError, bind_error, check_port_free, check_serve_arguments


def run_serve(args: argparse.Namespace) -> int:
    """Run what the parsed flags ask for; the process's exit code."""
    try:
        check_serve_arguments(args)
        if args.local:
            from .local import run_local

            return run_local(args)
        from .roles import run_role

        check_port_free(args.host or "0.0.0.0", args.port)  # before the model loads and the app starts
        try:
            return run_role(args)
        except OSError as e:
            if e.errno is None or getattr(e, "filename", None):
                raise  # not the listening socket (a missing model file, say): keep the real error
            raise ServeError(bind_error(args.host or "0.0.0.0", args.port, e)) from None
    except ServeError as e:
        print(f"disagg serve: {e}", file=sys.stderr)
        return 2
    return 0
