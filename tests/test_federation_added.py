"""The run report's "What the federation added": the federated model per round against the starting model,
all data pooled without privacy, and each school alone under the same DP (references.json)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from server import added
from server.report import build_report, load_run, render_markdown


def score(acc: float, n: int = 400) -> dict:
    return {"accuracy": acc, "accuracy_ci_low": acc - 0.02, "accuracy_ci_high": acc + 0.02, "n": n}


def both(public: float, indomain: float) -> dict:
    return {"synthetic-fer2013": score(public), "synthetic-indomain": score(indomain)}


REFERENCES = {
    "format": "fedfer-references/1",
    "benchmarks": {"public": "synthetic-fer2013", "indomain": "synthetic-indomain"},
    "start": {"scores": both(0.81, 0.69)},
    "federated": {"round": 3, "scores": {**both(0.84, 0.78), "per-school": {"0": score(0.80), "2": score(0.75)}}},
    "central": {"epochs": 2, "frames": 9000, "privacy": "none", "scores": both(0.86, 0.83)},
    "alone": {
        "school-00": {"students": 470, "privacy": {"epsilon": 7.99, "delta": 1e-5},
                      "scores": {**both(0.80, 0.70), "own-school": score(0.66)}},
        "school-02": {"students": 660, "privacy": {"epsilon": 8.0, "delta": 1e-5},
                      "scores": {**both(0.79, 0.72), "own-school": score(0.71)}},
    },
    "own": {"school-00": {"round": 3, "scores": {**both(0.82, 0.74), "own-school": score(0.83)}}},
    "noise-free": {"rounds": 3, "schools": 3, "privacy": "none", "scores": both(0.85, 0.79),
                   "curve": [{"round": r, "synthetic-indomain": a} for r, a in ((1, 0.73), (2, 0.76), (3, 0.79))]},
}


def write_run(run: Path, references: dict | str | None) -> Path:
    run.mkdir(parents=True)
    config = {"model": {"name": "hafnet", "preset": "dp"}, "federation": {"rounds": 3, "schools": 3},
              "privacy": {"enabled": True, "budget": 8.0, "delta": 1e-5, "unit": "student"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for r, (public, indomain) in enumerate([(0.81, 0.69), (0.82, 0.72), (0.83, 0.75), (0.84, 0.78)]):
        train = {} if r == 0 else {f"school-0{k}": {"status": "ok", "epsilon": round(2.6 * r + 0.01 * k, 3)}
                                   for k in range(3)}
        lines.append(json.dumps({"round": r, "train": train, "evaluation": both(public, indomain)}))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if references is not None:
        (run / "references.json").write_text(references if isinstance(references, str) else json.dumps(references))
    return run


def test_the_table_compares_the_federation_with_start_pooled_and_schools_alone(tmp_path):
    data = load_run(write_run(tmp_path / "run", REFERENCES))
    rows = added.rows(data.rounds, data.references, federation_epsilon=7.82)
    assert [r["key"] for r in rows] == ["start", "federation", "noise-free", "central", "best-alone", "each-alone"]
    by = {r["key"]: r for r in rows}
    assert by["start"]["label"].endswith("round 0") and by["start"]["indomain"]["accuracy"] == 0.69
    assert "after round 3" in by["federation"]["label"] and by["federation"]["indomain"]["accuracy"] == 0.78
    assert by["federation"]["privacy"] == "ε ≤ 7.82 per school"
    assert by["central"]["public"]["accuracy"] == 0.86 and by["central"]["privacy"].startswith("none")
    assert by["central"]["label"].endswith("2 epochs")   # how long the ceiling trained is part of what it means
    # the best school alone is picked on the schools' own faces (0.72 > 0.70), not on the public photos
    assert "school-02, 660 students" in by["best-alone"]["label"] and by["best-alone"]["privacy"] == "ε = 8.00"
    assert by["each-alone"]["indomain"] == {"accuracy": 0.70, "accuracy_high": 0.72}
    assert by["each-alone"]["public"] == {"accuracy": 0.79, "accuracy_high": 0.80}
    text = added.headline(rows)
    assert "78.0 %" in text and "+9.0 points against the starting model (69.0 %)" in text
    assert "+6.0 points against the best school alone (72.0 %)" in text
    assert "-5.0 points against pooling all data without privacy (83.0 %)" in text
    # what the privacy cost: the same federation with the noise off
    assert by["noise-free"]["label"].endswith("after round 3") and by["noise-free"]["indomain"]["accuracy"] == 0.79
    assert "-1.0 points against the same federation without privacy (79.0 %)" in text
    # and what fine-tuning did to the public photos: the start's 0.81 ± 0.02 against the federation's 0.84 ± 0.02
    assert text.endswith(" On the public photos it is level with the starting model within the 95 % CIs "
                         "(84.0 % against 81.0 %).")
    lower = [dict(r, public=score(0.70)) if r["key"] == "federation" else r for r in rows]
    assert added.headline(lower).endswith("it is 11.0 points below the starting model (70.0 % against 81.0 %).")
    higher = [dict(r, public=score(0.90)) if r["key"] == "federation" else r for r in rows]
    assert added.headline(higher).endswith("it is 9.0 points above the starting model (90.0 % against 81.0 %).")
    assert added.noise_free_curve(data.references, "synthetic-indomain") == {"round": [1, 2, 3], "accuracy": [0.73, 0.76, 0.79]}
    junk = {"noise-free": {"curve": [{"round": "x", "synthetic-indomain": 0.7}, 5, {"round": 1, "synthetic-indomain": float("nan")}]}}
    assert added.noise_free_curve(junk, "synthetic-indomain") == {"round": [], "accuracy": []}   # skipped, no crash
    assert added.per_school(data.references) == [
        {"school": "school-00", "students": 470, "alone": score(0.66), "federation": score(0.80),
         "federation_round": 3, "own-model": score(0.83)},
        {"school": "school-02", "students": 660, "alone": score(0.71), "federation": score(0.75),
         "federation_round": 3, "own-model": None}]


def test_report_draws_the_section_and_its_plot_and_says_when_references_are_missing(tmp_path):
    run = write_run(tmp_path / "run", REFERENCES)
    text = build_report(run).read_text()
    section = text.split("## What the federation added")[1].split("\n## ")[0]
    assert "| Federation (schools train privately together) — after round 3 | 84.00 [82.00, 86.00] | 78.00 [76.00, 80.00] | ε ≤ 7.82 per school |" in section
    assert "| Each school alone (same privacy): lowest to highest (2 schools) | 79.00 – 80.00 | 70.00 – 72.00 | ε ≤ 8.00 |" in section
    assert ("| The same federation without privacy (DP noise off) — after round 3 | 85.00 [83.00, 87.00] | "
            "79.00 [77.00, 81.00] | none (what the privacy cost) |") in section
    assert "| school-00 | 470 | 66.00 [64.00, 68.00] | 80.00 [78.00, 82.00] | 83.00 [81.00, 85.00] |" in section
    assert "| school-02 | 660 | 71.00 [69.00, 73.00] | 75.00 [73.00, 77.00] | — |" in section
    assert "![What the federation added](plots/federation_added.png)" in section
    from server.report import _added_panels

    schools_faces = _added_panels(load_run(run))[1]   # (d) drawn round by round, from the same start as the federation
    assert schools_faces["noise_free"]["round"] == [0, 1, 2, 3] and schools_faces["noise_free"]["accuracy"][0] == 0.69
    assert "noise-free" not in [key for key, _, _ in schools_faces["references"]]
    assert schools_faces["kept_round"] is None   # no best.pt here: the last round is the model, nothing to mark
    assert (run / "plots" / "federation_added.png").stat().st_size > 10_000

    # without references.json (and, cheaper, without drawing): the start and the federation only
    bare = render_markdown(load_run(write_run(tmp_path / "bare", None)), {})
    section = bare.split("## What the federation added")[1].split("\n## ")[0]
    assert "Starting model" in section and "pooled" not in section.split("|---|")[1].split("\n\n")[0]
    assert "`fedfer simulate --references`" in section

    broken = render_markdown(load_run(write_run(tmp_path / "broken", "{not json")), {})
    assert "references.json: unreadable" in broken and "## What the federation added" in broken


def keep_best_round(run: Path, best_round: int, public: float) -> None:
    """checkpoints/best.json as the run writes it (server/run_dir.py save_best): best.pt holds `best_round`."""
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "best.json").write_text(json.dumps(
        {"round": best_round, "by": "mean", "score": public, "accuracies": {"synthetic-fer2013": public}}))


def test_the_comparison_is_about_the_model_the_schools_get_and_matches_rounds_with_the_noise_free_run(tmp_path):
    """best.pt holds round 2, not the last round 3: the headline and the federation row are round 2's model
    (what every command uses), the last round is shown beside it, and (d) is taken after the same rounds."""
    references = json.loads(json.dumps(REFERENCES))
    references["noise-free"]["curve"] = [
        {"round": r, "synthetic-fer2013": p, "synthetic-indomain": i, "scores": both(p, i)}
        for r, p, i in ((1, 0.83, 0.73), (2, 0.84, 0.76), (3, 0.85, 0.79))]
    references["best"] = {"round": 2, "scores": {**both(0.83, 0.75), "per-school": {"0": score(0.77), "2": score(0.74)}}}
    run = write_run(tmp_path / "run", references)
    keep_best_round(run, 2, 0.83)
    data = load_run(run)
    from server.report import added_rows

    rows = added_rows(data)
    assert [r["key"] for r in rows] == ["start", "federation", "federation-last", "noise-free", "noise-free-last",
                                        "central", "best-alone", "each-alone"]
    by = {r["key"]: r for r in rows}
    assert by["federation"]["round"] == 2 and by["federation"]["indomain"]["accuracy"] == 0.75
    assert by["federation"]["label"].endswith("after round 2, the best on the public benchmarks (checkpoints/best.pt)")
    assert by["federation-last"]["round"] == 3 and by["federation-last"]["indomain"]["accuracy"] == 0.78
    # like with like: (d) after round 2 beside the federation's round 2, with its CI from the curve
    assert by["noise-free"]["label"].endswith("after round 2") and by["noise-free"]["indomain"] == score(0.76)
    assert by["noise-free-last"]["label"].endswith("after round 3") and by["noise-free-last"]["indomain"] == score(0.79)
    text = added.headline(rows)
    assert text.startswith("The federation's model in checkpoints/best.pt (round 2, the best on the public benchmarks) "
                           "recognises 75.0 % of expressions on the schools' own kind of faces")
    assert "+6.0 points against the starting model (69.0 %)" in text
    assert "-1.0 points against the same federation without privacy after round 2 (76.0 %)" in text
    assert "The last round, 3, scores 78.0 % there (without privacy after round 3: 79.0 %)." in text
    # each school in the federation: best.pt's model, and the table says which round
    assert [(row["federation"], row["federation_round"]) for row in added.per_school(data.references)] == [
        (score(0.77), 2), (score(0.74), 2)]
    section = render_markdown(data, {}).split("## What the federation added")[1].split("\n## ")[0]
    assert section.split("\n")[2] == text
    assert "| in the federation (round 2), % [95% CI] |" in section
    assert ("| Federation (schools train privately together) — after round 3, the last round | 84.00 [82.00, 86.00] | "
            "78.00 [76.00, 80.00] | ε ≤ 7.82 per school |") in section
    from server.report import _added_panels   # the plot marks the kept round: the model the headline is about

    panels = _added_panels(data)
    assert [panel["kept_round"] for panel in panels] == [2, 2]
    from server import plots

    assert plots.federation_added(panels, tmp_path / "added.png", title="t").stat().st_size > 10_000

    # best.pt is the last round: one federation row, said to be both
    keep_best_round(run, 3, 0.84)
    rows = added_rows(load_run(run))
    assert [r["key"] for r in rows][:3] == ["start", "federation", "noise-free"]
    assert rows[1]["label"].endswith("after round 3, the last and the best on the public benchmarks (checkpoints/best.pt)")
    assert added.headline(rows).startswith("The federation recognises 78.0 %") and "The last round" not in added.headline(rows)


def test_a_federation_that_stopped_early_is_compared_with_the_noise_free_run_at_its_own_last_round(tmp_path):
    """(d) always trains the planned rounds; the federation stopped after 3 of 5 (no school could train): its
    comparison is with (d) after round 3, not after (d)'s round 5. An older file (curve without CIs) still works."""
    references = json.loads(json.dumps(REFERENCES))
    references["noise-free"].update(rounds=5, scores=both(0.88, 0.86), curve=[
        {"round": r, "synthetic-indomain": a} for r, a in ((1, 0.73), (2, 0.76), (3, 0.77), (4, 0.82), (5, 0.86))])
    data = load_run(write_run(tmp_path / "run", references))
    by = {r["key"]: r for r in added.rows(data.rounds, data.references, federation_epsilon=7.82)}
    assert by["noise-free"]["label"].endswith("after round 3") and by["noise-free"]["indomain"] == {"accuracy": 0.77}
    assert by["noise-free"]["public"] is None   # this older curve has no public accuracy
    assert "+1.0 points against the same federation without privacy (77.0 %)" in added.headline(list(by.values()))


@pytest.mark.parametrize("value", ["central", "alone,central", "", "noise-free, central", "central,alone,noise-free"])
def test_references_config_key_accepts_the_kinds_and_refuses_others(value):
    from shared_models.config import ConfigError, load_config
    from simulations.references import requested

    cfg = load_config(overrides=[f"evaluation.references={value}"])
    assert requested(cfg) == [k for k in ("central", "alone", "noise-free") if k in value]
    for wrong in ("everything", f"{value},everything", "central;alone"):
        with pytest.raises(ConfigError, match="evaluation.references"):
            load_config(overrides=[f"evaluation.references={wrong}"])


@pytest.mark.parametrize("client_dp, moved", [(False, 1.5 + 2.25), (True, 2.0 + 2.0)])
def test_the_noise_free_reference_replays_the_servers_weighted_fedavgm_with_the_noise_off(monkeypatch, client_dp, moved):
    """(d) trains every school from the round's global model with σ ≈ 0 and its declared size, and takes the
    server's step: the average weighted by declared sizes, then FedAvgM's momentum (Flower's rule, lr 1);
    with client-level DP the strategy averages unweighted and without momentum, and so does (d)."""
    from shared_models.config import load_config
    from simulations import references

    cfg = load_config(overrides=["model.preset=dp", "federation.rounds=2", "federation.server_momentum=0.5",
                                 f"federation.client_dp={str(client_dp).lower()}"])
    start = {k: v.clone() for k, v in references.model_from(cfg, references.start_state(cfg)[0]).state_dict().items()}
    seen: list[tuple[float, int]] = []

    def fake_round(model, school, round_cfg, seed, declared_units=None, after_noise=None):   # noqa: ANN001
        # a school moves every weight by its own constant: 1 for the first school, 3 for the second
        seen.append((float(round_cfg["privacy.noise_multiplier"]), declared_units))
        with torch.no_grad():
            for p in model.state_dict().values():
                if p.is_floating_point():
                    p.add_(school)

    monkeypatch.setattr(references, "dp_round", fake_round)
    rounds: list[int] = []
    model, info = references.train_noise_free(cfg, [1.0, 3.0], start, [300, 100], after_round=lambda r, m: rounds.append(r))
    assert seen == [(references.NOISE_FREE_SIGMA, 300), (references.NOISE_FREE_SIGMA, 100)] * 2 and rounds == [1, 2]
    # weighted: 0.75·1 + 0.25·3 = 1.5 a round; momentum 0.5: round 1 +1.5, round 2 +(0.5·1.5 + 1.5) = +2.25
    # client-level DP: (1 + 3) / 2 = 2 a round, no momentum
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, start[key] + moved, atol=1e-5), key
    assert info["rounds"] == 2 and info["schools"] == 2 and info["privacy"] == "none"


def test_references_train_from_the_start_and_report_the_accountants_epsilon(tmp_path):
    """Tiny end to end: (b) and (c) are trained and scored, (c)'s ε is the accountant's for the σ, q and
    steps that ran, and drawing more frames per sampled student changes none of them."""
    from privacy.accounting import epsilon_of
    from privacy.engine import plan_from_config
    from server.run_dir import RunDirectory
    from shared_models.config import load_config
    from shared_models.models import registry
    from simulations import synth
    from simulations.references import compute_references

    tiny = ["federation.schools=2", "data.students_per_school=6", "data.frames_per_student=3", "data.public_students=2",
            "data.public_frames=7", "data.public_train_students=2", "data.public_train_frames=7",
            "data.heldout_students=2", "data.school_size_spread=0", "data.image_size=32", "evaluation.bootstrap=10",
            "federation.rounds=2", "train.batch_size=3", "train.frames_per_student=2",
            "evaluation.references=central,alone,noise-free", "evaluation.reference_schools=1",
            "evaluation.central_epochs=1",
            f"data.root={tmp_path / 'data'}"]
    cfg = load_config(overrides=tiny)
    root = synth.ensure_for_config(cfg)
    run = RunDirectory(tmp_path / "run")
    run.path.mkdir()
    run.save_checkpoint(2, registry.build_from_config(cfg).state_dict(), registry.model_info(cfg), cfg, {})
    from server.best_round import RoundScore   # round 1 scored best on the public benchmarks: what the schools get

    run.save_best(RoundScore(1, "mean", {"synthetic-fer2013": 0.5}), registry.build_from_config(cfg).state_dict(),
                  registry.model_info(cfg), cfg, [])
    # school-01 kept its own last model (client/school_round.py); school-00's file is broken: named and skipped
    from client.node import simulated_state_dir
    from client.school_round import OWN_MODEL

    own = simulated_state_dir(cfg, run.path, "school-01") / OWN_MODEL
    own.parent.mkdir(parents=True)
    torch.save({"round": 2, "model": registry.model_info(cfg), "state_dict": registry.build_from_config(cfg).state_dict()}, own)
    broken = simulated_state_dir(cfg, run.path, "school-00") / OWN_MODEL
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    said: list[str] = []
    record = json.loads(compute_references(cfg, run.path, root, echo=said.append).read_text())
    assert set(record["own"]) == {"school-01"} and record["own"]["school-01"]["round"] == 2
    assert any(line.startswith("school-00: its own model is not scored: ") for line in said)
    assert record["own"]["school-01"]["scores"]["own-school"]["n"] == 2 * 3   # its own held-out students
    assert "  (b) epoch 1/1" in said   # (b) trains for minutes at its default 32 epochs: it shows progress
    assert "reference (c): school-00 alone (6 students), same DP, 2 rounds" in said, said
    assert "reference (d): the same federation with the noise off (not private), 2 rounds, 2 schools" in said, said

    assert record["federated"]["round"] == 2 and set(record["federated"]["scores"]["per-school"]) == {"0", "1"}
    assert record["central"]["frames"] == 2 * 6 * 3 and record["central"]["scores"]["synthetic-indomain"]["n"] == 2 * 2 * 3
    plan = plan_from_config(cfg, 6)
    more_frames = plan_from_config({**cfg, "train.frames_per_student": 3}, 6)   # frames cost no privacy:
    assert (more_frames.noise_multiplier, more_frames.sample_rate, more_frames.steps) == (
        plan.noise_multiplier, plan.sample_rate, plan.steps) and more_frames.frames_per_unit == 3
    assert list(record["alone"]) == ["school-00"]   # one school asked for: the smallest (equal sizes: the first)
    quiet = record["noise-free"]   # (d): both schools, both rounds, scored after each (with CIs: compared by round)
    assert (quiet["rounds"], quiet["schools"]) == (2, 2) and [c["round"] for c in quiet["curve"]] == [1, 2]
    assert quiet["curve"][-1]["synthetic-indomain"] == quiet["scores"]["synthetic-indomain"]["accuracy"]
    assert quiet["curve"][-1]["scores"]["synthetic-indomain"] == quiet["scores"]["synthetic-indomain"]
    assert record["best"]["round"] == 1 and set(record["best"]["scores"]["per-school"]) == {"0", "1"}
    assert any(line.startswith("  (d) round 2/2: public ") for line in said)
    for sid in record["alone"]:
        privacy = record["alone"][sid]["privacy"]
        assert (privacy["noise_multiplier"], privacy["sample_rate"]) == (plan.noise_multiplier, plan.sample_rate)
        assert privacy["steps"] == 2 * plan.steps and privacy["rounds"] == 2
        spent = epsilon_of([(plan.noise_multiplier, plan.sample_rate, plan.steps)] * 2, 1e-5)
        assert privacy["epsilon"] == pytest.approx(spent) and spent == pytest.approx(8.0, abs=0.05)
        assert record["alone"][sid]["scores"]["own-school"]["n"] == 2 * 3


def test_the_district_config_is_a_district_of_the_issue():
    """configs/district.yaml: at least 10 schools of 300-1,500 students, student-level ε 8, pre-trained."""
    from shared_models.config import load_config

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "district.yaml", [])
    spread = cfg["data.school_size_spread"] / 100
    assert cfg["federation.schools"] >= 10 and cfg["model.pretrain"] == "auto"
    assert 300 <= cfg["data.students_per_school"] * (1 - spread) and cfg["data.students_per_school"] * (1 + spread) <= 1500
    assert (cfg["privacy.unit"], cfg["privacy.target_epsilon"], cfg["privacy.budget"]) == ("student", 8.0, 8.0)


def test_the_summary_points_at_the_schools_own_models(tmp_path, capsys):
    from fedfer.commands.simulate import print_summary

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("privacy:\n  delta: 1.0e-05\n")
    metric = {"accuracy": 0.8, "uar": 0.8, "macro_f1": 0.8, "n": 10}
    (run / "metrics.jsonl").write_text(json.dumps({"round": 1, "train": {"school-00": {"status": "ok", "epsilon": 8.0}},
                                                   "evaluation": {"synthetic-indomain": metric}}) + "\n")
    assert print_summary(run, 1.0) == 0
    out = capsys.readouterr().out
    assert "own models" not in out and "per-school ε at δ=1e-05 (PRV, lifetime)" in out
    (run / "config.yaml").write_text("privacy:\n  delta: 1.0e-06\n  accountant: rdp\ncanary:\n  delta: 0.5\n")
    assert print_summary(run, 1.0) == 0 and "per-school ε at δ=1e-06 (RDP, lifetime)" in capsys.readouterr().out
    for school in ("school-00", "school-01"):
        (run / "schools" / school).mkdir(parents=True)
        (run / "schools" / school / "own-model.pt").write_bytes(b"weights")
    assert print_summary(run, 1.0) == 0
    assert f"own models         {run / 'schools'}/<school>/own-model.pt (the last trained weights of 2 schools;" in capsys.readouterr().out


def test_a_one_epoch_ceiling_and_a_one_student_school_are_counted_in_the_singular(tmp_path):
    references = json.loads(json.dumps(REFERENCES))
    references["central"]["epochs"] = 1
    references["alone"]["school-02"]["students"] = 1
    data = load_run(write_run(tmp_path / "run", references))
    by = {r["key"]: r for r in added.rows(data.rounds, data.references, federation_epsilon=7.82)}
    assert by["central"]["label"].endswith("— 1 epoch")
    assert by["best-alone"]["label"].endswith("school-02, 1 student")
