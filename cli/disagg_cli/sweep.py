"""The rate sweep behind `disagg simulate`: rates from the command line, curves, the JSON and the plot."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from disagg_planner.api import DisaggServingSpec, LatencyProfile, Plan
from disagg_planner.errors import PlannerError
from pydantic import ValidationError
from rich.table import Table

from .planning import CliError
from .specfile import format_validation_error

MAX_RATES = 200


def parse_rates(rates: str | None, sweep: str | None) -> list[float]:
    """`--rates 1,2,4` or `--sweep LO:HI:N`, as sorted positive rates."""
    try:
        if rates is not None:
            values = [float(r) for r in rates.split(",") if r.strip()]
        else:
            lo_s, hi_s, n_s = (sweep or "").split(":")
            lo, hi, n = float(lo_s), float(hi_s), int(n_s)
            if n < 2 or hi <= lo:
                raise CliError(f"--sweep {sweep}: need LO < HI and N >= 2")
            values = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
    except ValueError:
        what = f"--rates {rates}" if rates is not None else f"--sweep {sweep}"
        raise CliError(f"{what}: expected numbers like 1,2,4 or LO:HI:N like 0.5:8:16") from None
    if not values or min(values) <= 0:
        raise CliError("rates must be positive")
    if len(values) > MAX_RATES:
        raise CliError(f"{len(values)} rates: at most {MAX_RATES} per sweep")
    return sorted(set(values))


def load_plan(path: Path) -> Plan:
    """A Plan JSON file (camelCase or snake_case keys)."""
    try:
        return Plan.model_validate_json(path.read_text())
    except OSError as exc:
        raise CliError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValidationError as exc:
        lines = format_validation_error(exc).replace("  spec.", "  plan.").replace("  spec", "  plan")
        raise CliError(f"{path}: invalid plan\n{lines}") from None


def run_sweep(
    spec: DisaggServingSpec, profile: LatencyProfile | None, plan: Plan, baseline: Plan, rates: list[float],
    out: Path, seed: int,
) -> Table:
    """Simulate both plans at every rate; write simulate.json and attainment.png under `out`; return a table."""
    from disagg_planner.search import attainment_curve

    try:
        curves = {name: attainment_curve(spec, p, rates, profile, seed) for name, p in
                  (("disaggregated", plan), ("colocated", baseline))}
    except PlannerError as exc:
        raise CliError(str(exc)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"{out}: cannot create: {exc.strerror or exc}") from None
    doc = {
        "specHash": spec.planning_hash(),
        "sloAttainmentTarget": spec.slo.attainment,
        "ttftMs": spec.slo.ttft_ms,
        "tpotMs": spec.slo.tpot_ms,
        "rates": rates,
        "plans": {
            name: {"plan": p.to_wire(), "gpus": p.gpus, "points": [asdict(pt) for pt in curves[name]]}
            for name, p in (("disaggregated", plan), ("colocated", baseline))
        },
    }
    (out / "simulate.json").write_text(json.dumps(doc, indent=1))
    _plot(doc, out / "attainment.png")
    return _table(doc)


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, color in (("disaggregated", "C0"), ("colocated", "C1")):
        entry = doc["plans"][name]
        rates = [pt["rate"] for pt in entry["points"]]
        both = [100 * pt["attainment"] for pt in entry["points"]]
        label = f"{name} ({entry['gpus']} GPUs)"
        axes[0].plot(rates, both, marker="o", color=color, label=label)
        axes[1].plot([r / entry["gpus"] for r in rates], both, marker="o", color=color, label=label)
        axes[1].plot([r / entry["gpus"] for r in rates], [100 * pt["ttft_attainment"] for pt in entry["points"]],
                     linestyle=":", color=color, label=f"{name} TTFT only")
        axes[1].plot([r / entry["gpus"] for r in rates], [100 * pt["tpot_attainment"] for pt in entry["points"]],
                     linestyle="--", color=color, label=f"{name} TPOT only")
    for ax, xlabel in zip(axes, ("rate (req/s)", "per-GPU rate (req/s)"), strict=True):
        ax.axhline(100 * doc["sloAttainmentTarget"], color="grey", linestyle="--", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("SLO attainment (%)")
        ax.set_ylim(0, 105)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"TTFT <= {doc['ttftMs']:g} ms and TPOT <= {doc['tpotMs']:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(doc: dict) -> Table:
    table = Table(title="SLO attainment by rate (steady state)", title_justify="left")
    table.add_column("rate (req/s)", justify="right")
    for name in ("disaggregated", "colocated"):
        table.add_column(f"{name} ({doc['plans'][name]['gpus']} GPUs)", justify="right")
    for i, rate in enumerate(doc["rates"]):
        cells = [f"{100 * doc['plans'][n]['points'][i]['attainment']:.1f}%" for n in ("disaggregated", "colocated")]
        table.add_row(f"{rate:g}", *cells)
    return table
