"""Experiment configuration: `shared_models/defaults.yaml` is the one place for defaults; this is its schema.

A config is a flat mapping of dotted keys (``train.lr``) to scalars, because that is what Flower's
run-config carries between the CLI, the ServerApp and every ClientApp. The YAML file is written nested
for people; :func:`load_config` flattens it, applies overrides and validates every value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

DEFAULT_CONFIG_PATH = Path(__file__).resolve().parent / "defaults.yaml"   # shipped inside the package

Scalar = bool | int | float | str


class ConfigError(ValueError):
    """A config problem, phrased as one line that names the key or file."""


@dataclass(frozen=True)
class Rule:
    """Extra constraints on a key beyond the type of its default."""

    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None


RULES: dict[str, Rule] = {
    "federation.schools": Rule(minimum=1),
    "federation.rounds": Rule(minimum=1),
    "federation.fraction_train": Rule(minimum=0.0, maximum=1.0),
    "federation.min_train_schools": Rule(minimum=1),
    "federation.max_update_norm": Rule(minimum=0.0),
    "federation.round_timeout": Rule(minimum=1),
    "federation.server_momentum": Rule(minimum=0.0, maximum=0.99),
    "federation.client_dp_noise": Rule(minimum=0.0),
    "federation.client_dp_clip": Rule(minimum=1e-9),
    "federation.client_dp_quantile": Rule(minimum=0.0, maximum=1.0),
    "model.preset": Rule(choices=("cpu", "dp", "paper")),
    "train.local_epochs": Rule(minimum=1),
    "train.batch_size": Rule(minimum=1),
    "train.frames_per_student": Rule(minimum=1),
    "train.lr": Rule(minimum=0.0),
    "train.threads": Rule(minimum=1),
    "privacy.unit": Rule(choices=("student", "image")),
    "train.optimizer": Rule(choices=("sgd", "adam")),
    "privacy.target_epsilon": Rule(minimum=0.0),
    "privacy.noise_multiplier": Rule(minimum=0.0),
    "privacy.max_grad_norm": Rule(minimum=0.0),
    "privacy.delta": Rule(minimum=0.0, maximum=1.0),
    "privacy.budget": Rule(minimum=0.0),
    "privacy.accountant": Rule(choices=("prv", "rdp")),
    "data.image_size": Rule(minimum=16, maximum=512),
    "data.students_per_school": Rule(minimum=1),
    "data.frames_per_student": Rule(minimum=1),
    "data.public_students": Rule(minimum=1),
    "data.public_frames": Rule(minimum=1),
    "model.aux_loss_weight": Rule(minimum=0.0),
    "data.clips_per_student": Rule(minimum=0),
    "data.public_train_students": Rule(minimum=0),
    "data.public_train_frames": Rule(minimum=1),
    "data.heldout_students": Rule(minimum=0),
    "data.school_size_spread": Rule(minimum=0, maximum=90),
    "model.pretrain": Rule(choices=("", "auto")),
    "train.trainable": Rule(choices=("all", "last", "norms+head")),
    "pretrain.epochs": Rule(minimum=1),
    "pretrain.batch_size": Rule(minimum=1),
    "pretrain.lr": Rule(minimum=0.0),
    "evaluation.bootstrap": Rule(minimum=0),
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


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        tree = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return flatten(tree)


def defaults() -> dict[str, Scalar]:
    """Every key with its default value, flat."""
    return _read_yaml(DEFAULT_CONFIG_PATH)


def _coerce(key: str, value: Any, default: Scalar, source: str) -> Scalar:
    """Convert `value` to the type of `default`, accepting the string forms a command line gives."""
    want = type(default)
    if isinstance(value, str) and want is not str:
        text = value.strip()
        try:
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
            raise ConfigError(f"{source}: key '{key}' must be {want.__name__}, got {value!r}") from None
    if want is bool and not isinstance(value, bool):
        if isinstance(value, int) and value in (0, 1):  # Flower may carry bools as ints
            return bool(value)
        raise ConfigError(f"{source}: key '{key}' must be bool, got {value!r}")
    if want is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            raise ConfigError(f"{source}: key '{key}' must be int, got {value!r}")
        return int(value)
    if want is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: key '{key}' must be float, got {value!r}")
        return float(value)
    if want is str and not isinstance(value, str):
        raise ConfigError(f"{source}: key '{key}' must be a string, got {value!r}")
    return value


def _check_rule(key: str, value: Scalar, source: str) -> None:
    rule = RULES.get(key)
    if rule is None:
        return
    if rule.choices is not None and value not in rule.choices:
        raise ConfigError(f"{source}: key '{key}' must be one of {', '.join(rule.choices)}; got {value!r}")
    if rule.minimum is not None and value < rule.minimum:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be >= {rule.minimum}; got {value!r}")
    if rule.maximum is not None and value > rule.maximum:  # type: ignore[operator]
        raise ConfigError(f"{source}: key '{key}' must be <= {rule.maximum}; got {value!r}")


def _check_school_budgets(value: str, source: str) -> None:
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, eps = item.partition("=")
        try:
            ok = bool(sep and name.strip()) and float(eps) >= 0
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"{source}: key 'privacy.school_budgets': '{item}' must look like school-id=epsilon")


def validate(flat: Mapping[str, Any], source: str = "config") -> dict[str, Scalar]:
    """Check keys and types against the defaults; return a complete, typed flat config."""
    base = defaults()
    resolved: dict[str, Scalar] = dict(base)
    for key, value in flat.items():
        if key not in base:
            raise ConfigError(f"{source}: unknown key '{key}'")
        resolved[key] = _coerce(key, value, base[key], source)
        _check_rule(key, resolved[key], source)
    _check_school_budgets(str(resolved.get("privacy.school_budgets", "")), source)
    return resolved


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
    return validate(merged, source="override" if extra else str(path or DEFAULT_CONFIG_PATH))


def from_run_config(run_config: Mapping[str, Any]) -> dict[str, Scalar]:
    """Rebuild the typed config inside a ServerApp or ClientApp from Flower's run-config.

    Flower passes every key of ``[tool.flwr.app.config]``; keys fedfer does not know are ignored so
    Flower's own additions never break a run.
    """
    known = defaults()
    return validate({k: v for k, v in run_config.items() if k in known}, source="run-config")


def dump_yaml(flat: Mapping[str, Any], path: str | Path) -> None:
    """Write a resolved config (nested, for people) next to the run's results."""
    Path(path).write_text(yaml.safe_dump(nest(flat), sort_keys=False), encoding="utf-8")


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
