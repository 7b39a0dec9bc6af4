"""KV import: a decode engine admits a request prefilled elsewhere, into blocks it may have set aside.

A decode worker reserves the prompt's blocks on the engine thread before it starts the pull
(`reserve`), so the decode steps that run while the KV is on its way cannot grow into the blocks the
pull was promised; `import_kv` then writes the received KV into them (or into fresh blocks, when
nothing was reserved and enough are free) and the request joins the running batch after its first
token, which the prefill side sampled.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..kv.payload import KVMismatchError, KVPayload
from .kv_cache import blocks_for
from .types import DuplicateRequest, GenerationRequest, InvalidRequest, KVCacheFull

if TYPE_CHECKING:
    from .engine import Engine


def import_kv(engine: Engine, request: GenerationRequest, kv: KVPayload, first_token: int) -> None:
    """`Engine.import_kv`: check the payload against the engine and the prompt, place it, start decoding."""
    engine._validate(request)
    kv.check()
    kv.check_compatible(model_id=engine.model_id, num_layers=engine.num_layers, num_kv_heads=engine.num_kv_heads,
                        head_dim=engine.head_dim, dtype=engine.dtype_name)
    if kv.header.num_tokens != len(request.prompt_ids):
        raise KVMismatchError(f"request {request.request_id}: KV holds {kv.header.num_tokens} tokens, the "
                              f"prompt has {len(request.prompt_ids)}")
    if not 0 <= first_token < engine.config.vocab_size:
        raise InvalidRequest(f"first_token {first_token} is outside the vocabulary")
    reserved = engine._reserved.get(request.request_id)
    need = blocks_for(len(request.prompt_ids), engine.block_size)
    if reserved is None and need > engine.allocator.free:
        raise KVCacheFull(f"need {need} KV blocks, {engine.allocator.free} of {engine.total_blocks} free")
    seq = engine._new_sequence(request)
    # Replaying the first token puts the detokenizer where the prefill side left it (same text held back).
    seq.append(first_token, engine.eos_token_ids)
    if seq.finished:
        raise InvalidRequest(f"request {request.request_id} already finished at its first token "
                             f"({seq.finish_reason}); there is nothing to decode")
    seq.block_table = engine._reserved.pop(request.request_id, None) or engine.allocator.allocate(need)
    engine.cache.write(seq.block_table, kv.keys, kv.values)
    seq.num_cached = seq.prompt_len
    engine._enter(seq)


def reserve(engine: Engine, request_id: str, prompt_tokens: int) -> bool:
    """`Engine.reserve`: set aside the prompt's blocks; False when the engine would not admit it now."""
    if request_id in engine._reserved or request_id in engine._seqs:
        raise DuplicateRequest(f"request {request_id!r} is already in this engine")
    if not engine.can_admit(prompt_tokens):
        return False
    engine._reserved[request_id] = engine.allocator.allocate(blocks_for(prompt_tokens, engine.block_size))
    return True
