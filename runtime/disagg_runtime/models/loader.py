"""Build a model from a config and fill it from safetensors (single file or a sharded index)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from .base import CausalLM
from .config import ModelConfig, load_config
from .errors import ModelLoadError
from .llama import LlamaForCausalLM
from .opt import OPTForCausalLM

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Checkpoint entries that are derived, not learned (older Llama exports saved the RoPE table).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def build_model(cfg: ModelConfig, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> CausalLM:
    """A model with uninitialised weights on `device` (built on the meta device: no wasted init)."""
    cls = LlamaForCausalLM if cfg.architecture == "llama" else OPTForCausalLM
    with torch.device("meta"):
        model = cls(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty gives tied parameters separate storage; share them again
    model.init_buffers()
    return model.eval().requires_grad_(False)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model directory, in index order."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not (root / f).is_file()]
        if missing:
            raise ModelLoadError(f"{index} names shards that are not there: {missing}")
        return [root / f for f in files]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    found = sorted(p.name for p in root.glob("*.safetensors"))
    if found:
        return [root / f for f in found]
    raise ModelLoadError(f"{model_dir}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors (only safetensors load)")


def iter_checkpoint(model_dir: str | Path, cfg: ModelConfig) -> Iterator[tuple[str, str, Path]]:
    """(our parameter name, key in the file, file) for every tensor of the checkpoint."""
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if not key.endswith(_IGNORED_SUFFIXES):
                    yield _canonical_name(key, cfg), key, path


def _canonical_name(key: str, cfg: ModelConfig) -> str:
    # OPT checkpoints exist both as `decoder.*` (OPTModel) and `model.decoder.*` (OPTForCausalLM).
    if cfg.architecture == "opt" and key.startswith("decoder."):
        return "model." + key
    return key


def load_weights(model: CausalLM, model_dir: str | Path) -> None:
    """Copy every checkpoint tensor into `model` (casting dtype); error on missing or unexpected ones."""
    cfg = model.config
    params = dict(model.named_parameters(remove_duplicate=False))
    entries = {name: (key, path) for name, key, path in iter_checkpoint(model_dir, cfg)}
    unexpected = sorted(set(entries) - set(params))
    if unexpected:
        raise ModelLoadError(f"{model_dir}: checkpoint tensors with no place in a {cfg.model_type} model: "
                             f"{_few(unexpected)}")
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    missing = sorted(set(params) - set(entries) - tied)
    if missing:
        raise ModelLoadError(f"{model_dir}: checkpoint lacks {_few(missing)}")
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (key, path) in entries.items():
        if name not in tied:  # a tied head is the embedding; keep the one copy
            by_file.setdefault(path, []).append((name, key))
    with torch.no_grad():
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name, key in items:
                    tensor, param = f.get_tensor(key), params[name]
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise ModelLoadError(f"{path.name}: {key} has shape {tuple(tensor.shape)}, config.json "
                                             f"implies {tuple(param.shape)}")
                    param.copy_(tensor.to(device=param.device, dtype=param.dtype))


def _few(names: list[str]) -> str:
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> CausalLM:
    """Read config.json and the safetensors weights of `model_dir` into a ready, eval-mode model."""
    model = build_model(load_config(model_dir), device=device, dtype=dtype)
    load_weights(model, model_dir)
    return model
