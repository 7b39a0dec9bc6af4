"""Models: config parsing, safetensors loading, and logits equal to HF transformers at prefill and decode."""

from __future__ import annotations

import json

import pytest
import torch
from disagg_runtime.engine.attention import AttentionContext, StepLayout, TorchAttentionBackend
from disagg_runtime.engine.kv_cache import PagedKVCache
from disagg_runtime.models import (
    ModelLoadError,
    UnsupportedModelError,
    load_config,
    load_model,
    parse_config,
)
from disagg_runtime.models.rope import inverse_frequencies
from disagg_runtime.models.testing import tiny_config, write_random_model
from disagg_runtime.tokenizer import Tokenizer, TokenizerNotFound
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def _hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


class PagedRunner:
    """Drives a bare model over a paged cache the way the engine does (blocks deliberately scattered)."""

    def __init__(self, model, block_size: int = 8, num_blocks: int = 64):
        cfg = model.config
        self.model, self.bs = model, block_size
        self.cache = PagedKVCache(num_layers=cfg.num_layers, num_blocks=num_blocks, block_size=block_size,
                                  num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, dtype=torch.float32,
                                  device=torch.device("cpu"))
        self.backend = TorchAttentionBackend()
        self.tables: list[list[int]] = []

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        # Reverse-ordered, interleaved blocks: a table that is not 0,1,2,... catches slot arithmetic errors.
        n = len(prompts)
        self.tables = [[63 - i - k * n for k in range(64 // n)] for i in range(n)]
        lens = [len(p) for p in prompts]
        layout = StepLayout(True, lens, lens, self.tables,
                            [s for t, n in zip(self.tables, lens, strict=True) for s in self.cache.slots(t, 0, n)],
                            self.bs)
        self.lens = list(lens)
        return self._run([t for p in prompts for t in p], [i for n in lens for i in range(n)], layout)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        layout = StepLayout(False, [1] * len(tokens), [n + 1 for n in self.lens], self.tables,
                            [self.cache.slots(t, n, n + 1)[0] for t, n in zip(self.tables, self.lens, strict=True)],
                            self.bs)
        out = self._run(tokens, list(self.lens), layout)
        self.lens = [n + 1 for n in self.lens]
        return out

    def _run(self, tokens, positions, layout) -> torch.Tensor:
        with torch.inference_mode():
            ctx = AttentionContext(self.backend, self.backend.build_metadata(layout, torch.device("cpu")),
                                   self.cache.layers)
            hidden = self.model(torch.tensor(tokens), torch.tensor(positions), ctx)
            return self.model.compute_logits(hidden)


@pytest.mark.parametrize("variant", ["llama", "llama3", "opt", "qwen2"])
def test_logits_match_transformers_at_prefill_and_decode(model_dirs, variant):
    model_dir = model_dirs[variant]
    ours, hf = load_model(model_dir), _hf(model_dir)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (5, 37, 90)]
    nexts = [torch.randint(3, 512, (3,), generator=gen).tolist() for _ in prompts]
    runner = PagedRunner(ours)
    packed = runner.prefill(prompts)
    decoded = [runner.decode([n[k] for n in nexts]) for k in range(3)]
    start = 0
    for i, (prompt, extra) in enumerate(zip(prompts, nexts, strict=True)):
        with torch.no_grad():
            want = hf(torch.tensor([prompt + extra])).logits[0]
        torch.testing.assert_close(packed[start:start + len(prompt)], want[: len(prompt)], atol=2e-4, rtol=1e-4)
        start += len(prompt)
        for k in range(3):
            torch.testing.assert_close(decoded[k][i], want[len(prompt) + k], atol=2e-4, rtol=1e-4)


def test_opt_with_projected_embeddings_matches_transformers(tmp_path):
    model_dir = write_random_model(tmp_path / "opt-proj", arch="opt", seed=5, word_embed_proj_dim=32)
    ours, hf = load_model(model_dir), _hf(model_dir)
    prompt = list(range(10, 40))
    logits = PagedRunner(ours).prefill([prompt])
    with torch.no_grad():
        torch.testing.assert_close(logits, hf(torch.tensor([prompt])).logits[0], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("rope", [{}, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
                                  {"rope_theta": 500000.0, "rope_scaling": LLAMA3_ROPE}])
def test_inverse_frequencies_equal_transformers(rope):
    raw = tiny_config("llama", **rope)
    ours = inverse_frequencies(parse_config(raw).rope, 16)
    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "model_type")})
    want = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_cfg).inv_freq
    torch.testing.assert_close(ours, want, atol=0, rtol=0)


def test_config_reads_family_features():
    qwen = parse_config(tiny_config("qwen2"))
    assert qwen.architecture == "llama" and qwen.qkv_bias and not qwen.o_bias
    llama3 = parse_config(tiny_config("llama", rope_scaling=LLAMA3_ROPE))
    assert llama3.rope.kind == "llama3" and llama3.rope.original_max_position == 64
    v5_style = parse_config(tiny_config("llama", rope_parameters={"rope_type": "default", "rope_theta": 1234.0}))
    assert v5_style.rope.theta == 1234.0
    mistral = parse_config(tiny_config("mistral", sliding_window=128))
    assert mistral.max_context == 128  # full attention is exact only inside the window
    opt = parse_config(tiny_config("opt"))
    assert (opt.architecture, opt.num_kv_heads, opt.tie_word_embeddings) == ("opt", 4, True)
    assert parse_config(tiny_config("llama", eos_token_id=[2, 7])).eos_token_ids == (2, 7)


@pytest.mark.parametrize("change,error,words", [
    ({"model_type": "gemma"}, UnsupportedModelError, "gemma"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, UnsupportedModelError, "yarn"),
    ({"hidden_act": "gelu"}, UnsupportedModelError, "hidden_act"),
    ({"num_hidden_layers": None}, ModelLoadError, "num_hidden_layers"),
])
def test_config_refuses_what_it_cannot_run(change, error, words):
    with pytest.raises(error, match=words):
        parse_config(tiny_config("llama", **change))


def test_sharded_checkpoint_loads_like_single_file(llama_dir, tmp_path):
    whole = load_file(str(llama_dir / "model.safetensors"))
    names = sorted(whole)
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    for f in ("config.json", "tokenizer.json"):
        (shard_dir / f).write_bytes((llama_dir / f).read_bytes())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: whole[k] for k in keys}, str(shard_dir / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in halves.items() for k in keys}}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    a, b = load_model(llama_dir), load_model(shard_dir)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


def test_loading_names_missing_unexpected_and_misshapen_tensors(llama_dir, tmp_path):
    whole = load_file(str(llama_dir / "model.safetensors"))

    def variant(name: str, tensors: dict) -> object:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes((llama_dir / "config.json").read_bytes())
        save_file(tensors, str(d / "model.safetensors"))
        return d

    missing = {k: v for k, v in whole.items() if k != "model.norm.weight"}
    with pytest.raises(ModelLoadError, match="lacks model.norm.weight"):
        load_model(variant("missing", missing))
    with pytest.raises(ModelLoadError, match="no place.*model.extra"):
        load_model(variant("extra", {**whole, "model.extra": torch.zeros(1)}))
    with pytest.raises(ModelLoadError, match=r"model.norm.weight has shape \(3,\)"):
        load_model(variant("shape", {**whole, "model.norm.weight": torch.zeros(3)}))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_config(tmp_path / "nowhere")


def test_opt_checkpoint_without_causal_lm_prefix_loads(opt_dir, tmp_path):
    whole = load_file(str(opt_dir / "model.safetensors"))
    d = tmp_path / "opt-bare"
    d.mkdir()
    (d / "config.json").write_bytes((opt_dir / "config.json").read_bytes())
    save_file({k.removeprefix("model."): v for k, v in whole.items()}, str(d / "model.safetensors"))
    a, b = load_model(opt_dir), load_model(d)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_random_model_has_a_real_tokenizer_sized_to_the_vocab(model_dirs, tmp_path):
    for name, model_dir in model_dirs.items():
        tok = Tokenizer.from_dir(model_dir)
        assert tok.vocab_size == json.loads((model_dir / "config.json").read_text())["vocab_size"], name
        ids = tok.encode("The planner measures 2048 tokens, naïvely!")
        assert ids[0] == tok.bos_token_id and tok.decode(ids) == "The planner measures 2048 tokens, naïvely!"
    big = write_random_model(tmp_path / "big-vocab", vocab_size=700, num_hidden_layers=1)
    assert Tokenizer.from_dir(big).vocab_size == 700
    with pytest.raises(TokenizerNotFound, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
