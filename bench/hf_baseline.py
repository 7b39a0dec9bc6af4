"""HF transformers eager baseline for the engine benchmark: a random-weight Llama and its step times.

The model is built straight on the GPU in bf16 and given random normal weights (never zeros: they run
faster than real data and hide indexing bugs); the same tensors are then written as a safetensors
checkpoint so the engine under test loads exactly these weights.
"""

from __future__ import annotations

import inspect
import json
import statistics
from pathlib import Path

import torch
from gpu_ceilings import LlamaShape, time_cuda


def llama_config_dict(shape: LlamaShape, max_positions: int = 8192) -> dict:
    """An HF config.json for a Llama-3-8B-style model of this shape (rope theta 500k, no rope scaling)."""
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": shape.hidden, "intermediate_size": shape.ffn, "num_hidden_layers": shape.num_layers,
        "num_attention_heads": shape.num_heads, "num_key_value_heads": shape.num_kv_heads,
        "vocab_size": shape.vocab, "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "initializer_range": 0.02,
    }


def build_random_hf_llama(config: dict, seed: int = 0, std: float = 0.02):
    """LlamaForCausalLM on the GPU in bf16 with random weights (norm weights random around 1)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device="cuda").manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device="cuda", dtype=torch.float32))
            else:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


def write_checkpoint(model, out_dir: Path, config: dict) -> Path:
    """config.json (`config`, as given) + model.safetensors holding exactly the HF model's tensors."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=1))
    return out_dir


def _cache_kwarg(model) -> str:
    # transformers renamed `past_key_values` to `cache` during 5.x; the device and CI pin different minors.
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def time_hf_prefill(model, tokens: int, repeats: int = 5) -> float:
    """Median seconds of one forward over a single prompt of `tokens` (last-token logits only)."""
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda")
    times = time_cuda(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1), warmup=2, repeats=repeats)
    return statistics.median(times)


@torch.no_grad()
def time_hf_decode(model, batch: int, context: int, steps: int = 10) -> float:
    """Median seconds of one decode forward (one token per sequence) over a DynamicCache of `context`.

    The cache grows by one token per timed step (context .. context + steps + warm-ups): under 3% more
    KV at context 512, noted in the results.
    """
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    kw = _cache_kwarg(model)
    ids = torch.randint(0, model.config.vocab_size, (batch, context - 1), device="cuda")
    model(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: cache})
    nxt = torch.randint(0, model.config.vocab_size, (batch, 1), device="cuda")
    times = time_cuda(lambda: model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{kw: cache}),
                      warmup=3, repeats=steps)
    return statistics.median(times)
