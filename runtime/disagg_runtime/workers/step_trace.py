"""A worker's engine steps, one JSON line each (`disagg serve --step-trace DIR`), to hold against the model.

The Prometheus histograms say how long steps take on average; to tell which steps a prediction misses
(prefill batches, decode rounds at which batch, or the time between steps) each step has to be seen with
what it carried. The engine thread appends a line per step to `DIR/<role>-<pid>.jsonl`: wall-clock start,
seconds, kind, and the sizes the latency model is a function of (sequences, tokens, the sum of squared
prompt lengths for a prefill, the sum of context lengths for a decode round). A line is a few dozen bytes
and the file is line-buffered, so the cost is one write per step, next to milliseconds of step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TextIO

StepKind = Literal["prefill", "decode", "mixed"]


@dataclass(frozen=True)
class StepRecord:
    """One engine step as the worker ran it.

    `start` is wall-clock (time.time()), so a client can cut a trace at its own request windows. On an
    overlapped engine a call returns once its step is launched and waits for the one before: a decode
    call's seconds are mostly the previous step's device time, and an overlapped prefill's only its host
    work (its device time shows in the decode call after it). Over a run the calls add up to the device's
    busy time; step by step they do not.
    """

    kind: StepKind
    start: float
    seconds: float
    batch: int  # sequences: prompts in a prefill, tokens returned by a decode call, decodes in a mixed step
    tokens: int  # tokens computed: prompt tokens, or one per decoding sequence (plus chunk tokens, mixed)
    sum_sq: int = 0  # prefill: sum of squared prompt lengths (attention's quadratic term)
    context: int = 0  # decode and mixed: sum of the decoding sequences' context lengths


class StepTrace:
    """Appends `StepRecord`s to a file; engine thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: TextIO | None = path.open("a", buffering=1, encoding="utf-8")

    @classmethod
    def in_dir(cls, directory: str | Path, role: str) -> StepTrace:
        """A trace at `directory/<role>-<pid>.jsonl` (workers of one machine share a directory)."""
        return cls(Path(directory) / f"{role}-{os.getpid()}.jsonl")

    def record(self, kind: StepKind, started: float, seconds: float, *, batch: int, tokens: int,
               sum_sq: int = 0, context: int = 0) -> None:
        """Append one step; `started` is a time.perf_counter() reading, written as wall-clock."""
        if self._file is None:
            return
        start = time.time() - (time.perf_counter() - started)
        rec = StepRecord(kind, round(start, 6), round(seconds, 7), batch, tokens, sum_sq, context)
        self._file.write(json.dumps(vars(rec), separators=(",", ":")) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_steps(path: str | Path) -> Iterator[StepRecord]:
    """The records of a trace file, or of every `*.jsonl` in a directory; a torn last line is skipped."""
    p = Path(path)
    for f in sorted(p.glob("*.jsonl")) if p.is_dir() else [p]:
        with f.open(encoding="utf-8") as fh:
            for line in fh:
                try:
                    yield StepRecord(**json.loads(line))
                except (ValueError, TypeError):
                    continue  # the worker was writing it when the file was read
