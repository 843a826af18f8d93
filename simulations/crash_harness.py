"""Crash harness: kill a small `fedfer simulate` with SIGKILL at chosen points, check what is on disk, resume
it with the documented command (`fedfer simulate run.resume=RUN_DIR`) and check again.

    python -m simulations.crash_harness [--work DIR] [--points a,b,...] [--rounds 4] [--out crash.json]

Each kill point starts a fresh federation (2 schools + the evaluation node, tiny synthetic data, its own
run.root so no anchors are shared), watches the run directory and the schools' state directories, and the
moment its condition holds freezes every process of the run (SIGSTOP, then SIGKILL: the `fedfer simulate`
process, the SuperLink in its own session, the simulation process and Ray's daemons and workers, found by
the FLWR_HOME they inherit) — a power cut of the whole machine, as far as the run is concerned. Then it
checks the invariants below, resumes, checks them again plus what a finished run must have, and runs
`fedfer privacy audit RUN --trust-run-keys` over the run's copies and every school's own ledger.

Invariants (each school, each phase):

  ledger        the school's own ledger.jsonl verifies from genesis (fields, hash chain, Ed25519 signature
                with its signing_key.pub) and the run's copy ledger/<school>.jsonl verifies against
                keys/<school>.pub and is a contiguous part of the school's own ledger
  accountant    the accountant's history is the ledger's (the history the last entry leaves), or one round
                behind it (a crash between the ledger append and the accountant record: the next round's
                reconcile restores it); never ahead, never anything else
  released      every reply the server accepted (metrics.jsonl status ok) and the school's own-model.pt
                have a signed round entry in the school's ledger: no weights left without one
  jsonl         metrics.jsonl and events.jsonl parse line by line; a torn last line (no newline) is noted
  checkpoints   latest.json and the checkpoint it names load (check_resume_dir, as `run.resume` does); so
                does every other round-*.pt
  progress      metrics rounds are 1..k without gaps; the checkpoint is round k or k+1 (its line pending)
  budget        the school's ε (PRV, recomputed from its accountant history, plus a round the accountant
                has not recorded yet) is within its policy.json budget
  best          checkpoints/best.pt loads and holds the round that scored best on the public benchmarks among
                metrics.jsonl's lines (server/best_round.py), or a round whose line is not written yet that beats
                them (best.pt is written just before its round's line); none only while no round has a public score.
                After the resume: exactly the best of metrics.jsonl, and best.json agrees
After the resume also:
  resumed       the resume started from the checkpoint that was on disk (events.jsonl "resumed"; round 0 when
                there was none yet: the run started again) and
                finished: metrics.jsonl has each round 1..R exactly once, latest.json says round R,
                evaluated; report.md exists; no process of the run is left
  retrained     a round a school trained twice (the same run and round twice in its ledger): allowed only
                for the round whose training the crash interrupted (docs/deployment.md: "What no checkpoint
                can save …"), listed with the ε it cost
  audit         `fedfer privacy audit RUN school-*/ledger.jsonl --trust-run-keys` exits 0

Kill points (the round is --target-round, default 2):

  mid-training        a school holds its round lock (/proc/locks) for round r: training under way
  school-ledger       a school's ledger.jsonl gains its round-r entry (before or after its accountant record)
  server-ledger-copy  the run's ledger/<school>.jsonl gains a round-r entry (the server is validating replies)
  checkpoint-write    checkpoints/.round-000r.pt.*.tmp or round-000r.pt exists, latest.json not yet round r
  checkpoint-pending  latest.json says round r, "evaluated": false (its metrics line waits for evaluation)
  metrics-line        metrics.jsonl holds round r's line
  report-writing      the final report is being written (plots/ or .report.md.*.tmp appears)
  torn-metrics        as metrics-line, then metrics.jsonl's last line is cut in half and events.jsonl gets a
                      half line (what a write cut short by a crash leaves)
  double-crash        mid-training in round r, resume, mid-training again in round r+1, resume again
  time-N              SIGKILL N seconds after the start (e.g. time-20)
  restore-ledger      not a run: after a finished run school-00 loses its ledger.jsonl and accountant, and
                      `fedfer deploy restore-ledger` is SIGKILLed by itself twice — while it writes the accountant,
                      then after the accountant and before the ledger — and then run again: it must finish with
                      the same signed chain, an accountant that counts what it counted, one restore record, and
                      the audit exit 0 (a restore writes in microseconds, too fast to catch by watching files,
                      so the process kills itself at the write: the same SIGKILL, at an exact spot)
  restore-old-accountant  as restore-ledger, but the accountant is not lost: it is put back holding the first half
                      of its rounds (an old backup of the whole state folder, its ledger moved aside), so the restore
                      brings it up to the copies; killed at that catch-up, then after it and before the ledger,
                      then run again: the same chain, the accountant as before the loss, one restore record,
                      the audit exit 0

Prints one line per step and a summary table; writes everything as JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent.parent

TINY = [
    "federation.schools=2", "federation.min_train_schools=2",
    "data.students_per_school=12", "data.frames_per_student=6", "data.public_students=6", "data.image_size=32",
    "data.public_train_students=0", "data.heldout_students=2",
    "train.local_epochs=1", "train.batch_size=3", "evaluation.bootstrap=50",
    "model.pretrain=", "data.school_size_spread=30",
]
POINTS = ("mid-training", "school-ledger", "server-ledger-copy", "checkpoint-write", "checkpoint-pending",
          "metrics-line", "report-writing", "torn-metrics", "double-crash", "time-20", "restore-ledger",
          "restore-old-accountant")
POLL_S = 0.003


def say(text: str) -> None:
    print(text, flush=True)


# ----------------------------------------------------------------------------------------- processes
def run_processes(root_pid: int, run_dir: Path) -> set[int]:
    """`root_pid`'s live descendants and every process that inherited the run's FLWR_HOME (the SuperLink
    runs in its own session; Ray's daemons leave the process tree)."""
    from server.processes import process_tree, processes_with_flwr_home

    found = set(process_tree(root_pid)) | processes_with_flwr_home(run_dir)
    found.discard(os.getpid())
    return found


def kill_run(proc: subprocess.Popen, run_dir: Path) -> int:
    """Freeze every process of the run, then SIGKILL them all; returns how many were killed."""
    victims: set[int] = set()
    for _ in range(3):   # a process may be forked while we freeze the others
        new = run_processes(proc.pid, run_dir) - victims
        if not new:
            break
        for pid in new:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        victims |= new
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{pid}").exists() and _state(pid) != "Z" for pid in victims):
        time.sleep(0.1)
    shutil.rmtree(Path("/tmp") / f"fedfer-ray-{proc.pid}", ignore_errors=True)   # Ray's session files
    return len(victims)


def _describe(pid: int) -> str:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        cmd = "?"
    return f"{pid} [{_state(pid)}] {cmd[:100]}"


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def locked_inodes() -> set[int]:
    """Inodes with a flock held right now (read from /proc/locks, so the probe never takes a lock itself)."""
    inodes = set()
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 6 and parts[1] == "FLOCK" and ":" in parts[5]:
                inodes.add(int(parts[5].rsplit(":", 1)[1]))
    except OSError:
        pass
    return inodes


# ------------------------------------------------------------------------------------- watching
def ledger_rounds(path: Path) -> list[int]:
    """Rounds of the complete lines of a ledger file (no verification: the watcher must be fast)."""
    try:
        data = path.read_bytes()
    except OSError:
        return []
    return [int(m) for m in re.findall(rb'"round": (\d+)', data)]


def metrics_rounds(path: Path) -> list[int]:
    try:
        data = path.read_bytes()
    except OSError:
        return []
    out = []
    for line in data.split(b"\n"):
        try:
            out.append(int(json.loads(line)["round"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def latest(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    except (OSError, ValueError):
        return {}


def condition(point: str, run_dir: Path, rnd: int) -> Callable[[], str]:
    """A function that returns "" until the kill point is reached, then what it saw."""
    schools = run_dir / "schools"
    ckpt = run_dir / "checkpoints"

    if point.startswith("mid-training"):
        def check() -> str:
            held = locked_inodes()
            for lock in schools.glob("*/round.lock"):
                try:
                    inode = lock.stat().st_ino
                except OSError:
                    continue
                done = ledger_rounds(lock.parent / "ledger.jsonl")
                # the server has closed round r-1 (its checkpoint) and the school has not recorded round r yet
                if inode in held and rnd not in done and latest(run_dir).get("round") == rnd - 1:
                    return f"{lock.parent.name} holds its round lock in round {rnd} ({len(done)} entries in its ledger)"
            return ""
        return check
    if point == "school-ledger":
        def check() -> str:
            for ledger in schools.glob("*/ledger.jsonl"):
                if rnd in ledger_rounds(ledger):
                    return f"{ledger.parent.name}'s ledger has its round-{rnd} entry"
            return ""
        return check
    if point == "server-ledger-copy":
        def check() -> str:
            for copy in (run_dir / "ledger").glob("*.jsonl"):
                if rnd in ledger_rounds(copy):
                    return f"ledger/{copy.name} has a round-{rnd} entry"
            return ""
        return check
    if point == "checkpoint-write":
        def check() -> str:
            name = f"round-{rnd:04d}.pt"
            if any(ckpt.glob(f".{name}.*.tmp")):
                return f"checkpoints/.{name}.*.tmp exists"
            if (ckpt / name).exists() and latest(run_dir).get("round") != rnd:
                return f"checkpoints/{name} exists, latest.json still says round {latest(run_dir).get('round')}"
            return ""
        return check
    if point == "checkpoint-pending":
        def check() -> str:
            info = latest(run_dir)
            return f"latest.json {info}" if info.get("round") == rnd and info.get("evaluated") is False else ""
        return check
    if point in ("metrics-line", "torn-metrics"):
        def check() -> str:
            return f"metrics.jsonl has round {rnd}" if rnd in metrics_rounds(run_dir / "metrics.jsonl") else ""
        return check
    if point == "report-writing":
        def check() -> str:
            if any(run_dir.glob(".report.md.*.tmp")):
                return ".report.md.*.tmp exists"
            if (run_dir / "plots").is_dir():
                return "plots/ exists (report being drawn)"
            return ""
        return check
    if point.startswith("time-"):
        seconds = float(point.split("-", 1)[1])
        started = time.time()
        return lambda: f"{seconds:g} s elapsed" if time.time() - started >= seconds else ""
    raise ValueError(f"unknown kill point {point!r}; known: {', '.join(POINTS)}")


def start_simulate(args: list[str], log: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedfer", "simulate", *args], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True)


def run_until(point: str, proc: subprocess.Popen, run_dir: Path, rnd: int, timeout: float) -> tuple[str, float]:
    """Poll until the kill point (then kill everything) or the process ends; (what was seen, seconds)."""
    check = condition(point, run_dir, rnd)
    started = time.time()
    while time.time() - started < timeout:
        seen = check()
        if seen:
            kill_run(proc, run_dir)
            return seen, time.time() - started
        if proc.poll() is not None:
            return "", time.time() - started
        time.sleep(POLL_S)
    kill_run(proc, run_dir)
    return "timeout", time.time() - started


# ----------------------------------------------------------------------------------------- checks
@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Phase:
    name: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.checks.append(Check(name, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def read_lines(path: Path, fragments: set[bytes] = frozenset()) -> tuple[list[dict], list[str]]:
    """Parsed complete lines, and problems: a bad complete line is a problem (unless it is a torn last line
    seen at the crash, since ended by the next append: `fragments`), a torn last line a note."""
    if not path.exists():
        return [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()   # b"" when the file ends with a newline
    records, problems = [], []
    for n, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if line not in fragments:
                problems.append(f"{path.name} line {n} is not JSON ({line[:60]!r}…)")
    if tail:
        problems.append(f"torn last line (no newline, {len(tail)} bytes)")
    return records, problems


def school_state(run_dir: Path) -> dict[str, Path]:
    return {p.name: p for p in sorted((run_dir / "schools").glob("school-*")) if p.is_dir()}


def torn_tail(path: Path) -> bytes:
    """The file's last line if it has no newline (what a write cut short leaves), else b""."""
    try:
        data = path.read_bytes()
    except OSError:
        return b""
    return data.rsplit(b"\n", 1)[-1]


def check_run(run_dir: Path, phase: Phase, *, finished: bool, rounds: int, crashed_round: int | None,
              resumed_from: list[int] | None = None, fragments: set[bytes] = frozenset()) -> dict[str, Any]:
    """The invariants above; returns facts the summary shows (checkpoint round, metrics rounds, ε)."""
    facts: dict[str, Any] = {}
    metrics, events, torn = _check_jsonl(run_dir, phase, fragments)
    facts["checkpoint_round"] = ckpt_round = _check_checkpoints(run_dir, phase, finished)
    facts["metrics_rounds"] = _check_progress(run_dir, phase, metrics, ckpt_round, finished=finished, rounds=rounds)
    best_ok, best_detail = check_best(run_dir, metrics, finished)
    phase.add("best", best_ok, best_detail)

    released = _accepted_rounds(metrics)
    eps: dict[str, float] = {}
    retrained: dict[str, list[int]] = {}
    for school, state in school_state(run_dir).items():
        checked = _check_school(run_dir, phase, school, state, released.get(school, []))
        if checked is None:   # its ledger does not verify: nothing else of it can be checked
            continue
        eps[school], twice = checked
        if twice:
            retrained[school] = twice
    facts["epsilon"] = {s: round(v, 3) for s, v in eps.items()}
    leftovers = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob(".*.tmp") if ".flower" not in p.parts)
    facts["temp_files"] = leftovers
    if leftovers:
        phase.notes.append("temporary files a killed write left: " + ", ".join(leftovers))
    facts["retrained"] = retrained
    facts["torn"] = torn
    if finished:
        _check_finished_run(run_dir, phase, events, retrained, crashed_round, resumed_from)
    return facts


def _check_jsonl(run_dir: Path, phase: Phase, fragments: set[bytes]) -> tuple[list[dict], list[dict], list[str]]:
    """metrics.jsonl and events.jsonl: every complete line parses (a torn last line is only noted).
    Returns their records and the torn lines."""
    metrics, metric_problems = read_lines(run_dir / "metrics.jsonl", fragments)
    events, event_problems = read_lines(run_dir / "events.jsonl", fragments)
    torn = [p for p in metric_problems + event_problems if p.startswith("torn")]
    bad = [p for p in metric_problems + event_problems if not p.startswith("torn")]
    phase.add("jsonl", not bad,
              "; ".join(bad) or ("torn last line: " + ", ".join(torn) if torn else f"{len(metrics)} + {len(events)} lines"))
    return metrics, events, torn


def _check_checkpoints(run_dir: Path, phase: Phase, finished: bool) -> int | None:
    """Every round checkpoint loads and latest.json names a resumable one; returns its round (None: none yet)."""
    from server.run_dir import CheckpointError, check_resume_dir, load_checkpoint_file

    ckpt_round = None
    try:
        _, checkpoint, _ = check_resume_dir(run_dir)
        ckpt_round = int(checkpoint["round"])
        for other in sorted((run_dir / "checkpoints").glob("round-*.pt")):
            load_checkpoint_file(other)
        phase.add("checkpoints", True, f"latest round {ckpt_round}, {latest(run_dir)}")
    except CheckpointError as exc:
        if not (run_dir / "checkpoints" / "latest.json").exists() and not finished:
            phase.add("checkpoints", True, "no checkpoint yet (killed before round 1 ended)")
        else:
            phase.add("checkpoints", False, str(exc))
    return ckpt_round


def _check_progress(run_dir: Path, phase: Phase, metrics: list[dict], ckpt_round: int | None, *, finished: bool,
                    rounds: int) -> list[int]:
    """A finished run has each round's metrics line once and latest.json at its last round, evaluated; a killed
    one has gapless lines and a checkpoint at the last line's round or the next. Returns the lines' rounds."""
    done = [int(m["round"]) for m in metrics if isinstance(m, dict) and "round" in m]
    unique = sorted(set(done))
    gapless = unique == list(range(unique[0], unique[-1] + 1)) if unique else True
    last = unique[-1] if unique else 0
    ck = ckpt_round or 0
    if finished:
        once = sorted(done) == list(range(1, rounds + 1))
        lat = latest(run_dir)
        phase.add("progress", once and lat.get("round") == rounds and lat.get("evaluated") is True,
                  f"metrics rounds {done}, latest.json {lat}")
    else:
        phase.add("progress", gapless and len(done) == len(unique) and ck in (last, last + 1),
                  f"metrics rounds {done}, checkpoint round {ckpt_round}")
    return done


def _accepted_rounds(metrics: list[dict]) -> dict[str, list[int]]:
    """school -> the rounds whose reply the server accepted (status ok in metrics.jsonl)."""
    released: dict[str, list[int]] = {}
    for m in metrics:
        for school, outcome in (m.get("train") or {}).items():
            if isinstance(outcome, dict) and outcome.get("status") == "ok":
                released.setdefault(school, []).append(int(m["round"]))
    return released


def _check_school(run_dir: Path, phase: Phase, school: str, state: Path,
                  accepted: list[int]) -> tuple[float, list[int]] | None:
    """One school: its ledger and the run's copy verify and agree, its accountant matches the ledger, every
    accepted round has a ledger entry, its ε is within budget. Returns (ε, rounds of this run it trained
    twice), or None when its ledger does not verify."""
    from privacy.accounting import epsilon_of
    from privacy.ledger import LedgerError
    from privacy.policy import read_policy_file

    run_id = run_dir.name
    try:
        own = _check_ledgers(run_dir, phase, school, state)
    except LedgerError as exc:
        phase.add(f"ledger {school}", False, str(exc))
        return None
    effective = _check_accountant(phase, school, state, own[-1] if own else None)

    # released weights have a ledger entry
    trained = {(e["run_id"], e["round"]) for e in own if e["event"] == "round"}
    missing = [r for r in accepted if (run_id, r) not in trained]
    own_model = state / "own-model.pt"
    if own_model.exists():
        import torch

        saved = torch.load(own_model, map_location="cpu", weights_only=True)
        if (str(saved.get("run_id")), int(saved.get("round", -1))) not in trained:
            missing.append(f"own-model.pt round {saved.get('round')}")
    phase.add(f"released {school}", not missing,
              f"accepted rounds {accepted} all in the ledger" if not missing else f"no ledger entry for {missing}")

    # budget
    policy = read_policy_file(state)
    delta = own[-1]["delta"] if own else 1e-5
    epsilon = epsilon_of(effective, delta, "prv") if effective else 0.0
    budget = policy.budget if policy is not None else None
    phase.add(f"budget {school}", budget is None or epsilon <= budget + 1e-9, f"ε {epsilon:.3f} of {budget}")

    counts: dict[int, int] = {}
    for e in own:
        if e["event"] == "round" and e["run_id"] == run_id:
            counts[e["round"]] = counts.get(e["round"], 0) + 1
    return epsilon, sorted(r for r, n in counts.items() if n > 1)


def _check_ledgers(run_dir: Path, phase: Phase, school: str, state: Path) -> list[dict]:
    """The school's own ledger and the run's copy both verify, and the copy is a stretch of the school's
    ledger; returns the school's entries (LedgerError when either does not verify)."""
    from privacy.ledger import read_ledger_file, verify_entries
    from privacy.signing import PUBLIC_KEY_FILE

    own_path = state / "ledger.jsonl"
    own = read_ledger_file(own_path, school_id=school) if own_path.exists() else []
    if own:
        verify_entries(own, state / PUBLIC_KEY_FILE, source=str(own_path), school_id=school, start="genesis")
    copy_path = run_dir / "ledger" / f"{school}.jsonl"
    copy = read_ledger_file(copy_path, school_id=school) if copy_path.exists() else []
    if copy:
        verify_entries(copy, run_dir / "keys" / f"{school}.pub", source=str(copy_path), school_id=school,
                       start="run")
    hashes = [e["hash"] for e in own]
    contiguous = not copy or (copy[0]["hash"] in hashes and
                              hashes[hashes.index(copy[0]["hash"]):][:len(copy)] == [e["hash"] for e in copy])
    phase.add(f"ledger {school}", contiguous,
              f"{len(own)} entries, run copy {len(copy)}" + ("" if contiguous else ": the run copy is not part of the school's ledger"))
    return own


def _check_accountant(phase: Phase, school: str, state: Path, last_entry: dict | None) -> list:
    """The school's accountant history equals its ledger's (or is one round behind: a crash between the ledger
    append and the accountant's record, which the next round's reconcile restores). Returns the history ε is
    computed from: the ledger's when the accountant is behind."""
    from privacy.accounting import SchoolAccountant, school_dataset_id
    from privacy.ledger import history_key

    fingerprint = school_dataset_id(state, school) if (state / "dataset-id").exists() else None
    history: list = []
    if fingerprint:
        history = SchoolAccountant(state, school, fingerprint).history
    effective = list(history)
    if last_entry is None:
        phase.add(f"accountant {school}", not history, f"no ledger, accountant history {len(history)}")
        return effective
    before = last_entry["history_before"]
    after = before + ([[last_entry["noise_multiplier"], last_entry["sample_rate"], last_entry["steps"]]]
                      if last_entry["event"] == "round" else [])
    if history_key(history) == history_key(after):
        phase.add(f"accountant {school}", True, f"= ledger ({sum(h[2] for h in history)} steps)")
    elif last_entry["event"] == "round" and history_key(history) == history_key(before):
        effective = after
        phase.add(f"accountant {school}", True, "one round behind the ledger (crash between ledger append and "
                                                "accountant record; the next round's reconcile restores it)")
        phase.notes.append(f"{school}: accountant one round behind its ledger")
    else:
        phase.add(f"accountant {school}", False, f"accountant {history_key(history)} vs ledger {history_key(after)}")
    return effective


def _check_finished_run(run_dir: Path, phase: Phase, events: list[dict], retrained: dict[str, list[int]],
                        crashed_round: int | list[int] | None, resumed_from: list[int] | None) -> None:
    """After the resumed run finished: only the interrupted round(s) trained twice, events.jsonl records each
    resume where the crash left its checkpoint, and the report was written."""
    allowed = set(crashed_round if isinstance(crashed_round, list) else [crashed_round] if crashed_round else [])
    unexpected = {s: [r for r in rs if r not in allowed] for s, rs in retrained.items()}
    unexpected = {s: rs for s, rs in unexpected.items() if rs}
    phase.add("retrained", not unexpected,
              f"rounds trained twice: {retrained or 'none'} (allowed: the interrupted round {sorted(allowed) or '-'})")
    resumed = [e.get("round") for e in events if e.get("event") == "resumed"]
    phase.add("resumed", resumed_from is None or resumed == resumed_from,
              f"events.jsonl resumed at {resumed}, checkpoints on disk at the crash(es) {resumed_from}")
    phase.add("report", (run_dir / "report.md").is_file(), "report.md " + ("exists" if (run_dir / "report.md").is_file() else "missing"))


def check_best(run_dir: Path, metrics: list[dict], finished: bool) -> tuple[bool, str]:
    """The `best` invariant: (holds, what was seen)."""
    from server.best_round import BestRoundRule, beats, best_of, score_from_json
    from server.run_dir import CheckpointError, load_checkpoint_file, read_best_json
    from shared_models.config import defaults, read_yaml_file

    cfg = {**defaults(), **read_yaml_file(run_dir / "config.yaml")}   # flat keys
    lines = {int(m["round"]): m.get("evaluation") for m in metrics if isinstance(m, dict) and "round" in m}
    expected = best_of(lines, BestRoundRule.from_config(cfg))
    path = run_dir / "checkpoints" / "best.pt"
    if not path.exists():
        return expected is None, f"no best.pt; best of metrics.jsonl {expected.round if expected else None}"
    try:
        kept = score_from_json(load_checkpoint_file(path).get("best"))
    except CheckpointError as exc:
        return False, str(exc)
    if kept is None:
        return False, "best.pt has no readable 'best' field"
    if finished:
        agrees = read_best_json(run_dir) == kept
        return (expected is not None and kept.round == expected.round and agrees,
                f"best.pt round {kept.round}, best of metrics.jsonl {expected.round if expected else None}, "
                f"best.json {'agrees' if agrees else 'differs'}")
    # killed between best.pt and its round's metrics line: best.pt is one round ahead of the lines
    ahead = kept.round not in lines and (expected is None or beats(kept, expected))
    ok = (expected is not None and kept.round == expected.round) or ahead
    return ok, (f"best.pt round {kept.round}, best of metrics.jsonl {expected.round if expected else None}"
                + (" (its line not written yet)" if ahead else ""))


def audit(run_dir: Path) -> tuple[int, str]:
    """`fedfer privacy audit` over the run's copies (once the run has any) and every school's own ledger."""
    ledgers = [str(p / "ledger.jsonl") for p in school_state(run_dir).values() if (p / "ledger.jsonl").exists()]
    sources = ([str(run_dir)] if (run_dir / "ledger").is_dir() else []) + ledgers
    if not sources:
        return 0, "nothing to audit: no school recorded a round", []
    proc = subprocess.run([sys.executable, "-m", "fedfer", "privacy", "audit", *sources, "--trust-run-keys"],
                          capture_output=True, text=True, timeout=300)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode, (lines[-1] if lines else ""), lines


def lagging_copy(lines: list[str]) -> bool:
    """Right after a crash the run's copy may lack a school's last entries (its reply never reached the server,
    or the server died before storing it; the resumed run's next reply brings them): the audit notes it."""
    return any("replies the server never stored" in line for line in lines)


# ------------------------------------------------------------------------------------------- one point
@dataclass
class Outcome:
    point: str
    seen: list[str] = field(default_factory=list)
    killed_after_s: list[float] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    facts: list[dict[str, Any]] = field(default_factory=list)
    audit: list[tuple[int, str]] = field(default_factory=list)
    resume_exit: list[int] = field(default_factory=list)
    seconds: float = 0.0
    left_processes: int = 0
    notes: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return (not self.error and all(p.ok for p in self.phases)
                and all(code == 0 for code in self.resume_exit) and self.left_processes == 0)


def tear(path: Path) -> str:
    """Cut the file's last line in half, as a write cut short leaves it."""
    data = path.read_bytes()
    body, last = data[:-1].rsplit(b"\n", 1) if b"\n" in data[:-1] else (b"", data[:-1])
    cut = (body + b"\n" if body else b"") + last[: len(last) // 2]
    path.write_bytes(cut)
    return f"{path.name}: last line cut to {len(last) // 2} of {len(last)} bytes"


def run_point(point: str, work: Path, data_root: Path, rounds: int, rnd: int, timeout: float) -> Outcome:
    out = Outcome(point)
    started = time.time()
    base = work / point
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    run_dir = (base / "runs" / "crash").resolve()
    args = [*TINY, f"federation.rounds={rounds}", "run.name=crash", f"run.root={base / 'runs'}", f"data.root={data_root}"]
    crashes = [rnd, rnd + 1] if point == "double-crash" else [rnd]
    kill_point = "mid-training" if point == "double-crash" else point
    crashed_rounds: list[int] = []
    resumed_from: list[int] = []
    fragments: set[bytes] = set()   # torn last lines seen after a crash: readers skip them for good
    for n, target in enumerate(crashes):
        if n == 0:
            proc = start_simulate(args, base / "simulate-0.log", base)
        else:
            proc = start_simulate([f"run.resume={run_dir}"], base / f"resume-{n}.log", base)
        seen, after = run_until(kill_point, proc, run_dir, target, timeout)
        if not seen:
            out.error = f"the run ended (exit {proc.returncode}) before the kill point {kill_point} round {target}"
            return out
        out.seen.append(seen)
        out.killed_after_s.append(round(after, 2))
        say(f"  [{point}] killed after {after:.1f} s: {seen}")
        if point == "torn-metrics":
            note = tear(run_dir / "metrics.jsonl")
            with open(run_dir / "events.jsonl", "ab") as f:   # created if the run had no event yet
                f.write(b'{"event": "missing", "round": 2, "sch')
            say(f"  [{point}] {note}; events.jsonl ends in half a line")
        shutil.copytree(run_dir, base / f"at-crash-{n + 1}", ignore=shutil.ignore_patterns(".flower", "*.pt"),
                        dirs_exist_ok=True)   # what the crash left, for a post-mortem (checkpoints left out)
        if (run_dir.parent / "anchors").is_dir():   # the server's anchors live beside the run; the audit reads them
            shutil.copytree(run_dir.parent / "anchors", base / f"at-crash-{n + 1}-anchors", dirs_exist_ok=True)
        phase = Phase(f"crash {n + 1}")
        fragments |= {tail for tail in (torn_tail(run_dir / "metrics.jsonl"), torn_tail(run_dir / "events.jsonl")) if tail}
        out.facts.append(check_run(run_dir, phase, finished=False, rounds=rounds, crashed_round=None))
        out.phases.append(phase)
        code, verdict, lines = audit(run_dir)
        lagging = lagging_copy(lines)
        phase.add("audit", code == 0,
                  f"exit {code}: {verdict}" + (" (only the run copy lagging the schools' ledgers)" if lagging else ""))
        out.audit.append((code, verdict))
        if code != 0:   # the audit's own words, for the post-mortem: the verdict alone does not say what it found
            out.notes.append(f"audit after crash {n + 1}: " + " | ".join(lines[-30:]))
        # no checkpoint yet (killed before round 1's): the resume starts the run again, from round 0
        resumed_from.append(out.facts[-1]["checkpoint_round"] or 0)
        # the round after the checkpoint may have been trained already (its training, or with pipelined
        # evaluation the next round's, was under way): the resume asks for it again (docs/deployment.md)
        crashed_rounds.append((out.facts[-1]["checkpoint_round"] or 0) + 1)
        say(f"  [{point}] after crash {n + 1}: " + ("ok" if phase.ok else "FAILED: " + "; ".join(
            f"{c.name}: {c.detail}" for c in phase.checks if not c.ok)) + f"; audit exit {code}"
            + (" (run copy behind the schools' ledgers)" if lagging else ""))
    proc = start_simulate([f"run.resume={run_dir}"], base / "resume-final.log", base)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc, run_dir)
        out.error = "the resume did not finish in time"
    out.resume_exit.append(proc.returncode)
    left = run_processes(proc.pid, run_dir)
    if left:   # the launcher stops Ray and the SuperLink as the run ends; give them a moment
        out.notes.append("right after the resume ended: " + "; ".join(_describe(pid) for pid in sorted(left)))
        deadline = time.time() + 15
        while left and time.time() < deadline:
            time.sleep(0.5)
            left = {pid for pid in left if Path(f"/proc/{pid}").exists() and _state(pid) != "Z"}
    out.left_processes = len(left)
    if left:
        out.notes.append("still alive 15 s later: " + "; ".join(_describe(pid) for pid in sorted(left)))
    phase = Phase("resumed")
    out.facts.append(check_run(run_dir, phase, finished=True, rounds=rounds, crashed_round=crashed_rounds,
                               resumed_from=resumed_from, fragments=fragments))
    out.phases.append(phase)
    code, verdict, _ = audit(run_dir)
    phase.add("audit", code == 0, f"exit {code}: {verdict}")
    out.audit.append((code, verdict))
    say(f"  [{point}] after the resume (exit {proc.returncode}): " + ("ok" if phase.ok else "FAILED: " + "; ".join(
        f"{c.name}: {c.detail}" for c in phase.checks if not c.ok)) + f"; audit exit {out.audit[-1][0]}: {out.audit[-1][1]}")
    out.seconds = round(time.time() - started, 1)
    return out


# a `fedfer deploy restore-ledger` that SIGKILLs itself at one write: argv[1] is where ("accountant": the first
# accountant record; "ledger": the ledger.jsonl write, after the accountant), the rest the command's arguments
KILLED_RESTORE = """
import os, signal, sys
from pathlib import Path
import privacy.ledger_restore as restore
from privacy.accounting import SchoolAccountant
from fedfer.cli import main

where, argv = sys.argv[1], sys.argv[2:]
if where == "accountant":
    SchoolAccountant.record = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
else:
    real_write = restore.atomic_write_text
    def write(path, text):
        if Path(path).name == "ledger.jsonl":
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(path, text)
    restore.atomic_write_text = write
sys.exit(main(argv))
"""
RESTORE_KILLS = ("accountant", "ledger")


def _accountant_history(state: Path) -> dict[str, Any] | None:
    """The school's accountant history, summed per (σ, q) as the ledger's entries give it (None: no accountant)."""
    from privacy.ledger import history_key

    files = sorted(state.glob("accountant-*.json"))
    if not files:
        return None
    return {str(k): v for k, v in history_key(json.loads(files[0].read_text())["history"]).items()}


def make_accountant_older(state: Path) -> None:
    """The school's accountant as an old backup of its state folder holds it: its first half (at least one round
    dropped, at least one kept when it has two), so the restore catches up an accountant that counted less, not
    one that counted nothing."""
    (path,) = state.glob("accountant-*.json")   # one dataset, one accountant
    data = json.loads(path.read_text())
    data["history"] = data["history"][:len(data["history"]) // 2]
    path.write_text(json.dumps(data, indent=1))


def run_restore_point(work: Path, data_root: Path, rounds: int, timeout: float, old_accountant: bool = False) -> Outcome:
    """A finished run; school-00 loses its ledger and accountant (old_accountant: its accountant is put back holding
    half its rounds instead); the restore is killed at each write in turn, then run again to the end."""
    point = "restore-old-accountant" if old_accountant else "restore-ledger"
    out = Outcome(point)
    started = time.time()
    base = work / point
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    run_dir = (base / "runs" / "crash").resolve()
    args = [*TINY, f"federation.rounds={rounds}", "run.name=crash", f"run.root={base / 'runs'}", f"data.root={data_root}"]
    proc = start_simulate(args, base / "simulate-0.log", base)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_run(proc, run_dir)
        out.error = "the run did not finish in time"
        return out
    if proc.returncode != 0:
        out.error = f"the run failed (exit {proc.returncode}, {base / 'simulate-0.log'})"
        return out
    state = school_state(run_dir)["school-00"]
    ledger = state / "ledger.jsonl"
    entries_before, _ = read_lines(ledger)
    history_before = _accountant_history(state)
    ledger.unlink()
    if old_accountant:
        make_accountant_older(state)
    else:
        for path in state.glob("accountant-*.json"):
            path.unlink()
    history_lost = _accountant_history(state)   # what the restore starts from: None, or the older accountant
    command = ["deploy", "restore-ledger", "--state-dir", str(state), "--school", "school-00", "--from", str(run_dir.parent)]
    for n, where in enumerate(RESTORE_KILLS, start=1):
        killed = subprocess.run([sys.executable, "-c", KILLED_RESTORE, where, *command], cwd=base, capture_output=True,
                                text=True, timeout=timeout)
        out.seen.append(f"restore killed at the {where} write (exit {killed.returncode})")
        say(f"  [{point}] {out.seen[-1]}")
        phase = Phase(f"crash {n}")
        phase.add("killed", killed.returncode == -signal.SIGKILL, f"exit {killed.returncode} {killed.stderr[-300:]}")
        phase.add("ledger", not ledger.exists(), "no ledger.jsonl yet" if not ledger.exists() else "a ledger was written")
        history = _accountant_history(state)
        # killed at the accountant: as it was (none, or the older one); at the ledger: written, and it agrees
        phase.add("accountant", history == (history_lost if where == "accountant" else history_before),
                  f"{history} (before the loss: {history_before}; after it: {history_lost})")
        out.phases.append(phase)
    again = subprocess.run([sys.executable, "-m", "fedfer", *command], cwd=base, capture_output=True, text=True,
                           timeout=timeout)
    out.resume_exit.append(again.returncode)
    phase = Phase("resumed")
    entries_after, problems = read_lines(ledger)
    said = (again.stdout + again.stderr).strip().splitlines()
    phase.add("restored", again.returncode == 0, said[0] if said else "")
    phase.add("ledger", entries_after == entries_before and not problems,
              f"{len(entries_after)} entries, the same signed chain as before the loss"
              if entries_after == entries_before else f"{len(entries_after)} entries against {len(entries_before)}")
    history = _accountant_history(state)
    phase.add("accountant", history == history_before, f"{history} (before the loss: {history_before})")
    record = state / "ledger-restore.json"
    records = json.loads(record.read_text()) if record.is_file() else []
    phase.add("record", len(records) == 1, f"{len(records)} restore record(s) in {record.name}")
    code, verdict, _ = audit(run_dir)
    phase.add("audit", code == 0, f"exit {code}: {verdict}")
    out.audit.append((code, verdict))
    out.phases.append(phase)
    say(f"  [{point}] run again (exit {again.returncode}): " + ("ok" if phase.ok else "FAILED: " + "; ".join(
        f"{c.name}: {c.detail}" for c in phase.checks if not c.ok)) + f"; audit exit {code}: {verdict}")
    out.seconds = round(time.time() - started, 1)
    return out


def prepare_data(work: Path) -> Path:
    """The synthetic classroom every point reuses (generated once)."""
    root = work / "data"
    if not (root / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "fedfer", "data", "synth", "--out", str(root), *TINY, "federation.rounds=2"],
                       check=True, capture_output=True, cwd=work)
    return root


def summary(outcomes: list[Outcome]) -> str:
    rows = [("point", "killed at", "after crash", "after resume", "audit", "retrained", "ε at end", "result")]
    for o in outcomes:
        crash = "; ".join("ok" if p.ok else "FAIL " + ",".join(c.name for c in p.checks if not c.ok)
                          for p in o.phases if p.name.startswith("crash"))
        final = next((p for p in o.phases if p.name == "resumed"), None)
        resumed = "-" if final is None else ("ok" if final.ok else "FAIL " + ",".join(c.name for c in final.checks if not c.ok))
        last = o.facts[-1] if o.facts else {}
        rows.append((o.point, " | ".join(o.seen)[:60] or o.error[:60], crash or "-", resumed,
                     "/".join(str(code) for code, _ in o.audit) or "-",
                     ",".join(f"{s}:{r}" for s, r in (last.get("retrained") or {}).items()) or "none",
                     " ".join(f"{v:.2f}" for v in (last.get("epsilon") or {}).values()) or "-",
                     "PASS" if o.ok else "FAIL"))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.crash_harness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp") / f"fedfer-crash-{os.getpid()}")
    parser.add_argument("--points", default=",".join(POINTS), help=f"comma-separated, from {', '.join(POINTS)}")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--target-round", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per simulate or resume")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default WORK/crash-test.json)")
    args = parser.parse_args(argv)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    points = [p.strip() for p in args.points.split(",") if p.strip()]
    for p in points:
        if p not in POINTS and not re.match(r"^time-[0-9.]+$", p):
            parser.error(f"unknown point {p!r}")
    say(f"crash harness: {len(points)} kill point(s), {args.rounds} rounds, 2 schools + evaluation node; work {work}")
    data_root = prepare_data(work)
    outcomes = []
    for point in points:
        say(f"{point}:")
        try:
            if point in ("restore-ledger", "restore-old-accountant"):
                outcomes.append(run_restore_point(work, data_root, args.rounds, args.timeout,
                                                  old_accountant=point == "restore-old-accountant"))
            else:
                outcomes.append(run_point(point, work, data_root, args.rounds, args.target_round, args.timeout))
        except Exception as exc:  # noqa: BLE001 - one point's failure is a row, not the end of the harness
            outcomes.append(Outcome(point, error=f"{type(exc).__name__}: {exc}"))
            say(f"  [{point}] harness error: {type(exc).__name__}: {exc}")
    table = summary(outcomes)
    say("\nsummary\n" + table)
    out = args.out or work / "crash-test.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "command": "python -m simulations.crash_harness " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rounds": args.rounds, "target_round": args.target_round, "config": TINY,
        "outcomes": [{**asdict(o), "ok": o.ok} for o in outcomes],
        "passed": sum(o.ok for o in outcomes), "failed": sum(not o.ok for o in outcomes),
    }, indent=1, default=str))
    say(f"results: {out}")
    return 0 if all(o.ok for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
