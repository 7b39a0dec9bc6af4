"""The served worker's traced engine steps against the latency model, per rate of the predicted-vs-measured sweep.

`bench/predicted_vs_measured.py` starts its worker with `--step-trace` (workers/step_trace.py) and, for each
rate, cuts the trace at the replay's window and accounts for it here: what each kind of step took against
what the model charges at the same sizes, the engine thread's time outside steps, and the prefill batches
the simulation of the same trace charged.
"""

from __future__ import annotations

import copy

from disagg_planner.latency import LatencyModel
from disagg_runtime.workers.step_trace import StepRecord


class PrefillCounter:
    """Counts and sums the prefill batches a simulation charges (`_Replica.prefill_step` asks the model once
    per batch), so the sweep can hold the simulated prefill work against the served worker's step trace."""

    def __init__(self, latency: LatencyModel) -> None:
        self.model = copy.copy(latency)
        self.batches = 0
        self.seconds = 0.0
        inner = latency.prefill_stage_time

        def counted(tp: int, pp: int, batch: int, sum_tokens: int, sum_sq_tokens: int) -> float:
            t = inner(tp, pp, batch, sum_tokens, sum_sq_tokens)
            self.batches += 1
            self.seconds += t
            return t

        self.model.prefill_stage_time = counted


def step_accounting(steps: list[StepRecord], start: float, end: float, engine: LatencyModel,
                    latency: LatencyModel, sim_prefill: PrefillCounter) -> dict:
    """Where a rate's wall time went in the served worker, against the model at the same step sizes.

    Each traced step is charged the latency model's time at the sizes it ran (prefill: the bare engine's fit,
    as the simulator charges a prefill batch; decode: with the served per-step overhead, as the simulator
    charges a round); `idle_s` is the window's time outside any step (the engine thread waiting for work, or
    doing host work between steps). `sim_prefill` is the same trace's prefill batches in the simulation.
    An overlapped call waits for the step before it (`StepRecord`), so only `busy` (all kinds) compares
    like for like; per kind the device time has moved to the call after it.
    """
    mine = [s for s in steps if start <= s.start <= end]
    out: dict = {"window_s": end - start}
    for kind in ("prefill", "decode", "mixed"):
        ks = [s for s in mine if s.kind == kind]
        if not ks:
            continue
        if kind == "prefill":
            model = sum(engine.prefill_stage_time(1, 1, s.batch, s.tokens, s.sum_sq) for s in ks)
        elif kind == "decode":
            model = sum(latency.decode_time(1, 1, s.batch, s.context) for s in ks)
        else:
            model = float("nan")  # the chunked scheduler's mixed steps: not what this sweep runs
        measured = sum(s.seconds for s in ks)
        out[kind] = {"steps": len(ks), "measured_s": measured, "model_s": model,
                     "measured_over_model": measured / model if model > 0 else None,
                     "mean_batch": sum(s.batch for s in ks) / len(ks)}
    out["busy"] = {"measured_s": sum(s.seconds for s in mine),
                   "model_s": sum(out[k]["model_s"] for k in ("prefill", "decode") if k in out)}
    out["idle_s"] = out["window_s"] - out["busy"]["measured_s"]
    out["sim_prefill"] = {"batches": sim_prefill.batches, "model_s": sim_prefill.seconds}
    return out


def steps_text(acc: dict) -> str:
    """One line of `step_accounting`: per kind, steps, measured/model seconds; idle; the simulated prefills."""
    parts = [f"{k} {acc[k]['steps']}x (batch {acc[k]['mean_batch']:.1f}) {acc[k]['measured_s']:.2f}/"
             f"{acc[k]['model_s']:.2f} s" for k in ("prefill", "decode", "mixed") if k in acc]
    sim_p, busy = acc["sim_prefill"], acc["busy"]
    parts.append(f"busy {busy['measured_s']:.2f}/{busy['model_s']:.2f} s")
    return (f"{'; '.join(parts)}; idle {acc['idle_s']:.2f} of {acc['window_s']:.2f} s; simulated prefill "
            f"{sim_p['batches']}x {sim_p['model_s']:.2f} s (measured/model)")
