"""A benchmark run end to end: sample traces, replay them at each rate, summarise and write results."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
from disagg_planner.api.workload import DatasetName, WorkloadSpec
from disagg_planner.workloads import clip_requests, sample_requests

from .client import RequestRecord, ServerUnreachable, check_reachable, run_trace, server_max_context
from .prompts import PromptMode
from .report import RunSummary, max_rate_meeting, plot, print_table, summarize, write_json


class BenchError(Exception):
    """A benchmark setting the user must fix."""


@dataclass(frozen=True)
class BenchConfig:
    """What to send, how fast, and against which SLOs."""

    url: str
    workload: DatasetName
    rates: list[float]
    num_requests: int
    ttft_slo: float
    tpot_slo: float
    out: Path
    attainment_target: float = 0.9
    prompt_mode: PromptMode = "ids"
    model: str | None = None
    max_context: int | None = None
    seed: int = 0
    timeout_s: float = 600.0


def parse_sweep(text: str) -> list[float]:
    """`lo:hi:n` -> n rates evenly spaced from lo to hi."""
    try:
        lo, hi, n = text.split(":")
        rates = np.linspace(float(lo), float(hi), int(n))
    except ValueError as e:
        raise BenchError(f"--sweep must be lo:hi:n (e.g. 1:8:4), got {text!r}") from e
    if int(n) < 1 or float(lo) <= 0 or float(hi) < float(lo):
        raise BenchError(f"--sweep needs 0 < lo <= hi and n >= 1, got {text!r}")
    return [round(float(r), 6) for r in rates]


async def _context(config: BenchConfig) -> tuple[str | None, int | None]:
    async with aiohttp.ClientSession() as session:
        await check_reachable(session, config.url.rstrip("/"))
        model, ctx = await server_max_context(session, config.url.rstrip("/"))
    return config.model or model, config.max_context or ctx


def run_bench(config: BenchConfig) -> tuple[list[RunSummary], float | None]:
    """Run every rate in order, print the table, write bench.json and bench.png under `out`."""
    if config.num_requests < 1:
        raise BenchError("--num-requests must be >= 1")
    try:
        return _run(config)
    except ServerUnreachable as e:
        raise BenchError(str(e)) from None


def _run(config: BenchConfig) -> tuple[list[RunSummary], float | None]:
    if not config.url.startswith(("http://", "https://")):
        raise BenchError(f"--url must start with http:// or https://, got {config.url!r}")
    model, max_context = asyncio.run(_context(config))
    summaries: list[RunSummary] = []
    records: dict[float, list[RequestRecord]] = {}
    for rate in config.rates:
        trace = sample_requests(WorkloadSpec(rate=rate, dataset=config.workload), rate, config.num_requests,
                                config.seed)
        if max_context:
            trace = clip_requests(trace, max_context)
        records[rate] = asyncio.run(run_trace(config.url, trace, model=model, prompt_mode=config.prompt_mode,
                                              seed=config.seed, timeout=config.timeout_s))
        summaries.append(summarize(records[rate], rate=rate, ttft_slo=config.ttft_slo, tpot_slo=config.tpot_slo))
    goodput = max_rate_meeting(summaries, config.attainment_target)
    print_table(summaries, ttft_slo=config.ttft_slo, tpot_slo=config.tpot_slo, goodput=goodput,
                target=config.attainment_target)
    config.out.mkdir(parents=True, exist_ok=True)
    meta = {"url": config.url, "model": model, "workload": config.workload, "num_requests": config.num_requests,
            "ttft_slo_s": config.ttft_slo, "tpot_slo_s": config.tpot_slo, "max_context": max_context,
            "attainment_target": config.attainment_target, "prompt_mode": config.prompt_mode,
            "seed": config.seed, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    write_json(config.out / "bench.json", meta, summaries, records, goodput)
    plot(config.out / "bench.png", summaries, records, ttft_slo=config.ttft_slo, tpot_slo=config.tpot_slo,
         target=config.attainment_target)
    return summaries, goodput
