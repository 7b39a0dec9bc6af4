"""KV channel bandwidth: pull one request's KV (Llama-3-8B shape) across a process boundary, per channel.

A KV server runs in a child process with payloads parked (as a prefill worker holds them); this
process pulls them through the real KVPuller, as a decode worker does, and times each pull from the
request to the last layer placed. Channels: tcp, nccl (gloo on CPU), ipc (CUDA IPC on a GPU; on CPU
the same handle path through shared memory), each raw and with FP8 compression. Prints a table and
writes JSON to --out (bench/results/kv_transfer-<device>.json).

    python bench/kv_transfer.py                  # CPU: tcp and nccl over gloo
    python bench/kv_transfer.py --device cuda    # one GPU: ipc and tcp (nccl needs a second GPU)

On CPU, `--channels ipc` exercises the IPC handle path through shared-memory files (one file per tensor):
a correctness path, not a fast one. FP8 on CPU costs more to encode than it saves on loopback; it is
meant for GPUs on slow links. The machine's load average is recorded, as CPU numbers move with it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from disagg_runtime.kv import Endpoint, KVAddress, KVPuller

# Llama-3-8B: 32 layers, 8 KV heads of 128 -> 128 KiB of bf16 K+V per token.
SHAPE = {"layers": 32, "heads": 8, "dim": 128, "dtype": "bfloat16"}

SERVER = textwrap.dedent(
    """
    import asyncio, sys, json, torch, torch.multiprocessing as mp
    from disagg_runtime.kv import Endpoint, KVLease, KVServer, payload_layers
    from disagg_runtime.kv.testing import make_payload
    device, tokens, shape = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    if device == "cpu":
        mp.set_sharing_strategy("file_system")  # lets the ipc path share CPU tensors by name

    class Parked:
        # Keeps each payload after a pull, so the benchmark can pull it again.
        def __init__(self):
            self.payloads = {}
            for n in tokens:
                p = make_payload(f"t{n}", tokens=n, layers=shape["layers"], heads=shape["heads"],
                                 dim=shape["dim"], dtype=shape["dtype"])
                p.keys = [k.to(device) for k in p.keys]
                p.values = [v.to(device) for v in p.values]
                self.payloads[p.header.request_id] = p
        async def checkout(self, rid):
            p = self.payloads[rid]
            async def release(ok):
                pass
            return KVLease(p.header, payload_layers(p), release)

    async def main():
        gpu = None if device == "cpu" else "bench-gpu"
        server = KVServer(Parked(), local=Endpoint("bench-node", gpu), device=device, host="127.0.0.1",
                          timeout=120)
        print(await server.start(), flush=True)
        await asyncio.sleep(3600)
    asyncio.run(main())
    """
)


async def pull_times(port: int, device: str, channel: str, codec: str, tokens: list[int], repeats: int):
    gpu = None if device == "cpu" else "bench-gpu"
    stats = []
    puller = KVPuller(local=Endpoint("bench-node", gpu), device=device, channel=channel, codec=codec,
                      timeout=120, on_transfer=stats.append)
    rows = []
    try:
        await puller.pull(KVAddress("127.0.0.1", port), f"t{tokens[0]}")  # link setup + warm-up
        for n in tokens:
            seconds = []
            for _ in range(repeats):
                stats.clear()
                t0 = time.perf_counter()
                payload = await puller.pull(KVAddress("127.0.0.1", port), f"t{n}")
                if device != "cpu":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t0)
            raw = payload.header.nbytes
            med = statistics.median(seconds)
            rows.append({"channel": channel, "codec": codec, "tokens": n, "raw_bytes": raw,
                         "wire_bytes": stats[-1].wire_bytes, "seconds_median": med, "seconds_min": min(seconds),
                         "raw_gb_per_s": raw / med / 1e9, "us_per_token": med / n * 1e6})
            del payload
    finally:
        await puller.close()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", default="128,512,2048", help="prompt lengths to move")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", help="comma list of tcp, nccl, ipc (default: tcp,nccl on CPU, ipc,tcp on GPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    default = "tcp,nccl" if args.device == "cpu" else "ipc,tcp"
    channels = (args.channels or default).split(",")
    load_before = os.getloadavg()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, args.device, json.dumps(tokens), json.dumps(SHAPE)],
                            stdout=subprocess.PIPE, text=True)
    rows = []
    try:
        port = int(proc.stdout.readline())
        for channel in channels:
            for codec in ("none", "fp8"):
                rows += asyncio.run(pull_times(port, args.device, channel, codec, tokens, args.repeats))
                print(f"  {channel}/{codec} done", flush=True)
    finally:
        proc.kill()
        proc.wait()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"KV pull, Llama-3-8B shape (128 KiB/token bf16), {args.device}, median of {args.repeats}")
    for col in ("channel", "codec", "tokens", "raw MiB", "wire MiB", "ms", "raw GB/s", "us/token"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["channel"], r["codec"], str(r["tokens"]), f"{r['raw_bytes'] / 2**20:.0f}",
                      f"{r['wire_bytes'] / 2**20:.1f}", f"{r['seconds_median'] * 1e3:.1f}",
                      f"{r['raw_gb_per_s']:.2f}", f"{r['us_per_token']:.1f}")
    Console(width=120).print(table)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    doc = {"benchmark": "kv_transfer", "shape": SHAPE, "device": args.device, "device_name": device_name,
           "cpus": os.cpu_count(), "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],
           "torch": torch.__version__, "repeats": args.repeats,
           "method": "KVServer in a child process, KVPuller here; time from pull request to the last layer "
                     "placed on the receiving device", "rows": rows,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kv_transfer-{args.device}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
