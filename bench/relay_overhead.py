"""CPU the serving path spends per streamed token: the colocated worker's event loop and the router.

A colocated worker process runs a fake-fast engine (each decode step sleeps `--step-ms`, as a GPU step
does with the GIL released, then emits one token per running request), a router process serves it, and
this process opens N concurrent streams of T tokens through the router, reading them as fast as it can.
The CPU time (user + system, from /proc) each of the two processes spent during the run, divided by the
N x T tokens, is what relaying one token costs there; the fake engine's own work (a StepOutput per token)
is in the worker's figure, the same before and after.

Run it against another checkout's runtime to compare (the engine fake uses only the worker-engine
interface both have):

    python bench/relay_overhead.py --label after
    git archive main | tar -x -C /tmp/main-snapshot
    PYTHONPATH=/tmp/main-snapshot/runtime:$PYTHONPATH python bench/relay_overhead.py --label before

Each run merges its rows under `runs[label]` in --out (bench/results/relay_overhead.json) and rewrites the
`summary` (µs per token, router and worker, per stream count, with the after/before ratio when both are
there). The load average is recorded: CPU time barely moves with load, wall time does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

RESULTS = Path(__file__).parent / "results" / "relay_overhead.json"


# ---- the worker process: a colocated worker around a fake-fast engine ------------------------------
@dataclass
class _Seq:
    rid: str
    max_tokens: int
    produced: int = 0


@dataclass
class FakeEngine:
    """What ColocatedWorker calls on an engine, with steps that cost `step_s` of sleep and no model."""

    step_s: float
    model_id: str = "fake"
    block_size: int = 16
    max_context: int = 1 << 20
    total_blocks: int = 1 << 20
    free_blocks: int = 1 << 20
    num_preempted: int = 0
    seqs: dict[str, _Seq] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from disagg_runtime.engine.preemption import PreemptionStats

        self.preemption_stats = PreemptionStats()
        self.config = type("Config", (), {"vocab_size": 1 << 20})()

    @property
    def num_running(self) -> int:
        return len(self.seqs)

    @property
    def request_ids(self) -> list[str]:
        return list(self.seqs)

    @property
    def has_decode_work(self) -> bool:
        return bool(self.seqs)

    decode_in_flight = False  # the fake does not overlap steps

    def check_admissible(self, prompt_tokens: int, max_tokens: int) -> None:
        pass

    def can_admit(self, prompt_tokens: int, pending_blocks: int = 0) -> bool:
        return True

    def _outputs(self, seqs) -> list:
        from disagg_runtime.engine import StepOutput

        outs = []
        for seq in seqs:
            seq.produced += 1
            done = seq.produced >= seq.max_tokens
            outs.append(StepOutput(seq.rid, 1000 + seq.produced, " tok", done, "length" if done else None))
            if done:
                del self.seqs[seq.rid]
        return outs

    def prefill(self, requests, reserve_decode: bool = False) -> list:
        time.sleep(self.step_s)
        new = [_Seq(r.request_id, r.sampling.max_tokens) for r in requests]
        for seq in new:
            self.seqs[seq.rid] = seq
        return self._outputs(new)

    def decode(self) -> list:
        time.sleep(self.step_s)
        return self._outputs(list(self.seqs.values()))

    def release(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        self.seqs.pop(request_id, None)


async def _serve_worker(step_s: float) -> None:
    from disagg_runtime.serve.runner import start_site
    from disagg_runtime.workers.base import WorkerConfig
    from disagg_runtime.workers.colocated import ColocatedWorker

    worker = ColocatedWorker(FakeEngine(step_s), WorkerConfig(max_batch=4096, max_queue=4096))
    _, port = await start_site(worker.app(), "127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)
    await asyncio.Event().wait()


async def _serve_router(worker_port: int) -> None:
    from disagg_runtime.router.app import Router, RouterConfig
    from disagg_runtime.serve.runner import start_site

    router = Router(RouterConfig(prefill=[], decode=[], colocated=[f"127.0.0.1:{worker_port}"], poll_s=0.5))
    _, port = await start_site(router.app(), "127.0.0.1", 0)
    print(json.dumps({"port": port}), flush=True)
    await asyncio.Event().wait()


# ---- the driver -------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def _spawn(*args: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"{args} exited before it listened (exit {proc.wait()})")
    return proc, json.loads(line)["port"]


async def _stream(s: aiohttp.ClientSession, url: str, i: int, tokens: int) -> int:
    body = {"prompt": [5 + i % 100, 6, 7], "max_tokens": tokens, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    got = 0
    async with s.post(f"{url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: {") and b'"usage"' in line:
                got = json.loads(line[6:])["usage"]["completion_tokens"]
    return got


async def _run(url: str, streams: int, tokens: int) -> tuple[float, int]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as s:
        await _stream(s, url, 0, 4)  # warm: the router's connections to the worker are open
        start = time.perf_counter()
        got = await asyncio.gather(*(_stream(s, url, i, tokens) for i in range(streams)))
        return time.perf_counter() - start, sum(got)


def measure(streams_list: list[int], tokens: int, step_s: float) -> list[dict]:
    worker, worker_port = _spawn("--role", "worker", "--step-ms", str(step_s * 1000))
    router, router_port = _spawn("--role", "router", "--worker-port", str(worker_port))
    url = f"http://127.0.0.1:{router_port}"
    rows = []
    try:
        time.sleep(1.0)  # the router's first poll
        for streams in streams_list:
            before = _cpu_s(worker.pid), _cpu_s(router.pid)
            load = os.getloadavg()[0]
            wall, got = asyncio.run(_run(url, streams, tokens))
            after = _cpu_s(worker.pid), _cpu_s(router.pid)
            if got != streams * tokens:
                raise RuntimeError(f"{streams} streams of {tokens} tokens delivered {got} tokens")
            worker_us = (after[0] - before[0]) / got * 1e6
            router_us = (after[1] - before[1]) / got * 1e6
            rows.append({"streams": streams, "tokens_per_stream": tokens, "tokens": got, "wall_s": round(wall, 3),
                         "tokens_per_s": round(got / wall), "worker_cpu_us_per_token": round(worker_us, 2),
                         "router_cpu_us_per_token": round(router_us, 2), "load_1m_before": load})
            print(f"{streams:>4} streams x {tokens} tokens: worker {worker_us:6.1f} us/token, router "
                  f"{router_us:6.1f} us/token, {got / wall:8.0f} tokens/s, load {load:.1f}", flush=True)
    finally:
        for proc in (router, worker):
            proc.terminate()
            proc.wait(10)
    return rows


def summarize(runs: dict[str, dict]) -> dict:
    summary: dict = {"unit": "CPU microseconds per streamed token (user + system)", "by_label": {}}
    for label, run in runs.items():
        summary["by_label"][label] = {
            str(r["streams"]): {"worker": r["worker_cpu_us_per_token"], "router": r["router_cpu_us_per_token"]}
            for r in run["rows"]}
    if "before" in runs and "after" in runs:
        ratio = {}
        before = {r["streams"]: r for r in runs["before"]["rows"]}
        for r in runs["after"]["rows"]:
            b = before.get(r["streams"])
            if b:
                ratio[str(r["streams"])] = {
                    side: round(r[f"{side}_cpu_us_per_token"] / b[f"{side}_cpu_us_per_token"], 3)
                    for side in ("worker", "router")}
        summary["after_over_before"] = ratio
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["driver", "worker", "router"], default="driver", help=argparse.SUPPRESS)
    parser.add_argument("--worker-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--streams", default="16,64,128", help="concurrent stream counts, comma-separated")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per stream")
    parser.add_argument("--step-ms", type=float, default=3.0, help="fake engine step (sleep, GIL released)")
    parser.add_argument("--label", default="after", help="key of this run in the JSON (before/after)")
    parser.add_argument("--note", default="", help="what this run measured (the checkout, say)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.role == "worker":
        asyncio.run(_serve_worker(args.step_ms / 1000))
        return
    if args.role == "router":
        asyncio.run(_serve_router(args.worker_port))
        return
    import disagg_runtime

    rows = measure([int(x) for x in args.streams.split(",")], args.tokens, args.step_ms / 1000)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    runs = doc.get("runs", {})
    runs[args.label] = {"rows": rows, "runtime": str(Path(disagg_runtime.__file__).parent), "note": args.note,
                        "step_ms": args.step_ms, "cpus": os.cpu_count()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summarize(runs), "runs": runs}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
