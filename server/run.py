"""Starting a run or resuming one: the run directory, the config in force, the model to begin from.

A resumed run takes its config from its checkpoint (the run it continues), its model from the
checkpoint's weights, and the strategy's state (rounds done, exhausted schools, server momentum). A
checkpoint whose metrics line was never written (the coordinator stopped while its model waited for
evaluation, server/round_writer.py) is evaluated first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Mapping

from flwr.app import ArrayRecord
from flwr.common.logger import log
from torch import nn

from server.run_dir import NoCheckpointYet, RunDirectory, check_restart_dir, check_resume_dir, restart_message
from server.strategy import RoundRecord, SchoolFedAvg
from shared_models.models import registry


@dataclass
class RunStart:
    """Where a run begins: a new run (round 0) or a checkpoint of an earlier one."""

    run: RunDirectory
    cfg: dict[str, Any]
    model: nn.Module
    round_offset: int = 0
    strategy_state: dict[str, Any] = field(default_factory=dict)
    unevaluated: RoundRecord | None = None
    #: benchmarks this resume declared public that the run did not (the best round is chosen again)
    public_added: tuple[str, ...] = ()

    @property
    def remaining(self) -> int:
        return int(self.cfg["federation.rounds"]) - self.round_offset

    @property
    def finished(self) -> bool:
        return self.remaining <= 0 and self.unevaluated is None


#: RESUME_MAY_CHANGE keys that are not the server's to take from a resume's run-config: the run's identity, and the
#: start model (the weights come from the checkpoint)
_NOT_TAKEN_ON_RESUME = frozenset({"run.resume", "run.name", "run.root", "model.pretrain", "model.pretrained"})


def settings_set_on_resume(run: RunDirectory, requested: Mapping[str, Any], original: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a resume may change (shared_models.config.RESUME_MAY_CHANGE: timeouts, the keyring, threads,
    evaluation options) that its run-config sets to a value other than both the default and the run's own; logged
    and recorded as an event. A bare `flwr run -c run.resume=…` carries the defaults for every other key, so a key
    at its default keeps the run's value (a resume that wants the default back starts a new run or sets it in the
    run's config.yaml); setting it to anything else is what the docs promise a resume may do."""
    from shared_models.config import RESUME_MAY_CHANGE, defaults

    default = defaults()
    taken = {key: requested[key] for key in sorted(RESUME_MAY_CHANGE - _NOT_TAKEN_ON_RESUME)
             if key in requested and requested[key] != default.get(key) and requested[key] != original.get(key)}
    if taken:
        log(INFO, "[fedfer] resume: %s", ", ".join(f"{key} {original.get(key)!r} -> {value!r}" for key, value in taken.items()))
        run.event("resume-settings", changed={key: [original.get(key), value] for key, value in taken.items()})
    return taken


def start_or_resume(cfg: Mapping[str, Any]) -> RunStart:
    """A new run directory and model, or (`run.resume`) the run, config and model of its latest checkpoint —
    or, for a run stopped before its first checkpoint, the run started again from its start model."""
    if not cfg["run.resume"]:
        run = RunDirectory.create(cfg)
        if run.wait_until_prepared():   # `fedfer simulate` pre-trained (and built the schools) meanwhile
            log(INFO, "ServerApp: the run's preparation (pre-training, schools, policies) is done")
        return RunStart(run, dict(cfg), start_model(run, cfg))
    run = RunDirectory(Path(str(cfg["run.resume"])).expanduser().resolve())
    # loaded with weights_only=True and checked field by field (the CLI ran the same check before Flower)
    try:
        _, checkpoint, checkpoint_cfg = check_resume_dir(run.path)
    except NoCheckpointYet:
        return restart(run, cfg)
    checkpoint_cfg = {**checkpoint_cfg, "evaluation.public_benchmarks": public_list_in_force(run, checkpoint_cfg)}
    added = refuse_changed_settings(cfg, checkpoint_cfg, run.path)
    resumed_cfg = {**checkpoint_cfg, "run.resume": str(run.path),
                   "evaluation.public_benchmarks": cfg["evaluation.public_benchmarks"],   # the one list a resume may grow
                   **settings_set_on_resume(run, cfg, checkpoint_cfg)}
    model = registry.build_from_config(resumed_cfg)
    model.load_state_dict(checkpoint["state_dict"])
    start = RunStart(run, resumed_cfg, model, int(checkpoint["round"]), dict(checkpoint["strategy"]),
                     unevaluated_round(run, checkpoint), public_added=added)
    run.event("resumed", round=start.round_offset, **({"unevaluated": start.round_offset} if start.unevaluated else {}))
    record_public_added(run, resumed_cfg, added, checkpoint_cfg["evaluation.public_benchmarks"], start.round_offset)
    if start.unevaluated is not None:
        log(INFO, "[fedfer] round %d's model has no metrics line yet: it is evaluated first", start.round_offset)
    return start


def restart(run: RunDirectory, requested: Mapping[str, Any]) -> RunStart:
    """Resume a run that stopped before its first checkpoint: round 1 again, from the start model, under the
    settings in its config.yaml. Sound because nothing was aggregated yet: a school that trained the lost
    round 1 has it in its ledger and accountant, so its budget guard counts that spend and the new round 1's;
    the run's copies of the schools' entries are kept and extended like after any resume."""
    original = check_restart_dir(run.path)
    added = refuse_changed_settings(requested, original, run.path)
    # `fedfer simulate` names the start model it resolved (pre-trained again if the stop cut its training
    # short); a bare `flwr run -c run.resume=…` has the run's own
    restarted_cfg = {**original, "model.pretrained": requested["model.pretrained"] or original["model.pretrained"],
                     "run.resume": str(run.path), "evaluation.public_benchmarks": requested["evaluation.public_benchmarks"],
                     **settings_set_on_resume(run, requested, original)}
    start = RunStart(run, restarted_cfg, start_model(run, restarted_cfg), public_added=added)
    run.event("resumed", round=0, restarted="no checkpoint yet: round 1 again, from the start model")
    record_public_added(run, restarted_cfg, added, original["evaluation.public_benchmarks"], 0)
    log(INFO, "[fedfer] %s", restart_message(run.path))
    return start


def start_model(run: RunDirectory, cfg: Mapping[str, Any]) -> nn.Module:
    """The model round 1 starts from: `model.pretrained` loaded (its provenance checked), or a fresh one."""
    model = registry.build_from_config(cfg)
    if not cfg["model.pretrained"]:
        if cfg.get("model.pretrain") == "auto":   # only `fedfer simulate` resolves it to a checkpoint
            log(WARNING, "[fedfer] model.pretrain=auto is resolved by `fedfer simulate`; this run starts from "
                         "scratch: pass model.pretrained=PATH (`fedfer pretrain` writes one) to start from it")
        return model
    path = str(cfg["model.pretrained"])
    provenance = registry.pretrained_provenance(path)
    check_pretrained_model(provenance, cfg, path)
    report = registry.load_pretrained(model, path)
    log(INFO, "[fedfer] pretrained: %s", report.summary())
    run.event("pretrained", path=path, matched=len(report.matched), missing=len(report.missing),
              shape_mismatched=len(report.shape_mismatched), provenance=provenance)
    return model


def start_is_scored(run: RunDirectory) -> bool:
    """metrics.jsonl has round 0's line: the start model was evaluated before the run stopped (a restart
    does not evaluate it again, so every round keeps exactly one line)."""
    return any(int(line.get("round", -1)) == 0 for line in run.metrics())


def check_keyring(cfg: Mapping[str, Any]) -> None:
    """`privacy.keyring` (the schools' enrolled ledger keys) must be a directory before any school is asked:
    a mistyped path would reject every school's first reply as unverifiable."""
    keyring = str(cfg.get("privacy.keyring") or "")
    if keyring and not Path(keyring).expanduser().is_dir():
        raise ValueError(f"privacy.keyring: {keyring} is not a directory (give the keyring `fedfer deploy` wrote, "
                         "e.g. /abs/path/deploy/keys)")


def refuse_changed_settings(requested: Mapping[str, Any], original: Mapping[str, Any], run_path: Path) -> tuple[str, ...]:
    """A resume whose run-config differs from the run it continues is refused, in one line that gives the
    overrides to repeat. The server continues with the checkpoint's settings, but every school sets its
    noise, steps and sampling from the run-config it receives: a resumed `flwr run` with only `run.resume`
    would have the schools calibrate σ to the defaults (measured: σ 7.58 → 1.47, each school's ε 2.5 → 5.1
    in two rounds of a run planned to end at 2.6).

    One exception: `evaluation.public_benchmarks` may grow by benchmarks every scored round of the run has a
    score on (`public_benchmarks_added`); returns the names added (canonical), () when the list is unchanged."""
    from shared_models.config import as_override, resume_differences

    changed = resume_differences(requested, original)
    added: tuple[str, ...] = ()
    if "evaluation.public_benchmarks" in changed:
        added = public_benchmarks_added(str(requested["evaluation.public_benchmarks"]),
                                        str(original["evaluation.public_benchmarks"]), run_path)
        del changed["evaluation.public_benchmarks"]
    if not changed:
        return added
    was = ", ".join(f"{key}={old!r}" for key, (_, old) in changed.items())
    now = ", ".join(f"{key}={new!r}" for key, (new, _) in changed.items())
    repeat = " ".join([*(as_override(key, old) for key, (_, old) in changed.items()), as_override("run.resume", run_path)])
    why = ("the schools set their noise from the run-config" if set(changed) - set(KEPT_FOR_THE_SERVER)
           else "; ".join(KEPT_FOR_THE_SERVER[key] for key in changed))
    raise ResumeRefused(f"run.resume: {run_path} was started with {was}, the run-config now says {now}; "
                        f"{why}, so repeat the run's settings: -c '{repeat}'")


#: Keys a resume may not change for the server's own sake (not the schools'), with why.
KEPT_FOR_THE_SERVER = {
    "evaluation.keep_best": "checkpoints/best.pt was chosen by it so far, and rounds scored another way would not compare",
}


def public_benchmarks_added(requested: str, original: str, run_path: Path) -> tuple[str, ...]:
    """The benchmarks a resume's `evaluation.public_benchmarks` adds to the run's (canonical names, sorted), if
    the change is one a resume may make; else ResumeRefused in one line. Allowed: adding a benchmark that every
    round the run scored was scored on (metrics.jsonl), e.g. a deployment started before runs declared its
    evaluation node's fer2013: the best round is then chosen again from the stored scores, and it is the round a
    run that declared the benchmark from the start would have kept. Refused: dropping a benchmark (best.pt may
    have been chosen on it) and adding one some round lacks (that round's score would not compare)."""
    from server.best_round import declared_public, rounds_missing, scored_rounds

    was, now = declared_public(original), declared_public(requested)
    evaluations = {line["round"]: line.get("evaluation") for line in RunDirectory(run_path).metrics()}
    # a declared benchmark no round was scored on (the defaults' synthetic names in a deployment) chose nothing
    scored_on = sorted(name for name in was - now if len(rounds_missing(name, evaluations)) < len(scored_rounds(evaluations)))
    if scored_on:
        raise ResumeRefused(f"run.resume: {run_path} declared evaluation.public_benchmarks={original!r}, the run-config "
                            f"now says {requested!r}: a resume may add public benchmarks but not drop "
                            f"{', '.join(scored_on)}, which rounds were scored on (checkpoints/best.pt may have been "
                            f"chosen on it), so repeat -c 'evaluation.public_benchmarks=\"{original}\"' (plus any "
                            "benchmark to add)")
    for name in sorted(now - was):
        missing = rounds_missing(name, evaluations)
        if missing:
            shown = ", ".join(str(r) for r in missing[:5]) + (", …" if len(missing) > 5 else "")
            raise ResumeRefused(f"run.resume: evaluation.public_benchmarks adds {name}, but {run_path} has no {name} "
                                f"score for round{'s' if len(missing) > 1 else ''} {shown} (metrics.jsonl), so the "
                                f"best round cannot be chosen on it as a run that declared it from the start would; "
                                f"repeat -c 'evaluation.public_benchmarks=\"{original}\"'")
    return tuple(sorted(now - was))


def public_list_in_force(run: RunDirectory, checkpoint_cfg: Mapping[str, Any]) -> str:
    """The run's `evaluation.public_benchmarks`: its checkpoint's, or the list an earlier resume declared
    (`record_public_added`'s event) when no round was checkpointed since that resume."""
    from server.run_dir import read_jsonl

    declared = [event for event in read_jsonl(run.events_path)
                if event.get("event") == "public-benchmarks-added" and isinstance(event.get("now"), str)]
    return declared[-1]["now"] if declared else str(checkpoint_cfg["evaluation.public_benchmarks"])


def record_public_added(run: RunDirectory, cfg: Mapping[str, Any], added: tuple[str, ...], original: str,
                        server_round: int) -> None:
    """A resume declared `added` public: say so in the log and events.jsonl, and record the new list in the run's
    config.yaml (what the report and `fedfer report` read the run's settings from)."""
    from shared_models.config import dump_yaml, read_yaml_file

    if not added:
        return
    log(INFO, "[fedfer] resume: evaluation.public_benchmarks adds %s (every scored round has its score): the best "
        "round is chosen again from the stored scores", ", ".join(added))
    # config.yaml first: a stop before the event leaves a resume that adds them again (the same result)
    if run.config_path.is_file():
        recorded = read_yaml_file(run.config_path)
        recorded["evaluation.public_benchmarks"] = cfg["evaluation.public_benchmarks"]
        dump_yaml(recorded, run.config_path)
    run.event("public-benchmarks-added", round=server_round, added=list(added), was=original,
              now=str(cfg["evaluation.public_benchmarks"]))


class ResumeRefused(ValueError):
    """A resume that would change the settings the schools train under."""


def check_pretrained_model(provenance: Mapping[str, Any] | None, cfg: Mapping[str, Any], path: str) -> None:
    """A fedfer pre-trained checkpoint built for another model would load only partly: refuse it."""
    if not provenance:
        return   # a foreign checkpoint (e.g. an MS-Celeb backbone): the partial load reports what matched
    trained = provenance.get("config", {})
    if not isinstance(trained, Mapping):   # a string here was a TypeError (or a substring match) below
        raise ValueError(f"model.pretrained: {path}: its provenance's config is a {type(trained).__name__}, "
                         f"not a table: a damaged or foreign pre-trained checkpoint")
    for key in ("model.name", "model.preset"):
        if key in trained and str(trained[key]) != str(cfg[key]):
            raise ValueError(f"model.pretrained: {path} was pre-trained for {key}={trained[key]}, "
                             f"the run builds {key}={cfg[key]}")


def unevaluated_round(run: RunDirectory, checkpoint: Mapping[str, Any]) -> RoundRecord | None:
    """The checkpoint's round record if its metrics line was never written (the coordinator stopped
    while that round's model waited for its evaluation), else None."""
    saved = checkpoint.get("strategy", {}).get("unevaluated")
    if not saved or int(saved.get("round", -1)) != int(checkpoint["round"]):
        return None
    if any(int(line.get("round", -1)) == int(checkpoint["round"]) for line in run.metrics()):
        return None
    return RoundRecord(**saved)


def resume_pending(strategy: SchoolFedAvg, record: RoundRecord | None, arrays: ArrayRecord, remaining: int) -> int:
    """Queue a resumed checkpoint's unevaluated round for evaluation; returns the number of rounds to run.

    With rounds left, the record becomes the strategy's pending round: its evaluate message rides with
    the first train exchange (or it is evaluated in-process if no evaluation node answers). With none
    left, one round with no training runs, so the model gets an evaluate-only exchange."""
    if record is None:
        return remaining
    strategy.pending = (record, arrays)
    if remaining <= 0:
        # every planned round ran: the federation ends after this one, not early (`run_rounds` says nothing)
        strategy.finished = True
        strategy.stopped_after = record.round
        return 1
    return remaining


def trace_benchmark_opens(trace_file: str) -> None:
    """Record every file this (server) process opens under a `public/` benchmark folder.

    Used by the tests to show that with an evaluation node the coordinator never reads benchmark data.
    """
    import sys

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes)):
            path = args[0].decode() if isinstance(args[0], bytes) else args[0]
            if "/public/" in path and not path.startswith(trace_file):
                with open(trace_file, "a", encoding="utf-8") as handle:
                    handle.write(path + "\n")

    sys.addaudithook(hook)


