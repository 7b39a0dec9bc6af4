"""The tiny random model `disagg serve --local` runs when no --model is given, written once per cache."""

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
    """The cached tiny random llama; written on first use (atomically, so concurrent callers agree)."""
    from ..models.testing import write_random_model

    target = cache_root(cache_dir) / "models" / TINY_MODEL
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=target.parent))
    try:
        write_random_model(tmp, arch="llama", seed=0)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
