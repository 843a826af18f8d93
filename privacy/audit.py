"""``fedfer privacy audit``: recompute every school's ε from its raw ledger entries and check the ledger.

Never trusts a stored ε. For each ledger source (a run directory's ``ledger/<school>.jsonl`` copies, or
any ``ledger.jsonl`` / ``<school>.jsonl`` given directly) it:

1. verifies every line: fields, hash, Ed25519 signature against the school's public key from an
   independent keyring (``--keys DIR/<school>.pub``: the keys registered at enrollment, e.g.
   ``deploy/keys``) — keys found in the run (``<run>/keys/<school>.pub``) or beside a school's ledger
   (``signing_key.pub``) only with ``--trust-run-keys``, because whoever can edit the ledger can swap
   them — prev_hash chain, run_seq and history_before continuity; δ and privacy unit must not change
   between a school's entries;
2. replays (σ, q, steps) through fresh accountants: every entry's ``epsilon_rdp`` is checked against
   RDP (cheap), the last entry per dataset against PRV (``--every-entry``: every entry against PRV);
3. compares the recomputed ε with the school's policy budget (``--budget``, else
   ``DIR/<school>.policy.json`` or the node-config ``fedfer deploy`` wrote, ``DIR/../nodes/<school>/
   node-config.toml``; with ``--trust-run-keys`` also a simulated school's ``policy.json`` in its state
   directory, beside its ledger or where the run's ``privacy.state_dir`` put it) — never the budget an
   entry declares; a policy δ or unit the entries do not use is reported, and so is an ε over budget
   beside any other problem; with no budget known the verdict says so;
4. cross-checks sources of the same school (a run copy against the school's own ledger): every entry
   of one that belongs to the other's span must be in both;
5. checks each source against the server's anchors (``<run.root>/anchors/<school>.json``, or
   ``--anchors DIR``; a school's own ledger given beside a run directory against that run's;
   privacy/anchors.py): a truncated tail, a replaced (rewritten, re-signed) entry, a chain restarted at
   genesis or a history reset is reported, and so is every reply the server rejected for one
   (``ledger-anchor`` events); a school no anchor covers is named in a note.

Exit status: 0 intact and, where a budget is known, within it; 1 intact but over budget; 2 tampered,
inconsistent (a stored ε that is not what its history gives) or unreadable — or several schools under one name
(ledgers of one id with no key in common, e.g. two simulations' school-00), with their own verdict: no lifetime
ε can be signed off for those ids.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from shared_models.small_files import SmallFileError, read_small_file
from shared_models.wording import one_line
from privacy.accounting import AccountingError, RunningRdp, epsilon_report
from privacy.policy import REPORT_KEYS, epsilon_problem, is_report_only
from privacy.anchors import ANCHOR_DIR, anchor_path, anchors_dir_of_run, audit_against_anchor, load_anchors, load_chain
from privacy.ledger_restore import restore_notes
from privacy.state_folder import LedgerLostError, check_ledger_reaches_head
from privacy.ledger import (GENESIS_HASH, KEY_RECOVERY, LEDGER_FILE, KeyChain, LedgerError, _check_school_name,
                            copy_run_id, epsilon_value, read_ledger_file, run_entries, verify_entries)
from privacy.signing import (PUBLIC_KEY_FILE, SigningKeyError, key_id, load_public_key, recovery_public_keys,
                             retired_public_keys)

EXIT_OK, EXIT_OVER_BUDGET, EXIT_TAMPERED = 0, 1, 2
EXIT_USAGE = 2   # a usage error shares exit 2 with "tampered, inconsistent or unreadable", as documented
# Several schools under one name (each simulation's own school-00, different keys) as the only finding: no ledger
# is tampered with, but no lifetime ε can be signed off for those names either. Exit 0 would pass the audit and 1
# would claim a budget was checked and crossed; like a usage error (ledgers that cannot be audited together),
# it shares exit 2, and the verdict and JSON (`status` "shared-name") tell it apart from tampering.
EXIT_SHARED_NAME = 2
POLICY_FILE = "policy.json"   # a simulated school's policy in its state directory (privacy/policy.py)


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
    sigma: float | str | None = ""   # None: no round trained in these entries (refusals only), so none applies
    q: float | str | None = ""
    delta: float | None = None
    epsilon_prv: float | None = None
    epsilon_rdp: float | None = None
    prv_method: str = ""
    budget: float | None = None
    status: str = "ok"             # ok | over-budget | tampered | inconsistent | unreadable
    problems: list[str] = field(default_factory=list)
    partial: bool = False          # a run copy: earlier history is taken from the first entry's signed claim
    copy: str = ""                 # run (a run's copy) | school (a school's own ledger) | "" (not known)
    over_budget: bool = False      # ε above the budget (also when the row has another problem)
    budget_note: str = ""          # why no budget was compared, when none was
    run_id: str = ""               # the run a run copy is of ("" for a school's own ledger: all its runs)
    key_id: str = ""               # the key the entries end under (an archived audit names it)
    key_transitions: list[str] = field(default_factory=list)   # the key rotations in this ledger, a stale keyring

    @property
    def trained_nothing(self) -> bool:
        """Its entries were read and none trained a round (refusals or key changes only): steps, σ and q do not
        apply. A refusal records the σ and q it planned (0 for a refused run-config), which are not the run's."""
        return self.sigma is None

    @property
    def budget_left(self) -> float | None:
        if self.budget is None or self.epsilon_prv is None:
            return None
        return self.budget - self.epsilon_prv

    @property
    def ledger(self) -> str:
        """Which ledger the row is, as the table shows it."""
        if self.copy == "run":
            return f"run {self.run_id or '?'}"
        return "school's own" if self.copy == "school" else "?"

    @property
    def exit_code(self) -> int:
        if self.status in ("tampered", "inconsistent", "unreadable"):
            return EXIT_TAMPERED
        return EXIT_OVER_BUDGET if self.status == "over-budget" else EXIT_OK


@dataclass
class SameIdLedgers:
    """Ledgers given for one school id that are not one chain (see :func:`_forks`): several schools of one name
    (signed by different keys: e.g. each simulation's own school-00) or one school's ledger forked (one key)."""

    school: str
    ledgers: list[str]          # every ledger file in the collision, in the order given
    runs: list[str]             # the run ids of those that are run copies
    keys: int                   # how many signing identities (keys, with the keys each rotated from) signed them
    problem: str                # the one line the report prints for the school
    different_schools: bool     # every fork is between ledgers that share no signing key (schools of one name)
    audit_one: str              # a path to audit one of them alone (the first run directory, or ledger)

    def to_json(self) -> dict[str, Any]:
        return {"school": self.school, "ledgers": self.ledgers, "runs": self.runs, "keys": self.keys,
                "different_schools": self.different_schools}


#: How many run ids (or ledger files) a same-id line names before "and N more" (the JSON names them all).
NAMED_IN_LINE = 3


@dataclass
class AuditReport:
    rows: list[Row]
    problems: list[str]
    notes: list[str] = field(default_factory=list)   # worth knowing, not a problem (e.g. no anchors found)
    same_id: list[SameIdLedgers] = field(default_factory=list)   # ledgers under one school id that fork

    @property
    def shared_names(self) -> list[SameIdLedgers]:
        """The school ids several schools share (ledgers under one id that share no key): no tampering."""
        return [c for c in self.same_id if c.different_schools]

    @property
    def findings(self) -> list[str]:
        """The problems not on a row, but for shared names (which are no finding about any ledger)."""
        shared = {c.problem for c in self.shared_names}
        return [p for p in self.problems if p not in shared]

    @property
    def exit_code(self) -> int:
        codes = ([r.exit_code for r in self.rows] + [EXIT_TAMPERED for _ in self.findings]
                 + [EXIT_SHARED_NAME for _ in self.shared_names])
        return max(codes, default=EXIT_OK)

    @property
    def only_shared_names(self) -> bool:
        """Schools of one name are the reason for exit 2, and nothing tampered, inconsistent or unreadable is."""
        return bool(self.shared_names) and not self.findings and all(r.exit_code != EXIT_TAMPERED for r in self.rows)

    @property
    def unchecked(self) -> list[str]:
        """Schools whose ε was recomputed but compared with no budget (none given, no policy found)."""
        return list(dict.fromkeys(r.school for r in self.rows
                                  if r.epsilon_prv is not None and r.budget is None and r.unit != "school"))

    @property
    def verdict(self) -> str:
        code = self.exit_code
        over = "; OVER BUDGET too" if any(r.over_budget for r in self.rows) else ""
        if code == EXIT_SHARED_NAME and self.only_shared_names:
            ids = [c.school for c in self.shared_names]
            shown = ", ".join(ids[:NAMED_IN_LINE]) + (f" and {len(ids) - NAMED_IN_LINE} more"
                                                      if len(ids) > NAMED_IN_LINE else "")
            return (f"ledgers intact, but SEVERAL SCHOOLS SHARE A NAME ({shown}): no one lifetime ε for them — "
                    f"audit each run on its own{over}")
        if code == EXIT_TAMPERED:
            return "TAMPERED, INCONSISTENT OR UNREADABLE" + over
        if code == EXIT_OVER_BUDGET:
            return "intact, OVER BUDGET"
        checked = {r.school for r in self.rows if r.epsilon_prv is not None and r.budget is not None}
        unchecked = [s for s in self.unchecked if s not in checked]
        if not checked:
            return "intact; no budget to check against (give --budget or the school's policy)"
        if unchecked:
            return (f"intact, within budget where one is known; no budget to check {', '.join(unchecked)} "
                    f"against (give --budget or the school's policy)")
        return "intact, within budget"

    @property
    def lifetime(self) -> list[Row]:
        """One row per school: the ledger that holds most of its spending (its own ledger, all runs, when
        given; else its latest run copy), with the worst status any of its rows has."""
        best: dict[str, Row] = {}
        for r in self.rows:
            if r.epsilon_prv is None or r.unit == "school":
                continue
            held = best.get(r.school)
            if held is None or (r.lifetime_steps, r.epsilon_prv, not r.partial) > \
                    (held.lifetime_steps, held.epsilon_prv, not held.partial):
                best[r.school] = r
        return [best[s] for s in sorted(best)]

    @property
    def unaccounted(self) -> list[Row]:
        """One failed row per school that has no recomputed ε at all (every ledger of it failed a check):
        the lifetime lines must still name it, or it reads as if it had not been audited."""
        known = {r.school for r in self.lifetime} | {r.school for r in self.rows if r.unit == "school"}
        failed: dict[str, Row] = {}
        for r in self.rows:
            if r.school not in known:
                failed.setdefault(r.school, r)
        return [failed[s] for s in sorted(failed)]

    def school_status(self, school: str) -> str:
        """The worst status of a school's rows, as the lifetime line says it: a finding on a row, then one across
        its ledgers, then "shared-name" (several schools of this name: no one lifetime), over budget, ok."""
        rows = [r for r in self.rows if r.school == school]
        if any(r.exit_code == EXIT_TAMPERED for r in rows):
            return next(r.status for r in rows if r.exit_code == EXIT_TAMPERED)
        if any(f"school {school}:" in p or f"(school {school})" in p for p in self.findings):
            return "inconsistent"   # a finding across its ledgers (cross-check, anchors), not on one row
        if school in {c.school for c in self.shared_names}:
            return "shared-name"
        return "over-budget" if any(r.over_budget for r in rows) else "ok"

    @property
    def next_steps(self) -> list[str]:
        """What the officer does next, one line each: a verdict alone does not say it."""
        steps = []
        bad = list(dict.fromkeys(r.school for r in self.rows if r.exit_code == EXIT_TAMPERED))
        # several schools of one name (each simulation's own) are no tampering: the advice is to audit apart
        apart = self.shared_names
        if bad or self.findings:
            named = f" for {', '.join(bad)}" if bad else ""
            steps.append(f"do not sign off{named}: ask the school and the coordinator for their original files "
                         f"(the findings above name each file and line) and audit again")
        if apart:
            steps.append(_audit_apart_step(apart))
        over = list(dict.fromkeys(r.school for r in self.rows if r.over_budget))
        if over:
            whose, them = ("its", "it") if len(over) == 1 else ("their", "them")
            steps.append(f"{', '.join(over)} spent more than {whose} budget: report it and keep {them} out of "
                         f"further training (against the school's own policy the budget guard should have "
                         f"refused: find out why)")
        if self.unchecked:
            budgets = "its budget" if len(self.unchecked) == 1 else "their budgets"
            steps.append(f"give the policy of {', '.join(self.unchecked)} (--budget, or <keys>/<school>.policy.json) "
                         f"to check {budgets}")
        if any("no server anchors found" in n for n in self.notes):
            steps.append("audit again with the coordinator's runs/anchors (--anchors DIR) to check for ledgers cut "
                         "short or rewritten by their school")
        return steps

    def to_json(self) -> dict[str, Any]:
        from datetime import datetime, timezone

        def clean(v):
            return None if isinstance(v, float) and not math.isfinite(v) else v
        def figures(r: Row) -> dict[str, Any]:
            return {"epsilon": clean(r.epsilon_prv), "delta": r.delta, "budget": r.budget,
                    "budget_left": clean(r.budget_left), "rounds": r.rounds, "refusals": r.refusals,
                    "steps": r.lifetime_steps}
        no_figures = dict.fromkeys(("epsilon", "delta", "budget", "budget_left", "rounds", "refusals", "steps"))
        shared = {c.school for c in self.shared_names}
        lifetime = [{"school": r.school, **figures(r), "status": self.school_status(r.school), "source": r.source,
                     "key_id": r.key_id} for r in self.lifetime if r.school not in shared]
        lifetime += [{"school": r.school, **no_figures, "budget": r.budget, "status": self.school_status(r.school),
                      "source": r.source, "key_id": r.key_id} for r in self.unaccounted if r.school not in shared]
        # several schools of one name: no single figure (the text says "no one lifetime ε"), each ledger's instead
        lifetime += [{"school": school, **no_figures, "status": self.school_status(school), "source": None,
                      "key_id": None,
                      "per_run": [{"run_id": r.run_id or None, "source": r.source, "key_id": r.key_id, **figures(r),
                                   "status": r.status} for r in self.rows if r.school == school and r.unit != "school"]}
                     for school in shared]
        lifetime.sort(key=lambda entry: entry["school"])   # in name order, as the text's lifetime lines
        return {"exit_code": self.exit_code, "verdict": self.verdict,
                "audited_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "fedfer": _version(),
                "lifetime": lifetime, "next": self.next_steps, "problems": self.problems, "notes": self.notes,
                "schools": [{k: clean(v) for k, v in asdict(r).items()} for r in self.rows],
                "same_id": [c.to_json() for c in self.same_id]}


def _audit_apart_step(apart: Sequence[SameIdLedgers]) -> str:
    """The one `next:` line for school ids that several schools share (different keys): what they are and the
    command that audits one run alone."""
    ids = [c.school for c in apart]
    shown = ", ".join(ids[:NAMED_IN_LINE]) + (f" and {len(ids) - NAMED_IN_LINE} more" if len(ids) > NAMED_IN_LINE
                                              else "")
    runs = list(dict.fromkeys(r for c in apart for r in c.runs))
    whose = f"these {len(runs)} runs" if len(runs) > 1 else "these ledgers"
    return (f"{whose} hold different schools under the same ids ({shown}: each simulation makes its schools afresh, "
            f"with their own keys), so no lifetime ε adds up across them: audit each simulated run on its own, e.g. "
            f"`fedfer privacy audit {apart[0].audit_one} --trust-run-keys` (--trust-run-keys verifies each run "
            f"against the keys it stored; it cannot make two runs' {apart[0].school} one school). A deployment's runs, "
            f"whose schools keep one key and ledger, are audited together with --keys deploy/keys")


def usage_error_json(message: str, *, audit_keys: bool = True) -> dict[str, Any]:
    """A `privacy ... --json` command refusing its command line (a bad flag, a missing path or keyring): exit
    code, verdict "USAGE ERROR", the error and the fedfer version; for the audit (`audit_keys`) also the
    report's keys with nothing audited, so an archive that reads every audit as one JSON object reads this one
    too. `privacy plan` and `canary-audit` print it without them: they have no such report."""
    from datetime import datetime, timezone

    error = {"exit_code": EXIT_USAGE, "verdict": "USAGE ERROR", "error": message, "fedfer": _version()}
    if audit_keys:
        error.update({"audited_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "lifetime": [],
                      "next": [], "problems": [message], "notes": [], "schools": [], "same_id": []})
    return error


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedfer")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class _Source:
    path: Path
    school: str | None        # from the file name when it says (run copies), else from the entries
    start: str                # "genesis" | "run"
    key_paths: list[Path]
    run_dir: Path | None = None   # the run directory a run copy belongs to (anchors, events)
    # keys and policies stored with the ledger (in the run, in a school's state dir): used only when
    # `trusted` (--trust-run-keys); listed even when not, so a message can say they are there
    beside_keys: list[Path] = field(default_factory=list)
    beside_policies: list[Path] = field(default_factory=list)
    trusted: bool = False
    # set by the audit: the school the entries name, and whether a server anchor covers this ledger
    seen_school: str = ""
    anchored: bool = True
    anchors_looked: Path | None = None
    key: Any = None           # the public key its entries verified against
    keys: KeyChain | None = None  # the keys the entries went through (key transitions)
    # retired key id -> (public key, hashes of the entries before its retirement, where the transition is):
    # learned from the school's other ledgers, for a copy of a run before the school rotated its key
    retired: dict[str, tuple[Any, set[str], str]] = field(default_factory=dict)
    keyring_retired: list[Any] = field(default_factory=list)   # retired keys beside the trusted key file
    recovery_keys: list[Any] = field(default_factory=list)     # approved recovery keys beside it (<school>.recovered/)
    key_from_run: bool = False   # its key is one stored with the ledger (--trust-run-keys), not the keyring's

    @property
    def copy(self) -> str:
        return {"run": "run", "genesis": "school"}.get(self.start, "")


def run_policy_paths(run_dir: Path, school: str, state_dir: Path | None) -> list[Path]:
    """Where a simulated run keeps a school's policy.json: its state dir, ``<run>/schools/<school>`` by
    default, else ``<privacy.state_dir>/<school>`` (`state_dir`, from run_state_dir)."""
    paths = [Path(run_dir) / "schools" / school / POLICY_FILE]
    if state_dir is not None:
        paths.append(state_dir / school / POLICY_FILE)
    return paths


def run_state_dir(run_dir: Path) -> Path | None:
    """The `privacy.state_dir` a run's config.yaml records (read once per run directory), if any."""
    from shared_models.config import ConfigError, read_yaml_file

    config = Path(run_dir) / "config.yaml"
    if not config.is_file():
        return None
    try:
        state_dir = read_yaml_file(config).get("privacy.state_dir")
    except ConfigError:
        return None   # the policy is then looked for in the run only; the note says none was found
    return Path(state_dir).expanduser() if isinstance(state_dir, str) and state_dir.strip() else None


def find_sources(paths: Sequence[Path], keys_dir: Path | None, trust_run_keys: bool = False) -> list[_Source]:
    sources: list[_Source] = []

    def source(path: Path, school: str | None, start: str, keys: list[Path], policies: list[Path],
               run: Path | None = None) -> _Source:
        return _Source(path, school, start, key_paths(keys_dir, school, keys if trust_run_keys else []), run,
                       beside_keys=keys, beside_policies=policies, trusted=trust_run_keys)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            ledger_dir = path / "ledger"
            if not ledger_dir.is_dir():
                if (path / LEDGER_FILE).is_file():  # a school's state directory
                    sources.append(source(path / LEDGER_FILE, None, "genesis", [path / PUBLIC_KEY_FILE],
                                          [path / POLICY_FILE]))
                    continue
                raise LedgerError(f"{path}: no ledger/ directory and no {LEDGER_FILE} (expected a run directory, "
                                  f"a school's state directory or a ledger file)")
            files = sorted(ledger_dir.glob("*.jsonl"))
            if not files:
                raise LedgerError(f"{ledger_dir}: no <school>.jsonl ledger copies")
            state_dir = run_state_dir(path)
            for f in files:
                _check_copy_name(f)
                sources.append(source(f, f.stem, "run", [path / "keys" / f"{f.stem}.pub"],
                                      run_policy_paths(path, f.stem, state_dir), path))
        elif path.is_file():
            if path.name == LEDGER_FILE:
                sources.append(source(path, None, "genesis", [path.parent / PUBLIC_KEY_FILE],
                                      [path.parent / POLICY_FILE]))
            elif path.parent.name == "ledger":
                _check_copy_name(path)
                run = path.parent.parent
                sources.append(source(path, path.stem, "run", [run / "keys" / f"{path.stem}.pub"],
                                      run_policy_paths(run, path.stem, run_state_dir(run)), run))
            else:
                sources.append(source(path, None, "auto", [], []))
        else:
            raise LedgerError(f"{path}: not found")
    return sources


def _check_copy_name(path: Path) -> None:
    """A run's ledger copy is named after its school (letters, digits, _ . -). Any other name is refused
    before it is printed: a file name holding a line break wrote a forged verdict line into the report."""
    try:
        _check_school_name(path.stem)
    except LedgerError:
        raise LedgerError(f"{path.parent}: {path.name!r} is not a school's ledger copy (a school id is letters, "
                          f"digits, _ . - only)") from None


def key_paths(keys_dir: Path | None, school: str | None, beside: list[Path]) -> list[Path]:
    """Where a school's key may come from, in order: the keyring, then (only when the officer passed
    --trust-run-keys, i.e. `beside` is not empty) keys stored with the ledgers."""
    keyring = ([Path(keys_dir) / f"{school}.pub"] if school else [Path(keys_dir)]) if keys_dir is not None else []
    return keyring + beside


def _resolve_key(src: _Source, school: str) -> Path:
    for p in src.key_paths:
        candidate = p / f"{school}.pub" if p.is_dir() else p
        if candidate.is_file():
            return candidate
    looked = (", ".join(str(p / f"{school}.pub" if p.is_dir() else p) for p in src.key_paths)
              or "nowhere (use --keys DIR)")
    stored = next((p for p in src.beside_keys if p.is_file()), None) if not src.trusted else None
    hint = (f"; the run stores one ({stored}): --trust-run-keys uses it, which trusts whoever wrote the run "
            f"(the coordinator)") if stored is not None else ""
    raise LedgerError(f"{src.path} (school {school}): no public key (looked in {looked}){hint}")


def _fmt(v: Any) -> str:
    return "mixed" if v == "mixed" else ("" if v in ("", None) else f"{v:.4g}")


def distinct_pair(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """`a` and `b` with enough significant digits that they read differently when they differ
    (ε 3.9904 against a budget of 3.99, not "3.99 exceeds 3.99")."""
    for d in range(digits, 18):
        sa, sb = f"{a:.{d}g}", f"{b:.{d}g}"
        if sa != sb or a == b:
            return sa, sb
    return repr(a), repr(b)


def school_policy(keys_dir: Path | None, school: str, beside: Sequence[Path] = ()) -> tuple[dict[str, Any], str]:
    """The school's own privacy policy as the keyring's deployment recorded it, and where it was found:
    ``<keys>/<school>.policy.json`` (or .toml), else the node-config ``fedfer deploy`` wrote for it
    (``<keys>/../nodes/<school>/node-config.toml``, or its copy in ``<keys>/../deployment.json``);
    else, only when the officer trusts the run (`beside` is then not empty), the ``policy.json`` in a
    simulated school's state directory (beside its ledger, or where the run keeps it).

    A file holding only the classroom report's keys (privacy/policy.py is_report_only) states no budget, δ or
    unit: the search goes on past it, so a report-only ``<keys>/<school>.policy.json`` cannot hide the school's
    node-config. It is returned only when no training policy is found anywhere, so the audit can name it."""
    report_only: tuple[dict[str, Any], str] | None = None
    for policy, where in _policies_in_order(keys_dir, school, beside):
        if not is_report_only(policy):
            return policy, where
        report_only = report_only or (policy, where)
    return report_only or ({}, "")


def _policies_in_order(keys_dir: Path | None, school: str, beside: Sequence[Path]):
    """Each policy of the school that exists, read when reached, in school_policy's order (first wins)."""
    import tomllib

    if keys_dir is not None:
        keys_dir = Path(keys_dir)
        for path in (keys_dir / f"{school}.policy.json", keys_dir / f"{school}.policy.toml",
                     node_config_path(keys_dir, school)):
            if os.path.lexists(path):   # not is_file(): a policy that is a pipe or a dangling link is a finding
                text = _read_policy_text(path, school)
                try:
                    policy = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
                except (ValueError, RecursionError) as exc:
                    raise LedgerError(f"{path}: policy of school {school} unreadable ({_short(exc)})") from None
                if not isinstance(policy, dict):
                    raise LedgerError(f"{path}: policy of school {school} is not a table")
                yield policy, str(path)
        manifest = keys_dir.parent / "deployment.json"
        if os.path.lexists(manifest):
            text = _read_policy_text(manifest, school)
            try:
                nodes = json.loads(text).get("nodes", {})
            except (AttributeError, ValueError, RecursionError) as exc:   # AttributeError: not a JSON object
                raise LedgerError(f"{manifest}: unreadable ({_short(exc)})") from None
            node = nodes.get(school) if isinstance(nodes, dict) else None
            if isinstance(node, dict) and isinstance(node.get("node_config"), dict):
                yield dict(node["node_config"]), f"{manifest} (node {school})"
    policy, where = _run_policy(beside, school)
    if where:
        yield policy, where


def node_config_path(keys_dir: Path, school: str) -> Path:
    """Where `fedfer deploy add-school` writes a school's node-config, seen from its keyring (deploy/keys)."""
    return Path(keys_dir).parent / "nodes" / school / "node-config.toml"


#: Largest policy file (or deployment.json holding the policies) read: bounds what a planted file costs.
MAX_POLICY_BYTES = 16 * 1024 * 1024


def _short(exc: BaseException) -> str:
    return one_line(exc)[:200] or type(exc).__name__


def _read_policy_text(path: Path, school: str) -> str:
    """The text of a file holding a school's policy; LedgerError naming it when it is not a small UTF-8 file."""
    try:
        return read_small_file(path, MAX_POLICY_BYTES).decode("utf-8")
    except SmallFileError as exc:
        raise LedgerError(f"{path}: policy of school {school} unreadable ({exc.why})") from None
    except UnicodeDecodeError as exc:
        raise LedgerError(f"{path}: policy of school {school} unreadable (not UTF-8 text: byte {exc.start})") from None


def _run_policy(beside: Sequence[Path], school: str) -> tuple[dict[str, Any], str]:
    path = next((p for p in beside if os.path.lexists(p)), None)
    if path is None:
        return {}, ""
    text = _read_policy_text(path, school)
    try:
        policy = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise LedgerError(f"{path}: policy of school {school} unreadable ({_short(exc)})") from None
    if not isinstance(policy, dict):
        raise LedgerError(f"{path}: policy of school {school} is not a JSON object")
    return policy, str(path)


def _policy_number(policy: Mapping[str, Any], key: str, where: str) -> float | None:
    if key not in policy or policy[key] in ("", None):
        return None
    try:
        value = float(policy[key])
    except (TypeError, ValueError):
        raise LedgerError(f"{where}: policy key '{key}' is not a number: {policy[key]!r}") from None
    if key == "budget" and (problem := epsilon_problem(value)) is not None:   # the rule a policy is written by
        raise LedgerError(f"{where}: policy key 'budget' {problem}")
    if not math.isfinite(value) or value < 0:
        raise LedgerError(f"{where}: policy key '{key}' must be a finite number >= 0, got {policy[key]!r}")
    return value


def _consistency_problems(entries: Sequence[dict], where: str, school: str, policy: Mapping[str, Any],
                          policy_source: str) -> list[str]:
    """δ and privacy unit must be one value for all of a school's entries (and the policy's, if it says)."""
    problems = []
    first = entries[0]
    for name, label in (("delta", "δ"), ("privacy_unit", "privacy unit")):
        for line, e in enumerate(entries, start=1):
            if e[name] != first[name]:
                problems.append(f"{where} line {line} (school {school}): {label} changes from {first[name]!r} "
                                f"(line 1) to {e[name]!r}")
                break
    if policy:
        delta = _policy_number(policy, "delta", policy_source)
        unit = policy.get("privacy-unit", policy.get("unit"))
        for line, e in enumerate(entries, start=1):
            if delta is not None and e["delta"] != delta:
                problems.append(f"{where} line {line} (school {school}): δ {e['delta']!r} is not the policy's "
                                f"{delta!r} ({policy_source})")
                break
        for line, e in enumerate(entries, start=1):
            if unit and e["privacy_unit"] != unit:
                problems.append(f"{where} line {line} (school {school}): privacy unit {e['privacy_unit']!r} is not "
                                f"the policy's {unit!r} ({policy_source})")
                break
    return problems


def audit_source(src: _Source, *, every_entry: bool = False, budget_override: float | None = None,
                 keys_dir: Path | None = None, anchors_dir: Path | None = None,
                 trust_run_keys: bool = False) -> tuple[list[Row], list[dict]]:
    """Rows (one per dataset fingerprint) for one ledger source, and its verified entries."""
    school, entries, start, key, failure = _open_ledger(src)
    src.key = key
    if failure is not None:
        failure.copy = src.copy
        failure.run_id = src.run_dir.name if src.run_dir is not None else ""
        return [failure], []
    beside = src.beside_policies if (trust_run_keys or src.trusted) else []
    report_only = ""   # a policy.json holding only the classroom report's keys: no training policy to audit against
    try:
        policy, policy_source = school_policy(keys_dir, school, beside)
        if is_report_only(policy):
            report_only, policy, policy_source = policy_source, {}, ""
        policy_budget = _policy_number(policy, "budget", policy_source)
    except LedgerError as exc:
        return [Row(school=school, source=str(src.path), status="unreadable", problems=[str(exc)],
                    copy=src.copy, run_id=src.run_dir.name if src.run_dir is not None else "")], []
    source_problems = _consistency_problems(entries, str(src.path), school, policy, policy_source)
    source_problems += _beside_key_problems(src, school, src.keys.current if src.keys else key)
    source_problems += _anchor_problems(src, school, entries, key, start, anchors_dir)
    source_problems += _behind_own_record(src, school, entries)

    rows: list[Row] = []
    by_fp: dict[str, list[tuple[int, dict]]] = {}
    for line, e in enumerate(entries, start=1):
        by_fp.setdefault(e["dataset_fingerprint"], []).append((line, e))
    for fp, items in by_fp.items():
        row = _summary_row(src, school, fp, items, partial=start == "run")
        row.copy, row.key_id = src.copy, key_id(src.keys.current if src.keys else key)
        row.key_transitions = _key_notes(src, school, key)
        if src.copy == "school":   # a ledger rebuilt from the coordinator's run copies (fedfer deploy restore-ledger)
            row.key_transitions += [f"school {school}: {note}" for note in restore_notes(src.path)]
        row.run_id = copy_run_id(entries) if start == "run" else ""
        row.budget = budget_override if budget_override is not None else policy_budget
        row.problems.extend(source_problems)
        source_problems = []   # reported once, on the school's first row
        _recompute_epsilons(row, src, school, items, every_entry)
        other_problems = bool(row.problems)
        if row.budget is not None and row.epsilon_prv is not None and row.epsilon_prv > row.budget:
            row.over_budget = True   # reported whatever else is wrong with the row
            eps, budget = distinct_pair(row.epsilon_prv, row.budget)
            row.problems.append(f"{src.path} (school {school}): ε {eps} exceeds budget {budget}")
        row.status = "inconsistent" if other_problems else ("over-budget" if row.over_budget else "ok")
        if row.budget is None and row.epsilon_prv is not None and row.unit != "school":
            row.budget_note = _no_budget_note(src, school, beside, report_only, keys_dir)
        rows.append(row)
    return rows, entries


def _behind_own_record(src: _Source, school: str, entries: Sequence[dict]) -> list[str]:
    """A school's own ledger that lacks the last entry its state folder recorded signing (``signing_key.has-ledger``
    beside it): an old backup, or its tail cut off — what an anchor shows, from the school's own side."""
    if src.copy != "school" or src.path.name != LEDGER_FILE:
        return []
    try:
        check_ledger_reaches_head(src.path.parent, [e["hash"] for e in entries], f"{src.path} (school {school})")
    except LedgerLostError as exc:
        return [str(exc)]
    return []


def _beside_key_problems(src: _Source, school: str, key: Any) -> list[str]:
    """The key stored with the ledger (a school's signing_key.pub, a run's keys/<school>.pub) must be the key
    that verified it. The keyring verifies entries as the school they name, so without this a ledger copied
    into another school's state directory passes as the other school's, and the officer who asked about
    one school is told another is intact."""
    stored = next((p for p in src.beside_keys if p.is_file()), None)
    if stored is None:
        return []
    try:
        beside = load_public_key(stored)
    except SigningKeyError as exc:
        return [f"{exc} (school {school})"]
    if key_id(beside) == key_id(key):
        return []
    if src.copy == "run":   # the coordinator's pinned key: the entries are the school's, the run's key is not
        return [f"{src.path} (school {school}): the key the run stored for this school ({stored}, {key_id(beside)}) "
                f"is not the keyring's ({key_id(key)}), which verifies the entries: the run's key was swapped"]
    return [f"{src.path} (school {school}): signed with the keyring's key of school {school} ({key_id(key)}), but "
            f"the key stored beside it ({stored}, {key_id(beside)}) is another: a ledger copied from another "
            f"school, or a swapped key"]


def _no_budget_note(src: _Source, school: str, read: Sequence[Path], report_only: str = "",
                    keys_dir: Path | None = None) -> str:
    if report_only:   # the report's keys only (a deployed school's state folder, or a keyring): no training policy
        where = (f"none at {node_config_path(keys_dir, school)} either: give the school's node-config there, or "
                 f"--budget" if keys_dir is not None else "audit with --keys deploy/keys, or give --budget")
        return (f"school {school}: {report_only} holds only the classroom report's keys ({', '.join(REPORT_KEYS)}), "
                f"not a training policy; a deployed school's budget is in its node-config.toml ({where}): ε not "
                f"compared with a budget")
    unread = next((p for p in src.beside_policies if p.is_file()), None) if not read else None
    if unread is not None:
        return (f"school {school}: no policy budget found in the keyring; its policy beside the ledger ({unread}) "
                f"is read only with --trust-run-keys: ε not compared with a budget (or give --budget)")
    return _no_policy_found_note(school)


def _no_policy_found_note(school: str) -> str:
    return (f"school {school}: no policy budget found (give --budget, or keep the school's policy in the "
            f"keyring): ε not compared with a budget")


def _budget_notes(rows: Sequence[Row]) -> list[str]:
    """One note per school on why its ε was not compared with a budget. Each of its ledgers says why for itself (a
    run copy finds no policy; the school's own ledger has one beside it that --trust-run-keys would read): the
    one that names where a policy is, else the first."""
    notes: dict[str, str] = {}
    for r in rows:
        if r.budget_note and notes.get(r.school, _no_policy_found_note(r.school)) == _no_policy_found_note(r.school):
            notes[r.school] = r.budget_note
    return list(notes.values())


def _open_ledger(src: _Source) -> tuple[str, list[dict], str, Any, Row | None]:
    """Read a ledger and verify its chain and signatures: (school, entries, start, key, failure row or None)."""
    school = src.school or "?"
    try:
        entries = read_ledger_file(src.path, school_id=src.school)
    except LedgerError as exc:
        return school, [], "", None, Row(school=school, source=str(src.path), status="unreadable", problems=[str(exc)])
    if src.school is None:
        first = entries[0] if entries and isinstance(entries[0], dict) else {}
        school = str(first.get("school_id", "?"))
    if not entries:
        return school, [], "", None, Row(school=school, source=str(src.path), status="unreadable",
                                         problems=[f"{src.path}: empty ledger"])
    start = src.start
    if start == "auto":
        start = "genesis" if isinstance(entries[0], dict) and entries[0].get("prev_hash") == GENESIS_HASH else "run"
        src.start = start
    try:
        key_file = _resolve_key(src, school)
        src.key_from_run = key_file in src.beside_keys
        key = load_public_key(key_file)
    except (LedgerError, SigningKeyError) as exc:
        return school, [], start, None, Row(school=school, source=str(src.path), status="unreadable",
                                            problems=[str(exc)])
    try:
        # the chain must start under the keyring's key or a retired key kept beside it (never one it names)
        src.keyring_retired = _keys_beside(src, school, retired_public_keys)
        src.recovery_keys = _keys_beside(src, school, recovery_public_keys)
        src.keys = verify_entries(entries, [key] + src.keyring_retired, source=str(src.path), school_id=school,
                                  start=start, recovery_keys=src.recovery_keys)
    except (LedgerError, SigningKeyError) as exc:
        retired = _verify_with_retired_key(src, entries, school, start)
        if retired is None:
            return school, [], start, key, Row(school=school, source=str(src.path), status="tampered",
                                               problems=[str(exc)])
        key = retired
    return school, entries, start, key, None


def _keys_beside(src: _Source, school: str, kept: Callable[[Path], list[Any]]) -> list[Any]:
    """The school's keys kept beside its trusted key files (in the keyring; in the run's keys/ with
    --trust-run-keys): `kept=retired_public_keys` its retired keys (``<school>.retired/<key id>.pub``, kept by
    `fedfer deploy rotate`), `kept=recovery_public_keys` its approved recovery keys (``<school>.recovered/``,
    kept by `rotate --recovered`)."""
    files = [p / f"{school}.pub" if p.is_dir() else p for p in src.key_paths]
    return [k for f in files for k in kept(f)]


def _verify_with_retired_key(src: _Source, entries: list[dict], school: str, start: str) -> Any:
    """A ledger (a copy of a run before the school rotated its key) that verifies with a key the school
    retired, and ends before that key's transition: the key that verifies it, else None. An entry the
    retired key signed after its transition is not in the chain the transition continues, and fails."""
    for kid, (key, before, where) in src.retired.items():
        try:
            src.keys = verify_entries(entries, key, source=str(src.path), school_id=school, start=start,
                                      recovery_keys=src.recovery_keys)
        except (LedgerError, SigningKeyError):
            continue
        if entries[-1]["hash"] in before:
            src.retired = {kid: (key, before, where)}   # the row names the key and where it was retired
            return key
        src.keys = None
    return None


def _key_notes(src: _Source, school: str, trusted: Any) -> list[str]:
    """The school's key rotations this ledger records, and a keyring that still holds a retired key."""
    notes = [f"school {school}: {src.path} {t}" for t in (src.keys.describe() if src.keys else [])]
    if src.retired and src.keys is not None:   # a run before the rotation, verified with the key it had then
        (kid, (_, _, where)), = src.retired.items()
        notes.append(f"school {school}: {src.path} is signed with key {kid}, which the school retired later "
                     f"(key transition or recovery at {where})")
    elif src.keys is not None and src.keys.keys[-1] in {key_id(k) for k in src.keyring_retired}:
        notes.append(f"school {school}: {src.path} ends under key {src.keys.keys[-1]}, a retired key the keyring keeps "
                     f"(entries before the school's key transition or recovery)")
    elif src.keys is not None and src.keys.keys[-1] != key_id(trusted):
        notes.append(f"school {school}: the keyring's key {key_id(trusted)} is retired: the school handed its "
                         f"ledger to key {src.keys.keys[-1]}; update the keyring (`fedfer deploy rotate {school} "
                         f"--ledger-key signing_key.pub`) or the server refuses its next reply")
    return notes


def _anchor_problems(src: _Source, school: str, entries: Sequence[dict], key: Any, start: str,
                     anchors_dir: Path | None) -> list[str]:
    """Where the ledger disagrees with the server's anchor chain (if the run kept one). Sets
    `src.anchored` to whether an anchor covers the ledger (else a cut-short ledger goes unnoticed)."""
    problems: list[str] = []
    anchors = anchors_dir if anchors_dir is not None else (anchors_dir_of_run(src.run_dir) if src.run_dir else None)
    # the coordinator's own client-level ledger (unit "school") is not anchored: it is the server's
    src.seen_school, src.anchored, src.anchors_looked = school, entries[0]["privacy_unit"] == "school", anchors
    if anchors is not None and anchors.is_dir():
        try:
            # the anchored chain of every key the ledger went through: a key recovery the server never received
            # leaves the lost key's chain and the new key's anchored apart, and each must agree with the ledger
            chains = list({c["public_key"]: c for k in _chain_keys(src, key)
                           if (c := load_chain(anchors, school, k))}.values())
        except LedgerError as exc:
            chains, problems = [], problems + [str(exc)]
            src.anchored = True   # there is an anchor, and it is reported as damaged
        if not chains and not src.anchored:
            problems += _unanchored_key_problems(anchors, school, key, src.path)
            src.anchored = src.anchored or bool(problems)
        if chains:
            run_ids = {r.get("run_id") for c in chains for r in c.get("runs", [])}
            src.anchored = start != "run" or copy_run_id(entries) in run_ids
        for chain in chains:
            problems += [f"{p} (school {school})" for p in audit_against_anchor(
                chain, entries, copy_of_run=start == "run", where=str(src.path))]
    return problems


def _chain_keys(src: _Source, key: Any) -> list[Any]:
    """The trusted keys this ledger's chain went through, newest first, starting with the key it verified with."""
    held = {key_id(k): k for k in [key, *src.keyring_retired, *src.recovery_keys]}
    went = [held[k] for k in reversed(src.keys.keys) if k in held] if src.keys else []
    return [key] + went


def _unanchored_key_problems(anchors: Path, school: str, key: Any, path: Path) -> list[str]:
    """The server anchors each school per signing key; a ledger signed with a key it never anchored, for a
    school it did anchor under other keys, was not what the server verified: the keyring's key was
    swapped (and the ledger re-signed), or the school re-enrolled with a new key the server has not seen."""
    try:
        others = load_anchors(anchors, school)["chains"]
    except LedgerError:
        return []   # a damaged anchor file is reported by load_chain's caller
    if not others:
        return []
    count = sum(int(c.get("count", 0)) for c in others.values())
    return [f"{path} (school {school}): signed with key {key_id(key)}, which the server never anchored; it anchored "
            f"{count} entries of this school under key {', '.join(others)} ({anchors}): the keyring's key was swapped "
            f"and the ledger re-signed, or the school re-enrolled with a key no run has used"]


def _summary_row(src: _Source, school: str, fp: str, items: list[tuple[int, dict]], *, partial: bool) -> Row:
    """One dataset fingerprint's counts and public values, before any ε is recomputed."""
    row = Row(school=school, source=str(src.path), fingerprint=fp, partial=partial)
    round_items = [e for _, e in items if e["event"] == "round"]
    row.rounds = len(round_items)
    row.refusals = sum(1 for _, e in items if e["event"] == "refused")
    row.steps = sum(e["steps"] for e in round_items)
    units = {e["privacy_unit"] for _, e in items}
    row.unit = units.pop() if len(units) == 1 else "mixed"
    sigmas = {e["noise_multiplier"] for e in round_items}
    qs = {e["sample_rate"] for e in round_items}
    if round_items:
        row.sigma = sigmas.pop() if len(sigmas) == 1 else "mixed"
        row.q = qs.pop() if len(qs) == 1 else "mixed"
    else:   # nothing trained: a refusal's planned σ and q (0 for a refused run-config) read as the run's
        row.sigma = row.q = None
    row.delta = items[-1][1]["delta"]
    return row


def _recompute_epsilons(row: Row, src: _Source, school: str, items: list[tuple[int, dict]],
                        every_entry: bool) -> None:
    """Recompute each entry's ε from its history; record mismatches and the last entry's ε on the row."""
    last_line = items[-1][0]
    # verify_entries has checked that each history_before is the previous entry's history plus
    # its round, so RDP is composed once along the chain (O(1) per entry) instead of per prefix
    running = RunningRdp()
    try:
        for h in items[0][1]["history_before"]:
            running.add(*h)
    except AccountingError as exc:
        row.problems.append(f"{src.path} line {items[0][0]} (school {school}): {exc}")
        return
    for line, e in items:
        where = f"{src.path} line {line} (school {school})"
        # a key recovery's ε is checked against PRV too: it is the one entry signed by a key no earlier entry handed to
        if not _check_entry(row, running, e, where, is_last=line == last_line,
                            check_epsilon=every_entry or line == last_line or e["event"] == KEY_RECOVERY):
            break


def _check_entry(row: Row, running: RunningRdp, e: dict, where: str, *, check_epsilon: bool,
                 is_last: bool) -> bool:
    """Check one entry's stored ε values; False when the accountant fails (stop at this entry)."""
    try:
        if e["event"] == "round":
            running.add(e["noise_multiplier"], e["sample_rate"], e["steps"])
        rdp = running.epsilon(e["delta"])
    except AccountingError as exc:
        row.problems.append(f"{where}: {exc}")
        return False
    stored_rdp = epsilon_value(e["epsilon_rdp"])
    if not _close(stored_rdp, rdp):
        row.problems.append(f"{where}: stored epsilon_rdp {stored_rdp:.6g} but its history gives {rdp:.6g}")
    if not check_epsilon:
        return True
    history = [tuple(h) for h in e["history_before"]]
    if e["event"] == "round":
        history.append((e["noise_multiplier"], e["sample_rate"], e["steps"]))
    try:
        rep = epsilon_report(history, e["delta"], e["accountant"] if e["accountant"] in ("prv", "rdp") else "prv")
        final = epsilon_report(history, e["delta"], "prv") if is_last else rep
    except AccountingError as exc:
        row.problems.append(f"{where}: {exc}")
        return False
    stored = epsilon_value(e["epsilon"])
    if not _close(stored, rep.epsilon):
        row.problems.append(f"{where}: stored epsilon {stored:.6g} but its history gives "
                            f"{rep.epsilon:.6g} ({rep.method})")
    if is_last:
        row.lifetime_steps = sum(h[2] for h in history)
        row.epsilon_prv, row.prv_method = final.epsilon, final.method
        row.epsilon_rdp = rdp
    return True


def _close(stored: float, recomputed: float) -> bool:
    if math.isinf(stored) or math.isinf(recomputed):
        return math.isinf(stored) and math.isinf(recomputed)
    return abs(stored - recomputed) <= epsilon_tolerance(recomputed)


def _cross_check(verified: dict[str, list[tuple[_Source, list[dict]]]], anchors_dir: Path | None = None,
                 flagged: frozenset[Path] = frozenset()) -> tuple[list[str], list[str]]:
    """A school seen in several sources: each run copy must equal the school's entries of that run. When
    they agree and the server's anchor of that run does not, the anchor is the record that changed. A copy
    that is the start of the school's entries lacks only replies the server never stored (a crash, a lost
    reply): a note, since the spend is counted from the school's own ledger — unless the copy's own row already
    has a finding (e.g. shorter than the server's anchor: then it was cut, not behind). Returns (problems, notes)."""
    problems, notes = [], []
    for school, seen in verified.items():
        full = [(s, es) for s, es in seen if es and es[0]["prev_hash"] == GENESIS_HASH and s.start != "run"]
        copies = [(s, es) for s, es in seen if s.start == "run"]
        for fsrc, fentries in full:
            for csrc, centries in copies:
                own_keys, copy_keys = _key_ids(fsrc), _key_ids(csrc)
                if own_keys and copy_keys and own_keys.isdisjoint(copy_keys):
                    continue   # another school of the same name (another simulation's): _forks names the pair
                run_id = copy_run_id(centries)
                school_run = [e["hash"] for e in run_entries(fentries, run_id)]
                copy_run = [e["hash"] for e in centries]
                if school_run == copy_run:
                    found, noted = _edited_anchor(school, run_id, fsrc, csrc, copy_run, anchors_dir)
                    problems += found
                    notes += noted
                    continue
                missing_in_copy = sum(1 for h in school_run if h not in copy_run)
                missing_in_school = sum(1 for h in copy_run if h not in school_run)
                if school_run[:len(copy_run)] == copy_run:
                    if csrc.path in flagged:
                        continue
                    notes.append(f"school {school}: run {run_id!r}: {fsrc.path} holds {_entries(missing_in_copy)} "
                                 f"after the last one {csrc.path} holds: replies the server never stored (a crash "
                                 f"or a lost reply); their ε is counted from the school's ledger")
                    continue
                problems.append(
                    f"school {school}: run {run_id!r}: {fsrc.path} and {csrc.path} disagree: the school's ledger "
                    f"holds {_entries(missing_in_copy)} the run copy does not, the run copy holds "
                    f"{_entries(missing_in_school)} the school's ledger does not")
    return problems, notes


def _forks(verified: dict[str, list[tuple[_Source, list[dict]]]]) -> tuple[list[str], list[SameIdLedgers]]:
    """Every ledger given for one school id must be part of one chain. Two different entries after the same
    entry (the same prev_hash; two first entries both follow genesis) fork it. At a key recovery, the recovery
    truncated the old chain (another ledger — a run copy, an old chain file — holds later spending under the lost
    key) or a second recovery races it: one line per recovery. Elsewhere they are ledgers under one id: two schools
    with the same name — e.g. the school-00 of two simulations, each of which made its schools afresh, with its own
    key — or a ledger restored from a copy and written on (one key); no one lifetime ε can be told for that id,
    and the audit used to show just one of them as it. One line per school id, however many ledgers collide
    (`fedfer privacy audit runs/*` over five simulations printed one line per school and pair of runs).
    Indexed by prev_hash: a run copy's first entry follows an entry the copy does not hold."""
    problems, collisions = [], []
    for school, seen in verified.items():
        first_after: dict[str, tuple[_Source, int, dict]] = {}   # prev_hash -> (ledger, line, entry) seen first
        named: set[object] = set()
        pairs: list[tuple[_Source, int, _Source, int, str]] = []   # the forks found, in the order given
        for src, entries in seen:
            for line, entry in enumerate(entries, 1):
                held_src, held_line, held = first_after.setdefault(entry["prev_hash"], (src, line, entry))
                if held["hash"] == entry["hash"]:
                    continue
                if KEY_RECOVERY in (held["event"], entry["event"]):
                    (r_src, r_line, rec), (o_src, o_line, other) = (
                        ((src, line, entry), (held_src, held_line, held)) if entry["event"] == KEY_RECOVERY
                        else ((held_src, held_line, held), (src, line, entry)))
                    if rec["hash"] in named:
                        continue
                    named.add(rec["hash"])
                    problems.append(f"{r_src.path} line {r_line} (school {school}): key recovery continues entry "
                                    f"{rec['prev_hash'][:12]}…, but {o_src.path} line {o_line} holds another entry "
                                    f"after it ({other['event']}, ε {epsilon_value(other['epsilon']):.3f}): the "
                                    f"recovery truncated the old chain, or forks it")
                    continue
                if (held_src.path, src.path) not in named:
                    named.add((held_src.path, src.path))
                    after = "the chain's start" if entry["prev_hash"] == GENESIS_HASH else "the same entry"
                    pairs.append((held_src, held_line, src, line, after))
        if pairs:
            collision = _same_id_ledgers(school, pairs)
            collisions.append(collision)
            problems.append(collision.problem)
    return problems, collisions


def _same_id_ledgers(school: str, pairs: Sequence[tuple[_Source, int, _Source, int, str]]) -> SameIdLedgers:
    """The one line (and the JSON record) for the ledgers under one school id that fork: how many, signed by how
    many identities, the first few runs, and where the first fork is. Schools of one name (each simulation's own)
    are told apart from one school's forked ledger by their keys: every fork is between ledgers whose key chains
    share no key. A fork where both sides went through one key (a branch continued under a retired key too) is
    one school's, a finding."""
    sources = list({id(s): s for a, _, b, _, _ in pairs for s in (a, b)}.values())
    keys = {id(s): _key_ids(s) for s in sources}
    apart = all(keys[id(a)].isdisjoint(keys[id(b)]) for a, _, b, _, _ in pairs)
    identities = _connected(list(keys.values()))
    runs = list(dict.fromkeys(s.run_dir.name for s in sources if s.run_dir is not None))
    labels = [f"run {s.run_dir.name}" if s.run_dir is not None else str(s.path) for s in sources]
    shown = ", ".join(labels[:NAMED_IN_LINE]) + (f" and {len(labels) - NAMED_IN_LINE} more"
                                                  if len(labels) > NAMED_IN_LINE else "")
    count = "two" if len(sources) == 2 else str(len(sources))
    if apart:
        what = (f"signed by {identities} different keys: {identities} schools of that name (e.g. each simulation's "
                f"own: it makes its schools afresh)")
    else:
        what = "signed by one key: one school's ledger forked (e.g. restored from an older copy and written on)"
    a, a_line, b, b_line, after = pairs[0]
    problem = (f"school {school}: {count} ledgers under one school id ({shown}), {what}; no one lifetime ε: "
               f"{a.path} line {a_line} and {b.path} line {b_line} are different entries after {after}")
    first = sources[0]
    return SameIdLedgers(school, [str(s.path) for s in sources], runs, identities, problem, different_schools=apart,
                         audit_one=str(first.run_dir if first.run_dir is not None else first.path))


def _key_ids(src: _Source) -> set[str]:
    """The ids of every key a verified ledger went through (its key changes included): its signing identity."""
    return set(src.keys.keys) if src.keys else {key_id(src.key)} if src.key is not None else set()


def _connected(key_sets: Sequence[set[str]]) -> int:
    """How many signing identities the key sets are: sets that share a key (a copy and the school's own ledger,
    a chain before and after a rotation) are one."""
    groups: list[set[str]] = []
    for keys in key_sets:
        joined = set(keys)
        for group in [g for g in groups if not g.isdisjoint(keys)]:
            joined |= group
            groups.remove(group)
        groups.append(joined)
    return len(groups)


def _entries(n: int) -> str:
    return f"{n} {'entry' if n == 1 else 'entries'}"


def _edited_anchor(school: str, run_id: str, fsrc: _Source, csrc: _Source, hashes: list[str],
                   anchors_dir: Path | None) -> tuple[list[str], list[str]]:
    """The school's ledger and the run copy hold the same signed entries of a run; if the anchor lists
    others for that run, neither ledger was rewritten: the anchor was. An anchor holding the first of them
    only is a server stopped between storing a reply's entries in the copy and anchoring them (the crash
    harness's server-ledger-copy point): a note, the next reply or the resume anchors the rest.
    Returns (problems, notes)."""
    anchors = anchors_dir if anchors_dir is not None else anchors_dir_of_run(csrc.run_dir) if csrc.run_dir else None
    if anchors is None or csrc.key is None or not anchors.is_dir():
        return [], []
    try:
        chain = load_chain(anchors, school, csrc.key)
    except LedgerError:
        return [], []   # a damaged anchor is reported on the school's row
    record = next((r for r in (chain or {}).get("runs", []) if r.get("run_id") == run_id), None)
    if record is None or record["hashes"] == hashes:
        return [], []
    anchored = record["hashes"]
    if len(anchored) < len(hashes) and hashes[:len(anchored)] == anchored:
        return [], [f"school {school}: the server's anchor ({anchor_path(anchors, school)}) holds {len(anchored)} of "
                    f"the {_entries(len(hashes))} of run {run_id!r} that its own ledger and the run copy agree on: the "
                    f"server stopped after storing the copy, before anchoring it; its next reply anchors the rest"]
    return [f"school {school}: its own ledger ({fsrc.path}) and the copy of run {run_id!r} ({csrc.path}) agree, the "
            f"server's anchor ({anchor_path(anchors, school)}) lists other entries for that run: the anchor was "
            f"edited or damaged"], []


def _anchor_rejections(run_dirs: Sequence[Path]) -> list[str]:
    """Replies the server rejected because their ledger did not continue its anchor (events.jsonl). The file is
    the coordinator's log, not evidence: a line that does not parse (torn, damaged) is skipped."""
    problems = []
    for run_dir in run_dirs:
        events = run_dir / "events.jsonl"
        if not events.is_file():
            continue
        for line, raw in enumerate(events.read_bytes().decode("utf-8", "replace").splitlines(), start=1):
            try:
                event = json.loads(raw)
            except (ValueError, RecursionError):   # ValueError: JSONDecodeError and huge integers
                continue
            if isinstance(event, dict) and event.get("event") == "ledger-anchor":
                problems.append(f"{events} line {line} (school {event.get('school')}): round {event.get('round')} "
                                f"rejected by the server's anchor check ({event.get('problem')}): {event.get('reason')}")
    return problems


def run_audit(paths: Sequence[Path], keys_dir: Path | None = None, *, every_entry: bool = False,
              budget_override: float | None = None, trust_run_keys: bool = False,
              anchors_dir: Path | None = None) -> AuditReport:
    """Audit ledger sources. Keys come from `keys_dir` (the independent keyring); keys stored in the run or
    beside a ledger are used only with `trust_run_keys` (then after the keyring)."""
    if keys_dir is None and not trust_run_keys:
        return AuditReport([], ["no keyring: give --keys DIR (the ledger keys registered at enrollment, e.g. "
                                "deploy/keys), or --trust-run-keys to verify against keys stored in the run"])
    keyring_problem = check_keyring(keys_dir)
    if keyring_problem:
        return AuditReport([], [keyring_problem])
    paths, anchors_dir, anchor_notes = _anchor_folders_given(paths, anchors_dir)
    if not paths:
        return AuditReport([], [f"{anchors_dir}: the coordinator's anchors, not a ledger: give the run directories "
                                f"or ledgers to audit (the anchors beside them are read), or this folder with --anchors"])
    paths, runs_without_copies = _runs_without_copies(paths)
    if not paths:   # only runs without copies: one line, a finding if the server anchored entries of them
        deleted = _missing_copies(runs_without_copies, anchors_dir)
        more = f" (and {len(deleted) - 1} more)" if len(deleted) > 1 else ""
        return AuditReport([], [deleted[0] + more if deleted else
                                f"{runs_without_copies[0]}: a run directory with no ledger copies (no school's reply "
                                f"was stored in it): nothing to audit"])
    if runs_without_copies:
        anchor_notes.append(f"{', '.join(map(str, runs_without_copies))}: no ledger copies (a run stopped before any "
                            f"school's reply was stored): no ledger to audit, checked against the anchors only")
    try:
        sources = find_sources(paths, keys_dir, trust_run_keys)
    except LedgerError as exc:
        return AuditReport([], [str(exc)])
    rows: list[Row] = []
    verified: dict[str, list[tuple[_Source, list[dict]]]] = {}
    flagged: set[Path] = set()   # sources whose own rows have a finding
    # a school's own ledger given beside a run directory is checked against that run's anchors
    beside_runs = {anchors_dir_of_run(s.run_dir) for s in sources if s.run_dir is not None}
    school_anchors = anchors_dir if anchors_dir is not None or len(beside_runs) != 1 else beside_runs.pop()
    def audit(src: _Source) -> tuple[list[Row], list[dict]]:
        return audit_source(src, every_entry=every_entry, budget_override=budget_override, keys_dir=keys_dir,
                            trust_run_keys=trust_run_keys,
                            anchors_dir=anchors_dir if src.run_dir is not None else school_anchors)

    results = [audit(src) for src in sources]
    # a ledger that failed with the keyring's key may be of a run before its school rotated the key: again,
    # with the keys the school's other ledgers show it retired
    retired = _retired_keys(sources, results)
    for i, src in enumerate(sources):
        school = results[i][0][0].school if results[i][0] else ""
        if not results[i][1] and retired.get(school):
            src.retired = dict(retired[school])
            results[i] = audit(src)
    for src, (src_rows, entries) in zip(sources, results):
        rows.extend(src_rows)
        if any(r.problems for r in src_rows):
            flagged.add(src.path)
        if entries:
            verified.setdefault(entries[0]["school_id"], []).append((src, entries))
    run_dirs = sorted({src.run_dir for src in sources if src.run_dir is not None} | set(runs_without_copies))
    reported = {p for r in rows for p in r.problems}   # e.g. a damaged anchor, already on its school's row
    disagreements, behind = _cross_check(verified, anchors_dir, frozenset(flagged))
    forks, same_id = _forks(verified)
    problems = [p for p in dict.fromkeys(forks + disagreements + _anchor_rejections(run_dirs)
                                         + _missing_copies(run_dirs, anchors_dir)) if p not in reported]
    return AuditReport(rows, problems, _run_keys_note(sources) + anchor_notes + _anchor_notes(sources) + behind
                       + _rdp_note(rows), same_id)


def _run_keys_note(sources: Sequence[_Source]) -> list[str]:
    """"intact" against keys the run stored (--trust-run-keys) is not what it is against the keyring: one line
    saying whose keys were used, so the verdict is not read as independent of whoever wrote the run."""
    schools = list(dict.fromkeys(s.seen_school or s.school or "?" for s in sources if s.key_from_run))
    if not schools:
        return []
    shown = ", ".join(schools[:NAMED_IN_LINE]) + (f" and {len(schools) - NAMED_IN_LINE} more"
                                                  if len(schools) > NAMED_IN_LINE else "")
    return [f"keys of {shown}: the ones stored with the ledgers (--trust-run-keys), not an independent keyring: whoever "
            f"wrote them (the coordinator, for a run) could swap a key and re-sign edited entries, and they would pass"]


def _rdp_note(rows: Sequence[Row]) -> list[str]:
    """An "ok" row whose ε RDP column is above its budget reads as a contradiction unless it says which ε counts."""
    looser = [r.school for r in rows if r.budget is not None and r.epsilon_rdp is not None
              and r.epsilon_rdp > r.budget and not r.over_budget and r.prv_method != "rdp-fallback"]
    if not looser:
        return []
    return [f"ε RDP is a looser upper bound, shown for comparison: the budget is checked against ε PRV, so "
            f"ε RDP above it ({', '.join(dict.fromkeys(looser))}) is not a finding"]


def _anchor_folders_given(paths: Sequence[Path], anchors_dir: Path | None
                          ) -> tuple[list[Path], Path | None, list[str]]:
    """`fedfer privacy audit runs/*` names the coordinator's `runs/anchors` beside the run directories: it holds
    no ledger, it is what the ledgers are checked against. Such a folder is taken as --anchors (when none was
    given) instead of failing the audit as 'no ledger/ directory'. Returns the other paths, the anchors folder
    and a note saying what was done."""
    rest, notes = [], []
    for raw in paths:
        path = Path(raw)
        if not (path.name == ANCHOR_DIR and path.is_dir() and not (path / "ledger").exists()
                and not (path / LEDGER_FILE).exists()):
            rest.append(path)
        elif anchors_dir is None:
            anchors_dir = path
            notes.append(f"{path}: the coordinator's anchors, not a ledger: read as --anchors {path}")
        elif path.resolve() != Path(anchors_dir).resolve():
            notes.append(f"{path}: the coordinator's anchors, not a ledger: not read (--anchors {anchors_dir} given)")
    return rest, anchors_dir, notes


def _runs_without_copies(paths: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """`fedfer privacy audit runs/*` also names runs that stored no school's reply (stopped before their first
    round, or while preparing): a run directory (its config.yaml) with no ledger/<school>.jsonl. The whole audit
    used to stop at it ('no ledger/ directory'). Returns the other paths and those runs; the audit still checks
    them against the anchors (a run the server anchored entries of must have its copies)."""
    rest, empty = [], []
    for raw in paths:
        path = Path(raw)
        is_empty_run = (path.is_dir() and (path / "config.yaml").is_file() and not (path / LEDGER_FILE).exists()
                        and not any((path / "ledger").glob("*.jsonl")))
        (empty if is_empty_run else rest).append(path)
    return rest, empty


def _retired_keys(sources: Sequence[_Source], results: Sequence[tuple[list[Row], list[dict]]]
                  ) -> dict[str, dict[str, tuple[Any, set[str], str]]]:
    """Per school, the keys its verified ledgers show it retired: key id -> (public key, the hashes of the
    entries before the transition, where the transition is)."""
    retired: dict[str, dict[str, tuple[Any, set[str], str]]] = {}
    for src, (_, entries) in zip(sources, results):
        if not entries or src.keys is None:
            continue
        for line, t in src.keys.transitions:
            before = {e["hash"] for e in entries[:line - 1]} | {t["prev_hash"]}
            known = retired.setdefault(entries[0]["school_id"], {})
            old = t.get("old_key_id", t["key_id"])   # a recovery is signed by the new key and names the lost one
            key, hashes, where = known.get(old, (load_public_key(t["old_public_key"]), set(), ""))
            known[old] = (key, hashes | before, where or f"{src.path} line {line}")
    return retired


def check_keyring(keys_dir: Path | None) -> str:
    """'' when `keys_dir` is None or a directory; else one line saying what is wrong with --keys."""
    if keys_dir is None or Path(keys_dir).is_dir():
        return ""
    if Path(keys_dir).exists():
        return (f"--keys {keys_dir}: a file, not a keyring: give the directory that holds the <school>.pub keys "
                f"registered at enrollment (e.g. deploy/keys)")
    return (f"--keys {keys_dir}: not found (the keyring is the directory of <school>.pub keys registered at "
            f"enrollment, e.g. deploy/keys; a simulated run has none: use --trust-run-keys, which uses the keys "
            f"the run stored and so trusts the coordinator)")


def _anchor_notes(sources: Sequence[_Source]) -> list[str]:
    """One line naming the schools no server anchor covers: their ledgers could be cut short unnoticed."""
    bare = [s for s in sources if not s.anchored]
    if not bare:
        return []
    schools = list(dict.fromkeys(s.seen_school or s.school or "?" for s in bare))
    looked = sorted({str(s.anchors_looked) for s in bare if s.anchors_looked is not None})
    where = f"looked in {', '.join(looked)}" if looked else "give --anchors DIR"
    return [f"no server anchors found for {', '.join(schools)} ({where}): a ledger cut short at its end, or "
            f"rewritten and re-signed by its school (it holds the key), cannot be noticed"]


def _missing_copies(run_dirs: Sequence[Path], anchors_dir: Path | None) -> list[str]:
    """A school the server anchored entries of a run for must still have that run's ledger copy."""
    problems = []
    for run_dir in run_dirs:
        anchors = anchors_dir if anchors_dir is not None else anchors_dir_of_run(run_dir)
        if not anchors.is_dir():
            continue
        for path in sorted(anchors.glob("*.json")):
            school = path.stem
            try:
                chains = load_anchors(anchors, school)["chains"].values()
            except LedgerError as exc:
                problems.append(str(exc))
                continue
            anchored = sum(len(r["hashes"]) for c in chains for r in c.get("runs", []) if r["run_id"] == run_dir.name)
            if anchored and not (run_dir / "ledger" / f"{school}.jsonl").is_file():
                problems.append(f"{run_dir / 'ledger' / (school + '.jsonl')} (school {school}): missing, but the "
                                f"server anchored {anchored} entries of run {run_dir.name!r} for this school")
    return problems


#: What the table's `left` column shows for an earlier ledger of a school, and the note that says why.
EARLIER_LEFT = "–"
#: What the steps, σ and q columns show for a ledger in which no round trained (refusals only), and the note.
NOT_APPLICABLE = "–"
NOT_APPLICABLE_NOTE = (f"{NOT_APPLICABLE} in the steps, σ and q columns: no round trained in that ledger (refusals "
                       f"only), so none applies")
EARLIER_LEFT_NOTE = (f"{EARLIER_LEFT} in the left column: an earlier ledger of that school; what it has left is on its "
                     f"lifetime line below")


def format_table(report: AuditReport) -> str:
    header = ["school", "unit", "rounds", "steps", "σ", "q", "δ", "ε PRV", "ε RDP", "budget", "left", "status",
              "ledger"]
    lines = []
    # the budget left at the end of an earlier run's copy is more than the school has now: shown only on the row
    # its lifetime line uses (schools of one name excepted: each of their rows is another school's)
    latest = {id(r) for r in report.lifetime}
    shared = {c.school for c in report.shared_names}
    earlier = {id(r) for r in report.rows if r.budget_left is not None and id(r) not in latest and r.school not in shared}
    for r in report.rows:
        rounds = f"{r.rounds}" + (f" (+{r.refusals} refused)" if r.refusals else "")
        steps = f"{r.steps}" if r.steps else NOT_APPLICABLE if r.trained_nothing else ""
        if steps and r.lifetime_steps != r.steps and r.epsilon_prv is not None:
            steps += f" ({r.lifetime_steps} lifetime)"
        sigma, q = (NOT_APPLICABLE, NOT_APPLICABLE) if r.trained_nothing else (_fmt(r.sigma), _fmt(r.q))
        eps_prv = "" if r.epsilon_prv is None else f"{r.epsilon_prv:.3f}"
        budget = "none" if r.budget is None and r.epsilon_prv is not None else _fmt(r.budget)
        if r.over_budget:   # as many digits as it takes to see ε above the budget
            eps_prv, budget = distinct_pair(r.epsilon_prv, r.budget)
        eps_prv += "*" if eps_prv and r.prv_method == "rdp-fallback" else ""
        status = r.status.upper() if r.status != "ok" else "ok"
        if r.over_budget and r.status != "over-budget":
            status += ", OVER-BUDGET"
        lines.append([r.school, r.unit, rounds if r.rounds or r.refusals else "", steps, sigma, q, _fmt(r.delta), eps_prv,
                      "" if r.epsilon_rdp is None else f"{r.epsilon_rdp:.3f}",
                      budget, EARLIER_LEFT if id(r) in earlier else
                      "" if r.budget_left is None else f"{max(r.budget_left, 0.0):.3f}", status, r.ledger])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)] if lines else [len(h) for h in header]
    out = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in lines]
    notes = [p for r in report.rows for p in r.problems] + report.problems
    if any(r.prv_method == "rdp-fallback" for r in report.rows):
        notes.append("* PRV could not evaluate this history; the (looser, still valid) RDP bound is shown")
    notes += _budget_notes(report.rows)
    notes += [EARLIER_LEFT_NOTE] if earlier else []
    notes += [NOT_APPLICABLE_NOTE] if any(r.trained_nothing for r in report.rows) else []
    notes += [n for r in report.rows for n in r.key_transitions]
    notes += report.notes
    checked = {(r.school, r.fingerprint) for r in report.rows if not r.partial}   # the school's own ledger given
    unchecked = list(dict.fromkeys(r.school for r in report.rows
                                   if r.partial and (r.school, r.fingerprint) not in checked))
    if unchecked:
        # when some schools' own ledgers were given, name the others: "pass the school's own ledger" read as if
        # the ones given had not been used
        whose = f" ({', '.join(unchecked)})" if checked else ""
        notes.append(f"run copies: ε includes the earlier spending that each school's first entry in the run records "
                     f"(history_before); pass the school's own ledger.jsonl too to check it{whose}")
    notes = list(dict.fromkeys(notes))   # a message two sources share is printed once
    lifetime = format_lifetime(report)
    nexts = [f"next: {step}" for step in report.next_steps]
    return "\n".join(out + [""] + notes + ([""] if notes and lifetime else []) + lifetime
                     + ([""] if nexts else []) + nexts + [f"audit: {report.verdict} (exit {report.exit_code})"])


def format_lifetime(report: AuditReport) -> list[str]:
    """One line per school a privacy officer signs off: lifetime ε, its budget, the share used and what is left,
    then its status in brackets. Names are padded to the longest ("lincoln-high  ε 0.000" beside "school-00  ε
    12.242" put ε in two columns) and so is the figure ("… 44.585 left  [ok" beside "… OVER BUDGET by 4.41
    [OVER-BUDGET" put the status in two), so ε and the status each read down one column."""
    width = max((len(r.school) for r in [*report.lifetime, *report.unaccounted]), default=0)
    apart = {c.school: c for c in report.same_id if c.different_schools}
    figures: list[tuple[str, str, str]] = []   # (school, what it spent and has left, [status; where])
    for r in report.lifetime:
        status = report.school_status(r.school)
        if r.school in apart:   # one run's ε shown as the school's would be the lie the finding is about
            figures.append((r.school, f"no one lifetime ε: {apart[r.school].keys} schools of this name, one per key",
                            f"[{status.upper().replace('-', ' ')}; audit each run on its own]"))
            continue
        where = "own ledger, all runs" if r.copy == "school" else f"run {r.run_id}'s copy, earlier runs as it records"
        if r.budget is None:
            used = ", no budget known"
        elif r.over_budget:
            eps, budget = distinct_pair(r.epsilon_prv, r.budget)
            used = f" of {budget}: OVER BUDGET by {r.epsilon_prv - r.budget:.3g}"
        else:
            pct = 100 * r.epsilon_prv / r.budget if r.budget > 0 else 0.0
            share = f"{pct:.0f} %" if pct < 99.5 else f"{pct:.2f} %"   # 99.97 % must not read as 100
            used = f" of {r.budget:g} ({share} used), {r.budget_left:.3f} left"
        verdict = "ok" if status == "ok" else status.upper()
        figures.append((r.school, f"ε {r.epsilon_prv:.3f} at δ {r.delta:g}{used}", f"[{verdict}; {where}]"))
    for r in report.unaccounted:
        figures.append((r.school, "ε not known: no ledger of it passed the checks above",
                        f"[{report.school_status(r.school).upper()}; {r.source}]"))
    spent = max((len(figure) for _, figure, _ in figures), default=0)
    lines = [f"  {school:<{width}}  {figure:<{spent}}  {status}" for school, figure, status in sorted(figures)]
    return ["lifetime per school:"] + lines if lines else []
