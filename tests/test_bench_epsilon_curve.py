"""simulations/bench/epsilon_curve.py: the runs it asks for, its summary, its refusals and its figure."""

import pytest

from shared_models.config import load_config
from simulations.bench import epsilon_curve as curve


def test_each_point_sets_epsilon_with_a_consistent_budget_or_switches_the_noise_off():
    private = curve.point_overrides(["federation.rounds=2"], 2.0, repeat=1)
    cfg = load_config(None, private)
    assert cfg["privacy.target_epsilon"] == 2.0 and cfg["privacy.budget"] == 2.0
    assert cfg["privacy.max_round_epsilon"] == 2.0 and cfg["run.seed"] == 1 and cfg["federation.rounds"] == 2
    assert cfg["privacy.noise_multiplier"] == 0.0                 # calibrated to the ε, not fixed
    large = load_config(None, curve.point_overrides([], 16.0, repeat=0))
    assert large["privacy.target_epsilon"] == 16.0                # above the default budget: raised with it
    noise_free = load_config(None, curve.point_overrides([], None, repeat=2))
    assert 0 < noise_free["privacy.noise_multiplier"] < 1e-3


def _run(indomain: float, public: float, alone: float | None) -> dict:
    return {"sigma": 1.4, "indomain": {"accuracy": indomain}, "public": {"accuracy": public},
            "best_alone_indomain": alone}


def test_summary_gives_mean_min_max_over_runs_and_the_margin_over_the_school_alone():
    s = curve.summarise([_run(0.80, 0.90, 0.70), _run(0.84, 0.88, 0.74), _run(0.82, 0.89, 0.72)])
    assert s["runs"] == 3 and s["indomain"] == {"mean": 0.82, "min": 0.8, "max": 0.84}
    assert s["public"]["min"] == 0.88 and s["best_alone_indomain"]["mean"] == 0.72
    assert s["margin_over_alone_points"] == 10.0
    assert "best_alone_indomain" not in curve.summarise([_run(0.8, 0.9, None)])


@pytest.mark.parametrize("bad", ["", "0,8", "-1", "nan", "inf", "eight"])
def test_bad_epsilon_lists_are_refused_in_one_line_before_anything_runs(bad, capsys):
    assert curve.main(["--epsilons", bad, "--out", "unused.json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("epsilon curve:") and "\n" not in err


def test_an_epsilon_beyond_the_policy_rule_is_refused_before_anything_runs(capsys):
    """--epsilons 8,2000 started the federation and failed in a worker when the schools' policies were written
    (budget 2000 is above privacy/policy.py MAX_EPSILON); now refused at once, naming the point and the key."""
    assert curve.main(["--epsilons", "8,2000", "--out", "unused.json"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("epsilon curve: --epsilons 2000: key 'privacy.") and "at most 1000" in err, err
    assert err.count("\n") == 1


def test_a_bad_override_is_refused_before_anything_runs(capsys):
    assert curve.main(["--epsilons", "8", "privacy.delta=2"]) == 2
    assert "privacy.delta" in capsys.readouterr().err


def test_the_figure_is_written(tmp_path):
    points = {"ε 2": [_run(0.78, 0.86, 0.70)], "ε 8": [_run(0.84, 0.89, 0.79), _run(0.85, 0.90, 0.80)],
              "noise off": [_run(0.84, 0.90, 0.79)]}
    summary = {label: curve.summarise(runs) for label, runs in points.items()}
    path = curve.plot(summary, points, {"indomain": 0.78, "public": 0.90}, tmp_path / "curve.png", title="t")
    assert path.exists() and path.read_bytes()[:4] == b"\x89PNG"


def test_replot_pools_repeats_of_the_same_runs_keeps_other_settings_apart_and_draws_a_baseline(tmp_path):
    import json

    def record(runs: dict, lr: float) -> dict:
        return {"summary": {k: curve.summarise(v) for k, v in runs.items()}, "runs": runs,
                "start": {"indomain": 0.78, "public": 0.9},
                "config": {"federation.schools": 10, "federation.rounds": 6, "train.lr": lr, "run.seed": 0}}

    new, more, old = tmp_path / "new.json", tmp_path / "more.json", tmp_path / "old.json"
    new.write_text(json.dumps(record({"ε 1": [_run(0.80, 0.88, 0.73)]}, lr=0.4)))
    more_runs = record({"ε 1": [_run(0.78, 0.87, 0.71)]}, lr=0.4)
    more_runs["config"]["run.seed"] = 2          # a third run of the same setting: pooled
    more.write_text(json.dumps(more_runs))
    old.write_text(json.dumps(record({"ε 1": [_run(0.60, 0.62, 0.34)], "ε 8": [_run(0.84, 0.89, 0.79)]}, lr=1.5)))
    out = tmp_path / "merged.json"
    assert curve.main(["--replot", f"{new},{old},{more}", "--baseline", str(old), "--out", str(out)]) == 0
    merged = json.loads(out.read_text())
    assert merged["summary"]["ε 1"]["runs"] == 2 and merged["summary"]["ε 1"]["indomain"]["mean"] == 0.79
    assert merged["sources"] == {"ε 1": [str(new), str(more)], "ε 8": [str(old)]}   # lr 1.5's ε 1 left out
    assert merged["command"].startswith("python -m simulations.bench.epsilon_curve --replot")
    assert (tmp_path / "merged.png").read_bytes()[:4] == b"\x89PNG"
    assert curve.main(["--replot", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.json")]) == 2
