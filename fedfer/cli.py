"""The `fedfer` command. Every sub-command lives in fedfer/commands/ (one module per user: the ML
engineer's `simulate`, the IT admin's `deploy`, the privacy officer's `privacy`, …), each with an
`add_commands(subparsers)` function; this file only gathers them. Heavy imports (torch, flwr) happen
inside the command handlers, so `fedfer --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = (
    "fedfer.commands.simulate",   # simulate, data synth, train-central
    "fedfer.commands.pretrain",   # pretrain
    "fedfer.commands.models",     # models
    "fedfer.commands.results",    # evaluate, report
    "fedfer.commands.privacy",    # privacy audit | plan | attack
    "fedfer.commands.deploy",     # deploy init | add-school | evaluator | …
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedfer",
        description="Federated, differentially private facial-expression recognition for schools.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
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
