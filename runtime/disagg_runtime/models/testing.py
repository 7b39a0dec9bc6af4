"""Tiny random models on disk, in the exact HF layout, for tests, CI and benchmarks without downloads.

`write_random_model` writes config.json (loadable by transformers), model.safetensors (random weights)
and tokenizer.json (a byte-level BPE trained on a small built-in text, sized to the config's vocab).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from .base import CausalLM
from .config import parse_config
from .loader import build_model

Arch = Literal["llama", "opt", "qwen2", "mistral"]

_LLAMA_BASE: dict[str, Any] = {
    "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32",
}

DEFAULT_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **_LLAMA_BASE,
              "attention_bias": False, "mlp_bias": False},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", **_LLAMA_BASE,
                "sliding_window": None},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **_LLAMA_BASE,
              "use_sliding_window": False, "sliding_window": None, "max_window_layers": 2},
    "opt": {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 512, "hidden_size": 64,
        "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512,
        "do_layer_norm_before": True, "word_embed_proj_dim": 64, "activation_function": "relu",
        "enable_bias": True, "layer_norm_elementwise_affine": True, "dropout": 0.0, "attention_dropout": 0.0,
        "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "tie_word_embeddings": True,
        "torch_dtype": "float32",
    },
}

# Special tokens take the ids the configs above name (Llama: <unk>=0 <s>=1 </s>=2; OPT: <pad>=1 </s>=2).
_SPECIALS = {"llama": ["<unk>", "<s>", "</s>"], "opt": ["<s>", "<pad>", "</s>", "<unk>"]}

_CORPUS = """\
Disaggregated serving splits the prefill phase and the decoding phase of a large language model onto
different GPUs. Prefill processes the whole prompt at once and is limited by compute; decoding produces one
token at a time for every running request and is limited by memory bandwidth. When both phases share a GPU,
a long prompt stalls the decoding of every other request, and the time per output token suffers.
The planner measures how long each step takes, fits a small latency model, simulates arrivals with a
discrete event queue, and searches for the number of instances and the parallelism of each phase that gives
the highest goodput per GPU while meeting the time to first token and time per output token objectives.
The key value cache of each request moves from the prefill instance to the decode instance over NVLink or
the network; with the pull model the decode side fetches it only when it has free memory.
Tensor parallelism shards the attention heads and the feed forward layers across GPUs inside one instance;
pipeline parallelism splits the layers into stages. Kubernetes runs each instance as a set of pods, and the
operator renders the plan into deployments, services and a router that speaks the OpenAI protocol.
Numbers such as 0123456789, 3.14159, 2048 tokens, 128 GiB and 989 TFLOP/s appear in logs and benchmarks.
Questions? Answers! Lists: apples, oranges, pears; code: def f(x): return x * 2 if x > 0 else -x.
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun by the river.
"""


def tiny_config(arch: Arch = "llama", **overrides: Any) -> dict[str, Any]:
    """An HF config.json dict for a tiny model of `arch`, with `overrides` (HF key names) applied."""
    if arch not in DEFAULT_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(DEFAULT_CONFIGS)}")
    return {**DEFAULT_CONFIGS[arch], **overrides}


def init_random_(model: CausalLM, *, seed: int = 0) -> CausalLM:
    """Fill `model` in place with seeded random weights scaled so activations stay O(1).

    Linear weights use std 1/sqrt(fan_in), which keeps logits spread out enough that greedy
    decoding has no near-ties (float rounding differences between implementations cannot flip it).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.shape)
            if "norm" in name:
                value = (1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(shape, generator=gen)
            elif name.endswith("bias"):
                value = 0.02 * torch.randn(shape, generator=gen)
            elif len(shape) == 2 and "embed" not in name:
                value = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
            else:
                value = torch.randn(shape, generator=gen)
            param.copy_(value.to(param.dtype))
    return model


def train_tokenizer(vocab_size: int, specials: list[str], bos: str) -> HFTokenizer:
    """A byte-level BPE trained on the built-in text, padded with plain tokens to exactly `vocab_size`."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    short = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    if short < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the byte alphabet plus special tokens")
    # A vocab larger than the text supports gets filler tokens so every model output id decodes.
    tok.add_tokens([f"<extra_{i}>" for i in range(short)])
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_random_model(path: str | Path, *, arch: Arch = "llama", seed: int = 0, **shape_overrides: Any) -> Path:
    """Write a random model directory at `path` (created) and return it.

    `shape_overrides` are HF config.json keys, e.g. `num_hidden_layers=4` or
    `rope_scaling={"rope_type": "llama3", ...}`; the default shape is tiny (2 layers, hidden 64,
    4 heads, 2 KV heads, vocab 512) so CPU tests run in milliseconds per step.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    config = tiny_config(arch, **shape_overrides)
    cfg = parse_config(config, source=str(out))
    model = init_random_(build_model(cfg, dtype=torch.float32), seed=seed)
    dtype = getattr(torch, config.get("torch_dtype") or "float32")
    tensors = {name: p.detach().to(dtype).contiguous() for name, p in model.named_parameters()
               if not (cfg.tie_word_embeddings and name == "lm_head.weight")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    family = "opt" if cfg.architecture == "opt" else "llama"
    specials = _SPECIALS[family]
    bos = specials[config["bos_token_id"]]
    train_tokenizer(config["vocab_size"], specials, bos).save(str(out / "tokenizer.json"))
    return out
