"""`disagg serve`: a local deployment (--local) or one role of a deployed instance (--role)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    from disagg_runtime.serve.options import add_serve_arguments  # argparse only: keeps --help fast

    parser = subparsers.add_parser(
        "serve", help="serve a model: --local (router + prefill + decode on this machine) or one --role",
        description="Serve a model with disaggregated prefill and decode. `--local` starts a router, a prefill "
                    "and a decode worker as local processes (CPU and a tiny random model unless --model) and "
                    "prints the URL; `--local --colocated` starts the colocated baseline instead (router + "
                    "workers that run both phases). `--role prefill|decode|colocated|router` runs one process "
                    "of a deployment (what the operator's pods run).",
    )
    add_serve_arguments(parser)
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from disagg_runtime.serve.entry import run_serve

    return run_serve(args)
