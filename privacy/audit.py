"""``fedfer privacy audit``: recompute every school's ε from its raw ledger entries and check the ledger.

Never trusts a stored ε. For each ledger source (a run directory's ``ledger/<school>.jsonl`` copies, or
any ``ledger.jsonl`` / ``<school>.jsonl`` given directly) it:

1. verifies every line: fields, hash, Ed25519 signature against the school's public key (from
   ``--keys DIR/<school>.pub``, else ``<run>/keys/<school>.pub``, else ``signing_key.pub`` beside a
   school's own ledger), prev_hash chain, run_seq and history_before continuity;
2. replays (σ, q, steps) through fresh accountants: every entry's ``epsilon_rdp`` is checked against
   RDP (cheap), the last entry per dataset against PRV (``--every-entry``: every entry against PRV);
3. compares the recomputed ε with the budget;
4. cross-checks sources of the same school (a run copy against the school's own ledger): every entry
   of one that belongs to the other's span must be in both — the only way to see a deleted last line.

Exit status: 0 intact and within budget; 1 intact but over budget; 2 tampered, inconsistent
(a stored ε that is not what its history gives) or unreadable.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from privacy.accounting import AccountingError, RunningRdp, epsilon_report
from privacy.ledger import (GENESIS_HASH, LEDGER_FILE, LedgerError, epsilon_value, read_ledger_file,
                            verify_entries)
from privacy.signing import PUBLIC_KEY_FILE, SigningKeyError, load_public_key

EXIT_OK, EXIT_OVER_BUDGET, EXIT_TAMPERED = 0, 1, 2


def epsilon_tolerance(eps: float) -> float:
    """How far a stored ε may sit from the recomputed one: PRV's own ε error (0.01) plus 0.5 %."""
    return 0.01 + 0.005 * eps


@dataclass
class Row:
    """One school and dataset as seen in one ledger source."""

    school: str
    source: str
    fingerprint: str = ""
    unit: str = ""
    rounds: int = 0
    refusals: int = 0
    steps: int = 0                 # steps in this source's entries
    lifetime_steps: int = 0        # including the history the first entry carries
    sigma: float | str = ""
    q: float | str = ""
    delta: float | None = None
    epsilon_prv: float | None = None
    epsilon_rdp: float | None = None
    prv_method: str = ""
    budget: float | None = None
    status: str = "ok"             # ok | over-budget | tampered | inconsistent | unreadable
    problems: list[str] = field(default_factory=list)
    partial: bool = False          # a run copy: earlier history is taken from the first entry's signed claim

    @property
    def exit_code(self) -> int:
        if self.status in ("tampered", "inconsistent", "unreadable"):
            return EXIT_TAMPERED
        return EXIT_OVER_BUDGET if self.status == "over-budget" else EXIT_OK


@dataclass
class AuditReport:
    rows: list[Row]
    problems: list[str]

    @property
    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.rows] + [EXIT_TAMPERED for _ in self.problems]
        return max(codes, default=EXIT_OK)

    def to_json(self) -> dict[str, Any]:
        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        return {"exit_code": self.exit_code, "problems": self.problems,
                "schools": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows]}


@dataclass
class _Source:
    path: Path
    school: str | None        # from the file name when it says (run copies), else from the entries
    start: str                # "genesis" | "run"
    key_paths: list[Path]


def find_sources(paths: Sequence[Path], keys_dir: Path | None) -> list[_Source]:
    sources: list[_Source] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            ledger_dir = path / "ledger"
            if not ledger_dir.is_dir():
                if (path / LEDGER_FILE).is_file():  # a school's state directory
                    sources.append(_Source(path / LEDGER_FILE, None, "genesis", _keys(keys_dir, None, [path / PUBLIC_KEY_FILE])))
                    continue
                raise LedgerError(f"{path}: no ledger/ directory (expected a run directory or a ledger file)")
            files = sorted(ledger_dir.glob("*.jsonl"))
            if not files:
                raise LedgerError(f"{ledger_dir}: no <school>.jsonl ledger copies")
            for f in files:
                sources.append(_Source(f, f.stem, "run", _keys(keys_dir, f.stem, [path / "keys" / f"{f.stem}.pub"])))
        elif path.is_file():
            if path.name == LEDGER_FILE:
                sources.append(_Source(path, None, "genesis", _keys(keys_dir, None, [path.parent / PUBLIC_KEY_FILE])))
            elif path.parent.name == "ledger":
                run = path.parent.parent
                sources.append(_Source(path, path.stem, "run", _keys(keys_dir, path.stem, [run / "keys" / f"{path.stem}.pub"])))
            else:
                sources.append(_Source(path, None, "auto", _keys(keys_dir, None, [])))
        else:
            raise LedgerError(f"{path}: no such file or directory")
    return sources


def _keys(keys_dir: Path | None, school: str | None, fallback: list[Path]) -> list[Path]:
    # A separate keyring, when given, is the only authority: keys stored beside a ledger can be
    # swapped by whoever can edit that ledger.
    if keys_dir is not None:
        return [Path(keys_dir) / f"{school}.pub"] if school else [Path(keys_dir)]
    return fallback


def _resolve_key(src: _Source, school: str) -> Path:
    for p in src.key_paths:
        candidate = p / f"{school}.pub" if p.is_dir() else p
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(p / f"{school}.pub" if p.is_dir() else p) for p in src.key_paths) or "nowhere (use --keys DIR)"
    raise LedgerError(f"{src.path} (school {school}): no public key (looked in {looked})")


def _fmt(v: Any) -> str:
    return "mixed" if v == "mixed" else ("" if v in ("", None) else f"{v:.4g}")


def audit_source(src: _Source, *, every_entry: bool = False, budget_override: float | None = None) -> tuple[list[Row], list[dict]]:
    """Rows (one per dataset fingerprint) for one ledger source, and its verified entries."""
    school = src.school or "?"
    try:
        entries = read_ledger_file(src.path, school_id=src.school)
    except LedgerError as exc:
        return [Row(school=school, source=str(src.path), status="unreadable", problems=[str(exc)])], []
    if src.school is None:
        first = entries[0] if entries and isinstance(entries[0], dict) else {}
        school = str(first.get("school_id", "?"))
    if not entries:
        return [Row(school=school, source=str(src.path), status="unreadable", problems=[f"{src.path}: empty ledger"])], []
    start = src.start
    if start == "auto":
        start = "genesis" if isinstance(entries[0], dict) and entries[0].get("prev_hash") == GENESIS_HASH else "run"
        src.start = start
    try:
        key = load_public_key(_resolve_key(src, school))
    except (LedgerError, SigningKeyError) as exc:
        return [Row(school=school, source=str(src.path), status="unreadable", problems=[str(exc)])], []
    try:
        verify_entries(entries, key, source=str(src.path), school_id=school, start=start)
    except (LedgerError, SigningKeyError) as exc:
        return [Row(school=school, source=str(src.path), status="tampered", problems=[str(exc)])], []

    rows: list[Row] = []
    by_fp: dict[str, list[tuple[int, dict]]] = {}
    for line, e in enumerate(entries, start=1):
        by_fp.setdefault(e["dataset_fingerprint"], []).append((line, e))
    for fp, items in by_fp.items():
        row = Row(school=school, source=str(src.path), fingerprint=fp, partial=start == "run")
        round_items = [e for _, e in items if e["event"] == "round"]
        row.rounds = len(round_items)
        row.refusals = sum(1 for _, e in items if e["event"] == "refused")
        row.steps = sum(e["steps"] for e in round_items)
        units = {e["privacy_unit"] for _, e in items}
        row.unit = units.pop() if len(units) == 1 else "mixed"
        sigmas = {e["noise_multiplier"] for e in round_items} or {items[-1][1]["noise_multiplier"]}
        qs = {e["sample_rate"] for e in round_items} or {items[-1][1]["sample_rate"]}
        row.sigma = sigmas.pop() if len(sigmas) == 1 else "mixed"
        row.q = qs.pop() if len(qs) == 1 else "mixed"
        last_line, last = items[-1]
        row.delta = last["delta"]
        row.budget = budget_override if budget_override is not None else last["budget"]
        # verify_entries has checked that each history_before is the previous entry's history plus
        # its round, so RDP is composed once along the chain (O(1) per entry) instead of per prefix
        running = RunningRdp()
        try:
            for h in items[0][1]["history_before"]:
                running.add(*h)
        except AccountingError as exc:
            row.problems.append(f"{src.path} line {items[0][0]} (school {school}): {exc}")
            items = []
        for line, e in items:
            where = f"{src.path} line {line} (school {school})"
            try:
                if e["event"] == "round":
                    running.add(e["noise_multiplier"], e["sample_rate"], e["steps"])
                rdp = running.epsilon(e["delta"])
            except AccountingError as exc:
                row.problems.append(f"{where}: {exc}")
                break
            stored_rdp = epsilon_value(e["epsilon_rdp"])
            if not _close(stored_rdp, rdp):
                row.problems.append(f"{where}: stored epsilon_rdp {stored_rdp:.6g} but its history gives {rdp:.6g}")
            if not (every_entry or line == last_line):
                continue
            history = [tuple(h) for h in e["history_before"]]
            if e["event"] == "round":
                history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
            try:
                rep = epsilon_report(history, e["delta"], e["accountant"] if e["accountant"] in ("prv", "rdp") else "prv")
                final = epsilon_report(history, e["delta"], "prv") if line == last_line else rep
            except AccountingError as exc:
                row.problems.append(f"{where}: {exc}")
                break
            stored = epsilon_value(e["epsilon"])
            if not _close(stored, rep.epsilon):
                row.problems.append(f"{where}: stored epsilon {stored:.6g} but its history gives "
                                    f"{rep.epsilon:.6g} ({rep.method})")
            if line == last_line:
                row.lifetime_steps = sum(h[2] for h in history)
                row.epsilon_prv, row.prv_method = final.epsilon, final.method
                row.epsilon_rdp = rdp
        if row.problems:
            row.status = "inconsistent"
        elif row.budget is not None and row.epsilon_prv is not None and row.epsilon_prv > row.budget:
            row.status = "over-budget"
            row.problems.append(f"{src.path} (school {school}): ε {row.epsilon_prv:.4g} exceeds budget {row.budget:.4g}")
        rows.append(row)
    return rows, entries


def _close(stored: float, recomputed: float) -> bool:
    if math.isinf(stored) or math.isinf(recomputed):
        return math.isinf(stored) and math.isinf(recomputed)
    return abs(stored - recomputed) <= epsilon_tolerance(recomputed)


def _cross_check(verified: dict[str, list[tuple[_Source, list[dict]]]]) -> list[str]:
    """A school seen in several sources: each run copy must equal the school's entries of that run."""
    problems = []
    for school, seen in verified.items():
        full = [(s, es) for s, es in seen if es and es[0]["prev_hash"] == GENESIS_HASH and s.start != "run"]
        copies = [(s, es) for s, es in seen if s.start == "run"]
        for fsrc, fentries in full:
            for csrc, centries in copies:
                run_id = centries[0]["run_id"]
                school_run = [e["hash"] for e in fentries if e["run_id"] == run_id]
                copy_run = [e["hash"] for e in centries]
                if school_run != copy_run:
                    missing_in_copy = [h for h in school_run if h not in copy_run]
                    missing_in_school = [h for h in copy_run if h not in school_run]
                    problems.append(
                        f"school {school}: run {run_id!r} has {len(school_run)} entries in {fsrc.path} but "
                        f"{len(copy_run)} in {csrc.path} ({len(missing_in_copy)} missing from the run copy, "
                        f"{len(missing_in_school)} missing from the school's ledger)")
    return problems


def run_audit(paths: Sequence[Path], keys_dir: Path | None = None, *, every_entry: bool = False,
              budget_override: float | None = None) -> AuditReport:
    try:
        sources = find_sources(paths, keys_dir)
    except LedgerError as exc:
        return AuditReport([], [str(exc)])
    rows: list[Row] = []
    verified: dict[str, list[tuple[_Source, list[dict]]]] = {}
    for src in sources:
        src_rows, entries = audit_source(src, every_entry=every_entry, budget_override=budget_override)
        rows.extend(src_rows)
        if entries:
            verified.setdefault(entries[0]["school_id"], []).append((src, entries))
    return AuditReport(rows, _cross_check(verified))


def format_table(report: AuditReport) -> str:
    header = ["school", "unit", "rounds", "steps", "σ", "q", "δ", "ε PRV", "ε RDP", "budget", "status", "copy"]
    lines = []
    for r in report.rows:
        rounds = f"{r.rounds}" + (f" (+{r.refusals} refused)" if r.refusals else "")
        steps = f"{r.steps}" + (f" ({r.lifetime_steps} lifetime)" if r.lifetime_steps != r.steps and r.epsilon_prv is not None else "")
        eps_prv = "" if r.epsilon_prv is None else f"{r.epsilon_prv:.3f}" + ("*" if r.prv_method == "rdp-fallback" else "")
        lines.append([r.school, r.unit, rounds if r.rounds or r.refusals else "", steps if r.steps else "",
                      _fmt(r.sigma), _fmt(r.q), _fmt(r.delta), eps_prv,
                      "" if r.epsilon_rdp is None else f"{r.epsilon_rdp:.3f}",
                      "none" if r.budget is None and r.epsilon_prv is not None else _fmt(r.budget),
                      r.status.upper() if r.status != "ok" else "ok", "run" if r.partial else "school"])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines]
    notes = [p for r in report.rows for p in r.problems] + report.problems
    if any(r.prv_method == "rdp-fallback" for r in report.rows):
        notes.append("* PRV could not evaluate this history; the (looser, still valid) RDP bound is shown")
    if any(r.partial for r in report.rows):
        notes.append("run copies: ε includes the earlier spending that each school's first entry in the run records "
                     "(history_before); pass the school's own ledger.jsonl too to check it")
    verdict = {EXIT_OK: "intact, within budget", EXIT_OVER_BUDGET: "intact, OVER BUDGET",
               EXIT_TAMPERED: "TAMPERED, INCONSISTENT OR UNREADABLE"}[report.exit_code]
    return "\n".join(out + [""] + notes + [f"audit: {verdict} (exit {report.exit_code})"])
