"""One request's state inside the engine: its blocks, its output so far, and when it stops."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

from .detokenizer import IncrementalDetokenizer
from .preemption import SwappedKV
from .types import FinishReason, GenerationRequest, StepOutput


@dataclass
class Sequence:
    """A request admitted to the engine. `num_cached` tokens have KV in `block_table`'s blocks."""

    request: GenerationRequest
    detok: IncrementalDetokenizer
    block_table: list[int] = field(default_factory=list)
    output_ids: list[int] = field(default_factory=list)
    num_cached: int = 0
    decodable: bool = True  # False: prefilled for export only, never decoded here
    admitted: int = 0  # admission order in its engine: the latest admitted is preempted first
    preempted: bool = False  # holds no blocks; resumes from `swapped` or by recomputing its KV
    swapped: SwappedKV | None = None
    finish_reason: FinishReason | None = None
    # Tokens sampled on the device by an overlapped decode step whose ids the host has not read yet (0 or 1).
    pending: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def prefilling(self) -> bool:
        """Admitted for chunked prefill and some prompt tokens still have no KV."""
        return self.num_cached < self.prompt_len

    @property
    def generated(self) -> int:
        """Output tokens so far, the one still on the device (`pending`) included."""
        return len(self.output_ids) + self.pending

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token_id: int, eos_token_ids: Collection[int]) -> StepOutput:
        """Record a new token, decide whether the request is done, and say what to stream."""
        params = self.request.sampling
        self.output_ids.append(token_id)
        stop_hit = self.detok.add(token_id)
        if not params.ignore_eos and token_id in eos_token_ids:
            self.finish_reason = "stop"
        elif stop_hit:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= params.max_tokens:
            self.finish_reason = "length"
        text = self.detok.delta(final=self.finished)
        return StepOutput(request_id=self.request_id, token_id=token_id, text=text, finished=self.finished,
                          finish_reason=self.finish_reason)
