"""Errors raised while reading a model directory."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model directory is missing files or holds weights that do not match its config.json."""


class UnsupportedModelError(ModelLoadError):
    """The config.json describes an architecture or feature this runtime does not implement."""
