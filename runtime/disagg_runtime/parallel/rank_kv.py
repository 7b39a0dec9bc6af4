"""The KV side of a follower rank: a KV server for its share (prefill) or a puller of its share (decode).

Followers run their lockstep loop on the main thread; their KV traffic runs on an asyncio loop in a
thread of its own, so pulls and sends overlap the engine steps as they do on rank 0. The engine is
read (export) under the same lock the lockstep loop holds while it runs a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import torch

from ..engine import Engine, UnknownRequest
from ..kv import Endpoint, KVNotFound, KVPayload, KVPuller, KVServer
from ..kv.codec import CodecName
from ..kv.links import ChannelChoice
from ..kv.reshard import KVSlice
from ..kv.server import KVLease
from ..kv.sharded import ShareSpec, ShareTarget, pull_spec, slice_lease
from ..security.tokens import InternalToken


class LoopThread:
    """An asyncio loop on a daemon thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


class RankKVSource:
    """Serves slices of this rank's share of parked requests (whole-KV pulls and releases go to rank 0).

    It does not know the tickets rank 0 issues (a pull for a slice of another request is refused only by
    the internal token here); docs/security.md says so."""

    def __init__(self, engine: Engine, lock: threading.Lock, held: KVSlice) -> None:
        self.engine = engine
        self.lock = lock
        self.held = held

    async def checkout(self, request_id: str, ticket: str | None = None) -> KVLease:
        raise KVNotFound(f"rank of a multi-rank prefill instance serves slices of {request_id} only; "
                         "whole-KV pulls go to rank 0")

    def _export(self, request_id: str) -> KVPayload:
        with self.lock:
            try:
                return self.engine.export_kv(request_id)
            except UnknownRequest as e:
                raise KVNotFound(f"this rank holds no KV for {request_id}") from e

    async def checkout_slice(self, request_id: str, kv_slice: KVSlice, ticket: str | None = None) -> KVLease:
        payload = await asyncio.to_thread(self._export, request_id)
        return slice_lease(payload, self.held, kv_slice)

    async def release_pulled(self, request_id: str, ticket: str | None = None) -> None:
        raise KVNotFound(f"releases of {request_id} go to rank 0 of the prefill instance")


class RankKVServer:
    """A follower prefill rank's KV server."""

    def __init__(self, engine: Engine, lock: threading.Lock, held: KVSlice, *, port: int = 0,
                 timeout: float = 30.0, token: InternalToken | None = None) -> None:
        self.thread = LoopThread("rank-kv-server")
        self.server = KVServer(RankKVSource(engine, lock, held), local=Endpoint.here(engine.device),
                               device=engine.device, port=port, timeout=timeout, token=token)

    def start(self) -> int:
        return self.thread.run(self.server.start()).result(30)

    def close(self) -> None:
        try:
            self.thread.run(self.server.close()).result(10)
        finally:
            self.thread.stop()


class RankKVPuller:
    """A follower decode rank's puller: starts a pull on "pull", hands the payload over on "import"."""

    def __init__(self, target: ShareTarget, *, device: torch.device, channel: ChannelChoice = "auto",
                 codec: CodecName = "none", timeout: float = 30.0, token: InternalToken | None = None) -> None:
        self.thread = LoopThread("rank-kv-puller")
        self.target = target
        self.device = device
        self.timeout = timeout
        self.puller = KVPuller(local=Endpoint.here(device), device=device, channel=channel, codec=codec,
                               timeout=timeout, token=token)
        self._pulls: dict[str, concurrent.futures.Future] = {}

    def start_pull(self, request_id: str, spec: ShareSpec) -> None:
        self._pulls[request_id] = self.thread.run(pull_spec(self.puller, spec, self.target, request_id, self.device))

    def take_pulled(self, request_id: str) -> tuple[KVPayload | None, str]:
        future = self._pulls.pop(request_id, None)
        if future is None:
            return None, f"no pull of {request_id} was started on this rank"
        try:
            # Rank 0 asks once its own share arrived; ours is as large, so a transfer timeout is plenty.
            return future.result(self.timeout), ""
        except concurrent.futures.TimeoutError:
            future.cancel()
            return None, f"KV share of {request_id} did not arrive within {self.timeout:.0f}s"
        except Exception as e:  # noqa: BLE001 - any failure is a vote against importing, with its reason
            return None, str(e)

    def close(self) -> None:
        try:
            self.thread.run(self.puller.close()).result(10)
        finally:
            self.thread.stop()
