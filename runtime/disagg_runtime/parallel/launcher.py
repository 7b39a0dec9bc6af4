"""The rank launcher: `disagg serve --role R --tp T --pp P` starts this pod's ranks and supervises them.

Each rank is a spawned child process given the parsed flags and RANK (rendezvous through
MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE, which the operator sets for pods). A pod holding one node
segment of a larger instance sets DISAGG_FIRST_RANK and DISAGG_LOCAL_RANKS to launch only its ranks.
A pod holding one pipeline stage (`--stage k`) launches that stage's tp ranks, k*tp .. k*tp+tp-1.
Rank 0 serves HTTP and inherits stdout (its "listening" line is what --local reads); the others only log.

If a rank other than 0 exits, rank 0 notices on its next collective (within the collective timeout)
and fails its requests with an explicit error before leaving; the launcher gives it that long, then
stops every rank and exits non-zero so the pod restarts as a whole.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.process import BaseProcess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchPlan:
    """Which ranks this launcher starts, and the rendezvous they share."""

    world: int
    first_rank: int
    local_ranks: int
    master_addr: str
    master_port: int

    @classmethod
    def from_env(cls, world: int, *, tp: int = 1, stage: int | None = None,
                 env: Mapping[str, str] | None = None) -> LaunchPlan:
        """From MASTER_ADDR/MASTER_PORT/WORLD_SIZE (and --stage, or DISAGG_FIRST_RANK/DISAGG_LOCAL_RANKS).

        Without MASTER_PORT (one pod or one machine holding the whole instance) a free port is picked.
        """
        env = os.environ if env is None else env
        if stage is not None:
            first, local = stage * tp, tp
        else:
            first = int(env.get("DISAGG_FIRST_RANK", "0"))
            local = int(env.get("DISAGG_LOCAL_RANKS", str(world - first)))
        if not (0 <= first and local >= 1 and first + local <= world):
            raise ValueError(f"ranks {first}..{first + local - 1} do not fit a world of {world}")
        env_world = env.get("WORLD_SIZE")
        if env_world is not None and int(env_world) != world:
            raise ValueError(f"WORLD_SIZE={env_world} but --tp x --pp is {world}")
        if first > 0 and "MASTER_ADDR" not in env:
            raise ValueError(f"ranks {first}.. run away from rank 0: set MASTER_ADDR (and MASTER_PORT) to rank 0's "
                             "pod")
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = int(env.get("MASTER_PORT") or _free_port())
        return cls(world=world, first_rank=first, local_ranks=local, master_addr=addr, master_port=port)

    def env(self, rank: int) -> dict[str, str]:
        return {"MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port), "RANK": str(rank),
                "WORLD_SIZE": str(self.world), "LOCAL_RANK": str(rank - self.first_rank),
                "LOCAL_WORLD_SIZE": str(self.local_ranks)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target: Callable[..., int], payload: object, env: dict[str, str]) -> None:
    os.environ.update(env)
    if env["RANK"] != "0":
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - only rank 0 announces its port on stdout
    sys.exit(target(payload))


def launch(target: Callable[..., int], payload: object, plan: LaunchPlan, *, grace_s: float) -> int:
    """Start this pod's ranks of `plan`, each running `target(payload)`; supervise them.

    Returns the instance's exit code: rank 0's, or non-zero when any rank failed.
    """
    ctx = multiprocessing.get_context("spawn")
    procs: dict[int, BaseProcess] = {}

    def forward(signum: int, _frame: object) -> None:
        # SIGTERM drains rank 0 (it stops the others when done); SIGINT stops every rank now.
        targets = [procs[0]] if signum == signal.SIGTERM and 0 in procs else list(procs.values())
        for p in targets:
            if p.is_alive() and p.pid is not None:
                os.kill(p.pid, signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    saved = dict(os.environ)
    try:
        for rank in range(plan.first_rank, plan.first_rank + plan.local_ranks):
            # In the child's environment from its first instruction (CUDA and tools read it at startup).
            os.environ.update(plan.env(rank))
            proc = ctx.Process(target=_rank_main, args=(target, payload, plan.env(rank)), name=f"rank-{rank}")
            proc.start()
            procs[rank] = proc
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return _supervise(procs, grace_s)


def _supervise(procs: dict[int, BaseProcess], grace_s: float) -> int:
    try:
        while True:
            done = {r: p.exitcode for r, p in procs.items() if p.exitcode is not None}
            if not done:
                time.sleep(0.2)
                continue
            rank, code = min(done.items())
            if rank != 0 and 0 in procs:
                if code != 0:
                    log.error("rank %d exited with %s; giving rank 0 %.0fs to fail its requests", rank, code, grace_s)
                deadline = time.monotonic() + grace_s
                while procs[0].exitcode is None and time.monotonic() < deadline:
                    time.sleep(0.1)
                # A follower leaves cleanly only when rank 0 stopped it: then rank 0's code is the instance's.
                rank0 = procs[0].exitcode
                code = rank0 if code == 0 and rank0 is not None else (code or 1)
            return code if code >= 0 else 1
    finally:
        for p in procs.values():
            if p.is_alive():
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs.values():
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join()
