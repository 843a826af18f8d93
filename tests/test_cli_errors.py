"""The top-level `fedfer` command: user-input errors are one line and exit 2, never a traceback;
`--debug` shows the traceback; a bug is one `internal error` line and exit 70 (not 1)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from fedfer import cli


def _run(argv: list[str], handler) -> int:
    """main() with one stand-in command whose handler is `handler`."""
    parser = argparse.ArgumentParser(prog="fedfer")
    parser.add_argument("--debug", action="store_true")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("boom").set_defaults(func=handler)
    original = cli.build_parser
    cli.build_parser = lambda: parser
    try:
        return cli.main(argv)
    finally:
        cli.build_parser = original


def raise_(exc: BaseException):
    def handler(_args):
        raise exc
    return handler


def test_own_error_classes_and_oserrors_are_one_line(capsys):
    from shared_models.config import ConfigError

    assert _run(["boom"], raise_(ConfigError("c.yaml: key 'train.lr' must be a finite number"))) == 2
    assert capsys.readouterr().err == "fedfer: c.yaml: key 'train.lr' must be a finite number\n"
    assert _run(["boom"], raise_(IsADirectoryError(21, "Is a directory", "/x/report.md"))) == 2
    assert capsys.readouterr().err == "fedfer: /x/report.md: Is a directory\n"


def test_a_bug_is_an_internal_error_not_a_user_error(capsys):
    assert _run(["boom"], raise_(KeyError("model"))) == cli.EXIT_INTERNAL_ERROR
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "--debug" in err
    assert cli.EXIT_INTERNAL_ERROR != 1   # 1 is `privacy attack`'s "bound above the claim"


def test_debug_shows_the_traceback():
    with pytest.raises(KeyError):
        _run(["--debug", "boom"], raise_(KeyError("model")))


def test_every_command_module_is_imported_and_no_resume_command():
    parser = cli.build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"simulate", "evaluate", "report", "privacy", "deploy", "models"} <= set(commands)
    assert "resume" not in commands
    assert "resume" not in cli.COMMAND_MODULES.__repr__() and "# evaluate, report, resume" not in Path(cli.__file__).read_text()


def test_a_wrong_run_directory_is_a_user_error_in_every_command_that_takes_one(tmp_path, capsys):
    # `runs/anchors` sits beside the runs and is the easy wrong path; it holds no checkpoint
    anchors = tmp_path / "runs" / "anchors"
    anchors.mkdir(parents=True)
    (anchors / "school-00.json").write_text("{}")
    lesson = tmp_path / "lesson"
    lesson.mkdir()
    assert cli.main(["classroom", "report", str(lesson), "--checkpoint", str(anchors)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err and "not a run directory" in err
    # `fedfer report` writes nothing into a folder of something else (an empty one is a run just started)
    assert cli.main(["report", str(anchors)]) == 2
    assert "it holds school-00.json" in capsys.readouterr().err
    assert not (anchors / "report.md").exists()


def test_an_unknown_model_named_on_the_command_line_is_a_user_error(capsys):
    assert cli.main(["train-central", "--model", "nosuch"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err and "model.name" in err and "'nosuch'" in err


@pytest.mark.parametrize("epochs", ["0", "-1"])
def test_train_central_refuses_epochs_below_one_before_making_data(tmp_path, monkeypatch, capsys, epochs):
    """--epochs -1 generated the synthetic classroom, then ended in an UnboundLocalError (internal error)."""
    from fedfer.commands import simulate

    monkeypatch.setattr(simulate, "_ensure_data", lambda *a, **k: pytest.fail("data made for a refused command"))
    assert cli.main(["train-central", "--epochs", epochs]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error" not in err and f"--epochs must be >= 1, got {epochs}" in err, err


@pytest.mark.parametrize("out", ["folder", "a-file/x.pt", "/dev/null/x.pt"])
def test_pretrain_refuses_an_out_it_cannot_write_before_training(tmp_path, monkeypatch, capsys, out):
    """An --out under a file (or a folder) failed only when the checkpoint was written, after the training."""
    import simulations.pretrain as pretrain

    (tmp_path / "folder").mkdir()
    (tmp_path / "a-file").write_text("x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pretrain, "pretrain", lambda *a, **k: pytest.fail("trained for a refused --out"))
    assert cli.main(["pretrain", "--out", out, "--benchmark", "fer2013:train=/nonexistent.csv", "--no-evaluate"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out {out}:" in err and "internal error" not in err, err


@pytest.mark.parametrize("flags, words", [(["--threads", "100000"], "--threads must be in 1..1024, got 100000"),
                                          (["--threads", "0"], "--threads must be in 1..1024, got 0"),
                                          (["--seed", "-1"], "--seed must be >= 0, got -1")])
def test_evaluate_flags_out_of_range_are_one_line_naming_the_flag(tmp_path, capsys, flags, words):
    """--threads 100000 crashed the process (exit 139: OpenBLAS could not start the threads); --seed -1 was
    numpy's 'expected non-negative integer' after the model was loaded."""
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "ck.pt"), "--benchmark", "synthetic-fer2013",
                     *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "internal error" not in err, err


@pytest.mark.parametrize("argv, usage", [([], "usage: fedfer "), (["data"], "usage: fedfer data ")])
def test_a_command_group_without_its_command_prints_its_help_and_exits_2(argv, usage, capsys):
    # `fedfer` and `fedfer data` alone ended in a NameError traceback (main named a parser it did not have)
    assert cli.main(argv) == 2
    assert capsys.readouterr().out.startswith(usage)
