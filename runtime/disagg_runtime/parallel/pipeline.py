"""Pipeline parallelism: each stage rank holds its own layers and passes activations to the next stage.

A step (a prefill batch or a decode step) is cut into up to `pp` micro-batches of whole sequences. Stage s
runs micro-batch m while stage s+1 runs m-1 (sends are asynchronous, so a stage moves on as soon as it has
handed its activations over): with m micro-batches a step takes (m + pp - 1) micro-batch stage times
instead of pp whole-batch stage times, the GPipe schedule that `disagg_planner.latency`'s pp formula
describes. The last stage computes the logits and broadcasts them to every rank, so every rank samples
the same tokens (shared seed) and keeps the same bookkeeping as rank 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..engine.attention import AttentionBackend, AttentionContext, LayerKV, StepLayout
from ..models import CausalLM
from ..models.opt import POSITION_OFFSET
from ..models.rope import rope_cos_sin
from .groups import InstanceGroups, wait
from .ranks import RankLayout


class StageModel(nn.Module):
    """The layers of one pipeline stage; embeddings on the first stage, final norm and LM head on the last.

    `config.num_layers` is the stage's layer count (the engine sizes its KV cache by it); the layers keep
    their global indices, so the attention context maps global indices onto the stage's cache.
    """

    def __init__(self, model: CausalLM, layout: RankLayout) -> None:
        super().__init__()
        full = model.config
        self.layers_range = layout.layers(full.num_layers)
        self.first, self.last = layout.first_stage, layout.last_stage
        self.arch = full.architecture
        self.full_config = full
        self.config = dataclasses.replace(full, num_layers=len(self.layers_range))
        self.inner = model
        self.stack = _layer_stack(model)
        if len(self.stack) != len(self.layers_range):
            raise ValueError(f"stage of layers {self.layers_range} wraps a model holding {len(self.stack)} layers; "
                             "call keep_stage_layers first")
        self.lm_head = model.lm_head

    @property
    def hidden_size(self) -> int:
        return self.full_config.hidden_size

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if self.arch == "llama":
            return self.inner.model.embed_tokens(ids)
        dec = self.inner.model.decoder
        x = dec.embed_tokens(ids)
        if dec.project_in is not None:
            x = dec.project_in(x)
        return x + dec.embed_positions(positions + POSITION_OFFSET)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        if self.arch == "llama":
            cos, sin = rope_cos_sin(positions, self.inner.inv_freq, x.dtype)
            for layer in self.stack:
                x = layer(x, cos, sin, ctx)
            return x
        for layer in self.stack:
            x = layer(x, ctx)
        return x

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "llama":
            return self.inner.model.norm(x)
        dec = self.inner.model.decoder
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        if dec.project_out is not None:
            x = dec.project_out(x)
        return x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.compute_logits(hidden)


def _layer_stack(model: CausalLM) -> nn.ModuleList:
    return model.model.layers if model.config.architecture == "llama" else model.model.decoder.layers


def keep_stage_layers(model: CausalLM, layers: range) -> CausalLM:
    """Drop every layer outside `layers` (and its memory), in place; before sharding, so AutoTP does less."""
    kept = nn.ModuleList(_layer_stack(model)[i] for i in layers)
    if model.config.architecture == "llama":
        model.model.layers = kept
    else:
        model.model.decoder.layers = kept
    return model


@dataclass(frozen=True)
class MicroBatch:
    """Sequences [seq_start, seq_stop) of a step: their tokens [tok_start, tok_stop) and sampled rows."""

    layout: StepLayout
    tok_start: int
    tok_stop: int
    rows: list[int]  # indices into the micro-batch's tokens


def split_step(layout: StepLayout, rows: list[int], parts: int) -> list[MicroBatch]:
    """Up to `parts` micro-batches of contiguous whole sequences with about equal token counts."""
    n = len(layout.seq_lens)
    parts = max(1, min(parts, n))
    total = sum(layout.seq_lens)
    bounds, acc, seq = [0], 0, 0
    for k in range(1, parts):
        target = total * k / parts
        while seq < n - (parts - k) and acc + layout.seq_lens[seq] <= target:
            acc += layout.seq_lens[seq]
            seq += 1
        if seq == bounds[-1]:  # every micro-batch gets at least one sequence
            acc += layout.seq_lens[seq]
            seq += 1
        bounds.append(seq)
    bounds.append(n)
    out, tok = [], 0
    for a, b in zip(bounds, bounds[1:], strict=False):
        ntok = sum(layout.seq_lens[a:b])
        sub = StepLayout(is_prefill=layout.is_prefill, seq_lens=layout.seq_lens[a:b],
                         context_lens=layout.context_lens[a:b], block_tables=layout.block_tables[a:b],
                         slot_mapping=layout.slot_mapping[tok:tok + ntok], block_size=layout.block_size)
        out.append(MicroBatch(sub, tok, tok + ntok, [r - tok for r in rows if tok <= r < tok + ntok]))
        tok += ntok
    return out


class PipelineStepRunner:
    """Runs the engine's forward steps on one stage rank (the engine's `step_runner`)."""

    def __init__(self, stage: StageModel, groups: InstanceGroups, *, backend: AttentionBackend,
                 caches: list[LayerKV], device: torch.device, dtype: torch.dtype) -> None:
        self.stage = stage
        self.groups = groups
        self.layout = groups.layout
        self.backend = backend
        # Attention layers index caches by their global layer id.
        self.caches: list = [None] * stage.layers_range.start + list(caches)
        self.device = device
        self.dtype = dtype
        self.vocab = stage.full_config.vocab_size

    def run(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int]) -> torch.Tensor:
        """Float32 logits of `rows`, the same on every rank of the instance."""
        me = self.layout
        pp = me.shape.pp
        sends = []
        logits = []
        with torch.inference_mode():
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            for mb in split_step(layout, rows, pp):
                meta = self.backend.build_metadata(mb.layout, self.device)
                ctx = AttentionContext(self.backend, meta, self.caches)
                mb_pos = pos[mb.tok_start:mb.tok_stop]
                if me.first_stage:
                    x = self.stage.embed(ids[mb.tok_start:mb.tok_stop], mb_pos)
                else:
                    x = torch.empty(mb.tok_stop - mb.tok_start, self.stage.hidden_size, dtype=self.dtype,
                                    device=self.device)
                    self.groups.recv(x, me.peer(me.stage - 1))
                x = self.stage.run_layers(x, mb_pos, ctx)
                if me.last_stage:
                    hidden = self.stage.finish(x)
                    if len(mb.rows) != hidden.shape[0]:
                        hidden = hidden[torch.tensor(mb.rows, device=self.device)]
                    logits.append(self.stage.compute_logits(hidden))
                else:
                    sends.append(self.groups.send(x.contiguous(), me.peer(me.stage + 1)))
            for work in sends:
                wait(work, self.groups.timeout, f"send to stage {me.stage + 1}")
            out = (torch.cat(logits) if me.last_stage
                   else torch.empty(len(rows), self.vocab, dtype=torch.float32, device=self.device))
            self.groups.broadcast(out, (pp - 1) * me.shape.tp, what="logits from the last stage")
        return out
