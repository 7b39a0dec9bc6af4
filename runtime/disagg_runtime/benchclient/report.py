"""Summaries of a benchmark run: latency percentiles, SLO attainment, goodput; table, JSON and plot."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .client import RequestRecord


@dataclass(frozen=True)
class RunSummary:
    """One rate's results. Attainment counts every sent request (errors and 429s do not attain)."""

    rate: float
    requests: int
    ok: int
    rejected: int
    errors: int
    duration_s: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    tpot_p50: float | None
    tpot_p90: float | None
    tpot_p99: float | None
    e2e_p50: float | None
    attainment: float
    ttft_attainment: float
    tpot_attainment: float
    goodput_rps: float
    throughput_tok_s: float


def _pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(records: list[RequestRecord], *, rate: float, ttft_slo: float, tpot_slo: float) -> RunSummary:
    """Percentiles over completed requests; attainment over all; goodput = attaining requests / duration."""
    ok = [r for r in records if r.ok]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok]
    n = len(records)
    ttft_ok = [r for r in ok if r.ttft <= ttft_slo]
    tpot_ok = [r for r in ok if r.tpot <= tpot_slo]
    both = [r for r in ok if r.ttft <= ttft_slo and r.tpot <= tpot_slo]
    start = min((r.sent for r in records), default=0.0)
    end = max((r.last_token or r.sent for r in records), default=0.0)
    duration = max(end - start, 1e-9)
    return RunSummary(
        rate=rate, requests=n, ok=len(ok), rejected=sum(r.status == 429 for r in records),
        errors=sum(not r.ok and r.status != 429 for r in records), duration_s=duration,
        ttft_p50=_pct(ttfts, 50), ttft_p90=_pct(ttfts, 90), ttft_p99=_pct(ttfts, 99),
        tpot_p50=_pct(tpots, 50), tpot_p90=_pct(tpots, 90), tpot_p99=_pct(tpots, 99),
        e2e_p50=_pct([r.e2e for r in ok], 50),
        attainment=len(both) / n if n else 0.0, ttft_attainment=len(ttft_ok) / n if n else 0.0,
        tpot_attainment=len(tpot_ok) / n if n else 0.0, goodput_rps=len(both) / duration,
        throughput_tok_s=sum(r.reported_tokens or r.tokens for r in ok) / duration,
    )


def max_rate_meeting(summaries: list[RunSummary], target: float) -> float | None:
    """Goodput of a sweep: the highest rate with attainment >= target, interpolated to the crossing.

    None when even the lowest rate misses the target. If every rate meets it, the highest rate tried
    (a lower bound: sweep higher to find the real goodput).
    """
    pts = sorted((s.rate, s.attainment) for s in summaries)
    if not pts or pts[0][1] < target:
        return None
    best = pts[0][0]
    for (r0, a0), (r1, a1) in zip(pts, pts[1:], strict=False):
        if a1 >= target:
            best = r1
            continue
        best = r0 + (r1 - r0) * (a0 - target) / (a0 - a1)  # a0 >= target > a1: linear crossing
        break
    return best


def print_table(summaries: list[RunSummary], *, ttft_slo: float, tpot_slo: float, goodput: float | None,
                target: float) -> None:
    from rich.console import Console
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.1f}"

    table = Table(title=f"disagg bench (SLO: TTFT <= {ttft_slo * 1000:.0f} ms, TPOT <= {tpot_slo * 1000:.0f} ms)")
    for col in ("rate req/s", "sent", "ok", "429", "err", "TTFT p50/p90/p99 ms", "TPOT p50/p90/p99 ms",
                "attain", "goodput req/s", "tok/s"):
        table.add_column(col, justify="right")
    for s in summaries:
        table.add_row(f"{s.rate:g}", str(s.requests), str(s.ok), str(s.rejected), str(s.errors),
                      f"{ms(s.ttft_p50)}/{ms(s.ttft_p90)}/{ms(s.ttft_p99)}",
                      f"{ms(s.tpot_p50)}/{ms(s.tpot_p90)}/{ms(s.tpot_p99)}", f"{s.attainment:.1%}",
                      f"{s.goodput_rps:.2f}", f"{s.throughput_tok_s:.0f}")
    console = Console(width=max(Console().width, 150))  # piped output would otherwise wrap at 80
    console.print(table)
    if len(summaries) > 1:
        text = "below every rate tried" if goodput is None else f"{goodput:.2f} req/s"
        console.print(f"max rate with attainment >= {target:.0%}: {text}")


def write_json(path: Path, meta: dict, summaries: list[RunSummary], records: dict[float, list[RequestRecord]],
               goodput: float | None) -> None:
    doc = {**meta, "goodput_rps": goodput, "runs": [asdict(s) for s in summaries],
           "requests": {str(rate): [r.to_json() for r in recs] for rate, recs in records.items()}}
    path.write_text(json.dumps(doc, indent=1))


def plot(path: Path, summaries: list[RunSummary], records: dict[float, list[RequestRecord]], *,
         ttft_slo: float, tpot_slo: float, target: float) -> None:
    """Attainment vs rate (sweeps) and the TTFT / TPOT distributions of each rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rates = [s.rate for s in summaries]
    axes[0].plot(rates, [s.attainment for s in summaries], "o-", label="TTFT and TPOT")
    axes[0].plot(rates, [s.ttft_attainment for s in summaries], "s--", label="TTFT")
    axes[0].plot(rates, [s.tpot_attainment for s in summaries], "^--", label="TPOT")
    axes[0].axhline(target, color="grey", lw=0.8)
    axes[0].set(xlabel="rate (req/s)", ylabel="SLO attainment", ylim=(0, 1.05), title="attainment")
    axes[0].legend()
    for rate, recs in records.items():
        ok = [r for r in recs if r.ok]
        for ax, values in ((axes[1], sorted(r.ttft for r in ok)), (axes[2], sorted(r.tpot for r in ok))):
            if values:
                ax.plot(np.array(values) * 1000, np.linspace(0, 1, len(values)), label=f"{rate:g} req/s")
    axes[1].axvline(ttft_slo * 1000, color="grey", lw=0.8)
    axes[2].axvline(tpot_slo * 1000, color="grey", lw=0.8)
    axes[1].set(xlabel="TTFT (ms)", ylabel="CDF", title="time to first token")
    axes[2].set(xlabel="TPOT (ms)", ylabel="CDF", title="time per output token")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
