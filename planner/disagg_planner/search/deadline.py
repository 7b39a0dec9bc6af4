"""A search that always answers in bounded time: run it in a child process, kill it at the deadline.

A cooperative check cannot bound a search stuck inside one simulation; a process can be killed wherever it
is, together with the worker processes it started (they share its process group). The same mechanism
cancels a search whose answer nobody wants any more (the resource was deleted or edited meanwhile).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from ..api.plan import Plan
from ..api.profile import LatencyProfile
from ..api.spec import DisaggServingSpec
from ..errors import PlannerError, PlanningCancelled, PlanningTimeout

PlanFn = Callable[..., Plan]
Progress = Callable[[int, int], None]
DEFAULT_DEADLINE_S = 120.0
_POLL_S = 0.05


def _child(conn: Connection, plan_fn: PlanFn, spec: DisaggServingSpec, profile: LatencyProfile | None,
           kwargs: dict[str, Any], report_progress: bool) -> None:
    os.setpgrp()  # its own group: the parent kills the search and any worker processes it starts in one go
    try:
        if report_progress:
            kwargs = {**kwargs, "progress": lambda done, total: conn.send(("progress", done, total))}
        conn.send(("plan", plan_fn(spec, profile, **kwargs)))
    except PlannerError as exc:
        conn.send(("planner_error", exc))
    except BaseException as exc:  # noqa: BLE001 - a bug in the search: report it, do not hang the parent
        conn.send(("crash", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
    finally:
        conn.close()


def _kill(proc: multiprocessing.process.BaseProcess) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()  # it had not made its group yet: it has no workers either
    proc.join(5)


def plan_within(plan_fn: PlanFn, spec: DisaggServingSpec, profile: LatencyProfile | None = None, *,
                deadline_s: float = DEFAULT_DEADLINE_S, cancel: threading.Event | None = None,
                progress: Progress | None = None, **kwargs: Any) -> Plan:
    """`plan_fn(spec, profile, **kwargs)` in a child process, answered within `deadline_s` seconds.

    Raises PlanningTimeout past the deadline, PlanningCancelled once `cancel` is set (both after killing
    the search), the search's own PlannerError, or PlannerError if the search crashed. `progress` gets
    the search's (done, total) as it reports them.
    """
    if not deadline_s > 0:
        raise ValueError(f"the planning deadline must be positive, got {deadline_s}")
    # fork is cheap and safe in a single-threaded process; a threaded host (the operator) gets forkserver.
    method = "fork" if threading.active_count() == 1 else "forkserver"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["disagg_planner.search"])
    receive, send = context.Pipe(duplex=False)
    proc = context.Process(target=_child, args=(send, plan_fn, spec, profile, kwargs, progress is not None),
                           name="disagg-plan", daemon=False)  # not a daemon: it may start worker processes
    end = time.monotonic() + deadline_s
    proc.start()
    send.close()
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise PlanningCancelled("the search was cancelled: its answer is no longer needed")
            left = end - time.monotonic()
            if left <= 0:
                raise PlanningTimeout(deadline_s)
            if not receive.poll(min(_POLL_S, left)):
                if not proc.is_alive() and not receive.poll():
                    raise PlannerError(f"the planning process died (exit code {proc.exitcode}) without an answer; "
                                       "it may have run out of memory")
                continue
            try:
                message = receive.recv()
            except EOFError:
                continue  # closed without an answer: the liveness check above reports it
            kind = message[0]
            if kind == "progress":
                if progress is not None:
                    progress(message[1], message[2])
            elif kind == "plan":
                return message[1]
            elif kind == "planner_error":
                raise message[1]
            else:
                raise PlannerError(f"the planner failed unexpectedly ({message[1]}); this is a bug. "
                                   f"Traceback of the search:\n{message[2]}")
    finally:
        receive.close()
        if proc.is_alive():
            _kill(proc)
        else:
            proc.join()
