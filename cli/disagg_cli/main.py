"""The `disagg` console script: a table of subcommands, each in its own module, imported only when run.

Adding a subcommand (one line in `SUBCOMMANDS`):
    1. Write `disagg_cli/<name>.py` with
           def add_parser(subparsers) -> argparse.ArgumentParser   # calls subparsers.add_parser("<name>", ...)
                                                                   # and parser.set_defaults(run=run)
           def run(args: argparse.Namespace) -> int                # the exit code
       Import heavy dependencies (torch, kopf, matplotlib, the planner's search) inside `run`, not at module top,
       so `disagg --help` and the other subcommands stay fast and install-light.
    2. Add `"<name>": ("disagg_cli.<name>", "<one-line help>")` to `SUBCOMMANDS` below.
Exit codes: 0 success, 1 a check failed, 2 bad input or an infeasible problem (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys

# name -> (module, one-line help). Only the module of the subcommand being run is imported.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "plan": ("disagg_cli.plan", "find the highest per-GPU-goodput placement for a spec or DisaggServing manifest"),
    "simulate": ("disagg_cli.simulate", "simulate a plan and its colocated baseline over a rate sweep"),
    "serve": ("disagg_cli.serve", "serve a model: --local (router + prefill + decode here) or one --role"),
    "profile": ("disagg_cli.profile", "measure prefill/decode step times of a model and write the planner's latency profile"),
    "bench": ("disagg_cli.bench", "measure TTFT/TPOT, SLO attainment and goodput of an OpenAI-compatible endpoint"),
    "operator": ("disagg_cli.operator", "run the DisaggServing operator"),
    "crds": ("disagg_cli.crds", "generate the DisaggServing CRD from the API types"),
}


def build_parser(selected: str | None) -> argparse.ArgumentParser:
    """The full parser for `selected` (its module imported); other subcommands appear by name and help only."""
    parser = argparse.ArgumentParser(
        prog="disagg", description="Goodput-optimised disaggregated LLM serving: plan, simulate, deploy."
    )
    parser.add_argument("--version", action="version", version=f"disagg {package_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        if name == selected:
            importlib.import_module(module).add_parser(subparsers)
        else:
            subparsers.add_parser(name, help=help_text, add_help=False)
    return parser


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), not a second copy kept in the code."""
    try:
        return importlib.metadata.version("disagg")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed: run `pip install -e .`)"


def _selected(argv: list[str]) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None) if argv else None


def main(argv: list[str] | None = None) -> int:
    """Parse `argv` (default: the process's), run the subcommand, return its exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    selected = _selected(argv)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
