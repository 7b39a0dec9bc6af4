"""The loaded probe's reading of a step trace: steady decode periods, busy stretches, and the profile terms."""

from __future__ import annotations

import pytest
from disagg_planner.api import ServedProbe
from disagg_planner.latency.fit import LinearFit
from disagg_runtime.served_load import loaded_steps, poisson_trace
from disagg_runtime.served_profiler import _EngineTimes, overhead_from_probes
from disagg_runtime.workers.step_trace import StepRecord

ENGINE = _EngineTimes(prefill=LinearFit(0.002, 2e-5, 0.0, 0.0), decode=LinearFit(0.005, 1e-5, 0.0, 0.0))
PROMPT = 500


def _decode(batch: int) -> float:
    return ENGINE.decode(batch, 0)


def _prefill() -> float:
    return ENGINE.prefill(PROMPT, PROMPT * PROMPT)


class _Trace:
    """Builds a worker's step records back to back, as an overlapped engine thread writes them."""

    def __init__(self) -> None:
        self.t = 100.0
        self.steps: list[StepRecord] = []

    def decode(self, batch: int, seconds: float, gap: float = 1e-4) -> None:
        self.steps.append(StepRecord("decode", self.t, seconds, batch, batch, 0, 0))
        self.t += seconds + gap

    def prefill(self, seconds: float, gap: float = 1e-4) -> None:
        self.steps.append(StepRecord("prefill", self.t, seconds, 1, PROMPT, PROMPT * PROMPT, 0))
        self.t += seconds + gap

    def idle(self, seconds: float) -> None:
        self.t += seconds


def _served_trace(slower: float, behind: float) -> _Trace:
    """Two busy stretches, each opened by a prefill from idle; decodes at 8 and 16 run `slower` than the
    engine's step, and each prefill beside them holds the engine `behind` beyond its engine prefill (the
    device time it adds shows in the decode call after it, as on an overlapped engine)."""
    tr = _Trace()
    for _ in range(2):
        tr.prefill(_prefill())
        for batch in (8, 16):
            for _ in range(12):
                for _ in range(4):
                    tr.decode(batch, _decode(batch) * slower - 1e-4)
                tr.prefill(0.3 * _prefill())
                tr.decode(batch, 0.7 * _prefill() + behind + _decode(batch) * slower - 2e-4)
        tr.idle(0.5)
    return tr


def test_steady_periods_and_busy_stretches_are_read_from_the_trace():
    tr = _served_trace(slower=1.04, behind=-0.002)
    loaded = loaded_steps(reversed(tr.steps))  # order does not matter: sorted by start
    assert len(loaded.stretches) == 2 and all(st.from_idle for st in loaded.stretches)
    assert [len(st.prefills) for st in loaded.stretches] == [25, 25]
    # A period spans two decode calls at one batch with no prefill between: one step (call + loop gap).
    assert {p.batch for p in loaded.periods} == {8, 16}
    for p in loaded.periods:
        assert p.seconds == pytest.approx(_decode(p.batch) * 1.04, rel=1e-6)


def test_the_loaded_probe_gives_the_table_points_and_the_prefill_credit_it_was_built_with():
    tr = _served_trace(slower=1.04, behind=-0.002)
    probes = [ServedProbe(kind="prefill", batch_size=1, tokens=PROMPT, samples=3, measured_seconds=_prefill(),
                          engine_seconds=_prefill())]
    # Bursts: no overhead up to 16 sequences, 6% at 32 (which the load does not reach).
    probes += [ServedProbe(kind="decode", batch_size=b, tokens=PROMPT, samples=50,
                           measured_seconds=_decode(b) * (1.06 if b == 32 else 1.0), engine_seconds=_decode(b))
               for b in (1, 8, 16, 32)]
    served = overhead_from_probes(probes, {}, "colocated", ENGINE, 131072, loaded_steps(tr.steps))
    table = {p.batch_size: p.seconds for p in served.decode_by_batch}
    # Bursts saw no overhead; under load the 8 and 16 points are the loaded steps' 4%, 32 keeps its burst.
    assert table[1] == 0.0
    assert table[8] == pytest.approx(0.04 * _decode(8), rel=1e-3)
    assert table[16] == pytest.approx(0.04 * _decode(16), rel=1e-3)
    assert table[32] == pytest.approx(0.06 * _decode(32), rel=1e-3)
    kinds = [p.kind for p in served.probes]
    assert kinds.count("decode_loaded") == 2 and kinds.count("prefill_behind_decode") == 1
    # Each prefill beside decodes took 2 ms less than its engine prefill; the stretches' opening ones are
    # charged as profiled and not counted.
    behind = next(p for p in served.probes if p.kind == "prefill_behind_decode")
    assert behind.samples == 48 and behind.tokens == PROMPT
    assert served.prefill_behind_decode_s == pytest.approx(-0.002, abs=2e-5)


def test_without_a_load_nothing_is_credited():
    probes = [ServedProbe(kind="prefill", batch_size=1, tokens=PROMPT, samples=3, measured_seconds=_prefill(),
                          engine_seconds=_prefill()),
              ServedProbe(kind="decode", batch_size=4, tokens=PROMPT, samples=50, measured_seconds=_decode(4),
                          engine_seconds=_decode(4))]
    served = overhead_from_probes(probes, {}, "colocated", ENGINE, 131072)
    assert served.prefill_behind_decode_s is None
    # Too few prefills beside decodes to stand for a median: no term rather than a noisy one.
    tr = _Trace()
    tr.prefill(_prefill())
    for _ in range(3):
        tr.decode(4, _decode(4))
        tr.prefill(_prefill())
    assert overhead_from_probes(probes, {}, "colocated", ENGINE, 131072,
                                loaded_steps(tr.steps)).prefill_behind_decode_s is None


def test_poisson_load_lengths_spread_around_the_probe_lengths_and_bad_rates_are_refused():
    trace = poisson_trace(20.0, 400, 500, 100, seed=1)
    arrivals = [r.arrival for r in trace]
    assert arrivals == sorted(arrivals) and 400 / arrivals[-1] == pytest.approx(20.0, rel=0.15)
    assert {r.input_len for r in trace} <= set(range(460, 541)) and len({r.input_len for r in trace}) > 20
    assert {r.output_len for r in trace} <= set(range(92, 109))
    assert poisson_trace(20.0, 50, 500, 100, seed=1) == poisson_trace(20.0, 50, 500, 100, seed=1)
    for rate, n in ((0.0, 10), (-1.0, 10), (5.0, 0)):
        with pytest.raises(ValueError, match="positive rate"):
            poisson_trace(rate, n, 500, 100, seed=0)
