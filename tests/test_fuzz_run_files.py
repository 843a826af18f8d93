"""A run directory's metrics.jsonl damaged (edited by hand, cut by a crash, or written by another tool) when
`fedfer simulate run.resume=RUN` continues it: the resume looks up the checkpoint's round in it and the closing
summary reads every line. A line that is not an object, has no integer round, holds metrics of the wrong
type or is not UTF-8 was a TypeError/KeyError/ValueError/UnicodeDecodeError after the run had finished (the
summary) or at the resume; such lines are now skipped, and a metric that is not a number prints as '?'.
`fedfer report` skipped such lines already, except an integer too long for Python (a ValueError).
Found by the session-22 fuzzing."""

from __future__ import annotations

import json

import pytest

from test_report import write_run

DAMAGED_LINES = {
    "a list": b"[1, 2]\n",
    "round a string": b'{"round": "x"}\n',
    "no round": b'{"a": 1}\n',
    "round true": b'{"round": true}\n',
    "evaluation a number": b'{"round": 0, "evaluation": {"fer2013": 5}}\n',
    "evaluation a list": b'{"round": 0, "evaluation": [1]}\n',
    "not UTF-8": b"\xff\xfe{\n",
    "an integer of 5000 digits": b'{"round": ' + b"9" * 5000 + b"}\n",
}


@pytest.mark.parametrize("damage", sorted(DAMAGED_LINES))
def test_the_summary_of_a_resumed_run_skips_a_damaged_metrics_line(tmp_path, capsys, damage):
    from fedfer.commands.simulate import print_summary

    run = write_run(tmp_path / "run", [1, 2], planned=2)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(DAMAGED_LINES[damage] + metrics.read_bytes())
    assert print_summary(run, 1.0) == 0
    out = capsys.readouterr().out
    assert "rounds completed   2 (last: 2)" in out and "synthetic-fer2013  accuracy" in out, out


def test_a_metric_that_is_not_a_number_prints_as_a_question_mark(tmp_path, capsys):
    from fedfer.commands.simulate import print_summary

    run = write_run(tmp_path / "run", [1, 2], planned=2)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    last = json.loads(lines[-1])
    last["evaluation"]["rafdb"].update(accuracy="high", uar=None)
    last["evaluation"]["rafdb"].pop("n", None)
    metrics.write_text("\n".join(lines[:-1] + [json.dumps(last)]) + "\n")
    assert print_summary(run, 1.0) == 0
    rafdb = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("rafdb"))
    assert "accuracy ?" in rafdb and "UAR ?" in rafdb and "n=?" in rafdb, rafdb


@pytest.mark.parametrize("damage", sorted(DAMAGED_LINES))
def test_the_resume_finds_the_checkpoints_round_past_a_damaged_metrics_line(tmp_path, damage):
    """server/run.py unevaluated_round: is the checkpoint's round already in metrics.jsonl?"""
    from server.run import unevaluated_round
    from server.run_dir import RunDirectory

    run = RunDirectory(write_run(tmp_path / "run", [1, 2], planned=3))
    run.metrics_path.write_bytes(DAMAGED_LINES[damage] + run.metrics_path.read_bytes())
    checkpoint = {"round": 2, "strategy": {"unevaluated": {"round": 2}}}
    assert unevaluated_round(run, checkpoint) is None   # round 2 has its line: nothing to evaluate again
    assert [r["round"] for r in run.metrics()][-2:] == [1, 2]
    assert all(isinstance(r["round"], int) and not isinstance(r["round"], bool) for r in run.metrics())


def test_report_skips_a_metrics_line_with_an_integer_too_long_for_python(tmp_path, capsys):
    from fedfer.cli import main as fedfer_main

    run = write_run(tmp_path / "run", [1, 2], planned=2)
    metrics = run / "metrics.jsonl"
    metrics.write_bytes(DAMAGED_LINES["an integer of 5000 digits"] + metrics.read_bytes())
    assert fedfer_main(["report", str(run)]) == 0, capsys.readouterr().err
    assert "metrics.jsonl line 1: not valid JSON" in (run / "report.md").read_text()


def test_report_and_summary_skip_an_events_line_whose_event_is_not_a_name(tmp_path, capsys):
    """{"event": [1]} in events.jsonl: the incident lookup hashed it (TypeError: internal error in `fedfer
    report`, and in the summary a finished run prints)."""
    from fedfer.cli import main as fedfer_main
    from fedfer.commands.simulate import print_summary

    run = write_run(tmp_path / "run", [1, 2], planned=2)
    (run / "events.jsonl").write_text('{"event": [1]}\n{"event": {"a": 1}}\n'
                                      '{"event": "rejected-school", "round": "1 | 2", "school": {"x": 1}, "reason": 5}\n')
    assert fedfer_main(["report", str(run)]) == 0, capsys.readouterr().err
    report = (run / "report.md").read_text()
    assert "| school refused for the run | 1 / 2 |" in report, report
    assert print_summary(run, 1.0) == 0


@pytest.mark.parametrize("config", ["model.name=resnet", 5, ["model.name"]])
def test_a_pretrained_checkpoint_whose_provenance_config_is_not_a_table_is_refused_in_one_line(config):
    """provenance {"config": "model.name=…"}: `key in str` matched a substring and str["model.name"] raised a
    TypeError (an internal error in `fedfer simulate model.pretrained=…`); 5 raised one at `in`."""
    from server.run import check_pretrained_model

    cfg = {"model.name": "hafnet", "model.preset": "cpu"}
    with pytest.raises(ValueError, match=r"model.pretrained: ck.pt: its provenance's config is a"):
        check_pretrained_model({"config": config}, cfg, "ck.pt")
