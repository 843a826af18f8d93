"""A Flower `Grid` that waits for replies with a short poll instead of Flower's fixed 3 s.

Why: in deployment the ServerApp talks to the SuperLink through `flwr.superlink.grid.HttpGrid`,
whose `send_and_receive` checks for replies every 3 s (hard-coded). A round that needs two
exchanges (train at the schools, then the evaluation node) therefore loses 0–3 s twice, on top of
the SuperNodes' own polling. Strategies (`FedAvg.start`) only call `grid.send_and_receive`, so
wrapping the grid is enough:

    grid = PollingGrid(grid)          # in the ServerApp's main(), before strategy.start(grid=grid, …)

Constructing it also shortens Flower's retry backoff for not-yet-stored reply objects in this
process (shared_models/wire.py:shorten_object_pull_backoff). Everything else is delegated to the
wrapped grid unchanged; the loop below is Flower's own
`send_and_receive` (push, then pull until every message has a reply or the timeout passes) with
`interval` instead of 3 s. In simulation (`InMemoryGrid`, already a short poll) it changes nothing
but the interval.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from shared_models.wire import (
    ARRAYS, LAYOUT_RECORD, LEDGER_ANCHOR_RECORD, bundle, is_bundled, pack, shorten_object_pull_backoff, unpack_reply, with_arrays,
)

DEFAULT_INTERVAL_S = 0.1


class DelegatingGrid(Grid):
    """A Grid that passes every call to the grid it wraps; subclasses change `send_and_receive`."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        self._grid.set_run(run)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self._grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self._grid.get_node_ids()

    def get_nodes(self):  # type: ignore[no-untyped-def]
        return self._grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def __getattr__(self, name: str):  # anything a newer Grid adds (close, …)
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class PollingGrid(DelegatingGrid):
    """`send_and_receive` polls every `interval` seconds."""

    on_replies: Callable[[list[Message]], None] | None = None

    def __init__(self, grid: Grid, interval: float = DEFAULT_INTERVAL_S,
                 on_replies: Callable[[list[Message]], None] | None = None) -> None:
        if not 0.01 <= interval <= 10:
            raise ValueError(f"PollingGrid: interval must be between 0.01 and 10 s, got {interval}")
        super().__init__(grid)
        self.interval = interval
        # told about each batch of replies as it arrives (the strategy validates them while it waits for the rest)
        self.on_replies = on_replies
        # Replies' objects often arrive just after the reply itself; Flower would back off 1 s, 2 s …
        shorten_object_pull_backoff()

    # -- the one change -----------------------------------------------------------------------
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages`, then pull replies every `interval` s until all arrived or `timeout` passed."""
        # Flower's HttpGrid returns None for a message the SuperLink did not take; no reply will come for it
        pending = {mid for mid in self.push_messages(messages) if mid}
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending:
            asked = time.monotonic()
            got = list(self.pull_messages(pending))
            replies.extend(got)
            if got and self.on_replies is not None:
                self.on_replies(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.pause(asked, deadline))
        return replies

    def pause(self, asked: float, deadline: float | None) -> float:
        """Seconds to wait before the next pull: `interval` from the start of the last one (a SuperLink
        that held that pull until a reply came or its hold ran out, server/held_pulls.py, is asked again
        at once), never past the deadline."""
        now = time.monotonic()
        wait = max(0.0, self.interval - (now - asked))
        return wait if deadline is None else max(0.0, min(wait, deadline - now))


class PackedGrid(DelegatingGrid):
    """`send_and_receive` packs what it sends and unpacks what comes back.

    Outgoing messages are changed in place (`message.content`), before they are pushed, so the
    Message objects the strategy made get their message ids as usual. The global model is packed
    once per exchange however many schools receive it.

    `bundled`: each message carrying the model also travels as one object (shared_models/wire.py
    `bundle`: every record in one ConfigRecord), not 7; a school answers a bundled request bundled.
    """

    def __init__(self, grid: Grid, bundled: bool = False) -> None:
        super().__init__(grid)
        self.bundled = bundled

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        packed: dict[int, tuple[ArrayRecord, ConfigRecord]] = {}
        # by the ids of the records the messages share (the model and the round's config): train messages share
        # one bundle; a record addressed to one school (LEDGER_ANCHOR_RECORD) travels beside it
        bundles: dict[tuple[int, ...], RecordDict] = {}
        for message in messages:
            content = message.content
            if ARRAYS not in content.array_records or LAYOUT_RECORD in content.config_records or is_bundled(content):
                continue
            model = content.array_records[ARRAYS]
            if id(model) not in packed:
                packed[id(model)] = pack(model)
            if not self.bundled:
                message.content = with_arrays(content, *packed[id(model)])
                continue
            shared = RecordDict({name: record for name, record in content.items() if name != LEDGER_ANCHOR_RECORD})
            key = tuple(id(record) for record in shared.values())
            if key not in bundles:
                bundles[key] = bundle(with_arrays(shared, *packed[id(model)]))
            if LEDGER_ANCHOR_RECORD in content.config_records:
                message.content = RecordDict({**bundles[key], LEDGER_ANCHOR_RECORD: content[LEDGER_ANCHOR_RECORD]})
            else:
                message.content = bundles[key]
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            unpack_reply(reply)
        return replies


def fast_grid(grid: Grid, on_replies: Callable[[list[Message]], None] | None = None) -> Grid:
    """The ServerApp's grid: the model travels packed (one array per dtype) and every message carrying it
    as one object (Flower moves every record, array and chunk as its own object, one request per hop),
    and replies are collected every 0.1 s, not Flower's fixed 3 s. `on_replies` gets each batch of
    replies, unpacked, as it arrives (the same Message objects send_and_receive returns)."""
    return PackedGrid(PollingGrid(grid, on_replies=_unpacking(on_replies) if on_replies else None), bundled=True)


def _unpacking(on_replies: Callable[[list[Message]], None]) -> Callable[[list[Message]], None]:
    def unpack_then(replies: list[Message]) -> None:
        for reply in replies:
            unpack_reply(reply)    # in place, and a no-op on a reply already unpacked (PackedGrid's pass)
        on_replies(replies)
    return unpack_then
