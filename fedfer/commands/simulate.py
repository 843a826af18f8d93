"""`fedfer simulate`, `fedfer data synth` and `fedfer train-central`: the ML engineer's commands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.config import ConfigError, check_paths, load_config
from shared_models.wording import counted


def add_commands(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("simulate", help="run a multi-school federation on this machine (the main job)",
                         description="Run a simulated federation: synthetic schools train under DP, FedAvg, "
                                     "an evaluation node scores the public split every round.")
    sim.add_argument("--config", type=Path, help="YAML config (defaults: shared_models/defaults.yaml)")
    sim.add_argument("--ray-address", metavar="HOST:PORT", default=None,
                     help="run the simulated schools on an existing Ray cluster (its head's address, as "
                          "`ray start --head` prints it); same as federation.ray_address; docs/scaling.md")
    sim.add_argument("--references", action="store_true",
                     help="after the federation, also train what it is compared with (simulation only): all schools' "
                          "data pooled without privacy, evaluation.reference_schools schools alone under the same DP, "
                          "and the same federation with the noise off (= evaluation.references=central,alone,noise-free); "
                          "the report shows them side by side")
    sim.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. federation.rounds=3 model.name=sfer_mdfae")
    sim.set_defaults(func=cmd_simulate)

    data = sub.add_parser("data", help="synthetic classroom data")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])   # `fedfer data` alone: its actions
    synth = data_sub.add_parser("synth", help="write the synthetic classroom (schools + public split) to disk")
    synth.add_argument("--config", type=Path)
    synth.add_argument("--out", type=Path, help="output folder (default: data.root or the cache)")
    synth.add_argument("overrides", nargs="*", metavar="key=value")
    synth.set_defaults(func=cmd_data_synth)

    central = sub.add_parser("train-central", help="centralised reference training on the pooled synthetic schools")
    central.add_argument("--model", default=None, help="model name (default: model.name)")
    central.add_argument("--preset", default=None, help="cpu | dp | paper (default: model.preset; `fedfer models` lists them)")
    central.add_argument("--epochs", type=int, default=15)
    central.add_argument("--dp", action="store_true", help="train with DP-SGD at privacy.unit and privacy.target_epsilon")
    central.add_argument("--config", type=Path)
    central.add_argument("--json", type=Path, help="also write the result to this JSON file")
    central.add_argument("overrides", nargs="*", metavar="key=value")
    central.set_defaults(func=cmd_train_central)


def _config(args: argparse.Namespace) -> dict[str, Any] | None:
    from privacy.policy import check_config_epsilons

    try:
        overrides = list(args.overrides)
        if getattr(args, "references", False):
            overrides.append("evaluation.references=central,alone,noise-free")
        cfg = load_config(args.config, overrides)
        check_paths(cfg, source=str(args.config or "override"))
        # the schools' policies are generated from these: a budget beyond any meaning is refused before anything runs
        check_config_epsilons(cfg, source=str(args.config or "override"))
        if cfg["run.resume"]:
            from server.run_dir import NoCheckpointYet, RunDirectory, check_restart_dir, check_resume_dir

            # the ServerApp repeats this check; here a bad run directory is refused before Flower starts
            run_path = Path(str(cfg["run.resume"]))
            try:
                _, _, original = check_resume_dir(run_path)
                restart = False
            except NoCheckpointYet:   # stopped before its first checkpoint: it starts again (server/run.py restart)
                original, restart = check_restart_dir(run_path), True
            RunDirectory(run_path.expanduser().resolve()).check_not_busy()
            cfg = resumed_config(cfg, original, _explicit_keys(args, overrides), restart=restart)
            if restart:
                from server.run_dir import restart_message

                print(restart_message(Path(cfg["run.resume"])), flush=True)
        return cfg
    except ConfigError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return None
    except ValueError as exc:   # CheckpointError: the run directory to resume
        print(f"fedfer: {exc}", file=sys.stderr)
        return None


def _explicit_keys(args: argparse.Namespace, overrides: list[str]) -> set[str]:
    """The keys the user set on this command line (key=value) or in its --config file."""
    from shared_models.config import parse_overrides, read_yaml_file

    keys = set(parse_overrides(overrides))
    if args.config:
        keys |= set(read_yaml_file(args.config))   # flat, dotted keys
    return keys


def resumed_config(cfg: dict[str, Any], original: dict[str, Any], explicit: set[str],
                   restart: bool = False) -> dict[str, Any]:
    """A resumed run continues under the settings it started with — the simulated schools read them from
    the run-config this command writes, so they must be the original run's, not today's defaults. Keys the
    user set now win where a resume may change them (shared_models.config.RESUME_MAY_CHANGE); setting any
    other key to a new value is refused. `restart`: the run has no checkpoint yet and starts again from its
    start model, so that is kept (pre-trained again if the run was stopped while pre-training it)."""
    from shared_models.config import RESUME_MAY_CHANGE, resume_differences

    original = {**original, "evaluation.public_benchmarks": _public_list_in_force(cfg, original)}
    changed = {key: pair for key, pair in resume_differences(cfg, original).items() if key in explicit}
    public_list = "evaluation.public_benchmarks"
    if public_list in changed:   # may grow by benchmarks every scored round has (server/run.py, as the ServerApp checks)
        from server.run import ResumeRefused, public_benchmarks_added

        try:
            public_benchmarks_added(str(cfg[public_list]), str(original[public_list]),
                                    Path(str(cfg["run.resume"])).expanduser().resolve())
        except ResumeRefused as exc:
            raise ConfigError(str(exc)) from None
        del changed[public_list]
        original = {**original, public_list: cfg[public_list]}
    if changed:
        said = ", ".join(f"{key}={new!r} (the run has {old!r})" for key, (new, old) in changed.items())
        raise ConfigError(f"run.resume: {cfg['run.resume']} continues a run; it cannot change {said}: "
                          "drop those overrides, or start a new run")
    kept = {key: cfg[key] for key in RESUME_MAY_CHANGE if key in explicit}
    # absolute: the ServerApp runs in another folder and resolves a relative path from there
    resume = str(Path(str(cfg["run.resume"])).expanduser().resolve())
    if not restart:
        # the weights come from the checkpoint: nothing to pre-train (model.pretrained stays, for --references)
        return {**original, "model.pretrain": "", **kept, "run.resume": resume}
    start = {"model.pretrain": "", "model.pretrained": original["model.pretrained"]}
    if original["model.pretrain"] == "auto" and not Path(str(original["model.pretrained"])).is_file():
        # stopped while pre-training its start model: the same inputs pre-train it again (same cache path)
        start = {"model.pretrain": "auto", "model.pretrained": ""}
    restarted = {**original, **start, **kept, "run.resume": resume}
    pretrained = str(restarted["model.pretrained"])
    if restarted["model.pretrain"] != "auto" and pretrained and not Path(pretrained).expanduser().is_file():
        raise ConfigError(f"model.pretrained: {pretrained} not found; {resume} has no checkpoint yet and starts "
                          "again from that start model: restore it, or start a new run")
    return restarted


def _public_list_in_force(cfg: dict[str, Any], original: dict[str, Any]) -> str:
    """The resumed run's `evaluation.public_benchmarks` (an earlier resume may have grown it: server/run.py)."""
    from server.run import public_list_in_force
    from server.run_dir import RunDirectory

    return public_list_in_force(RunDirectory(Path(str(cfg["run.resume"])).expanduser().resolve()), original)


def _ensure_data(cfg: dict[str, Any], on_demand: bool = False) -> Path:
    from simulations import synth

    return synth.ensure_for_config(cfg, echo=lambda line: print(line, flush=True), on_demand=on_demand)


def cmd_data_synth(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg is None:
        return 2
    if args.out:
        cfg["data.root"] = str(args.out.resolve())
    started = time.perf_counter()
    from simulations import synth

    root = _ensure_data(cfg)
    # one row per school: the JSON dump this replaced was cut at 2,000 characters, mid-school from ten schools on
    print(synth.summary(root))
    print(f"ready in {time.perf_counter() - started:.1f} s (built, or found already built)")
    return 0


def _clips_missing(cfg: dict[str, Any]) -> bool:
    """A clip model in a simulation needs the synthetic schools to have clips; say so in one line."""
    from shared_models.models import registry

    if registry.config_clip_frames(cfg) and not int(cfg["data.clips_per_student"]):
        print(f"fedfer: {cfg['model.name']} reads clips: set data.clips_per_student > 0 (docs/clips.md)", file=sys.stderr)
        return True
    return False


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """`kill` (SIGTERM) ends `fedfer simulate` as Ctrl-C does: its Flower processes stopped and one line saying
    how to continue. Python's default for SIGTERM ended it without a word while the simulation ran on."""
    import signal

    def _interrupt(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)


def cmd_simulate(args: argparse.Namespace) -> int:
    from server.run_dir import RunDirectory

    stop_on_sigterm_as_on_ctrl_c()

    cfg = _config(args)
    if cfg is None or _ray_address(cfg, args.ray_address):
        return 2
    if not cfg["privacy.enabled"]:
        print("fedfer: privacy.enabled=false: a school's policy keeps DP on, so every simulated school would decline; "
              "for a non-private reference use `fedfer train-central` or `python -m simulations.tune_inprocess`",
              file=sys.stderr)
        return 2
    if _clips_missing(cfg):
        return 2
    started = time.perf_counter()
    code, pending = _resolve_run_config(cfg)
    if code:
        return code
    run = RunDirectory.create(cfg)
    print(f"fedfer simulate: {counted(int(cfg['federation.schools']), 'school')}"
          f"{' + evaluation node' if cfg['federation.evaluator'] else ''}, {cfg['model.name']} ({cfg['model.preset']}), "
          f"{counted(int(cfg['federation.rounds']), 'round')}, DP on"
          f" (unit {cfg['privacy.unit']}, target ε {cfg['privacy.target_epsilon']}, δ {cfg['privacy.delta']})")
    print(f"run directory: {run.path}")
    if _already_finished(cfg):   # nothing to train: no Flower to start, only the report to (re)write
        from server.report import build_report

        with run.hold():   # as the ServerApp would: the run records the resume, and gets its report
            run.event("resumed", round=int(cfg["federation.rounds"]))
            print(f"  {run.path} already finished {counted(int(cfg['federation.rounds']), 'round')}")
            print(f"  report {build_report(run.path, '`fedfer simulate` (the run had already finished)')}")
        # the run's own time is not known here: say whose seconds these are, or "wall time 1 s" reads as the run's
        code = print_summary(run.path, time.perf_counter() - started,
                             wall_note=" (this command only: the run had already finished)")
        if code == 0 and cfg["evaluation.references"]:
            return _references(cfg, run.path, _ensure_data(cfg), started)
        return code
    if pending is not None:
        federation, root, code = _pretrain_while_flower_starts(cfg, run, pending)
    else:
        root = _ensure_data(cfg, on_demand=cfg["data.generate"] == "on-demand")
        code = _write_school_policies(cfg, run.path, root)
        federation = None if code else _federation(cfg, run.path).start()
    if code:
        return code
    code = _finish_federation(federation, run.path, started)
    if code == 0 and cfg["evaluation.references"]:
        return _references(cfg, run.path, root, started)
    return code


def _already_finished(cfg: dict[str, Any]) -> bool:
    """`run.resume` of a run whose last checkpoint is its last round, evaluated: the ServerApp would only say
    so (server/run.py RunStart.finished), after Flower's start."""
    if not cfg["run.resume"]:
        return False
    from server.run import unevaluated_round
    from server.run_dir import CheckpointError, RunDirectory, check_resume_dir

    run = RunDirectory(Path(str(cfg["run.resume"])))
    try:
        _, checkpoint, _ = check_resume_dir(run.path, deep=False)
    except CheckpointError:   # no checkpoint yet (a restart): checked in full by _config already
        return False
    return int(checkpoint["round"]) >= int(cfg["federation.rounds"]) and unevaluated_round(run, checkpoint) is None


def _references(cfg: dict[str, Any], run_path: Path, root: Path, started: float) -> int:
    """evaluation.references: train the reference models after the federation, then redraw the report."""
    from server import added
    from server.report import added_rows, build_report, load_run
    from simulations.references import compute_references

    print("\nreference models (simulation only; not sent anywhere, not charged to any school's budget)")
    before = time.perf_counter()
    compute_references(cfg, run_path, root, echo=_indented)
    report = build_report(run_path, "`fedfer simulate --references`, after the reference models")
    data = load_run(run_path)
    table = added_rows(data)
    print(f"  {added.headline(table)}")
    print(f"  references took {time.perf_counter() - before:.0f} s; total wall time {time.perf_counter() - started:.0f} s")
    print(f"  report             {report}")
    return 0


def _ray_address(cfg: dict[str, Any], flag: str | None) -> int:
    """Settle `federation.ray_address` before the run directory records the config: the --ray-address
    flag, else the key, else a RAY_ADDRESS exported in the shell (Ray's own convention, said aloud).
    0, or 2 after a one-line error."""
    import os

    from shared_models.config import ray_address_parts

    source = "--ray-address"
    if flag is None and not cfg["federation.ray_address"] and os.environ.get("RAY_ADDRESS", "").strip():
        flag, source = os.environ["RAY_ADDRESS"].strip(), "RAY_ADDRESS"
    if flag is not None:
        if ray_address_parts(flag) is None:
            print(f"fedfer: {source} must be HOST:PORT of a Ray cluster's head (e.g. 10.0.0.5:6379); got {flag!r}",
                  file=sys.stderr)
            return 2
        cfg["federation.ray_address"] = flag.strip()
    if cfg["federation.ray_address"]:
        print(f"Ray cluster: {cfg['federation.ray_address']} (from {source if flag is not None else 'federation.ray_address'}); "
              f"each school reserves {cfg['federation.cpus_per_school']} CPU(s) there")
    return 0


def _resolve_run_config(cfg: dict[str, Any]) -> tuple[int, _PendingPretraining | None]:
    """Fill in the run name and absolute folders every app process must agree on, and settle the starting
    model: (0, the pre-training still to run beside Flower's start or None), or (the exit code after a
    one-line error, None)."""
    from server.run_dir import new_run_id

    if not cfg["run.name"]:
        cfg["run.name"] = new_run_id()
    cfg["run.root"] = str(Path(str(cfg["run.root"])).expanduser().resolve())
    if not cfg["data.root"]:  # resolved here so every app process reads the same folder
        from simulations import synth

        cfg["data.root"] = str(synth.root_from_config(cfg))
    from simulations.synth import generation_mode

    cfg["data.generate"] = generation_mode(cfg)   # every app process must agree (the schools wait for on-demand data)
    if cfg["privacy.state_dir"]:
        cfg["privacy.state_dir"] = str(Path(str(cfg["privacy.state_dir"])).expanduser().resolve())
    pending = None
    if cfg["model.pretrain"] == "auto" and not cfg["model.pretrained"]:
        from shared_models.models import registry

        if registry.config_clip_frames(cfg):   # pre-training trains on still faces (simulations/pretrain.py)
            print(f"model.pretrain=auto: {cfg['model.name']} reads clips and public pre-training trains on still "
                  "faces: it starts from scratch (model.pretrain=)", flush=True)
            cfg["model.pretrain"] = ""
    if cfg["model.pretrain"] == "auto" and cfg["model.pretrained"]:
        # a checkpoint given (`fedfer pretrain` prints `fedfer simulate model.pretrained=PATH`) is the start:
        # auto, the default, pre-trains only when none is
        cfg["model.pretrain"] = ""
    if cfg["model.pretrain"] == "auto":
        # before the run directory exists, so its config.yaml names the checkpoint the run starts from
        code, pending = _pretrain_auto(cfg)
        if code:
            return code, None
    if cfg["model.pretrained"] and pending is None and not cfg["run.resume"]:
        from server.run import check_pretrained_model
        from shared_models.models import registry

        try:   # refused here, in one line, rather than inside the ServerApp
            check_pretrained_model(registry.pretrained_provenance(str(cfg["model.pretrained"])), cfg,
                                   str(cfg["model.pretrained"]))
        except ValueError as exc:
            print(f"fedfer: {exc}", file=sys.stderr)
            return 2, None
    return 0, pending


def _write_school_policies(cfg: dict[str, Any], run_path: Path, root: Path) -> int:
    """Each simulated school's own policy, before Flower starts: the run-config cannot weaken it."""
    from privacy.policy import PolicyError
    from simulations.launcher import write_school_policies

    try:
        school_run = Path(str(cfg["run.resume"])).expanduser().resolve() if cfg["run.resume"] else run_path
        write_school_policies(cfg, school_run, root, echo=_indented)
    except PolicyError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2
    return 0


def _indented(line: str) -> None:
    """Progress lines of a step the command runs, indented under its heading."""
    print("  " + line, flush=True)


def _federation(cfg: dict[str, Any], run_path: Path):
    from simulations.launcher import Federation

    return Federation(cfg, run_path, echo=_indented)


def _finish_federation(federation, run_path: Path, started: float) -> int:
    """Wait for the started federation to end; its summary, or the exit code after a one-line error."""
    from simulations.launcher import SimulationError

    try:
        federation.result()
    except SimulationError as exc:
        print(f"fedfer: federation failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # what to type next: the rounds checkpointed so far are kept, and the schools' spend with them
        print(f"fedfer: interrupted; Flower processes stopped; results so far in {run_path}; continue with "
              f"`fedfer simulate run.resume={run_path}`", file=sys.stderr)
        return 130
    return print_summary(run_path, time.perf_counter() - started)


@dataclass
class _PendingPretraining:
    """model.pretrain=auto whose checkpoint is not cached yet: trained while Flower starts."""

    root: Path                      # the synthetic classroom's folder: its public part is built
    data: list[dict[str, Any]]      # simulations.pretrain.data_specs, read once
    path: Path                      # where the checkpoint will be (model.pretrained already names it)


def _pretrain_auto(cfg: dict[str, Any]) -> tuple[int, _PendingPretraining | None]:
    """model.pretrain=auto: the cached public pre-training of this model becomes model.pretrained, so every
    app process loads the same checkpoint. Not cached yet: (0, what to train) for a new run, which trains
    it beside Flower's start; a resumed run trains it now."""
    from simulations import pretrain

    root = _ensure_data(cfg, on_demand=True)   # the public and in-domain parts: what pre-training reads
    try:
        data = pretrain.data_specs(cfg, root)
    except pretrain.PretrainError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2, None
    path = pretrain.cached_checkpoint(cfg, root, data)
    cfg["model.pretrained"] = str(path)
    pending = _PendingPretraining(root, data, path)
    if path.is_file() or cfg["run.resume"]:   # cached (said so), or a resumed run: no gate to wait at
        return _pretrain_now(cfg, pending), None
    return 0, pending


def _pretrain_now(cfg: dict[str, Any], pending: _PendingPretraining) -> int:
    """Train (or find) the pending checkpoint; 0, or 2 after a one-line error. With the schools still to
    build, they are built in a child process on the other core meanwhile (pre-training is one thread)."""
    from simulations import pretrain, synth

    started = time.perf_counter()
    schools = None
    cached = pending.path.is_file()
    try:
        # schools a run before built (e.g. the default demo's, when pre-training another model): nothing to
        # build, and "building … in the background" then "schools built (750 s …)" said otherwise
        if cfg["data.generate"] != "on-demand" and not cached and not synth.schools_built(cfg):
            schools = synth.start_building_schools(cfg)
            print(f"  building the {counted(int(cfg['federation.schools']), 'school')} in the background while pre-training",
                  flush=True)
        path = pretrain.ensure_pretrained(cfg, pending.root, echo=_indented, data=pending.data, echo_path=False)
    except pretrain.PretrainError as exc:
        print(f"fedfer: {exc}", file=sys.stderr)
        return 2
    # the one line naming the start model (simulations/bench/default_demo.py reads it to time the phases)
    if cached:
        print(f"pre-trained model (cached): {path}", flush=True)
    else:
        print(f"pre-trained model: {path} ({time.perf_counter() - started:.1f} s)", flush=True)
    if schools is not None:
        schools.join()
        print(f"  schools built ({time.perf_counter() - started:.1f} s since pre-training began)", flush=True)
    return 0


def _pretrain_while_flower_starts(cfg: dict[str, Any], run, pending: _PendingPretraining):
    """Start Flower, then pre-train (the schools built beside it) and write the schools' policies while it
    starts: the ServerApp waits at the run directory's preparation gate until all of them are there
    (Flower's own start, ~15 s, is then off the critical path). (federation, data root, 0), or
    (None, None, exit code) with Flower stopped."""
    with run.preparing():
        federation = _federation(cfg, run.path).start()
        try:
            code = _pretrain_now(cfg, pending)
            root = _ensure_data(cfg, on_demand=cfg["data.generate"] == "on-demand") if code == 0 else None
            code = code or _write_school_policies(cfg, run.path, root)
        except BaseException:
            federation.stop()   # before the gate opens: the ServerApp never starts on a half-prepared run
            raise
        if code:
            federation.stop()
            return None, None, code
    return federation, root, 0


def print_summary(run_path: Path, wall: float, wall_note: str = "") -> int:
    """The closing table: final accuracy, per-school ε, rounds, wall time, the best round, report path.
    `wall_note` follows the wall time when those seconds are not the run's (a finished run resumed)."""
    from server.best_round import compare_line
    from server.run_dir import BEST_CHECKPOINT, RunDirectory, last_public_score, read_best_json, start_evaluation

    run = RunDirectory(run_path)
    rounds = run.metrics()
    if not rounds:
        print(f"fedfer: no round completed; see {run_path / 'flower.log'}", file=sys.stderr)
        return 1
    from server.report import load_run, school_spend

    data = load_run(run_path)
    last = rounds[-1]
    print("\nsummary")
    completed = sum(1 for r in rounds if r["round"] > 0)
    # fewer than planned: a run stopped early says why (the coordinator ended it), a killed one says nothing more
    planned = f" of {data.planned_rounds} planned" if data.planned_rounds and completed < data.planned_rounds else ""
    stopped = (f"; the federation stopped there: {data.stopped_why}"
               if data.stopped_in_round is not None and data.stopped_in_round > last["round"] else "")
    print(f"  rounds completed   {completed}{planned} (last: {last['round']}{stopped})")
    start = next((r for r in rounds if r["round"] == 0), None)
    if start is not None:   # the pre-trained model (model.pretrained), scored before round 1
        print("  pre-trained start  " + ", ".join(f"{bench} {_three(m.get('accuracy'))}"
                                                 for bench, m in _benchmarks(start)))
    print(f"  wall time          {wall:.0f} s{wall_note}")
    for bench, m in _benchmarks(last):
        ci = (f" [95% CI {_three(m['accuracy_ci_low'])}-{_three(m.get('accuracy_ci_high'))}]"
              if m.get("accuracy_ci_low") is not None else "")
        print(f"  {bench:<18} accuracy {_three(m.get('accuracy'))}{ci}  UAR {_three(m.get('uar'))}  macro-F1 "
              f"{_three(m.get('macro_f1'))}  (n={m.get('n', '?')}, by {last.get('evaluated_by', '?')})")
    spend = school_spend(data)   # the ledger copy: a school that declined still has its lifetime ε
    if spend:
        accountant = str(data.config.get("privacy.accountant", "prv")).upper()
        print(f"  per-school ε at δ={data.config.get('privacy.delta', '?')} ({accountant}, lifetime):")
        _print_epsilons(spend)
    best = read_best_json(run_path)
    if best is not None:   # evaluation.keep_best: the round that scored best on the public benchmarks
        print(f"  best model         {run_path / 'checkpoints' / BEST_CHECKPOINT} "
              f"({compare_line(best, last_public_score(run_path), start_evaluation(run_path))})")
    owns = list((run_path / "schools").glob("*/own-model.pt"))   # train.keep_own_model, simulated state dirs
    if owns:
        print(f"  own models         {run_path / 'schools'}/<school>/own-model.pt (the last trained weights "
              f"of {counted(len(owns), 'school')}; `fedfer evaluate --checkpoint` reads them)")
    report = run_path / "report.md"
    print(f"  report             {report if report.exists() else '(not written)'}")
    return 0


def _benchmarks(record: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A metrics line's (benchmark, metrics) pairs; in a damaged line (a resumed run's metrics.jsonl edited or
    cut by a crash), what is not an object is left out rather than ending the summary of a finished run."""
    evaluation = record.get("evaluation")
    return [(str(b), m) for b, m in evaluation.items() if isinstance(m, dict)] if isinstance(evaluation, dict) else []


def _three(value: Any) -> str:
    """A metric with 3 decimals, or '?' when a damaged line holds something else."""
    return f"{value:.3f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "?"


def _print_epsilons(spend: dict[str, Any], many: int = 20) -> None:
    """One line per school (server.report.SchoolSpend), or (a large federation) the quantiles over the schools."""
    if len(spend) <= many:
        for school, mine in sorted(spend.items()):
            eps = "     —" if mine.epsilon is None else f"{mine.epsilon:6.3f}"
            print(f"    {school:<12} ε {eps}  after {counted(mine.trained_here, 'round')} in this run")
        return
    import numpy as np

    finals = np.array([m.epsilon for m in spend.values() if m.epsilon is not None])
    trained = np.array([m.trained_here for m in spend.values()])
    if finals.size:
        low, q25, median, q75, high = np.quantile(finals, [0.0, 0.25, 0.5, 0.75, 1.0])
        print(f"    {counted(int(finals.size), 'school')}: ε min {low:.3f}  25% {q25:.3f}  median {median:.3f}  "
              f"75% {q75:.3f}  max {high:.3f}; rounds per school in this run median {int(np.median(trained))}, max {trained.max()}")
    idle = int((trained == 0).sum())
    if idle:
        print(f"    {counted(idle, 'school')} refused or failed every round they were sampled (report.md lists them)")


def cmd_train_central(args: argparse.Namespace) -> int:
    from fedfer.commands import UsageError
    from simulations.central import train_central

    if args.epochs < 1:   # before the data is made: -1 ran the data generation, then ended in an UnboundLocalError
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    # --model / --preset are overrides like any key=value (the last word), so the schema checks them before any data is made
    args.overrides = [*args.overrides, *([f"model.name={args.model}"] if args.model else []),
                      *([f"model.preset={args.preset}"] if args.preset else [])]
    cfg = _config(args)
    if cfg is None:
        return 2
    if _clips_missing(cfg):
        return 2
    root = _ensure_data(cfg)
    result = train_central(cfg, root, epochs=args.epochs, dp=args.dp, echo=_indented)
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0
