"""Rendezvous of one instance's ranks and the process groups they talk over, every operation under a timeout.

Rank 0 hosts a TCPStore at MASTER_ADDR:MASTER_PORT (the operator points MASTER_ADDR at rank 0's stable
hostname); every rank joins it and builds, from prefixed views of that store:
- `control`: gloo over all ranks, for rank 0's step descriptors, heartbeats and agreement votes;
- `data`: all ranks, on the device's backend (NCCL on GPUs, gloo on CPU), for pipeline activations and logits;
- the default torch.distributed world = this stage's tp ranks, which DeepSpeed AutoTP shards over
  (DeepSpeed's communication backend binds to the default world, so each stage is its own world and the
  instance-wide groups are built directly, outside it).
Every wait is bounded by the collective timeout, so a dead or hung rank surfaces as CollectiveError.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .ranks import Parallelism, RankLayout

DEFAULT_TIMEOUT_S = 10.0


class CollectiveError(RuntimeError):
    """A collective of this instance failed or timed out: a rank died, hung or fell out of step."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and as whom a rank joins its instance (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE)."""

    addr: str
    port: int
    rank: int
    world: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def from_env(cls, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Rendezvous:
        try:
            return cls(addr=os.environ["MASTER_ADDR"], port=int(os.environ["MASTER_PORT"]),
                       rank=int(os.environ["RANK"]), world=int(os.environ["WORLD_SIZE"]), timeout_s=timeout_s)
        except KeyError as e:
            raise CollectiveError(f"rank rendezvous needs {e.args[0]} in the environment (MASTER_ADDR, "
                                  "MASTER_PORT, RANK, WORLD_SIZE)") from None


def wait(work: dist.Work, timeout: dt.timedelta, what: str) -> None:
    """Wait for `work`; CollectiveError (with what was waited for) if it fails or outlives `timeout`."""
    try:
        work.wait(timeout)
    except RuntimeError as e:
        raise CollectiveError(f"{what} failed: {e}") from e


@dataclass
class InstanceGroups:
    """The groups of one rank; `close()` shuts them down."""

    layout: RankLayout
    control: dist.ProcessGroup
    data: dist.ProcessGroup
    stage: object | None  # the default world (this stage's tp ranks), None when tp == 1
    timeout: dt.timedelta
    device: torch.device
    store: dist.Store  # kept alive: the groups were built on it

    @property
    def rank(self) -> int:
        return self.layout.rank

    def broadcast(self, tensor: torch.Tensor, root: int, *, group: dist.ProcessGroup | None = None,
                  what: str = "broadcast") -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = root
        opts.rootTensor = 0
        wait((group or self.data).broadcast([tensor], opts), self.timeout, what)

    def send(self, tensor: torch.Tensor, dst: int) -> dist.Work:
        return self.data.send([tensor], dst, 0)

    def recv(self, tensor: torch.Tensor, src: int) -> None:
        wait(self.data.recv([tensor], src, 0), self.timeout, f"recv from rank {src}")

    # ---- control plane: pickled objects from rank 0, votes --------------------------------------
    def send_object(self, obj: object) -> None:
        """Rank 0: broadcast one object (a step descriptor) to every rank."""
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self.broadcast(torch.tensor([data.numel()], dtype=torch.long), 0, group=self.control,
                       what="step descriptor size")
        self.broadcast(data, 0, group=self.control, what="step descriptor")

    def recv_object(self) -> object:
        """Other ranks: the next object rank 0 broadcast (waits at most the collective timeout)."""
        size = torch.zeros(1, dtype=torch.long)
        self.broadcast(size, 0, group=self.control, what="wait for rank 0's next step")
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        self.broadcast(data, 0, group=self.control, what="step descriptor")
        return pickle.loads(data.numpy().tobytes())

    def agree(self, ok: bool) -> bool:
        """Every rank votes; True only if all voted True (a round trip: it also proves every rank is alive)."""
        flag = torch.tensor([1 if ok else 0], dtype=torch.long)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        wait(self.control.allreduce([flag], opts), self.timeout, "agreement vote")
        return bool(flag.item())

    def gather_objects(self, obj: object) -> list[object]:
        """Every rank's `obj`, in rank order (startup only: one broadcast per rank)."""
        out = []
        for root in range(self.layout.shape.world):
            mine = pickle.dumps(obj) if root == self.rank else b""
            size = torch.tensor([len(mine)], dtype=torch.long)
            self.broadcast(size, root, group=self.control, what="gather size")
            data = (torch.frombuffer(bytearray(mine), dtype=torch.uint8) if root == self.rank
                    else torch.empty(int(size.item()), dtype=torch.uint8))
            self.broadcast(data, root, group=self.control, what="gather")
            out.append(pickle.loads(data.numpy().tobytes()))
        return out

    def close(self) -> None:
        for group in (self.control, self.data):
            try:
                group.shutdown()
            except (RuntimeError, AttributeError):
                pass  # already broken, or a torch build without shutdown on gloo
        if self.stage is not None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except RuntimeError:
                pass  # a peer is gone; nothing left to tear down cleanly


def join_instance(rdzv: Rendezvous, shape: Parallelism, device: torch.device) -> InstanceGroups:
    """Join rank `rdzv.rank` of a `shape` instance; CollectiveError if the others do not come in time."""
    if rdzv.world != shape.world:
        raise CollectiveError(f"WORLD_SIZE={rdzv.world} but tp={shape.tp} x pp={shape.pp} needs {shape.world} ranks")
    layout = shape.rank(rdzv.rank)
    timeout = dt.timedelta(seconds=rdzv.timeout_s)
    # Joining waits for every rank, which may be loading its weights: allow longer than one step.
    join_timeout = dt.timedelta(seconds=max(rdzv.timeout_s, 120.0))
    try:
        store = dist.TCPStore(rdzv.addr, rdzv.port, is_master=rdzv.rank == 0, timeout=join_timeout,
                              wait_for_workers=False)
        control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rdzv.rank, shape.world, timeout)
        if device.type == "cuda":
            opts = dist.ProcessGroupNCCL.Options()
            opts._timeout = timeout
            data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rdzv.rank, shape.world, opts)
        else:
            data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rdzv.rank, shape.world, timeout)
        stage = None
        if shape.tp > 1:
            # DeepSpeed names its CPU shared-memory segments after MASTER_ADDR/PORT: one name per stage.
            os.environ["MASTER_ADDR"] = rdzv.addr
            os.environ["MASTER_PORT"] = f"{rdzv.port}-stage{layout.stage}"
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=dist.PrefixStore(f"stage{layout.stage}", store), rank=layout.tp_rank,
                                    world_size=shape.tp, timeout=timeout)
            stage = dist.group.WORLD
    except (RuntimeError, dist.DistError) as e:
        raise CollectiveError(f"rank {rdzv.rank} could not join its instance at {rdzv.addr}:{rdzv.port}: {e}") from e
    return InstanceGroups(layout=layout, control=control, data=data, stage=stage, timeout=timeout, device=device,
                          store=store)
