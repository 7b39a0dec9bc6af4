"""The engine: batched prefill, continuous-batching decode, and KV export/import over a paged cache.

KV blocks are taken on demand (`block_manager.py`): a request is admitted when its prompt's blocks fit
with the watermark to spare, and each decode step extends the block tables its sequences grow into.
When a step cannot get those blocks, the latest admitted sequences are preempted (swapped to host
memory or dropped for recompute, `preemption.py`) and resume, oldest first, when blocks free up; a
step that runs out of memory therefore preempts, it never fails. Prefill runs all prompts of a batch as
one packed forward (no padding) and returns each request's first token; the prompt KV stays until
`release` (a prefill worker exports it first) or decode continues here. `decode` advances every
running request by one token and releases the ones that finish.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from ..kv.payload import KVPayload
from ..models import CausalLM, load_config, load_model
from ..tokenizer import Tokenizer
from . import chunked, kv_import, overlap
from .attention import AttentionBackend, AttentionContext, StepLayout, TorchAttentionBackend
from .block_manager import DEFAULT_WATERMARK, BlockManager
from .detokenizer import IncrementalDetokenizer
from .gpu import FusedLlama, GpuAttentionBackend, GpuStepRunner
from .kv_cache import BlockAllocator, PagedKVCache, blocks_for
from .kv_export import KVExporter
from .layouts import decode_layout, packed_prompts
from .memory import plan_num_blocks
from .preemption import (
    DEFAULT_SWAP_SPACE_BYTES,
    PREEMPTION_MODES,
    HostSwapSpace,
    PreemptionMode,
    PreemptionStats,
    grow_or_preempt,
    resume,
)
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
                 sampling_seed: int | None = None, cuda_graphs: bool = True, kv_watermark: float = DEFAULT_WATERMARK,
                 preemption: PreemptionMode = "swap", swap_space_bytes: int = DEFAULT_SWAP_SPACE_BYTES,
                 overlap_decode: bool | None = None) -> None:
        cfg = model.config
        if cfg.num_kv_heads % tp_size:
            raise ValueError(f"{cfg.num_kv_heads} KV heads cannot be split over tp={tp_size}")
        if preemption not in PREEMPTION_MODES:
            raise ValueError(f"preemption must be one of {PREEMPTION_MODES}, got {preemption!r}")
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
        # Prefill-only requests' prompt KV, staged layer by layer during their forward (kv_export.py).
        self.kv_export = KVExporter(self)
        self.allocator = BlockAllocator(num_blocks)
        self.blocks = BlockManager(self.allocator, block_size=block_size, watermark=kv_watermark)
        self.preemption: PreemptionMode = preemption
        self.swap_space = HostSwapSpace(swap_space_bytes if preemption == "swap" else 0)
        self.preemption_stats = PreemptionStats()
        self._admissions = 0
        self._num_preempted = 0  # a plain int: workers read it from their event loop while the engine steps
        self._reserved: dict[str, list[int]] = {}  # prompt blocks set aside for KV on its way (import_kv)
        # A pipeline-parallel stage runs its forward steps through parallel.pipeline.PipelineStepRunner.
        self.step_runner = None
        # Unseeded sampling draws from here; tensor-parallel ranks pass the same seed so they agree.
        self._rng = torch.Generator(device=self.device)
        if sampling_seed is None:
            self._rng.seed()
        else:
            self._rng.manual_seed(sampling_seed)
        self._seqs: dict[str, Sequence] = {}
        # Overlapped decode (overlap.py) pays where the host work of a step would leave a GPU idle: on by
        # default for the fused single-GPU path, off elsewhere (CPU steps are synchronous anyway, and
        # multi-rank instances step their ranks in lock-step).
        self.overlap_decode = self.gpu_runner is not None if overlap_decode is None else overlap_decode
        self._in_flight: overlap.InFlightStep | None = None
        self._completed: list[StepOutput] = []  # outputs of a step completed outside decode(), not yet returned
        self._pinned_ids = overlap.PinnedIds(self.device)
        self._held_blocks: list[list[int]] = []  # of requests released while a step in flight writes them

    @classmethod
    def load(cls, model_dir: str | Path, *, device: str = "cpu", dtype: torch.dtype | None = None,
             block_size: int = 16, num_blocks: int | None = None, kv_memory_fraction: float = 0.9,
             tp_group=None, model_id: str | None = None,
             attention_backend: AttentionBackend | None = None, cuda_graphs: bool = True,
             kv_watermark: float = DEFAULT_WATERMARK, preemption: PreemptionMode = "swap",
             swap_space_bytes: int = DEFAULT_SWAP_SPACE_BYTES, overlap_decode: bool | None = None) -> Engine:
        """Load config.json, safetensors and tokenizer.json from `model_dir`.

        dtype defaults to float32 on CPU; on GPU to the checkpoint's half dtype, else bfloat16. With a
        `tp_group` (a torch.distributed group) the model is sharded over it with DeepSpeed and this
        engine holds one shard; every rank must make the same calls in the same order. On a GPU,
        `cuda_graphs=False` keeps the fused Llama path but launches decode steps eagerly. `kv_watermark`,
        `preemption` and `swap_space_bytes` set the on-demand KV policy (`block_manager`, `preemption`).
        `overlap_decode` (default: on for the fused GPU path) launches each decode step before the host has
        processed the previous one (`overlap.py`).
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
                   sampling_seed=seed, cuda_graphs=cuda_graphs, kv_watermark=kv_watermark, preemption=preemption,
                   swap_space_bytes=swap_space_bytes, overlap_decode=overlap_decode)

    # ---- capacity -------------------------------------------------------------------------------
    @property
    def total_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def free_blocks(self) -> int:
        return self.allocator.free

    @property
    def watermark_blocks(self) -> int:
        """Blocks admission leaves free so that running sequences can grow."""
        return self.blocks.watermark_blocks

    @property
    def num_running(self) -> int:
        """Requests admitted here and not yet finished (preempted ones included: they resume here)."""
        return sum(not s.finished for s in self._seqs.values())

    @property
    def decode_in_flight(self) -> bool:
        """An overlapped decode step is launched and its tokens not yet returned: `decode()` has work."""
        return self._in_flight is not None or bool(self._completed)

    @property
    def has_decode_work(self) -> bool:
        """Whether `decode()` would step someone or return tokens (what a worker's loop checks)."""
        return self.num_running > 0 or self.decode_in_flight

    @property
    def decode_context(self) -> int:
        """Sum of the context lengths of the sequences a decode step would advance (what its attention reads)."""
        return sum(s.num_cached for s in self._running())

    @property
    def num_preempted(self) -> int:
        """Requests preempted and waiting for blocks to resume."""
        return self._num_preempted

    @property
    def request_ids(self) -> list[str]:
        """Every request admitted here (finished ones included until released, preempted ones too)."""
        return list(self._seqs)

    def can_admit(self, prompt_tokens: int, *, pending_blocks: int = 0) -> bool:
        """Whether a new request with a prompt of `prompt_tokens` may be admitted now.

        Its prompt's blocks, plus `pending_blocks` promised to others, must fit with the watermark free,
        and no preempted request may be waiting: those resume first, or a stream of new short requests
        could starve them.
        """
        if self.num_preempted:
            return False
        return self.blocks.fits_with_watermark(blocks_for(prompt_tokens, self.block_size) + pending_blocks)

    @staticmethod
    def kv_tokens(prompt_len: int, max_tokens: int) -> int:
        """Tokens of KV a request needs over its life (the last output token is never fed back)."""
        return prompt_len + max_tokens - 1

    def check_admissible(self, prompt_len: int, max_tokens: int) -> None:
        """Raise RequestTooLarge if such a request could never run here, however idle the engine.

        Its whole life must fit the whole cache: alone, it must be able to finish without preempting itself.
        """
        if prompt_len + max_tokens > self.max_context:
            raise RequestTooLarge(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) exceeds the model context "
                                  f"of {self.max_context} tokens")
        need = blocks_for(self.kv_tokens(prompt_len, max_tokens), self.block_size)
        if need > self.total_blocks:
            raise RequestTooLarge(f"prompt ({prompt_len}) + max_tokens ({max_tokens}) needs {need} KV blocks; "
                                  f"the cache has {self.total_blocks} blocks of {self.block_size} tokens")

    # ---- steps ----------------------------------------------------------------------------------
    def prefill(self, requests: Seq[GenerationRequest], *, reserve_decode: bool = True,
                on_decoded: Callable[[list[StepOutput]], None] | None = None,
                overlapped: bool = False) -> list[StepOutput]:
        """Run the prompts as one packed batch; return each request's first token.

        All or nothing: an invalid request raises before any is admitted, and KVCacheFull when the
        prompts' blocks do not fit now with the watermark to spare. Only the prompts' blocks are taken;
        decoding grows them. With `reserve_decode=False` (a prefill-only worker) the requests are never
        decoded here, only exported and released, so no watermark is kept for them.

        On an engine that overlaps decode steps (`overlap.after_prefill`): `on_decoded` gets the tokens of
        the step in flight while the device computes the prompts, not with the next `decode()`; and
        `overlapped=True` (when the KV stays here for decoding) returns [] at once, the first tokens left on
        the device for the next `decode()` to gather and return.
        """
        if not requests:
            return []
        for req in requests:
            self._validate(req)
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise DuplicateRequest(f"request ids repeat within the batch: {ids}")
        need = sum(blocks_for(len(r.prompt_ids), self.block_size) for r in requests)
        spare = self.watermark_blocks if reserve_decode else 0
        if need + spare > self.allocator.free:
            raise KVCacheFull(f"prefill batch needs {need} KV blocks (+{spare} watermark), {self.allocator.free} "
                              f"of {self.total_blocks} free")
        seqs = [self._admit(r, decodable=reserve_decode) for r in requests]
        batch = packed_prompts(self.cache, seqs, [s.request.prompt_ids for s in seqs])
        with self.kv_export.staging(() if reserve_decode else seqs):
            logits = self._run(batch.tokens, batch.positions, batch.layout, batch.last_rows)
        for s in seqs:
            s.num_cached = s.prompt_len
        if overlap.after_prefill(self, seqs, logits, on_decoded=on_decoded, overlapped=overlapped and reserve_decode):
            return []
        return self._emit(seqs, logits)

    def decode(self, *, overlapped: bool | None = None) -> list[StepOutput]:
        """One token for every running request; finished requests (also those done at prefill) are released.

        First the running sequences get the blocks this step writes into, preempting the latest admitted
        while they do not fit; then preempted sequences resume, oldest first, while their blocks fit with
        the watermark to spare. Preempted sequences produce no token this step.

        Overlapped (`overlap_decode`, or `overlapped=True` here), a call launches the next step and returns
        the tokens of the one launched by the call before, so the host's work on them runs while the device
        computes (`overlap.py`); `overlapped=False` completes any step in flight and runs one step whole.
        """
        use = (self.overlap_decode if overlapped is None else overlapped) and self.step_runner is None
        outputs, self._completed = self._completed, []
        prev, self._in_flight = self._in_flight, None
        if prev is not None and not (use and overlap.settled(self)):
            outputs += overlap.complete(self, prev)
            prev = None
        if not use:
            return outputs + self._decode_step()
        self._release_finished()
        if prev is None:  # host state is settled: preempt and resume as a plain step would
            grow_or_preempt(self)
            resume(self)
        else:
            for seq in overlap.launchable(self):
                self.blocks.grow(seq, seq.num_cached + 1)
        self._in_flight = overlap.launch(self, prev)
        if prev is not None:
            outputs += overlap.complete(self, prev)
        self._release_finished()  # their blocks wait for the step just launched if it has a row of theirs
        return outputs

    def settle(self) -> None:
        """Complete an overlapped step in flight; its tokens come with the next `decode()` or `mixed_step`."""
        if self._in_flight is not None:
            step, self._in_flight = self._in_flight, None
            self._completed += overlap.complete(self, step)

    def take_completed(self) -> list[StepOutput]:
        """Tokens of a step `settle` completed, handed over once."""
        outputs, self._completed = self._completed, []
        return outputs

    def _decode_step(self) -> list[StepOutput]:
        self._release_finished()
        grow_or_preempt(self)
        resume(self)
        running = self._running()
        if not running:
            return []
        layout, positions = decode_layout(self.cache, running)
        logits = self._run([s.output_ids[-1] for s in running], positions, layout, list(range(len(running))))
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
        """A copy of the prompt tokens' KV of a prefilled request (the request keeps its blocks): the one
        staged during its prefill where there is one, else gathered from its blocks now."""
        seq = self._get(request_id)
        staged = self.kv_export.get(request_id)
        if staged is not None and staged.complete:
            return staged.to_payload()
        return self.kv_export.gather(seq.block_table, request_id, seq.prompt_len)

    def import_kv(self, request: GenerationRequest, kv: KVPayload, first_token: int) -> None:
        """Admit a request prefilled elsewhere: place its prompt KV and continue after `first_token`.

        Raises KVMismatchError (payload does not fit this engine or this prompt), RequestTooLarge,
        KVCacheFull (retry later), InvalidRequest (already finished at its first token).
        """
        kv_import.import_kv(self, request, kv, first_token)

    def reserve(self, request_id: str, prompt_tokens: int) -> bool:
        """Set aside the prompt's blocks for a request whose KV is on its way; False if `can_admit` says no.

        `import_kv` of that request uses them; `abort` gives them back. Reserving on the engine's own
        thread keeps decode steps from growing into blocks a pull in flight was promised.
        """
        return kv_import.reserve(self, request_id, prompt_tokens)

    # ---- lifecycle ------------------------------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free a request's KV and forget it (finished or not). UnknownRequest if it is not here."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            raise UnknownRequest(f"no request {request_id!r} in this engine")
        if seq.pending:  # a launched overlapped step still writes its blocks: free them once it completes
            self._held_blocks.append(seq.block_table)
            seq.block_table = []
        self.blocks.free_seq(seq)
        self.kv_export.drop(request_id)
        if seq.preempted:
            self._num_preempted -= 1
        if seq.swapped is not None:
            self.swap_space.drop(seq.swapped)
            seq.swapped = None

    def abort(self, request_id: str) -> bool:
        """Stop and free a request (or its reservation) if it is still here; False if it was not."""
        reserved = self._reserved.pop(request_id, None)
        if reserved is not None:
            self.allocator.release(reserved)
        if request_id not in self._seqs:
            return reserved is not None
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

    def _admit(self, req: GenerationRequest, *, decodable: bool) -> Sequence:
        seq = self._new_sequence(req)
        seq.decodable = decodable
        seq.block_table = self.allocator.allocate(blocks_for(seq.prompt_len, self.block_size))
        self._enter(seq)
        return seq

    def _enter(self, seq: Sequence) -> None:
        self._admissions += 1
        seq.admitted = self._admissions
        self._seqs[seq.request_id] = seq

    # ---- on-demand blocks and preemption --------------------------------------------------------
    def _running(self) -> list[Sequence]:
        # A prompt still being prefilled in chunks holds its prompt's blocks and takes no decode step.
        return [s for s in self._seqs.values() if s.decodable and not s.preempted and not s.prefilling]

    def _run(self, tokens: list[int], positions: list[int], layout: StepLayout, rows: list[int],
             backend: AttentionBackend | None = None,
             gather: tuple[torch.Tensor, list[int]] | None = None) -> torch.Tensor:
        """Forward the packed tokens; float32 logits of the given rows (the tokens that get sampled).

        A `backend` given here (mixed steps) runs the model's own forward with it, not the fused GPU runner.
        `gather` = (ids on the device, rows): token i is ids[rows[i]] where rows[i] >= 0 (an overlapped
        step's inputs that the host has not read yet), else tokens[i].
        """
        if backend is None:
            if self.gpu_runner is not None and self.step_runner is None:
                return self.gpu_runner.run(tokens, positions, layout, rows, gather=gather)
            if self.step_runner is not None:
                if gather is not None:
                    raise EngineError("pipeline-parallel stages do not run overlapped decode steps")
                return self.step_runner.run(tokens, positions, layout, rows)
        elif self.step_runner is not None:
            raise EngineError("chunked prefill (mixed steps) runs on single-stage instances only; a pipeline-"
                              "parallel colocated instance must use --colocated-prefill priority")
        backend = backend or self.backend
        with torch.inference_mode():
            meta = backend.build_metadata(layout, self.device)
            ctx = AttentionContext(backend, meta, self.cache.layers, after_layer=self.kv_export.layer_hook)
            ids = torch.tensor(tokens, dtype=torch.long, device=self.device)
            if gather is not None:
                ids = overlap.gathered(ids, *gather)
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
