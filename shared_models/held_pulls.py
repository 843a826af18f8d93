"""Held pulls: a pull that finds nothing waits for a push to its key instead of returning empty.

The mechanism behind server/held_pulls.py (the SuperLink: nodes' and the ServerApp's pulls) and
client/runtime/supernode.py (the SuperNode: its warm executor's request for a task). It runs inside
Flower's own servers: Flower's protobuf routes (`flwr.supercore.protobuf.routing.ProtobufRoute`) await an
awaitable a handler returns, so a pull that found nothing returns a coroutine that waits on the event
loop, holding no thread; the push that stores what it waits for wakes it, and Flower's own handler is
asked again, so the answer is always Flower's.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from typing import Any, Callable, Hashable, Iterable, Sequence

DEFAULT_MAX_HELD = 4096        # waiting pulls at once; beyond it a pull returns empty at once (plain polling)
UPLOAD_FORGET_S = 600.0        # a message whose upload stalled this long no longer delays its puller's wake-up


class _Waiter:
    """One held pull: fired by a push for its key, possibly before its coroutine started waiting."""

    __slots__ = ("fired", "future", "loop")

    def __init__(self) -> None:
        self.fired = False
        self.future: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None


class HeldPulls:
    """Wake-ups by key (("node", id): a node's next message; ("run", id): replies for a ServerApp).

    `pull(key, query, empty, hold)` runs `query()` (Flower's handler, in the calling thread); if
    `empty(result)` it returns a coroutine that waits for `notify(key)` (or `hold` s) on the event loop
    and runs `query()` again in a worker thread after each wake-up. The waiter is registered *before*
    the first query, so a push landing between that query and the wait is not missed."""

    def __init__(self, max_held: int = DEFAULT_MAX_HELD,
                 run_sync: Callable[..., Any] | None = None) -> None:
        self.max_held = max_held
        self._lock = threading.Lock()
        self._waiters: dict[Hashable, set[_Waiter]] = {}
        self._run_sync = run_sync or _starlette_run_in_threadpool
        # messages whose objects are still being uploaded: (key of their puller, object ids missing, since)
        self._uploads: list[tuple[Hashable, set[str], float]] = []

    def held(self) -> int:
        with self._lock:
            return sum(len(w) for w in self._waiters.values())

    def _register(self, key: Hashable) -> _Waiter | None:
        with self._lock:
            if sum(len(w) for w in self._waiters.values()) >= self.max_held:
                return None
            waiter = _Waiter()
            self._waiters.setdefault(key, set()).add(waiter)
            return waiter

    def _unregister(self, key: Hashable, waiter: _Waiter) -> None:
        with self._lock:
            waiters = self._waiters.get(key)
            if waiters is not None:
                waiters.discard(waiter)
                if not waiters:
                    del self._waiters[key]

    def notify(self, keys: Sequence[Hashable]) -> None:
        """A message for each key was stored: wake the pulls waiting for it (from any thread)."""
        with self._lock:
            woken = [w for key in set(keys) for w in self._waiters.get(key, ())]
            for waiter in woken:
                waiter.fired = True
                if waiter.future is not None and waiter.loop is not None:
                    waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    def message_stored(self, key: Hashable, missing: Iterable[str]) -> None:
        """A message for `key` was stored with these of its objects still to be uploaded: its pulls are woken
        once the last of them is stored (`object_stored`), so the puller finds message and objects together
        instead of waiting on each object while the sender uploads, next to every other puller."""
        missing = set(missing)
        if not missing:
            self.notify([key])
            return
        now = time.monotonic()
        with self._lock:   # an upload abandoned for 10 minutes (its sender died) is forgotten
            self._uploads = [u for u in self._uploads if now - u[2] < UPLOAD_FORGET_S] + [(key, missing, now)]

    def object_stored(self, object_id: str) -> None:
        """An object's content was stored: wake its pulls, and those of every message it completed."""
        with self._lock:
            for _key, missing, _since in self._uploads:
                missing.discard(object_id)
            complete = [key for key, missing, _since in self._uploads if not missing]
            self._uploads = [u for u in self._uploads if u[1]]
        self.notify([("object", object_id), *complete])

    def pull(self, key: Hashable, query: Callable[[], Any], empty: Callable[[Any], bool], hold: float) -> Any:
        """Flower's answer now if it has a message (or holding is off / full); else a coroutine that
        returns Flower's answer once a message arrived, or the empty one after `hold` seconds."""
        waiter = self._register(key) if hold > 0 else None
        try:
            result = query()
        except BaseException:
            if waiter is not None:
                self._unregister(key, waiter)
            raise
        if waiter is None or not empty(result):
            if waiter is not None:
                self._unregister(key, waiter)
            return result
        return self._wait(key, waiter, query, empty, result, time.monotonic() + hold)

    async def _wait(self, key: Hashable, waiter: _Waiter, query: Callable[[], Any], empty: Callable[[Any], bool],
                    result: Any, deadline: float) -> Any:
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._lock:
                    waiter.loop, waiter.future = loop, loop.create_future()
                    if waiter.fired:
                        waiter.future.set_result(None)
                    waiter.fired = False
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return result
                try:
                    await asyncio.wait_for(waiter.future, remaining)
                except asyncio.TimeoutError:
                    return result
                result = await self._run_sync(query)
                if not empty(result):
                    return result
        finally:
            self._unregister(key, waiter)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


async def _starlette_run_in_threadpool(fn: Callable[[], Any]) -> Any:
    from starlette.concurrency import run_in_threadpool

    return await run_in_threadpool(fn)


# -- what a held pull needs of Flower ----------------------------------------------------------------
def flower_supports_holding() -> bool:
    """Flower's protobuf route awaits an awaitable a handler returns (what a held pull needs)."""
    try:
        from flwr.supercore.protobuf.routing import ProtobufRoute
    except ImportError:
        return False
    return "isawaitable" in inspect.getsource(ProtobufRoute)
