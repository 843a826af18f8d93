"""Experiment configuration: `shared_models/defaults.yaml` is the one place for defaults; this is its schema.

A config is a flat mapping of dotted keys (``train.lr``) to scalars, because that is what Flower's
run-config carries between the CLI, the ServerApp and every ClientApp. The YAML file is written nested
for people; :func:`load_config` flattens it, applies overrides and validates every value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from shared_models.atomic_files import atomic_write_text
from shared_models.wording import one_line

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "defaults.yaml"   # shipped inside the package

Scalar = bool | int | float | str

# Limits on what a config file may be: a config is two levels of small scalars, so anything far beyond
# these is a mistake or an attack (a YAML "billion laughs", a 100,000-deep list), refused before it costs.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_DEPTH = 16
MAX_SCALAR_CHARS = 4096
SEED_MAX = 2**32 - 1                      # numpy's seed range
RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SCHOOL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key or file."""


@dataclass(frozen=True)
class Rule:
    """Extra constraints on a key beyond the type of its default. Every float must also be finite.

    `above`/`below` are exclusive bounds (a δ of 0 or 1 means nothing; an ε budget of 0 allows nothing)."""

    choices: tuple[str, ...] | None = None
    #: a comma-separated list whose every part is one of these ("" = none)
    parts_of: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    below: float | None = None


RULES: dict[str, Rule] = {
    "run.seed": Rule(minimum=0, maximum=SEED_MAX),
    "federation.schools": Rule(minimum=1, maximum=10_000),
    "federation.rounds": Rule(minimum=1, maximum=100_000),
    "federation.fraction_train": Rule(above=0.0, maximum=1.0),
    "federation.min_train_schools": Rule(minimum=1, maximum=10_000),
    "federation.max_update_norm": Rule(above=0.0),
    "federation.round_timeout": Rule(minimum=1, maximum=7 * 86_400),
    "federation.offline_wait": Rule(minimum=0, maximum=7 * 86_400),
    "federation.first_round_wait": Rule(minimum=0, maximum=7 * 86_400),
    "federation.server_momentum": Rule(minimum=0.0, maximum=0.99),
    "federation.client_dp_noise": Rule(minimum=0.0),
    "federation.client_dp_clip": Rule(above=0.0),
    "federation.client_dp_quantile": Rule(minimum=0.0, maximum=1.0),
    "federation.cpus_per_school": Rule(minimum=1, maximum=1024),
    "model.preset": Rule(choices=("cpu", "dp", "paper")),
    "model.aux_loss_weight": Rule(minimum=0.0),
    "train.local_epochs": Rule(minimum=1, maximum=10_000),
    "train.batch_size": Rule(minimum=1, maximum=10_000_000),
    "train.frames_per_student": Rule(minimum=1, maximum=10_000),
    "train.optimizer": Rule(choices=("sgd", "adam")),
    "train.lr": Rule(above=0.0, maximum=1_000.0),
    "train.lr_noise_reference": Rule(minimum=0.0),
    "train.lr_noise_power": Rule(minimum=0.0, maximum=4.0),
    "train.momentum": Rule(minimum=0.0, below=1.0),
    "train.weight_decay": Rule(minimum=0.0),
    "train.threads": Rule(minimum=0, maximum=1024),
    "privacy.unit": Rule(choices=("student", "image")),
    "privacy.target_epsilon": Rule(above=0.0),
    "privacy.noise_multiplier": Rule(minimum=0.0),
    "privacy.max_grad_norm": Rule(above=0.0),
    "privacy.delta": Rule(above=0.0, below=1.0),
    "privacy.budget": Rule(above=0.0),
    "privacy.max_round_epsilon": Rule(above=0.0),
    "privacy.accountant": Rule(choices=("prv", "rdp")),
    "privacy.clipping": Rule(choices=("auto", "ghost", "per-sample")),
    "data.image_size": Rule(minimum=16, maximum=512),
    "data.students_per_school": Rule(minimum=1, maximum=10_000_000),
    "data.frames_per_student": Rule(minimum=1, maximum=10_000),
    "data.clips_per_student": Rule(minimum=0, maximum=1_000),
    "data.public_students": Rule(minimum=1, maximum=1_000_000),
    "data.public_frames": Rule(minimum=1, maximum=10_000),
    "data.seed": Rule(minimum=0, maximum=SEED_MAX),
    "evaluation.bootstrap": Rule(minimum=0, maximum=1_000_000),
    "evaluation.keep_best": Rule(choices=("mean", "first", "off")),
    "evaluation.references": Rule(parts_of=("central", "alone", "noise-free")),
    "evaluation.reference_schools": Rule(minimum=0, maximum=10_000),
    "evaluation.central_epochs": Rule(minimum=1, maximum=1_000),
    "data.public_train_students": Rule(minimum=0, maximum=1_000_000),
    "data.public_train_frames": Rule(minimum=1, maximum=10_000),
    "data.heldout_students": Rule(minimum=0, maximum=10_000_000),
    "data.school_size_spread": Rule(minimum=0, maximum=90),
    "data.indomain_schools": Rule(minimum=1, maximum=10_000),
    "data.generate": Rule(choices=("auto", "upfront", "on-demand")),
    "data.school_cache_mb": Rule(minimum=0, maximum=1_000_000),
    "model.pretrain": Rule(choices=("", "auto")),
    "train.trainable": Rule(choices=("all", "last", "norms+head")),
    "model.task": Rule(choices=("fer7", "engagement")),
    "pretrain.epochs": Rule(minimum=1, maximum=10_000),
    "pretrain.batch_size": Rule(minimum=1, maximum=1_000_000),
    "pretrain.lr": Rule(minimum=0.0),
    "pretrain.threads": Rule(minimum=0, maximum=1024),
    "pretrain.seed": Rule(minimum=0, maximum=SEED_MAX),   # torch.manual_seed(10**30) and seeds < 0 were ValueErrors mid-run
    "classroom.report_min_students": Rule(minimum=1, maximum=10_000),
}


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mapping -> dotted keys."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def nest(flat: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted keys -> nested mapping (for writing YAML people read)."""
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, stricter: no aliases (so no recursive or exponential anchors), bounded
    nesting, no duplicate keys (PyYAML keeps the last silently), finite numbers only (`.inf`, `.nan`,
    `1e999`), no integer literals longer than a number a config could mean."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not allowed in a config file",
                                              self.peek_event().start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a plain value",
                                                            key_node.start_mark) from None
                if duplicate:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _finite_float(loader: _ConfigLoader, node: Any) -> float:
    value = loader.construct_yaml_float(node)
    if not math.isfinite(value):
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a finite number", node.start_mark)
    return value


def _bounded_int(loader: _ConfigLoader, node: Any) -> int:
    if len(str(node.value)) > 40:
        raise yaml.constructor.ConstructorError(None, None, f"integer of {len(str(node.value))} characters",
                                                node.start_mark)
    return loader.construct_yaml_int(node)


_ConfigLoader.add_constructor("tag:yaml.org,2002:float", _finite_float)
_ConfigLoader.add_constructor("tag:yaml.org,2002:int", _bounded_int)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        if not path.exists():
            raise ConfigError(f"{path}: config file not found")
        if not path.is_file():   # a directory, a named pipe (would block), a device
            raise ConfigError(f"{path}: not a regular file")
        with path.open("rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; not a config file")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        tree = yaml.load(text, Loader=_ConfigLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({one_line(getattr(exc, 'problem', None) or exc)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    flat = flatten(tree)
    if len(flat) != _count_leaves(tree):
        raise ConfigError(f"{path}: a key is given twice (once nested, once dotted)")
    return flat


def read_yaml_file(path: str | Path) -> dict[str, Any]:
    """Any YAML file fedfer reads as a flat mapping (a run's config.yaml), through the same strict
    reader as configs: no aliases, bounded nesting and size, finite numbers, UTF-8; ConfigError otherwise."""
    return _read_yaml(Path(path))


def _count_leaves(tree: Mapping[str, Any]) -> int:
    return sum(_count_leaves(v) if isinstance(v, Mapping) else 1 for v in tree.values())


_DEFAULTS: dict[str, Scalar] | None = None


def defaults() -> dict[str, Scalar]:
    """Every key with its default value, flat (read once per process; a copy each call)."""
    global _DEFAULTS
    if _DEFAULTS is None:
        _DEFAULTS = _read_yaml(DEFAULT_CONFIG_PATH)
    return dict(_DEFAULTS)


def _coerce(key: str, value: Any, default: Scalar, source: str, allow_nonfinite: bool = False) -> Scalar:
    """Convert `value` to the type of `default`, accepting the string forms a command line gives."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
            if len(text) > 64:   # int("9" * 5000) is slow and then refused anyway
                raise ValueError
            if want is bool:
                lowered = text.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                value = lowered in ("true", "1", "yes")
            elif want is int:
                value = int(text)
            else:
                value = float(text)
        except ValueError:
            raise ConfigError(f"{source}: key '{key}' must be {want.__name__}, got {_show(value)}") from None
    if want is bool and not isinstance(value, bool):
        if isinstance(value, int) and value in (0, 1):  # Flower may carry bools as ints
            return bool(value)
        raise ConfigError(f"{source}: key '{key}' must be bool, got {_show(value)}")
    if want is int:
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (isinstance(value, float) and not math.isfinite(value)) or value != int(value)):
            raise ConfigError(f"{source}: key '{key}' must be int, got {_show(value)}")
        return int(value)
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be float, got {_show(value)}")
        try:
            number = float(value)
        except OverflowError:   # an int beyond float's range
            number = math.inf
        if not math.isfinite(number) and not allow_nonfinite:
            raise ConfigError(f"{source}: key '{key}' must be a finite number, got {_show(value)}")
        return number
    if want is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: key '{key}' must be a string, got {_show(value)}")
        if len(value) > MAX_SCALAR_CHARS:
            raise ConfigError(f"{source}: key '{key}' is longer than {MAX_SCALAR_CHARS} characters")
        if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
            raise ConfigError(f"{source}: key '{key}' contains a control character (newline, NUL, ...)")
    return value


def _show(value: Any) -> str:
    """A value for a one-line message: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_rule(key: str, value: Scalar, source: str) -> None:
    rule = RULES.get(key)
    if rule is None:
        return
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(rule.choices)}; got {_show(value)}")
    if rule.parts_of is not None and any(part.strip() not in rule.parts_of for part in str(value).split(",") if part.strip()):
        raise ConfigError(f"{source}: key '{key}' must be a comma-separated list of {', '.join(rule.parts_of)}; "
                          f"got {_show(value)}")
    if rule.minimum is not None and value < rule.minimum:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be >= {rule.minimum}; got {value!r}")
    if rule.maximum is not None and value > rule.maximum:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be <= {rule.maximum}; got {value!r}")
    if rule.above is not None and not value > rule.above:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be > {rule.above}; got {value!r}")
    if rule.below is not None and not value < rule.below:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be < {rule.below}; got {value!r}")


def _check_school_budgets(value: str, source: str) -> None:
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, eps = item.partition("=")
        name = name.strip()
        try:
            number = float(eps)
            ok = bool(sep) and bool(SCHOOL_ID.match(name)) and math.isfinite(number) and number > 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{source}: key 'privacy.school_budgets': {_show(item)} must look like "
                              "school-id=epsilon with a finite epsilon > 0")
        if name in seen:
            raise ConfigError(f"{source}: key 'privacy.school_budgets': school {name!r} is given twice")
        seen.add(name)


def _check_model(resolved: Mapping[str, Scalar], source: str) -> None:
    """model.name must be a registered model and model.preset one of its presets."""
    from shared_models.models import registry   # imports torch: only once a config is otherwise valid

    name, preset = str(resolved["model.name"]), str(resolved["model.preset"])
    if name not in registry.available():
        raise ConfigError(f"{source}: key 'model.name' must be one of {', '.join(registry.available())}; got {_show(name)}")
    presets = registry.presets(name)
    if preset not in presets:
        raise ConfigError(f"{source}: key 'model.preset' must be one of {', '.join(presets)} for model "
                          f"{name}; got {_show(preset)}")
    if str(resolved.get("model.task", "fer7")) == "engagement" and presets[preset].clip_frames == 0:
        raise ConfigError(f"{source}: key 'model.task' engagement needs a clip model (a school's engagement "
                          f"levels label clips); {name} {preset} reads single images")
    if presets[preset].clip_frames:
        _check_clip_benchmarks(str(resolved["evaluation.benchmarks"]), str(resolved.get("model.task", "fer7")),
                               f"{name} {preset}", source)


CLIP_BENCHMARKS = ("dfew", "afew", "clipfolder", "daisee", "synthetic-clips", "synthetic-daisee")
ENGAGEMENT_BENCHMARKS = ("daisee", "synthetic-daisee")


def _check_clip_benchmarks(value: str, task: str, model: str, source: str) -> None:
    """A clip model is scored on clip benchmarks of its task (engagement: DAiSEE's levels; fer7: the others)."""
    from shared_models.datasets import _canonical, split_benchmark_list

    for item in split_benchmark_list(value):
        name = _canonical(item.split("=", 1)[0].split(":", 1)[0])
        if name not in CLIP_BENCHMARKS:
            raise ConfigError(f"{source}: key 'evaluation.benchmarks': {model} reads clips; {item!r} holds single "
                              f"images (clip benchmarks: {', '.join(CLIP_BENCHMARKS)})")
        if (name in ENGAGEMENT_BENCHMARKS) != (task == "engagement"):
            raise ConfigError(f"{source}: key 'evaluation.benchmarks': {item!r} does not score model.task {task} "
                              f"(engagement: {', '.join(ENGAGEMENT_BENCHMARKS)}; fer7: the other clip benchmarks)")


def _check_benchmarks(value: str, source: str) -> None:
    """evaluation.benchmarks: each item a known benchmark name (NAME, NAME=PATH or NAME:SPLIT=PATH).
    Paths are not checked here: they are paths on the evaluation node, which opens them."""
    from shared_models.datasets import READERS, SYNTHETIC, _canonical, benchmark_names, split_benchmark_list

    items = split_benchmark_list(value)
    if not items:
        raise ConfigError(f"{source}: key 'evaluation.benchmarks' is empty; name at least one benchmark")
    for item in items:
        head, sep, path = item.partition("=")
        name = head.partition(":")[0]
        key = _canonical(name)
        if key not in READERS and key not in SYNTHETIC:
            raise ConfigError(f"{source}: key 'evaluation.benchmarks': unknown benchmark {_show(name.strip())} "
                              f"(known: {', '.join(benchmark_names())})")
        if key in READERS and not (sep and path.strip()):
            raise ConfigError(f"{source}: key 'evaluation.benchmarks': benchmark {_show(name.strip())} needs a path "
                              f"({key}=PATH)")


def _check_public_benchmarks(value: str, source: str) -> None:
    """evaluation.public_benchmarks: benchmark names only (no path or split: it declares what a name holds, on
    whichever node scores it), each one known, and never the schools' held-out faces."""
    from shared_models.datasets import READERS, SCHOOL_DATA_BENCHMARKS, SYNTHETIC, benchmark_names, canonical_name

    key = "evaluation.public_benchmarks"
    for item in filter(None, (part.strip() for part in value.split(","))):
        if "=" in item or ":" in item:
            raise ConfigError(f"{source}: key '{key}': {_show(item)} must be a benchmark name alone "
                              f"(e.g. {item.split('=')[0].split(':')[0].strip() or 'fer2013'}), without a split or path")
        name = canonical_name(item)
        if name in SCHOOL_DATA_BENCHMARKS:
            raise ConfigError(f"{source}: key '{key}': {name} is the schools' own held-out students, not public "
                              "data; it can never choose the best round (docs/privacy.md)")
        if name not in READERS and name not in SYNTHETIC:
            raise ConfigError(f"{source}: key '{key}': unknown benchmark {_show(item)} "
                              f"(known: {', '.join(n for n in benchmark_names() if n not in SCHOOL_DATA_BENCHMARKS)})")


def _check_run_name(value: str, source: str) -> None:
    """run.name is one folder below run.root: no separators, no `..`, nothing absolute."""
    if value and not RUN_NAME.match(value):
        raise ConfigError(f"{source}: key 'run.name' must be a folder name (letters, digits, '.', '_', '-', "
                          f"starting with a letter or digit, at most 128); got {_show(value)}")


def ray_address_parts(value: str) -> tuple[str, int] | None:
    """(host, port) of a `federation.ray_address` HOST:PORT ([v6]:PORT for an IPv6 literal); None if malformed."""
    host, sep, port = value.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return None
    if any(ch.isspace() or ch in "/@?#" for ch in host):
        return None
    return host, int(port)


def _check_ray_address(value: str, source: str) -> None:
    """federation.ray_address: empty, or the HOST:PORT of a Ray head (what `ray start --head` prints)."""
    if value and ray_address_parts(value) is None:
        raise ConfigError(f"{source}: key 'federation.ray_address' must be HOST:PORT of a Ray cluster's head "
                          f"(e.g. 10.0.0.5:6379), or empty for a private Ray on this machine; got {_show(value)}")


#: What a school checks against its own policy (privacy/policy.py) and, when refused, signs as a
#: policy-violation: in a run-config arriving at a school these are not refused here, or the school
#: could not record the refusal.
SCHOOL_CHECKED_KEYS = ("privacy.budget", "privacy.delta", "privacy.max_round_epsilon", "privacy.target_epsilon",
                       "privacy.noise_multiplier", "privacy.school_budgets")


def validate(flat: Mapping[str, Any], source: str = "config", *, at_school: bool = False) -> dict[str, Scalar]:
    """Check keys and types against the defaults; return a complete, typed flat config.
    `at_school`: a run-config inside an app, whose privacy values the school checks itself."""
    base = defaults()
    resolved: dict[str, Scalar] = dict(base)
    school_checked = SCHOOL_CHECKED_KEYS if at_school else ()
    for key, value in flat.items():
        if key not in base:
            raise ConfigError(f"{source}: unknown key {_show(str(key))}")
        resolved[key] = _coerce(key, value, base[key], source, allow_nonfinite=key in school_checked)
        if key not in school_checked:
            _check_rule(key, resolved[key], source)
    _check_run_name(str(resolved["run.name"]), source)
    _check_ray_address(str(resolved["federation.ray_address"]), source)
    if not at_school:
        _check_school_budgets(str(resolved.get("privacy.school_budgets", "")), source)
    _check_model(resolved, source)
    _check_benchmarks(str(resolved["evaluation.benchmarks"]), source)
    _check_public_benchmarks(str(resolved["evaluation.public_benchmarks"]), source)
    return resolved


def _check_privacy_values(cfg: Mapping[str, Any], source: str) -> None:
    """Privacy values that make no sense on the command line or in a YAML file (a school's policy is
    generated from them in simulation). A run-config arriving at a school is not refused here: the school
    checks it against its own policy and signs its refusal (privacy/policy.py)."""
    import math

    for key in ("privacy.budget", "privacy.max_round_epsilon", "privacy.target_epsilon"):
        value = float(cfg[key])
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: key '{key}' must be a finite ε > 0; got {cfg[key]!r}")
    delta = float(cfg["privacy.delta"])
    if not (0 < delta < 1):
        raise ConfigError(f"{source}: key 'privacy.delta' must be in (0, 1); got {cfg['privacy.delta']!r}")
    sigma = float(cfg["privacy.noise_multiplier"])
    if not math.isfinite(sigma):
        raise ConfigError(f"{source}: key 'privacy.noise_multiplier' must be finite; got {cfg['privacy.noise_multiplier']!r}")
    for item in filter(None, (part.strip() for part in str(cfg.get("privacy.school_budgets", "")).split(","))):
        eps = float(item.partition("=")[2])
        if not (math.isfinite(eps) and eps > 0):
            raise ConfigError(f"{source}: key 'privacy.school_budgets': '{item}' needs a finite ε > 0")


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """`key=value` strings (the command line's form) -> mapping; values stay strings until validated."""
    overrides: dict[str, str] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key=value")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value.strip().strip("'\"")
    return overrides


def load_config(path: str | Path | None = None, overrides: Iterable[str] | Mapping[str, Any] = ()) -> dict[str, Scalar]:
    """Defaults, then the user's YAML file (if any), then `key=value` overrides; validated."""
    merged: dict[str, Any] = {}
    if path is not None:
        merged.update(validate(_read_yaml(Path(path)), source=str(path)))
    extra = dict(overrides) if isinstance(overrides, Mapping) else parse_overrides(overrides)
    merged.update(extra)
    source = "override" if extra else str(path or DEFAULT_CONFIG_PATH)
    resolved = validate(merged, source=source)
    _check_privacy_values(resolved, source)
    return resolved


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Scalar]:
    """Rebuild the typed config inside a ServerApp or ClientApp from Flower's run-config.

    Flower passes every key of ``[tool.flwr.app.config]``; keys fedfer does not know are ignored so
    Flower's own additions never break a run.
    """
    known = defaults()
    return validate({k: v for k, v in run_config.items() if k in known}, source="run-config", at_school=True)


def dump_yaml(flat: Mapping[str, Any], path: str | Path) -> None:
    """Write a resolved config (nested, for people) next to the run's results, all at once: a run directory's
    config.yaml is written only while missing, so a torn one would stay (and refuse every resume)."""
    atomic_write_text(Path(path), yaml.safe_dump(nest(flat), sort_keys=False))


def to_toml(flat: Mapping[str, Any]) -> str:
    """A flat config as nested TOML tables: the form of `[tool.flwr.app.config]` and of the
    `flwr run --run-config FILE.toml` overrides that `fedfer simulate` hands to Flower."""
    import tomli_w

    return tomli_w.dumps(nest(flat))


PATH_KEYS_MUST_EXIST = ("model.pretrained", "privacy.keyring", "run.resume")


def check_paths(cfg: Mapping[str, Any], source: str = "config") -> None:
    """Paths a run reads must exist before anything starts (`data.root` is a cache: its parent must)."""
    for key in PATH_KEYS_MUST_EXIST:
        value = str(cfg.get(key, "") or "")
        if value and not Path(value).expanduser().exists():
            raise ConfigError(f"{source}: key '{key}': {value} does not exist")
    root = str(cfg.get("data.root", "") or "")
    if root:
        path = Path(root).expanduser()
        if not path.exists() and not path.parent.exists():
            raise ConfigError(f"{source}: key 'data.root': neither {path} nor its parent folder exists")


# What a resumed run may set differently from the run it continues: where things are and how the machine
# runs them. Everything else — privacy, rounds, data, model, training — is what the schools set their noise
# and steps from (each reads Flower's run-config), so it must be the original run's.
RESUME_MAY_CHANGE = frozenset({
    "run.resume", "run.name", "run.root", "privacy.keyring", "data.root", "data.school_cache_mb",
    "federation.round_timeout", "federation.offline_wait", "federation.first_round_wait", "federation.ray_address", "federation.cpus_per_school", "train.threads",
    "pretrain.threads", "model.pretrain", "model.pretrained", "evaluation.bootstrap", "evaluation.references",
    "evaluation.reference_schools", "evaluation.central_epochs", "classroom.report_min_students",
    "classroom.per_student_figures",
})


def resume_differences(requested: Mapping[str, Any], original: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """key -> (requested, original) for every key a resumed run may not change (RESUME_MAY_CHANGE) but does."""
    return {key: (requested.get(key), original.get(key)) for key in sorted(set(requested) | set(original))
            if key not in RESUME_MAY_CHANGE and requested.get(key) != original.get(key)}


def as_override(key: str, value: Any) -> str:
    """`key=value` as `flwr run -c` reads it (TOML: strings quoted)."""
    if isinstance(value, bool):
        return f"{key}={'true' if value else 'false'}"
    if isinstance(value, (int, float)):
        return f"{key}={value!r}"
    return f'{key}="{value}"'
