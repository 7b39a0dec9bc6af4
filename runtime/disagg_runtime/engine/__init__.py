"""Model execution: paged KV cache, batched prefill, continuous-batching decode, KV export/import."""

from ..kv.payload import KVMismatchError
from .attention import AttentionBackend, AttentionContext, LayerKV, StepLayout, TorchAttentionBackend
from .engine import Engine, default_model_id
from .kv_cache import BlockAllocator, PagedKVCache, blocks_for
from .memory import KVMemoryError
from .types import (
                    DuplicateRequest,
                    EngineError,
                    FinishReason,
                    GenerationRequest,
                    InvalidRequest,
                    KVCacheFull,
                    RequestTooLarge,
                    SamplingParams,
                    StepOutput,
                    UnknownRequest,
)

__all__ = [
    "AttentionBackend", "AttentionContext", "BlockAllocator", "DuplicateRequest", "Engine", "EngineError",
    "FinishReason", "GenerationRequest", "InvalidRequest", "KVCacheFull", "KVMemoryError", "KVMismatchError",
    "LayerKV", "PagedKVCache", "RequestTooLarge", "SamplingParams", "StepLayout", "StepOutput",
    "TorchAttentionBackend", "UnknownRequest", "blocks_for", "default_model_id",
]
