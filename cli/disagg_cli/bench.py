"""`disagg bench`: Poisson load from a workload's length distributions against an OpenAI-compatible server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "bench", help="measure TTFT/TPOT, SLO attainment and goodput of an OpenAI-compatible endpoint",
        description="Send Poisson arrivals with prompt/output lengths drawn from a workload's histograms to "
                    "URL/v1/completions (streaming), then report TTFT/TPOT percentiles, SLO attainment and "
                    "goodput as a table, bench.json and bench.png under --out.",
    )
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--workload", choices=["chatbot", "code", "summarization"], default="chatbot")
    rate = parser.add_mutually_exclusive_group(required=True)
    rate.add_argument("--rate", type=float, help="arrival rate, requests/s")
    rate.add_argument("--sweep", metavar="LO:HI:N", help="N rates from LO to HI; reports the highest rate "
                      "meeting the attainment target")
    parser.add_argument("--num-requests", type=int, default=100, help="requests per rate")
    parser.add_argument("--ttft-slo", type=float, required=True, help="seconds")
    parser.add_argument("--tpot-slo", type=float, required=True, help="seconds")
    parser.add_argument("--attainment-target", type=float, default=0.9)
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="directory for bench.json/png")
    parser.add_argument("--prompt-mode", choices=["ids", "words"], default="ids",
                        help="ids: token-id prompts (exact lengths); words: text for servers without id prompts")
    parser.add_argument("--model", help="model name to send (default: the server's first /v1/models entry)")
    parser.add_argument("--max-context", type=int, help="clip prompt+output to this (default: the server's "
                        "max_model_len)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.set_defaults(run=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from disagg_runtime.benchclient.runner import BenchConfig, BenchError, parse_sweep, run_bench

    try:
        rates = parse_sweep(args.sweep) if args.sweep else [args.rate]
        if rates[0] <= 0:
            raise BenchError(f"--rate must be positive, got {rates[0]}")
        if not 0 < args.attainment_target <= 1:
            raise BenchError("--attainment-target must be in (0, 1]")
        config = BenchConfig(url=args.url, workload=args.workload, rates=rates, num_requests=args.num_requests,
                             ttft_slo=args.ttft_slo, tpot_slo=args.tpot_slo, out=args.out,
                             attainment_target=args.attainment_target, prompt_mode=args.prompt_mode,
                             model=args.model, max_context=args.max_context, seed=args.seed,
                             timeout_s=args.timeout)
        summaries, _ = run_bench(config)
    except BenchError as e:
        print(f"disagg bench: {e}", file=sys.stderr)
        return 2
    print(f"results: {args.out / 'bench.json'}, {args.out / 'bench.png'}")
    return 0 if all(s.ok for s in summaries) else 1
