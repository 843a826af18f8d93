"""One school round, top to bottom:

    data → policy check of the run-config → the ledger against the coordinator's anchor → atomic budget guard
         → privacy.engine → ledger → reply content

What leaves the school (docs/privacy.md lists every field and why it is safe): the DP-noised weights,
the status, the school id, ε / σ / q / steps (functions of public values: the policy and the run-config),
and the signed ledger entries. Never a count, an un-noised loss, a realised batch size, a duration, a
file path or a hash of the data; a refusal says what failed, not private numbers.

The check, the training and the record run under one lock per school state directory, taken without
waiting: a second train message arriving while one is in progress is declined (``busy``), so nothing
is trained or counted twice.
"""

from __future__ import annotations

import io
import json
import math
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from client.node import NodeIdentity
from privacy.policy import SchoolPolicy
from privacy.state_folder import AnchoredHead
from client.school_cache import SchoolCache
from shared_models.datasets.school_folder import (
    SchoolClips, SchoolData, SchoolDataError, load_school, load_school_clips,
)
from shared_models.models import registry

ROUND_LOCK = "round"   # <state_dir>/round.lock: check → train → record, one at a time per school
OWN_MODEL = "own-model.pt"   # <state_dir>/own-model.pt: the school's last trained weights (train.keep_own_model)

# A simulated node's Ray actor (or a long-running deployed ClientApp process) serves many rounds:
# decode a school's images once per version of its labels.csv, keeping at most `data.school_cache_mb`
# of decoded schools (least recently used out first).
_SCHOOL_CACHE = SchoolCache(1024 * 2**20)
_CLIP_CACHE: dict[Path, tuple[tuple[Any, ...], SchoolClips]] = {}   # clip schools: one per simulated node in practice


@dataclass
class RoundReply:
    """What the Flower handler turns into the reply message."""

    status: str           # ok | no-data | policy-violation | budget-exhausted | ledger-lost | ledger-behind | busy
    reason: str = ""
    weights: dict[str, torch.Tensor] | None = None
    metrics: dict[str, float | int] = field(default_factory=dict)
    ledger: dict[str, str] | None = None          # entry, run-entries, school-id (JSON strings)
    setting: str = ""                             # policy-violation: the run-config key refused


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _log(message: str) -> None:
    from logging import INFO

    from flwr.common.logger import log

    log(INFO, "[fedfer client] %s", message)


SIMULATED_SCHOOL_LOG = "school.log"   # a simulated school's own log, in its state directory


def school_log(node: NodeIdentity, message: str) -> None:
    """What only the school should read (why its data folder was refused, which frames were skipped, why its
    round failed): a deployed school's own log; a simulated school's `<state dir>/school.log` — a simulation's
    Flower log is the coordinator's, so it must not get them, but the engineer running the simulation needs
    them somewhere. A failure to write never fails the round."""
    if not node.simulated:
        _log(message)
        return
    if node.state_dir is None:
        return
    try:
        node.state_dir.mkdir(parents=True, exist_ok=True)
        with open(node.state_dir / SIMULATED_SCHOOL_LOG, "a", encoding="utf-8") as handle:
            handle.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {message}\n")
    except OSError:
        pass


def details_where(node: NodeIdentity) -> str:
    """Where a reply tells the coordinator to look for the details: a simulated school's log file (the run's
    own folder, one machine), else "the school's log" (a deployed school's paths are its own business)."""
    if node.simulated and node.state_dir is not None:
        return str(node.state_dir / SIMULATED_SCHOOL_LOG)
    return "the school's log"


# ------------------------------------------------------------------------------------------- data
def load_data(node: NodeIdentity, cfg: Mapping[str, Any]) -> SchoolData | SchoolClips:
    """The school's frames, or its clips for a clip model (cached per version of labels.csv, frames within
    `data.school_cache_mb`). A simulated school generated on demand is asked for and waited for first.
    Raises SchoolDataError."""
    assert node.data_dir is not None
    if node.simulated and str(cfg.get("data.generate", "")) == "on-demand":
        from shared_models.datasets.on_demand import SchoolNotGenerated, await_school

        try:
            await_school(node.data_dir, timeout_s=float(cfg["federation.round_timeout"]))
        except SchoolNotGenerated as exc:
            raise SchoolDataError(str(exc)) from None
    _SCHOOL_CACHE.set_budget(int(cfg.get("data.school_cache_mb", 1024)) * 2**20)
    labels = node.data_dir / "labels.csv"
    try:
        stat = labels.stat()
        version = (stat.st_mtime_ns, stat.st_size)
    except OSError:
        version = (0, -1)
    frames = registry.config_clip_frames(cfg)
    if frames > 0:   # a clip model: the school's clips (rows with clip_id), T frames each, labelled for the task
        return _load_clips(node, version, frames, str(cfg.get("model.task", "fer7")))

    def decode() -> SchoolData:
        data = load_school(node.data_dir)
        if data.skipped:
            school_log(node, f"{node.school_id}: {data.describe_skips()}")
        return data

    return _SCHOOL_CACHE.get(node.data_dir, version, decode)



def _load_clips(node: NodeIdentity, version: tuple[int, int], frames: int, task: str) -> SchoolClips:
    """The school's clips, cached per (labels.csv version, frames, task) like the frames."""
    assert node.data_dir is not None
    key = (version, frames, task)
    cached = _CLIP_CACHE.get(node.data_dir)
    if cached is None or cached[0] != key:
        data = load_school_clips(node.data_dir, frames, task)
        if data.skipped:
            school_log(node, f"{node.school_id}: {data.describe_skips()}")
        _CLIP_CACHE[node.data_dir] = (key, data)
    return _CLIP_CACHE[node.data_dir][1]


# ----------------------------------------------------------------------------------------- policy
def school_policy(node: NodeIdentity, data: SchoolData | SchoolClips) -> SchoolPolicy:
    """A deployed school's policy is its node-config's. A simulated school's is ``<state>/policy.json``,
    written by `fedfer simulate`; if a simulation was started without it (`flwr run .`), it is made
    once from fedfer's installed defaults — never from the run-config — and kept."""
    from privacy.policy import declared_size_bucket, policy_from_defaults, read_policy_file, write_policy_file

    if node.policy is not None:
        return node.policy
    assert node.state_dir is not None
    policy = read_policy_file(node.state_dir)
    if policy is None:
        from shared_models.config import defaults

        installed = defaults()
        units = data.num_students if installed["privacy.unit"] == "student" else len(data)
        policy = policy_from_defaults(installed, declared_size_bucket(max(1, units)), source=f"{node.school_id} defaults")
        write_policy_file(node.state_dir, policy)
    return policy


_DELTA_WARNED: set[tuple[str, float, int]] = set()


def _warn_delta_against_count(node: NodeIdentity, policy: SchoolPolicy, data: SchoolData | SchoolClips) -> None:
    """δ must be < 1/(declared size) (the policy refuses otherwise), but a school that declared fewer
    students than it holds can still have δ ≥ 1/(its true count): a δ that allows releasing one student's
    data outright. Said once per process in the school's own log, never sent (the count is private, and a
    refusal the coordinator could see would depend on it)."""
    units = data.num_students if policy.unit == "student" else len(data)
    key = (node.school_id, policy.delta, units)
    if units < 1 or policy.delta < 1 / units or key in _DELTA_WARNED:
        return
    _DELTA_WARNED.add(key)
    _log(f"{node.school_id}: warning: policy delta {policy.delta:g} is not below 1/{units} (the {policy.unit}s "
         f"this school holds; it declared {policy.declared_units}); lower 'delta' in the school's policy")


# ------------------------------------------------------------------------------------------ round
def run_round(node: NodeIdentity, cfg: Mapping[str, Any], model: torch.nn.Module, *, run_id: str,
              server_round: int, anchored: AnchoredHead | None = None, clock: Callable[[], datetime] | None = None,
              phases: PhaseClock | None = None) -> RoundReply:
    """One round at this school; ``model`` holds the global weights and is trained in place. ``anchored``: what
    the coordinator's anchor holds of this school's chain (None: nothing), checked against the school's ledger
    before anything is trained. ``phases`` collects how long each step took, for the school's own timing log
    (never sent). A deployed school keeps its ε compositions in its state directory (privacy/accounting.py
    `epsilon_store`)."""
    from privacy.accounting import epsilon_store

    with epsilon_store(None if node.simulated else node.state_dir):
        return _run_round(node, cfg, model, run_id=run_id, server_round=server_round, anchored=anchored, clock=clock,
                          phases=phases)


# Work a deployed ClientApp leaves for after its reply has gone: the warm executor's task process calls
# `run_after_reply` once Flower has pushed the reply (client/runtime/warm_executor.py). Never registered
# for a simulated school (a long-lived process that would only collect them).
_AFTER_REPLY: list[Callable[[], None]] = []


def after_reply(work: Callable[[], None]) -> None:
    _AFTER_REPLY.append(work)


def run_after_reply() -> None:
    """Run (and forget) the work registered with `after_reply`; a failure only costs time later."""
    while _AFTER_REPLY:
        work = _AFTER_REPLY.pop(0)
        try:
            work()
        except Exception as exc:  # noqa: BLE001 - an optimisation must never fail a finished round
            _log(f"preparing the next round failed ({type(exc).__name__}: {exc}); it composes ε itself")


def prepare_next_round(node: NodeIdentity, cfg: Mapping[str, Any]) -> None:
    """After the reply has gone: compose into the school's ε store what the next round's policy check and
    budget guard will ask if the run-config stays the same (this round now recorded). Public values only;
    the next round still checks and guards everything itself, it only finds these compositions done."""
    from privacy.accounting import SchoolAccountant, epsilon_store, school_dataset_id
    from privacy.policy import PolicyViolation, agree_round

    if node.simulated or node.state_dir is None or node.policy is None:
        return
    with epsilon_store(node.state_dir):
        terms = agree_round(node.policy, cfg, node.school_id)
        if isinstance(terms, PolicyViolation):
            return
        plan = terms.plan
        accountant = SchoolAccountant(node.state_dir, node.school_id, school_dataset_id(node.state_dir, node.school_id))
        for kind in {terms.accountant, "rdp"}:   # the guard's and the ledger entry's ε, and the entry's RDP bound
            accountant.epsilon_if(plan.noise_multiplier, plan.sample_rate, plan.steps, terms.delta, kind=kind)


def _run_round(node: NodeIdentity, cfg: Mapping[str, Any], model: torch.nn.Module, *, run_id: str,
               server_round: int, anchored: AnchoredHead | None, clock: Callable[[], datetime] | None = None,
               phases: PhaseClock | None = None) -> RoundReply:
    from privacy.ledger import LedgerBehindError, record_round
    from privacy.policy import PolicyViolation, agree_round
    from shared_models.atomic_files import try_locked

    phases = phases if phases is not None else PhaseClock()
    # the time the request was taken: signed into the entry, and independent of how long training takes
    started_at = (clock or _now)().isoformat(timespec="seconds")

    # 1. data
    data = _usable_data(node, cfg)
    if isinstance(data, RoundReply):
        return data
    phases.mark("data")

    # 2. the run-config against the school's policy (public values only)
    policy = school_policy(node, data)
    _warn_delta_against_count(node, policy, data)
    terms = agree_round(policy, cfg, node.school_id)
    phases.mark("policy")

    assert node.state_dir is not None
    node.state_dir.mkdir(parents=True, exist_ok=True)
    with try_locked(node.state_dir / ROUND_LOCK) as mine:
        if not mine:
            return RoundReply("busy", "the school is handling another train message")
        lost = _refuse_lost_ledger(node)
        if lost is not None:
            return lost
        try:
            books = _open_books(node, run_id)
        except LedgerBehindError as exc:   # an old backup of the ledger put back: its ε is lower than the school's
            school_log(node, f"{node.school_id}: {exc}")
            return RoundReply("ledger-lost", f"the school's ledger is older than its last signed entry (an old backup?): "
                                          f"it trains no more until the newest ledger is back (details in "
                                          f"{details_where(node)})")
        # the coordinator's anchor: a ledger that lacks what it verified (an old backup of the whole state folder,
        # which agrees with itself) trains no more, and nothing is signed into it
        behind = _refuse_ledger_behind_anchor(node, books, anchored)
        if behind is not None:
            return behind
        if isinstance(terms, PolicyViolation):
            return _refuse_policy(books, terms, policy, cfg, server_round, started_at)

        # 3. budget guard: would this round, as planned, fit the lifetime budget?
        common = _entry_fields(terms, run_id, server_round, started_at)
        refusal = _guard_budget(books, terms, common)
        if refusal is not None:
            return refusal
        phases.mark("guard")

        # 4. DP training (privacy.engine), then 5. the ledger, before anything leaves the school
        result = _train(model, data, terms.plan, cfg, node, server_round)
        phases.mark("train")
        entry = record_round(books.accountant, books.ledger, noise_multiplier=result.noise_multiplier,
                             sample_rate=result.sample_rate, steps=result.steps, **common)
        ledger_record = books.signed(entry)
        phases.mark("ledger")
        if cfg["train.keep_own_model"]:
            keep_own_model(node, cfg, model, server_round, run_id, entry)

    # 6. reply content: DP output and public values only
    return _ok_reply(node, server_round, model, result, entry, ledger_record, terms.plan.declared_units)


class PhaseClock:
    """Seconds spent in each step of a school's handling of one message, for the school's own timing log
    (``<state dir>/round-timing.jsonl``). Durations stay at the school: they depend on its true data size,
    which replies never reveal (module docstring)."""

    def __init__(self) -> None:
        self.received_unix = time.time()
        self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self._last, 4)
        self._last = now

    def write(self, node: NodeIdentity, server_round: int, status: str) -> None:
        """Append this message's line to the school's timing log; a failure to write never fails the round."""
        if node.state_dir is None or not node.state_dir.exists():
            return
        line = {"school": node.school_id, "round": server_round, "status": status,
                "received_unix": round(self.received_unix, 4), "done_unix": round(time.time(), 4),
                "seconds": self.seconds}
        try:
            with open(node.state_dir / "round-timing.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        except OSError:
            pass


def _usable_data(node: NodeIdentity, cfg: Mapping[str, Any]) -> SchoolData | SchoolClips | RoundReply:
    """The school's frames, or the ``no-data`` reply; the details stay in the school's own log."""
    try:
        data = load_data(node, cfg)
    except SchoolDataError as exc:
        school_log(node, f"{node.school_id}: {exc}")
        return RoundReply("no-data", f"the school's data folder cannot be read (details in {details_where(node)})")
    if len(data) == 0:
        school_log(node, f"{node.school_id}: no usable images: {data.describe_skips() or 'labels.csv lists none'}")
        return RoundReply("no-data", f"no usable images in the school's data folder (details in {details_where(node)})")
    return data


@dataclass
class _SchoolBooks:
    """The school's accountant and signed ledger for this round, opened under the round lock."""

    school_id: str
    run_id: str
    accountant: Any
    ledger: Any

    def signed(self, entry: dict) -> dict[str, str]:
        """The reply's ledger fields: the new entry and every entry of this run, as JSON strings."""
        return {"entry": json.dumps(entry, sort_keys=True), "school-id": self.school_id,
                "run-entries": json.dumps(self.ledger.entries_for_run(self.run_id), sort_keys=True)}


def _refuse_lost_ledger(node: NodeIdentity) -> RoundReply | None:
    """A ``declined`` reply if the school's ledger is missing or empty though its state folder shows it trained
    before (privacy/state_folder.py): a new ledger would restart its lifetime ε at 0. Checked before the key is
    loaded (a lost key would otherwise be replaced by a new one, overwriting the lost key's public half) and before
    anything is trained; nothing is signed or recorded until the ledger is restored."""
    from privacy.state_folder import LedgerLostError, check_ledger_not_lost

    assert node.state_dir is not None
    try:
        check_ledger_not_lost(node.state_dir, node.school_id)
    except LedgerLostError as exc:
        school_log(node, f"{node.school_id}: {exc}")
        return RoundReply("ledger-lost", f"the school's ledger is lost (it trained before): it trains no more until the "
                                      f"ledger is restored (details in {details_where(node)})")
    return None


def _refuse_ledger_behind_anchor(node: NodeIdentity, books: _SchoolBooks,
                                 anchored: AnchoredHead | None) -> RoundReply | None:
    """A ``ledger-behind`` reply if the school's ledger lacks the entry the coordinator's anchor verified
    (privacy/state_folder.py `check_ledger_holds_anchor`); None if it holds it, or the anchor holds nothing.
    The coordinator is not trusted here: a wrong head can only make the school refuse, never train with a lower
    ε (the ledger and the accountant are the school's own) or sign anything (nothing is recorded on a refusal)."""
    from privacy.state_folder import LedgerBehindAnchorError, check_ledger_holds_anchor

    if anchored is None:
        return None
    assert node.state_dir is not None
    try:
        check_ledger_holds_anchor([e["hash"] for e in books.ledger.entries], anchored, str(books.ledger.path),
                                  node.school_id, node.state_dir)
    except LedgerBehindAnchorError as exc:
        school_log(node, f"{node.school_id}: {exc}")
        return RoundReply("ledger-behind", f"the school's ledger lacks entries the coordinator verified (an old backup "
                                           f"of its state folder?): it trains no more until the ledger is restored "
                                           f"with `fedfer deploy restore-ledger` (details in {details_where(node)})")
    return None


def _open_books(node: NodeIdentity, run_id: str) -> _SchoolBooks:
    from privacy.accounting import SchoolAccountant, school_dataset_id
    from privacy.ledger import SchoolLedger
    from privacy.signing import load_or_create_signing_key

    assert node.state_dir is not None
    accountant = SchoolAccountant(node.state_dir, node.school_id, school_dataset_id(node.state_dir, node.school_id))
    ledger = SchoolLedger(node.state_dir, node.school_id, load_or_create_signing_key(node.state_dir))
    return _SchoolBooks(node.school_id, run_id, accountant, ledger)


def _refuse_policy(books: _SchoolBooks, violation, policy, cfg: Mapping[str, Any], server_round: int,
                   started_at: str) -> RoundReply:
    """Record the refused run-config (no steps, no noise) and say which setting was refused."""
    from privacy.ledger import record_refusal

    clip = float(cfg["privacy.max_grad_norm"])
    entry = record_refusal(
        books.accountant, books.ledger, reason="policy-violation", setting=violation.setting, planned_steps=0,
        run_id=books.run_id, round=server_round, privacy_unit=policy.unit, noise_multiplier=0.0, sample_rate=0.0,
        max_grad_norm=clip if math.isfinite(clip) and clip >= 0 else 0.0, delta=policy.delta,
        budget=policy.budget, accountant="prv", timestamp=started_at)
    return RoundReply("policy-violation", f"the run-config asks for less privacy than the school's policy "
                      f"allows ({violation.setting})", ledger=books.signed(entry), setting=violation.setting)


def _entry_fields(terms, run_id: str, server_round: int, started_at: str) -> dict[str, Any]:
    """The ledger fields every entry of this round shares, refused or trained."""
    plan = terms.plan
    return dict(run_id=run_id, round=server_round, privacy_unit=plan.unit, max_grad_norm=plan.max_grad_norm,
                delta=terms.delta, budget=terms.budget, accountant=terms.accountant, timestamp=started_at)


def _guard_budget(books: _SchoolBooks, terms, common: dict[str, Any]) -> RoundReply | None:
    """The ``budget-exhausted`` reply (with its recorded refusal) if the planned round would cross the
    lifetime budget; None if it fits."""
    from privacy.budget import check_budget
    from privacy.ledger import reconcile, record_refusal

    plan = terms.plan
    # a crash between a ledger append and its accountant record leaves the accountant a round behind: the
    # guard counts that round too, as the entry written after training will
    reconcile(books.accountant, books.ledger)
    books.accountant.check_terms(plan.unit, terms.delta)
    decision = check_budget(books.accountant, (plan.noise_multiplier, plan.sample_rate, plan.steps), terms.delta,
                            terms.budget, accountant=terms.accountant)
    if decision.allowed:
        return None
    entry = record_refusal(books.accountant, books.ledger, reason=decision.reason, planned_steps=plan.steps,
                           noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, **common)
    return RoundReply("budget-exhausted", f"this round would take the school past its lifetime ε budget "
                      f"{terms.budget:g} ({terms.budget_source}, the tighter of the two)", ledger=books.signed(entry))


def _ok_reply(node: NodeIdentity, server_round: int, model: torch.nn.Module, result, entry: dict,
              ledger_record: dict[str, str], declared_units: int) -> RoundReply:
    """The trained weights with the entry's public values (ε, σ, q, steps), the policy's declared size
    (FedAvg's weight) and the signed ledger."""
    from privacy.ledger import epsilon_value

    metrics: dict[str, float | int] = {
        "epsilon": epsilon_value(entry["epsilon"]), "epsilon-rdp": epsilon_value(entry["epsilon_rdp"]),
        "noise-multiplier": entry["noise_multiplier"], "sample-rate": entry["sample_rate"], "steps": entry["steps"],
        "unit-weight": 1,   # client-level DP averages unweighted: one school, one vote
        "declared-units": int(declared_units),   # FedAvg's weight: the public size in the school's policy
    }
    _log(f"{node.school_id} round {server_round}: {result.steps} DP steps, ε {metrics['epsilon']:.3f}")
    return RoundReply("ok", weights=model.state_dict(), metrics=metrics, ledger=ledger_record)


def keep_own_model(node: NodeIdentity, cfg: Mapping[str, Any], model: torch.nn.Module, server_round: int,
                   run_id: str, entry: Mapping[str, Any]) -> None:
    """Write the weights this round trained (the very DP release the reply carries, so no further privacy
    cost) to ``<state dir>/own-model.pt`` as a checkpoint `fedfer evaluate` and `fedfer classroom report`
    read: the round's global model plus the school's own last update. On the school's own students it
    beat the final global model by 2.0 points on average, not at every school (docs/experiments.md,
    session 13). It stays at the school; a failure to write it costs the school that file, never the round."""
    from privacy.ledger import epsilon_value
    from shared_models.atomic_files import atomic_write_bytes

    assert node.state_dir is not None
    buffer = io.BytesIO()
    torch.save({"round": server_round, "model": registry.model_info(cfg), "state_dict": model.state_dict(),
                "school": node.school_id, "run_id": run_id, "epsilon": epsilon_value(entry["epsilon"]),
                "config": dict(cfg),   # the run-config (public): where `fedfer evaluate` finds synthetic data
                "kind": "school-own: the global model of the round before plus this school's last DP update"},
               buffer)
    try:
        # a write a crash cut short left its temp file (`.own-model.pt.<random>.tmp`); this runs under the
        # school's round lock, so no other write of the file is under way
        for stale in node.state_dir.glob(f".{OWN_MODEL}.*.tmp"):
            stale.unlink(missing_ok=True)
        atomic_write_bytes(node.state_dir / OWN_MODEL, buffer.getvalue())
    except OSError as exc:
        _log(f"{node.school_id}: could not keep its own model ({exc.strerror or exc}); the round goes on")


def _train(model: torch.nn.Module, data: SchoolData | SchoolClips, plan, cfg: Mapping[str, Any], node: NodeIdentity,
           server_round: int):
    from privacy.engine import train_private
    from shared_models.training import FaceDataset, clip_dataset, make_optimizer, step_size
    from shared_models.transforms import train_transform

    lr = step_size(cfg, plan.noise_multiplier)
    if lr != float(cfg["train.lr"]):   # the school's own log says why its step is smaller
        _log(f"{node.school_id}: round {server_round} has σ {plan.noise_multiplier:.2f} > train.lr_noise_reference: "
             f"step size {lr:.3g} instead of {float(cfg['train.lr']):g}")

    # augmentation and dropout draw from torch's global generator: the trainer seeds its CPU generator from its
    # CSPRNG before every frame and every forward (privacy/engine.py PrivateTrainer._collate); this seeds the
    # rest (e.g. a GPU's generator) from OS entropy, never from run.seed, school and round, which the coordinator
    # knows (a known stream consumed in frame order let one student move others' gradients)
    torch.manual_seed(secrets.randbits(63))
    if isinstance(data, SchoolClips):   # a clip model: one sample per clip, the student's clips are one unit
        frames = clip_dataset(data, model)
    else:
        frames = FaceDataset(data.images, data.labels, train_transform(model.input_size, bool(cfg["train.augment"])))
    return train_private(model, frames, data.student_ids if plan.unit == "student" else None, plan,
                         make_optimizer(model, cfg, plan.noise_multiplier), int(cfg["train.local_epochs"]),
                         clipping=str(cfg["privacy.clipping"]))
