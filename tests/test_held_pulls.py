"""Held pulls (server/held_pulls.py): a pull that finds nothing waits for a push to its key instead of
returning empty, and the pollers (SuperNode loop, ServerApp grid) keep their interval from the start of
one pull to the start of the next, so against a holding SuperLink they ask again at once.

The event-loop tests drive HeldPulls the way Flower's protobuf route does: the handler runs (here in the
test's thread), and an awaitable it returns is awaited on the event loop. `run_sync` runs the re-query
inline (Flower's route hands it to Starlette's thread pool)."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from server.held_pulls import patch_superlink
from shared_models.held_pulls import HeldPulls, flower_supports_holding

EMPTY, MESSAGE = (), ("message",)


async def _inline(fn):
    return fn()


def _pulls(max_held: int = 8) -> HeldPulls:
    return HeldPulls(max_held=max_held, run_sync=_inline)


def _flower(*answers):
    """A stand-in for Flower's handler: its answers in turn (the last repeats), and how often it was asked."""
    calls = []

    def query():
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1]
    return query, calls


def _empty(result) -> bool:
    return len(result) == 0


def test_a_pull_that_finds_a_message_is_answered_at_once():
    pulls = _pulls()
    query, calls = _flower(MESSAGE)
    assert pulls.pull(("node", 7), query, _empty, hold=2.0) == MESSAGE
    assert calls == [1] and pulls.held() == 0


def test_an_empty_pull_waits_for_a_push_to_its_node_and_asks_flower_again():
    pulls = _pulls()
    query, calls = _flower(EMPTY, MESSAGE)

    async def scenario():
        waiting = pulls.pull(("node", 7), query, _empty, hold=30.0)
        assert inspect.isawaitable(waiting) and pulls.held() == 1
        loop = asyncio.get_running_loop()
        loop.call_soon(pulls.notify, [("node", 8)])     # another node's message: not woken by it
        loop.call_soon(pulls.notify, [("node", 7)])
        return await asyncio.wait_for(waiting, 10.0)

    assert asyncio.run(scenario()) == MESSAGE
    assert len(calls) == 2 and pulls.held() == 0


def test_a_push_landing_between_the_first_query_and_the_wait_is_not_lost():
    pulls = _pulls()
    answers = iter([EMPTY, MESSAGE])

    def query():
        result = next(answers)
        if result == EMPTY:     # the ServerApp's push lands right after Flower read "nothing" from its state
            pulls.notify([("node", 7)])
        return result

    async def scenario():
        return await asyncio.wait_for(pulls.pull(("node", 7), query, _empty, hold=30.0), 10.0)

    assert asyncio.run(scenario()) == MESSAGE


def test_an_empty_pull_returns_empty_after_its_hold_and_a_spurious_wake_keeps_waiting():
    pulls = _pulls()
    query, calls = _flower(EMPTY)

    async def scenario():
        waiting = pulls.pull(("run", 3), query, _empty, hold=0.2)
        asyncio.get_running_loop().call_soon(pulls.notify, [("run", 3)])   # woken, but still nothing there
        return await asyncio.wait_for(waiting, 10.0)

    assert asyncio.run(scenario()) == EMPTY
    assert len(calls) == 2 and pulls.held() == 0


def test_holding_off_or_full_answers_at_once_as_flower_does():
    pulls = _pulls(max_held=1)
    query, _ = _flower(EMPTY)
    assert pulls.pull(("node", 1), query, _empty, hold=0.0) == EMPTY      # --hold 0: Flower's own polling

    async def scenario():
        first = pulls.pull(("node", 1), query, _empty, hold=0.2)
        assert inspect.isawaitable(first)
        assert pulls.pull(("node", 2), query, _empty, hold=30.0) == EMPTY   # over max_held: not held
        return await asyncio.wait_for(first, 10.0)

    assert asyncio.run(scenario()) == EMPTY
    assert pulls.held() == 0


def test_a_message_wakes_its_puller_once_its_last_object_is_uploaded(monkeypatch):
    """A pushed message wakes its destination's pull only when every object it still needed is stored
    (each stored object wakes the pulls waiting on it at once); a message with nothing left to upload
    wakes it at once. Two messages sharing their model object complete together."""
    pulls = _pulls()
    woken: list[list] = []
    monkeypatch.setattr(pulls, "notify", lambda keys: woken.append(list(keys)))
    pulls.message_stored(("node", 1), [])
    assert woken == [[("node", 1)]]
    pulls.message_stored(("node", 2), {"msg-2", "model"})
    pulls.message_stored(("node", 3), {"msg-3", "model"})
    pulls.object_stored("msg-2")
    pulls.object_stored("msg-3")
    assert woken[1:] == [[("object", "msg-2")], [("object", "msg-3")]]
    pulls.object_stored("model")
    assert woken[-1] == [("object", "model"), ("node", 2), ("node", 3)]
    pulls.object_stored("model")                                   # nothing left waiting for it
    assert woken[-1] == [("object", "model")]


def test_an_error_from_flower_is_raised_and_leaves_no_waiter():
    pulls = _pulls()

    def query():
        raise RuntimeError("run not running")

    with pytest.raises(RuntimeError, match="run not running"):
        pulls.pull(("node", 1), query, _empty, hold=2.0)
    assert pulls.held() == 0


def test_this_flower_superlink_can_be_patched(monkeypatch):
    """The installed Flower has what the launcher relies on: routes that await a handler's awaitable and
    the four handlers per API; after patching, a pull finding a message still returns Flower's answer."""
    from flwr.superlink.servicer.fleet import fleet_handlers as fleet
    from flwr.superlink.servicer.runtime import runtime_handlers as runtime

    assert flower_supports_holding()
    for module in (fleet, runtime):
        for name in ("pull_messages", "push_messages", "pull_object", "push_object"):
            monkeypatch.setattr(module, name, getattr(module, name))   # restored after the test
    from flwr.proto.fleet_pb2 import PullMessagesResponse, PushMessagesResponse  # pylint: disable=no-name-in-module
    from flwr.proto.message_pb2 import Message as MessageProto  # pylint: disable=no-name-in-module

    originals = {name: getattr(fleet, name) for name in ("pull_messages", "push_messages")}
    pushed = []
    answer = PullMessagesResponse(messages_list=[MessageProto()])
    stored = PushMessagesResponse(objects_to_push=[])
    monkeypatch.setattr(fleet, "push_messages", lambda request, state: pushed.append(request) or stored)
    monkeypatch.setattr(fleet, "pull_messages", lambda request, state, store: answer)
    pulls = patch_superlink(hold=2.0, reply_hold=1.0, pulls=_pulls())
    assert pulls is not None and fleet.pull_messages is not originals["pull_messages"]

    class Node:
        node_id = 5

    class Request:
        node = Node()
        messages_list: list = []
        message_object_trees: list = []

    assert fleet.pull_messages(request=Request(), state=None, store=None) is answer
    assert fleet.push_messages(request=Request(), state=None) is stored and len(pushed) == 1


def test_servers_grid_waits_its_interval_from_the_start_of_a_pull(monkeypatch):
    """PollingGrid after an empty pull: the rest of its interval, none after a held pull, never past the
    deadline."""
    from server import transport

    now = [100.0]
    monkeypatch.setattr(transport.time, "monotonic", lambda: now[0])
    grid = transport.PollingGrid.__new__(transport.PollingGrid)
    grid.interval = 0.1
    now[0] = 100.02
    assert grid.pause(100.0, None) == pytest.approx(0.08)   # a pull answered in 20 ms
    now[0] = 101.0
    assert grid.pause(100.0, None) == 0.0                   # a pull the SuperLink held for 1 s
    now[0] = 100.02
    assert grid.pause(100.0, 100.05) == pytest.approx(0.03)


def test_supernode_idle_poll_counts_from_the_start_of_the_empty_pull(supernode_clock):
    """The SuperNode's idle sleep is the idle interval minus the time the empty pull took: a pull the
    SuperLink held for 2 s is followed by the next at once, a quick one by the rest of the 0.5 s."""
    from client.runtime import supernode

    now, slept = supernode_clock
    clock = supernode._PollClock(idle=0.5, reply=0.05, clock=lambda: now[0])
    now[0] += 0.02                      # an empty pull answered in 20 ms
    clock.sleep(3)
    now[0] += 2.0                       # an empty pull held 2 s by the SuperLink
    clock.sleep(3)
    clock.sleep(0.5)                    # a message is being handled: the reply poll, unchanged
    now[0] += 0.1                       # reply pushed, then an empty pull
    clock.sleep(3)
    assert slept == [pytest.approx(0.48), 0.0, 0.05, pytest.approx(0.4)]


def test_supernode_task_request_waits_for_the_next_task(monkeypatch):
    """The warm executor's AcquireTask at the SuperNode: with no task pending it is answered when the
    SuperNode creates one (the message was taken), not empty at once; with one pending, at once."""
    from flwr.proto.runtime_pb2 import AcquireTaskResponse  # pylint: disable=no-name-in-module
    from flwr.proto.task_pb2 import Task  # pylint: disable=no-name-in-module
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
    from flwr.supernode.servicer.runtime import runtime_handlers as runtime

    from client.runtime import supernode

    pending: list[int] = []
    monkeypatch.setattr(runtime, "acquire_task", lambda request, state: AcquireTaskResponse(
        task=Task(task_id=pending[0]), token="t") if pending else AcquireTaskResponse())
    monkeypatch.setattr(InMemoryNodeState, "create_task", lambda self, task_id: pending.append(task_id) or task_id)
    assert supernode.patch_task_hold(hold=30.0, pulls=_pulls()) is not None

    async def scenario():
        waiting = runtime.acquire_task(None, None)
        assert inspect.isawaitable(waiting)
        asyncio.get_running_loop().call_soon(InMemoryNodeState.create_task, object(), 7)   # a message was pulled
        return await asyncio.wait_for(waiting, 10.0)

    assert asyncio.run(scenario()).task.task_id == 7
    assert runtime.acquire_task(None, None).task.task_id == 7                             # pending: at once


def test_a_stopped_runs_late_reply_does_not_take_the_next_messages_place(monkeypatch, serverapp_identity):
    """A message whose run stopped while the node took it stays in the SuperNode's state with a task the
    executor runs; its (late) reply was pushed in the next message's place, and the loop went on to pull
    without pushing that message's reply (the coordinator waited for it until its timeout). Flower's own
    push and in-memory state here; only the SuperLink (`send`) and the incoming messages are made up."""
    import threading

    from flwr.app import Message, RecordDict
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supernode import start_client_internal as loop
    from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState

    from client.runtime import supernode

    store = ObjectStoreFactory().store()
    state = InMemoryNodeState(store)

    def stored(kind: str) -> Message:   # a message the node took from the SuperLink
        message = Message(RecordDict(), dst_node_id=5, message_type=kind)
        loop._insert_message(message, state, store)
        return message

    def answer(message: Message) -> None:   # the executor's task pushes its reply to the SuperNode
        loop._insert_message(Message(RecordDict(), reply_to=message), state, store)

    stopped = stored("train")            # its run stopped while the node took it: Flower returned "nothing taken"
    answer(stopped)                      # … and the executor ran its task anyway
    new = stored("query")                # the next run's message

    def pull(**kwargs):   # Flower's pull, cut short: the message is already stored; what matters is `receive`
        got = kwargs["receive"]()
        return got[0].metadata.run_id if got else None

    monkeypatch.setattr(loop, "_pull_and_store_message", pull)
    monkeypatch.setattr(loop, "_push_messages", loop._push_messages)   # restored after the test
    assert supernode.patch_one_reply_per_message() is not None
    assert loop._pull_and_store_message(receive=lambda: (new, None)) == new.metadata.run_id

    sent: list[str] = []

    def send(message, object_tree, runtime):
        sent.append(message.metadata.reply_to_message_id)
        return set(), "session"

    threading.Timer(0.3, answer, args=(new,)).start()   # the new message's reply comes after the stale one
    loop._push_messages(state=state, object_store=store, send=send, push_object=lambda *args: None)
    assert sent == [stopped.metadata.message_id, new.metadata.message_id]
    assert state.msg_store == {}
