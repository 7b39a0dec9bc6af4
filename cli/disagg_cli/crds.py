"""`disagg crds`: print, write or check the generated DisaggServing CRD."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from disagg_operator.crd import CRD_PATHS, check_crds, render_crd_yaml, write_crds


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `crds` subcommand."""
    parser = subparsers.add_parser(
        "crds", help="generate the DisaggServing CRD from the API types",
        description="Print the CRD (default), write it to "
        + " and ".join(str(p) for p in CRD_PATHS) + " (--write), or fail when those drift (--check).",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="write the checked-in copies under --root")
    mode.add_argument("--check", action="store_true", help="exit 1 when a checked-in copy differs")
    parser.add_argument("--root", type=Path, default=Path("."), help="repository root (default: .)")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.write:
        for path in write_crds(args.root):
            print(f"wrote {path}")
        return 0
    if args.check:
        drift = check_crds(args.root)
        for item in drift:
            print(f"{item.path}: {item.reason}; run `disagg crds --write`", file=sys.stderr)
        if not drift:
            print("CRD up to date: " + ", ".join(str(p) for p in CRD_PATHS))
        return 1 if drift else 0
    sys.stdout.write(render_crd_yaml())
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (`python -m disagg_cli.crds`), used by `make crds`."""
    parser = argparse.ArgumentParser(prog="disagg")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["crds", *(sys.argv[1:] if argv is None else argv)])
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
