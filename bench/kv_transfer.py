"""KV transfer: the channels' per-pull cost, and the KV pull's share of a served request's latency.

Channel table: a KV server runs in a child process with payloads staged (as a prefill worker holds them
after its forward, engine/kv_export.py); this process pulls them through the real KVPuller, as a decode
worker does, and times each pull from the request to the last layer placed. Channels: tcp, nccl (gloo on
CPU), ipc (CUDA IPC on a GPU; on CPU the same path through shared memory), each raw and with FP8. The
per-pull fixed cost is the intercept of a least-squares line through (bytes, seconds) over the sizes.
On ipc the table also has `ipc-direct`: direct reads of the same staged payloads out of the server's
staging arena (kv/arena.py), which is what a decode worker on the prefill's node does.

Full path: a router, a prefill and a decode worker as processes (`disagg serve --local`), the Llama-1B
shape (hidden 2048, 16 layers, 32/8 heads, FFN 8192, vocab 32000, bf16; random weights) with 1024-token
prompts and 64 output tokens over CUDA IPC on a GPU, or a small shape over TCP on CPU. Requests go one
at a time; each one's KV pull seconds are the delta of the decode worker's `disagg_kv_transfer_seconds`
(the whole pull, as the decode worker waits for it) and its latency is the client's end-to-end time.
`summary.kv_share_of_request_latency` is the median over requests of pull / end-to-end (goal <= 0.005).

    python bench/kv_transfer.py --device cpu     # CPU: tcp and gloo table, full path over tcp
    python bench/kv_transfer.py --device cuda    # one GPU: ipc and tcp table, full path over ipc

Writes bench/results/kv_transfer-cpu.json or kv_transfer-cuda-<gpu>.json (the GPU from
torch.cuda.get_device_name, e.g. kv_transfer-cuda-h200.json). FP8 on CPU costs more to encode than it
saves on loopback; it is meant for GPUs on slow links. The load average is recorded, as CPU numbers move
with it.
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
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

# Channel table: Llama-3-8B, 32 layers, 8 KV heads of 128 -> 128 KiB of bf16 K+V per token.
SHAPE = {"layers": 32, "heads": 8, "dim": 128, "dtype": "bfloat16"}
# Full path: the models' HF config overrides (as bench/predicted_vs_measured.py's SHAPES).
PATH_SHAPES: dict[str, dict] = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                 "max_position_embeddings": 4096, "torch_dtype": "bfloat16"},
    "cpu-small": {"hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4, "num_attention_heads": 8,
                  "num_key_value_heads": 4, "vocab_size": 2048, "max_position_embeddings": 1024},
}
GOAL_SHARE = 0.005
FIXED_REPEATS = 50

SERVER = textwrap.dedent(
    """
    import asyncio, sys, json, torch, torch.multiprocessing as mp
    from disagg_runtime.kv import Endpoint, KVLease, KVServer
    from disagg_runtime.kv.arena import ArenaPool
    from disagg_runtime.kv.testing import make_payload, stage_in_arena
    device, tokens, shape = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    if device == "cpu":
        mp.set_sharing_strategy("file_system")  # lets the ipc path share CPU tensors by name

    class Parked:
        # Keeps each staged payload after a pull, so the benchmark can pull it again.
        def __init__(self):
            # Staged in an arena, as a prefill engine stages them, so a direct read can map it.
            self.pool = ArenaPool(device, 4 << 30)
            self.staged, self.where = {}, {}
            for n in sorted({1, *tokens}):
                p = make_payload(f"t{n}", tokens=n, layers=shape["layers"], heads=shape["heads"],
                                 dim=shape["dim"], dtype=shape["dtype"])
                p.keys = [k.to(device) for k in p.keys]
                p.values = [v.to(device) for v in p.values]
                staged, where = stage_in_arena(self.pool, p)
                self.staged[p.header.request_id] = staged
                self.where[p.header.request_id] = (where.arena.id, where.offset)
        def arena(self, arena_id):
            return self.pool.buffer(arena_id)
        async def checkout(self, rid, ticket=None):
            s = self.staged[rid]
            async def release(ok):
                pass
            return KVLease(s.header, s, release)

    async def main():
        gpu = None if device == "cpu" else "bench-gpu"
        parked = Parked()
        if device != "cpu":
            torch.cuda.synchronize()
        server = KVServer(parked, local=Endpoint("bench-node", gpu), device=device, host="127.0.0.1",
                          timeout=120)
        print(await server.start(), json.dumps(parked.where), flush=True)
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
        for n in tokens:  # link setup, and the sender's staging grown to the largest payload
            await puller.pull(KVAddress("127.0.0.1", port), f"t{n}")
        if codec == "none":
            # The fixed cost itself: a 1-token payload (every layer, a few KiB), pulled many times.
            fixed = []
            for _ in range(FIXED_REPEATS):
                t0 = time.perf_counter()
                await puller.pull(KVAddress("127.0.0.1", port), "t1")
                if device != "cpu":
                    torch.cuda.synchronize()
                fixed.append(time.perf_counter() - t0)
            rows.append({"channel": channel, "codec": codec, "tokens": 1, "raw_bytes": stats[-1].raw_bytes,
                         "wire_bytes": stats[-1].wire_bytes, "seconds_median": statistics.median(fixed),
                         "seconds_min": min(fixed), "raw_gb_per_s": stats[-1].raw_bytes / statistics.median(fixed) / 1e9,
                         "us_per_token": statistics.median(fixed) * 1e6, "fixed_cost_probe": True})
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


async def direct_times(port: int, device: str, where: dict, tokens: list[int], repeats: int) -> list[dict]:
    """Direct reads (kv/puller.py `read_direct`) of the staged payloads: the arena is mapped by the first."""
    from disagg_runtime.kv import KVHeader

    gpu = None if device == "cpu" else "bench-gpu"
    puller = KVPuller(local=Endpoint("bench-node", gpu), device=device, channel="ipc", timeout=120)
    address = KVAddress("127.0.0.1", port)
    rows = []

    def header(n: int) -> KVHeader:
        return KVHeader(request_id=f"t{n}", model_id="m", num_layers=SHAPE["layers"], num_kv_heads=SHAPE["heads"],
                        head_dim=SHAPE["dim"], dtype=SHAPE["dtype"], num_tokens=n)

    try:
        for n, count in [(1, FIXED_REPEATS), *((n, repeats) for n in tokens)]:
            arena, offset = where[f"t{n}"]
            await puller.read_direct(address, header(n), arena, offset)  # maps the arena (once)
            seconds = []
            for _ in range(count):
                t0 = time.perf_counter()
                await puller.read_direct(address, header(n), arena, offset)
                seconds.append(time.perf_counter() - t0)
            raw = header(n).nbytes
            med = statistics.median(seconds)
            rows.append({"channel": "ipc-direct", "codec": "none", "tokens": n, "raw_bytes": raw, "wire_bytes": raw,
                         "seconds_median": med, "seconds_min": min(seconds), "raw_gb_per_s": raw / med / 1e9,
                         "us_per_token": med / n * 1e6, **({"fixed_cost_probe": True} if n == 1 else {})})
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


def fixed_cost(rows: list[dict], channel: str) -> float | None:
    """Median seconds of a 1-token raw pull: every control message, copy launch and sync, ~no bytes."""
    probe = [r["seconds_median"] for r in rows if r["channel"] == channel and r.get("fixed_cost_probe")]
    return probe[0] if probe else None


def intercept(rows: list[dict], channel: str) -> float | None:
    """Intercept (seconds) of the least-squares line through (raw bytes, median seconds) of raw pulls."""
    pts = [(r["raw_bytes"], r["seconds_median"]) for r in rows
           if r["channel"] == channel and r["codec"] == "none" and not r.get("fixed_cost_probe")]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(x for x, _ in pts)
    my = statistics.fmean(y for _, y in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)
    return my - slope * mx


def _model(shape: str, cache: Path) -> Path:
    target = cache / f"kv-{shape}"
    if not (target / "config.json").is_file():
        write_random_model(target, seed=0, **PATH_SHAPES[shape])
    return target


def _one_request(url: str, prompt: list[int], output_len: int) -> float:
    import urllib.request

    body = json.dumps({"prompt": prompt, "max_tokens": output_len, "ignore_eos": True, "temperature": 0}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as resp:
        data = json.loads(resp.read())
    seconds = time.perf_counter() - t0
    got = data["usage"]["completion_tokens"]
    if got != output_len:
        raise RuntimeError(f"asked for {output_len} tokens, got {got}")
    return seconds


def path_share(args) -> dict:
    """Serve the model as processes, send requests one at a time, and divide each one's KV pull by its latency."""
    model_dir = Path(args.model_path) if args.model_path else _model(args.path_shape, args.cache_dir)
    worker_args = ["--device", args.device, "--num-kv-blocks", str(args.num_kv_blocks), "--kv-channel",
                   args.path_channel]
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    per_request = []
    with LocalCluster(model_dir=model_dir, port=0, worker_args=worker_args, startup_timeout_s=600) as cluster:
        decode_url = f"http://127.0.0.1:{cluster.ports['decode-0']}"
        for i in range(args.path_warmup + args.path_requests):
            prompt = [3 + (i * 31 + j * 7) % (vocab - 3) for j in range(args.path_prompt)]
            before = _scrape(decode_url)
            e2e = _one_request(cluster.url, prompt, args.path_output)
            after = _scrape(decode_url)
            pulls = _summed(after, "disagg_kv_transfer_seconds_count") - _summed(before, "disagg_kv_transfer_seconds_count")
            pull_s = _summed(after, "disagg_kv_transfer_seconds_sum") - _summed(before, "disagg_kv_transfer_seconds_sum")
            moved = _summed(after, "disagg_kv_transfer_bytes_total") - _summed(before, "disagg_kv_transfer_bytes_total")
            if pulls != 1:
                raise RuntimeError(f"request {i}: the decode worker recorded {pulls} KV pulls, expected 1")
            if i >= args.path_warmup:
                per_request.append({"e2e_s": e2e, "kv_pull_s": pull_s, "kv_bytes": moved, "share": pull_s / e2e})
        channels = sorted({dict(k[1]).get("channel") for k in after if k[0] == "disagg_kv_transfer_seconds_count"})
    shares = [r["share"] for r in per_request]
    return {"model": str(model_dir), "shape": args.path_shape if not args.model_path else None,
            "requests": len(per_request), "warmup": args.path_warmup, "prompt_tokens": args.path_prompt,
            "output_tokens": args.path_output, "concurrency": 1, "channels": channels,
            "kv_bytes_per_pull": per_request[0]["kv_bytes"],
            "kv_pull_s_median": statistics.median(r["kv_pull_s"] for r in per_request),
            "kv_pull_s_min": min(r["kv_pull_s"] for r in per_request),
            "e2e_s_median": statistics.median(r["e2e_s"] for r in per_request),
            "kv_share_median": statistics.median(shares),
            "kv_share_of_sums": sum(r["kv_pull_s"] for r in per_request) / sum(r["e2e_s"] for r in per_request),
            "per_request": per_request}


def _gpu_slug(name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    words = [w for w in name.replace("NVIDIA", "").split() if w]
    return (words[0] if words else "gpu").lower().replace("/", "-")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", default="16,128,512,2048", help="channel table: prompt lengths to move")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--channels", help="comma list of tcp, nccl, ipc (default: tcp,nccl on CPU, ipc,tcp on GPU)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--skip-path", action="store_true", help="only the channel table")
    ap.add_argument("--path", action="store_true", help=argparse.SUPPRESS)  # the full path runs by default now
    ap.add_argument("--path-only", action="store_true", help="only the full-path measurement")
    ap.add_argument("--model-path", help="full path: model directory (default: a random --path-shape model)")
    ap.add_argument("--path-shape", choices=sorted(PATH_SHAPES),
                    help="full path: model shape (default: llama-1b on cuda, cpu-small on cpu)")
    ap.add_argument("--cache-dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "disagg-bench-models")
    ap.add_argument("--path-channel", help="full path: kvChannel (default: ipc on cuda, tcp on cpu)",
                    choices=["auto", "tcp", "ipc", "nccl"])
    ap.add_argument("--path-requests", type=int, default=20)
    ap.add_argument("--path-warmup", type=int, default=3)
    ap.add_argument("--path-prompt", type=int, help="full path: prompt tokens (default 1024 on cuda, 512 on cpu)")
    ap.add_argument("--path-output", type=int, help="full path: output tokens (default 64 on cuda, 32 on cpu)")
    ap.add_argument("--num-kv-blocks", type=int, default=2048, help="full path: KV blocks per worker")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    gpu = args.device == "cuda"
    args.path_shape = args.path_shape or ("llama-1b" if gpu else "cpu-small")
    args.path_channel = args.path_channel or ("ipc" if gpu else "tcp")
    args.path_prompt = args.path_prompt or (1024 if gpu else 512)
    args.path_output = args.path_output or (64 if gpu else 32)
    tokens = [int(t) for t in args.tokens.split(",")]
    default = "tcp,nccl" if args.device == "cpu" else "ipc,tcp"
    channels = [] if args.path_only else (args.channels or default).split(",")
    load_before = os.getloadavg()
    rows = []
    if channels:
        proc = subprocess.Popen([sys.executable, "-c", SERVER, args.device, json.dumps(tokens),
                                 json.dumps(SHAPE)], stdout=subprocess.PIPE, text=True)
        try:
            port_text, where_text = proc.stdout.readline().split(" ", 1)
            port, where = int(port_text), json.loads(where_text)
            for channel in channels:
                for codec in ("none", "fp8"):
                    rows += asyncio.run(pull_times(port, args.device, channel, codec, tokens, args.repeats))
                    print(f"  {channel}/{codec} done", flush=True)
                if channel == "ipc":
                    rows += asyncio.run(direct_times(port, args.device, where, tokens, args.repeats))
                    print("  ipc direct reads done", flush=True)
        finally:
            proc.kill()
            proc.wait()
    path = None if args.skip_path else path_share(args)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"KV pull, Llama-3-8B shape (128 KiB/token bf16), {args.device}, median of {args.repeats}")
    for col in ("channel", "codec", "tokens", "raw MiB", "wire MiB", "ms", "raw GB/s", "us/token"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["channel"], r["codec"], str(r["tokens"]), f"{r['raw_bytes'] / 2**20:.0f}",
                      f"{r['wire_bytes'] / 2**20:.1f}", f"{r['seconds_median'] * 1e3:.2f}",
                      f"{r['raw_gb_per_s']:.2f}", f"{r['us_per_token']:.1f}")
    console = Console(width=120)
    kinds = [*channels, *(["ipc-direct"] if "ipc" in channels else [])]
    fixed = {c: fixed_cost(rows, c) for c in kinds}
    lines = {c: intercept(rows, c) for c in kinds}
    if rows:
        console.print(table)
        console.print("per-pull fixed cost (1-token pull, median of "
                      f"{FIXED_REPEATS}): " + ", ".join(f"{c} {'-' if v is None else f'{v * 1e3:.3f} ms'}"
                                                        for c, v in fixed.items())
                      + "; intercept of the size fit: " + ", ".join(
                          f"{c} {'-' if v is None else f'{v * 1e3:.3f} ms'}" for c, v in lines.items()))
    if path is not None:
        console.print(f"full path ({path['channels']}, {path['prompt_tokens']}+{path['output_tokens']} tokens, "
                      f"{path['requests']} requests): KV pull {path['kv_pull_s_median'] * 1e3:.3f} ms median, request "
                      f"{path['e2e_s_median'] * 1e3:.1f} ms median: KV share {path['kv_share_median']:.3%} "
                      f"(goal <= {GOAL_SHARE:.1%})")
    device_name = torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"
    path_channel = args.path_channel if args.path_channel in fixed else (channels[0] if channels else None)
    summary = {"kv_share_of_request_latency": None if path is None else path["kv_share_median"],
               "kv_share_goal": GOAL_SHARE,
               "meets_goal": None if path is None else path["kv_share_median"] <= GOAL_SHARE,
               "kv_pull_s_median": None if path is None else path["kv_pull_s_median"],
               "e2e_s_median": None if path is None else path["e2e_s_median"],
               "per_pull_fixed_cost_s": fixed.get(path_channel) if path_channel else None,
               "per_pull_fixed_cost_s_by_channel": fixed,
               "size_fit_intercept_s_by_channel": lines,
               "path_channel": args.path_channel,
               "path_transfer_kinds": None if path is None else path["channels"]}
    doc = {"benchmark": "kv_transfer", "summary": summary, "shape": SHAPE, "device": args.device,
           "device_name": device_name, "cpus": os.cpu_count(),
           "load_avg_1m_before_after": [load_before[0], os.getloadavg()[0]],
           "torch": torch.__version__, "repeats": args.repeats,
           "method": "channel table: KVServer with payloads staged in an arena in a child process, KVPuller here; "
                     "time from pull request to the last layer placed on the receiving device (ipc-direct: from "
                     "the read call to the bytes placed, the arena mapped by an earlier read). full path: "
                     "LocalCluster, sequential requests, decode worker's KV transfer seconds (a pull, or a direct "
                     "read plus whatever of its release outlasts the import) over the client's end-to-end seconds",
           "rows": rows, "path": path, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"kv_transfer-cuda-{_gpu_slug(device_name)}.json" if gpu else "kv_transfer-cpu.json"
    out = args.out / name
    out.write_text(json.dumps(doc, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
