"""Run Flower's own `flower-supernode`, with a shorter idle poll of the SuperLink.

Why: Flower 1.41's SuperNode main loop (`flwr/supernode/start_client_internal.py`) asks the
SuperLink for a message and, when there is none, sleeps a hard-coded 3 s (`time.sleep(3)`); while
a ClientApp runs it checks for the reply every 0.5 s. Each round therefore starts on average
1.5 s — and, with several schools, up to 3 s — after the server sent the round, and the reply
leaves up to 0.5 s after it is ready. There is no option for either interval.

This launcher replaces the `time` module *seen by that one module* with a proxy whose `sleep`
uses our intervals (optionally shorter still, `--busy-poll`, for `--busy-window` seconds after the
node handled a message; off by default); everything else (arguments, TLS, node authentication,
Runtime API, exit codes) is Flower's `flower_supernode()` unchanged. A faster poll costs one small
authenticated PullMessages request per interval per school on the SuperLink (0.5 s: 2 requests/s
per school).

If the installed Flower no longer has the expected loop (other version), the launcher logs a
warning and runs the SuperNode unpatched: correct, only slower.

Before anything starts, the node's files and node-config are checked (client/runtime/preflight.py; one
line naming the file or key, exit 2, no retry). The SuperNode then runs as a child of this launcher, which
retries a start the SuperLink refused (`[code: 2004]`, `supervise`) and otherwise repeats the SuperNode's
own reason for stopping as its last line.

Usage (what `fedfer deploy add-school` writes into the school's start script, after its own preflight line,
hence `--checked`):
    python -m client.runtime.supernode --idle-poll 0.5 --reply-poll 0.1 --checked -- <flower-supernode arguments>
"""

from __future__ import annotations

import argparse
import collections
import inspect
import re
import sys
import time as _time
import types
from typing import Any, Callable, Sequence

from shared_models.wire import shorten_object_pull_backoff

DEFAULT_IDLE_POLL_S = 0.5
DEFAULT_REPLY_POLL_S = 0.05   # a check of the SuperNode's own in-memory state, no request
# Right after a node handled a message the next round is seconds away (the slowest school + the
# coordinator's aggregation), so for a short window the idle poll can be faster (--busy-window). Off by
# default: every poll is an authenticated request the SuperLink serves, and with 3 schools + the
# evaluation node polling every 0.1 s the SuperLink on the shared 2-core bench machine answered the
# last school's pull and push 0.2-0.3 s later each — more than the poll saved (docs/deployment.md §5).
DEFAULT_BUSY_POLL_S = 0.1
DEFAULT_TASK_HOLD_S = 2.0     # the warm executor's AcquireTask waits this long for a task (0: answered at once)
TASKS_KEY = ("tasks",)
DEFAULT_BUSY_WINDOW_S = 0.0
FLOWER_IDLE_SLEEP_S = 3      # the constants in flwr 1.41 start_client_internal.py
FLOWER_REPLY_SLEEP_S = 0.5


class _PollClock(types.ModuleType):
    """The `time` module, except that the SuperNode loop's poll sleeps are shortened.

    The idle sleep is `busy` (not `idle`) for `window` seconds after the node last handled a message:
    the loop sleeps for a reply (or a reply's objects) only while a message is being handled, and a
    long gap between two idle sleeps also means a message was pulled and answered in between.

    The idle interval is kept from the start of one pull to the start of the next: the sleep is the
    interval minus the time the empty pull itself took. Against a SuperLink that holds an empty pull
    until a message arrives (server/held_pulls.py) the node thus asks again at once — it is always
    listening, at one request per hold — and against one that answers at once it polls as before."""

    def __init__(self, idle: float, reply: float, busy: float | None = None, window: float = 0.0,
                 clock: Callable[[], float] = _time.monotonic) -> None:
        super().__init__("time")
        self._idle, self._reply = idle, reply
        self._busy = idle if busy is None else min(busy, idle)
        self._window = window
        self._clock = clock
        self._last_busy = -float("inf")
        self._idle_returned = clock()
        self._any_returned = self._idle_returned   # the last sleep of any kind: the pull started after it

    def __getattr__(self, name: str):  # everything but sleep is the real time module
        return getattr(_time, name)

    def idle_seconds(self) -> float:
        """The idle sleep due now (busy poll inside the window after the last handled message)."""
        now = self._clock()
        if now - self._idle_returned > self._idle + 1.0:   # the loop was away: it handled a message
            self._last_busy = now
        return self._busy if now - self._last_busy < self._window else self._idle

    def sleep(self, seconds: float) -> None:
        if seconds >= FLOWER_IDLE_SLEEP_S:
            pulled_for = self._clock() - self._any_returned
            _time.sleep(max(0.0, self.idle_seconds() - pulled_for))
            self._idle_returned = self._any_returned = self._clock()
            return
        if seconds >= FLOWER_REPLY_SLEEP_S:
            seconds = min(seconds, self._reply)
            self._last_busy = self._clock()
        _time.sleep(seconds)
        self._any_returned = self._clock()


def patch_poll_intervals(idle: float = DEFAULT_IDLE_POLL_S, reply: float = DEFAULT_REPLY_POLL_S,
                         busy: float | None = None, window: float = 0.0) -> bool:
    """Shorten the SuperNode loop's sleeps; False (and nothing changed) if the loop is not as expected."""
    from flwr.supernode import start_client_internal as loop

    source = inspect.getsource(loop)
    if getattr(loop, "time", None) is not _time or f"time.sleep({FLOWER_IDLE_SLEEP_S})" not in source:
        return False
    loop.time = _PollClock(idle, reply, busy, window)
    return True


def patch_task_hold(hold: float = DEFAULT_TASK_HOLD_S, pulls: Any = None) -> Any:
    """The warm executor's AcquireTask, when no task is pending, waits (up to `hold` s) until the SuperNode
    creates one (shared_models/held_pulls.py) instead of answering empty: the executor no longer polls
    its SuperNode 20 times a second around a round, and a task starts as soon as its message is taken.
    Returns the HeldPulls, or None (nothing changed) if this Flower's SuperNode is not the expected one."""
    from shared_models.held_pulls import HeldPulls, flower_supports_holding

    try:
        from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState
        from flwr.supernode.servicer.runtime import runtime_handlers as runtime
    except ImportError:
        return None
    if hold <= 0 or not flower_supports_holding() or not callable(getattr(runtime, "acquire_task", None)) \
            or not callable(getattr(InMemoryNodeState, "create_task", None)):
        return None
    pulls = pulls or HeldPulls()
    acquire, create = runtime.acquire_task, InMemoryNodeState.create_task

    def held_acquire_task(request: Any, state: Any) -> Any:
        return pulls.pull(TASKS_KEY, lambda: acquire(request, state), lambda r: not r.HasField("task"), hold)

    def notifying_create_task(self: Any, *args: Any, **kwargs: Any) -> Any:
        task_id = create(self, *args, **kwargs)
        pulls.notify([TASKS_KEY])
        return task_id

    runtime.acquire_task = held_acquire_task
    InMemoryNodeState.create_task = notifying_create_task
    return pulls


class _CurrentMessage:
    """The message the SuperNode loop took last, whose reply the loop must push before it takes another."""

    def __init__(self) -> None:
        self.message_id: str | None = None


def patch_one_reply_per_message() -> _CurrentMessage | None:
    """Flower 1.41's SuperNode takes one message, then pushes "the" reply: every reply in its state, as soon as
    there is one. A message whose run stopped while the node took it (`flwr stop`, a coordinator that ended
    or crashed) is left in the state with a task the executor still runs; its reply then sat there until the
    next message came, was pushed in that message's place (and ignored: its run is over), and the loop went
    on to pull while the new message's reply stayed behind. The coordinator waited for that reply until its
    timeout, and the node stayed one reply behind from then on (seen: a run started after a `flwr stop` hung
    at its role query). Here the push is repeated until the reply to the message just taken has gone.
    Returns the record of that message, or None (nothing changed) if this Flower's loop is not the expected one."""
    from flwr.supernode import start_client_internal as loop

    pull, push = getattr(loop, "_pull_and_store_message", None), getattr(loop, "_push_messages", None)
    if not callable(pull) or not callable(push):
        return None
    current = _CurrentMessage()

    def recording_pull(*args: Any, **kwargs: Any) -> Any:
        receive = kwargs.get("receive")
        taken: list[str] = []

        def recording_receive() -> Any:
            got = receive()
            if got is not None:
                taken.append(got[0].metadata.message_id)
            return got

        run_id = pull(*args, **{**kwargs, "receive": recording_receive}) if callable(receive) else pull(*args, **kwargs)
        current.message_id = taken[-1] if run_id is not None and taken else None
        return run_id

    def push_until_answered(*args: Any, **kwargs: Any) -> None:
        push(*args, **kwargs)
        state = kwargs.get("state")
        # Flower deletes the message a reply answers when it pushes that reply: while it is stored, it is unanswered
        while current.message_id is not None and current.message_id in getattr(state, "msg_store", {}):
            push(*args, **kwargs)

    loop._pull_and_store_message = recording_pull
    loop._push_messages = push_until_answered
    return current


def patch_second_stop_signal() -> bool:
    """Let Flower's SuperNode finish its graceful exit — deactivating itself at the SuperLink, which then counts it
    offline at once — when a second SIGTERM or SIGINT arrives meanwhile. False if this Flower has no such hook.

    Why: on the first signal Flower's handler puts back the handler that was installed before its own (the default:
    terminate) and exits, deactivating the node on the way out. A service manager that signals every process of the
    node (systemd's default KillMode=control-group, the tests' `Supervisor.stop`) reaches the SuperNode twice — once
    directly, once through the launcher's `forward` — and the second signal killed it before it deactivated: the
    SuperLink counted the stopped school online for 56 s more and the next round waited for it (measured,
    docs/deployment.md §5). Installed before Flower's, this handler is the one Flower puts back: once Flower's own is
    in place a signal reaching this one is a second signal during the exit, and is ignored (Flower's force-exit
    still ends the process within 5 s); before that, while the SuperNode starts, it does what the default does."""
    import os
    import signal

    from flwr.supernode import start_client_internal as flower

    original = getattr(flower, "register_signal_handlers", None)
    if original is None:
        return False
    registered: list[bool] = []

    def register_then_mark(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        registered.append(True)
        return result

    def after_flower_handler(signum: int, _frame: object) -> None:
        if registered:   # Flower's handler ran and put this one back: its graceful exit is under way
            return
        signal.signal(signum, signal.SIG_DFL)   # not started yet: as the default would
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, after_flower_handler)
    flower.register_signal_handlers = register_then_mark
    return True


def run_supernode(idle_poll: float, reply_poll: float, flower_args: Sequence[str],
                  busy_poll: float | None = None, busy_window: float = 0.0,
                  task_hold: float = DEFAULT_TASK_HOLD_S) -> int:
    """Flower's `flower_supernode()` in this process, with the poll patches applied."""
    from logging import INFO, WARNING

    from flwr.supercore import log
    from flwr.supercore.logger import update_console_handler

    # A school's log is read later from a file: timestamps on, colour codes only on a terminal.
    update_console_handler(timestamps=True, colored=sys.stderr.isatty())

    if not shorten_object_pull_backoff():
        log(WARNING, "[fedfer] this Flower's object pull has no backoff defaults; left unchanged")
    if patch_poll_intervals(idle_poll, reply_poll, busy_poll, busy_window):
        log(INFO, "[fedfer] SuperNode poll: idle %.2f s (%.2f s for %.0f s after a message), reply %.2f s",
            idle_poll, min(busy_poll or idle_poll, idle_poll), busy_window, reply_poll)
    else:
        log(WARNING, "[fedfer] this Flower's SuperNode loop is not the expected one; running it unpatched (3 s poll)")
    if patch_task_hold(task_hold) is not None:
        log(INFO, "[fedfer] the executor's task requests wait up to %.1f s for a task", task_hold)
    if not patch_second_stop_signal():
        log(WARNING, "[fedfer] this Flower's SuperNode has no register_signal_handlers; a second stop signal may end it "
            "before it deactivates")
    if patch_one_reply_per_message() is None:
        log(WARNING, "[fedfer] this Flower's SuperNode loop is not the expected one; a stopped run's late reply may "
            "take the next message's place")
    from flwr.supernode.cli import flower_supernode

    sys.argv = ["flower-supernode", *flower_args]  # Flower reads its own argv (and labels exits by argv[0])
    return flower_supernode() or 0


REFUSED = "[code: 2004]"   # Flower's "Failed to activate SuperNode": the SuperLink refused this node's key
QUICK_S = 30.0              # a SuperNode that stops this soon after its start failed to join
_LOG_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(\d{4}-\d\d-\d\d[ T][\d:,.]+Z?)?\s*:\s+")   # level (time):
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _LogTail:
    """Copies the SuperNode's stderr to ours, line by line, and keeps its last lines to explain an exit."""

    def __init__(self, keep: int = 200) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.refused = False

    def pump(self, source: Any, sink: Any) -> None:
        for raw in iter(source.readline, b""):
            line = raw.decode("utf-8", errors="replace")
            try:
                sink.write(line)
                sink.flush()
            except (OSError, ValueError):   # our own stderr is gone: keep reading, or the child blocks
                pass
            text = _ANSI.sub("", line).rstrip()
            self.refused = self.refused or REFUSED in text
            self.lines.append(text)

    def reason(self) -> str:
        """The SuperNode's own explanation of its exit, as one line: Flower's exit message without its generic
        help, else the last error line (or a traceback's last line), else the last line at all."""
        lines = list(self.lines)
        for i in range(len(lines) - 1, -1, -1):
            match = re.search(r"Exit Code: (\d+)$", lines[i])
            if match:
                try:
                    from flwr.supercore.exit.exit_code import EXIT_CODE_HELP
                    generic = EXIT_CODE_HELP.get(int(match.group(1)), "")
                except ImportError:
                    generic = ""
                message = []
                for line in lines[i + 1:]:
                    if not line.strip() or line.startswith("For more information"):
                        break
                    if line.strip() != generic:
                        message.append(line.strip())
                return f"Flower exit code {match.group(1)}: " + " ".join(message or [generic])
        meaningful = [line for line in lines if line.strip() and not line.startswith("For more information")]
        for line in reversed(meaningful):
            if line.startswith(("ERROR", "CRITICAL")) or re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b", line):
                return _LOG_PREFIX.sub("", line).strip()
        for line in reversed(meaningful):
            if not line.startswith(("INFO", "DEBUG")):
                return _LOG_PREFIX.sub("", line).strip()
        return _LOG_PREFIX.sub("", meaningful[-1]).strip() if meaningful else "no output"


TURNED_AWAY = ("fedfer: the SuperNode stopped on its own: the SuperLink turned its requests away (HTTP 401 in the "
               "coordinator's superlink.log): this node's key was rotated or revoked at the coordinator (`fedfer deploy "
               "status` there), or this machine's clock is minutes off; after a rotation start start.sh again (it reads "
               "the new key)")


def _refused_message(child_argv: Sequence[str], retry_for: float) -> str:
    from shared_models.start_files import option

    key = option(child_argv, "--auth-supernode-private-key")
    whose = f"the key {key}.pub" if key else "this node's key"
    return (f"fedfer: the SuperLink refused to activate this SuperNode for {retry_for:.0f} s ({REFUSED} Failed to "
            f"activate SuperNode): either {whose} is not registered there or was revoked (on the coordinator: "
            "`fedfer deploy register NAME`), or a SuperNode with this key is still connected (the same node folder "
            "started twice, or on two machines); Flower tells the node no more, the coordinator's superlink.log says "
            "'No SuperNode found with the given public key' for the first and 'could not be activated' for the second")


def supervise(child_argv: list[str], retry_for: float, retry_every: float) -> int:
    """Run the SuperNode as a child; restart it while the SuperLink refuses to activate it.

    Why: the SuperLink only activates a node that is registered or offline. A SuperNode that
    crashed (or lost its coordinator) stays 'online' there until its heartbeat lapses (Flower:
    2 x 30 s), and a restart in that window exits at once with `[code: 2004] Failed to activate
    SuperNode` (exit 1); so does one started before its key registration reached the SuperLink. Such
    a refusal within the first seconds is retried for `retry_for` seconds; a revoked key keeps failing
    and is given up on with that message. Any other failure is not retried (the same arguments fail
    the same way): the SuperNode's own reason is repeated as the last line. A SuperNode that ran and
    then stopped is not restarted here (that is the site's service manager's decision). One that stopped
    without being told to, with exit 0 or by SIGINT, was turned away by the SuperLink (Flower sends itself
    SIGINT on a 401: its key was rotated or revoked) and logged at most "terminated gracefully": that is
    said, and the exit is 1, so a service manager restarting failed nodes starts it again (with a rotated
    key, it reads the new one).

    The child's stderr (where Flower logs) passes through this process, line by line, so that the
    final line can quote it: `[code: 2004]` is blamed only when the log shows it.
    """
    import signal
    import subprocess
    import threading

    deadline = _time.monotonic() + retry_for
    current: list[subprocess.Popen] = []
    stopping: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        if stopping:   # passed on once already: Flower's handler resets itself to the default on the first signal, so a
            return     # second one (the start script's trap after a signal to its whole group) kills the SuperNode
        stopping.append(signum)   # before it deactivates, and a restart is refused ([code: 2004]) for a minute
        for child in current:
            if child.poll() is None:
                child.send_signal(signum)
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            started = _time.monotonic()
            tail = _LogTail()
            # its own process group: a signal to the start script's group reaches it only through `forward`, once
            current[:] = [subprocess.Popen(child_argv, stderr=subprocess.PIPE, process_group=0)]
            pump = threading.Thread(target=tail.pump, args=(current[0].stderr, sys.stderr), daemon=True)
            pump.start()
            try:
                code = current[0].wait()
            except SystemExit:
                try:
                    current[0].wait(timeout=20)
                except subprocess.TimeoutExpired:
                    current[0].kill()
                raise
            finally:
                pump.join(timeout=5)   # the rest of its log (a grandchild holding the pipe: not waited for)
                if not pump.is_alive():
                    current[0].stderr.close()
            if code in (0, -signal.SIGINT):   # not stopped by us (a signal to us raises above): Flower SIGINTs
                print(TURNED_AWAY, file=sys.stderr, flush=True)   # itself when the SuperLink answers 401
                return 1
            quick = _time.monotonic() - started < QUICK_S
            if not (quick and tail.refused):
                why = tail.reason() if code > 0 else f"killed by signal {-code}"
                print(f"fedfer: the SuperNode stopped (exit {code}): {why}", file=sys.stderr, flush=True)
                return code
            if _time.monotonic() + retry_every > deadline:
                print(_refused_message(child_argv, retry_for), file=sys.stderr, flush=True)
                return code
            print(f"[fedfer] the SuperLink refused to activate the SuperNode ({REFUSED}); retrying in "
                  f"{retry_every:.0f} s (a crashed node stays 'online' there for up to 60 s; a key registered "
                  "just now may not be active yet)", file=sys.stderr, flush=True)
            _time.sleep(retry_every)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def preflight(flower_args: Sequence[str]) -> int:
    """client/runtime/preflight.py on these arguments, in its own short-lived process (its node-config check
    imports the privacy engine, which this long-lived launcher should not hold): 0, or its exit code after
    its one line."""
    import subprocess

    return subprocess.call([sys.executable, "-m", "client.runtime.preflight", "--", *flower_args])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    parser = argparse.ArgumentParser(prog="python -m client.runtime.supernode",
                                     description="flower-supernode with a shorter idle poll (arguments after --)")
    parser.add_argument("--idle-poll", type=float, default=DEFAULT_IDLE_POLL_S,
                        help="seconds between PullMessages when idle (Flower: 3)")
    parser.add_argument("--reply-poll", type=float, default=DEFAULT_REPLY_POLL_S,
                        help="seconds between checks for the ClientApp's reply (Flower: 0.5)")
    parser.add_argument("--busy-poll", type=float, default=DEFAULT_BUSY_POLL_S,
                        help="idle poll for --busy-window seconds after the node handled a message (the next "
                             "round is near); never slower than --idle-poll")
    parser.add_argument("--busy-window", type=float, default=DEFAULT_BUSY_WINDOW_S,
                        help="seconds of --busy-poll after each handled message (default 0: always --idle-poll)")
    parser.add_argument("--task-hold", type=float, default=DEFAULT_TASK_HOLD_S,
                        help="seconds the warm executor's request for a task waits for one (0: Flower's polling)")
    parser.add_argument("--retry-for", type=float, default=120.0,
                        help="keep restarting a SuperNode the SuperLink refuses to activate ([code: 2004]) for this "
                             "long (0: never); any other failure is not retried")
    parser.add_argument("--retry-every", type=float, default=10.0, help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checked", action="store_true",
                        help="the start script already ran `python -m client.runtime.preflight` with these arguments")
    args = parser.parse_args(ours)
    for name in ("idle_poll", "reply_poll", "busy_poll"):
        if not 0.05 <= getattr(args, name) <= 3.0:
            parser.error(f"--{name.replace('_', '-')} must be between 0.05 and 3 seconds")
    if not 0.0 <= args.busy_window <= 600.0:
        parser.error("--busy-window must be between 0 and 600 seconds")
    if not 0.0 <= args.task_hold <= 20.0:
        parser.error("--task-hold must be between 0 and 20 seconds")
    if not (args.child or args.checked):
        code = preflight(flower_args)
        if code:
            return code
    if args.child or args.retry_for <= 0:
        if args.child:   # die with the supervising parent, even if it is SIGKILLed
            import os

            from flwr.supercore.app_utils import start_parent_process_monitor

            start_parent_process_monitor(os.getppid())
        return run_supernode(args.idle_poll, args.reply_poll, flower_args, args.busy_poll, args.busy_window,
                             args.task_hold)
    child = [sys.executable, "-m", "client.runtime.supernode", "--child", "--idle-poll", str(args.idle_poll),
             "--reply-poll", str(args.reply_poll), "--busy-poll", str(args.busy_poll),
             "--busy-window", str(args.busy_window), "--task-hold", str(args.task_hold), "--", *flower_args]
    return supervise(child, args.retry_for, args.retry_every)


if __name__ == "__main__":
    sys.exit(main())
