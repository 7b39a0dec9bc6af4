"""The flags of `disagg serve` (shared by the CLI and `python -m disagg_runtime.serve`); argparse only."""

from __future__ import annotations

import argparse
import errno
import os
import socket

from .affinity import parse_cpu_affinity


class ServeError(Exception):
    """A serve setup a user must fix (bad flags, missing model, a process that failed to start)."""


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not 0 < value < 86400:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds below a day, got {value}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"not a port: {value}")
    return value


def _watermark(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def _endpoints(text: str) -> list[str]:
    items = [e.strip() for e in text.split(",") if e.strip()]
    for e in items:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise argparse.ArgumentTypeError(f"endpoint {e!r} must be host:port")
    return items


def _cpu_affinity(text: str) -> dict[str, set[int]]:
    try:
        return parse_cpu_affinity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of `disagg serve`; the operator renders pods with the role flags."""
    mode = parser.add_argument_group("mode")
    mode.add_argument("--local", action="store_true",
                      help="run router + prefill + decode workers as local processes (CPU, tiny random model "
                           "unless --model)")
    mode.add_argument("--role", choices=["prefill", "decode", "colocated", "router"],
                      help="run one role in this process (colocated: both phases on one engine, no KV transfer)")

    model = parser.add_argument_group("model and engine")
    model.add_argument("--model", "--model-path", dest="model_path", metavar="PATH",
                       help="HF-style model directory (config.json, safetensors, tokenizer.json); the router "
                            "reads only its chat template (chat_template.jinja or tokenizer_config.json)")
    model.add_argument("--model-spec", default=os.environ.get("DISAGG_MODEL_SPEC"), metavar="JSON",
                       help="without --model-path: random weights of this ModelSpec's shape (default "
                            "$DISAGG_MODEL_SPEC)")
    model.add_argument("--cache-dir", metavar="DIR", help="--local: where the tiny random model is written "
                       "(default $DISAGG_CACHE or ~/.cache/disagg)")
    model.add_argument("--device", default="auto", help="cpu, cuda, cuda:N, or auto (cuda when available)")
    model.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto")
    model.add_argument("--block-size", type=_positive, default=16, help="KV-cache block size, tokens")
    model.add_argument("--num-kv-blocks", type=_positive, help="KV-cache blocks (default: from memory)")
    model.add_argument("--kv-memory-fraction", type=float, default=0.9)
    model.add_argument("--kv-watermark", type=_watermark, default=0.01,
                       help="share of KV blocks a new request must leave free (blocks for outputs come on demand)")
    model.add_argument("--preemption", choices=["swap", "recompute"], default="swap",
                       help="when KV runs out: swap the latest admitted request to host memory (bit-exact), or "
                            "drop its KV and prefill it again on resume")
    model.add_argument("--swap-space-gib", type=float, default=4.0,
                       help="host memory for swapped-out KV; beyond it preemption recomputes")
    model.add_argument("--overlap-decode", choices=["auto", "on", "off"], default="auto",
                       help="launch each decode step before the host has processed the one before (auto: on "
                            "for the fused single-GPU path, where the host work would leave the GPU idle)")
    model.add_argument("--tp", type=_positive, default=1, help="tensor-parallel degree of this instance")
    model.add_argument("--pp", type=_positive, default=1, help="pipeline-parallel degree of this instance")
    model.add_argument("--stage", type=int, help="pipeline stage this pod serves (with --pp > 1)")
    model.add_argument("--collective-timeout", type=float, default=10.0,
                       help="seconds any collective between the ranks of a tp x pp instance may take; a rank "
                            "silent for longer takes the instance out of service")

    net = parser.add_argument_group("network")
    net.add_argument("--host", default=None, help="bind address (default 0.0.0.0; 127.0.0.1 with --local)")
    net.add_argument("--port", type=_port, default=8000, help="HTTP port (0 picks a free one)")
    net.add_argument("--kv-port", type=_port, default=0, help="prefill: KV server port (0 picks a free one)")
    net.add_argument("--advertise-host", help="prefill: host decode workers use for its KV server "
                     "(default: the address the router reaches it at)")

    work = parser.add_argument_group("workers")
    work.add_argument("--kv-channel", choices=["auto", "tcp", "ipc", "nccl"], default="auto",
                      help="KV transport (auto: ipc on one node's GPUs, nccl across nodes, tcp on CPU)")
    work.add_argument("--kv-compression", choices=["none", "fp8"], default="none")
    work.add_argument("--kv-timeout", type=float, default=30.0, help="seconds per KV transfer step")
    work.add_argument("--prefill-token-budget", type=_positive, default=4096, help="prompt tokens per batch")
    work.add_argument("--max-queue", type=_positive, default=256, help="waiting requests before 429")
    work.add_argument("--max-batch", type=_positive, default=256,
                      help="decode and colocated: running requests at most")
    work.add_argument("--max-prompt-tokens", type=_positive, help="longest prompt accepted (400 beyond)")
    work.add_argument("--colocated-prefill", choices=["priority", "chunked"], default="priority",
                      help="colocated: prefill-priority steps, or chunked prefill mixed into decode steps")
    work.add_argument("--chunk-token-budget", type=_positive, default=512,
                      help="colocated chunked prefill: tokens per mixed step, decode tokens included")
    work.add_argument("--step-trace", metavar="DIR", default=None,
                      help="append one JSON line per engine step to DIR/<role>-<pid>.jsonl (diagnosis: "
                           "hold a served run's steps against the latency model)")

    router = parser.add_argument_group("router")
    router.add_argument("--prefill-endpoints", type=_endpoints, default=[], metavar="HOST:PORT,...",
                        help="prefill workers (DNS names are re-resolved: a headless service works)")
    router.add_argument("--decode-endpoints", type=_endpoints, default=[], metavar="HOST:PORT,...")
    router.add_argument("--colocated-endpoints", type=_endpoints, default=[], metavar="HOST:PORT,...",
                        help="colocated workers (each serves whole requests)")
    router.add_argument("--endpoints-file", default=os.environ.get("DISAGG_ENDPOINTS"), metavar="JSON",
                        help='{"prefill": [URL, ...], "decode": [...], "colocated": [...]}, re-read every poll '
                             "(default $DISAGG_ENDPOINTS: the operator's ConfigMap)")
    router.add_argument("--max-in-flight", type=_positive, default=4096)
    router.add_argument("--max-body-bytes", type=_positive, default=4 << 20)
    router.add_argument("--heartbeat-timeout", type=_seconds, default=10.0,
                        help="seconds of worker silence before a request fails")
    router.add_argument("--connect-timeout", type=_seconds, default=5.0,
                        help="seconds to connect to a worker before trying another")
    router.add_argument("--response-timeout", type=_seconds, default=30.0,
                        help="seconds a worker may take to answer a request's headers (a frozen one is marked "
                             "down after this)")
    router.add_argument("--body-timeout", type=_seconds, default=30.0,
                        help="seconds a client (or the router, to a worker) may pause while sending a body (408)")
    router.add_argument("--served-model-name", help="model name in responses (default: the workers' model id)")

    security = parser.add_argument_group("security")
    security.add_argument("--api-key-file", metavar="PATH",
                          help="router: clients must send one of this file's keys (one a line; re-read when it "
                               "changes) as 'Authorization: Bearer KEY' or 'x-api-key'")
    security.add_argument("--metrics-require-key", action="store_true",
                          help="router: /metrics needs an API key too (probes stay open)")
    security.add_argument("--internal-token-file", metavar="PATH",
                          help="the deployment's shared token (current first, then the previous one during a "
                               "rotation): workers and KV links refuse peers without it, the router sends it. "
                               "--local generates one unless given")

    local = parser.add_argument_group("--local")
    local.add_argument("--prefill-workers", type=_positive, default=1)
    local.add_argument("--decode-workers", type=_positive, default=1)
    for role in ("prefill", "decode"):
        local.add_argument(f"--{role}-tp", type=_positive, default=1, help=f"tensor-parallel degree of each {role} "
                           "instance (one process per rank)")
        local.add_argument(f"--{role}-pp", type=_positive, default=1, help=f"pipeline stages of each {role} instance")
    local.add_argument("--colocated", action="store_true",
                       help="the colocated baseline instead: router + --colocated-workers colocated workers")
    local.add_argument("--colocated-workers", type=_positive, default=1)
    local.add_argument("--cpu-affinity", type=_cpu_affinity, metavar="NAME=CORES,...",
                       help="pin processes to CPU cores: a role (prefill, decode, colocated, router) or an instance "
                            "(decode-1) = cores, e.g. prefill=0,decode=1 or prefill=0-3,decode=4-7")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])


def check_serve_arguments(args: argparse.Namespace) -> None:
    """Cross-flag rules argparse cannot express; ServeError says what to change."""
    if args.local == bool(args.role):
        raise ServeError("give either --local or --role prefill|decode|colocated|router")
    if args.colocated and not args.local:
        raise ServeError("--colocated goes with --local; a deployed colocated instance is --role colocated")
    if args.role in ("prefill", "decode", "colocated") and not (args.model_path or args.model_spec):
        raise ServeError(f"--role {args.role} needs --model-path (or --model-spec for random weights)")
    servable = args.prefill_endpoints and args.decode_endpoints or args.colocated_endpoints or args.endpoints_file
    if args.role == "router" and not servable:
        raise ServeError("--role router needs --prefill-endpoints and --decode-endpoints, --colocated-endpoints, "
                         "or --endpoints-file")
    if args.stage is not None and not 0 <= args.stage < args.pp:
        raise ServeError(f"--stage {args.stage} is not a stage of a --pp {args.pp} pipeline")
    if args.metrics_require_key and not args.api_key_file:
        raise ServeError("--metrics-require-key needs --api-key-file")
    if not 0 < args.kv_memory_fraction <= 1:
        raise ServeError(f"--kv-memory-fraction must be in (0, 1], got {args.kv_memory_fraction}")


def check_port_free(host: str, port: int) -> None:
    """ServeError when `host:port` cannot be bound (in use, or not an address of this machine); 0 always works."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ServeError(f"--host {host}: cannot resolve it: {e.strerror or e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # SO_REUSEADDR as aiohttp sets it: a port in TIME_WAIT is free to the server, only a listener is not.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            raise ServeError(bind_error(host, port, e)) from None


def bind_error(host: str, port: int, error: OSError) -> str:
    """The one-line message for a port that cannot be bound."""
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use; stop what listens there or pick another --port (0: any)"
    if error.errno == errno.EACCES:
        return f"port {port} on {host} needs privileges; pick a port above 1023"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"
