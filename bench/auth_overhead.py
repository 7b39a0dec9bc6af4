"""What the lock-down costs per request: the API-key check, the internal-token middleware, the KV handshake.

- key check: `matches_any` (hash both sides, compare every key) against 1, 10, 100 and 1000 issued keys;
- HTTP: median latency of a trivial aiohttp route over loopback, plain vs behind the router's API-key
  middleware vs behind the workers' internal-token middleware (the handler does nothing, so the
  difference is the middleware);
- KV link setup: connect + handshake + one small pull on a fresh link, without and with the token
  (the HMAC challenge-response adds one round trip). Links are kept per prefill instance, so this is
  paid once per decode-prefill pair, not per request.

Prints a table and writes JSON (`summary` on top) to --out (bench/results/auth_overhead.json). The
machine's load average is recorded: loopback latencies on a shared 2-core machine move with it.

    python bench/auth_overhead.py [--requests 2000] [--links 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web
from disagg_runtime.kv import Endpoint, KVAddress, KVPuller, KVServer
from disagg_runtime.kv.testing import DictSource, make_payload
from disagg_runtime.router.auth import api_key_middleware
from disagg_runtime.security.http_auth import internal_auth_middleware
from disagg_runtime.security.secret_file import SecretFile
from disagg_runtime.security.tokens import INTERNAL_TOKEN_HEADER, InternalToken, matches_any, secret_digest
from disagg_runtime.serve.runner import start_site


def _key_check_us(n_keys: int, repeats: int) -> float:
    keys = [secret_digest(f"sk-{i:040d}") for i in range(n_keys)]  # what SecretFile keeps
    start = time.perf_counter()
    for _ in range(repeats):
        matches_any(["sk-not-issued-000000000000000000000000000"], keys)
    return (time.perf_counter() - start) / repeats * 1e6


async def _http_ms(middlewares: list, headers: dict[str, str], n: int) -> float:
    async def ok(_request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application(middlewares=middlewares)
    app.router.add_post("/v1/completions", ok)
    runner, port = await start_site(app, "127.0.0.1", 0)
    times = []
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(n):
                t = time.perf_counter()
                async with s.post(f"http://127.0.0.1:{port}/v1/completions", data=b"{}", headers=headers) as r:
                    await r.read()
                    assert r.status == 200
                times.append(time.perf_counter() - t)
    finally:
        await runner.cleanup()
    return statistics.median(times) * 1e3


async def _link_ms(token: InternalToken | None, n: int) -> float:
    payloads = [make_payload(f"r{i}", layers=2, tokens=4, heads=1, dim=8) for i in range(n)]
    server = KVServer(DictSource(payloads), local=Endpoint("bench"), host="127.0.0.1", token=token)
    await server.start()
    times = []
    try:
        for p in payloads:
            puller = KVPuller(local=Endpoint("bench"), channel="tcp", timeout=10, token=token)
            t = time.perf_counter()
            await puller.pull(KVAddress("127.0.0.1", server.port), p.header.request_id)
            times.append(time.perf_counter() - t)
            await puller.close()
    finally:
        await server.close()
    return statistics.median(times) * 1e3


async def main_async(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as d:
        keys_file = Path(d, "keys")
        keys_file.write_text("".join(f"sk-{i:040d}\n" for i in range(10)))
        token_file = Path(d, "token")
        token_file.write_text("t" * 43 + "\n")
        keys = SecretFile(keys_file, what="API key")
        token = InternalToken.from_file(str(token_file))
        key_check = {n: _key_check_us(n, max(20, 20000 // n)) for n in (1, 10, 100, 1000)}
        http = {
            "plain": await _http_ms([], {}, args.requests),
            "api_key": await _http_ms([api_key_middleware(keys)], {"Authorization": f"Bearer sk-{9:040d}"},
                                      args.requests),
            "internal_token": await _http_ms([internal_auth_middleware(token)],
                                             {INTERNAL_TOKEN_HEADER: token.header_value()}, args.requests),
        }
        links = {"plain": await _link_ms(None, args.links), "token": await _link_ms(token, args.links)}
    return {"key_check_us": key_check, "http_median_ms": http, "kv_link_setup_median_ms": links}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--links", type=int, default=100)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "auth_overhead.json"))
    args = ap.parse_args()
    load_before = os.getloadavg()[0]
    res = asyncio.run(main_async(args))
    http, links = res["http_median_ms"], res["kv_link_setup_median_ms"]
    summary = {
        "api_key_check_us_10_keys": round(res["key_check_us"][10], 2),
        "api_key_middleware_added_ms": round(http["api_key"] - http["plain"], 3),
        "internal_token_middleware_added_ms": round(http["internal_token"] - http["plain"], 3),
        "kv_link_setup_added_ms": round(links["token"] - links["plain"], 3),
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    print("| what | value |\n| --- | --- |")
    for n, us in res["key_check_us"].items():
        print(f"| key check against {n} keys | {us:.1f} us |")
    for k, v in http.items():
        print(f"| HTTP round trip, {k} | {v:.3f} ms (median of {args.requests}) |")
    for k, v in links.items():
        print(f"| KV link setup + one pull, {k} | {v:.3f} ms (median of {args.links}) |")
    print(f"| load average (1 min), before / after | {summary['load_average_1m']} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, **res}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
