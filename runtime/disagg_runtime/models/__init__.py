"""Model definitions (Llama family, OPT) over the paged KV cache, and their safetensors loading."""

from .base import CausalLM
from .config import ModelConfig, RopeConfig, load_config, parse_config
from .errors import ModelLoadError, UnsupportedModelError
from .llama import LlamaForCausalLM
from .loader import build_model, checkpoint_files, load_model, load_weights
from .opt import OPTForCausalLM

__all__ = [
    "CausalLM", "LlamaForCausalLM", "ModelConfig", "ModelLoadError", "OPTForCausalLM", "RopeConfig",
    "UnsupportedModelError", "build_model", "checkpoint_files", "load_config", "load_model", "load_weights",
    "parse_config",
]
