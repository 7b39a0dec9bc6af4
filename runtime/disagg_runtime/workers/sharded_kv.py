"""Decode end of resharded KV: each rank of this instance pulls its own share, then all import it together.

Used whenever the prefill or the decode instance has more than one rank. Rank 0 (this worker) tells the
other ranks to start pulling, pulls its own share meanwhile, then runs the import on every rank in
lockstep (all keep the request or none does), and finally tells the prefill instance's rank 0 to free
the request on all of its ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ..engine import Engine, GenerationRequest
from ..kv import KVAddress, KVChannelError, KVPuller
from ..kv.sharded import ShareSpec, ShareTarget, pull_spec
from ..parallel.instance import InstanceEngine, full_layers
from ..parallel.ranks import Parallelism
from .protocol import KVSourceRef

log = logging.getLogger(__name__)


def share_target(engine: Engine | InstanceEngine, rank: int = 0, shape: Parallelism | None = None) -> ShareTarget:
    """What rank `rank` of a `shape` instance (default: `engine`'s own) owns of a request's KV."""
    if shape is None:
        shape = engine.shape if isinstance(engine, InstanceEngine) else Parallelism()
    inner = engine.engine if isinstance(engine, InstanceEngine) else engine
    return ShareTarget(shape=shape, rank=rank, model_id=inner.model_id, dtype=inner.dtype_name,
                       head_dim=inner.head_dim, num_layers=full_layers(inner), num_kv_heads=inner.config.num_kv_heads)


class ShardedKVImport:
    """Pull-and-import for one decode worker whose KV crosses a multi-rank instance."""

    def __init__(self, engine: Engine | InstanceEngine, puller: KVPuller) -> None:
        self.engine = engine
        self.puller = puller
        self.instance = engine if isinstance(engine, InstanceEngine) else None

    def applies(self, ref: KVSourceRef) -> bool:
        return ref.tp * ref.pp > 1 or self.instance is not None

    async def pull_and_import(self, request: GenerationRequest, ref: KVSourceRef, first_token: int,
                              submit: Callable) -> None:
        """Raises KVChannelError (with the reason) when any rank's share could not be pulled or imported."""
        rid = request.request_id
        spec = ShareSpec(sources=ref.sources(), src_tp=ref.tp, src_pp=ref.pp, num_tokens=len(request.prompt_ids),
                         ticket=ref.ticket)
        engine = self.engine
        if self.instance is not None:
            await submit(lambda: self.instance.start_pulls(rid, spec))
        payload, why = None, ""
        try:
            payload = await pull_spec(self.puller, spec, share_target(engine), rid, engine.device)
        except KVChannelError as e:
            why = str(e)
            if self.instance is None:
                raise
        if self.instance is not None:
            ok, why = await submit(lambda: self.instance.import_share(request, payload, first_token, why))
            if not ok:
                raise KVChannelError(f"KV share of {rid} unusable on this decode instance: {why}")
        else:
            await submit(lambda: engine.import_kv(request, payload, first_token))
        try:
            await self.puller.release(KVAddress(ref.host, ref.port), rid, ticket=ref.ticket)
        except KVChannelError as e:  # the prefill side frees it after its TTL instead
            log.warning("could not release the KV of %s at the prefill instance: %s", rid, e)
