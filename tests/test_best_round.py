"""The best round (evaluation.keep_best): the server keeps the global model that scored best on the *public*
benchmarks as checkpoints/best.pt, across a resume, never chosen on the schools' held-out faces; the loaders
take it by path and say so when a run directory's latest round is not it; the report names it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord

from server.best_round import BestRoundRule, RoundScore, beats, best_of, round_score
from server.round_writer import RoundWriter
from server.run_dir import RoundRecord, RunDirectory, load_checkpoint_file
from shared_models.config import ConfigError, load_config
from shared_models.models import registry

PUBLIC, INDOMAIN = "synthetic-fer2013", "synthetic-indomain"
NO_STRATEGY = {"exhausted": [], "momentum": None}


def _config(tmp_path: Path, *overrides: str) -> dict:
    return load_config(None, [f"run.root={tmp_path / 'runs'}", "run.name=t", "model.preset=dp",
                              f"evaluation.benchmarks={PUBLIC},{INDOMAIN}", *overrides])


def _weights(cfg: dict, server_round: int) -> dict[str, torch.Tensor]:
    """A state dict of the configured model whose every tensor is filled with the round number (so a file
    shows which round's model it holds)."""
    return {name: torch.full_like(tensor, float(server_round)) if tensor.is_floating_point() else tensor
            for name, tensor in registry.build_from_config(cfg).state_dict().items()}


def _evaluation(public: float | None, indomain: float | None = None, **more: float) -> dict:
    scores = {PUBLIC: public, INDOMAIN: indomain, **more}
    return {name: {"accuracy": value, "n": 100} for name, value in scores.items() if value is not None}


def _run_rounds(writer: RoundWriter, cfg: dict, evaluations: dict[int, dict]) -> None:
    """Each round as the strategy hands it over: checkpoint when trained, then settled with its evaluation."""
    for server_round, evaluation in evaluations.items():
        record = RoundRecord(server_round, train={"school-a": {"status": "ok"}}, aggregated=True,
                             timing={"round_seconds": 1.0})
        arrays = ArrayRecord(_weights(cfg, server_round))
        writer.round_trained(record, arrays, dict(NO_STRATEGY))
        record.evaluation, record.evaluated_by = evaluation, "evaluator-node-1"
        writer.round_settled(record, arrays, dict(NO_STRATEGY), evaluator_expected=True)


def _best_file(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "t" / "checkpoints" / "best.pt"


def _best_json(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "runs" / "t" / "checkpoints" / "best.json").read_text())


def _kept_round(tmp_path: Path) -> int:
    """The round best.pt holds, read from its weights (not from its own label)."""
    checkpoint = load_checkpoint_file(_best_file(tmp_path))
    filled = {float(t.flatten()[0]) for t in checkpoint["state_dict"].values() if t.is_floating_point() and t.numel()}
    assert len(filled) == 1 and checkpoint["round"] == int(filled.pop())
    return checkpoint["round"]


def _new_run(tmp_path: Path, *overrides: str) -> tuple[RoundWriter, dict]:
    cfg = _config(tmp_path, *overrides)
    return RoundWriter(RunDirectory.create(cfg), cfg), cfg


def test_accuracy_rising_then_falling_keeps_the_best_round_not_the_last(tmp_path):
    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {r: _evaluation(acc, 0.5) for r, acc in zip(range(1, 6), (0.5, 0.7, 0.889, 0.6, 0.54))})
    assert _kept_round(tmp_path) == 3
    assert _best_json(tmp_path) == {"round": 3, "by": "mean", "score": 0.889, "accuracies": {PUBLIC: 0.889},
                                    "file": "best.pt"}
    # the round checkpoints are pruned to the last two as before; best.pt is never pruned
    names = sorted(p.name for p in _best_file(tmp_path).parent.glob("*.pt"))
    assert names == ["best.pt", "round-0004.pt", "round-0005.pt"]
    # the same format as a round checkpoint: the loaders build its model
    from fedfer.commands.results import build_model, load_checkpoint

    checkpoint = load_checkpoint(_best_file(tmp_path))
    assert checkpoint["round"] == 3 and checkpoint["best"]["accuracies"] == {PUBLIC: 0.889}
    build_model(checkpoint)


def test_a_tie_keeps_the_earlier_round_and_round_0_is_never_the_best(tmp_path):
    writer, cfg = _new_run(tmp_path)
    # round 0 is the start model (model.pretrained): scored, but not the federation's output
    _run_rounds(writer, cfg, {0: _evaluation(0.99), 1: _evaluation(0.7), 2: _evaluation(0.9), 3: _evaluation(0.9)})
    assert _kept_round(tmp_path) == 2


def test_the_schools_held_out_faces_never_choose_the_round(tmp_path):
    """In-domain (school data) rises while public falls: the public benchmark alone decides."""
    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.9, 0.50), 2: _evaluation(0.8, 0.70), 3: _evaluation(0.7, 0.95)})
    assert _kept_round(tmp_path) == 1 and set(_best_json(tmp_path)["accuracies"]) == {PUBLIC}
    # a run scored on the held-out faces only keeps no best round at all
    writer, cfg = _new_run(tmp_path / "indomain-only", f"evaluation.benchmarks={INDOMAIN}")
    _run_rounds(writer, cfg, {1: _evaluation(None, 0.5), 2: _evaluation(None, 0.9)})
    assert not _best_file(tmp_path / "indomain-only").exists()
    # also when the evaluation node names them with a split or an alias
    rule = BestRoundRule.from_config(cfg)
    assert round_score(1, _evaluation(None, None, **{"synthetic-indomain:all": 0.9}), rule) is None


def test_only_benchmarks_declared_public_choose_the_round(tmp_path, caplog):
    """The server sees only the names an evaluation node scores under: a deployed evaluation node given the
    schools' own faces as an image folder (or as anything not declared public) cannot choose the round. Only
    `evaluation.public_benchmarks` may, and its default lists the synthetic public sets alone."""
    faces = "imagefolder=/srv/lincoln/faces"   # what an evaluation node holding school faces might be given
    writer, cfg = _new_run(tmp_path / "school-faces", f"evaluation.benchmarks={PUBLIC},{faces}")
    with caplog.at_level("WARNING"):
        _run_rounds(writer, cfg, {1: _evaluation(0.9, imagefolder=0.40), 2: _evaluation(0.8, imagefolder=0.95),
                                  3: _evaluation(0.7, imagefolder=0.99)})
    assert _kept_round(tmp_path / "school-faces") == 1 and set(_best_json(tmp_path / "school-faces")["accuracies"]) == {PUBLIC}
    said = [r.getMessage() for r in caplog.records if "declared public" in r.getMessage()]
    assert said == ["[fedfer] imagefolder: is not declared public in evaluation.public_benchmarks, so the best round is "
                    "chosen on synthetic-fer2013; list a benchmark there only if it holds public data, never a school's "
                    "faces (docs/privacy.md)"]   # once, not every round
    # a deployment's real benchmark must be declared: until then no best round, and one line says why
    caplog.clear()
    writer, cfg = _new_run(tmp_path / "undeclared", "evaluation.benchmarks=fer2013=/data/fer2013.csv")
    with caplog.at_level("WARNING"):
        _run_rounds(writer, cfg, {1: {"fer2013": {"accuracy": 0.6}}, 2: {"fer2013": {"accuracy": 0.7}}})
    assert not _best_file(tmp_path / "undeclared").exists()
    assert "fer2013: is not declared public in evaluation.public_benchmarks, so no best round is kept" in caplog.text
    events = [json.loads(line) for line in (tmp_path / "undeclared" / "runs" / "t" / "events.jsonl").read_text().splitlines()]
    assert [(e["event"], e["benchmarks"]) for e in events] == [("benchmarks-not-public", ["fer2013"])]
    from server.report import build_report   # the report says why there is no best round, and what did not count

    assert ("**Best round:** none kept: fer2013 is not declared public in `evaluation.public_benchmarks`, and only a "
            "benchmark declared public may choose the model") in build_report(tmp_path / "undeclared" / "runs" / "t").read_text()
    assert "docs/privacy.md; imagefolder not declared public, so not counted)." in build_report(
        tmp_path / "school-faces" / "runs" / "t").read_text()
    writer, cfg = _new_run(tmp_path / "declared", "evaluation.benchmarks=fer2013=/data/fer2013.csv",
                           "evaluation.public_benchmarks=FER-2013,rafdb")   # any spelling the readers take
    _run_rounds(writer, cfg, {1: {"fer2013:test": {"accuracy": 0.6}}, 2: {"fer2013:test": {"accuracy": 0.7}}})
    assert _kept_round(tmp_path / "declared") == 2


@pytest.mark.parametrize("value, message", [
    ("synthetic-indomain", "evaluation.public_benchmarks': synthetic-indomain is the schools' own held-out students"),
    ("fer2013,synthetic-indomain:all", "'synthetic-indomain:all' must be a benchmark name alone (e.g. synthetic-indomain)"),
    ("fer2013=/data/x.csv", "'fer2013=/data/x.csv' must be a benchmark name alone (e.g. fer2013), without a split or path"),
    ("lincoln-faces", "evaluation.public_benchmarks': unknown benchmark 'lincoln-faces' (known: fer2013,"),
])
def test_the_public_benchmark_list_refuses_school_data_paths_and_unknown_names_in_one_line(value, message):
    with pytest.raises(ConfigError) as refused:
        load_config(None, [f"evaluation.public_benchmarks={value}"])
    assert message in str(refused.value) and "\n" not in str(refused.value)
    if "known: " in str(refused.value):   # the names it offers are ones that may be declared
        assert "synthetic-indomain" not in str(refused.value).split("known: ")[1]
    assert load_config(None, ["evaluation.public_benchmarks="])["evaluation.public_benchmarks"] == ""   # none: no best round


def test_a_resumed_run_keeps_the_best_from_before_the_stop(tmp_path):
    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.6), 2: _evaluation(0.9), 3: _evaluation(0.7)})
    # the resume: a new writer over the same run directory, as server/app.py builds it after run.resume
    resumed = RoundWriter(RunDirectory(tmp_path / "runs" / "t"), cfg, round_offset=3)
    assert resumed.best == RoundScore(2, "mean", {PUBLIC: 0.9})
    _run_rounds(resumed, cfg, {4: _evaluation(0.8), 5: _evaluation(0.85)})
    assert _kept_round(tmp_path) == 2
    _run_rounds(resumed, cfg, {6: _evaluation(0.95)})
    assert _kept_round(tmp_path) == 6 and _best_json(tmp_path)["round"] == 6


def test_a_stop_between_best_pt_and_best_json_is_repaired_on_resume(tmp_path):
    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.6), 2: _evaluation(0.9)})
    stale = _best_json(tmp_path) | {"round": 1, "score": 0.6, "accuracies": {PUBLIC: 0.6}}
    (_best_file(tmp_path).parent / "best.json").write_text(json.dumps(stale))
    resumed = RoundWriter(RunDirectory(tmp_path / "runs" / "t"), cfg, round_offset=2)
    assert resumed.best is not None and resumed.best.round == 2 and _best_json(tmp_path)["round"] == 2


def test_a_damaged_best_pt_is_named_and_rewritten_from_the_round_on_disk(tmp_path, caplog):
    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.9)})
    _best_file(tmp_path).write_bytes(b"not a checkpoint")
    resumed = RoundWriter(RunDirectory(tmp_path / "runs" / "t"), cfg, round_offset=1)
    assert resumed.best.round == 1 and _kept_round(tmp_path) == 1
    _run_rounds(resumed, cfg, {2: _evaluation(0.5)})
    assert _kept_round(tmp_path) == 1
    events = [json.loads(line) for line in (tmp_path / "runs" / "t" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["best-unreadable"] and "best.pt" in events[0]["reason"]


def test_a_run_from_before_best_pt_gets_it_on_resume_from_the_rounds_still_on_disk(tmp_path, caplog):
    """A run whose metrics.jsonl has a better round than best.pt (started before best.pt was kept: no best.pt) gets
    best.pt on resume from that round's checkpoint while it is on disk (the last two rounds are); when the best
    round's weights were pruned, a warning names it and the best round still on disk is kept."""
    writer, cfg = _new_run(tmp_path / "on-disk")
    _run_rounds(writer, cfg, {1: _evaluation(0.5), 2: _evaluation(0.9), 3: _evaluation(0.7)})
    for name in ("best.pt", "best.json"):
        (_best_file(tmp_path / "on-disk").parent / name).unlink()
    resumed = RoundWriter(RunDirectory(tmp_path / "on-disk" / "runs" / "t"), cfg, round_offset=3)
    assert resumed.best.round == 2 and _kept_round(tmp_path / "on-disk") == 2

    writer, cfg = _new_run(tmp_path / "pruned")
    _run_rounds(writer, cfg, {1: _evaluation(0.9), 2: _evaluation(0.5), 3: _evaluation(0.6)})
    for name in ("best.pt", "best.json"):
        (_best_file(tmp_path / "pruned").parent / name).unlink()
    with caplog.at_level("WARNING"):
        resumed = RoundWriter(RunDirectory(tmp_path / "pruned" / "runs" / "t"), cfg, round_offset=3)
    assert resumed.best.round == 3 and _kept_round(tmp_path / "pruned") == 3
    assert "round 1 scored best on the public benchmarks (0.900 on synthetic-fer2013) but its weights are no longer" in caplog.text
    _run_rounds(resumed, cfg, {4: _evaluation(0.55)})   # a later round must still beat round 3 to replace it
    assert _kept_round(tmp_path / "pruned") == 3


def test_keep_best_off_mean_and_first(tmp_path):
    writer, cfg = _new_run(tmp_path / "off", "evaluation.keep_best=off")
    _run_rounds(writer, cfg, {1: _evaluation(0.9), 2: _evaluation(0.5)})
    assert not _best_file(tmp_path / "off").exists()
    # two public benchmarks that disagree: round 1 is best on the first, round 2 on the mean
    two = {1: _evaluation(0.9, rafdb=0.2), 2: _evaluation(0.8, rafdb=0.5)}
    for by, expected in (("mean", 2), ("first", 1)):
        writer, cfg = _new_run(tmp_path / by, f"evaluation.keep_best={by}",
                               f"evaluation.benchmarks={INDOMAIN},{PUBLIC},rafdb=/data/raf",
                               f"evaluation.public_benchmarks={PUBLIC},rafdb")
        _run_rounds(writer, cfg, two)
        assert _kept_round(tmp_path / by) == expected, by
    with pytest.raises(ConfigError, match="evaluation.keep_best"):
        load_config(None, ["evaluation.keep_best=indomain"])
    # a resume keeps the run's choice: changing it would compare rounds by two different scores
    from server.run import ResumeRefused, refuse_changed_settings

    with pytest.raises(ResumeRefused, match=r"evaluation.keep_best='mean', the run-config now says "
                                            r"evaluation.keep_best='first'; checkpoints/best.pt was chosen by it so far"):
        refuse_changed_settings({"evaluation.keep_best": "first"}, {"evaluation.keep_best": "mean"}, tmp_path)


def test_rounds_are_compared_on_the_benchmarks_both_were_scored_on():
    best = RoundScore(1, "mean", {"fer2013": 0.9, "rafdb": 0.3})
    assert not beats(RoundScore(2, "mean", {"fer2013": 0.8}), best)      # a missing low benchmark does not help
    assert beats(RoundScore(2, "mean", {"fer2013": 0.95}), best)
    assert not beats(RoundScore(2, "mean", {"kdef": 0.99}), best)        # nothing in common: the best stays
    assert best_of({1: _evaluation(0.7), 2: _evaluation(0.7)}, BestRoundRule("mean", frozenset({PUBLIC}), PUBLIC)).round == 1


def test_the_loaders_take_the_best_round_by_path_and_name_it_for_a_run_directory(tmp_path, capsys):
    from fedfer.commands.classroom import _classifier
    from fedfer.commands.results import load_checkpoint

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.7), 2: _evaluation(0.889), 3: _evaluation(0.54)})
    run = tmp_path / "runs" / "t"
    # a run directory still means its latest round, and one line says where the best one is
    assert load_checkpoint(run)["round"] == 3
    notice = capsys.readouterr().err.strip()
    assert notice == (f"fedfer: {run}: using its latest round 3 (0.540 on the public benchmarks); round 2 scored best "
                      f"there (0.889 on {PUBLIC}): give {run}/checkpoints/best.pt to use it")
    # best.pt is the best round, for `fedfer evaluate` and `fedfer classroom report` alike
    assert load_checkpoint(run / "checkpoints" / "best.pt")["round"] == 2
    _, described = _classifier(run / "checkpoints" / "best.pt")
    assert described.endswith("(best.pt, round 2)") and capsys.readouterr().err == ""
    # model.pretrained: best.pt loads whole; a run directory is refused in one line naming best.pt
    model = registry.build_from_config(cfg)
    report = registry.load_pretrained(model, run / "checkpoints" / "best.pt")
    assert not report.missing and not report.shape_mismatched
    assert all(float(t.flatten()[0]) == 2.0 for t in model.state_dict().values() if t.is_floating_point() and t.numel())
    with pytest.raises(ValueError, match=r"a folder, not a checkpoint file; .*checkpoints/best\.pt"):
        registry.pretrained_provenance(run)
    # the ServerApp's start model (server/run.py) for a new run federating from it
    from server.run import start_model

    follow_up = _config(tmp_path / "next", f"model.pretrained={run / 'checkpoints' / 'best.pt'}")
    started = start_model(RunDirectory.create(follow_up), follow_up)
    assert all(float(t.flatten()[0]) == 2.0 for t in started.state_dict().values() if t.is_floating_point() and t.numel())


def test_no_notice_when_the_latest_round_is_the_best(tmp_path, capsys):
    from fedfer.commands.results import load_checkpoint

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.7), 2: _evaluation(0.8)})
    load_checkpoint(tmp_path / "runs" / "t")
    assert capsys.readouterr().err == ""


def test_the_report_names_the_best_round_and_marks_it_on_the_accuracy_plot(tmp_path, monkeypatch):
    from server import plots
    from server.report import build_report

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.7, 0.5), 2: _evaluation(0.889, 0.6), 3: _evaluation(0.54, 0.9)})
    marked: list = []
    drawn = plots.accuracy_curves
    monkeypatch.setattr(plots, "accuracy_curves", lambda *a, **k: marked.append(k.get("best_round")) or drawn(*a, **k))
    text = build_report(tmp_path / "runs" / "t").read_text()
    assert (f"**Best round:** best round 2 on the public benchmarks: 0.889 on {PUBLIC}; last round 3: 0.540 — its "
            "model is `checkpoints/best.pt`") in text
    assert marked == [2]


@pytest.mark.parametrize("content", ["{not json", "[]", "[" * 100_000, '{"round": "2", "by": "mean", "accuracies": {"a": 0.9}}',
                                     '{"round": 2, "by": "mean", "accuracies": {"a": NaN}}',
                                     '{"round": 2, "by": "mean", "accuracies": {"synthetic-indomain": 0.9}}',
                                     '{"round": 0, "by": "mean", "accuracies": {"a": 0.9}}', " " * 70_000, "fifo"])
def test_a_damaged_best_json_is_ignored_by_the_loaders_and_the_report(tmp_path, capsys, content):
    """best.json is a convenience (best.pt is the authority): whatever it holds, a run directory still loads
    its latest round without a traceback or a notice, and the report still builds."""
    from fedfer.commands.results import load_checkpoint
    from server.report import build_report

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.9), 2: _evaluation(0.5)})
    best_json = _best_file(tmp_path).parent / "best.json"
    if content == "fifo":   # a named pipe planted there must not hang the loader
        best_json.unlink()
        os.mkfifo(best_json)
    else:
        best_json.write_text(content)
    assert load_checkpoint(tmp_path / "runs" / "t")["round"] == 2
    assert capsys.readouterr().err == ""
    assert "its `best.json` is unreadable" in build_report(tmp_path / "runs" / "t").read_text()


def test_the_simulate_summary_names_the_best_model(tmp_path, capsys):
    from fedfer.commands.simulate import print_summary

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.7, 0.5), 2: _evaluation(0.889, 0.6), 3: _evaluation(0.54, 0.9)})
    run = tmp_path / "runs" / "t"
    assert print_summary(run, 1.0) == 0
    assert (f"  best model         {run}/checkpoints/best.pt (best round 2 on the public benchmarks: 0.889 on {PUBLIC}; "
            "last round 3: 0.540)") in capsys.readouterr().out.splitlines()


def test_fedfer_report_names_the_best_round_and_what_the_last_scored(tmp_path, capsys):
    """README: `fedfer report runs/<id>` "names the best round and what the last one scored"; it printed only the
    report's path."""
    from fedfer.cli import main

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.7, 0.5), 2: _evaluation(0.889, 0.6), 3: _evaluation(0.54, 0.9)})
    run = tmp_path / "runs" / "t"
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        str(run / "report.md"),
        f"  best round 2 on the public benchmarks: 0.889 on {PUBLIC}; last round 3: 0.540 — kept as {run}/checkpoints/best.pt"]


def test_a_crafted_best_pt_runs_no_code_when_a_resume_reads_it(tmp_path):
    """best.pt is read with torch.load(weights_only=True) like every checkpoint: a pickle with a payload planted
    as best.pt is refused (named, then replaced), and its payload never runs."""
    from simulations.fuzz_inputs import malicious_checkpoint

    writer, cfg = _new_run(tmp_path)
    _run_rounds(writer, cfg, {1: _evaluation(0.9)})
    marker = tmp_path / "EXECUTED"
    malicious_checkpoint(_best_file(tmp_path), marker)
    resumed = RoundWriter(RunDirectory(tmp_path / "runs" / "t"), cfg, round_offset=1)
    assert not marker.exists()
    assert resumed.best.round == 1 and _kept_round(tmp_path) == 1   # rewritten from round-0001.pt


def test_the_compare_line_for_a_best_round_that_is_the_last_reads_without_nested_brackets():
    """`fedfer simulate`'s summary puts the line in brackets: "(best round 6 ...: 0.889 on x (the last round))"
    read badly; a best round that is also the last now ends ", the last round"."""
    from server.best_round import compare_line

    best = RoundScore(6, "mean", {"synthetic-fer2013": 0.889})
    line = compare_line(best, RoundScore(6, "mean", {"synthetic-fer2013": 0.889}))
    assert line == "best round 6 on the public benchmarks: 0.889 on synthetic-fer2013, the last round"
    assert "(" not in line


def test_the_compare_line_says_when_the_start_model_scored_higher_than_every_round():
    """A deployed one-round run: the pre-trained start scored 0.889 on fer2013, round 1 0.777; the line read "best
    round 1 on the public benchmarks: 0.777 on fer2013, the last round — kept as …/best.pt", and an admin would take
    best.pt for the best model the run saw. Round 0 is never a candidate (docs/simulation.md), so say it beside."""
    from server.best_round import RoundScore, compare_line

    best = RoundScore(1, "mean", {"fer2013": 0.777})
    start = {"fer2013": {"accuracy": 0.889, "n": 840}}
    line = compare_line(best, RoundScore(1, "mean", {"fer2013": 0.777}), start)
    assert line == ("best round 1 on the public benchmarks: 0.777 on fer2013, the last round; "
                    "the start model (round 0) scored 0.889 there, higher than every round"), line
    # a start that scored lower, or on other benchmarks only, adds nothing
    assert compare_line(best, None, {"fer2013": {"accuracy": 0.5}}) == "best round 1 on the public benchmarks: 0.777 on fer2013"
    assert "start model" not in compare_line(best, None, {"rafdb": {"accuracy": 0.99}})
