"""The run report: ``runs/<id>/report.md`` + ``runs/<id>/plots/*.png``, rebuilt from the run
directory alone (``fedfer report RUN_DIR``), so it can be redrawn for a finished, crashed or
still-running federation.

Inputs (the run directory the ServerApp writes):

* ``config.yaml`` — the resolved config (nested or flat dotted keys);
* ``metrics.jsonl`` — one JSON object per round: ``{"round": r, "train": {school: {"num_examples",
  "loss", "epsilon", "status": "ok" | reason}}, "evaluation": {benchmark: metric dict}, "timing": {…}}``
  (metric dict = :func:`shared_models.metrics.classification_report` + ``labels`` when known);
* ``ledger/<school>.jsonl`` — one JSON line per school per round with at least ``school_id``,
  ``round``, ``epsilon``.

Tolerance: a missing file, a torn or non-JSON line, missing rounds, a school that refused
(``budget-exhausted``) or failed — all become notes in the report, never an exception. A round
written twice (after a resume) counts once: the last line wins.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from server.best_round import BestRoundRule, RoundScore, best_of, compare_line, last_scored, undeclared
from shared_models.atomic_files import atomic_write_text, readable_mode
from shared_models.config import ConfigError, read_yaml_file
from shared_models.labels import FER7, FER8
from shared_models.wording import counted, one_line

PAPER_MARK = "paper, centralised, non-private"
#: Above this many schools the report shows distributions (quantiles, a histogram, a band of ε curves)
#: instead of one table row and one curve per school, and names at most NAMED_SCHOOLS schools per cell.
MANY_SCHOOLS = 20
NAMED_SCHOOLS = 5


@dataclass(frozen=True)
class PublishedFigure:
    """A figure published by the paper a model comes from (centralised, non-private), in %."""

    benchmark: str
    model: str
    metric: str
    value: float
    source: str


_HAFNET = "Vayadande et al., HAFNet (seed 000)"
_SFER = "Shou et al., Sensors 2024, SFER-MDFAE (seed 002)"
_ALY = "Aly et al., IEEE Access 2023, ResNet-50+CBAM (seed 001)"
_SINGH = "Singh et al., R(2+1)D-18 + attention (seed 003)"

#: the seed papers' published test figures (all centralised training, no privacy).
PUBLISHED: tuple[PublishedFigure, ...] = (
    PublishedFigure("rafdb", "hafnet", "accuracy", 89.70, _HAFNET),
    PublishedFigure("affectnet7", "hafnet", "accuracy", 65.69, _HAFNET),
    PublishedFigure("affectnet8", "hafnet", "accuracy", 62.09, _HAFNET),
    PublishedFigure("fer2013", "sfer-mdfae", "accuracy", 76.18, _SFER),
    PublishedFigure("ferplus", "sfer-mdfae", "accuracy", 92.75, _SFER),
    PublishedFigure("rafdb", "sfer-mdfae", "accuracy", 92.93, _SFER),
    PublishedFigure("affectnet7", "sfer-mdfae", "accuracy", 67.86, _SFER),
    PublishedFigure("fer2013", "resnet50-cbam", "accuracy", 88.13, _ALY),
    PublishedFigure("rafdb", "resnet50-cbam", "accuracy", 86.72, _ALY),
    PublishedFigure("ckplus", "resnet50-cbam", "accuracy", 94.58, _ALY),
    PublishedFigure("dfew", "r2plus1d-attention", "accuracy", 59.28, _SINGH),
    PublishedFigure("dfew", "r2plus1d-attention", "uar", 48.35, _SINGH),
    PublishedFigure("afew", "r2plus1d-attention", "accuracy", 59.63, _SINGH),
    PublishedFigure("daisee", "r2plus1d-attention", "accuracy", 58.62, _SINGH),
)
#: model names as the registry or a user may spell them (alphanumerics only) -> PUBLISHED key
MODEL_ALIASES: dict[str, str] = {
    "hafnet": "hafnet", "dan": "hafnet",
    "sfermdfae": "sfer-mdfae", "sfer": "sfer-mdfae", "mdfae": "sfer-mdfae",
    "resnet50cbam": "resnet50-cbam", "cbamresnet50": "resnet50-cbam", "alyresnet50": "resnet50-cbam",
    "r2plus1dattention": "r2plus1d-attention", "r2plus1d": "r2plus1d-attention", "r21d": "r2plus1d-attention",
    "r2plus1dattn": "r2plus1d-attention", "r21dattention": "r2plus1d-attention",
}
#: benchmark spellings -> PUBLISHED key (a ':split' suffix is ignored)
BENCHMARK_ALIASES: dict[str, str] = {"affectnet": "affectnet7", "raf-db": "rafdb", "ck+": "ckplus", "fer+": "ferplus"}


def _alnum(text: str) -> str:
    return "".join(ch for ch in str(text).lower() if ch.isalnum())


def model_key(name: str) -> str:
    return MODEL_ALIASES.get(_alnum(name), str(name).lower())


def benchmark_key(name: str) -> str:
    base = str(name).split(":", 1)[0].strip().lower()
    return BENCHMARK_ALIASES.get(base, base)


def published_for(benchmark: str) -> list[PublishedFigure]:
    key = benchmark_key(benchmark)
    return [f for f in PUBLISHED if f.benchmark == key]


# -- reading the run directory ---------------------------------------------------------------
@dataclass
class RunData:
    run_dir: Path
    config: dict[str, Any] = field(default_factory=dict)
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    ledger: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    references: dict[str, Any] | None = None   # references.json (simulations/references.py), when the run made it
    incidents: list[dict[str, Any]] = field(default_factory=list)   # events.jsonl: what the coordinator refused
    stopped_in_round: int | None = None   # events.jsonl "finished": the first round not run (no school could train)
    stopped_why: str = "no school could train any more"   # its reason, in words (schools out of budget, or offline)

    @property
    def run_id(self) -> str:
        return str(self.config.get("run.id") or self.config.get("run.name") or self.run_dir.name)

    @property
    def planned_rounds(self) -> int | None:
        value = self.config.get("federation.rounds")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_ROUND:
            return None
        return int(value)

    @property
    def budget(self) -> float | None:
        value = self.config.get("privacy.budget")
        return float(value) if _is_number(value) and value > 0 else None

    def benchmarks(self) -> list[str]:
        names: dict[str, None] = {}
        for r in sorted(self.rounds):
            for name in (self.rounds[r].get("evaluation") or {}):
                names[name] = None
        return list(names)

    def schools(self) -> list[str]:
        names = set(self.ledger)
        for record in self.rounds.values():
            names.update((record.get("train") or {}).keys())
        return sorted(names)


def _read_jsonl(path: Path, notes: list[str]) -> Iterable[tuple[int, dict[str, Any]]]:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as exc:
        notes.append(f"{path}: unreadable ({exc.strerror or exc})")
        return
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except (ValueError, RecursionError):   # JSONDecodeError, an integer of 5,000 digits; 100,000 nested brackets
            last = number == len(lines)
            notes.append(f"{path.name} line {number}: not valid JSON{' (torn last line of a running or crashed run?)' if last else ''}; skipped")
            continue
        if not isinstance(value, dict):
            notes.append(f"{path.name} line {number}: not a JSON object; skipped")
            continue
        yield number, value


# What a run directory holds (server/run_dir.py writes them); the report's own output does not count.
RUN_MARKERS = ("config.yaml", "metrics.jsonl", "events.jsonl", "checkpoints", "ledger", "keys", "schools")
REPORT_OUTPUT = ("report.md", "plots")


def _refuse_a_folder_of_something_else(run_dir: Path) -> None:
    """An empty folder is a run that has just started; a folder holding other things and none of a run's
    files (e.g. `runs/anchors`, a data folder) is a wrong path, refused before a report is written into it."""
    names = sorted(p.name for p in run_dir.iterdir())
    if any(name in RUN_MARKERS for name in names):
        return
    others = [name for name in names if name not in REPORT_OUTPUT]
    if others:
        shown = ", ".join(others[:3]) + (", …" if len(others) > 3 else "")
        raise ValueError(f"{run_dir}: not a run directory (none of config.yaml, metrics.jsonl, checkpoints/, "
                         f"ledger/; it holds {shown})")


def load_run(run_dir: Path) -> RunData:
    """Read what exists of a run directory; problems become ``notes``. Raises only when
    `run_dir` itself is not a directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: not a run directory")
    _refuse_a_folder_of_something_else(run_dir)
    data = RunData(run_dir=run_dir)
    _read_config(run_dir, data)
    _read_metrics(run_dir, data)
    _read_ledger_copies(run_dir, data)
    data.references = _read_references(run_dir, data.notes)
    _read_events(run_dir, data)
    _note_missing_rounds(data)
    return data


def _read_config(run_dir: Path, data: RunData) -> None:
    config_path = run_dir / "config.yaml"
    if config_path.is_file():
        try:
            # the config loader's strict reader: no aliases, bounded nesting, finite numbers, UTF-8
            data.config = read_yaml_file(config_path)
        except ConfigError as exc:
            data.notes.append(f"config.yaml: unreadable ({str(exc).replace(str(config_path) + ':', '').strip()})")
    else:
        data.notes.append("config.yaml: missing (setup table incomplete)")


def _read_metrics(run_dir: Path, data: RunData) -> None:
    """metrics.jsonl into ``data.rounds``: one record per round, the later line when a resume wrote it twice."""
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        data.notes.append("metrics.jsonl: missing (no round finished yet?)")
        return
    for number, record in _read_jsonl(metrics_path, data.notes):
        r = record.get("round")
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= MAX_ROUND:
            data.notes.append(f"metrics.jsonl line {number}: no integer 'round' in 0..{MAX_ROUND}; skipped")
            continue
        record = _typed_record(record, number, data.notes)
        if r in data.rounds:
            data.notes.append(f"metrics.jsonl: round {r} recorded twice (resumed run?); the later line is used")
        data.rounds[r] = record


def _read_ledger_copies(run_dir: Path, data: RunData) -> None:
    """ledger/<school>.jsonl into ``data.ledger``: each school's entries with a round and an ε, by round."""
    ledger_dir = run_dir / "ledger"
    if not ledger_dir.is_dir():
        return
    for path in sorted(ledger_dir.glob("*.jsonl")):
        entries = []
        for number, entry in _read_jsonl(path, data.notes):
            if not isinstance(entry.get("round"), int) or not _is_number(entry.get("epsilon")):
                data.notes.append(f"ledger/{path.name} line {number}: needs integer 'round' and numeric 'epsilon'; skipped")
                continue
            entries.append(entry)
        school = str(entries[0].get("school_id", path.stem)) if entries else path.stem
        data.ledger[school] = sorted(entries, key=lambda e: e["round"])


def _read_events(run_dir: Path, data: RunData) -> None:
    """events.jsonl: the incidents the report lists, and the round the coordinator stopped the federation in."""
    events_path = run_dir / "events.jsonl"
    if not events_path.is_file():
        return
    # isinstance first: an "event" that is a list or an object is unhashable (a TypeError in the dict lookup)
    events = [e for _, e in _read_jsonl(events_path, data.notes)]
    data.incidents = [e for e in events if isinstance(e.get("event"), str) and e["event"] in INCIDENTS]
    stops = [e for e in events if e.get("event") == "finished" and isinstance(e.get("round"), int)
             and not isinstance(e["round"], bool) and 0 < e["round"] <= MAX_ROUND]
    data.stopped_in_round = stops[-1]["round"] if stops else None
    if stops and stops[-1].get("reason") == "no school online":   # server/strategy.py _finish
        data.stopped_why = "no school that could train was online (federation.offline_wait)"


def _note_missing_rounds(data: RunData) -> None:
    """A note for rounds with no metrics line, and for a run that stopped (or is still running) before its plan."""
    if not data.rounds:
        return
    present = sorted(data.rounds)
    last = max(present[-1], data.planned_rounds or 0)
    missing = [r for r in range(1, present[-1] + 1) if r not in data.rounds]
    if missing:
        data.notes.append(f"rounds with no metrics line: {_ranges(missing)}")
    trained = [r for r in present if r > 0]   # round 0 is the starting model, not a round of the plan
    if data.stopped_in_round is not None and data.stopped_in_round > present[-1]:
        # not a partial run: the coordinator ended it (server/strategy.py FederationFinished)
        data.notes.append(f"the federation stopped after round {data.stopped_in_round - 1} of {last}: "
                          f"{data.stopped_why}; {counted(len(trained), 'round')} recorded")
    elif data.planned_rounds and present[-1] < data.planned_rounds:
        data.notes.append(f"partial run: {len(trained)} of {counted(last, 'planned round')} recorded")


#: events.jsonl kinds the per-round table does not show: a node refused when asked its role, a school whose ledger
#: key or anchor was refused, an evaluation node's reply refused, a round left without scores, a ledger gap
INCIDENTS = {"query-error": "node refused at the role query", "rejected-school": "school refused for the run",
             "ledger-anchor": "ledger did not continue the anchor", "ledger-gap": "ledger gap (accepted)",
             "evaluator-error": "evaluation node's reply refused", "not-evaluated": "round not evaluated"}
MAX_INCIDENT_ROWS = 20


def _incident_section(data: RunData) -> list[str]:
    """What the coordinator refused or could not do, from events.jsonl (the progress log said it once)."""
    if not data.incidents:
        return []
    lines = ["## What the coordinator refused", "", "| what | round | node / school | reason |", "|---|---|---|---|"]
    for e in data.incidents[:MAX_INCIDENT_ROWS]:
        who = e.get("school") or (f"node {e['node_id']}" if "node_id" in e else "")
        reason = one_line(e.get("reason", ""))[:200].replace("|", "/")
        rnd = str(e.get("round", ""))[:20].replace("|", "/")
        lines.append(f"| {INCIDENTS[e['event']]} | {rnd} | {str(who)[:80].replace('|', '/')} | {reason} |")
    if len(data.incidents) > MAX_INCIDENT_ROWS:
        lines.append(f"| … and {len(data.incidents) - MAX_INCIDENT_ROWS} more in events.jsonl | | | |")
    return lines + [""]


def _read_references(run_dir: Path, notes: list[str]) -> dict[str, Any] | None:
    from server.added import read_references

    return read_references(run_dir, notes)


MAX_ROUND = 1_000_000   # the round tables and curves span 1..last round: a round of 10^12 is a broken line


def _typed_record(record: dict[str, Any], number: int, notes: list[str]) -> dict[str, Any]:
    """A metrics line with every field the report reads of the type it expects; a field of the wrong type
    is dropped with a note naming the line and field (the rest of the line is still used)."""
    where = f"metrics.jsonl line {number}"
    record = dict(record)
    for key in ("train", "evaluation", "timing"):
        if key in record and not isinstance(record[key], dict):
            notes.append(f"{where}: field '{key}' is {type(record[key]).__name__}, not an object; ignored")
            record[key] = {}
    if "evaluated_by" in record and not isinstance(record["evaluated_by"], str):
        notes.append(f"{where}: field 'evaluated_by' is not a string; shown as given")
        record["evaluated_by"] = str(record["evaluated_by"])[:80]
    train = {}
    for school, outcome in (record.get("train") or {}).items():
        if isinstance(outcome, dict) and not isinstance(outcome.get("status", "ok"), str):
            notes.append(f"{where}: field 'train.{school}.status' is not a string; shown as given")
            outcome = {**outcome, "status": str(outcome["status"])[:80]}
        train[school] = outcome
    record["train"] = train
    evaluation = {}
    for name, metrics in (record.get("evaluation") or {}).items():
        if not isinstance(metrics, dict):
            notes.append(f"{where}: field 'evaluation.{name}' is {type(metrics).__name__}, not an object; ignored")
            continue
        metrics = dict(metrics)
        if "confusion" in metrics and not _is_confusion(metrics["confusion"]):
            notes.append(f"{where}: field 'evaluation.{name}.confusion' is not a square table of counts; not drawn")
            del metrics["confusion"]
        labels = metrics.get("labels")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, (str, int)) for x in labels)):
            notes.append(f"{where}: field 'evaluation.{name}.labels' is not a list of names; ignored")
            del metrics["labels"]
        for key in ("n", "skipped"):
            if key in metrics and not (_is_number(metrics[key]) or isinstance(metrics[key], str)):
                notes.append(f"{where}: field 'evaluation.{name}.{key}' is not a number; ignored")
                del metrics[key]
        evaluation[name] = metrics
    record["evaluation"] = evaluation
    return record


def _is_confusion(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(row, list) and len(row) == len(value) for row in value)
            and all(_is_number(x) and x >= 0 for row in value for x in row))


# -- deriving tables -------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _ranges(values: list[int]) -> str:
    parts, start = [], None
    for i, v in enumerate(values):
        if start is None:
            start = v
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(parts)


def _pct(value: Any) -> str:
    return f"{100 * value:.2f}" if _is_number(value) else "—"


def _acc_ci(metrics: dict[str, Any]) -> str:
    acc = _pct(metrics.get("accuracy"))
    low, high = metrics.get("accuracy_ci_low"), metrics.get("accuracy_ci_high")
    if _is_number(low) and _is_number(high):
        return f"{acc} [{100 * low:.2f}, {100 * high:.2f}]"
    return acc


def final_evaluation(data: RunData) -> dict[str, tuple[int, dict[str, Any]]]:
    """benchmark -> (round, metric dict) of the latest round that evaluated it."""
    final: dict[str, tuple[int, dict[str, Any]]] = {}
    for r in sorted(data.rounds):
        for name, metrics in (data.rounds[r].get("evaluation") or {}).items():
            if isinstance(metrics, dict) and _is_number(metrics.get("accuracy")):
                final[name] = (r, metrics)
    return final


def epsilon_series(data: RunData) -> dict[str, dict[str, list[float]]]:
    """school -> {'round': [...], 'epsilon': [...]}: the ledger, else the metrics' train ε."""
    series: dict[str, dict[str, list[float]]] = {}
    for school, entries in data.ledger.items():
        if entries:
            series[school] = {"round": [e["round"] for e in entries], "epsilon": [float(e["epsilon"]) for e in entries]}
    for r in sorted(data.rounds):
        for school, train in (data.rounds[r].get("train") or {}).items():
            if school in data.ledger or not isinstance(train, dict) or not _is_number(train.get("epsilon")):
                continue
            if train.get("status", "ok") != "ok":
                continue
            entry = series.setdefault(school, {"round": [], "epsilon": []})
            entry["round"].append(r)
            entry["epsilon"].append(float(train["epsilon"]))
    return series


@dataclass
class SchoolSpend:
    """One school's privacy in a run: its lifetime ε after the run's last ledger entry (a refusal records the
    ε it stopped at) and the rounds it trained in this run. (Its lifetime rounds are not in the run's copy:
    `history_before` merges rounds of the same σ and q.)"""

    epsilon: float | None
    trained_here: int
    # the lifetime budget the school's last entry records (the tighter of its own policy and the run's ask, which
    # may be a `privacy.school_budgets` entry): None when the entries carry none (then the run's privacy.budget)
    budget: float | None = None


def school_spend(data: RunData) -> dict[str, SchoolSpend]:
    """school -> SchoolSpend, from the run's ledger copy, else from the metrics' ok rounds."""
    out: dict[str, SchoolSpend] = {}
    for school, entries in data.ledger.items():
        if not entries:
            continue
        recorded = entries[-1].get("budget")
        trained_here = sum(e.get("event", "round") == "round" for e in entries)
        out[school] = SchoolSpend(float(entries[-1]["epsilon"]), trained_here,
                                  float(recorded) if _is_number(recorded) and recorded > 0 else None)
    for school, series in epsilon_series(data).items():
        if school not in out:
            out[school] = SchoolSpend(series["epsilon"][-1] if series["epsilon"] else None, len(series["round"]))
    for school in refusals(data):
        out.setdefault(school, SchoolSpend(None, 0))
    return out


def school_budgets(data: RunData, schools: Iterable[str]) -> dict[str, float | None]:
    """school -> the lifetime budget to measure it by: the one its last ledger entry records (the tighter of its own
    policy and the run's ask, maybe a `privacy.school_budgets` entry), else the run's privacy.budget."""
    spend = school_spend(data)
    return {school: spend[school].budget if school in spend and spend[school].budget is not None else data.budget
            for school in schools}


def refusals(data: RunData) -> dict[str, list[tuple[int, str]]]:
    """school -> [(round, reason)] for every non-ok train status."""
    out: dict[str, list[tuple[int, str]]] = {}
    for r in sorted(data.rounds):
        for school, train in (data.rounds[r].get("train") or {}).items():
            status = train.get("status", "ok") if isinstance(train, dict) else str(train)
            if status != "ok":
                out.setdefault(school, []).append((r, str(status)))
    return out


def _labels_for(metrics: dict[str, Any]) -> list[str]:
    size = len(metrics.get("confusion") or [])
    labels = metrics.get("labels")
    if isinstance(labels, list) and len(labels) == size:
        return [str(x) for x in labels]
    if size == len(FER7):
        return list(FER7)
    if size == len(FER8):
        return list(FER8)
    return [str(i) for i in range(size)]


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name)


# -- writing ---------------------------------------------------------------------------------
def write_plots(data: RunData) -> dict[str, Path]:
    """Draw every figure the data allows; returns {figure id: path}."""
    from server import plots

    out: dict[str, Path] = {}
    plot_dir = data.run_dir / "plots"
    model = f"{data.config.get('model.name', '?')}/{data.config.get('model.preset', '?')}"
    series: dict[str, dict[str, list[Any]]] = {}
    for r in sorted(data.rounds):
        for name, m in (data.rounds[r].get("evaluation") or {}).items():
            if not isinstance(m, dict) or not _is_number(m.get("accuracy")):
                continue
            s = series.setdefault(name, {"round": [], "accuracy": [], "ci_low": [], "ci_high": [], "uar": []})
            s["round"].append(r)
            s["accuracy"].append(m.get("accuracy"))
            s["ci_low"].append(m.get("accuracy_ci_low") if _is_number(m.get("accuracy_ci_low")) else None)
            s["ci_high"].append(m.get("accuracy_ci_high") if _is_number(m.get("accuracy_ci_high")) else None)
            s["uar"].append(m.get("uar") if _is_number(m.get("uar")) else None)
    for s in series.values():  # a round with no evaluation becomes a gap in the curve, not a straight line
        have = dict(zip(s["round"], zip(s["accuracy"], s["ci_low"], s["ci_high"], s["uar"])))
        s["round"] = list(range(min(have), max(have) + 1))
        rows = [have.get(r, (None, None, None, None)) for r in s["round"]]
        s["accuracy"], s["ci_low"], s["ci_high"], s["uar"] = (list(col) for col in zip(*rows))
    if series:
        best = best_public_round(data)
        out["accuracy"] = plots.accuracy_curves(
            series, plot_dir / "accuracy.png",
            title=f"Global model ({model}) on public benchmarks, per round",
            best_round=best.round if best is not None else None,
        )
    added = _added_panels(data)
    if added:
        out["added"] = plots.federation_added(added, plot_dir / "federation_added.png",
                                              title="What the federation added")
    eps = epsilon_series(data)
    refused = {s: [r for r, _ in items] for s, items in refusals(data).items()}
    if len(set(eps) | set(refused)) > MANY_SCHOOLS:
        out["epsilon-distribution"] = plots.epsilon_distribution(
            epsilon_quantiles(eps), [s["epsilon"][-1] for s in eps.values() if s["epsilon"]],
            plot_dir / "epsilon.png", budget=data.budget,
            title=f"Privacy spent across {counted(len(set(eps) | set(refused)), 'school')} (δ = {data.config.get('privacy.delta', '?')})",
        )
    elif eps or refused:
        out["epsilon"] = plots.epsilon_curves(
            eps, plot_dir / "epsilon.png", budget=data.budget, refusals=refused,
            school_budgets=school_budgets(data, sorted(set(eps) | set(refused))),
            title=f"Privacy spent per school (δ = {data.config.get('privacy.delta', '?')})",
        )
    for name, (r, m) in final_evaluation(data).items():
        if m.get("confusion"):
            try:
                out[f"confusion:{name}"] = plots.confusion_heatmap(
                    m["confusion"], _labels_for(m), plot_dir / f"confusion_{_safe_name(name)}.png",
                    title=f"{name}: confusion matrix after round {r} (n = {m.get('n', '?')})",
                )
            except ValueError as exc:  # a damaged or absurd matrix in metrics.jsonl: no figure, a note
                data.notes.append(f"metrics.jsonl round {r}, {name}: {exc}; no confusion figure drawn")
    return out


#: who built a report.md, for its "Built … by" line: the ServerApp writes one at the end of every run, and the
#: commands rebuild it; a report claiming `fedfer report` built it sent a reader looking for a command nobody ran
BUILT_BY_REPORT_COMMAND = "`fedfer report`"
BUILT_BY_SERVERAPP = "the ServerApp at the end of the run (`fedfer report` rebuilds it)"


def render_markdown(data: RunData, figures: dict[str, Path], built_by: str = BUILT_BY_REPORT_COMMAND) -> str:
    cfg = data.config
    lines: list[str] = [f"# fedfer run report — {data.run_id}", ""]
    present = sorted(data.rounds)
    planned = data.planned_rounds
    trained = [r for r in present if r > 0]
    status = "no round recorded yet" if not present else (
        f"{counted(len(trained), 'round')} recorded (last: {present[-1]}"
        + (f" of {planned} planned" if planned else "") + ")"
        + (" and the starting model (round 0)" if 0 in present else ""))
    lines += [f"Run directory `{data.run_dir}` — {status}. "
              f"Built {time.strftime('%Y-%m-%d %H:%M:%S')} by {built_by}.", ""]

    lines += ["## Setup", "", "| setting | value |", "|---|---|"]
    # a deployment: the config's school count and benchmarks are the simulation's defaults (10 schools, the synthetic
    # benchmarks), which this run never used: label them so, and say what happened beside them
    took_part = data.schools()
    other_schools = bool(took_part and _is_number(cfg.get("federation.schools"))
                         and len(took_part) != int(cfg["federation.schools"]))
    final = final_evaluation(data)
    configured = {spec.split("=")[0].split(":")[0].strip() for spec in str(cfg.get("evaluation.benchmarks", "")).split(",")}
    other_benchmarks = bool(final and set(final) != configured)
    simulated = " (simulation setting, not used here)"
    for key, label in (("model.name", "model"), ("model.preset", "preset"),
                       ("federation.schools", "schools" + (simulated if other_schools else "")),
                       ("federation.rounds", "rounds planned"), ("train.local_epochs", "local epochs"),
                       ("privacy.enabled", "differential privacy"), ("privacy.unit", "privacy unit"),
                       ("privacy.target_epsilon", "target ε"), ("privacy.budget", "ε budget per school"),
                       ("privacy.delta", "δ"), ("privacy.accountant", "accountant"),
                       ("evaluation.benchmarks", "benchmarks" + (simulated if other_benchmarks else ""))):
        if key in cfg:
            lines.append(f"| {label} | `{cfg[key]}` |")
    if other_schools:
        lines.append(f"| schools that took part | {len(took_part)} |")
    if other_benchmarks:
        lines.append(f"| benchmarks scored | {', '.join(sorted(final))} |")
    lines.append("")

    lines += ["## Final figures", ""]
    if final:
        lines += ["| benchmark | round | n | accuracy % [95% CI] | UAR % | macro-F1 % | skipped |",
                  "|---|---|---|---|---|---|---|"]
        for name, (r, m) in final.items():
            lines.append(f"| {name} | {r} | {m.get('n', '—')} | {_acc_ci(m)} | {_pct(m.get('uar'))} | "
                         f"{_pct(m.get('macro_f1'))} | {m.get('skipped', 0)} |")
    else:
        lines.append("No evaluation recorded yet.")
    lines.append("")
    lines += _best_round_lines(data)

    lines += _added_section(data, figures)
    lines += _paper_table(data, final)
    lines += _round_table(data)
    lines += _incident_section(data)
    lines += _privacy_table(data)

    if figures:
        lines += ["## Plots", ""]
        for key, path in figures.items():
            if key == "added":   # drawn beside its table in "What the federation added"
                continue
            rel = path.relative_to(data.run_dir).as_posix()
            caption = {"accuracy": "Accuracy (solid, 95% CI band) and UAR (dashed) per round",
                       "epsilon": "Cumulative ε per school (red ×: refused or failed round)",
                       "epsilon-distribution": "Cumulative ε across schools per round (median, 10-90% and "
                                               "min-max bands; schools that have trained) and the final ε histogram"}.get(
                key, f"Final confusion matrix, {key.split(':', 1)[-1]}")
            lines += [f"![{caption}]({rel})", "", f"*{caption}.*", ""]
    if data.notes:
        lines += ["## Notes on the data", ""] + [f"- {note}" for note in data.notes] + [""]
    return "\n".join(lines)


def best_round_rule(data: RunData) -> BestRoundRule:
    """How the run chose best.pt (`evaluation.keep_best`, `evaluation.public_benchmarks`); `off` reports the mean's
    choice. A run from before evaluation.public_benchmarks gets the default list (config.yaml records every key)."""
    from shared_models.config import defaults

    by = str(data.config.get("evaluation.keep_best", "mean"))
    return BestRoundRule.from_config({**defaults(), **data.config,
                                      "evaluation.keep_best": by if by in ("mean", "first") else "mean"})


def best_public_round(data: RunData) -> RoundScore | None:
    """The round whose global model scored best on the declared-public benchmarks, chosen as the run chose best.pt.
    The schools' held-out faces never count."""
    return best_of({r: record.get("evaluation") for r, record in data.rounds.items()}, best_round_rule(data))


def _best_round_lines(data: RunData) -> list[str]:
    """One line: which round was best on the public benchmarks, what the last round scored, and where the best
    round's model is (checkpoints/best.pt); or, when no benchmark scored was declared public, that none was kept
    and why."""
    best = best_public_round(data)
    rule = best_round_rule(data)
    not_public = sorted({name for r, record in data.rounds.items() if r > 0
                         for name in undeclared(record.get("evaluation"), rule)})
    if best is None:
        if not not_public or str(data.config.get("evaluation.keep_best", "mean")) == "off":
            return []
        return [f"**Best round:** none kept: {', '.join(not_public)} {'is' if len(not_public) == 1 else 'are'} not "
                "declared public in `evaluation.public_benchmarks`, and only a benchmark declared public may choose the "
                "model (docs/privacy.md).", ""]
    last = last_scored({r: record.get("evaluation") for r, record in data.rounds.items()})
    from server.run_dir import read_best_json   # torch: only when there is a best round to name

    kept = read_best_json(data.run_dir)
    if kept is not None and kept.round == best.round:
        where = "its model is `checkpoints/best.pt`"
    elif kept is not None:
        where = f"`checkpoints/best.pt` holds round {kept.round}"
    elif (data.run_dir / "checkpoints" / "best.pt").exists():
        where = "`checkpoints/best.pt` exists but its `best.json` is unreadable (`fedfer evaluate` says which round it is)"
    else:
        where = ("no `checkpoints/best.pt` (evaluation.keep_best=off, a run from before it was kept, or the round's "
                 "weights were already pruned when a resume declared its benchmark public)")
    ignored = f"; {', '.join(not_public)} not declared public, so not counted" if not_public else ""
    start = (data.rounds.get(0) or {}).get("evaluation")   # the start model: named if it scored higher
    return [f"**Best round:** {compare_line(best, last, start)} — {where} (marked on the accuracy plot; chosen on public "
            f"data only, so it costs no privacy: docs/privacy.md{ignored}).", ""]


def kept_best_round(data: RunData) -> int | None:
    """The round checkpoints/best.pt holds (its best.json), i.e. the federated model the schools get; None when
    the run kept none (evaluation.keep_best=off, a run from before best.pt, an unreadable best.json): then the
    schools get the last round."""
    if not (data.run_dir / "checkpoints" / "best.json").is_file():   # run_dir imports torch: only when needed
        return None
    from server.run_dir import read_best_json

    kept = read_best_json(data.run_dir)
    return kept.round if kept is not None else None


def added_rows(data: RunData) -> list[dict[str, Any]]:
    """"What the federation added"'s table (server/added.py `rows`) for this run: the federation row is the model
    the schools get (best.pt's round when there is one), the last round beside it when it differs."""
    from server import added

    return added.rows(data.rounds, data.references, federation_epsilon(data), kept_round=kept_best_round(data))


def federation_epsilon(data: RunData) -> float | None:
    """The largest final ε over the schools (what the federation's model cost the most exposed school)."""
    finals = [series["epsilon"][-1] for series in epsilon_series(data).values() if series["epsilon"]]
    return max(finals) if finals else None


def _added_panels(data: RunData) -> list[dict[str, Any]]:
    """The comparison plot's panels (public test, then the schools' held-out students); none without a
    federated round to compare."""
    from server import added

    table = added_rows(data)
    if not any(row["key"] == "federation" for row in table) or len(table) < 2:
        return []
    public, indomain = added.benchmarks(data.rounds, data.references)
    last = next((row for row in table if row["key"] == "federation-last"), None)   # only when best.pt is not it
    kept = next(row["round"] for row in table if row["key"] == "federation") if last is not None else None
    panels = []
    for bench, which, title in ((public, "public", f"Public photos ({public})"),
                                (indomain, "indomain", "The schools' own faces (students kept out of training)")):
        curve = added.curves(data.rounds, bench)
        if not curve["round"]:
            continue
        quiet = added.noise_free_curve(data.references, bench)
        if quiet["round"] and curve["round"][0] == 0:   # (d) starts where the federation starts
            quiet = {"round": [0.0, *quiet["round"]], "accuracy": [curve["accuracy"][0], *quiet["accuracy"]]}
        lines = ("start", "central", "best-alone") + (() if quiet["round"] else ("noise-free",))
        refs = [(row["key"], row["label"].split(" — ")[0], row[which]["accuracy"]) for row in table
                if row["key"] in lines and row.get(which)]
        panels.append({"title": title, "curve": curve, "references": refs, "kept_round": kept,
                       "noise_free": {"label": added.NOISE_FREE, **quiet} if quiet["round"] else None})
    return panels


def _added_section(data: RunData, figures: dict[str, Path]) -> list[str]:
    """"What the federation added": the headline, the comparison table and its plot, and per school."""
    from server import added

    table = added_rows(data)
    if not any(row["key"] == "federation" for row in table) or len(table) < 2:
        return []
    public, indomain = added.benchmarks(data.rounds, data.references)

    def cell(m: dict[str, Any] | None) -> str:
        if not m:
            return "—"
        if "accuracy_high" in m:
            return f"{_pct(m['accuracy'])} – {_pct(m['accuracy_high'])}"
        return _acc_ci(m)

    lines = ["## What the federation added", "", added.headline(table), "",
             f"| model | public photos ({public or '—'}), % [95% CI] | the schools' own faces "
             f"({indomain or 'not evaluated'}), % [95% CI] | privacy |", "|---|---|---|---|"]
    for row in table:
        lines.append(f"| {row['label']} | {cell(row['public'])} | {cell(row['indomain'])} | {row['privacy']} |")
    if data.references is None:
        lines += ["", "The reference models (all data pooled; each school alone; the federation without noise) were not "
                  "computed for this run: `fedfer simulate --references` trains them after the federation (simulation only)."]
    if "added" in figures:
        rel = figures["added"].relative_to(data.run_dir).as_posix()
        lines += ["", f"![What the federation added]({rel})", ""]
    lines += _per_school_lines(added.per_school(data.references))
    return lines + [""]


def _per_school_lines(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    round_ = rows[0].get("federation_round")
    federation = f"in the federation (round {round_}), % [95% CI]" if round_ is not None else "in the federation, % [95% CI]"
    lines = ["", "Each school's own held-out students:", "",
             f"| school | students | training alone, % [95% CI] | {federation} | "
             "the school's own last model, % [95% CI] |", "|---|---|---|---|---|"]
    for row in rows:
        fed = _acc_ci(row["federation"]) if row["federation"] else "—"
        own = _acc_ci(row["own-model"]) if row.get("own-model") else "—"
        lines.append(f"| {row['school']} | {row['students'] if row['students'] is not None else '—'} | "
                     f"{_acc_ci(row['alone'])} | {fed} | {own} |")
    return lines + ["", "The school's own last model is the federation's model of the round before plus the school's "
                        "own last DP update (`<state dir>/own-model.pt`, what it already sent: no further privacy cost); "
                        "it stays at the school."]


def _paper_table(data: RunData, final: dict[str, tuple[int, dict[str, Any]]]) -> list[str]:
    model = str(data.config.get("model.name", ""))
    mine = model_key(model) if model else ""
    privacy = data.config.get("privacy.enabled", True)
    budget = data.budget
    spent = federation_epsilon(data)   # what the schools spent, as in "What the federation added"; else the budget
    this_run = "federated" + (f", DP ε ≤ {spent:.2f}" if privacy and spent is not None else
                              f", DP ε ≤ {budget:g}" if privacy and budget else ", DP" if privacy else ", no DP")
    lines = ["## Beside the seed papers", "",
             f"Published figures are **{PAPER_MARK}** training on the real benchmark; this run is "
             f"{this_run}. They are context, not a like-for-like comparison.", ""]
    if not final:
        return lines + ["No evaluation recorded yet.", ""]
    lines += [f"| benchmark | metric | this run ({model or '?'}, {this_run}) | published | model (paper) | source |",
              "|---|---|---|---|---|---|"]
    for name, (_, m) in final.items():
        figures = published_for(name)
        if name.startswith("synthetic"):
            lines.append(f"| {name} | accuracy | {_pct(m.get('accuracy'))} | — | — | synthetic classroom data: "
                         "no published figure exists (real-benchmark figures do not apply) |")
            continue
        if not figures:
            lines.append(f"| {name} | accuracy | {_pct(m.get('accuracy'))} | — | — | no seed paper reports this benchmark |")
            continue
        figures = sorted(figures, key=lambda f: (f.model != mine, f.model, f.metric))
        for f in figures:
            ours = m.get("uar") if f.metric == "uar" else m.get("accuracy")
            same = " (same model)" if f.model == mine else ""
            lines.append(f"| {name} | {f.metric} | {_pct(ours)} | {f.value:.2f} ({PAPER_MARK}) | "
                         f"{f.model}{same} | {f.source} |")
    return lines + [""]


def _round_table(data: RunData) -> list[str]:
    if not data.rounds:
        return []
    benches = data.benchmarks()
    by = any("evaluated_by" in record for record in data.rounds.values())
    header = ("| round | schools ok | refused / failed | " + " | ".join(f"{b} acc %" for b in benches)
              + (" | evaluated by" if by else "") + " | timing |")
    lines = ["## Per round", "", header, "|" + "---|" * (4 + len(benches) + by)]
    for r in sorted(data.rounds):
        record = data.rounds[r]
        train = record.get("train") or {}
        ok = sorted(s for s, t in train.items() if isinstance(t, dict) and t.get("status", "ok") == "ok")
        bad = sorted(f"{s} ({t.get('status') if isinstance(t, dict) else t})" for s, t in train.items()
                     if not (isinstance(t, dict) and t.get("status", "ok") == "ok"))
        evaluation = record.get("evaluation") or {}
        cells = [_pct((evaluation.get(b) or {}).get("accuracy")) if isinstance(evaluation.get(b), dict) else "—"
                 for b in benches]
        timing = record.get("timing") or {}
        timing_text = ", ".join(f"{k} {v:.1f}s" for k, v in timing.items() if _is_number(v)) or "—"
        if by:
            cells.append(str(record.get("evaluated_by") or "—"))
        lines.append(f"| {r} | {len(ok)} | {_bad_cell(train, bad)} | " + " | ".join(cells) + f" | {timing_text} |")
    return lines + [""]


def _bad_cell(train: dict[str, Any], bad: list[str]) -> str:
    """Every refused or failed school of a round, or (many of them) counts per status and the first few."""
    if len(bad) <= NAMED_SCHOOLS:
        return ", ".join(bad) or "—"
    by_status: dict[str, int] = {}
    for t in train.values():
        status = str(t.get("status", "ok") if isinstance(t, dict) else t)
        if status != "ok":
            by_status[status] = by_status.get(status, 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    names = sorted(s for s, t in train.items() if not (isinstance(t, dict) and t.get("status", "ok") == "ok"))
    return f"{counts} ({', '.join(names[:NAMED_SCHOOLS])}, … {len(names) - NAMED_SCHOOLS} more)"


QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def _quantiles(values: list[float]) -> list[float]:
    import numpy as np

    return [float(q) for q in np.quantile(np.asarray(values, dtype=float), QUANTILES)] if values else []


def epsilon_quantiles(series: dict[str, dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per round, the QUANTILES of cumulative ε over the schools that have trained by then
    ({'round': [...], 'q0': [...], 'q10': [...], ..., 'schools': [...]}) — the ε figure of a large federation."""
    rounds = sorted({r for s in series.values() for r in s["round"]})
    out: dict[str, list[float]] = {"round": [], "schools": [], **{f"q{int(q * 100)}": [] for q in QUANTILES}}
    for r in rounds:
        values = []
        for s in series.values():
            before = [e for rr, e in zip(s["round"], s["epsilon"]) if rr <= r and math.isfinite(e)]
            if before:
                values.append(before[-1])
        if not values:
            continue
        out["round"].append(r)
        out["schools"].append(len(values))
        for q, v in zip(QUANTILES, _quantiles(values)):
            out[f"q{int(q * 100)}"].append(v)
    return out


def _privacy_distribution(data: RunData, schools: list[str]) -> list[str]:
    """The privacy section of a large federation: quantiles, not one row per school."""
    spend = school_spend(data)
    refused = refusals(data)
    budget = data.budget
    finals = [s.epsilon for s in spend.values() if s.epsilon is not None]
    trained = [s.trained_here for s in spend.values()]
    planned = data.config.get("federation.schools")
    lines = ["## Privacy across schools", "",
             f"{counted(len(schools), 'school')} took part" + (f" (of {planned} in the federation)" if _is_number(planned) else "")
             + f"; {sum(n > 0 for n in trained)} trained at least once. ε from the run's ledger copy (`ledger/<school>.jsonl`; "
             "`fedfer privacy audit` recomputes and verifies it)" + (f"; budget {budget:g}." if budget else "."), "",
             "| quantity | min | 10% | 25% | median | 75% | 90% | max |", "|---|---|---|---|---|---|---|---|"]
    for name, values, fmt in (("final ε per school", finals, "{:.3f}"),
                              ("rounds trained per school", [float(n) for n in trained], "{:.0f}")):
        if values:
            lines.append(f"| {name} | " + " | ".join(fmt.format(v) for v in _quantiles(values)) + " |")
    if budget is not None:
        over = sorted(s for s, v in spend.items() if v.epsilon is not None and v.epsilon > budget + 1e-9)
        lines += ["", f"Over budget: {len(over)}" + (f" ({', '.join(over[:NAMED_SCHOOLS])}"
                                                    f"{', …' if len(over) > NAMED_SCHOOLS else ''})" if over else "") + "."]
    reasons: dict[str, list[str]] = {}
    for school, items in refused.items():
        for _, reason in items:
            reasons.setdefault(reason, []).append(school)
    if reasons:
        lines += ["", "| refused / failed | rounds | schools | first schools |", "|---|---|---|---|"]
        for reason, names in sorted(reasons.items()):
            distinct = sorted(set(names))
            lines.append(f"| {reason} | {len(names)} | {len(distinct)} | {', '.join(distinct[:NAMED_SCHOOLS])}"
                         f"{', …' if len(distinct) > NAMED_SCHOOLS else ''} |")
    return lines + [""]


def _privacy_table(data: RunData) -> list[str]:
    schools = data.schools()
    if not schools:
        return []
    if len(schools) > MANY_SCHOOLS:
        return _privacy_distribution(data, schools)
    spend = school_spend(data)
    refused = refusals(data)
    budget = data.budget
    budgets = school_budgets(data, schools)
    known = {b for b in budgets.values() if b is not None}
    said = (f"Budget: {budget:g}." if known <= {budget} else
            "Budget: each school's own, as its last ledger entry records it (the tighter of its policy and the run's).")
    lines = ["## Privacy per school", "",
             f"ε from the run's ledger copy (`ledger/<school>.jsonl`; `fedfer privacy audit` recomputes and verifies it): "
             f"each school's lifetime ε, over this run and the runs before it. "
             f"{said}" if known else "ε from the run's ledger copy. No budget configured.", "",
             "| school | rounds trained (this run) | final ε (lifetime) | remaining | refused / failed rounds |", "|---|---|---|---|---|"]
    for school in schools:
        mine = spend.get(school, SchoolSpend(None, 0))
        final_eps = mine.epsilon
        remaining = "—"
        mine_budget = budgets[school]
        if mine_budget is not None and final_eps is not None:
            remaining = f"{mine_budget - final_eps:.3f}" + (" (over budget)" if final_eps > mine_budget + 1e-9 else "")
        bad = "; ".join(f"{r}: {reason}" for r, reason in refused.get(school, [])) or "—"
        lines.append(f"| {school} | {mine.trained_here} | {'—' if final_eps is None else f'{final_eps:.3f}'} | "
                     f"{remaining} | {bad} |")
    return lines + [""]


def build_report(run_dir: Path, built_by: str = BUILT_BY_REPORT_COMMAND) -> Path:
    """(Re)build ``report.md`` and ``plots/*.png`` for `run_dir`; returns the report's path. `built_by`: who
    builds it, as the report's "Built … by" line names it (BUILT_BY_SERVERAPP at the end of a run).

    Raises ValueError (one line naming the path) when the report or its plots cannot be written."""
    run_dir = Path(run_dir)
    path = run_dir / "report.md"
    plot_dir = run_dir / "plots"
    # checked before drawing anything: what is in the way stays untouched
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise ValueError(f"{path}: exists and is not a regular file; move it away to rebuild the report")
    if plot_dir.exists() and not plot_dir.is_dir():
        raise ValueError(f"{plot_dir}: exists and is not a directory; move it away to redraw the plots")
    data = load_run(run_dir)
    try:
        figures = write_plots(data)
        # all at once (shared_models/atomic_files.py): a killed report leaves the old report.md and no temp file
        atomic_write_text(path, render_markdown(data, figures, built_by), readable_mode())
    except OSError as exc:
        raise ValueError(f"{exc.filename or path}: cannot write the report ({exc.strerror or exc})") from None
    return path


def write_report(run_dir: Path) -> Path:
    """The report server/app.py writes at the end of a run (build_report, saying the ServerApp built it)."""
    return build_report(run_dir, BUILT_BY_SERVERAPP)
