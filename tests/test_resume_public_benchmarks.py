"""A deployment run started before runs declared `evaluation.public_benchmarks` scored its evaluation node's
fer2013 in every round but could keep no best round. Its resume may now declare fer2013 public: the best round is
chosen again from the stored scores — the round a run that declared it from the start keeps —, the change is an
event, and any other change to the list is refused in one line. Driven through the ServerApp's own resume path
(`server.app.run_federation` with a grid on which no school is online, so the resumed run ends at once)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict

from grid_fixtures import FakeGrid
from server.round_writer import RoundWriter
from server.run import ResumeRefused
from server.run_dir import RoundRecord, RunDirectory, load_checkpoint_file
from shared_models.config import load_config
from shared_models.models import registry

pytestmark = pytest.mark.usefixtures("serverapp_identity")

#: the deployment's evaluation node scores fer2013; the run was started with the defaults' (synthetic) public list
OLD_RUN = ["evaluation.benchmarks=fer2013=/data/fer2013.csv", "model.preset=dp", "run.name=old",
           "federation.rounds=5", "federation.first_round_wait=0", "federation.evaluator=false"]
DECLARED = "evaluation.public_benchmarks=fer2013"


def _weights(cfg: dict, server_round: int) -> dict[str, torch.Tensor]:
    """Every floating tensor filled with the round number, so a file shows which round's model it holds."""
    return {name: torch.full_like(t, float(server_round)) if t.is_floating_point() else t
            for name, t in registry.build_from_config(cfg).state_dict().items()}


def _run(root: Path, accuracies: list[float], *overrides: str) -> dict:
    """Rounds 1.. with these fer2013 accuracies, written as the ServerApp writes them (checkpoint, then metrics
    line; the last two rounds' checkpoints kept). Returns the run's config."""
    cfg = load_config(None, [f"run.root={root}", *OLD_RUN, *overrides])
    writer = RoundWriter(RunDirectory.create(cfg), cfg)
    for server_round, accuracy in enumerate(accuracies, start=1):
        record = RoundRecord(server_round, train={"school-a": {"status": "ok"}}, aggregated=True,
                             timing={"round_seconds": 1.0})
        arrays = ArrayRecord(_weights(cfg, server_round))
        state = {"exhausted": [], "momentum": None}
        writer.round_trained(record, arrays, dict(state))
        record.evaluation, record.evaluated_by = {"fer2013": {"accuracy": accuracy, "n": 100}}, "evaluator-node-1"
        writer.round_settled(record, arrays, dict(state), evaluator_expected=True)
    return cfg


def _resume(root: Path, *overrides: str) -> None:
    """`flwr run … -c 'run.resume=… <the run's settings>'`: the ServerApp's own entry point, on a grid where no
    school is online (first_round_wait=0: the resumed run ends at its first round)."""
    from server.app import run_federation

    cfg = load_config(None, [f"run.root={root}", *OLD_RUN, f"run.resume={root / 'old'}", *overrides])
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=dict(cfg))
    run_federation(FakeGrid([], lambda nid, message: None), context)


def _kept_round(run: Path) -> int | None:
    best = run / "checkpoints" / "best.pt"
    if not best.exists():
        return None
    checkpoint = load_checkpoint_file(best)
    filled = {float(t.flatten()[0]) for t in checkpoint["state_dict"].values() if t.is_floating_point() and t.numel()}
    assert filled == {float(checkpoint["round"])}
    return checkpoint["round"]


def _events(run: Path) -> list[dict]:
    from server.run_dir import read_jsonl

    return read_jsonl(run / "events.jsonl")


@pytest.fixture
def flower_log(caplog):
    flower = logging.getLogger("flwr")
    flower.addHandler(caplog.handler)
    yield caplog
    flower.removeHandler(caplog.handler)


def test_declaring_fer2013_on_resume_keeps_the_round_a_run_that_declared_it_from_the_start_keeps(tmp_path, flower_log):
    scores = [0.5, 0.7, 0.9, 0.6]   # round 3 is the best; rounds 3 and 4 are still on disk
    _run(tmp_path / "fresh", scores, DECLARED)
    assert _kept_round(tmp_path / "fresh" / "old") == 3

    _run(tmp_path / "old", scores)
    run = tmp_path / "old" / "old"
    assert _kept_round(run) is None   # fer2013 was not declared: no best round was kept

    _resume(tmp_path / "old", DECLARED)
    assert _kept_round(run) == 3
    assert json.loads((run / "checkpoints" / "best.json").read_text())["round"] == 3
    events = _events(run)
    added = [e for e in events if e["event"] == "public-benchmarks-added"]
    assert len(added) == 1 and added[0]["added"] == ["fer2013"] and added[0]["now"] == "fer2013"
    assert [e["round"] for e in events if e["event"] == "best-chosen-again"] == [3]
    # the run's config.yaml now records the list the rounds are chosen on (the report reads it)
    assert "public_benchmarks: fer2013" in (run / "config.yaml").read_text()
    assert "with fer2013 declared public, round 3 scored best (0.900 on fer2013): kept as" in flower_log.text
    assert "best round 3 on the public benchmarks: 0.900 on fer2013; last round 4: 0.600 — kept as" in flower_log.text

    # and a second resume with the same list is an ordinary resume: nothing added again
    _resume(tmp_path / "old", DECLARED)
    assert len([e for e in _events(run) if e["event"] == "public-benchmarks-added"]) == 1


def test_a_best_round_whose_weights_were_pruned_is_named_not_pretended(tmp_path, flower_log):
    _run(tmp_path / "old", [0.9, 0.5, 0.6, 0.7])   # round 1 is the best; only rounds 3 and 4 are on disk
    run = tmp_path / "old" / "old"
    assert not (run / "checkpoints" / "round-0001.pt").exists()
    _resume(tmp_path / "old", DECLARED)
    assert _kept_round(run) is None   # no best.pt holding round 4 under the name "best"
    assert not (run / "checkpoints" / "best.json").exists()
    assert ("with fer2013 declared public, round 1 scored best (0.900 on fer2013), but its weights were not kept (a "
            "run keeps its last two rounds' checkpoints): no checkpoints/best.pt until a later round beats it"
            ) in flower_log.text
    assert "its weights were not kept, so there is no checkpoints/best.pt" in flower_log.text
    assert "— kept as" not in flower_log.text
    assert [e["round"] for e in _events(run) if e["event"] == "best-weights-gone"] == [1]


@pytest.mark.parametrize("scores, requested, refusal", [
    # fer2013 missing from round 2: its best would be chosen on rounds a fresh run compared differently
    ([0.5, None, 0.9], DECLARED, "evaluation.public_benchmarks adds fer2013, but .* has no fer2013 score for round 2 "),
    # a benchmark that was scored and chose best.pt may not be dropped
    ([0.5, 0.7], "evaluation.public_benchmarks=rafdb", "a resume may add public benchmarks but not drop fer2013"),
])
def test_other_changes_to_the_public_list_are_refused_in_one_line(tmp_path, scores, requested, refusal):
    from server.run import start_or_resume

    overrides = [DECLARED] if "rafdb" in requested else []
    cfg = load_config(None, [f"run.root={tmp_path}", *OLD_RUN, *overrides])
    writer = RoundWriter(RunDirectory.create(cfg), cfg)
    for server_round, accuracy in enumerate(scores, start=1):
        record = RoundRecord(server_round, train={}, aggregated=True, timing={"round_seconds": 1.0})
        arrays = ArrayRecord(_weights(cfg, server_round))
        writer.round_trained(record, arrays, {"exhausted": [], "momentum": None})
        record.evaluation = ({"fer2013": {"accuracy": accuracy}} if accuracy is not None
                             else {"kdef": {"accuracy": 0.4}})   # scored, but on another benchmark
        writer.round_settled(record, arrays, {"exhausted": [], "momentum": None}, evaluator_expected=True)
    resumed = load_config(None, [f"run.root={tmp_path}", *OLD_RUN, f"run.resume={tmp_path / 'old'}", requested])
    with pytest.raises(ResumeRefused, match=refusal) as refused:
        start_or_resume(resumed)
    assert "\n" not in str(refused.value)
    assert not any(e["event"] == "public-benchmarks-added" for e in _events(tmp_path / "old"))


def test_fedfer_simulate_resume_may_add_the_benchmark_too(tmp_path):
    # `fedfer simulate run.resume=… evaluation.public_benchmarks=…` checks the addition before Flower starts and hands
    # the new list to the ServerApp (which chooses the best round again); an addition some round lacks is one line
    from fedfer.commands.simulate import resumed_config
    from server.run_dir import check_resume_dir
    from shared_models.config import ConfigError

    _run(tmp_path / "old", [0.5, 0.9, 0.6])
    run = tmp_path / "old" / "old"
    _, _, original = check_resume_dir(run)
    cfg = load_config(None, [f"run.root={tmp_path / 'old'}", *OLD_RUN, f"run.resume={run}", DECLARED])
    resumed = resumed_config(cfg, original, {"evaluation.public_benchmarks", "run.resume"})
    assert resumed["evaluation.public_benchmarks"] == "fer2013"

    cfg = load_config(None, [f"run.root={tmp_path / 'old'}", *OLD_RUN, f"run.resume={run}",
                             "evaluation.public_benchmarks=fer2013,rafdb"])
    with pytest.raises(ConfigError, match="adds rafdb, but .* has no rafdb score for rounds 1, 2, 3 "):
        resumed_config(cfg, original, {"evaluation.public_benchmarks", "run.resume"})


def test_a_best_pt_that_already_holds_the_best_round_is_kept_when_its_round_checkpoint_is_gone(tmp_path):
    # the run's old list chose round 1 on another public benchmark; round 1 is best on fer2013 as well: best.pt
    # holds its weights although round-0001.pt was pruned long ago
    cfg = load_config(None, [f"run.root={tmp_path / 'old'}", *OLD_RUN,
                             "evaluation.benchmarks=kdef=/data/kdef,fer2013=/data/fer2013.csv",
                             "evaluation.public_benchmarks=kdef"])
    writer = RoundWriter(RunDirectory.create(cfg), cfg)
    for server_round, accuracy in enumerate([0.9, 0.5, 0.6], start=1):
        record = RoundRecord(server_round, train={}, aggregated=True, timing={"round_seconds": 1.0})
        arrays = ArrayRecord(_weights(cfg, server_round))
        writer.round_trained(record, arrays, {"exhausted": [], "momentum": None})
        record.evaluation = {"kdef": {"accuracy": accuracy}, "fer2013": {"accuracy": accuracy}}
        writer.round_settled(record, arrays, {"exhausted": [], "momentum": None}, evaluator_expected=True)
    run = tmp_path / "old" / "old"
    assert _kept_round(run) == 1 and not (run / "checkpoints" / "round-0001.pt").exists()
    _resume(tmp_path / "old", "evaluation.benchmarks=kdef=/data/kdef,fer2013=/data/fer2013.csv",
            "evaluation.public_benchmarks=kdef,fer2013")
    assert _kept_round(run) == 1
    assert json.loads((run / "checkpoints" / "best.json").read_text())["accuracies"] == {"kdef": 0.9, "fer2013": 0.9}
