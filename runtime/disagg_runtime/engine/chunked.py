"""Chunked prefill over the paged KV cache (Sarathi-Serve, vLLM chunked prefill).

A request is admitted for chunked prefill with blocks for its whole life and nothing computed; each
mixed step then runs, as one packed forward, one token for every running request plus the next chunk of
some prompts. A chunk's tokens attend causally to their own prompt's earlier chunks, which are already
in the cache, so a prompt prefilled in chunks ends with the same KV and the same first token as one
prefilled whole (up to float rounding of differently shaped matmuls).

`MixedAttentionBackend` handles any layout (n new tokens over a cached prefix, decode being n = 1) in
plain PyTorch; it is exact on CPU and correct, not fast, on GPU, where mixed steps bypass the fused
CUDA-graph runner (which only knows whole prompts and single-token decodes).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .attention import AttentionBackend, LayerKV, StepLayout
from .kv_cache import blocks_for
from .preemption import grow_or_preempt, resume
from .types import DuplicateRequest, GenerationRequest, InvalidRequest, KVCacheFull, StepOutput

if TYPE_CHECKING:
    from .engine import Engine
    from .sequence import Sequence


@dataclass(frozen=True)
class PrefillChunk:
    """The next `tokens` prompt tokens of an admitted request, to prefill in this mixed step."""

    request_id: str
    tokens: int


@dataclass
class MixedMeta:
    slots: torch.Tensor  # cache slot of every new token
    spans: list[tuple[int, int]]  # each sequence's rows among the new tokens
    gathers: list[torch.Tensor]  # each sequence's context slots, [ctx]
    masks: list[torch.Tensor | None]  # [n, ctx] True where a new token may attend (None: n == 1)


class MixedAttentionBackend(AttentionBackend):
    """Attention of n new tokens per sequence over its cached prefix plus themselves, causally."""

    name = "torch-mixed"

    def build_metadata(self, layout: StepLayout, device: torch.device) -> MixedMeta:
        bs = layout.block_size
        spans, gathers, masks = [], [], []
        start = 0
        for n, ctx, table in zip(layout.seq_lens, layout.context_lens, layout.block_tables, strict=True):
            pos = torch.arange(ctx)
            blocks = torch.tensor(table[: (ctx + bs - 1) // bs], dtype=torch.long)
            gathers.append((blocks[pos // bs] * bs + pos % bs).to(device))
            spans.append((start, start + n))
            start += n
            if n == 1:
                masks.append(None)
            else:
                query_pos = torch.arange(ctx - n, ctx)[:, None]
                masks.append((pos[None, :] <= query_pos).to(device))
        slots = torch.tensor(layout.slot_mapping, dtype=torch.long, device=device)
        return MixedMeta(slots=slots, spans=spans, gathers=gathers, masks=masks)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerKV, meta: MixedMeta,
               scale: float) -> torch.Tensor:
        heads, kv_heads, dim = q.shape[1], k.shape[1], k.shape[2]
        flat_k = cache.keys.view(-1, kv_heads, dim)
        flat_v = cache.values.view(-1, kv_heads, dim)
        flat_k.index_copy_(0, meta.slots, k)
        flat_v.index_copy_(0, meta.slots, v)
        out = torch.empty_like(q)
        gqa = heads != kv_heads
        for (start, end), gather, mask in zip(meta.spans, meta.gathers, meta.masks, strict=True):
            keys = flat_k[gather].transpose(0, 1)  # [kv_heads, ctx, D]
            values = flat_v[gather].transpose(0, 1)
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), keys, values, attn_mask=mask, scale=scale, enable_gqa=gqa,
            ).transpose(0, 1)
        return out


_BACKEND = MixedAttentionBackend()


def admit(engine: Engine, request: GenerationRequest) -> None:
    """Admit a request for chunked prefill: its prompt's blocks, no token computed yet.

    The same rule as `Engine.can_admit`: the prompt's blocks fit with the watermark free and no preempted
    request waits; decode blocks then grow on demand (preemption.grow_or_preempt). Raises what `Engine.prefill`
    raises for a bad request, and KVCacheFull when the engine would not admit it now.
    """
    engine._validate(request)
    prompt = len(request.prompt_ids)
    if not engine.can_admit(prompt):
        need = blocks_for(prompt, engine.block_size)
        raise KVCacheFull(f"request needs {need} KV blocks (+{engine.watermark_blocks} watermark), "
                          f"{engine.allocator.free} of {engine.total_blocks} free, {engine.num_preempted} preempted")
    engine._admit(request, decodable=True)


def mixed_step(engine: Engine, chunks: Seq[PrefillChunk]) -> list[StepOutput]:
    """One token for every running request plus `chunks`; returns the decode tokens and the first token of
    every prompt whose last chunk this was. Finished requests are released, as `Engine.decode` does.
    An overlapped decode step still in flight is completed first; its tokens lead the returned list."""
    engine.settle()
    earlier = engine.take_completed()
    engine._release_finished()
    chunk_seqs = _check_chunks(engine, chunks)
    grow_or_preempt(engine)  # the decode tokens' blocks, preempting the latest admitted as Engine.decode does
    resume(engine)
    decoding = engine._running()
    if not decoding and not chunk_seqs:
        return earlier
    tokens: list[int] = []
    positions: list[int] = []
    seq_lens: list[int] = []
    context_lens: list[int] = []
    tables: list[list[int]] = []
    slots: list[int] = []
    rows: list[int] = []
    sampled: list[Sequence] = []
    for s in decoding:
        rows.append(len(tokens))
        sampled.append(s)
        tokens.append(s.output_ids[-1])
        positions.append(s.num_cached)
        seq_lens.append(1)
        context_lens.append(s.num_cached + 1)
        tables.append(s.block_table)
        slots.append(engine.cache.slots(s.block_table, s.num_cached, s.num_cached + 1)[0])
    for s, n in chunk_seqs:
        start, end = s.num_cached, s.num_cached + n
        tokens.extend(s.request.prompt_ids[start:end])
        positions.extend(range(start, end))
        seq_lens.append(n)
        context_lens.append(end)
        tables.append(s.block_table)
        slots.extend(engine.cache.slots(s.block_table, start, end))
        if end == s.prompt_len:
            rows.append(len(tokens) - 1)
            sampled.append(s)
    layout = StepLayout(is_prefill=False, seq_lens=seq_lens, context_lens=context_lens, block_tables=tables,
                        slot_mapping=slots, block_size=engine.block_size)
    # A step of chunks that complete no prompt samples nothing; one row keeps the forward's shape simple.
    logits = engine._run(tokens, positions, layout, rows or [0], backend=_BACKEND)
    for s in decoding:
        s.num_cached += 1
    for s, n in chunk_seqs:
        s.num_cached += n
    outputs = engine._emit(sampled, logits) if sampled else []
    engine._release_finished()
    return earlier + outputs


def _check_chunks(engine: Engine, chunks: Seq[PrefillChunk]) -> list[tuple[Sequence, int]]:
    ids = [c.request_id for c in chunks]
    if len(set(ids)) != len(ids):
        raise DuplicateRequest(f"a request appears twice among the chunks: {ids}")
    out = []
    for c in chunks:
        seq = engine._get(c.request_id)
        if not seq.prefilling:
            raise InvalidRequest(f"request {c.request_id!r} has no prompt left to prefill")
        if not 1 <= c.tokens <= seq.prompt_len - seq.num_cached:
            raise InvalidRequest(f"chunk of {c.tokens} tokens for request {c.request_id!r}, which has "
                                 f"{seq.prompt_len - seq.num_cached} prompt tokens left")
        out.append((seq, c.tokens))
    return out
