"""Run Flower's own `flower-superlink`, with pulls that wait for a message instead of returning empty.

Why: every node of a Flower 1.41 deployment asks the SuperLink for its next message by polling
(`PullMessages`), and so does the ServerApp for the replies. A message pushed just after a node's
poll waits there until the next one: with the schools' 0.5 s idle poll that is 0.25 s on average and
up to 0.5 s per round for the school that answers last (docs/deployment.md §5), and the ServerApp's
0.1 s reply poll adds 0.05 s more. Polling faster costs one authenticated request per interval per
school at the SuperLink, so it does not scale.

Held pulls (long polling): a pull that finds nothing is answered only when a message for the puller
arrives, or after `hold` seconds (then empty, as before). A node's message therefore leaves as soon as
the ServerApp pushed it, and an idle node makes one request per `hold` seconds (0.5 req/s at the
default 2 s, a quarter of the 0.5 s poll's). The wait costs no thread: Flower's protobuf routes await an
awaitable a handler returns (`flwr.supercore.protobuf.routing.ProtobufRoute`), so a pull that found
nothing returns a coroutine that waits on the event loop for a wake-up (shared_models/held_pulls.py).
A push (ServerApp → node, node reply → ServerApp) wakes exactly the pulls of the message's destination,
once the message's objects are all uploaded: the puller then finds message and objects together, and
the uploader is not competing with every puller asking for objects it is still sending. A pull of an
object still being uploaded waits for it likewise. Nothing a message carries changes, and a pull
returns what Flower's own handler returns: the handler is called again after each wake-up.

If the installed Flower no longer has the expected handlers or routes (another version), the launcher
logs a warning and runs the SuperLink unpatched: correct, only polling.

Usage (what `fedfer deploy` writes into the coordinator's start script):
    python -m server.held_pulls --hold 2 -- <flower-superlink arguments>
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Sequence

from shared_models.held_pulls import HeldPulls, flower_supports_holding

DEFAULT_HOLD_S = 2.0           # a node's pull that finds nothing waits up to this long
DEFAULT_REPLY_HOLD_S = 1.0     # the ServerApp's pull for replies (SuperLink-made error replies are seen this late)


def patch_superlink(hold: float = DEFAULT_HOLD_S, reply_hold: float = DEFAULT_REPLY_HOLD_S,
                    pulls: HeldPulls | None = None) -> HeldPulls | None:
    """Hold the Fleet API's and the Runtime API's PullMessages (and PullObject of an object still being
    uploaded) in this process; None (nothing changed) if Flower's handlers or routes are not the expected
    ones. The routes call these module functions by attribute at each request, so replacing them is enough."""
    try:
        from flwr.superlink.servicer.fleet import fleet_handlers as fleet
        from flwr.superlink.servicer.runtime import runtime_handlers as runtime
    except ImportError:
        return None
    names = ("pull_messages", "push_messages", "pull_object", "push_object")
    if not flower_supports_holding() or not all(callable(getattr(m, n, None)) for m in (fleet, runtime) for n in names):
        return None
    pulls = pulls or HeldPulls()
    _patch_fleet(fleet, pulls, hold, reply_hold)
    _patch_runtime(runtime, pulls, reply_hold)
    return pulls


def _patch_fleet(fleet: Any, pulls: HeldPulls, hold: float, object_hold: float) -> None:
    """The nodes' side: a node's pull waits for its next message; its reply (and each uploaded object)
    wakes the ServerApp's pull (and the pulls of that object)."""
    pull, push, pull_object, push_object = fleet.pull_messages, fleet.push_messages, fleet.pull_object, fleet.push_object

    def pull_messages(request: Any, state: Any, store: Any) -> Any:
        return pulls.pull(("node", int(request.node.node_id)), lambda: pull(request=request, state=state, store=store),
                          _no_messages, hold)

    def push_messages(request: Any, state: Any) -> Any:
        response = push(request=request, state=state)
        for message, tree in zip(request.messages_list, request.message_object_trees):
            pulls.message_stored(("run", int(message.metadata.run_id)), _tree_ids(tree) & set(response.objects_to_push))
        return response

    def held_pull_object(request: Any, state: Any) -> Any:
        return pulls.pull(("object", request.object_id), lambda: pull_object(request=request, state=state),
                          _still_uploading, object_hold)

    def notifying_push_object(request: Any, state: Any) -> Any:
        response = push_object(request=request, state=state)
        pulls.object_stored(request.object_id)
        return response

    fleet.pull_messages, fleet.push_messages = pull_messages, push_messages
    fleet.pull_object, fleet.push_object = held_pull_object, notifying_push_object


def _patch_runtime(runtime: Any, pulls: HeldPulls, hold: float) -> None:
    """The ServerApp's side: its pull waits for a reply of its run; its pushes wake the destination
    nodes' pulls (and the pulls of each object it uploads)."""
    pull, push, pull_object, push_object = (runtime.pull_messages, runtime.push_messages, runtime.pull_object,
                                            runtime.push_object)

    def pull_messages(request: Any, state: Any, task: Any) -> Any:
        return pulls.pull(("run", int(task.run_id)), lambda: pull(request, state, task), _no_messages, hold)

    def push_messages(request: Any, state: Any, task: Any) -> Any:
        response = push(request, state, task)
        missing = set(response.objects_to_push)
        for message, tree, stored in zip(request.messages_list, request.message_object_trees, response.message_ids):
            if stored:
                pulls.message_stored(("node", int(message.metadata.dst_node_id)), _tree_ids(tree) & missing)
        return response

    def held_pull_object(request: Any, state: Any, task: Any) -> Any:
        return pulls.pull(("object", request.object_id), lambda: pull_object(request, state, task), _still_uploading, hold)

    def notifying_push_object(request: Any, state: Any, task: Any) -> Any:
        response = push_object(request, state, task)
        pulls.object_stored(request.object_id)
        return response

    runtime.pull_messages, runtime.push_messages = pull_messages, push_messages
    runtime.pull_object, runtime.push_object = held_pull_object, notifying_push_object


def _tree_ids(tree: Any) -> set[str]:
    """Every object id in a message's object tree (Flower's ObjectTree proto)."""
    ids, stack = set(), [tree]
    while stack:
        node = stack.pop()
        ids.add(node.object_id)
        stack.extend(node.children)
    return ids


def _no_messages(response: Any) -> bool:
    return len(response.messages_list) == 0


def _still_uploading(response: Any) -> bool:
    """PullObject's answer for an object whose message is stored but whose content is not yet."""
    return bool(response.object_found) and not bool(response.object_available)


def main(argv: Sequence[str] | None = None) -> int:
    from logging import INFO, WARNING

    from flwr.supercore import log

    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    parser = argparse.ArgumentParser(prog="python -m server.held_pulls",
                                     description="flower-superlink whose pulls wait for a message (arguments after --)")
    parser.add_argument("--hold", type=float, default=DEFAULT_HOLD_S,
                        help="seconds a node's pull that finds nothing waits for a message (0: Flower's polling)")
    parser.add_argument("--reply-hold", type=float, default=DEFAULT_REPLY_HOLD_S,
                        help="seconds the ServerApp's pull for replies waits for one (0: Flower's polling)")
    args = parser.parse_args(ours)
    for name in ("hold", "reply_hold"):
        if not 0.0 <= getattr(args, name) <= 20.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0 and 20 seconds")
    if patch_superlink(args.hold, args.reply_hold) is not None:
        log(INFO, "[fedfer] SuperLink pulls held: nodes %.1f s, ServerApp %.1f s", args.hold, args.reply_hold)
    else:
        log(WARNING, "[fedfer] this Flower's SuperLink handlers are not the expected ones; running it unpatched")
    from flwr.superlink.cli import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]   # Flower reads its own argv
    return flower_superlink() or 0


if __name__ == "__main__":
    sys.exit(main())
