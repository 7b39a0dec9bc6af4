"""One multi-rank instance run in lockstep: rank 0 broadcasts each engine call, every rank runs it on its shard.

Every rank holds an Engine over its shard with the same requests, blocks and sampling seed, so the
same calls in the same order keep them identical; rank 0's worker drives it through `InstanceEngine`,
which sends a small step descriptor (the call and its arguments) over the control group before running
the call itself. The other ranks run `follow`: receive a descriptor, run it, repeat. An idle rank 0
sends a heartbeat round trip every `heartbeat_s`, so a follower waiting for work and rank 0 waiting on
followers both notice a dead or hung peer within the collective timeout.

Errors the engine raises before any collective (a full cache, an invalid request) are the same on every
rank and leave the instance in step. A failed or timed-out collective is not: the instance is marked
failed and every later step raises InstanceFailed; aborts then only free rank 0's local state.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from ..engine import Engine, EngineError, GenerationRequest, StepOutput
from ..kv.payload import KVPayload
from ..kv.reshard import KVSlice, share_of
from ..kv.sharded import ShareSpec
from .groups import CollectiveError, InstanceGroups

log = logging.getLogger(__name__)

# Errors an engine raises identically on every rank (validation, capacity), before any collective runs.
_IN_STEP_ERRORS = (EngineError, ValueError, KeyError)


class InstanceFailed(RuntimeError):
    """A rank of this instance died, hung or fell out of step; the instance must be restarted."""


class KVShareService(Protocol):
    """A follower rank's KV side (decode: pulls its share; prefill: serves its share from its own server)."""

    def start_pull(self, request_id: str, spec: ShareSpec) -> None:
        """Begin pulling this rank's share of `request_id` (decode ranks)."""

    def take_pulled(self, request_id: str) -> tuple[KVPayload | None, str]:
        """Wait (bounded) for the pull to end: the payload, or None and why it failed."""


class InstanceEngine:
    """Rank 0's face of a multi-rank instance: the Engine interface the workers use, run on every rank."""

    def __init__(self, engine: Engine, groups: InstanceGroups, *, heartbeat_s: float = 1.0) -> None:
        self.engine = engine
        self.groups = groups
        self.shape = groups.layout.shape
        self.kv_share: KVSlice = share_of(groups.layout, full_layers(engine), engine.config.num_kv_heads)
        self.failure: str | None = None
        self.failed = threading.Event()
        self._lock = threading.Lock()
        self._last_sent = time.monotonic()
        self._heartbeat_s = heartbeat_s
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="instance-heartbeat", daemon=True)

    def start_heartbeat(self) -> None:
        """Begin heartbeats (after startup's collectives: a ping must not interleave with them)."""
        self._heartbeat.start()

    def __getattr__(self, name: str) -> Any:
        # Reads (capacity, ids, config, tokenizer, export_kv of this rank's shard) need no other rank.
        return getattr(self.engine, name)

    # ---- lockstep calls -------------------------------------------------------------------------
    def _call(self, descriptor: tuple, fn: Callable[[], Any]) -> Any:
        with self._lock:
            if self.failure is not None:
                raise InstanceFailed(self.failure)
            try:
                self.groups.send_object(descriptor)
                self._last_sent = time.monotonic()
                return fn()
            except _IN_STEP_ERRORS:
                raise
            except (CollectiveError, RuntimeError) as e:
                self._fail(f"{descriptor[0]} step: {e}")
                raise InstanceFailed(self.failure) from e

    def prefill(self, requests: list[GenerationRequest], *, reserve_decode: bool = True,
                on_decoded: Callable[[list[StepOutput]], None] | None = None, overlapped: bool = False):
        """Engine.prefill on every rank. The ranks run it synchronously, as the same command: `on_decoded` and
        `overlapped` (one rank's hand-over of its step in flight) are not mirrored, so they are not used;
        a step in flight returns its tokens with the next decode, as on an engine without them."""
        del on_decoded, overlapped
        requests = list(requests)
        return self._call(("prefill", requests, reserve_decode),
                          lambda: self.engine.prefill(requests, reserve_decode=reserve_decode))

    def decode(self):
        return self._call(("decode",), self.engine.decode)

    def abort(self, request_id: str) -> bool:
        if self.failure is not None:
            return self.engine.abort(request_id)  # the instance is gone; only local state is left to free
        return self._call(("abort", request_id), lambda: self.engine.abort(request_id))

    def reserve(self, request_id: str, prompt_tokens: int) -> bool:
        """Engine.reserve on every rank: block accounting must stay identical for preemption to agree."""
        return self._call(("reserve", request_id, prompt_tokens),
                          lambda: self.engine.reserve(request_id, prompt_tokens))

    def release(self, request_id: str) -> None:
        if self.failure is not None:
            return self.engine.release(request_id)
        return self._call(("release", request_id), lambda: self.engine.release(request_id))

    def generate(self, requests: list[GenerationRequest]) -> dict[str, list[int]]:
        """Engine.generate, every call of it run on every rank."""
        return Engine.generate(self, requests)  # type: ignore[arg-type]  # duck-typed: the same interface

    def import_kv(self, *_args, **_kwargs) -> None:
        raise NotImplementedError("a multi-rank instance imports KV share by share (start_pulls, import_share)")

    def start_pulls(self, request_id: str, spec: ShareSpec) -> None:
        """Tell every other rank to start pulling its share of `request_id` (rank 0 pulls its own)."""
        self._call(("pull", request_id, spec), lambda: None)

    def import_share(self, request: GenerationRequest, payload: KVPayload | None, first_token: int,
                     why: str = "") -> tuple[bool, str]:
        """Every rank imports its share; all keep it or none does. (ok, why not) as rank 0 saw it."""
        def run() -> tuple[bool, str]:
            return import_together(self.engine, self.groups, request, payload, first_token, why)

        return self._call(("import", request, first_token), run)

    def stop(self) -> None:
        """Send the followers home (best effort) and stop the heartbeat."""
        self._stopped.set()
        with self._lock:
            if self.failure is None:
                try:
                    self.groups.send_object(("stop",))
                except (CollectiveError, RuntimeError) as e:
                    log.warning("could not stop the other ranks: %s", e)
            self.failure = self.failure or "instance stopped"

    # ---- failure --------------------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = f"instance rank failure ({reason})"
            log.error("%s; taking the instance out of service", self.failure)
            self.failed.set()

    def _beat(self) -> None:
        while not self._stopped.wait(self._heartbeat_s / 2):
            if self.failure is not None:
                return
            if time.monotonic() - self._last_sent < self._heartbeat_s or not self._lock.acquire(blocking=False):
                continue
            try:
                if self.failure is None:
                    self.groups.send_object(("ping",))
                    self.groups.agree(True)
                    self._last_sent = time.monotonic()
            except (CollectiveError, RuntimeError) as e:
                self._fail(f"heartbeat: {e}")
            finally:
                self._lock.release()


def import_together(engine: Engine, groups: InstanceGroups, request: GenerationRequest, payload: KVPayload | None,
                    first_token: int, why: str) -> tuple[bool, str]:
    """Import this rank's share, then vote: a share that failed anywhere is dropped everywhere."""
    ok = payload is not None
    if ok:
        try:
            engine.import_kv(request, payload, first_token)
        except _IN_STEP_ERRORS as e:
            ok, why = False, str(e)
    agreed = groups.agree(ok)
    if ok and not agreed:
        engine.abort(request.request_id)
        why = "another rank of this instance could not import its KV share"
    return agreed, why


def follow(engine: Engine, groups: InstanceGroups, lock: threading.Lock, kv: KVShareService | None) -> int:
    """A follower rank's loop: run rank 0's descriptors until "stop" (0) or a failed collective (1)."""
    rank = groups.rank
    while True:
        try:
            descriptor = groups.recv_object()
        except CollectiveError as e:
            log.error("rank %d: lost rank 0 (%s); leaving", rank, e)
            return 1
        kind = descriptor[0]
        try:
            with lock:
                if kind == "stop":
                    return 0
                if kind == "ping":
                    groups.agree(True)
                elif kind == "prefill":
                    engine.prefill(descriptor[1], reserve_decode=descriptor[2])
                elif kind == "decode":
                    engine.decode()
                elif kind == "abort":
                    engine.abort(descriptor[1])
                elif kind == "release":
                    engine.release(descriptor[1])
                elif kind == "reserve":
                    engine.reserve(descriptor[1], descriptor[2])
                elif kind == "pull":
                    if kv is None:
                        raise CollectiveError("this rank has no KV puller")
                    kv.start_pull(descriptor[1], descriptor[2])
                elif kind == "import":
                    request, first_token = descriptor[1], descriptor[2]
                    payload, why = kv.take_pulled(request.request_id) if kv is not None else (None, "no puller")
                    import_together(engine, groups, request, payload, first_token, why)
                else:
                    raise CollectiveError(f"unknown step descriptor {kind!r}")
        except _IN_STEP_ERRORS:
            continue  # rank 0 saw the same error on its shard
        except (CollectiveError, RuntimeError) as e:
            log.error("rank %d: %s step failed (%s); leaving", rank, kind, e)
            return 1


def full_layers(engine: Engine) -> int:
    """Layers of the whole model (a pipeline stage's engine holds fewer)."""
    return getattr(engine.model, "full_config", engine.config).num_layers
