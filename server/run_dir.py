"""The run directory: everything a run leaves behind, written so a crash never loses what is recorded.

    runs/<id>/config.yaml          resolved config
    runs/<id>/metrics.jsonl        one line per round (per-school train results, evaluation, timings)
    runs/<id>/events.jsonl         rejected replies, refusals, dropped schools (one line each)
    runs/<id>/ledger/<school>.jsonl  verified copies of the schools' signed ledger entries
    runs/<id>/keys/<school>.pub    the ledger public key the server trusts for that school
    runs/<id>/keys/<school>.retired/  the keys that key replaced (a chain may start under one)
    runs/<id>/checkpoints/round-NNNN.pt, latest.json   weights + round + strategy state (resume)
    runs/<id>/checkpoints/best.pt, best.json   the round whose global model scored best on the public benchmarks
                                   (server/best_round.py; never pruned, not a resume point)
    runs/<id>/report.md, plots/*.png
    runs/<id>/preparing.lock       only while `fedfer simulate` still pre-trains; the ServerApp waits for it (one
                                   a killed `fedfer simulate` left: removed by the next command opening the run)

Every write goes through shared_models/atomic_files.py: a killed process leaves at most a missing
metrics line (or a torn last one, skipped by readers and ended before the next line is appended), and a
checkpoint is the old one or the new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import pickle
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from logging import WARNING
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from flwr.common.logger import log

from server.best_round import RoundScore, last_scored, score_from_json
from shared_models.atomic_files import append_line, atomic_write_bytes, atomic_write_text, fsync_dir
from shared_models.config import ConfigError, defaults, dump_yaml, validate
from shared_models.small_files import read_small_file
from shared_models.wording import one_line

CHECKPOINT_NAME = re.compile(r"^round-[0-9]{4,9}\.pt$")
MAX_NUM_CLASSES = 1000          # FER uses 7 or 8; a checkpoint claiming 10^9 would allocate a 10^9-row head
MAX_LATEST_BYTES = 64 * 1024
BEST_CHECKPOINT = "best.pt"      # checkpoints/best.pt: the best round's model, in a round checkpoint's format
BEST_JSON = "best.json"          # checkpoints/best.json: which round it is and its scores (written after best.pt)


@dataclass
class RoundRecord:
    """What happened in one round; becomes one line of metrics.jsonl."""

    round: int
    started: float = field(default_factory=time.time)
    train: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluation: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluated_by: str = ""
    evaluated_in_round: int = 0   # pipelined: the round during whose training this round's model was evaluated
    aggregated: bool = False
    num_aggregated: int = 0
    federation_epsilon: float | None = None
    timing: dict[str, float] = field(default_factory=dict)


class CheckpointError(ValueError):
    """A checkpoint or a run directory to resume is missing, unreadable or inconsistent; one line naming the file."""


class NoCheckpointYet(CheckpointError):
    """The run stopped before its first checkpoint (no checkpoints/latest.json, but its config.yaml): a resume
    starts it again from its start model under that config (`check_restart_dir`)."""


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (one write of a complete line, then fsync)."""
    append_line(path, json.dumps(record, sort_keys=True, default=_json_default))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file's complete lines; a torn line (a crash cut its write short; append_jsonl
    ends it before the next line) is skipped, and so is a damaged one (not UTF-8, not JSON, not an object)."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except (ValueError, RecursionError):   # ValueError: JSONDecodeError, an integer of 5,000 digits
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


PREPARING = "preparing.lock"   # RunDirectory.preparing: held while `fedfer simulate` still pre-trains
RUN_LOCK = "run.lock"          # RunDirectory.hold: held by the ServerApp running the run (released when it exits or dies)


class RunBusy(ValueError):
    """The run is being run by another process: it is not resumed beside it."""


class RunDirectory:
    """Paths and atomic writers of one run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run_id = path.name

    @classmethod
    def create(cls, cfg: Mapping[str, Any]) -> "RunDirectory":
        root = Path(str(cfg["run.root"])).expanduser()
        if not root.is_absolute():
            root = Path(os.environ.get("FEDFER_WORKDIR", os.getcwd())) / root
        name = str(cfg["run.name"]) or new_run_id()
        path = root / name
        # run.name is checked at config load (one folder name); this is the last guard before writing
        if name in (".", "..") or Path(os.path.abspath(path)).parent != Path(os.path.abspath(root)):
            raise ConfigError(f"key 'run.name': {name!r} would leave run.root {root}")
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        run = cls(path.resolve())
        if not run.config_path.exists():
            dump_yaml(cfg, run.config_path)
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def preparing_path(self) -> Path:
        return self.path / PREPARING

    @contextlib.contextmanager
    def preparing(self) -> Iterator[None]:
        """The preparation gate: `fedfer simulate` holds it while it makes what the run needs (the
        pre-trained model, the schools, their policies) beside Flower's start; the ServerApp waits for it
        (:meth:`wait_until_prepared`) before it reads any of them. Removed when released; one a killed
        `fedfer simulate` left is removed by the next command that opens the run (:meth:`remove_stale_gate`)."""
        while True:
            fd = os.open(self.preparing_path, os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._is_the_gate(fd):
                break
            # a stale gate another command removed between our open and our lock: this lock guards nothing
            os.close(fd)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.preparing_path.unlink()   # before unlocking: a waiter already holding it still wakes
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def _is_the_gate(self, fd: int) -> bool:
        """Whether the open file `fd` is still the one at preparing.lock (not one removed since it was opened)."""
        try:
            here = os.stat(self.preparing_path)
        except FileNotFoundError:
            return False
        mine = os.fstat(fd)
        return (here.st_dev, here.st_ino) == (mine.st_dev, mine.st_ino)

    def wait_until_prepared(self) -> bool:
        """Wait while `fedfer simulate` still holds this run's preparation gate; True if it had to wait.
        No gate (a deployment, a run started without pre-training): returns at once; a stale one (no
        process holds it: its `fedfer simulate` was killed) is removed (:meth:`remove_stale_gate`)."""
        waited = False
        while True:
            with self._gate_locked(wait=True) as gate:
                if gate is None:
                    return waited
                fd, blocked = gate
                waited = waited or blocked
                if self._is_the_gate(fd):   # locked and still in place: its preparer was killed
                    self._remove_gate_held(fd)
                    return waited
                # the file we locked is no gate any more: its preparer finished (it removes the gate before it
                # unlocks), or a stale one was removed meanwhile; look again, a new preparer may hold a new gate

    def remove_stale_gate(self) -> bool:
        """Remove a preparing.lock no process holds — what a `fedfer simulate` killed while it pre-trained
        leaves (the kernel dropped its lock, the file stays) — so the run no longer looks as if it were being
        prepared. True if one was removed. RunBusy if a live `fedfer simulate` still holds it."""
        with self._gate_locked(wait=False) as gate:
            return gate is not None and self._remove_gate_held(gate[0])

    @contextlib.contextmanager
    def _gate_locked(self, *, wait: bool) -> Iterator[tuple[int, bool] | None]:
        """The existing preparing.lock, opened and locked: yields (its fd, whether another process held it and
        this waited), or None when there is no gate. `wait` False: RunBusy instead of waiting for a live
        preparer. Leaving the block closes the file, which releases the lock."""
        try:
            fd = os.open(self.preparing_path, os.O_RDWR)
        except FileNotFoundError:
            yield None
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                blocked = False
            except BlockingIOError:
                if not wait:
                    raise RunBusy(f"{self.path} is still being prepared by the `fedfer simulate` that started it "
                                  "(pre-training, building the schools): wait for it to end or stop it, then "
                                  "resume") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                blocked = True
            yield fd, blocked
        finally:
            os.close(fd)

    def _remove_gate_held(self, fd: int) -> bool:
        """With the gate's lock held through `fd`: remove the file if it is still the gate. A live preparer
        removes its gate before it unlocks, so a gate whose lock we could take is stale."""
        if not self._is_the_gate(fd):
            return False
        self.preparing_path.unlink(missing_ok=True)
        fsync_dir(self.path)
        # said once, where the admin looks: the command's log and the run's events
        log(WARNING, "[fedfer] %s: removed a stale preparing.lock (a `fedfer simulate` killed while it prepared "
                     "the run left it; no process held it)", self.path)
        self.event("stale-gate-removed", file=PREPARING)
        return True

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Hold the run while a ServerApp runs it: a second ServerApp on the same run (a resume while the
        first still runs, e.g. Flower's processes finishing a run whose `fedfer simulate` was killed alone)
        is refused with RunBusy instead of training and writing the run twice. An flock: the kernel
        releases it when the holder exits or is killed, so a crash never leaves the run held."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunBusy(f"{self.path} is being run by another process (a ServerApp still running it, e.g. what "
                              "a `fedfer simulate` killed on its own left finishing the run): wait for it to end "
                              "or stop it, then resume") from None
            self._sweep_killed_writes()
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _sweep_killed_writes(self) -> None:
        """Temp files of atomic checkpoint writes (shared_models/atomic_files.py: `.<name>.<random>.tmp`) that a
        killed ServerApp left. Only the holder of the run writes checkpoints, so with the run held none is in
        progress (other folders are left alone: `fedfer report` may be writing beside a run)."""
        folder = self.path / "checkpoints"
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            if stale.is_file() and not stale.is_symlink():
                stale.unlink(missing_ok=True)

    def check_not_busy(self) -> bool:
        """RunBusy if a ServerApp holds the run now (see `hold`), or `fedfer simulate` still prepares it (see
        `preparing`: its ServerApp waits at the gate and does not hold the run yet); takes and releases the
        locks at once. A gate left by a killed `fedfer simulate` is removed: True if one was."""
        if (self.path / RUN_LOCK).exists():
            with self.hold():
                pass
        return self.remove_stale_gate()

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def events_path(self) -> Path:
        return self.path / "events.jsonl"

    def ledger_path(self, school_id: str) -> Path:
        return self.path / "ledger" / f"{school_id}.jsonl"

    def key_path(self, school_id: str) -> Path:
        return self.path / "keys" / f"{school_id}.pub"

    def append_metrics(self, record: Mapping[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)

    def event(self, kind: str, **fields: Any) -> None:
        append_jsonl(self.events_path, {"event": kind, "time": time.time(), **fields})

    def metrics(self) -> list[dict[str, Any]]:
        # a line without an integer round is damaged: the resume and the summary count rounds by it
        return [r for r in read_jsonl(self.metrics_path)
                if isinstance(r.get("round"), int) and not isinstance(r["round"], bool)]

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, state_dict: Mapping[str, torch.Tensor], model_info: Mapping[str, Any],
                        cfg: Mapping[str, Any], strategy_state: Mapping[str, Any], keep: int = 2,
                        evaluated: bool = True) -> Path:
        """Weights + round + strategy state, written atomically; older checkpoints beyond `keep` are pruned.

        `evaluated=False`: the round's metrics line is not written yet (its model waits for the evaluation
        node); latest.json says so until `mark_evaluated`. A resume from such a checkpoint evaluates it
        first (server/app.py); the metrics file, not this flag, is what decides."""
        target = self.path / "checkpoints" / f"round-{server_round:04d}.pt"
        buffer = io.BytesIO()
        torch.save({"round": server_round, "model": dict(model_info), "state_dict": dict(state_dict),
                    "config": dict(cfg), "strategy": dict(strategy_state), "run_id": self.run_id}, buffer)
        atomic_write_bytes(target, buffer.getvalue())
        self._write_latest({"round": server_round, "file": target.name, "evaluated": evaluated})
        for old in sorted((self.path / "checkpoints").glob("round-*.pt"))[:-keep]:
            old.unlink(missing_ok=True)
        return target

    def save_best(self, best: RoundScore, state_dict: Mapping[str, torch.Tensor], model_info: Mapping[str, Any],
                  cfg: Mapping[str, Any], exhausted: list[str]) -> Path:
        """checkpoints/best.pt: the model of round `best.round` (a server/best_round.RoundScore), in a round
        checkpoint's format (every loader reads it) plus a "best" field with its scores; then best.json.

        best.pt is the authority: one atomic write holds the weights and which round they are, so a stop between
        the two files leaves best.json one best behind, which `best_checkpoint` (the resume) rewrites. No
        momentum in its strategy state: it is a model to use, not a point to resume from (that is latest.json's)."""
        target = self.path / "checkpoints" / BEST_CHECKPOINT
        buffer = io.BytesIO()
        torch.save({"round": best.round, "model": dict(model_info), "state_dict": dict(state_dict),
                    "config": dict(cfg), "strategy": {"exhausted": list(exhausted)}, "run_id": self.run_id,
                    "best": best.to_json()}, buffer)
        atomic_write_bytes(target, buffer.getvalue())
        self._write_best_json(best)
        return target

    def _write_best_json(self, best: RoundScore) -> None:
        atomic_write_text(self.path / "checkpoints" / BEST_JSON,
                          json.dumps({**best.to_json(), "file": BEST_CHECKPOINT}, sort_keys=True))

    def best_checkpoint(self) -> RoundScore | None:
        """The RoundScore best.pt holds (None: no best.pt yet); a resumed run continues from it, so a best from
        before the stop is kept. best.json is rewritten if it disagrees (a stop between the two writes).
        CheckpointError (one line naming the file) if best.pt is damaged."""
        target = self.path / "checkpoints" / BEST_CHECKPOINT
        if not target.exists():
            return None
        checkpoint = load_checkpoint_file(target)
        best = score_from_json(checkpoint.get("best"))
        if best is None or best.round != checkpoint.get("round"):
            raise CheckpointError(f"{target}: field 'best' is missing or does not describe its round")
        if read_best_json(self.path) != best:
            self._write_best_json(best)
        return best

    def _write_latest(self, latest: Mapping[str, Any]) -> None:
        atomic_write_text(self.path / "checkpoints" / "latest.json", json.dumps(dict(latest)))

    def mark_evaluated(self, server_round: int) -> None:
        """Round `server_round`'s metrics line is written: flag latest.json if it points at that round."""
        path = self.path / "checkpoints" / "latest.json"
        if path.is_file():
            latest = json.loads(path.read_text(encoding="utf-8"))
            if int(latest.get("round", -1)) == server_round and latest.get("evaluated") is False:
                self._write_latest({**latest, "evaluated": True})

    def latest_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint latest.json names, loaded safely and its fields type-checked; None without latest.json.
        (`check_resume_dir` adds the config and the registry checks a resume needs.)"""
        if not (self.path / "checkpoints" / "latest.json").exists():
            return None
        return check_resume_dir(self.path, deep=False)[1]


def read_best_json(run_path: Path) -> RoundScore | None:
    """The RoundScore checkpoints/best.json records (which round best.pt holds and its public scores), or None
    when there is none or it is unreadable (best.pt itself is the authority; a loader only prints this)."""
    path = Path(run_path) / "checkpoints" / BEST_JSON
    try:   # no pipe, device or oversized file: a run directory may come from anywhere
        return score_from_json(json.loads(read_small_file(path, MAX_LATEST_BYTES).decode("utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):   # SmallFileError is an OSError
        return None


def last_public_score(run_path: Path) -> RoundScore | None:
    """The last round of metrics.jsonl with a public score (server/best_round.py `last_scored`)."""
    return last_scored({line["round"]: line.get("evaluation") for line in RunDirectory(Path(run_path)).metrics()
                        if isinstance(line.get("evaluation"), dict)})


def start_evaluation(run_path: Path) -> dict[str, Any] | None:
    """Round 0's evaluation in metrics.jsonl (the start model: the pre-trained checkpoint), or None."""
    for line in RunDirectory(Path(run_path)).metrics():
        if line.get("round") == 0 and isinstance(line.get("evaluation"), dict):
            return line["evaluation"]
    return None


def latest_is_not_best(run_path: Path, latest_round: int) -> str | None:
    """The line a command that was given a run directory as a model prints when its latest round (what it
    uses) is not the best round on the public benchmarks; None when it is, or the run kept no best."""
    best = read_best_json(run_path)
    if best is None or best.round == latest_round:
        return None
    last = last_public_score(run_path)
    common = sorted(set(last.accuracies) & set(best.accuracies)) if last is not None and last.round == latest_round else []
    scored = f" ({last.on(common):.3f} on the public benchmarks)" if common else ""
    return (f"{run_path}: using its latest round {latest_round}{scored}; round {best.round} scored best there "
            f"({best.describe()}): give {Path(run_path) / 'checkpoints' / BEST_CHECKPOINT} to use it")


# -- reading checkpoints (untrusted input: a run directory may come from anywhere) ----------------------
def _first_line(exc: BaseException) -> str:
    text = one_line(exc)
    text = text if text else type(exc).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def load_checkpoint_file(path: Path) -> dict[str, Any]:
    """torch.load with weights_only=True (a checkpoint is data: it must never run code when loaded), then
    the fields every reader relies on; any problem is a CheckpointError naming the file."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: checkpoint not found") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - whatever the parser trips on, the file is not a checkpoint
        # the unpickler's refusal says what it refused (a crafted file); anything else is the parser's internals
        why = _first_line(exc) if isinstance(exc, pickle.UnpicklingError) else "not a torch checkpoint file"
        raise CheckpointError(f"{path}: not a readable fedfer checkpoint ({why})") from None
    check_checkpoint(checkpoint, path)
    return checkpoint


def check_checkpoint(checkpoint: Any, path: Path, *, for_resume: bool = False) -> None:
    """Types and ranges of a loaded checkpoint's fields (model, state_dict; round, config, strategy to resume).
    Whether the model exists and the weights fit it is `check_resume_dir`'s (and the registry's) business."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: not a fedfer checkpoint (expected a dict, got {type(checkpoint).__name__})")
    model = checkpoint.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: missing 'model' (name, preset, num_classes)")
    for key in ("name", "preset", "num_classes"):
        if key not in model:
            raise CheckpointError(f"{path}: missing 'model.{key}'")
    name, preset, classes = model["name"], model["preset"], model["num_classes"]
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{path}: field 'model.name' must be a model name; got {_show(name)}")
    if not isinstance(preset, str):
        raise CheckpointError(f"{path}: field 'model.preset' must be a preset name; got {_show(preset)}")
    if isinstance(classes, bool) or not isinstance(classes, int) or not 2 <= classes <= MAX_NUM_CLASSES:
        raise CheckpointError(f"{path}: field 'model.num_classes' must be an int in 2..{MAX_NUM_CLASSES}; "
                              f"got {_show(classes)}")
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: missing 'state_dict'")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(f"{path}: field 'state_dict' must map parameter names to tensors")
    if "round" in checkpoint or for_resume:
        rnd = checkpoint.get("round")
        if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
            raise CheckpointError(f"{path}: field 'round' must be an int >= 0; got {_show(rnd)}")
    if not for_resume:
        return
    if not isinstance(checkpoint.get("config"), dict):
        raise CheckpointError(f"{path}: missing 'config' (the run's resolved config)")
    strategy = checkpoint.get("strategy")
    if not isinstance(strategy, dict):
        raise CheckpointError(f"{path}: missing 'strategy' (exhausted schools, momentum)")
    exhausted = strategy.get("exhausted", [])
    if not isinstance(exhausted, list) or not all(isinstance(s, str) for s in exhausted):
        raise CheckpointError(f"{path}: field 'strategy.exhausted' must be a list of school ids")
    left_out = strategy.get("left_out", {})   # why each was left out (absent in checkpoints written before)
    if not isinstance(left_out, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in left_out.items()):
        raise CheckpointError(f"{path}: field 'strategy.left_out' must map school ids to reasons")
    momentum = strategy.get("momentum")
    if momentum is not None and (not isinstance(momentum, list) or not all(isinstance(m, torch.Tensor) for m in momentum)):
        raise CheckpointError(f"{path}: field 'strategy.momentum' must be a list of tensors or absent")
    saved = strategy.get("unevaluated")
    if saved is not None:
        try:
            RoundRecord(**saved)
            ok = isinstance(saved.get("round"), int)
        except TypeError:
            ok = False
        if not ok:
            raise CheckpointError(f"{path}: field 'strategy.unevaluated' is not a round record")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_resume_dir(path: Path, *, deep: bool = True) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """Everything `run.resume` will read, checked before any Flower process starts: the directory,
    checkpoints/latest.json, the checkpoint it names (loaded without running code) and, with `deep`, the
    config inside it and its weights fitted to its registered model. Returns (checkpoint path, checkpoint,
    validated config; the checkpoint's raw config without `deep`)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"run.resume: {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"run.resume: {path} is not a directory (give the run directory)")
    latest = path / "checkpoints" / "latest.json"
    try:
        st = latest.stat()
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{latest}: not a regular file")
        if st.st_size > MAX_LATEST_BYTES:
            raise CheckpointError(f"{latest}: {st.st_size} bytes; not a latest.json")
        info = json.loads(latest.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if (path / "config.yaml").is_file():   # a run killed before round 1's checkpoint: it can start again
            raise NoCheckpointYet(f"{latest}: missing; {path} has no checkpoint yet") from None
        raise CheckpointError(f"{latest}: missing; {path} has no checkpoint to resume from") from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"{latest}: unreadable ({_first_line(exc)})") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"{latest}: expected a JSON object with 'round' and 'file'")
    name, rnd = info.get("file"), info.get("round")
    if not isinstance(name, str) or not CHECKPOINT_NAME.match(name):
        raise CheckpointError(f"{latest}: field 'file' must name a checkpoint like round-0003.pt; got {_show(name)}")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or rnd < 0:
        raise CheckpointError(f"{latest}: field 'round' must be an int >= 0; got {_show(rnd)}")
    if "evaluated" in info and not isinstance(info["evaluated"], bool):
        raise CheckpointError(f"{latest}: field 'evaluated' must be true or false")
    target = path / "checkpoints" / name
    checkpoint = load_checkpoint_file(target)
    check_checkpoint(checkpoint, target, for_resume=True)
    if checkpoint["round"] != rnd:
        raise CheckpointError(f"{target}: holds round {checkpoint['round']} but {latest} says round {rnd}")
    if not deep:
        return target, checkpoint, dict(checkpoint["config"])
    known = defaults()
    try:
        cfg = validate({k: v for k, v in checkpoint["config"].items() if k in known}, source=f"{target}: config")
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    model_from_checkpoint(checkpoint, target)   # the weights fit the model the checkpoint names
    return target, checkpoint, cfg


def check_restart_dir(path: Path) -> dict[str, Any]:
    """The validated config.yaml of a run with no checkpoint yet (`NoCheckpointYet`): a resume starts such a run
    again, from round 0 and its start model, under the settings it started with. Nothing of the run is lost:
    no round was aggregated, and whatever ε the schools spent on the interrupted round is in their ledgers
    (each school's budget guard counts it); the run's copies of their entries stay and are extended."""
    from shared_models.config import read_yaml_file

    config = Path(path).expanduser() / "config.yaml"
    known = defaults()
    try:
        return validate({k: v for k, v in read_yaml_file(config).items() if k in known}, source=str(config))
    except ConfigError as exc:
        raise CheckpointError(one_line(exc)) from None


def restart_message(run_path: Path) -> str:
    """The line that says a resume starts its run again (the ServerApp logs it; `fedfer simulate` prints it
    before Flower starts and does not echo the ServerApp's)."""
    return (f"{run_path} has no checkpoint yet: it starts again at round 1, from its start model (what the "
            "schools spent on the lost round stays in their ledgers)")


def model_from_checkpoint(checkpoint: Mapping[str, Any], path: Path) -> Any:
    """The checkpoint's registered model with its weights loaded; CheckpointError (one line naming
    `path`) for an unknown model or preset, or weights that do not fit."""
    from shared_models.models import registry

    info = checkpoint["model"]
    if info["name"] not in registry.available():
        raise CheckpointError(f"{path}: field 'model.name' must be one of {', '.join(registry.available())}; "
                              f"got {_show(info['name'])}")
    if info["preset"] not in registry.presets(info["name"]):
        raise CheckpointError(f"{path}: field 'model.preset' must be one of "
                              f"{', '.join(registry.presets(info['name']))}; got {_show(info['preset'])}")
    model = registry.build(info["name"], num_classes=info["num_classes"], preset=info["preset"])
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {info['name']}/{info['preset']} ({_first_line(exc)})") from None
    return model
