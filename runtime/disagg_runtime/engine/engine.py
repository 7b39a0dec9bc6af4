"""The engine: batched prefill, continuous-batching decode, and KV export/import over a paged cache.

A request is admitted with blocks for its whole life (prompt + max_tokens - 1 tokens of KV: the last
generated token is never fed back), so running requests never run out of memory. Prefill runs all
prompts of a batch as one packed forward (no padding) and returns each request's first token; the
prompt KV stays until `release` (a prefill worker exports it first) or decode continues here.
`decode` advances every running request by one token and releases the ones that finish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence as Seq
from itertools import accumulate
from pathlib import Path

import torch

from ..kv.payload import KVHeader, KVMismatchError, KVPayload
from ..models import CausalLM, load_config, load_model
from ..tokenizer import Tokenizer
from . import chunked
from .attention import AttentionBackend, AttentionContext, StepLayout, TorchAttentionBackend
from .detokenizer import IncrementalDetokenizer
from .gpu import FusedLlama, GpuAttentionBackend, GpuStepRunner
from .kv_cache import BlockAllocator, PagedKVCache, blocks_for
from .memory import plan_num_blocks
from .sampler import sample
from .sequence import Sequence
from .types import (
    DuplicateRequest,
    EngineError,
    GenerationRequest,
    InvalidRequest,
    KVCacheFull,
    RequestTooLarge,
    StepOutput,
    UnknownRequest,
)

_HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class Engine:
    """Runs one model (or one tensor-parallel shard of it) over a paged KV cache."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer, *, model_id: str, num_blocks: int,
                 block_size: int = 16, tp_size: int = 1, attention_backend: AttentionBackend | None = None,
                 sampling_seed: int | None = None, cuda_graphs: bool = True) -> None:
        cfg = model.config
        if cfg.num_kv_heads % tp_size:
            raise ValueError(f"{cfg.num_kv_heads} KV heads cannot be split over tp={tp_size}")
        weight = model.lm_head.weight
        self.model = model
        self.config = cfg
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.device = weight.device
        self.dtype = weight.dtype
        self.dtype_name = str(weight.dtype).removeprefix("torch.")
        self.num_layers = cfg.num_layers
        self.num_kv_heads = cfg.num_kv_heads // tp_size
        self.head_dim = cfg.head_dim
        self.max_context = cfg.max_context
        self.block_size = block_size
        self.tp_size = tp_size
        self.eos_token_ids = frozenset(tokenizer.eos_token_ids or cfg.eos_token_ids)
        on_gpu = self.device.type == "cuda"
        self.backend = attention_backend or (GpuAttentionBackend() if on_gpu else TorchAttentionBackend())
        self.cache = PagedKVCache(num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                                  num_kv_heads=self.num_kv_heads, head_dim=cfg.head_dim, dtype=self.dtype,
                                  device=self.device)
        # On a GPU a single-shard Llama runs fused, with its decode steps replayed from CUDA graphs; every
        # other case (CPU, OPT, tensor-parallel shards, a backend passed in) goes through self.backend.
        self.gpu_runner: GpuStepRunner | None = None
        if on_gpu and attention_backend is None and FusedLlama.supports(model, tp_size):
            self.gpu_runner = GpuStepRunner(FusedLlama(model, self.cache.layers, cfg.max_context),
                                            block_size=block_size, max_context=cfg.max_context,
                                            cuda_graphs=cuda_graphs)
        self.allocator = BlockAllocator(num_blocks)
        # A pipeline-parallel stage runs its forward steps through parallel.pipeline.PipelineStepRunner.
        self.step_runner = None
        # Unseeded sampling draws from here; tensor-parallel ranks pass the same seed so they agree.
        self._rng = torch.Generator(device=self.device)
        if sampling_seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(sampling_seed)
        self._seqs: dict[str, Sequence] = {}

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
             block_size: int = 16, num_blocks: int | None = None, kv_memory_fraction: float = 0.9,
             tp_group=None, model_id: str | None = None,
             attention_backend: AttentionBackend | None = None, cuda_graphs: bool = True) -> Engine:
        """Load config.json, safetensors and tokenizer.json from `model_dir`.

        dtype defaults to float32 on CPU; on GPU to the checkpoint's half dtype, else bfloat16. With a
        `tp_group` (a torch.distributed group) the model is sharded over it with DeepSpeed and this
        engine holds one shard; every rank must make the same calls in the same order. On a GPU,
        `cuda_graphs=False` keeps the fused Llama path but launches decode steps eagerly.
        """
        cfg = load_config(model_dir)
        dev = torch.device(device)
        if dtype is None:
            dtype = torch.float32 if dev.type == "cpu" else _HALF_DTYPES.get(cfg.torch_dtype or "", torch.bfloat16)
        model = load_model(model_dir, device=dev, dtype=dtype)
        tp_size, seed = 1, None
        if tp_group is not None:
            from ..parallel import shard_model, shared_seed

            model, tp_size = shard_model(model, tp_group)
            seed = shared_seed(tp_group)
        if num_blocks is None:
            per_block = PagedKVCache.bytes_per_block(num_layers=cfg.num_layers, block_size=block_size,
                                                     num_kv_heads=cfg.num_kv_heads // tp_size,
                                                     head_dim=cfg.head_dim, dtype=dtype)
            num_blocks = plan_num_blocks(dev, bytes_per_block=per_block, block_size=block_size,
                                         max_context=cfg.max_context, memory_fraction=kv_memory_fraction)
        tokenizer = Tokenizer.from_dir(model_dir, eos_token_ids=cfg.eos_token_ids, bos_token_id=cfg.bos_token_id)
        return cls(model, tokenizer, model_id=model_id or default_model_id(model_dir), num_blocks=num_blocks,
                   block_size=block_size, tp_size=tp_size, attention_backend=attention_backend,
                   sampling_seed=seed, cuda_graphs=cuda_graphs)

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def total_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def free_blocks(self) -> int:
        return self.allocator.free

    @property
    def num_running(self) -> int:
        """Requests holding KV here and not yet finished."""
        return sum(not s.finished for s in self._seqs.values())

    @property
    def request_ids(self) -> list[str]:
        """Every request holding KV here (finished ones included until released)."""
        return list(self._seqs)

    def can_admit(self, num_tokens: int) -> bool:
        """Whether `num_tokens` tokens of KV fit in the free blocks now."""
        return blocks_for(num_tokens, self.block_size) <= self.allocator.free

    @staticmethod
    def kv_tokens(prompt_len: int, max_tokens: int) -> int:
        """Tokens of KV a request needs over its life (the last output token is never fed back)."""
        return prompt_len + max_tokens - 1

    def check_admissible(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestTooLarge if such a request could never run here, however idle the engine."""
        if prompt_len + max_tokens > self.max_context:
            raise RequestTooLarge(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model context "
                                  f"of {self.max_context} tokens")
        need = blocks_for(self.kv_tokens(prompt_len, max_tokens), self.block_size)
        if need > self.total_blocks:
            raise RequestTooLarge(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs {need} KV blocks; "
                                  f"the cache has {self.total_blocks} blocks of {self.block_size} tokens")

    # ---- steps ----------------------------------------------------------------------------------
    def prefill(self, requests: Seq[GenerationRequest], *, reserve_decode: bool = True) -> list[StepOutput]:
        """Run the prompts as one packed batch; return each request's first token.

        All or nothing: an invalid request raises before any is admitted, and KVCacheFull when the
        batch does not fit now. With `reserve_decode=False` (a prefill-only worker) only the prompt's
        blocks are taken; such requests are never decoded here, only exported and released.
        """
        if not requests:
            return []
        for req in requests:
            self._validate(req)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise DuplicateRequest(f"request ids repeat within the batch: {ids}")
        sizes = [self.kv_tokens(len(r.prompt_ids), r.sampling.max_tokens) if reserve_decode else len(r.prompt_ids)
                 for r in requests]
        need = sum(blocks_for(n, self.block_size) for n in sizes)
        if need > self.allocator.free:
            raise KVCacheFull(f"prefill batch needs {need} KV blocks, {self.allocator.free} of "
                              f"{self.total_blocks} free")
        seqs = [self._admit(r, n, decodable=reserve_decode) for r, n in zip(requests, sizes, strict=True)]
        lens = [s.prompt_len for s in seqs]
        layout = StepLayout(
            is_prefill=True, seq_lens=lens, context_lens=lens, block_tables=[s.block_table for s in seqs],
            slot_mapping=[slot for s in seqs for slot in self.cache.slots(s.block_table, 0, s.prompt_len)],
            block_size=self.block_size)
        tokens = [t for s in seqs for t in s.request.prompt_ids]
        positions = [p for n in lens for p in range(n)]
        last = [end - 1 for end in accumulate(lens)]
        logits = self._run(tokens, positions, layout, last)
        for s in seqs:
            s.num_cached = s.prompt_len
        return self._emit(seqs, logits)

    def decode(self) -> list[StepOutput]:
        """One token for every running request; finished requests (also those done at prefill) are released."""
        self._release_finished()
        running = [s for s in self._seqs.values() if s.decodable and not s.prefilling]
        if not running:
            return []
        layout = StepLayout(
            is_prefill=False, seq_lens=[1] * len(running), context_lens=[s.num_cached + 1 for s in running],
            block_tables=[s.block_table for s in running],
            slot_mapping=[self.cache.slots(s.block_table, s.num_cached, s.num_cached + 1)[0] for s in running],
            block_size=self.block_size)
        tokens = [s.output_ids[-1] for s in running]
        positions = [s.num_cached for s in running]
        logits = self._run(tokens, positions, layout, list(range(len(running))))
        for s in running:
            s.num_cached += 1
        outputs = self._emit(running, logits)
        self._release_finished()
        return outputs

    def generate(self, requests: Seq[GenerationRequest]) -> dict[str, list[int]]:
        """Prefill then decode to completion; output ids per request (EOS included when it stopped them).

        Meant for an otherwise idle engine: other requests present are stepped too, their tokens dropped.
        """
        outputs: dict[str, list[int]] = {r.request_id: [] for r in requests}
        for out in self.prefill(requests):
            outputs[out.request_id].append(out.token_id)
        while any(rid in self._seqs and not self._seqs[rid].finished for rid in outputs):
            for out in self.decode():
                if out.request_id in outputs:
                    outputs[out.request_id].append(out.token_id)
        for rid in outputs:
            self.abort(rid)
        return outputs

    def admit_chunked(self, request: GenerationRequest) -> None:
        """Admit a request whose prompt `mixed_step` prefills in chunks (engine/chunked.py)."""
        chunked.admit(self, request)

    def mixed_step(self, chunks: Seq[chunked.PrefillChunk]) -> list[StepOutput]:
        """One token for every running request plus prompt chunks, as one forward (engine/chunked.py)."""
        return chunked.mixed_step(self, chunks)

    # ---- KV export / import ---------------------------------------------------------------------
    def export_kv(self, request_id: str) -> KVPayload:
        """A copy of the prompt tokens' KV of a prefilled request (the request keeps its blocks)."""
        seq = self._get(request_id)
        keys, values = self.cache.read(seq.block_table, seq.prompt_len)
        header = KVHeader(request_id=request_id, model_id=self.model_id, num_layers=self.num_layers,
                          num_kv_heads=self.num_kv_heads, head_dim=self.head_dim, dtype=self.dtype_name,
                          num_tokens=seq.prompt_len)
        return KVPayload(header=header, keys=keys, values=values)

    def import_kv(self, request: GenerationRequest, kv: KVPayload, first_token: int) -> None:
        """Admit a request prefilled elsewhere: place its prompt KV and continue after `first_token`.

        Raises KVMismatchError (payload does not fit this engine or this prompt), RequestTooLarge,
        KVCacheFull (retry later), InvalidRequest (already finished at its first token).
        """
        self._validate(request)
        kv.check()
        kv.check_compatible(model_id=self.model_id, num_layers=self.num_layers, num_kv_heads=self.num_kv_heads,
                            head_dim=self.head_dim, dtype=self.dtype_name)
        if kv.header.num_tokens != len(request.prompt_ids):
            raise KVMismatchError(f"request {request.request_id}: KV holds {kv.header.num_tokens} tokens, the "
                                  f"prompt has {len(request.prompt_ids)}")
        if not 0 <= first_token < self.config.vocab_size:
            raise InvalidRequest(f"first_token {first_token} is outside the vocabulary")
        seq = self._new_sequence(request)
        # Replaying the first token puts the detokenizer where the prefill side left it (same text held back).
        seq.append(first_token, self.eos_token_ids)
        if seq.finished:
            raise InvalidRequest(f"request {request.request_id} already finished at its first token "
                                 f"({seq.finish_reason}); there is nothing to decode")
        size = self.kv_tokens(seq.prompt_len, request.sampling.max_tokens)
        seq.block_table = self.allocator.allocate(blocks_for(size, self.block_size))
        self.cache.write(seq.block_table, kv.keys, kv.values)
        seq.num_cached = seq.prompt_len
        self._seqs[request.request_id] = seq

    # ---- lifecycle ------------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free a request's KV and forget it (finished or not). UnknownRequest if it is not here."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            raise UnknownRequest(f"no request {request_id!r} in this engine")
        self.allocator.release(seq.block_table)

    def abort(self, request_id: str) -> bool:
        """Stop and free a request if it is still here; False if it was not (already done or unknown)."""
        if request_id not in self._seqs:
            return False
        self.release(request_id)
        return True

    # ---- internals ------------------------------------------------------------------------------
    def _validate(self, req: GenerationRequest) -> None:
        if req.request_id in self._seqs:
            raise DuplicateRequest(f"request {req.request_id!r} is already in this engine")
        if not req.prompt_ids:
            raise InvalidRequest(f"request {req.request_id!r} has an empty prompt")
        vocab = self.config.vocab_size
        if min(req.prompt_ids) < 0 or max(req.prompt_ids) >= vocab:
            raise InvalidRequest(f"request {req.request_id!r} has token ids outside [0, {vocab})")
        req.sampling.validate()
        self.check_admissible(len(req.prompt_ids), req.sampling.max_tokens)

    def _new_sequence(self, req: GenerationRequest) -> Sequence:
        detok = IncrementalDetokenizer(self.tokenizer, req.prompt_ids, req.sampling.stop)
        return Sequence(request=req, detok=detok)

    def _admit(self, req: GenerationRequest, kv_tokens: int, *, decodable: bool) -> Sequence:
        seq = self._new_sequence(req)
        seq.decodable = decodable
        seq.block_table = self.allocator.allocate(blocks_for(kv_tokens, self.block_size))
        self._seqs[req.request_id] = seq
        return seq

    def _run(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int],
             backend: AttentionBackend | None = None) -> torch.Tensor:
        """Forward the packed tokens; float32 logits of the given rows (the tokens that get sampled).

        A `backend` given here (mixed steps) runs the model's own forward with it, not the fused GPU runner.
        """
        if backend is None:
            runner = self.step_runner or self.gpu_runner
            if runner is not None:
                return runner.run(tokens, positions, layout, rows)
        elif self.step_runner is not None:
            raise EngineError("chunked prefill (mixed steps) runs on single-stage instances only; a pipeline-"
                              "parallel colocated instance must use --colocated-prefill priority")
        backend = backend or self.backend
        with torch.inference_mode():
            meta = backend.build_metadata(layout, self.device)
            ctx = AttentionContext(backend, meta, self.cache.layers)
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            pos = torch.tensor(positions, dtype=torch.long, device=self.device)
            hidden = self.model(ids, pos, ctx)
            if len(rows) != hidden.shape[0]:
                hidden = hidden[torch.tensor(rows, device=self.device)]
            return self.model.compute_logits(hidden)

    def _emit(self, seqs: list[Sequence], logits: torch.Tensor) -> list[StepOutput]:
        params = [s.request.sampling for s in seqs]
        tokens = sample(logits, params, [len(s.output_ids) for s in seqs], self._rng)
        return [s.append(t, self.eos_token_ids) for s, t in zip(seqs, tokens, strict=True)]

    def _release_finished(self) -> None:
        for rid in [rid for rid, s in self._seqs.items() if s.finished]:
            self.release(rid)

    def _get(self, request_id: str) -> Sequence:
        try:
            return self._seqs[request_id]
        except KeyError:
            raise UnknownRequest(f"no request {request_id!r} in this engine") from None


def default_model_id(model_dir: str | Path) -> str:
    """Directory name plus a hash of config.json: engines loading the same model agree, others do not."""
    path = Path(model_dir)
    digest = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:12]
    return f"{path.resolve().name}@{digest}"
