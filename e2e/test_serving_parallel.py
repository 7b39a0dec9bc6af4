"""Multi-rank instances in the serving path on CPU (gloo, one process per rank): router -> tp x pp prefill ranks
-> KV resharded rank to rank -> tp x pp decode ranks. Greedy tokens equal one single-process engine's."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.models.testing import write_random_model
from disagg_runtime.serve.local import LocalCluster

from .conftest import complete

pytest.importorskip("deepspeed")

# (prefill tp, prefill pp, decode tp, decode pp): the four shapes the issue names.
CASES = {
    "prefill-tp2-to-decode-tp1": (2, 1, 1, 1),
    "prefill-tp1-to-decode-tp2": (1, 1, 2, 1),
    "prefill-pp2-to-decode-pp1": (1, 2, 1, 1),
    "decode-tp2-pp2": (1, 1, 2, 2),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("parallel")
    # 4 layers so pp=2 stages hold 2 each; Llama with GQA (4 heads, 2 KV heads), OPT with 4 heads.
    return {"llama": write_random_model(root / "llama", arch="llama", seed=5, num_hidden_layers=4),
            "opt": write_random_model(root / "opt", arch="opt", seed=6, num_hidden_layers=4)}


def _prompts(n: int) -> list[list[int]]:
    return [[3 + (11 * i + 17 * j) % 500 for j in range(3 + (i * 29) % 60)] for i in range(n)]


def _role_args(shape: tuple[int, int, int, int]) -> dict[str, list[str]]:
    ptp, ppp, dtp, dpp = shape
    return {"prefill": ["--tp", str(ptp), "--pp", str(ppp)], "decode": ["--tp", str(dtp), "--pp", str(dpp)]}


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("case", list(CASES))
async def test_16_concurrent_greedy_requests_equal_one_engine(models, arch, case):
    model_dir = models[arch]
    prompts = _prompts(16)
    want = Engine.load(model_dir, device="cpu", num_blocks=256).generate(
        [GenerationRequest(f"r{i}", p, SamplingParams(max_tokens=16)) for i, p in enumerate(prompts)])
    cluster = LocalCluster(model_dir=model_dir, port=0, startup_timeout_s=240,
                           worker_args=["--device", "cpu", "--num-kv-blocks", "256", "--prefill-token-budget", "256"],
                           role_args=_role_args(CASES[case]))
    with cluster:
        async with aiohttp.ClientSession() as s:
            got = await asyncio.wait_for(
                asyncio.gather(*(complete(s, cluster.url, p, stream=i % 2 == 0) for i, p in enumerate(prompts))), 240)
    assert got == [want[f"r{i}"] for i in range(16)]
