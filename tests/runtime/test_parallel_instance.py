"""A pp=2 instance in lockstep, its two ranks as threads of this process (gloo over loopback): rank 0's calls
run on both stages and give one engine's tokens; a rank that stops answering fails the instance within the
collective timeout, and the stuck rank leaves too instead of waiting forever."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import torch
from disagg_runtime.engine import Engine, GenerationRequest, SamplingParams
from disagg_runtime.parallel.groups import Rendezvous, join_instance
from disagg_runtime.parallel.instance import InstanceEngine, InstanceFailed, follow
from disagg_runtime.parallel.rank_engine import load_rank_engine
from disagg_runtime.parallel.ranks import Parallelism

TIMEOUT_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _requests(tag: str) -> list[GenerationRequest]:
    return [GenerationRequest(f"{tag}{i}", [5 + i, 17, 99, 3 + 2 * i] * (i + 1), SamplingParams(max_tokens=8))
            for i in range(5)]


def test_pp2_instance_in_lockstep_then_a_hung_rank_fails_it(opt_dir):
    port = _free_port()
    hold = threading.Lock()  # the follower's engine lock: holding it freezes that rank mid-step
    exit_code: list[int] = []

    def follower() -> None:
        groups = join_instance(Rendezvous("127.0.0.1", port, 1, 2, TIMEOUT_S), Parallelism(1, 2), torch.device("cpu"))
        engine = load_rank_engine(opt_dir, groups, num_blocks=64)
        exit_code.append(follow(engine, groups, hold, None))
        groups.close()

    thread = threading.Thread(target=follower, daemon=True)
    thread.start()
    groups = join_instance(Rendezvous("127.0.0.1", port, 0, 2, TIMEOUT_S), Parallelism(1, 2), torch.device("cpu"))
    instance = InstanceEngine(load_rank_engine(opt_dir, groups, num_blocks=64), groups)
    try:
        assert instance.num_layers == 1 and instance.kv_share.layers == range(0, 1)  # stage 0 of 2 layers
        want = Engine.load(opt_dir, num_blocks=64).generate(_requests("a"))
        assert instance.generate(_requests("a")) == want

        hold.acquire()
        start = time.monotonic()
        with pytest.raises(InstanceFailed, match="instance rank failure"):
            instance.prefill(_requests("b"))
        assert time.monotonic() - start < TIMEOUT_S + 5
        assert instance.failed.is_set()
        with pytest.raises(InstanceFailed):
            instance.decode()  # a failed instance runs nothing more
        for rid in instance.request_ids:  # whatever the failed step admitted: freed locally, no collective
            assert instance.abort(rid) is True
        assert instance.request_ids == [] and instance.free_blocks == instance.total_blocks
    finally:
        if hold.locked():
            hold.release()
        thread.join(TIMEOUT_S * 4)
        groups.close()
    assert not thread.is_alive() and exit_code == [1]
