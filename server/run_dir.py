"""The run directory: everything a run leaves behind, written so a crash never loses what is recorded.

    runs/<id>/config.yaml          resolved config
    runs/<id>/metrics.jsonl        one line per round (per-school train results, evaluation, timings)
    runs/<id>/events.jsonl         rejected replies, refusals, dropped schools (one line each)
    runs/<id>/ledger/<school>.jsonl  verified copies of the schools' signed ledger entries
    runs/<id>/keys/<school>.pub    the ledger public key the server trusts for that school
    runs/<id>/checkpoints/round-NNNN.pt, latest.json   weights + round + strategy state (resume)
    runs/<id>/report.md, plots/*.png

Every write goes through shared_models/atomic_files.py: a killed process leaves at most a missing
metrics line, never a torn one, and a checkpoint is the old one or the new one.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from shared_models.atomic_files import append_line, atomic_write_bytes, atomic_write_text
from shared_models.config import dump_yaml


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line (one write of a complete line, then fsync)."""
    append_line(path, json.dumps(record, sort_keys=True, default=_json_default))


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Read complete lines; a trailing partial line (impossible with append_jsonl, but cheap to guard) is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)


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
        path = root / (str(cfg["run.name"]) or new_run_id())
        (path / "checkpoints").mkdir(parents=True, exist_ok=True)
        run = cls(path.resolve())
        if not run.config_path.exists():
            dump_yaml(cfg, run.config_path)
        return run

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

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
        return read_jsonl(self.metrics_path)

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
        latest = self.path / "checkpoints" / "latest.json"
        if not latest.is_file():
            return None
        name = json.loads(latest.read_text(encoding="utf-8"))["file"]
        return torch.load(self.path / "checkpoints" / name, map_location="cpu", weights_only=False)
