"""`python -m disagg_runtime.serve --role ...`: what the --local launcher starts (same flags as `disagg serve`)."""

from __future__ import annotations

import argparse
import sys

from .entry import run_serve
from .options import add_serve_arguments


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disagg_runtime.serve")
    add_serve_arguments(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
