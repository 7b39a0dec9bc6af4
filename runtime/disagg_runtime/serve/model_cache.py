"""Random-weight models written once per cache: the tiny one `disagg serve --local` runs without --model,
and one of a ModelSpec's shape for pods the operator starts without a model path (benchmarks, CI)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

TINY_MODEL = "tiny-llama-v1"  # bump when write_random_model's output changes


def cache_root(cache_dir: str | None = None) -> Path:
    """--cache-dir, else $DISAGG_CACHE, else ~/.cache/disagg."""
    return Path(cache_dir or os.environ.get("DISAGG_CACHE") or Path.home() / ".cache" / "disagg")


def tiny_model(cache_dir: str | None = None) -> Path:
    """The cached tiny random llama; written on first use."""
    return _cached(cache_root(cache_dir) / "models" / TINY_MODEL, "llama", {})


def hf_overrides(spec) -> tuple[str, dict]:
    """(arch, HF config.json keys) of a disagg_planner ModelSpec, for write_random_model."""
    common = {"hidden_size": spec.hidden_size, "num_hidden_layers": spec.num_layers,
              "num_attention_heads": spec.num_heads, "vocab_size": spec.vocab_size,
              "max_position_embeddings": spec.max_context, "torch_dtype": spec.dtype}
    if spec.architecture == "opt":
        return "opt", {**common, "ffn_dim": spec.ffn_size, "word_embed_proj_dim": spec.hidden_size}
    return "llama", {**common, "intermediate_size": spec.ffn_size, "num_key_value_heads": spec.num_kv_heads}


def model_for_spec(spec_path: str | Path, cache_dir: str | None = None) -> Path:
    """Random weights of the shape in a ModelSpec JSON file (the operator's model.json).

    Every pod writes the same weights (fixed seed) under the same directory name, so prefill and decode
    instances agree on the model id and can exchange KV.
    """
    from disagg_planner.api import ModelSpec

    spec = ModelSpec.model_validate_json(Path(spec_path).read_text())
    arch, overrides = hf_overrides(spec)
    name = "random-" + "".join(c if c.isalnum() or c in "-._" else "-" for c in spec.name)
    return _cached(cache_root(cache_dir) / "models" / name, arch, overrides)


def _cached(target: Path, arch: str, overrides: dict) -> Path:
    """Write a random model at `target` unless it exists (atomically, so concurrent writers agree)."""
    from ..models.testing import write_random_model

    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_random_model(tmp, arch=arch, seed=0, **overrides)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
