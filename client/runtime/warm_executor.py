"""A long-running ClientApp executor for a school's SuperNode: imports torch & co. once, then forks
one child per Flower message.

Why: in Flower 1.41 deployment every message (train, evaluate, query) is executed by a *fresh*
`flwr-clientapp` process. The SuperNode (`--isolation subprocess`, the default) starts a
`flower-superexec`, which polls the SuperNode's Runtime API every second and `Popen`s
`flwr-clientapp --token …` per task; that process imports torch + opacus + flwr (5–6 s here) and
exits after one message. `flwr-clientapp` itself cannot stay up: it takes one task token and exits.
The only warm pools in 1.41 (`supercore/superexec/executor/warm_executor_*`) are Kubernetes-only
and only for agentapp/model/connector tasks.

This module does what `flower-superexec` does — acquire a task from the SuperNode's Runtime API
(`--isolation process` tells the SuperNode not to start its own executor) — but instead of
exec-ing a new interpreter it `fork()`s a child of an interpreter that already imported the heavy
libraries. The child runs Flower's own `run_clientapp()` with the task token, exactly what
`flwr-clientapp` would run, and exits. So each message still gets a fresh process (no state leaks
between messages or runs, the app is imported from the FAB the server shipped), only the imports
are paid once.

fedfer's own modules (`client.app` and what a round imports) are preloaded too, from this
installation, with the SHA-256 of every source file they came from. Flower's loader re-uses
`sys.modules` entries, so a preloaded `client.app` is what a task runs: a child keeps the preloaded
modules only if the FAB it was sent (already checked file by file against this installation by
`app_check.check_fab`) holds exactly those files; otherwise — or with `--trust-shipped-app` — it
drops every fedfer module first and imports the app from the FAB, as Flower would.

Fork safety: the parent never runs torch operations (no OpenMP/intra-op thread pool exists when it
forks) and starts no threads; children clear Flower's inherited exit handlers and end with
`os._exit`, so nothing of the parent is torn down twice.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from logging import DEBUG, ERROR, INFO, WARNING
from pathlib import Path
from typing import Sequence

DEFAULT_PRELOAD = ("numpy", "torch", "torchvision", "opacus", "scipy.stats", "yaml", "PIL.Image", "cryptography")
# fedfer's own modules a message needs (the handlers, a school round, the privacy books, evaluation)
DEFAULT_PRELOAD_APP = ("client.app", "client.school_round", "privacy.ledger", "privacy.policy", "privacy.budget",
                       "privacy.accounting", "privacy.signing", "privacy.engine", "shared_models.training",
                       "shared_models.transforms", "shared_models.evaluation", "shared_models.models.hafnet",
                       "shared_models.models.sfer_mdfae", "shared_models.models.dp_layers")
DEFAULT_POLL_S = 0.2
# After a task ended the SuperNode's next message is near (the next round): ask for tasks faster for a while.
DEFAULT_BUSY_POLL_S = 0.05
DEFAULT_BUSY_WINDOW_S = 5.0

# module file (relative to the installation, POSIX) -> SHA-256 of the source the parent imported;
# set once in the parent by `preload_app` and inherited by every fork
_PRELOADED_APP: dict[str, str] = {}


def _log(level: int, msg: str, *args: object) -> None:
    from flwr.common.logger import log

    log(level, "[warm-executor] " + msg, *args)


def preload(modules: Sequence[str]) -> dict[str, float]:
    """Import `modules` (and Flower's ClientApp runtime) now; returns seconds per module."""
    took: dict[str, float] = {}
    for name in [*modules, "flwr.supernode.runtime.run_clientapp"]:
        name = name.strip()
        if not name:
            continue
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except ImportError as exc:
            _log(WARNING, "preload %s failed (%s); the ClientApp will import it per message", name, exc)
            continue
        took[name] = time.perf_counter() - start
    return took


def preload_app(modules: Sequence[str]) -> dict[str, str]:
    """Import fedfer's own `modules` from this installation; returns {file: sha256} of every fedfer
    module now loaded ({} and nothing kept if any of them fails or lives outside the installation)."""
    from client.runtime.app_check import APP_PACKAGES, installed_root, sha256_file

    try:
        for name in modules:
            importlib.import_module(name)
        root = installed_root()
        files: dict[str, str] = {}
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] not in APP_PACKAGES or name == "__main__":
                continue
            path = Path(getattr(module, "__file__", None) or "").resolve()
            if not path.is_file() or root not in path.parents:
                raise ImportError(f"{name} is not a file of the installation at {root}")
            files[path.relative_to(root).as_posix()] = sha256_file(path)
        return files
    except Exception as exc:  # noqa: BLE001 - preloading is an optimisation: without it each task imports them
        _log(WARNING, "preloading fedfer's modules failed (%s); each task imports them", exc)
        drop_app_modules()
        return {}


def drop_app_modules() -> None:
    """Forget every module of fedfer's packages, so the next import comes from the FAB (or the disk)."""
    from client.runtime.app_check import APP_PACKAGES

    for name in [m for m in sys.modules if m.split(".")[0] in APP_PACKAGES and m != "__main__"]:
        del sys.modules[name]


def _child(spec: "object", trust_shipped_app: bool = False) -> None:
    """Run one task in a forked child, exactly as `flwr-clientapp --token …` would, then _exit.
    Unless `trust_shipped_app`, the task's FAB must be the fedfer installed here (app_check.py)."""
    code = 1
    try:
        from flwr.supercore.exit import exit_handler
        from flwr.supercore.tls import validate_and_resolve_root_certificates
        from flwr.supernode.runtime import run_clientapp as runtime
        from flwr.supernode.runtime.run_clientapp import run_clientapp

        if not trust_shipped_app:   # the school runs the fedfer it installed (client/runtime/app_check.py)
            from client.runtime.app_check import guard_fab_install

            # keeps the preloaded modules only for a FAB made of exactly their files, else drops them
            guard_fab_install(runtime, preloaded=_PRELOADED_APP, drop_preloaded=drop_app_modules)
        if trust_shipped_app or not _PRELOADED_APP:
            drop_app_modules()   # the ClientApp and everything it imports come from the FAB the server shipped
        exit_handler.registered_exit_handlers.clear()  # the parent's handlers are not ours to run
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        sys.argv = ["flwr-clientapp"]  # Flower picks telemetry/exit labels from argv[0]
        run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=validate_and_resolve_root_certificates(spec.root_certificates_path, spec.insecure),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=spec.runtime_dependency_install,
        )
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - report and exit non-zero, never return into the parent's loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            if code == 0:
                _after_reply()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _after_reply() -> None:
    """Work the app left for after its reply: Flower has pushed the reply to the SuperNode by the time
    `run_clientapp` returns (client/school_round.py `run_after_reply`)."""
    run = getattr(sys.modules.get("client.school_round"), "run_after_reply", None)
    if callable(run):
        try:
            os.nice(19)   # the SuperNode is pushing the reply right now: this work must not slow it down
            run()
        except Exception:  # noqa: BLE001 - the task is done; report, never fail it
            import traceback

            traceback.print_exc()


class ForkExecutor:
    """A Flower SuperExec executor (same interface as `SubprocessExecutor`) that forks."""

    def __init__(self, trust_shipped_app: bool = False) -> None:
        self.children: dict[int, float] = {}   # pid -> start time
        self.launched = 0
        self.last_finished = -float("inf")     # monotonic time a child was last reaped
        self.trust_shipped_app = trust_shipped_app

    # -- Executor protocol -------------------------------------------------------------------
    def get_eligible_capacity(self, supported_task_types, *, insecure=False, root_certificates_path=None):
        return set(supported_task_types), set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None):
        return None

    def launch(self, spec):
        from flwr.supercore.constant import TaskType
        from flwr.supercore.superexec.executor.types import LaunchResult

        if spec.task_type != TaskType.CLIENT_APP:
            return LaunchResult.failed(f"warm executor runs ClientApp tasks only, got {spec.task_type}")
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(spec, self.trust_shipped_app)  # never returns
        self.children[pid] = time.monotonic()
        self.launched += 1
        _log(DEBUG, "task %s -> child pid %s", spec.task_id, pid)
        return LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                self.children.clear()
                return
            if pid == 0:
                return
            started = self.children.pop(pid, None)
            self.last_finished = time.monotonic()
            code = os.waitstatus_to_exitcode(status)
            if code != 0:
                _log(WARNING, "ClientApp child %s exited with %s after %.1f s", pid, code,
                     time.monotonic() - started if started else -1.0)

    def close(self) -> None:
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self.reconcile()
            time.sleep(0.05)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        self.children.clear()


class _Stop(BaseException):  # not an Exception: Flower's retry loop must not swallow it
    """Raised by SIGTERM/SIGINT wherever the loop is — also inside Flower's HTTP retry backoff,
    which can sleep for many seconds while the SuperNode is gone."""


def _stop(signum: int, _frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)   # one stop is enough: a second signal (the start script's trap
    signal.signal(signal.SIGINT, signal.SIG_IGN)    # after a signal to its whole group) must not cut the clean-up
    raise _Stop()


def _runtime_client(runtime_api_address: str, insecure: bool, root_certificates: str | None,
                    auth_secret: bytes | None):  # type: ignore[no-untyped-def]
    """Flower's Runtime API client as SuperExec builds it (version header, HMAC on AcquireTask if a
    secret is shared with the SuperNode, Flower's retrying invoker)."""
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supercore.tls import validate_and_resolve_root_certificates

    interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if auth_secret:
        interceptors.append(SuperExecAuthHttpInterceptor(master_secret=auth_secret,
                                                         protected_methods={"/flwr.proto.Runtime/AcquireTask"}))
    return RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address, insecure=insecure,
        root_certificates=validate_and_resolve_root_certificates(root_certificates, insecure),
        interceptors=interceptors, retry_invoker=make_simple_http_retry_invoker())


def _acquire_loop(client, plugin, executor: ForkExecutor, poll: float,  # type: ignore[no-untyped-def]
                  max_tasks: int | None, busy: tuple[float, float] = (DEFAULT_POLL_S, 0.0)) -> None:
    """Acquire and launch tasks until `max_tasks` were launched (runs until _Stop when None). After a
    task, ask again at once: another may already wait. For `busy[1]` seconds after a task ended, poll
    every `busy[0]` seconds (the next round's message is near), else every `poll`."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=no-name-in-module
    from flwr.supercore.constant import TaskType

    while True:
        executor.reconcile()
        asked = time.monotonic()
        try:
            res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
        except Exception as exc:  # noqa: BLE001 - the SuperNode restarting must not kill us
            _log(WARNING, "AcquireTask failed: %s", exc)
            time.sleep(1.0)
            continue
        if res.HasField("task") and res.token:
            result = plugin.launch_task(token=res.token, task=res.task)
            if result.status != "accepted":
                _log(ERROR, "task %s not launched: %s", res.task.task_id, result.message)
            if max_tasks is not None and executor.launched >= max_tasks:
                return
            continue  # another task may already wait
        recent = not executor.children and time.monotonic() - executor.last_finished < busy[1]
        # the interval counts from the start of the request: a SuperNode that held it until a task came or
        # its hold ran out (client/runtime/supernode.py patch_task_hold) is asked again at once
        time.sleep(max(0.0, (min(busy[0], poll) if recent else poll) - (time.monotonic() - asked)))


def serve(runtime_api_address: str, *, insecure: bool = True, root_certificates: str | None = None,
          auth_secret: bytes | None = None, poll: float = DEFAULT_POLL_S, max_tasks: int | None = None,
          trust_shipped_app: bool = False, busy: tuple[float, float] = (DEFAULT_BUSY_POLL_S, DEFAULT_BUSY_WINDOW_S)) -> int:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and fork one child per task.

    The loop is `flwr.supercore.superexec.run_superexec.run_superexec`'s, with our executor and a
    shorter poll (the SuperNode is on loopback; a 1 s poll alone adds ~0.5 s per message).
    """
    from flwr.supercore.superexec.plugin import AutoExecPlugin

    executor = ForkExecutor(trust_shipped_app)
    client = _runtime_client(runtime_api_address, insecure, root_certificates, auth_secret)
    plugin = AutoExecPlugin(runtime_api_address=runtime_api_address, insecure=insecure,
                            root_certificates_path=root_certificates, runtime_dependency_install=False,
                            executor=executor)
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    _log(INFO, "serving ClientApp tasks from %s (poll %.2f s, pid %s)", runtime_api_address, poll, os.getpid())
    try:
        _acquire_loop(client, plugin, executor, poll, max_tasks, busy)
    except _Stop:
        _log(INFO, "stop signal received")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # finish the clean-up below uninterrupted
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        executor.close()
        client.close()
    _log(INFO, "stopped after %d task(s)", executor.launched)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m client.runtime.warm_executor",
        description="Run a school's ClientApp tasks in forks of one warm interpreter "
                    "(start the SuperNode with --isolation process).")
    parser.add_argument("--runtime-api-address", required=True,
                        help="the SuperNode's Runtime API, host:port (its --port), normally 127.0.0.1:PORT")
    parser.add_argument("--root-certificates", default=None,
                        help="CA for a TLS Runtime API (only when the SuperNode has --ssl-certfile)")
    parser.add_argument("--superexec-auth-secret-file", default=None,
                        help="shared secret file also given to the SuperNode (HMAC on AcquireTask)")
    parser.add_argument("--preload", default=",".join(DEFAULT_PRELOAD),
                        help="comma-separated third-party modules to import once (never the app's own)")
    parser.add_argument("--preload-app", default=",".join(DEFAULT_PRELOAD_APP),
                        help="comma-separated fedfer modules to import once (kept by a task only if its FAB has "
                             "exactly their files; empty: none)")
    parser.add_argument("--poll", type=float, default=DEFAULT_POLL_S, help="seconds between AcquireTask polls")
    parser.add_argument("--busy-poll", type=float, default=DEFAULT_BUSY_POLL_S,
                        help="seconds between polls for --busy-window seconds after a task ended")
    parser.add_argument("--busy-window", type=float, default=DEFAULT_BUSY_WINDOW_S,
                        help="seconds of --busy-poll after each task (0: always --poll)")
    parser.add_argument("--trust-shipped-app", action="store_true",
                        help="run whatever ClientApp the coordinator ships (default: only the fedfer installed here)")
    parser.add_argument("--max-tasks", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    for name in ("poll", "busy_poll"):
        if not 0.01 <= getattr(args, name) <= 60:
            parser.error(f"--{name.replace('_', '-')} must be between 0.01 and 60 seconds")
    if not 0 <= args.busy_window <= 600:
        parser.error("--busy-window must be between 0 and 600 seconds")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # before torch (hence OpenMP) is preloaded and inherited by every fork: idle threads sleep rather
    # than spin (shared_models/threads.py; not imported here, the app's modules come from the FAB)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from flwr.supercore.logger import update_console_handler

    update_console_handler(timestamps=True, colored=sys.stderr.isatty())
    secret = None
    if args.superexec_auth_secret_file:
        from flwr.supercore.auth import load_superexec_auth_secret

        try:
            secret = load_superexec_auth_secret(args.superexec_auth_secret_file)
        except ValueError as exc:
            print(f"warm-executor: {exc}", file=sys.stderr)
            return 2
    took = preload([m for m in args.preload.split(",") if m])
    from shared_models.wire import shorten_object_pull_backoff

    # Children inherit this: a task is often acquired before its message's objects are stored, and they
    # pull from their own SuperNode on loopback, so retrying every 0.1 s costs next to nothing.
    shorten_object_pull_backoff(0.02, 0.1)
    _log(INFO, "preloaded %s in %.1f s", ", ".join(took), sum(took.values()))
    if not args.trust_shipped_app:   # a shipped app that may differ is never preloaded
        started = time.perf_counter()
        _PRELOADED_APP.update(preload_app([m.strip() for m in args.preload_app.split(",") if m.strip()]))
        _log(INFO, "preloaded %d fedfer modules in %.1f s", len(_PRELOADED_APP), time.perf_counter() - started)
    return serve(args.runtime_api_address, insecure=args.root_certificates is None,
                 root_certificates=args.root_certificates, auth_secret=secret, poll=args.poll,
                 max_tasks=args.max_tasks, trust_shipped_app=args.trust_shipped_app,
                 busy=(args.busy_poll, args.busy_window))


if __name__ == "__main__":
    sys.exit(main())
