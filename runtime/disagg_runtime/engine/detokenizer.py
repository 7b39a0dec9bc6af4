"""Incremental detokenization with stop strings.

Text is produced by decoding a short window of ids (some prompt tokens for context, so a first
token's leading space renders) and emitting only what is new and complete: a window ending in an
unfinished UTF-8 sequence waits for the next token. Text that could be the start of a stop string
is held back until it is known not to be one, so a streamed response never shows part of a stop.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..tokenizer import Tokenizer

_PROMPT_CONTEXT = 6  # prompt tokens decoded ahead of the output so its first piece renders as in context
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's output ids into text deltas and finds stop strings."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], stop: Sequence[str]) -> None:
        self._tok = tokenizer
        self._ids = list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._stop = list(stop)
        self.text = ""  # complete output text so far (after a stop: up to the stop string)
        self.stopped = False
        self._emitted = 0

    def add(self, token_id: int) -> bool:
        """Take the next output token; True when the text now contains a stop string."""
        self._ids.append(token_id)
        self._read_new(allow_partial=False)
        self.stopped = self._cut_at_stop()
        return self.stopped

    def _read_new(self, *, allow_partial: bool) -> None:
        prefix = self._tok.decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._tok.decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (allow_partial or not full.endswith(_REPLACEMENT)):
            self.text += full[len(prefix):]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)

    def _cut_at_stop(self) -> bool:
        # Held-back text is never emitted, so an occurrence cannot start before `_emitted`.
        hits = [i for i in (self.text.find(s, self._emitted) for s in self._stop) if i >= 0]
        if not hits:
            return False
        self.text = self.text[: min(hits)]
        return True

    def delta(self, *, final: bool) -> str:
        """Text not yet handed out; unless `final`, minus a tail that may begin a stop string."""
        if final and not self.stopped and self._read_offset < len(self._ids):
            self._read_new(allow_partial=True)  # the request ends: show an unfinished character as U+FFFD
        end = len(self.text) if final else len(self.text) - self._held_back()
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out

    def _held_back(self) -> int:
        longest = 0
        tail = self.text[self._emitted:]
        for s in self._stop:
            for n in range(min(len(s) - 1, len(tail)), longest, -1):
                if tail.endswith(s[:n]):
                    longest = n
                    break
        return longest
