"""The run report from a synthetic run directory (complete and partial), and the `fedfer report`
and `fedfer evaluate` commands."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import yaml

from fedfer.cli import main
from server.report import PAPER_MARK, build_report, load_run
from shared_models.labels import FER7
from shared_models.metrics import classification_report


def metric(accuracy_step: int, num_classes: int = 7, n: int = 70) -> dict:
    """A metric dict as evaluate_model returns it: the first `accuracy_step` samples right."""
    y_true = [i % num_classes for i in range(n)]
    y_pred = [t if i < accuracy_step else (t + 1) % num_classes for i, t in enumerate(y_true)]
    report = classification_report(y_true, y_pred, num_classes, n_boot=200, seed=0)
    report["labels"] = list(FER7[:num_classes])
    report["skipped"] = 0
    return report


def write_run(run: Path, rounds: list[int], refuse: dict[int, str] | None = None, torn: bool = False,
              planned: int = 5) -> Path:
    refuse = refuse or {}
    run.mkdir(parents=True)
    config = {"model": {"name": "hafnet", "preset": "cpu"}, "federation": {"rounds": planned, "schools": 3},
              "privacy": {"enabled": True, "budget": 3.0, "delta": 1e-5, "unit": "student"},
              "evaluation": {"benchmarks": "synthetic-fer2013,rafdb=/data/raf"}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "ledger").mkdir()
    lines = []
    for r in rounds:
        train = {}
        for k, school in enumerate(("school-0", "school-1", "school-2")):
            if refuse.get(r) == school:
                train[school] = {"num_examples": 0, "status": "budget-exhausted"}
                continue
            eps = round(0.8 * r * (1 + 0.2 * k), 3)
            train[school] = {"num_examples": 100 + k, "loss": 1.9 - 0.1 * r, "epsilon": eps, "status": "ok"}
            with (run / "ledger" / f"{school}.jsonl").open("a") as handle:
                handle.write(json.dumps({"school_id": school, "round": r, "epsilon": eps, "delta": 1e-5}) + "\n")
        lines.append(json.dumps({"round": r, "train": train,
                                 "evaluation": {"synthetic-fer2013": metric(20 + 8 * r), "rafdb": metric(30 + 5 * r)},
                                 "evaluated_by": "evaluator", "timing": {"train_s": 12.5, "evaluate_s": 2.0}}))
    text = "\n".join(lines) + "\n"
    if torn:
        text += '{"round": 99, "train": {'
    (run / "metrics.jsonl").write_text(text)
    return run


def test_report_builds_tables_and_plots(tmp_path):
    run = write_run(tmp_path / "run-a", [1, 2, 3, 4, 5])
    path = build_report(run)
    text = path.read_text()
    assert path == run / "report.md"
    for png in ("accuracy.png", "epsilon.png", "confusion_synthetic-fer2013.png", "confusion_rafdb.png"):
        file = run / "plots" / png
        assert file.is_file() and file.stat().st_size > 5000 and file.read_bytes()[:4] == b"\x89PNG"
        assert f"plots/{png}" in text
    final = metric(60)
    assert f"{100 * final['accuracy']:.2f} [{100 * final['accuracy_ci_low']:.2f}, {100 * final['accuracy_ci_high']:.2f}]" in text
    assert PAPER_MARK in text
    assert "| rafdb | accuracy |" in text and "89.70" in text and "(same model)" in text  # HAFNet's RAF-DB figure
    assert "92.93" in text  # SFER-MDFAE's, beside it
    assert "synthetic classroom data: no published figure" in text
    assert "| school-2 | 5 | 5.600 | -2.600 (over budget) |" in text
    assert "5 rounds recorded (last: 5 of 5 planned)" in text
    assert "| 3 | 3 | — | 62.86 | 64.29 | evaluator | train_s 12.5s, evaluate_s 2.0s |" in text


def test_report_tolerates_a_partial_run(tmp_path):
    run = write_run(tmp_path / "run-b", [1, 2, 4], refuse={4: "school-1"}, torn=True, planned=10)
    (run / "ledger" / "school-9.jsonl").write_text('{"school_id": "school-9", "round": "x"}\n')
    data = load_run(run)
    assert sorted(data.rounds) == [1, 2, 4]
    path = build_report(run)
    text = path.read_text()
    assert "rounds with no metrics line: 3" in text
    assert "partial run: 3 of 10 planned rounds recorded" in text
    assert "torn last line" in text
    assert "4: budget-exhausted" in text
    assert "needs integer 'round' and numeric 'epsilon'" in text
    assert (run / "plots" / "epsilon.png").is_file()


def test_report_of_an_empty_run_and_the_cli(tmp_path, capsys):
    run = tmp_path / "run-c"
    run.mkdir()
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    assert "no round recorded yet" in text and "metrics.jsonl: missing" in text
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "not a run directory" in capsys.readouterr().err


# -- fedfer evaluate ----------------------------------------------------------------------------------
torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402


class MeanDecoder(nn.Module):
    """Stand-in model: logits_c = -(w * mean(x) + b - c)^2; with the right w, b it decodes a face
    whose pixels encode its label."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.b = nn.Parameter(torch.zeros(()))
        self.num_classes = num_classes
        self.input_size = 16

    def forward(self, x):
        mean = x.flatten(1).mean(dim=1, keepdim=True) * self.w + self.b
        return -(mean - torch.arange(self.num_classes, dtype=torch.float32)) ** 2


@pytest.fixture
def stand_in_registry(monkeypatch):
    fake = types.ModuleType("shared_models.models.registry")
    fake.build = lambda name, num_classes, preset: MeanDecoder(num_classes)
    fake.available = lambda: ["stand-in"]
    fake.presets = lambda name: {"cpu": None}
    fake.unwrap = lambda model: model
    fake.clip_frames = lambda model: 0
    monkeypatch.setitem(sys.modules, "shared_models.models.registry", fake)
    import shared_models.models

    monkeypatch.setattr(shared_models.models, "registry", fake, raising=False)
    return fake


def test_evaluate_command_table_and_json(tmp_path, stand_in_registry, capsys):
    public = tmp_path / "synth" / "public"
    public.mkdir(parents=True)
    # pixel value v -> [-1, 1] via eval_transform: x = v/255*2-1; label = 3*(x+1) for v in {0, 85, 170, 255}
    rows = [f"{label},{' '.join([str(value)] * 2304)},PrivateTest" for label, value in ((0, 0), (2, 170), (6, 255), (6, 255))]
    (public / "fer2013.csv").write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    model = MeanDecoder(7)
    with torch.no_grad():
        model.w.fill_(3.0)
        model.b.fill_(3.0)
    checkpoint = tmp_path / "round-0003.pt"
    torch.save({"round": 3, "model": {"name": "stand-in", "preset": "cpu", "num_classes": 7},
                "state_dict": model.state_dict(), "config": {"data.root": str(tmp_path / "synth")}}, checkpoint)

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--benchmark", "synthetic-fer2013", "--json",
                 "--bootstrap", "50"]) == 0
    results = json.loads(capsys.readouterr().out)
    m = results["synthetic-fer2013"]
    assert m["n"] == 4 and m["accuracy"] == 0.75 and m["round"] == 3  # 170 -> 3 + 3*(0.333) = 4.0 -> class 4, wrong
    assert m["confusion"][2][4] == 1

    assert main(["evaluate", "--checkpoint", str(checkpoint), "--benchmark", "synthetic-fer2013",
                 "--benchmark", f"fer2013:all={public / 'fer2013.csv'}", "--bootstrap", "0"]) == 0
    table = capsys.readouterr().out
    assert "round 3" in table and "synthetic-fer2013" in table and "75.00" in table and "fer2013 " in table

    assert main(["evaluate", "--checkpoint", str(tmp_path / "missing.pt"), "--benchmark", "synthetic-fer2013"]) == 2
    assert "missing.pt: checkpoint not found" in capsys.readouterr().err
    torch.save({"round": 1, "state_dict": {}}, tmp_path / "bad.pt")
    assert main(["evaluate", "--checkpoint", str(tmp_path / "bad.pt"), "--benchmark", "synthetic-fer2013"]) == 2
    assert "missing 'model'" in capsys.readouterr().err
    assert main(["evaluate", "--checkpoint", str(checkpoint), "--benchmark", f"rafdb={tmp_path}"]) == 2
    assert "list_patition_label.txt" in capsys.readouterr().err


BROKEN_FIELDS = [
    ("train", "abc"), ("train", [1, "x"]), ("evaluation", True), ("evaluation", {"rafdb": [1, 2]}),
    ("timing", [1]), ("timing", "fast"), ("evaluated_by", {"a": 1}), ("round", 10**12),
    ("evaluation", {"rafdb": {"accuracy": 0.5, "confusion": [[1, 2], [3]], "labels": 5, "n": [1]}}),
    ("train", {"school-0": {"status": 7, "epsilon": "x"}}),
]


def test_report_survives_wrong_field_types(tmp_path, capsys):
    """Line i of metrics.jsonl carries the i-th wrong field; one report notes every line and still builds."""
    run = write_run(tmp_path / "run", list(range(1, len(BROKEN_FIELDS) + 2)), planned=len(BROKEN_FIELDS) + 1)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    for i, (field, value) in enumerate(BROKEN_FIELDS):
        broken = json.loads(lines[i])
        broken[field] = value
        lines[i] = json.dumps(broken)
    lines.insert(len(BROKEN_FIELDS), "[" * 100_000)   # nesting beyond the JSON parser's recursion limit
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["report", str(run)]) == 0
    text = (run / "report.md").read_text()
    for i in range(len(BROKEN_FIELDS) + 1):
        assert f"metrics.jsonl line {i + 1}:" in text, BROKEN_FIELDS[i]


@pytest.mark.parametrize("blocker", ["report-dir", "plots-file"])
def test_report_refuses_what_is_in_its_way(tmp_path, capsys, blocker):
    run = write_run(tmp_path / "run", [1], planned=1)
    if blocker == "report-dir":
        (run / "report.md").mkdir()
        (run / "report.md" / "keep").write_text("mine")
    else:
        (run / "plots").write_text("mine")
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and ("report.md" in err if blocker == "report-dir" else "plots" in err)
    assert ((run / "report.md" / "keep").read_text() if blocker == "report-dir" else (run / "plots").read_text()) == "mine"


def test_a_school_that_declined_keeps_its_lifetime_epsilon_in_the_summary_and_the_report(tmp_path, capsys):
    from fedfer.commands.simulate import print_summary

    run = write_run(tmp_path / "run", [1, 2], refuse={2: "school-1"})
    # school-1's ledger copy: its round here (after one in an earlier run), then its signed refusal at the same ε
    history = [[1.4, 0.3, 3]]
    (run / "ledger" / "school-1.jsonl").write_text("\n".join(json.dumps(entry) for entry in (
        {"school_id": "school-1", "round": 1, "event": "round", "epsilon": 2.5, "history_before": history},
        {"school_id": "school-1", "round": 2, "event": "refused", "epsilon": 2.5, "history_before": history * 2},
    )) + "\n")
    text = build_report(run).read_text()
    assert "| school-1 | 1 | 2.500 | 0.500 | 2: budget-exhausted |" in text   # the refusal is not a round trained
    assert "this run is federated, DP ε ≤ 2.50." in text   # what the schools spent (budget 3), as the table above says
    assert print_summary(run, 1.0) == 0
    out = capsys.readouterr().out
    assert "school-1     ε  2.500  after 1 round in this run\n" in out and "nan" not in out
    assert "school-0     ε  1.600  after 2 rounds in this run\n" in out


def test_a_deployments_setup_says_which_schools_and_benchmarks_took_part(tmp_path):
    run = write_run(tmp_path / "run", [1])
    config = yaml.safe_load((run / "config.yaml").read_text())
    # a deployed run's config keeps the simulation's defaults; the evaluation node scored its own benchmarks
    config["federation"]["schools"] = 10
    config["evaluation"]["benchmarks"] = "synthetic-fer2013,synthetic-indomain"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    text = build_report(run).read_text()
    assert "| schools that took part | 3 |" in text and "| benchmarks scored | rafdb, synthetic-fer2013 |" in text
    # the simulation's defaults the deployed run never used are labelled so ("schools `10`" read as ten schools)
    assert "| schools (simulation setting, not used here) | `10` |" in text
    assert "| benchmarks (simulation setting, not used here) | `synthetic-fer2013,synthetic-indomain` |" in text
    plain = build_report(write_run(tmp_path / "plain", [1])).read_text()
    assert "took part" not in plain and "benchmarks scored" not in plain and "simulation setting" not in plain
    assert "| schools | `3` |" in plain


def test_evaluate_says_why_a_benchmarks_extra_classes_count_as_errors():
    from fedfer.commands.results import class_mismatch_notes

    ferplus = {"labels": list(FER7) + ["contempt"], "model_classes": 7}
    assert class_mismatch_notes({"ferplus": ferplus, "fer2013": {"labels": list(FER7), "model_classes": 7}}) == [
        "note: ferplus has 8 classes and the model 7: its faces of contempt count as errors, and UAR averages over 8"]


def test_the_report_lists_what_the_coordinator_refused(tmp_path):
    """events.jsonl's refusals the per-round table cannot show: a node refused at the role query, an evaluation
    node's reply refused, a round left without scores; a node's text cannot break the table."""
    run = write_run(tmp_path / "run", [1, 2])
    events = [{"event": "query-error", "node_id": 7, "reason": "school id '../x' is not a name"},
              {"event": "evaluator-error", "round": 2, "reason": "benchmark 'x' has no accuracy in [0, 1]"},
              {"event": "not-evaluated", "round": 2, "reason": "no evaluation node | answered\nin time"},
              {"event": "rejected", "round": 1, "school": "school-0", "reason": "shown per round already"},
              *({"event": "ledger-gap", "round": 1, "school": f"s{i}", "reason": "gap"} for i in range(25))]
    (run / "events.jsonl").write_text("\n".join(json.dumps(e) for e in events) + "\n")
    text = build_report(run).read_text()
    section = text.split("## What the coordinator refused", 1)[1].split("\n## ", 1)[0]
    assert "| node refused at the role query |  | node 7 | school id '../x' is not a name |" in section
    assert "| evaluation node's reply refused | 2 |" in section
    assert "| round not evaluated | 2 |  | no evaluation node / answered in time |" in section
    assert "shown per round already" not in section and "… and 8 more in events.jsonl" in section
    assert "## What the coordinator refused" not in build_report(write_run(tmp_path / "quiet", [1])).read_text()


def test_each_school_is_measured_against_its_own_budget_not_the_runs_default(tmp_path):
    """A deployed run with `privacy.budget=8 privacy.school_budgets="school-1=24"` (a school that raised its budget
    beside one at 8): the report said school-1's 22.127 left "-14.127 (over budget)" against 8, while the audit
    (its own policy, 24) and the school's signed entries (budget 24) said 1.873 left, within budget. Each school's
    budget is the one its last ledger entry records (the tighter of its policy and the run's)."""
    run = write_run(tmp_path / "run", [1], refuse={1: "school-1"})
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["privacy"]["budget"], config["privacy"]["school_budgets"] = 8.0, "school-1=24"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "ledger" / "school-1.jsonl").write_text(json.dumps(
        {"school_id": "school-1", "round": 1, "event": "refused", "reason": "budget-exhausted", "epsilon": 22.127,
         "budget": 24.0}) + "\n")
    text = build_report(run).read_text()
    assert "| school-1 | 0 | 22.127 | 1.873 | 1: budget-exhausted |" in text, text
    assert "over budget" not in text
    assert "| school-0 | 1 | 0.800 | 7.200 | — |" in text   # no budget in its entries: the run's privacy.budget


def test_the_epsilon_plot_draws_each_schools_own_budget(tmp_path, monkeypatch):
    """The same run's plot drew one "budget ε = 8" line with school-1's 22.127 far above it: a school looking over
    budget on the page the privacy officer reads. With budgets of their own, one line per budget, naming its schools."""
    from server import plots

    run = write_run(tmp_path / "run", [1], refuse={1: "school-1"})
    (run / "ledger" / "school-1.jsonl").write_text(json.dumps(
        {"school_id": "school-1", "round": 1, "event": "refused", "reason": "budget-exhausted", "epsilon": 22.127,
         "budget": 24.0}) + "\n")
    drawn: list[tuple[float, str]] = []
    real_axhline = None

    def spy(self, y=0, *args, **kwargs):
        drawn.append((y, kwargs.get("label", "")))
        return real_axhline(self, y, *args, **kwargs)

    import matplotlib.axes
    real_axhline = matplotlib.axes.Axes.axhline
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", spy)
    plots.epsilon_curves({"school-0": {"round": [1], "epsilon": [0.8]}}, tmp_path / "one.png", title="t", budget=3.0,
                         school_budgets={"school-0": 3.0})
    assert drawn == [(3.0, "budget ε = 3")]
    drawn.clear()
    build_report(run)
    assert sorted(drawn) == [(3.0, "budget ε = 3 (school-0, school-2)"), (24.0, "budget ε = 24 (school-1)")], drawn


def test_a_one_round_run_is_plotted_with_whole_round_ticks_only(tmp_path, monkeypatch):
    """A one-round run's ε plot was ticked 0.96, 0.98, 1, 1.02, 1.04: matplotlib drops `integer=True` with fewer
    than two whole numbers in view. Every plot over rounds ticks whole rounds only."""
    from server import plots

    ticked: list[list[float]] = []
    real_save = plots.save_figure

    def save(fig, path, dpi=120):
        for ax in fig.axes[:1]:   # the rounds axis (epsilon_distribution's second panel is a histogram of ε)
            low, high = ax.get_xlim()
            ticked.append([float(t) for t in ax.get_xticks() if low <= t <= high])
        return real_save(fig, path, dpi)

    monkeypatch.setattr(plots, "save_figure", save)
    plots.epsilon_curves({"school-0": {"round": [1], "epsilon": [0.8]}}, tmp_path / "e.png", title="t", budget=3.0)
    plots.accuracy_curves({"b": {"round": [1], "accuracy": [0.5], "ci_low": [0.4], "ci_high": [0.6], "uar": [0.5]}},
                          tmp_path / "a.png", title="t")
    plots.epsilon_distribution({"round": [1], "q0": [0.5], "q10": [0.5], "q50": [0.6], "q90": [0.7], "q100": [0.7],
                                "schools": [3]}, [0.5, 0.6, 0.7], tmp_path / "d.png", title="t", budget=3.0)
    assert ticked == [[1.0]] * 3, ticked


def test_the_report_names_who_built_it(tmp_path):
    """report.md said "Built … by `fedfer report`" also when the ServerApp wrote it at the end of the run: a
    reader went looking for a command nobody ran."""
    from server.report import write_report

    run = write_run(tmp_path / "run", [1, 2])
    at_the_end = write_report(run).read_text()   # what server/app.py calls
    assert "by the ServerApp at the end of the run (`fedfer report` rebuilds it)." in at_the_end, at_the_end[:400]
    assert "by `fedfer report`." not in at_the_end
    assert main(["report", str(run)]) == 0
    assert "by `fedfer report`." in (run / "report.md").read_text()
