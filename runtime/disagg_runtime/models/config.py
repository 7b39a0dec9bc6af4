"""A model's shape, read from an HF `config.json` and reduced to what our layers need.

Covers the Llama family (Llama 1-3, Mistral, Qwen2: RoPE, RMSNorm, SwiGLU, GQA) and OPT. Field
names that DeepSpeed AutoTP probes on `model.config` (`num_attention_heads`, `num_key_value_heads`,
`hidden_size`) are exposed as properties so AutoTP shards heads the way our attention expects.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import ModelLoadError, UnsupportedModelError

LLAMA_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "llama"}
ARCH_OF_MODEL_TYPE = {**LLAMA_TYPES, "opt": "opt"}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_scaling` / `rope_parameters`)."""

    theta: float = 10000.0
    kind: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture numbers of a decoder-only model; `architecture` picks the layer family."""

    architecture: Literal["llama", "opt"]
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_size: int
    max_context: int
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    activation: str
    rope: RopeConfig | None = None
    # OPT only
    do_layer_norm_before: bool = True
    final_layer_norm: bool = True
    word_embed_proj_dim: int | None = None
    layer_norm_affine: bool = True
    # Tokens
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None

    @property
    def num_attention_heads(self) -> int:
        """HF/AutoTP name of `num_heads`."""
        return self.num_heads

    @property
    def num_key_value_heads(self) -> int:
        """HF/AutoTP name of `num_kv_heads`."""
        return self.num_kv_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (OPT may project it to and from `hidden_size`)."""
        return self.word_embed_proj_dim or self.hidden_size

    def to_model_spec(self, name: str, dtype: str = "bfloat16"):
        """The planner's view of this shape (`disagg_planner.api.ModelSpec`)."""
        from disagg_planner.api import ModelSpec

        return ModelSpec(name=name, architecture=self.architecture, num_layers=self.num_layers,
                         hidden_size=self.hidden_size, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                         ffn_size=self.ffn_size, vocab_size=self.vocab_size, max_context=self.max_context,
                         dtype=dtype)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The raw config.json of a model directory."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{model_dir}: no config.json (expected an HF-style model directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc


def load_config(model_dir: str | Path) -> ModelConfig:
    """Parse `model_dir/config.json` (and generation_config.json for extra EOS ids)."""
    raw = read_config_json(model_dir)
    gen_path = Path(model_dir) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    return parse_config(raw, generation=gen, source=str(model_dir))


def parse_config(raw: dict[str, Any], *, generation: dict[str, Any] | None = None,
                 source: str = "config.json") -> ModelConfig:
    """Turn an HF config dict into a ModelConfig, refusing features we do not implement."""
    model_type = raw.get("model_type")
    if model_type not in ARCH_OF_MODEL_TYPE:
        raise UnsupportedModelError(
            f"{source}: model_type {model_type!r} is not supported; supported: {sorted(ARCH_OF_MODEL_TYPE)}")
    eos = _token_ids(raw.get("eos_token_id")) + _token_ids((generation or {}).get("eos_token_id"))
    common = dict(
        model_type=model_type,
        vocab_size=_req(raw, "vocab_size", source),
        hidden_size=_req(raw, "hidden_size", source),
        num_layers=_req(raw, "num_hidden_layers", source),
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=tuple(dict.fromkeys(eos)),
        pad_token_id=raw.get("pad_token_id"),
        torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
    )
    if ARCH_OF_MODEL_TYPE[model_type] == "opt":
        return _parse_opt(raw, common, source)
    return _parse_llama(raw, common, source)


def _parse_llama(raw: dict[str, Any], common: dict[str, Any], source: str) -> ModelConfig:
    heads = _req(raw, "num_attention_heads", source)
    hidden = common["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // heads
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (Llama-family uses silu)")
    max_context = _req(raw, "max_position_embeddings", source)
    window = raw.get("sliding_window")
    if window and raw.get("use_sliding_window", common["model_type"] == "mistral") and window < max_context:
        # Sliding-window attention is not implemented; within the window it equals full attention,
        # so capping the context keeps outputs exact instead of silently diverging past it.
        max_context = window
    qkv_bias = bool(raw.get("attention_bias", False)) or common["model_type"] == "qwen2"
    return ModelConfig(
        architecture="llama", num_heads=heads, num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=head_dim, ffn_size=_req(raw, "intermediate_size", source), max_context=max_context,
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias, o_bias=bool(raw.get("attention_bias", False)), mlp_bias=bool(raw.get("mlp_bias", False)),
        activation=act, rope=_parse_rope(raw, source), **common,
    )


def _parse_opt(raw: dict[str, Any], common: dict[str, Any], source: str) -> ModelConfig:
    heads = _req(raw, "num_attention_heads", source)
    hidden = common["hidden_size"]
    act = raw.get("activation_function", "relu")
    if act not in ("relu", "gelu"):
        raise UnsupportedModelError(f"{source}: activation_function {act!r} is not supported (relu or gelu)")
    proj = raw.get("word_embed_proj_dim") or hidden
    pre_ln = bool(raw.get("do_layer_norm_before", True))
    bias = bool(raw.get("enable_bias", True))
    return ModelConfig(
        architecture="opt", num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
        ffn_size=_req(raw, "ffn_dim", source), max_context=_req(raw, "max_position_embeddings", source),
        norm_eps=1e-5, tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, activation=act,
        do_layer_norm_before=pre_ln,
        final_layer_norm=pre_ln and not raw.get("_remove_final_layer_norm", False),
        word_embed_proj_dim=proj if proj != hidden else None,
        layer_norm_affine=bool(raw.get("layer_norm_elementwise_affine", True)),
        **common,
    )


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); older checkpoints `rope_theta` + `rope_scaling`.
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = float(params.get("rope_theta") or raw.get("rope_theta") or 10000.0)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=theta, kind="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]), high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params.get("original_max_position_embeddings")
                                      or raw["max_position_embeddings"]),
        )
    raise UnsupportedModelError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")


def _req(raw: dict[str, Any], key: str, source: str) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(f"{source}: config.json lacks {key!r}")
    return raw[key]


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]
