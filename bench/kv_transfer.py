"""KV channel bandwidth: pull one request's KV (Llama-3-8B shape) across a process boundary, per channel.

A KV server runs in a child process with payloads parked (as a prefill worker holds them); this
process pulls them through the real KVPuller, as a decode worker does, and times each pull from the
request to the last layer placed. Channels: tcp, nccl (gloo on CPU), ipc (CUDA IPC on a GPU; on CPU
the same handle path through shared memory), each raw and with FP8 compression. Prints a table and
writes JSON to --out (bench/results/kv_transfer-<device>.json).

    python bench/kv_transfer.py                  # CPU: tcp and nccl over gloo
    python bench/kv_transfer.py --device cuda    # one GPU: ipc and tcp (nccl needs a second GPU)

With --path it also serves a model as processes (router, prefill, decode: `disagg serve --local`),
sends requests, and reads the workers' Prometheus metrics for the KV transfer's share of request
latency (paper: < 0.1% on NVLink; our goal: < 1% on any link). Default model: the tiny random one;
on a GPU pass --model-path to a real-shaped checkpoint (e.g. the one bench/engine_gpu.py writes).

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
from disagg_runtime.serve.local import LocalCluster
from disagg_runtime.serve.model_cache import tiny_model

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
        async def checkout(self, rid, ticket=None):
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


def _scrape(url: str) -> dict[tuple[str, tuple], float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def _summed(samples: dict, name: str) -> float:
    return sum(v for (n, _), v in samples.items() if n == name)


async def _load(url: str, *, requests: int, concurrency: int, prompt_len: int, output_len: int) -> int:
    import aiohttp

    sem = asyncio.Semaphore(concurrency)
    ok = 0

    async def one(session, i):
        nonlocal ok
        body = {"prompt": [3 + (i * 31 + j) % 250 for j in range(prompt_len)], "max_tokens": output_len,
                "ignore_eos": True, "temperature": 0}
        async with sem, session.post(f"{url}/v1/completions", json=body) as resp:
            await resp.read()
            ok += resp.status == 200

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, i) for i in range(requests)))
    return ok


def path_share(args) -> dict:
    """Serve a model as processes, send requests, and compare KV transfer time with request latency."""
    model_dir = Path(args.model_path) if args.model_path else tiny_model()
    worker_args = ["--device", args.device, "--num-kv-blocks", str(args.num_kv_blocks), "--kv-channel",
                   args.path_channel]
    with LocalCluster(model_dir=model_dir, port=0, worker_args=worker_args) as cluster:
        ok = asyncio.run(_load(cluster.url, requests=args.path_requests, concurrency=args.path_concurrency,
                               prompt_len=args.path_prompt, output_len=args.path_output))
        decode = _scrape(f"http://127.0.0.1:{cluster.ports['decode-0']}")
        router = _scrape(cluster.url)
    pulls = _summed(decode, "disagg_kv_transfer_seconds_count")
    transfer = _summed(decode, "disagg_kv_transfer_seconds_sum")
    moved = _summed(decode, "disagg_kv_transfer_bytes_total")
    e2e = _summed(router, "disagg_e2e_request_latency_seconds_sum")
    done = _summed(router, "disagg_e2e_request_latency_seconds_count")
    channels = sorted({dict(k[1]).get("channel") for k in decode if k[0] == "disagg_kv_transfer_seconds_count"})
    return {"model": str(model_dir), "requests": args.path_requests, "ok": ok, "prompt_tokens": args.path_prompt,
            "output_tokens": args.path_output, "concurrency": args.path_concurrency, "channels": channels,
            "pulls": pulls, "kv_bytes_per_pull": moved / pulls if pulls else None,
            "kv_transfer_mean_s": transfer / pulls if pulls else None,
            "e2e_mean_s": e2e / done if done else None,
            "kv_share_of_e2e": transfer / e2e if e2e else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", default="128,512,2048", help="prompt lengths to move")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--channels", help="comma list of tcp, nccl, ipc (default: tcp,nccl on CPU, ipc,tcp on GPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--path", action="store_true", help="also measure the KV share of request latency")
    ap.add_argument("--path-only", action="store_true", help="only the --path measurement")
    ap.add_argument("--model-path", help="--path: model directory (default: the tiny random model)")
    ap.add_argument("--path-channel", default="auto", choices=["auto", "tcp", "ipc", "nccl"])
    ap.add_argument("--path-requests", type=int, default=64)
    ap.add_argument("--path-concurrency", type=int, default=8)
    ap.add_argument("--path-prompt", type=int, default=256, help="--path: prompt tokens per request")
    ap.add_argument("--path-output", type=int, default=32, help="--path: output tokens per request")
    ap.add_argument("--num-kv-blocks", type=int, default=2048, help="--path: KV blocks per worker")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    tokens = [int(t) for t in args.tokens.split(",")]
    default = "tcp,nccl" if args.device == "cpu" else "ipc,tcp"
    channels = [] if args.path_only else (args.channels or default).split(",")
    load_before = os.getloadavg()
    path = path_share(args) if args.path or args.path_only else None
    rows = []
    if channels:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, args.device, json.dumps(tokens),
                                 json.dumps(SHAPE)], stdout=subprocess.PIPE, text=True)
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
    console = Console(width=120)
    if rows:
        console.print(table)
    if path is not None:
        share = path["kv_share_of_e2e"]
        console.print(f"full path ({path['channels']}): {path['ok']}/{path['requests']} ok, KV pull "
                      f"{(path['kv_transfer_mean_s'] or 0) * 1e3:.2f} ms mean, request "
                      f"{(path['e2e_mean_s'] or 0) * 1e3:.1f} ms mean: KV share of request latency "
                      f"{'-' if share is None else f'{share:.3%}'}")
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    doc = {"benchmark": "kv_transfer", "shape": SHAPE, "device": args.device, "device_name": device_name,
           "cpus": os.cpu_count(), "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],
           "torch": torch.__version__, "repeats": args.repeats,
           "method": "KVServer in a child process, KVPuller here; time from pull request to the last layer "
                     "placed on the receiving device", "rows": rows, "path": path,
           "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"kv_transfer-{args.device}.json"
    path.write_text(json.dumps(doc, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
