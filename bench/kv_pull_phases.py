"""Where a KV pull's fixed cost goes: each phase of a 1-token pull, on both ends, on one clock.

A KV server with staged payloads runs in a child process (as in bench/kv_transfer.py); this process
pulls through the real KVPuller. Both ends stamp the same phases with `time.perf_counter_ns`
(CLOCK_MONOTONIC, one clock for every process of the host), so a pull splits into: the pull message's
trip to the server (hop 1), the server's work until its reply is written, the reply's trip back
(hop 2), and the receiver's work until the payload is placed. A bare ping-pong of the same framed
control messages between the two processes gives the hop cost with no KV work at all.

    python bench/kv_pull_phases.py --device cuda --channel ipc
    python bench/kv_pull_phases.py --device cpu --channel tcp

Writes bench/results/kv_pull_phases-<device>-<channel>.json; `summary` holds the median of each phase
in microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch
from disagg_runtime.kv import Endpoint, KVAddress, KVPuller
from disagg_runtime.kv.framing import FramedStream

SERVER = textwrap.dedent(
    """
    import asyncio, json, sys, time, torch, torch.multiprocessing as mp
    from disagg_runtime.kv import Endpoint, KVLease, KVServer, StagedKV
    from disagg_runtime.kv.channel import KVChannel
    from disagg_runtime.kv.framing import FramedStream
    from disagg_runtime.kv.testing import make_payload
    device, stamps_path = sys.argv[1], sys.argv[2]
    if device == "cpu":
        mp.set_sharing_strategy("file_system")
    now = time.perf_counter_ns
    stamps = []

    class Parked:
        def __init__(self):
            p = make_payload("t1", tokens=1, layers=32, heads=8, dim=128, dtype="bfloat16")
            p.keys = [k.to(device) for k in p.keys]
            p.values = [v.to(device) for v in p.values]
            self.staged = StagedKV.of(p)
        async def checkout(self, rid, ticket=None):
            stamps.append(("checkout", now()))
            async def release(ok):
                pass
            return KVLease(self.staged.header, self.staged, release)

    answer = KVServer._answer
    async def timed_answer(self, channel, msg):
        stamps.append(("pull_read", now()))
        await answer(self, channel, msg)
        stamps.append(("acked", now()))
        with open(stamps_path, "a") as f:
            f.write(json.dumps(stamps) + "\\n")
        stamps.clear()
    KVServer._answer = timed_answer
    flush = FramedStream.flush
    async def timed_flush(self):
        await flush(self)
        stamps.append(("reply_written", now()))
    FramedStream.flush = timed_flush

    async def pong(reader, writer):
        stream = FramedStream(reader, writer, timeout=60)
        while True:
            try:
                msg = await stream.recv_json(wait_forever=True)
            except Exception:
                return
            await stream.send_json(msg)

    async def main():
        gpu = None if device == "cpu" else "bench-gpu"
        server = KVServer(Parked(), local=Endpoint("bench-node", gpu), device=device, host="127.0.0.1", timeout=60)
        port = await server.start()
        ping = await asyncio.start_server(pong, "127.0.0.1", 0)
        print(port, ping.sockets[0].getsockname()[1], flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


def _wrap_async(cls, name: str, label: str, stamps: list) -> None:
    original = getattr(cls, name)

    async def timed(self, *args, **kwargs):
        out = await original(self, *args, **kwargs)
        stamps.append((label, time.perf_counter_ns()))
        return out

    setattr(cls, name, timed)


async def ping_pong(port: int, repeats: int) -> list[float]:
    stream = await FramedStream.connect("127.0.0.1", port, timeout=60)
    rtts = []
    try:
        for i in range(repeats + 5):
            t0 = time.perf_counter_ns()
            await stream.send_json({"type": "ping", "i": i})
            await stream.recv_json()
            if i >= 5:
                rtts.append((time.perf_counter_ns() - t0) / 1e3)
    finally:
        await stream.close()
    return rtts


async def pulls(port: int, device: str, channel: str, repeats: int) -> list[list]:
    from disagg_runtime.kv.channel import KVChannel

    stamps: list = []
    recv_json = FramedStream.recv_json
    seen = {"n": 0}

    async def timed_recv_json(self, *args, **kwargs):
        out = await recv_json(self, *args, **kwargs)
        seen["n"] += 1
        stamps.append((f"recv_{out.get('type')}", time.perf_counter_ns()))
        return out

    FramedStream.recv_json = timed_recv_json
    _wrap_async(FramedStream, "send_json", "pull_sent", stamps)
    from disagg_runtime.kv.ipc import CudaIpcKVChannel

    for cls in (KVChannel, CudaIpcKVChannel):  # the IPC channel overrides it
        _wrap_async(cls, "_settle", "settled", stamps)
    gpu = None if device == "cpu" else "bench-gpu"
    puller = KVPuller(local=Endpoint("bench-node", gpu), device=device, channel=channel, timeout=60)
    runs = []
    try:
        for i in range(repeats + 5):
            stamps.clear()
            start = time.perf_counter_ns()
            await puller.pull(KVAddress("127.0.0.1", port), "t1")
            stamps.append(("returned", time.perf_counter_ns()))
            if i >= 5:
                runs.append([("start", start), *stamps])
            await asyncio.sleep(0.005)  # as between served requests: the server's loop goes idle
    finally:
        await puller.close()
        FramedStream.recv_json = recv_json
    return runs


def phases(client: list, server: list) -> dict[str, float]:
    c, s = dict(client), dict(server)
    us = lambda a, b: (b - a) / 1e3  # noqa: E731
    return {"hop1_pull_to_server": us(c["start"], s["pull_read"]),
            "server_checkout": us(s["pull_read"], s["checkout"]),
            "server_stage_and_write": us(s["checkout"], s["reply_written"]),
            "hop2_reply_to_client": us(s["reply_written"], c["recv_begin"]),
            "client_land_and_settle": us(c["recv_begin"], c["settled"]),
            "client_after_settle": us(c["settled"], c["returned"]),
            "whole_pull": us(c["start"], c["returned"])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--channel", default=None, choices=["tcp", "ipc"])
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    channel = args.channel or ("ipc" if args.device == "cuda" else "tcp")
    if args.device == "cpu":
        torch.multiprocessing.set_sharing_strategy("file_system")
    stamps_path = Path(tempfile.mkdtemp()) / "server-stamps.ndjson"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, args.device, str(stamps_path)], stdout=subprocess.PIPE,
                            text=True)
    try:
        kv_port, ping_port = (int(p) for p in proc.stdout.readline().split())
        rtts = asyncio.run(ping_pong(ping_port, args.repeats))
        client_runs = asyncio.run(pulls(kv_port, args.device, channel, args.repeats))
        time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    server_runs = [json.loads(line) for line in stamps_path.read_text().splitlines()][-len(client_runs):]
    rows = [phases(c, s) for c, s in zip(client_runs, server_runs, strict=True)]
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    summary["framed_ping_pong_rtt"] = statistics.median(rtts)
    print(f"{'phase (us, median of ' + str(len(rows)) + ')':<40} {'us':>9}")
    for k, v in summary.items():
        print(f"{k:<40} {v:9.1f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kv_pull_phases-{args.device}-{channel}.json"
    path.write_text(json.dumps({"benchmark": "kv_pull_phases", "device": args.device, "channel": channel,
                                "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
                                "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0], "summary": summary,
                                "rows": rows}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
