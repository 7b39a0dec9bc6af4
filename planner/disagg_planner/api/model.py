"""Model architecture numbers: what the planner needs to size memory, FLOPs and KV bytes."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import ApiModel

DType = Literal["bfloat16", "float16", "float32"]

DTYPE_BYTES: dict[str, int] = {"bfloat16": 2, "float16": 2, "float32": 4}


class ModelSpec(ApiModel):
    """A decoder-only transformer, described by its shape (an HF config reduced to what matters)."""

    name: str = Field(min_length=1, max_length=253, description="Model id, e.g. an HF repo name.")
    architecture: Literal["llama", "opt"] = Field(description="Layer family.")
    num_layers: int = Field(ge=1, le=1024)
    hidden_size: int = Field(ge=1, le=1 << 17)
    num_heads: int = Field(ge=1, le=1024)
    num_kv_heads: int = Field(ge=1, le=1024, description="Equals num_heads without GQA.")
    ffn_size: int = Field(ge=1, le=1 << 19)
    vocab_size: int = Field(ge=1, le=1 << 22)
    max_context: int = Field(default=4096, ge=16, le=1 << 20, description="Longest prompt + output.")
    dtype: DType = "bfloat16"

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelSpec:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def num_params(self) -> int:
        """Parameter count (embeddings included, untied LM head for llama)."""
        h, f, v = self.hidden_size, self.ffn_size, self.vocab_size
        kv = self.num_kv_heads * self.head_dim
        attn = h * h * 2 + h * kv * 2  # q, o, k, v
        mlp = 3 * h * f if self.architecture == "llama" else 2 * h * f
        per_layer = attn + mlp + 4 * h
        head = v * h if self.architecture == "llama" else 0  # OPT ties the LM head to the embedding
        pos = self.max_context * h if self.architecture == "opt" else 0
        return self.num_layers * per_layer + v * h + head + pos

    @property
    def weight_bytes(self) -> int:
        return self.num_params * self.dtype_bytes

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V for one token across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype_bytes

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token attending over `context` earlier tokens (2 per multiply-add)."""
        h = self.hidden_size
        dense = 2 * (self.num_params - self.vocab_size * h * (2 if self.architecture == "llama" else 1))
        attn = 4 * self.num_layers * h * context
        return float(dense + attn + 2 * self.vocab_size * h)


def _llama(name: str, layers: int, hidden: int, heads: int, kv: int, ffn: int, vocab: int, ctx: int) -> ModelSpec:
    return ModelSpec(name=name, architecture="llama", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=kv, ffn_size=ffn, vocab_size=vocab, max_context=ctx)


def _opt(name: str, layers: int, hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name=name, architecture="opt", num_layers=layers, hidden_size=hidden, num_heads=heads,
                     num_kv_heads=heads, ffn_size=4 * hidden, vocab_size=50272, max_context=2048, dtype="float16")


MODEL_PRESETS: dict[str, ModelSpec] = {
    "opt-13b": _opt("facebook/opt-13b", 40, 5120, 40),
    "opt-66b": _opt("facebook/opt-66b", 64, 9216, 72),
    "opt-175b": _opt("facebook/opt-175b", 96, 12288, 96),
    "llama-3-8b": _llama("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 8192),
    "llama-3-70b": _llama("meta-llama/Meta-Llama-3-70B", 80, 8192, 64, 8, 28672, 128256, 8192),
    # For laptops and CI: the runtime's tiny random model.
    "tiny-llama": _llama("disagg/tiny-llama", 2, 64, 4, 2, 128, 512, 512),
}

PresetModel = Literal["opt-13b", "opt-66b", "opt-175b", "llama-3-8b", "llama-3-70b", "tiny-llama"]


class ModelRef(ApiModel):
    """Which model to serve: a preset name or a custom shape, plus where the runtime finds the weights."""

    preset: PresetModel | None = Field(default=None, description="A known model shape.")
    custom: ModelSpec | None = Field(default=None, description="A shape not among the presets.")
    path: str | None = Field(
        default=None, max_length=4096,
        description="HF-style directory (config.json + safetensors) inside the runtime pod; "
        "empty means random weights of this shape (benchmarks, CI).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelRef:
        if (self.preset is None) == (self.custom is None):
            raise ValueError("give exactly one of model.preset or model.custom")
        return self

    @property
    def spec(self) -> ModelSpec:
        return self.custom if self.custom is not None else MODEL_PRESETS[self.preset]
