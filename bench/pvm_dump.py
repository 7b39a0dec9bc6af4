"""`predicted_vs_measured.py --dump`: one rate's requests, as measured and as predicted, to see which a
prediction misses (and when: the arrival and the client's token times are on the replay's clock)."""

from __future__ import annotations

import json
from pathlib import Path

from disagg_planner.simulator import SimResult
from disagg_planner.workloads import SimRequest
from disagg_runtime.benchclient.client import RequestRecord


def dump_requests(path: Path, trace: list[SimRequest], records: list[RequestRecord],
                  predicted: SimResult) -> None:
    """Per request, in the trace's order: its trace entry, what the client measured, what the simulation
    predicted."""
    by_index = {r.index: r for r in records}
    rows = []
    for i, (req, ttft, tpot) in enumerate(zip(trace, predicted.ttfts, predicted.tpots, strict=True)):
        rec = by_index.get(i)
        ok = rec is not None and rec.ok
        rows.append({"arrival": req.arrival, "input": req.input_len, "output": req.output_len,
                     "ttft": rec.ttft if ok else None, "tpot": rec.tpot if ok else None,
                     "first": rec.first_token if ok else None, "last": rec.last_token if ok else None,
                     "predicted_ttft": float(ttft), "predicted_tpot": float(tpot)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows) + "\n")
