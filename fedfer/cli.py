"""The `fedfer` command. Every sub-command lives in fedfer/commands/ (one module per user: the ML
engineer's `simulate`, the IT admin's `deploy`, the privacy officer's `privacy`, …), each with an
`add_commands(subparsers)` function; this file only gathers them. Heavy imports (torch, flwr) happen
inside the command handlers, so `fedfer --help` stays fast.

Errors: a problem with the user's input (an error class of fedfer's own packages — ConfigError,
CheckpointError, DeployError, ... — or an OSError on a path the user named) ends as one line
`fedfer: <what>` and exit 2. Anything else is a fedfer bug: one line `fedfer: internal error: ...` and
exit 70 (never 1, which `privacy audit` reserves for "over budget" and `privacy canary-audit` for "bound
above the claim"). `--debug` (or FEDFER_DEBUG=1) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMAND_MODULES = (
    "fedfer.commands.simulate",   # simulate, data synth, train-central
    "fedfer.commands.pretrain",   # pretrain
    "fedfer.commands.models",     # models
    "fedfer.commands.results",    # evaluate, report
    "fedfer.commands.privacy",    # privacy audit | plan | canary-audit
    "fedfer.commands.deploy",     # deploy init | add-school | evaluator | …
    "fedfer.commands.classroom",  # classroom ingest | report | scene
)
# packages whose own exception classes describe bad input (their messages name the file, key or node)
OWN_PACKAGES = ("fedfer", "shared_models", "server", "client", "privacy", "simulations")
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 70   # EX_SOFTWARE


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfer",
        description="Federated, differentially private facial-expression recognition for schools.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error instead of its one-line message")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _one_line(text: object) -> str:
    # shared_models/wording.py one_line, copied: fedfer/cli.py imports only fedfer (tests/test_architecture.py)
    return " ".join(str(text).split())


def is_user_error(exc: BaseException) -> bool:
    """True for fedfer's own error classes (ValueError/RuntimeError subclasses defined in its packages)
    and for OSErrors (a path the user named is missing, a directory, unreadable, ...)."""
    if isinstance(exc, OSError):
        return True
    module = type(exc).__module__.split(".")[0]
    return module in OWN_PACKAGES and isinstance(exc, (ValueError, RuntimeError))


def describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return _one_line(f"{exc.filename}: {exc.strerror or exc}")
    return _one_line(exc) or type(exc).__name__


def _stdout_closed() -> bool:
    """stdout is a pipe whose reading end was closed."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with `key=value` overrides wherever they stand: argparse reads one run of positionals
    only, so `fedfer simulate federation.rounds=3 --references train.lr=1.0` stopped at 'unrecognized
    arguments: train.lr=1.0'; the words after a flag are overrides like the ones before it."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        overrides = getattr(args, "overrides", None)
        if isinstance(overrides, list) and all("=" in word and not word.startswith("-") for word in extra):
            args.overrides = [*overrides, *extra]
        elif getattr(args, "usage_error", None):   # a command that reports its usage errors its own way
            sys.exit(args.usage_error(f"unrecognized arguments: {' '.join(extra)}", args))
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning (shared_models/threads.py says why); set before any
    # command loads torch, and inherited by the processes it starts (simulated nodes, SuperNodes).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse(argv)
    debug = bool(args.debug or os.environ.get("FEDFER_DEBUG"))
    if not getattr(args, "func", None):   # `fedfer` alone: what the commands are
        build_parser().print_help()
        return 2
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()   # here, so a closed pipe is caught below rather than at exit
        return code
    except BrokenPipeError as exc:
        if not _stdout_closed():   # another pipe or socket: an error like any other
            print(f"fedfer: {describe(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        # stdout's reader left (`... | head`): stop quietly, as Python's docs advise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141   # 128 + SIGPIPE, what a shell reports for a writer whose reader left
    except KeyboardInterrupt:
        print("fedfer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the one place that turns errors into one line for people
        if debug:
            raise
        if is_user_error(exc):
            print(f"fedfer: {describe(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"fedfer: internal error: {type(exc).__name__}: {describe(exc)[:300]} "
              "(rerun with `fedfer --debug ...` for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
