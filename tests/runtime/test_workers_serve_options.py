"""What a worker process is started with: flag rules, and random weights of the operator's model shape."""

from __future__ import annotations

import argparse
import json

import pytest
from disagg_planner.api import MODEL_PRESETS
from disagg_runtime.engine import Engine
from disagg_runtime.serve.model_cache import hf_overrides, model_for_spec
from disagg_runtime.serve.options import ServeError, add_serve_arguments, check_serve_arguments


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_operator_rendered_flags_parse(monkeypatch):
    monkeypatch.delenv("DISAGG_MODEL_SPEC", raising=False)
    args = parse("--role", "prefill", "--tp", "1", "--pp", "1", "--port", "8000", "--kv-channel", "nccl",
                 "--prefill-token-budget", "2048", "--model-path", "/models/x")
    check_serve_arguments(args)
    assert (args.role, args.kv_channel, args.prefill_token_budget) == ("prefill", "nccl", 2048)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ((), "either --local or --role"),
        (("--local", "--role", "router"), "either --local or --role"),
        (("--role", "decode"), "needs --model-path"),
        (("--role", "router", "--prefill-endpoints", "a:1"), "--endpoints-file"),
        (("--role", "prefill", "--model-path", "m", "--pp", "2", "--stage", "2"), "not a stage"),
    ],
)
def test_flag_rules(argv, message, monkeypatch):
    for var in ("DISAGG_MODEL_SPEC", "DISAGG_ENDPOINTS"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(ServeError, match=message):
        check_serve_arguments(parse(*argv))


def test_model_spec_gives_the_same_random_model_in_every_pod(tmp_path):
    spec = MODEL_PRESETS["tiny-llama"]
    path = tmp_path / "model.json"
    path.write_text(json.dumps(spec.to_wire()))
    first = model_for_spec(path, str(tmp_path / "pod-a"))
    second = model_for_spec(path, str(tmp_path / "pod-b"))
    a, b = Engine.load(first, num_blocks=8), Engine.load(second, num_blocks=8)
    assert a.model_id == b.model_id  # prefill and decode pods can exchange KV
    assert (a.num_layers, a.num_kv_heads, a.head_dim, a.max_context) == (2, 2, 16, 512)
    assert model_for_spec(path, str(tmp_path / "pod-a")) == first  # written once per cache


def test_opt_shapes_map_to_opt_config_keys():
    arch, keys = hf_overrides(MODEL_PRESETS["opt-13b"])
    assert arch == "opt" and keys["ffn_dim"] == 20480 and keys["word_embed_proj_dim"] == 5120
    assert keys["torch_dtype"] == "float16" and keys["max_position_embeddings"] == 2048
