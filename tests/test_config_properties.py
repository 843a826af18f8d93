"""Property-based tests of the config loader (Hypothesis, fixed example budget, derandomised so the
default suite stays deterministic and fast): whatever the file or override, the loader returns a
checked config or raises one ConfigError line naming the key or file — never another exception."""

from __future__ import annotations

import math
import tomllib

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared_models.config import RULES, ConfigError, defaults, from_run_config, load_config, to_toml

DEFAULTS = defaults()
KEYS = sorted(DEFAULTS)
FLOAT_KEYS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, float))
INT_KEYS = sorted(k for k, v in DEFAULTS.items() if isinstance(v, int) and not isinstance(v, bool))
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def one_line(err: ConfigError) -> str:
    text = str(err)
    assert text and "\n" not in text and "\r" not in text, repr(text)
    return text


def allowed(key: str, value: float) -> bool:
    """What the schema says about a number for `key` (the oracle the loader must agree with)."""
    if not math.isfinite(value):
        return False
    rule = RULES.get(key)
    if rule is None:
        return True
    return ((rule.minimum is None or value >= rule.minimum) and (rule.maximum is None or value <= rule.maximum)
            and (rule.above is None or value > rule.above) and (rule.below is None or value < rule.below))


@SETTINGS
@given(key=st.sampled_from(KEYS), value=st.text(max_size=40))
def test_any_override_text_is_accepted_or_refused_in_one_line(key, value):
    try:
        cfg = load_config(None, [f"{key}={value}"])
    except ConfigError as err:
        assert key in one_line(err) or "override" in str(err)
        return
    assert type(cfg[key]) is type(DEFAULTS[key])


@SETTINGS
@given(key=st.sampled_from(FLOAT_KEYS), value=st.floats(allow_nan=True, allow_infinity=True))
def test_float_keys_take_exactly_the_finite_in_range_numbers(key, value):
    try:
        cfg = load_config(None, {key: value})
    except ConfigError as err:
        assert f"'{key}'" in one_line(err)
        assert not allowed(key, value)
        return
    assert allowed(key, value) and cfg[key] == value


@SETTINGS
@given(key=st.sampled_from(INT_KEYS), value=st.one_of(st.integers(), st.floats(), st.booleans()))
def test_int_keys_take_only_integers_in_range(key, value):
    try:
        cfg = load_config(None, {key: value})
    except ConfigError as err:
        assert f"'{key}'" in one_line(err)
        return
    assert not isinstance(value, bool) and value == int(value) and allowed(key, float(value))
    assert cfg[key] == int(value)


@SETTINGS
@given(text=st.text(max_size=300))
def test_any_yaml_text_is_loaded_or_refused_naming_the_file(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in one_line(err)


@SETTINGS
@given(data=st.binary(max_size=200))
def test_any_bytes_are_loaded_or_refused_naming_the_file(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as err:
        assert str(path) in one_line(err)


# a structured YAML document: sections and keys from the schema (and some strangers), values of any type
YAML_VALUES = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**6, max_value=10**6),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12),
                        st.lists(st.integers(), max_size=3))
SECTIONS = sorted({k.split(".")[0] for k in KEYS})


@SETTINGS
@given(doc=st.dictionaries(st.sampled_from(SECTIONS + ["extra"]),
                           st.dictionaries(st.sampled_from(sorted({k.split(".")[1] for k in KEYS}) + ["zzz"]),
                                           YAML_VALUES, max_size=4), max_size=4))
def test_structured_documents_are_checked_key_by_key(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(yaml.safe_dump(doc), encoding="utf-8")
    try:
        cfg = load_config(path)
    except ConfigError as err:
        assert str(path) in one_line(err)
        return
    for section, values in doc.items():
        for key, value in values.items():
            assert f"{section}.{key}" in DEFAULTS
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert cfg[f"{section}.{key}"] == value


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lr: 0.1\n  lr: 0.2\n", "duplicate key 'lr'"),
    ("train:\n  lr: .inf\n", "not a finite number"),
    ("privacy:\n  delta: .nan\n", "not a finite number"),
    ("a: &a [*a]\n", "aliases"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper"),
    ("run:\n  seed: " + "9" * 5000 + "\n", "integer of 5000 characters"),
])
def test_hostile_yaml_is_refused_by_line(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in one_line(err.value) and needle in str(err.value)


def test_non_utf8_and_non_regular_files(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("train:\n  optimizer: s\xe9d\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(tmp_path)


@pytest.mark.parametrize("override, needle", [
    ("train.lr=nan", "finite"), ("train.momentum=-0.1", ">= 0.0"), ("train.weight_decay=-1", ">= 0.0"),
    ("privacy.budget=inf", "finite"), ("privacy.budget=0", "> 0.0"), ("privacy.delta=0", "> 0.0"),
    ("privacy.delta=1", "< 1.0"), ("privacy.target_epsilon=0", "> 0.0"), ("privacy.target_epsilon=inf", "finite"),
    ("federation.max_update_norm=nan", "finite"), ("federation.max_update_norm=0", "> 0.0"),
    ("model.name=resnet", "must be one of hafnet, sfer_mdfae"), ("model.preset=huge", "must be one of"),
    ("evaluation.benchmarks=fer2031", "unknown benchmark 'fer2031'"), ("evaluation.benchmarks=rafdb", "needs a path"),
    ("privacy.school_budgets=s1=inf", "finite epsilon"), ("privacy.school_budgets=s1=2,s1=3", "given twice"),
    ("run.name=../x", "run.name"), ("run.seed=-1", ">= 0"), ("data.root=a\tb", "control character"),
])
def test_values_that_used_to_pass(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert needle in one_line(err.value)


@SETTINGS
@given(rounds=st.integers(1, 1000), lr=st.floats(1e-6, 10.0), delta=st.floats(1e-12, 0.5), name=st.from_regex(
    r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"))
def test_valid_configs_survive_flowers_run_config(rounds, lr, delta, name):
    cfg = load_config(None, {"federation.rounds": rounds, "train.lr": lr, "privacy.delta": delta, "run.name": name})
    flat = {}

    def walk(tree, prefix=""):
        for k, v in tree.items():
            walk(v, f"{prefix}{k}.") if isinstance(v, dict) else flat.__setitem__(f"{prefix}{k}", v)

    walk(tomllib.loads(to_toml(cfg)))
    assert from_run_config(flat) == cfg
