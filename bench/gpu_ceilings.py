"""Floors for the engine benchmark: the GPU's measured ceilings and the Llama step's bytes and FLOPs.

Kept apart from the timing script so the arithmetic can be read (and checked on CPU) on its own:
decode floor = (weight bytes + KV bytes) / measured copy bandwidth;
prefill floor = FLOPs / measured bf16 matmul rate.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class LlamaShape:
    """The numbers of a Llama-family checkpoint that the floors depend on."""

    num_layers: int = 32
    hidden: int = 4096
    num_heads: int = 32
    num_kv_heads: int = 8
    ffn: int = 14336
    vocab: int = 128256
    dtype_bytes: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.num_heads

    @property
    def layer_params(self) -> int:
        kv = self.num_kv_heads * self.head_dim
        return 2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.ffn + 2 * self.hidden

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    @property
    def total_params(self) -> int:
        """Layers + embedding + untied LM head + final norm."""
        return self.num_layers * self.layer_params + 2 * self.embed_params + self.hidden

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def decode_bytes(self, batch: int, context: int) -> int:
        """Fewest HBM bytes of one decode step: every weight once (only `batch` rows of the embedding),
        every sequence's KV over `context` tokens once, and the new token's KV written once."""
        weights = (self.total_params - self.embed_params + batch * self.hidden) * self.dtype_bytes
        return weights + batch * context * self.kv_bytes_per_token + batch * self.kv_bytes_per_token

    def prefill_flops(self, tokens: int, sequences: int = 1) -> float:
        """FLOPs of a prefill of `sequences` prompts of `tokens` each: the layers' matmuls for every token,
        causal attention (QK^T and PV over the lower triangle), the LM head for each prompt's last token."""
        dense = 2.0 * self.num_layers * (self.layer_params - 2 * self.hidden) * tokens * sequences
        attn = self.num_layers * 2 * 2 * self.hidden * (tokens * (tokens + 1) / 2) * sequences
        head = 2.0 * self.embed_params * sequences
        return dense + attn + head

    def to_dict(self) -> dict:
        return {**asdict(self), "total_params": self.total_params, "kv_bytes_per_token": self.kv_bytes_per_token}


def gpu_tag(device_name: str) -> str:
    """'NVIDIA H200' -> 'h200', 'NVIDIA H100 80GB HBM3' -> 'h100': the file name says which GPU ran it."""
    for word in device_name.replace("-", " ").split():
        if any(c.isdigit() for c in word) and any(c.isalpha() for c in word) and not word.upper().endswith("GB"):
            return word.lower()
    return "gpu"


def time_cuda(fn, *, warmup: int = 3, repeats: int = 10) -> list[float]:
    """Seconds per call of `fn`, each timed with CUDA events after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def measure_copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written (median)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    med = statistics.median(time_cuda(lambda: dst.copy_(src), warmup=3, repeats=repeats))
    return 2 * nbytes / med


def measure_matmul_rate(n: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul rate in FLOP/s on random n x n x n operands (median of several sets, so no cache reuse)."""
    sets = [(torch.randn(n, n, dtype=torch.bfloat16, device="cuda"),
             torch.randn(n, n, dtype=torch.bfloat16, device="cuda")) for _ in range(3)]
    out = torch.empty(n, n, dtype=torch.bfloat16, device="cuda")
    i = [0]

    def step() -> None:
        a, b = sets[i[0] % len(sets)]
        i[0] += 1
        torch.matmul(a, b, out=out)

    med = statistics.median(time_cuda(step, warmup=5, repeats=repeats))
    return 2.0 * n ** 3 / med
