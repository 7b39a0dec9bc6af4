"""Shared fixtures for runtime tests: tiny random models on disk (one per architecture variant)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from disagg_runtime.models.testing import write_random_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}

# name -> (arch, seed, config overrides)
MODEL_VARIANTS: dict[str, tuple[str, int, dict]] = {
    "llama": ("llama", 1, {}),  # GQA: 4 query heads share 2 KV heads
    "llama3": ("llama", 2, {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}),
    "opt": ("opt", 3, {}),
    "qwen2": ("qwen2", 4, {"tie_word_embeddings": True}),
}


@pytest.fixture
def file_system_sharing():
    """CPU tensors travel between processes by name: the IPC plane's CUDA code path, without a GPU."""
    import torch.multiprocessing as torch_mp

    before = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    yield
    torch_mp.set_sharing_strategy(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Every variant of MODEL_VARIANTS written once per session."""
    root = tmp_path_factory.mktemp("models")
    return {name: write_random_model(root / name, arch=arch, seed=seed, **overrides)
            for name, (arch, seed, overrides) in MODEL_VARIANTS.items()}


@pytest.fixture(scope="session")
def llama_dir(model_dirs) -> Path:
    return model_dirs["llama"]


@pytest.fixture(scope="session")
def opt_dir(model_dirs) -> Path:
    return model_dirs["opt"]
