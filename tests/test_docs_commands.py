"""Every command the docs show still parses, without running it.

From README.md and docs/*.md — fenced code blocks and inline `code` — this collects each shell command and
checks it against the code as it is now:

- `fedfer SUB ... --flag ...`: the sub-command exists and the real argparse parser (fedfer.cli.build_parser)
  accepts the whole line; its `key=value` overrides (and `--config FILE`) pass shared_models.config.load_config.
- `python -m MODULE ...`: the module exists; its argparse parser (captured by running the module as
  __main__ with parse_args intercepted, so nothing runs) accepts the line; wrappers of Flower's tools
  (`-- <flower args>`) have those flags checked against Flower's own parser.
- `flwr SUB ...`: the sub-command exists in the installed Flower CLI and accepts the flags; its
  `-c "k=v ..."` run-config overrides name keys of pyproject's [tool.flwr.app.config] and pass the schema.
- a bare `section.key=value` or `section.key` in inline code names a real config key (value checked).
- an inline flag fragment (`--seat-map`, `add-school --budget`) is accepted by some parser the docs use.
- a `| key | default | meaning |` table row gives the defaults of shared_models/defaults.yaml.
- every repository path (benchmarks/..., configs/..., docs/..., tests/file.py::test_name, ...) and
  every relative markdown link (with its #anchor) exists.

docs/experiments.md is the lab notebook: its commands record what was run then, with options that were
later renamed or removed, so only its paths, benchmark files and `python -m` modules are checked there.

Placeholders are understood: <id>, NAME, …, [--optional flags], `a|b` alternatives (each is checked).
Run as a script to print every problem: `.venv/bin/python tests/test_docs_commands.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import io
import re
import runpy
import shlex
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "experiments.md")]
HISTORY = ROOT / "docs" / "experiments.md"

#: folders of this repository: a path starting with one of these must exist
REPO_DIRS = ("benchmarks/", "configs/", "docs/", "scripts/", "tests/", "shared_models/", "privacy/", "client/",
             "server/", "simulations/", "fedfer/", ".ci/")
SECTIONS = ("run", "federation", "model", "train", "privacy", "data", "pretrain", "evaluation", "classroom")
CONFIG_KEY = re.compile(r"^([a-z][a-z0-9_]*)\.(?!(?:py|md|json|jsonl|yaml|toml|csv|png|pt|txt|sh)\b)([a-z][a-z0-9_]*)(=.*)?$")
#: what argparse/click say when a command is only named (inline `fedfer evaluate`), not written out in full
PARTIAL = re.compile(r"the following arguments are required|expected one argument|Missing argument")
OUTPUT_FLAGS = ("--out", "--json")
PLACEHOLDER_VALUE = re.compile(r"^([A-Z][A-Z0-9_]*|X|.*….*|\.\.\.)$")
#: flags of tools that are not fedfer's and have no parser here (Ray; Flower's documented-only options)
EXTERNAL_FLAGS = {
    "--head", "--port", "--num-cpus", "--include-dashboard", "--disable-usage-stats", "--address", "--resources",
    "--temp-dir",                                                     # ray start
}


@dataclass
class Command:
    doc: str
    line: int
    text: str          # as written (continuations joined)
    inline: bool


# --------------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------------

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
COMMAND_WORDS = ("fedfer", "python", "flwr", "bash", "pytest")


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def blocks_and_inline(path: Path) -> tuple[list[Command], list[Command]]:
    """(commands from fenced blocks, inline code spans) of one markdown file."""
    text = path.read_text(encoding="utf-8")
    doc = _name(path)
    block_cmds: list[Command] = []
    for m in FENCE.finditer(text):
        first = _line_of(text, m.start(2))
        lines = m.group(2).split("\n")
        i = 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.rstrip().endswith("\\") and i + 1 < len(lines):   # shell continuation
                i += 1
                line = line.rstrip()[:-1] + " " + lines[i].strip()
            i += 1
            for part in line.split("&&"):
                if part.strip():
                    block_cmds.append(Command(doc, first + start, part.strip(), inline=False))
    prose = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    spans = [Command(doc, _line_of(prose, m.start()), m.group(1).strip(), inline=True)
             for m in INLINE.finditer(prose)]
    return block_cmds, spans


def _tokens(text: str) -> list[list[str]]:
    """Shell words of a documented command, with the docs' placeholders resolved; one list per variant
    (`a|b` alternatives). Empty if it is not a command."""
    text = text.replace("\\|", "|")
    text = re.sub(r"<[^<>]*>", "X", text)                      # <id>, <state dir>, <flower-supernode args>
    text = re.sub(r"\[(--?[^\[\]]*)\]", r"\1", text)            # [--labels FILE]: optional, still checked
    text = re.sub(r"\[[^\[\]]*\]", "", text)                    # [key=value…]
    text = text.rstrip().rstrip("&").strip()
    try:
        words = shlex.split(text, comments=True)
    except ValueError:
        return []
    out: list[str] = []
    for word in words:
        if word.startswith("(") or word == "&":                # a diagram's prose after the command; `cmd &`
            break
        if word in ("…", "..."):
            continue
        out.append("1" if re.fullmatch(r"[A-Z][A-Z_]*", word) else word)   # NAME, DIR, N: any value
    # env assignments and the venv prefix
    while out and re.match(r"^[A-Z_][A-Z0-9_]*=", out[0]):
        out.pop(0)
    if out and out[0].startswith(".venv/bin/"):
        out[0] = out[0][len(".venv/bin/"):]
    if not out:
        return []
    alternatives = [w.split("|") if "|" in w and not w.startswith("-") and "=" not in w else [w] for w in out]
    width = max(len(a) for a in alternatives)
    return [[a[min(k, len(a) - 1)] for a in alternatives] for k in range(width)]


# --------------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


@cache
def fedfer_parser() -> argparse.ArgumentParser:
    from fedfer.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


@cache
def fedfer_leaves() -> dict[str, argparse.ArgumentParser]:
    """'deploy add-school' -> its parser, for every leaf sub-command."""
    leaves: dict[str, argparse.ArgumentParser] = {}

    def walk(prefix: str, parser: argparse.ArgumentParser) -> None:
        subs = _subparsers(parser)
        if not subs:
            leaves[prefix.strip()] = parser
        for name, sub in subs.items():
            walk(f"{prefix} {name}", sub)
    walk("", fedfer_parser())
    return leaves


@cache
def module_parser(module: str) -> argparse.ArgumentParser | None:
    """The argparse parser `python -m module` builds, caught at its first parse_args (nothing runs)."""
    def catch(self, *args, **kwargs):
        raise _Captured(self)
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv
    argparse.ArgumentParser.parse_args = catch          # type: ignore[method-assign]
    argparse.ArgumentParser.parse_known_args = catch    # type: ignore[method-assign]
    sys.argv = [module]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_module(module, run_name="__main__", alter_sys=False)
    except _Captured as caught:
        return caught.parser
    except BaseException:   # noqa: BLE001 - a module that parses no arguments (or needs some to start)
        return None
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args, sys.argv = saved
    return None


@cache
def flower_parsers() -> dict[str, argparse.ArgumentParser]:
    from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
    from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

    return {"flower-supernode": _parse_args_run_supernode(), "flower-superlink": _parse_args_run_superlink()}


OWN_PACKAGES = ("fedfer", "shared_models", "server", "client", "privacy", "simulations")
#: modules that hand everything after `--` to a Flower tool
WRAPS = {"client.runtime.supernode": "flower-supernode", "client.runtime.preflight": "flower-supernode",
         "server.held_pulls": "flower-superlink"}


@cache
def flwr_cli():
    import typer
    from flwr.cli.app import app

    return typer.main.get_command(app)


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def _parse(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.Namespace | None, str | None]:
    """(namespace, None) if the parser accepts `words` ((None, None) for --help), else (None, argparse's message)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            return parser.parse_args(words), None
    except SystemExit as exc:
        if exc.code:
            return None, (err.getvalue().strip().splitlines() or [f"exit {exc.code}"])[-1]
    return None, None


# --------------------------------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------------------------------

@cache
def config_defaults() -> dict:
    from shared_models.config import defaults

    return defaults()


@cache
def flwr_run_config_keys() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    tables = data["tool"]["flwr"]["app"]["config"]
    return {f"{section}.{key}" for section, table in tables.items() for key in table}


def check_overrides(items: list[str], config: str | None = None) -> list[str]:
    """`key=value` overrides (placeholder values: key only), validated together as the command would."""
    from shared_models.config import ConfigError, load_config, parse_overrides

    problems: list[str] = []
    real: list[str] = []
    for item in items:
        key, _, value = item.partition("=")
        if key.strip() not in config_defaults():
            problems.append(f"unknown config key {key.strip()!r}")
        elif not PLACEHOLDER_VALUE.match(value.strip().strip("'\"")) and value.strip() != "X":
            real.append(item)
    if problems:
        return problems
    path = ROOT / config if config and not Path(config).is_absolute() else (Path(config) if config else None)
    if path is not None and not path.exists():
        return [f"--config {config}: no such file"]
    try:
        load_config(path, parse_overrides(real))
    except ConfigError as exc:
        return [f"config: {exc}"]
    return []


def check_run_config(pairs: dict) -> list[str]:
    from shared_models.config import ConfigError, load_config

    problems = [f"flwr -c: key {k!r} is not in pyproject's [tool.flwr.app.config]" for k in pairs
                if k not in flwr_run_config_keys()]
    if problems:
        return problems
    real = {k: v for k, v in pairs.items() if not (isinstance(v, str) and (PLACEHOLDER_VALUE.match(v) or "X" == v))}
    try:
        load_config(None, real)
    except ConfigError as exc:
        return [f"flwr -c: {exc}"]
    return []


def _flags_known_to(parser: argparse.ArgumentParser, words: list[str], what: str) -> list[str]:
    known = _option_strings(parser)
    return [f"{what} has no option {w.split('=')[0]}" for w in words
            if w.startswith("--") and w != "--" and w.split("=")[0] not in known]


def _leaf(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, list[str]]:
    """The sub-command parser `words` reach, and the words after its name."""
    while words and (subs := _subparsers(parser)) and words[0] in subs:
        parser, words = subs[words[0]], words[1:]
    return parser, words


def check_fedfer(words: list[str], inline: bool = False) -> list[str]:
    args_words = [w for w in words[1:] if w != "--debug"]
    args, message = _parse(fedfer_parser(), args_words)
    if message and inline and PARTIAL.search(message):   # `fedfer evaluate --checkpoint` named in prose
        leaf, rest = _leaf(fedfer_parser(), args_words)
        return _flags_known_to(leaf, rest, f"fedfer {leaf.prog.removeprefix('fedfer ')}")
    if message:
        return [f"fedfer rejects it: {message}"]
    leaf, rest = _leaf(fedfer_parser(), args_words)   # argparse takes `--local-epoch` for --local-epochs: docs may not
    if abbreviated := _flags_known_to(leaf, rest, f"fedfer {leaf.prog.removeprefix('fedfer ')}"):
        return abbreviated
    overrides = list(getattr(args, "overrides", None) or [])
    # `fedfer train-central --model M --preset P` sets model.name/model.preset as the command does
    # (fedfer/commands/simulate.py): validated with the rest, e.g. a clip model needs clip benchmarks
    for flag, key in (("--model", "model.name"), ("--preset", "model.preset")):
        value = words[words.index(flag) + 1] if flag in words[:-1] else ""
        if leaf.prog.endswith("train-central") and value and not PLACEHOLDER_VALUE.match(value) and len(value) > 1:
            overrides.append(f"{key}={value}")   # a placeholder (`--model M`) stays out, as for key=value
    config = words[words.index("--config") + 1] if "--config" in words else None
    if config and not config.startswith("configs/"):   # the reader's own file (`--config run.yaml`)
        config = None
    if overrides or config:
        return check_overrides(overrides, config)
    return []


def check_python_m(words: list[str], inline: bool = False) -> list[str]:
    if len(words) < 3 or words[1] != "-m":
        return []
    module = words[2]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        return [f"no module {module}"]
    rest = words[3:]
    ours, flower = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    problems: list[str] = []
    if module.split(".")[0] not in OWN_PACKAGES:   # `python -m pytest`: not ours to run as __main__
        return []
    parser = module_parser(module)
    if parser is None:
        if any(w.startswith("-") for w in ours):
            problems.append(f"python -m {module}: no argparse parser found, but the docs give it flags")
    else:
        _, message = _parse(parser, ours)
        if message and inline and PARTIAL.search(message):
            problems += _flags_known_to(parser, ours, f"python -m {module}")
        elif message:
            problems.append(f"python -m {module} rejects it: {message}")
        else:
            problems += _flags_known_to(parser, ours, f"python -m {module}")
    if flower and module in WRAPS:
        problems += _flags_known_to(flower_parsers()[WRAPS[module]], flower, WRAPS[module])
    overrides = [w for w in ours if CONFIG_KEY.match(w) and "=" in w]
    if overrides and not problems:
        problems += check_overrides(overrides)
    return problems


def check_flwr(words: list[str], inline: bool = False) -> list[str]:
    import click
    from flwr.common.config import parse_config_args

    group = flwr_cli()
    rest = words[1:]
    command = group
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        if name not in command.commands:
            return [f"flwr has no command {name!r}"]
        command = command.commands[name]
    if isinstance(command, click.Group):
        return []
    try:
        ctx = command.make_context(command.name, list(rest))
    except click.exceptions.Exit:
        return []
    except click.ClickException as exc:
        if inline and PARTIAL.search(exc.format_message()):
            known = {o for p in command.params for o in p.opts}
            return [f"flwr {command.name} has no option {w}" for w in rest if w.startswith("-") and w not in known]
        return [f"flwr {command.name} rejects it: {exc.format_message()}"]
    items = [i for i in ctx.params.get("run_config_overrides") or () if "=" in i]
    if not items:
        return []
    cleaned = [" ".join(part for part in shlex.split(item, posix=False) if "=" in part) for item in items]
    try:
        pairs = parse_config_args(cleaned)
    except Exception as exc:   # noqa: BLE001 - Flower's own parse error
        return [f"flwr -c {items}: {exc}"]
    return check_run_config(pairs)


def check_command(words: list[str], inline: bool = False) -> list[str]:
    head = words[0]
    if any(w.endswith(":") for w in words[:3]):   # a printed line (`fedfer simulate: 10 schools`, an error)
        return []
    if head == "fedfer":
        return check_fedfer(words, inline)
    if head == "python":
        return check_python_m(words, inline)
    if head == "flwr":
        return check_flwr(words, inline)
    return []


def check_key(item: str) -> list[str]:
    """A lone `section.key` or `section.key=value` in prose: the key exists, the value suits it alone."""
    from shared_models.config import ConfigError, _check_rule, _coerce

    key, sep, value = item.partition("=")
    if key not in config_defaults():
        return [f"unknown config key {key!r}"]
    if not sep or PLACEHOLDER_VALUE.match(value):
        return []
    try:
        _check_rule(key, _coerce(key, value.strip("'\""), config_defaults()[key], "docs"), "docs")
    except ConfigError as exc:
        return [str(exc)]
    return []


@cache
def known_flags() -> set[str]:
    """Every long option of every parser the docs use: fedfer's, the documented modules', Flower's."""
    flags = set(EXTERNAL_FLAGS)
    for parser in fedfer_leaves().values():
        flags |= _option_strings(parser)
    flags |= _option_strings(fedfer_parser())
    for parser in flower_parsers().values():
        flags |= _option_strings(parser)
    for module in _documented_modules():
        parser = module_parser(module) if module.split(".")[0] in OWN_PACKAGES else None
        if parser is not None:
            flags |= _option_strings(parser)

    def walk(cmd) -> None:
        for param in getattr(cmd, "params", []):
            flags.update(param.opts)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)
    walk(flwr_cli())
    return {f for f in flags if f.startswith("--")}


@cache
def _documented_modules() -> tuple[str, ...]:
    found: set[str] = set()
    for path in [*DOCS, HISTORY]:
        found |= set(re.findall(r"python -m ([A-Za-z_][\w.]*)", path.read_text(encoding="utf-8")))
    return tuple(sorted(found))


def check_fragment(words: list[str]) -> list[str]:
    """An inline piece of a command: `--seat-map`, `--workers N`, `add-school --budget`, `… --rounds 10 k=v`."""
    leaves = fedfer_leaves()
    leaf = next((name for name in leaves if name.split()[-1] == words[0]), None) if not words[0].startswith("-") else None
    if leaf is not None:
        known = _option_strings(leaves[leaf])
        return [f"fedfer {leaf} has no option {w}" for w in words[1:] if w.startswith("--") and w not in known]
    flags = [f for w in words if w.startswith("--") for f in w.split("=")[0].split("/") if f]
    unknown = [f for f in flags if f not in known_flags()]
    problems = [f"no parser the docs use accepts {f}" for f in unknown]
    overrides = [w for w in words if CONFIG_KEY.match(w) and "=" in w]
    if overrides:
        problems += check_overrides(overrides)
    return problems



def check_path(token: str) -> list[str]:
    """A repository path (glob patterns and <placeholders> allowed); tests/x.py::name names a test."""
    token = token.rstrip(".,;:")
    if re.match(r"^[\w-]+/", token) and (ROOT / "benchmarks" / token.split("/")[0]).is_dir():   # `tune/x.json`
        token = f"benchmarks/{token}"
    if not token.startswith(REPO_DIRS) or "$" in token:
        return []
    token, _, test_name = token.partition("::")
    pattern = re.sub(r"<[^<>]*>|…|X(?=[./-])", "*", token)
    if re.search(r"\*", pattern):
        return [] if glob.glob(str(ROOT / pattern)) else [f"no file matches {token}"]
    path = ROOT / token
    if not path.exists():
        # module.attribute (server/transport.PollingGrid)
        stem, dot, attr = token.rpartition(".")
        if dot and (ROOT / f"{stem}.py").exists() and attr in (ROOT / f"{stem}.py").read_text(encoding="utf-8"):
            return []
        return [f"no such path {token}"]
    if test_name and not re.search(rf"^\s*def {re.escape(test_name)}\b", path.read_text(encoding="utf-8"), re.M):
        return [f"{token} has no test {test_name}"]
    return []


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"`|\*\*|\*", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


@cache
def anchors(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text(encoding="utf-8"))
    return {_slug(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", text, re.M)}


def check_links(path: Path) -> list[str]:
    problems = []
    text = path.read_text(encoding="utf-8")
    for m in LINK.finditer(FENCE.sub("", text)):
        target = m.group(1)
        if re.match(r"^[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"link to {target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"link to {target}: no such heading")
    return problems


def _documented_default(cell: str, default) -> bool:
    cell = cell.strip().strip("`")
    if cell == "empty":
        return default == ""
    if isinstance(default, bool):
        return cell.lower() == str(default).lower()
    if isinstance(default, (int, float)):
        try:
            return float(cell.replace(",", "")) == float(default)
        except ValueError:
            return False
    return cell.replace(" ", "") == str(default).replace(" ", "")


def check_default_tables(path: Path) -> list[str]:
    """Rows of a `| key | default | meaning |` table give each key's default as shared_models/defaults.yaml does."""
    problems: list[str] = []
    in_table = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if len(cells) < 2:
            in_table = False
            continue
        if cells[:2] == ["key", "default"]:
            in_table = True
            continue
        keys = re.findall(r"`([^`]+)`", cells[0])
        if not in_table or not keys or not all(CONFIG_KEY.match(k) for k in keys):   # a policy.json table
            continue
        values = [cells[1]] if len(keys) == 1 else re.split(r"\s*,\s*|\s+/\s+", cells[1])
        if len(values) != len(keys):
            problems.append(f"{_name(path)}:{number}: {len(keys)} keys but {len(values)} defaults")
            continue
        for key, value in zip(keys, values):
            if key not in config_defaults():
                problems.append(f"{_name(path)}:{number}: unknown config key {key!r}")
            elif not _documented_default(value, config_defaults()[key]):
                problems.append(f"{_name(path)}:{number}: {key} defaults to {config_defaults()[key]!r}, "
                                f"not {value!r}")
    return problems


def problems_in(path: Path, history: bool = False) -> list[str]:
    """Every problem in one markdown file, each as 'file:line: `text`: what'."""
    blocks, spans = blocks_and_inline(path)
    found: list[str] = []

    def report(item: Command, what: list[str]) -> None:
        found.extend(f"{item.doc}:{item.line}: `{item.text}`: {w}" for w in what)

    for item in blocks + spans:
        variants = _tokens(item.text)
        if not variants and re.match(r"^(\.venv/bin/)?(fedfer|python -m|flwr) ", item.text):
            report(item, ["cannot be split into shell words (unbalanced quotes?)"])
        for words in variants:
            if not words:
                continue
            is_command = words[0] in COMMAND_WORDS
            for before, word in zip(["", *words], words):
                if before in OUTPUT_FLAGS:   # a file the command writes
                    continue
                if word.startswith("--") and "=" in word:
                    word = word.split("=", 1)[1]
                for part in word.split(","):
                    report(item, check_path(part))
            if history:
                if words[0] == "python" and len(words) > 2 and words[1] == "-m":
                    report(item, [p for p in check_python_m(words[:3]) if p.startswith("no module")])
                continue
            if is_command:   # a diagram's `fedfer privacy audit  (privacy/audit.py)` names a command, too
                report(item, check_command(words, item.inline or bool(re.search(r"\s\(", item.text))))
            elif item.inline and (words[0].startswith("--") or words[0] in ("…", "...")
                                  or any(words[0] == leaf.split()[-1] for leaf in fedfer_leaves()) and len(words) > 1):
                report(item, check_fragment(words))
            elif item.inline and len(words) == 1 and CONFIG_KEY.match(words[0]) and CONFIG_KEY.match(words[0]).group(1) in SECTIONS:
                report(item, check_key(words[0]))
    found += [f"{_name(path)}: {p}" for p in check_links(path)]
    if not history:
        found += check_default_tables(path)
    return list(dict.fromkeys(found))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_in_the_docs_still_parses(doc: Path):
    problems = problems_in(doc)
    assert not problems, "\n".join(problems)


def test_the_lab_notebook_names_files_and_modules_that_exist():
    problems = problems_in(HISTORY, history=True)
    assert not problems, "\n".join(problems)


def test_the_checker_catches_rot(tmp_path):
    """A doc with a removed flag, a misspelt key, a bad value, a missing file and a missing module fails."""
    doc = tmp_path / "broken.md"
    doc.write_text("```bash\n"
                   "fedfer simulate --no-such-flag\n"
                   "fedfer simulate federaton.rounds=3\n"
                   "fedfer simulate train.optimizer=lbfgs\n"
                   "fedfer privacy audit runs/x --keyz deploy/keys\n"
                   "fedfer privacy plan --epsilon 8 --delta 1e-5 --rounds 12 --local-epoch 2 --students 9 --batch 3\n"
                   "python -m simulations.bench.nothing_here --out x.json\n"
                   "python -m simulations.bench.models --no-such-flag\n"
                   "flwr run . fedfer -c 'federation.roundz=2'\n"
                   "fedfer simulate 'run.name=x\n"
                   "```\n"
                   "See `benchmarks/no-such-file.json`, `pretraining-tune/s99-none.json`, `configs/nothing.yaml`, "
                   "`fedfer deploy nosuch`, "
                   "`--no-such-option`, `privacy.budjet`, `privacy.unit=household` and [x](no-such.md).\n\n"
                   "| key | default | meaning |\n|---|---|---|\n| `train.lr`, `train.optimizer` | 0.1, sgd | x |\n",
                   encoding="utf-8")
    problems = problems_in(doc)
    text = "\n".join(problems)
    for expected in ("--no-such-flag", "no option --local-epoch", "federaton.rounds", "lbfgs", "--keyz",
                     "no module simulations.bench.nothing_here", "simulations.bench.models rejects it",
                     "federation.roundz", "benchmarks/no-such-file.json", "benchmarks/pretraining-tune/s99-none.json",
                     "configs/nothing.yaml", "deploy nosuch", "--no-such-option", "privacy.budjet", "household",
                     "no-such.md", "train.lr defaults to 1.5, not '0.1'", "unbalanced quotes"):
        assert expected in text, f"{expected} not reported in:\n{text}"


if __name__ == "__main__":
    all_problems = [p for d in DOCS for p in problems_in(d)] + problems_in(HISTORY, history=True)
    print("\n".join(all_problems) or "no problems")
    print(f"{len(all_problems)} problem(s)", file=sys.stderr)
