"""The one thread that owns an engine: runs commands and engine steps; the event loop never blocks on it.

The engine is not thread-safe, so every call into it (prefill, decode, export, import, release)
happens on this thread. The event loop submits commands and awaits their futures; the thread runs
all waiting commands, then one engine step, and sleeps when it has neither.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


class EngineThreadStopped(RuntimeError):
    """The engine thread has stopped (shutdown or a crash); no more work is accepted."""


class EngineThread:
    """Runs `step()` repeatedly (it returns True when it did work) and submitted commands in between."""

    def __init__(self, step: Callable[[], bool], *, name: str, idle_wait_s: float = 0.05) -> None:
        self._step = step
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]]
        self._commands = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Tell an idle thread that `step()` may have work now."""
        self._wake.set()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        """Run `fn` on the engine thread before its next step; await the returned future for the result."""
        if self._stop.is_set() or self.error is not None or not self._thread.is_alive():
            raise EngineThreadStopped(f"engine thread {self._thread.name} is not running: {self.error}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._commands.put((fn, future, loop))
        self._wake.set()
        return future

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future, loop = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine, which decides
                loop.call_soon_threadsafe(_settle, future, None, e)
            else:
                loop.call_soon_threadsafe(_settle, future, result, None)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._run_commands()
                if not self._step():
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as e:  # a crashed engine must fail loudly, not leave requests waiting forever
            log.exception("engine thread %s crashed", self._thread.name)
            self.error = e
        finally:
            self._fail_pending()

    def _fail_pending(self) -> None:
        while True:
            try:
                _, future, loop = self._commands.get_nowait()
            except queue.Empty:
                return
            err = EngineThreadStopped(f"engine thread stopped: {self.error}")
            loop.call_soon_threadsafe(_settle, future, None, err)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current step and join."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
