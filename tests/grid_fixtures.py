"""A fake Flower grid and the replies it hands back: enough of Flower's Grid for the strategy, the
transport wrappers and the pipelined evaluation to run without a SuperLink (tests only)."""

from __future__ import annotations

import time
from typing import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata
from flwr.serverapp import Grid

from shared_models.wire import is_packed, pack_content

SUPERLINK_NODE_ID = 1   # flwr.common.constant: the sender of the SuperLink's own error replies


def _state(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.standard_normal((4, 3, 3, 3)).astype(np.float32),
            "conv.bias": rng.standard_normal(4).astype(np.float32),
            "bn.num_batches_tracked": np.array(seed + 7, dtype=np.int64),
            "head.weight": rng.standard_normal((7, 4)).astype(np.float32)}


def _record(state: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in state.items()})


class FakeGrid(Grid):
    """Answers every pushed message with `answer(node_id, message)` (None: no reply)."""

    def __init__(self, node_ids: Iterable[int], answer: Callable[[int, Message], Message | None]) -> None:
        self.node_ids = list(node_ids)
        self.answer = answer
        self.sent: list[Message] = []
        self.count = 0

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return None

    def set_run(self, run) -> None:  # type: ignore[no-untyped-def]
        pass

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"msg-{self.count}"   # as Flower's grids do
            self.sent.append(message)
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.push_messages(messages)
        replies = [self.answer(m.metadata.dst_node_id, m) for m in messages]
        return [r for r in replies if r is not None]


def _delivered(message: Message) -> Message:
    """The message as the ClientApp receives it (metadata filled in), same content."""
    meta = message.metadata
    return make_message(Metadata(run_id=1, message_id=meta.message_id, src_node_id=SUPERLINK_NODE_ID,
                                 dst_node_id=meta.dst_node_id, reply_to_message_id="", group_id=meta.group_id,
                                 created_at=time.time(), ttl=3600, message_type=meta.message_type),
                        message.content)


def _reply(message: Message, content: RecordDict, src_node_id: int | None = None) -> Message:
    reply = Message(content, reply_to=_delivered(message))
    if src_node_id is not None:
        reply.metadata.__dict__["_src_node_id"] = src_node_id
    return reply


def _superlink_error(message: Message) -> Message:
    """What the SuperLink returns for a message whose destination node died (linkstate/utils.py)."""
    meta = Metadata(run_id=1, message_id="", src_node_id=SUPERLINK_NODE_ID, dst_node_id=SUPERLINK_NODE_ID,
                    reply_to_message_id=message.metadata.message_id, group_id=message.metadata.group_id,
                    created_at=time.time(), ttl=0, message_type=message.metadata.message_type)
    return make_message(meta, error=Error(code=3, reason="Error: Node Unavailable — no heartbeat"))


def _train_reply(message, state, n=1, declared=100):
    # n: the unit weight (always 1); declared: the school's public declared size, FedAvg's weight
    content = RecordDict({"arrays": _record(state),
                          "metrics": MetricRecord({"unit-weight": n, "declared-units": declared, "epsilon": 0.5}),
                          "status": ConfigRecord({"status": "ok"})})
    return _reply(message, pack_content(content) if is_packed(message.content) else content)
