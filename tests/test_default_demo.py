"""The default demo is a district (issue 14): at least 10 schools of realistic, varying size, pre-trained on
public data, fine-tuned under student-level DP at ε 8 — read from shared_models/defaults.yaml and the
generator's own school sizes (nothing generated). The earlier demo and the 12-round district stay
reachable as config files. And the demo's timing bench reads phases off the command's output."""

from __future__ import annotations

import sys
from pathlib import Path

from shared_models.config import load_config
from simulations import synth
from simulations.bench.default_demo import _pretrained_seconds, run_timed

ROOT = Path(__file__).resolve().parent.parent


def _sizes(cfg: dict) -> list[int]:
    params = synth.params_from_config(cfg)
    return [synth.school_profile(params, i).num_students for i in range(int(cfg["federation.schools"]))]


def test_the_default_demo_is_a_pretrained_district_of_realistic_schools():
    cfg = load_config(None, [])
    assert cfg["federation.schools"] >= 10 and cfg["federation.fraction_train"] == 1.0
    assert cfg["model.pretrain"] == "auto" and not cfg["model.pretrained"]
    assert cfg["privacy.enabled"] and cfg["privacy.unit"] == "student" and cfg["privacy.target_epsilon"] == 8.0
    sizes = _sizes(cfg)
    assert all(300 <= n <= 1500 for n in sizes), sizes
    assert max(sizes) >= 2 * min(sizes), sizes   # small and large schools, not ten copies of one
    spread = cfg["data.school_size_spread"] / 100
    mean = cfg["data.students_per_school"]   # the range any seed can draw stays the realistic one too
    assert mean * (1 - spread) >= 300 - 1 and mean * (1 + spread) <= 1500 + 1


def test_the_earlier_demo_and_the_long_district_stay_reachable():
    scratch = load_config(ROOT / "configs" / "from-scratch.yaml", [])
    assert (scratch["federation.schools"], scratch["federation.rounds"], scratch["model.pretrain"]) == (6, 10, "")
    assert scratch["data.students_per_school"] == 4000 and scratch["data.school_size_spread"] == 30
    district = load_config(ROOT / "configs" / "district.yaml", [])
    assert (district["federation.schools"], district["federation.rounds"], district["model.pretrain"]) == (10, 12, "auto")
    assert (min(_sizes(district)), max(_sizes(district))) == (464, 667)   # the district docs/experiments.md measured


def test_the_timing_bench_reads_phases_off_the_output(tmp_path):
    lines = ["synthetic classroom: 10/20 images (public)", "run directory: /r", "pre-trained model: /x.pt (3.0 s)",
             "  pretrained: /x.pt: loaded 90 tensors, 0 kept their initial value", "  round 1/6: schools 10/10 ok",
             "summary"]
    script = "\n".join(f"print({line!r}, flush=True)" for line in lines)
    code, seconds, marks = run_timed([sys.executable, "-c", script], {}, tmp_path / "out.log")
    assert code == 0 and seconds >= 0
    assert set(marks) == {"data_ready", "pretrained", "run_dir", "serverapp", "round_1", "summary"}
    assert (marks["data_ready"] <= marks["run_dir"] <= marks["pretrained"] <= marks["serverapp"] <= marks["round_1"]
            <= marks["summary"])
    assert "pre-trained model: /x.pt (3.0 s)" in (tmp_path / "out.log").read_text()
    assert _pretrained_seconds(tmp_path / "out.log") == 3.0


def test_the_timing_bench_reads_a_cached_start_model(tmp_path):
    """A cached start model is named before the run directory; it ends the data phase and the pre-training's."""
    lines = ["pre-trained model (cached): /x.pt", "fedfer simulate: 10 schools", "run directory: /r",
             "  pretrained: /x.pt: loaded 90 tensors", "  round 1/6", "summary"]
    script = "\n".join(f"print({line!r}, flush=True)" for line in lines)
    code, _, marks = run_timed([sys.executable, "-c", script], {}, tmp_path / "out.log")
    assert code == 0 and set(marks) == {"data_ready", "pretrained", "run_dir", "serverapp", "round_1", "summary"}
    assert marks["data_ready"] <= marks["pretrained"] <= marks["run_dir"]
    assert _pretrained_seconds(tmp_path / "out.log") == 0.0
