"""The closed loop, measured: the operator's pods serving live traffic whose workload drifts.

Everything runs on this machine (as e2e/test_control_loop.py does, with longer scenarios): kmock's API
emulator, the operator, the node agent running the pods it renders as processes in their own network
namespaces, a real Prometheus scraping them, and a load generator that changes the workload mid-run:

- `rate_step`: chat-like lengths, 4 req/s, then 12 req/s (x3);
- `stationary`: 4 req/s for 20 re-plan intervals (Poisson noise only);
- `length_shift`: 4 req/s of chat-like prompts (16-48 tokens in, 16 out), then long summarization-like ones
  (256-480 in, 4-8 out).

The planner sees a synthetic latency profile (e2e/loop_harness.py `tiny_profile`, and `--tp2-profile` adds a
tp=2 shape) so that its arithmetic, not this CPU's speed, decides the instance counts.

    sudo python bench/control_loop.py [--scenarios rate_step,stationary,length_shift] [--interval 6]

Writes bench/results/control_loop.json (top-level `summary`: reaction_intervals, rollouts_while_stationary,
failed_requests_during_rollout, min_attainment_during_transition) and control_loop.png (per scenario: arrival
rate, windowed attainment, plan changes, ready instances per phase). Needs root (network namespaces) and
/usr/bin/prometheus.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import kubernetes  # noqa: E402

from e2e.cluster import EmulatedCluster  # noqa: E402
from e2e.loop_harness import loop_rig  # noqa: E402
from e2e.scenarios import ScenarioResult, run_scenario  # noqa: E402
from e2e.traffic import Phase  # noqa: E402

CHAT, LONG = ((16, 48), (16, 17)), ((256, 480), (4, 8))  # tiny-llama's context is 512 tokens


def scenarios(interval: int) -> dict[str, tuple[list[Phase], int | None]]:
    return {
        "rate_step": ([Phase(5 * interval, 4.0, *CHAT), Phase(8 * interval, 12.0, *CHAT)], 1),
        "stationary": ([Phase(20 * interval, 4.0, *CHAT)], None),
        "length_shift": ([Phase(5 * interval, 4.0, *CHAT), Phase(8 * interval, 4.0, *LONG)], 1),
    }


def plot(results: list[ScenarioResult], window_s: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, len(results), figsize=(6 * len(results), 9), squeeze=False, sharex="col")
    for col, r in enumerate(results):
        t = lambda wall, t0=r.t0: wall - t0  # noqa: E731
        sent = sorted(rec.sent for rec in r.records)
        bins = range(0, int(max(sent, default=1)) + 2, 2)
        ax = axes[0][col]
        ax.hist(sent, bins=list(bins), weights=[0.5] * len(sent), color="tab:blue", alpha=0.6)
        ax.set_ylabel("arrivals, req/s (2 s bins)")
        ax.set_title(r.name)
        ax = axes[1][col]
        windows = r.attainment_windows(window_s)
        ax.step([t(w) for w, _, _ in windows], [a for _, a, _ in windows], where="post", color="tab:green")
        ax.set_ylim(-0.05, 1.05)
        ax.set_ylabel(f"SLO attainment ({window_s:.0f} s windows)")
        ax = axes[2][col]
        phases = sorted({p for s in r.samples for p in s["workers"]})
        for phase in phases:
            ax.step([t(s["time"]) for s in r.samples], [s["workers"].get(phase, 0) for s in r.samples],
                    where="post", label=phase)
        ax.set_ylabel("ready instances")
        ax.set_xlabel("seconds")
        ax.legend(loc="upper left")
        for row in axes:
            for p in r.rollouts:
                row[col].axvline(t(p.time), color="tab:red", ls="--", lw=1)
            if r.step_time is not None:
                row[col].axvline(t(r.step_time), color="black", ls=":", lw=1)
        for p in r.rollouts:
            axes[2][col].annotate(p.shape.replace("disaggregated ", ""), (t(p.time), 0.2), fontsize=7,
                                  rotation=90, color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default="rate_step,stationary,length_shift")
    parser.add_argument("--interval", type=int, default=6, help="spec.replan.intervalSeconds")
    parser.add_argument("--window", type=int, default=6, help="spec.replan.windowSeconds")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    drift = {"rateChange": 0.6, "lengthChange": 0.6, "stepChange": 1.0, "minRequests": 10, "stableIntervals": 2}
    replan = {"replan": {"enabled": True, "intervalSeconds": args.interval, "windowSeconds": args.window, **drift}}
    wanted = args.scenarios.split(",")
    cluster = EmulatedCluster().start()
    results: list[ScenarioResult] = []
    try:
        with tempfile.TemporaryDirectory(prefix="disagg-loop-") as tmp:
            kubeconfig = cluster.write_kubeconfig(Path(tmp) / "config")
            api = kubernetes.config.new_client_from_config(str(kubeconfig), persist_config=False)
            for name, (phases, step) in scenarios(args.interval).items():
                if name not in wanted:
                    continue
                namespace = f"loop-{uuid.uuid4().hex[:6]}"
                workdir = Path(tmp) / name
                with loop_rig(api, kubeconfig, namespace, workdir) as rig:
                    started = time.time()
                    r = run_scenario(rig, name.replace("_", "-"), phases, step_phase=step, interval_s=args.interval,
                                     window_s=args.window, **replan)
                    r.name = name
                    results.append(r)
                    print(f"{name}: {time.time() - started:.0f} s, {json.dumps(r.summary(args.window))}", flush=True)
    finally:
        cluster.stop()
    by = {r.name: r for r in results}
    summary = {
        "reaction_intervals": by["rate_step"].reaction_intervals if "rate_step" in by else None,
        "detection_intervals": by["rate_step"].detection_intervals if "rate_step" in by else None,
        "rollouts_while_stationary": len(by["stationary"].rollouts) if "stationary" in by else None,
        "failed_requests_during_rollout": sum(r.failed_during_rollout() for r in results),
        "min_attainment_during_transition": min(
            (v for r in results if (v := r.min_attainment_during_transition(args.window)) is not None), default=None),
        "length_shift_plans": by["length_shift"].summary(args.window)["plans"] if "length_shift" in by else None,
        "interval_s": args.interval, "window_s": args.window, "load_average": os.getloadavg(),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"summary": summary, "scenarios": [r.summary(args.window) for r in results]}
    (args.out / "control_loop.json").write_text(json.dumps(out, indent=1))
    plot(results, args.window, args.out / "control_loop.png")
    print("\n| scenario | requests | failed | rollouts | reaction (intervals) | min attainment in transition | plans |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        s = r.summary(args.window)
        react = "-" if s["reaction_intervals"] is None else f"{s['reaction_intervals']:.2f}"
        att = "-" if s["min_attainment_during_transition"] is None else f"{s['min_attainment_during_transition']:.2f}"
        print(f"| {r.name} | {s['requests']} | {s['failed_requests']} | {s['rollouts']} | {react} | {att} | "
              f"{' -> '.join(s['plans'])} |")
    print(f"\nwrote {args.out / 'control_loop.json'} and control_loop.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
