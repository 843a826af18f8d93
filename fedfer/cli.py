"""The `fedfer` command. Each package owns its sub-commands in its own `cli.py`-style module with an
`add_commands(subparsers)` function; this file only gathers them. Heavy imports (torch, flwr) happen
inside the command handlers, so `fedfer --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "simulations.cli",      # simulate, data synth, train-central
    "shared_models.cli",    # models
    "server.cli",           # evaluate, report, resume
    "privacy.cli",          # privacy audit | plan | canary-audit
    "server.deploy_cli",    # deploy init | add-school | evaluator
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfer",
        description="Federated, differentially private facial-expression recognition for schools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that part is not built yet
                continue
            raise
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("fedfer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
