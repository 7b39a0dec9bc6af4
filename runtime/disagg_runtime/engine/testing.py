"""Helpers for tests and benchmarks that drive an engine directly, as a worker's loop would."""

from __future__ import annotations

from collections.abc import Sequence

from .engine import Engine
from .types import GenerationRequest


def run_fcfs(engine: Engine, requests: Sequence[GenerationRequest]) -> dict[str, list[int]]:
    """Admit each request as soon as `can_admit` allows (FCFS), decode until nothing is left; the tokens."""
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    waiting = list(requests)
    while waiting or engine.has_decode_work:
        while waiting and engine.can_admit(len(waiting[0].prompt_ids)):
            for o in engine.prefill([waiting.pop(0)]):
                out[o.request_id].append(o.token_id)
        for o in engine.decode():
            out[o.request_id].append(o.token_id)
    return out
