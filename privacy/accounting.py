"""Lifetime privacy accounting per school.

Every DP release of a school composes in ONE accountant history per school state directory, over
rounds, runs *and data changes*: editing, re-saving, appending to or re-ordering labels.csv never starts
a fresh history. The history's identity is a random id created once per state directory
(:func:`school_dataset_id`, the ledger's ``dataset_fingerprint``), so the server cannot test guesses
about the data against it. The history is persisted atomically in the school's state directory
(``<state_dir>/accountant-<id[:16]>.json``) together with the privacy unit and δ it is kept at; the
accountant refuses to mix units or δ.

The budget accountant is Opacus' PRV accountant (Gopi et al. 2021, tight); RDP is reported beside it.
Two things are added around Opacus, both without changing the mathematics:

* **Compression.** Composition is commutative, so all history entries with the same (σ, q) are merged
  into one entry with the summed step count before PRV sees them. Opacus' PRV cost grows with the
  number of *distinct* entries (one RDP evaluation and one FFT convolution each), not with steps.
* **A faster, still safe, PRV domain.** Opacus sizes the PRV truncation domain with RDP evaluated at
  fractional orders, which is slow (≈0.2 s per (σ, q) at σ ≈ 1). The domain only needs an *upper* bound
  on the privacy loss; RDP over integer orders alone gives a bound that is never smaller, so the domain
  is never too small (a larger domain is safe, it only costs grid points). RDP vectors are cached.

If PRV cannot answer (its grid would be huge at very large ε, or it raises numerically, cf.
microsoft/prv_accountant#42, opacus#601) the PRV figure falls back to the RDP ε, which is a valid —
looser — upper bound; :func:`epsilon_report` says when that happened.

Bounds that keep every history answerable in seconds, all in the safe direction:

* **Many distinct (σ, q).** PRV costs one discretisation and FFTs over a grid of 10⁵–10⁶ points per
  *distinct* (σ, q) (≈ 1.5 s each at 200 pairs; a 2,000-pair history would take tens of minutes), and
  RDP at Opacus' fractional orders ≈ 0.1 s per distinct pair. Above ``PRV_MAX_DISTINCT_PAIRS`` the
  RDP bound is reported (``rdp-fallback``, with a note), composed over the integer orders 2–64 only
  (closed form, ≈ 1 ms per pair; dropping orders can only raise the bound). A school changes σ or q
  once per run at most, so real histories stay far below the limit.
* **Extreme σ.** σ below ``SIGMA_FLOOR`` gives ε in the tens of thousands and RDP's arithmetic fails
  near 1e-300: such a step counts as noiseless (ε = ∞). σ above ``SIGMA_CEILING`` is accounted as
  ``SIGMA_CEILING``: more noise is a post-processing of less, so the figure stays an upper bound.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from shared_models.atomic_files import atomic_write_text, locked

ACCOUNTANT_KINDS = ("prv", "rdp")
STATE_SCHEMA = 1
# Above this many grid points a PRV evaluation takes more than a few seconds and tens of MB; the
# ε there is far beyond any sensible budget, so the RDP bound is reported instead.
PRV_MAX_GRID_POINTS = 4_000_000
PRV_EPS_ERROR = 0.01  # Opacus' default absolute ε error; the figure returned is the upper end
PRV_MAX_DISTINCT_PAIRS = 32
SIGMA_FLOOR = 0.01
SIGMA_CEILING = 1e4

HistoryEntry = tuple[float, float, int]


class AccountingError(ValueError):
    """Bad accountant input or state, phrased as one line naming the file or value."""


DATASET_ID_FILE = "dataset-id"


def school_dataset_id(state_dir: Path, school_id: str = "") -> str:
    """The random id of this state directory's accountant history, created on first use.

    A state directory written by an older fedfer (histories keyed by a hash of labels.csv) has no id
    file: a single old history is adopted so its spending carries on; several cannot be merged
    silently (their releases compose, but the ledger chains them separately) and are refused."""
    state_dir = Path(state_dir)
    path = state_dir / DATASET_ID_FILE
    if path.exists():
        try:
            value = path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:   # a byte above 127 was a UnicodeDecodeError out of the round
            raise AccountingError(f"{path}: not a dataset id (school {school_id or '?'}: {exc})") from None
        if len(value) < 16 or not all(c in "0123456789abcdef" for c in value):
            raise AccountingError(f"{path}: not a dataset id (school {school_id or '?'})")
        return value
    old = sorted(state_dir.glob("accountant-*.json"))
    if len(old) > 1:
        raise AccountingError(f"{state_dir}: school {school_id or '?'} has {len(old)} accountant histories from an "
                              f"older fedfer (one per labels.csv version); all of a school's releases must compose "
                              f"in one history: merge them before training again")
    if old:
        try:
            value = str(json.loads(old[0].read_text(encoding="utf-8"))["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise AccountingError(f"{old[0]}: unreadable accountant state ({exc})") from None
    else:
        value = secrets.token_hex(32)
    atomic_write_text(path, value + "\n")
    return value


def dataset_fingerprint(rows: Iterable[str | bytes]) -> str:
    """sha256 over a stable description of the school's dataset (e.g. the lines of labels.csv).

    Rows are hashed in the given order, each terminated by a newline, so ``["a", "b"]`` and ``["ab"]``
    differ. The same data read twice gives the same fingerprint, hence the same accountant history.
    """
    digest = hashlib.sha256()
    for row in rows:
        data = row if isinstance(row, bytes) else str(row).encode("utf-8")
        digest.update(data.rstrip(b"\r\n"))
        digest.update(b"\n")
    return digest.hexdigest()


def _check_entry(noise_multiplier: float, sample_rate: float, steps: int, where: str = "") -> HistoryEntry:
    try:
        sigma, q, n = float(noise_multiplier), float(sample_rate), int(steps)
    except (TypeError, ValueError) as exc:
        raise AccountingError(f"{where}history entry ({noise_multiplier!r}, {sample_rate!r}, {steps!r}) is not numeric") from exc
    if not (math.isfinite(sigma) and sigma >= 0):
        raise AccountingError(f"{where}noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    if not (math.isfinite(q) and 0 <= q <= 1):
        raise AccountingError(f"{where}sample_rate must be in [0, 1], got {sample_rate!r}")
    if n < 0 or n != float(steps):
        raise AccountingError(f"{where}steps must be a non-negative integer, got {steps!r}")
    return sigma, q, n


def compress_history(history: Iterable[Sequence]) -> list[HistoryEntry]:
    """Merge entries with equal (σ, q) — exact, because composition is commutative — and drop
    entries that cannot leak (no steps, or q = 0). Order of first appearance is kept."""
    merged: dict[tuple[float, float], int] = {}
    for entry in history:
        sigma, q, steps = _check_entry(*entry)
        if steps == 0 or q == 0.0:
            continue
        merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return [(sigma, q, steps) for (sigma, q), steps in merged.items()]


# ----------------------------------------------------------------------------------------- RDP
def _rdp_orders() -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant

    return tuple(RDPAccountant.DEFAULT_ALPHAS)


_INTEGER_ORDERS = tuple(float(a) for a in range(2, 65))  # Opacus' own integer range


@lru_cache(maxsize=16384)  # one entry per distinct (σ, q): an audit of thousands of them must not thrash
def _rdp_one_step(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray:
    from opacus.accountants.analysis.rdp import compute_rdp

    if 0 < q < 1 and sigma > 0:
        if orders == _INTEGER_ORDERS:
            return _rdp_integer_orders(sigma, q)
        fast = _rdp_vectorised(sigma, q, orders)
        if fast is not None:
            return fast
    return np.asarray(compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(orders)), dtype=float)


def _rdp_vectorised(sigma: float, q: float, orders: tuple[float, ...]) -> np.ndarray | None:
    """RDP at any orders in [1.1, 64]: integer ones by :func:`_rdp_integer_orders`, fractional ones by
    Opacus' series (``_compute_log_a_for_frac_alpha``: the same terms, the same stopping rule — the
    first term below e^-30 is the last one added) evaluated for all orders and terms at once instead
    of term by term in Python (≈ 3 ms per order). None (caller uses Opacus) if a signed partial sum
    is not positive, where Opacus' own log-subtraction would be the reference."""
    from scipy.special import binom, log_ndtr

    alphas = np.asarray(orders, dtype=float)
    if alphas.min() <= 1 or alphas.max() > 64:
        return None
    out = np.empty(len(alphas))
    integer = alphas == np.round(alphas)
    if integer.any():
        out[integer] = _rdp_integer_orders(sigma, q)[alphas[integer].astype(int) - 2]
    frac = alphas[~integer]
    if frac.size == 0:
        return out
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_a = np.full(frac.size, np.nan)
    pending = np.arange(frac.size)
    terms = 256  # most orders stop within 256 terms; orders near 1 need thousands (polynomial decay)
    while pending.size:
        if terms > 65536:
            return None
        a = frac[pending][:, None]
        i = np.arange(terms, dtype=float)[None, :]
        coef = binom(a, i)
        with np.errstate(divide="ignore"):
            log_coef = np.log(np.abs(coef))
        j = a - i
        log_t0 = log_coef + i * math.log(q) + j * math.log(1 - q)
        log_t1 = log_coef + j * math.log(q) + i * math.log(1 - q)
        # Opacus: log(0.5) + _log_erfc(x), _log_erfc(x) = log(2) + log_ndtr(-x·√2)
        log_e0 = log_ndtr(-((i - z0) / (math.sqrt(2) * sigma)) * 2**0.5)
        log_e1 = log_ndtr(-((z0 - j) / (math.sqrt(2) * sigma)) * 2**0.5)
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        below = np.maximum(log_s0, log_s1) < -30
        done = below.any(axis=1)
        if done.any():
            used = i <= below.argmax(axis=1)[:, None]
            sign = np.where(coef > 0, 1.0, -1.0)
            parts = []
            for log_s in (log_s0[done], log_s1[done]):
                masked = np.where(used[done], log_s, -np.inf)
                top = masked.max(axis=1, keepdims=True)
                total = (sign[done] * np.exp(masked - top)).sum(axis=1)
                if np.any(total <= 0):
                    return None
                parts.append(top[:, 0] + np.log(total))
            log_a[pending[done]] = np.logaddexp(parts[0], parts[1])
        pending = pending[~done]
        terms *= 4
    out[~integer] = np.maximum(log_a / (frac - 1), 0.0)
    return out


@lru_cache(maxsize=1)
def _integer_order_terms() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Orders α = 2..64 (column), term indices i (row), log C(α, i) and the mask i <= α: they do not
    depend on (σ, q), so they are built once."""
    from scipy.special import gammaln

    alphas = np.arange(2, 65, dtype=float)[:, None]
    i = np.arange(0, 65, dtype=float)[None, :]
    valid = i <= alphas
    safe_i = np.where(valid, i, 0.0)
    log_binom = np.where(valid, gammaln(alphas + 1) - gammaln(safe_i + 1) - gammaln(alphas - safe_i + 1), -np.inf)
    return alphas, safe_i, log_binom, valid


def _rdp_integer_orders(sigma: float, q: float) -> np.ndarray:
    """RDP of one Poisson-subsampled Gaussian step at the integer orders 2..64, vectorised.

    The closed form Opacus evaluates term by term in ``_compute_log_a_for_int_alpha`` (Mironov et
    al. 2019, Sec. 3.3): A_α = Σ_i C(α, i) (1-q)^(α-i) q^i exp((i² - i) / 2σ²), RDP(α) = log A_α / (α - 1).
    All terms are positive, so one log-sum-exp per order gives the same value (to rounding) ~50x faster."""
    alphas, safe_i, log_binom, _ = _integer_order_terms()
    log_terms = (log_binom + safe_i * math.log(q) + (alphas - safe_i) * math.log1p(-q)
                 + (safe_i * safe_i - safe_i) / (2 * sigma**2))
    top = log_terms.max(axis=1)
    log_a = top + np.log(np.exp(log_terms - top[:, None]).sum(axis=1))  # -inf terms (i > α) add 0
    return np.maximum(log_a / (alphas[:, 0] - 1), 0.0)  # RDP >= 0; rounding near q -> 0 must not go below


def _rdp_epsilon(history: Sequence[HistoryEntry], delta: float, orders: tuple[float, ...]) -> float:
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_one_step(sigma, q, orders) * steps for sigma, q, steps in history)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": still a valid bound
        eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
    return float(eps)


# ----------------------------------------------------------------------------------------- PRV
class _PRVTooCostly(RuntimeError):
    pass


def _prv_class():
    from opacus.accountants import PRVAccountant
    from opacus.accountants.analysis.prv import Domain

    class FastDomainPRVAccountant(PRVAccountant):
        """Opacus' PRV accountant with the truncation domain sized by cached integer-order RDP.

        Same formula as ``opacus.accountants.analysis.prv.compute_safe_domain_size`` (remark 5.6 of
        Gopi et al.), only the RDP orders differ: integer orders give an ε bound ≥ the fractional
        one, so L is ≥ Opacus' L and the truncation error bound still holds.
        """

        def _get_domain(self, prvs, num_self_compositions, eps_error, delta_error):
            total = sum(num_self_compositions)
            hist = [(p.noise_multiplier, p.sample_rate, n) for p, n in zip(prvs, num_self_compositions)]
            L = _rdp_epsilon(hist, delta_error / 4, _INTEGER_ORDERS)
            for p in prvs:
                L = max(L, _rdp_epsilon([(p.noise_multiplier, p.sample_rate, 1)], delta_error / (8 * total), _INTEGER_ORDERS))
            L = max(L, eps_error) + 3
            mesh_size = eps_error / np.sqrt(total * np.log(12 / delta_error) / 2)
            if not math.isfinite(L) or 2 * L / mesh_size > PRV_MAX_GRID_POINTS:
                raise _PRVTooCostly(f"PRV grid of {2 * L / mesh_size:.3g} points")
            return Domain.create_aligned(-L, L, mesh_size)

    return FastDomainPRVAccountant


@dataclass(frozen=True)
class EpsilonReport:
    epsilon: float
    kind: str        # what was asked for
    method: str      # what answered: "prv", "rdp", or "rdp-fallback" (PRV could not answer)
    note: str = ""


def epsilon_report(history: Iterable[Sequence], delta: float, kind: str = "prv") -> EpsilonReport:
    """ε after composing ``history`` [(σ, q, steps), …] at ``delta``, by the PRV or RDP accountant."""
    if kind not in ACCOUNTANT_KINDS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANT_KINDS}, got {kind!r}")
    try:
        delta = float(delta)
    except (TypeError, ValueError):
        raise AccountingError(f"delta must be a number in (0, 1), got {delta!r}") from None
    if not (0 < delta < 1):
        raise AccountingError(f"delta must be in (0, 1), got {delta!r}")
    # Sorted: the result does not depend on order, and equal histories share the cache entry.
    return _epsilon_report(tuple(sorted(compress_history(history))), delta, kind)


# -------------------------------------------------------------------------------- ε store
# A deployed school runs every message in a fresh process, so the lru caches here start empty each
# round and a round pays three PRV compositions (0.1-0.3 s each on a loaded 2-core machine) before
# training, and the ledger's RDP bound after it. A school's ε store keeps these results in its own
# state directory — public values only, a composed history of (σ, q, steps) and δ -> ε, next to the
# ledger and with the same trust — and the ClientApp fills it for the next round after its reply has
# gone (client/school_round.py `prepare_next_round`). A result is used only for exactly the history,
# δ and accountant it was composed for.
_EPSILON_STORE: list[Path | None] = [None]
EPSILON_STORE_FILE = "epsilon-store.json"
EPSILON_STORE_LIMIT = 256   # entries kept (the newest); a round adds at most three


@contextmanager
def epsilon_store(state_dir: Path | None) -> Iterator[None]:
    """Inside the block, PRV and RDP results are also kept in (and read from) ``state_dir/epsilon-store.json``
    (None: not at all)."""
    previous = _EPSILON_STORE[0]
    _EPSILON_STORE[0] = None if state_dir is None else Path(state_dir) / EPSILON_STORE_FILE
    try:
        yield
    finally:
        _EPSILON_STORE[0] = previous


def _store_key(hist: tuple[HistoryEntry, ...], delta: float, kind: str) -> str:
    return json.dumps([kind, repr(float(delta)), [[repr(float(s)), repr(float(q)), int(n)] for s, q, n in hist]])


def _read_store(path: Path) -> dict:
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _stored_report(path: Path, key: str, kind: str) -> EpsilonReport | None:
    value = _read_store(path).get(key)
    if not (isinstance(value, list) and len(value) == 3 and isinstance(value[0], float)
            and math.isfinite(value[0]) and value[0] >= 0 and value[1] in ("prv", "rdp", "rdp-fallback")
            and isinstance(value[2], str)):
        return None
    return EpsilonReport(value[0], kind, value[1], value[2])


def _keep_report(path: Path, key: str, report: EpsilonReport) -> None:
    """Add a result to the store (newest last, oldest dropped), written like every file of the state directory
    (temp file, fsync, rename: a crash leaves the old store or the new one). It is a cache: a store that cannot
    be read or written only costs a composition later."""
    try:
        with locked(path):
            stored = _read_store(path)
            stored.pop(key, None)
            stored[key] = [report.epsilon, report.method, report.note]
            atomic_write_text(path, json.dumps(dict(list(stored.items())[-EPSILON_STORE_LIMIT:])))
    except OSError:
        pass


@lru_cache(maxsize=512)
def _epsilon_report(hist: tuple[HistoryEntry, ...], delta: float, kind: str) -> EpsilonReport:
    path = _EPSILON_STORE[0]
    if path is None or not hist:
        return _compose_report(hist, delta, kind)
    key = _store_key(hist, delta, kind)
    stored = _stored_report(path, key, kind)
    if stored is not None:
        return stored
    report = _compose_report(hist, delta, kind)
    if math.isfinite(report.epsilon):
        _keep_report(path, key, report)
    return report


def _compose_report(hist: tuple[HistoryEntry, ...], delta: float, kind: str) -> EpsilonReport:
    if not hist:
        return EpsilonReport(0.0, kind, kind)
    if any(sigma == 0.0 for sigma, _, _ in hist):
        return EpsilonReport(math.inf, kind, kind, "a step without noise (noise_multiplier 0)")
    if any(sigma < SIGMA_FLOOR for sigma, _, _ in hist):
        return EpsilonReport(math.inf, kind, kind, f"noise_multiplier below {SIGMA_FLOOR:g}: counted as no noise")
    note = ""
    if any(sigma > SIGMA_CEILING for sigma, _, _ in hist):
        hist = _clamp_sigma(hist)
        note = f"noise_multiplier above {SIGMA_CEILING:g} accounted as {SIGMA_CEILING:g} (an upper bound)"
    if kind == "rdp":
        return EpsilonReport(_rdp_bound(hist, delta), kind, "rdp", note)
    if len(hist) > PRV_MAX_DISTINCT_PAIRS:
        return EpsilonReport(_rdp_bound(hist, delta), kind, "rdp-fallback",
                             f"{len(hist)} distinct (σ, q) pairs, more than PRV's limit of {PRV_MAX_DISTINCT_PAIRS}; "
                             "RDP bound reported")
    accountant = _prv_class()()
    accountant.history = list(hist)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps = float(accountant.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
    except (_PRVTooCostly, RuntimeError, FloatingPointError, OverflowError, ValueError) as exc:
        return EpsilonReport(_rdp_bound(hist, delta), kind, "rdp-fallback",
                             f"PRV could not answer ({exc}); RDP bound reported")
    if not math.isfinite(eps) or eps < 0:
        return EpsilonReport(_rdp_bound(hist, delta), kind, "rdp-fallback",
                             f"PRV gave {eps}; RDP bound reported")
    return EpsilonReport(eps, kind, "prv", note)


def epsilon_of(history: Iterable[Sequence], delta: float, kind: str = "prv") -> float:
    return epsilon_report(history, delta, kind).epsilon


def _rdp_orders_for(distinct_pairs: int) -> tuple[float, ...]:
    """Opacus' orders, or the integer ones only for histories too long for fractional orders."""
    return _rdp_orders() if distinct_pairs <= PRV_MAX_DISTINCT_PAIRS else _INTEGER_ORDERS


def _rdp_bound(hist: Sequence[HistoryEntry], delta: float) -> float:
    return _rdp_epsilon(hist, delta, _rdp_orders_for(len(hist)))


def _clamp_sigma(hist: tuple[HistoryEntry, ...]) -> tuple[HistoryEntry, ...]:
    merged: dict[tuple[float, float], int] = {}
    for sigma, q, steps in hist:
        key = (min(sigma, SIGMA_CEILING), q)
        merged[key] = merged.get(key, 0) + steps
    return tuple(sorted((s, q, n) for (s, q), n in merged.items()))


class RunningRdp:
    """RDP of a history that grows one entry at a time, in O(1) per entry — what the auditor needs
    to check every entry's ``epsilon_rdp`` of a long history (recomposing each prefix is O(n²)).
    Same orders and per-step RDP as :func:`epsilon_report` with ``kind="rdp"``, same special cases."""

    def __init__(self) -> None:
        self._full_orders = _rdp_orders()
        self._full: np.ndarray | None = np.zeros(len(self._full_orders))  # None once past the pair limit
        self._integer = np.zeros(len(_INTEGER_ORDERS))
        self._pairs: set[tuple[float, float]] = set()
        self._noiseless = False

    def add(self, noise_multiplier: float, sample_rate: float, steps: int) -> None:
        sigma, q, n = _check_entry(noise_multiplier, sample_rate, steps)
        if n == 0 or q == 0.0:
            return
        if sigma < SIGMA_FLOOR:
            self._noiseless = True
            return
        sigma = min(sigma, SIGMA_CEILING)
        self._pairs.add((sigma, q))
        self._integer = self._integer + _rdp_one_step(sigma, q, _INTEGER_ORDERS) * n
        if len(self._pairs) > PRV_MAX_DISTINCT_PAIRS:
            self._full = None
        elif self._full is not None:
            self._full = self._full + _rdp_one_step(sigma, q, self._full_orders) * n

    def epsilon(self, delta: float) -> float:
        from opacus.accountants.analysis.rdp import get_privacy_spent

        if self._noiseless:
            return math.inf
        if not self._pairs:
            return 0.0
        orders, rdp = (self._full_orders, self._full) if self._full is not None else (_INTEGER_ORDERS, self._integer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            eps, _ = get_privacy_spent(orders=list(orders), rdp=rdp, delta=delta)
        return float(eps)


_REGISTERED = "fedfer-prv"


def _register_prv() -> str:
    """Register our PRV (same figures as :func:`epsilon_of`, with its caching and RDP fallback) with
    Opacus, so Opacus' own noise search runs on the budget accountant."""
    from opacus.accountants import register_accountant
    from opacus.accountants.registry import _ACCOUNTANTS

    if _REGISTERED not in _ACCOUNTANTS:
        base = _prv_class()

        class BudgetPRVAccountant(base):
            def get_epsilon(self, delta, **kwargs):
                return epsilon_of(self.history, delta, "prv")

        register_accountant(_REGISTERED, BudgetPRVAccountant)
    return _REGISTERED


@lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: str = "prv", epsilon_tolerance: float = 0.01) -> float:
    """Smallest noise multiplier (within tolerance) such that ``steps`` steps at ``sample_rate``
    stay within ``target_epsilon``: Opacus' ``get_noise_multiplier`` bisection (with a stop, :func:`_bisect_noise`),
    run on the same accountant the budget uses. Raises AccountingError on an impossible target.

    The bisection takes seconds and a deployed school runs every message in a fresh process, so results
    are also kept on disk (:func:`calibration_cache_path`; public values only). A stored σ is used only
    after checking, with the accountant, that it stays within ``target_epsilon``."""
    if accountant not in ACCOUNTANT_KINDS:
        raise AccountingError(f"accountant must be one of {ACCOUNTANT_KINDS}, got {accountant!r}")
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise AccountingError(f"target epsilon must be a positive number, got {target_epsilon!r}")
    _check_entry(1.0, sample_rate, steps)
    if steps == 0 or sample_rate == 0:
        return 0.0
    key = f"{accountant}|{target_epsilon!r}|{delta!r}|{sample_rate!r}|{int(steps)}|{epsilon_tolerance!r}"
    stored = _stored_calibrations().get(key)
    if isinstance(stored, float) and stored > 0 and \
            epsilon_of([(stored, sample_rate, int(steps))], delta, accountant) <= target_epsilon:
        return stored
    sigma = _bisect_noise(target_epsilon, delta, sample_rate, int(steps), accountant, epsilon_tolerance)
    _store_calibration(key, sigma)
    return sigma


#: The bisection stops once σ is known to this relative precision, or after MAX_BISECTION_STEPS halvings, even
#: if ε is not yet within the tolerance. Opacus' loop has no such stop: a target ε the accountant cannot
#: reach as σ → 0 (ε 10^6 at q 0.27; ε 1,000 at q 0.001 and one step) ran for good, in `privacy plan`, the
#: canary audit and every school's round. A normal target ends within the tolerance after 6-20 halvings, at
#: the σ Opacus finds.
SIGMA_PRECISION = 1e-6
MAX_BISECTION_STEPS = 100


def _bisect_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                  epsilon_tolerance: float) -> float:
    """Opacus' ``get_noise_multiplier`` bisection on the same accountant, with a stop (see SIGMA_PRECISION).
    Every σ it returns keeps ε within `target_epsilon`: only the bracket's upper end is ever returned."""
    from opacus.accountants import create_accountant
    from opacus.accountants.utils import MAX_SIGMA

    mechanism = create_accountant(mechanism=_register_prv() if accountant == "prv" else "rdp")

    def epsilon(sigma: float) -> float:
        mechanism.history = [(sigma, sample_rate, steps)]
        return mechanism.get_epsilon(delta=delta)

    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf   # as Opacus: the first σ tried is 20
            while eps_high > target_epsilon:
                sigma_high *= 2
                if sigma_high > MAX_SIGMA:
                    raise ValueError("The privacy budget is too low.")
                eps_high = epsilon(sigma_high)
            halvings = 0
            while (target_epsilon - eps_high > epsilon_tolerance and halvings < MAX_BISECTION_STEPS
                   and sigma_high - sigma_low > SIGMA_PRECISION * sigma_high):
                halvings += 1
                sigma = (sigma_low + sigma_high) / 2
                eps = epsilon(sigma)
                if eps < target_epsilon:
                    sigma_high, eps_high = sigma, eps
                else:
                    sigma_low = sigma
            return float(sigma_high)
    except ValueError as exc:
        raise AccountingError(f"cannot reach epsilon {target_epsilon} at delta {delta} with q={sample_rate}, "
                              f"{steps} steps: {exc}") from exc


def calibration_cache_path() -> Path:
    """``$FEDFER_CACHE_DIR/noise-calibration.json`` (default ``~/.cache/fedfer``)."""
    import os

    return Path(os.environ.get("FEDFER_CACHE_DIR") or Path.home() / ".cache" / "fedfer") / "noise-calibration.json"


def _stored_calibrations() -> dict:
    try:
        stored = json.loads(calibration_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return stored if isinstance(stored, dict) else {}


def _store_calibration(key: str, sigma: float) -> None:
    """Add one result to the on-disk cache; a cache that cannot be written only costs time later."""
    path = calibration_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with locked(path):
            stored = _stored_calibrations()
            stored[key] = sigma
            atomic_write_text(path, json.dumps(stored, sort_keys=True))
    except OSError:
        pass


class SchoolAccountant:
    """One school's accountant history, composed over rounds, runs and data changes.

    The history is a list of (noise_multiplier, sample_rate, steps), one entry per recorded round, in
    the order they happened; ε is computed from it on demand (PRV for the budget, RDP beside it). The
    state also holds the privacy unit and δ of the history once a round was recorded with them.
    """

    def __init__(self, state_dir: Path, school_id: str, fingerprint: str) -> None:
        if not school_id:
            raise AccountingError("school_id must not be empty")
        if len(fingerprint) < 16:
            raise AccountingError(f"dataset fingerprint too short: {fingerprint!r}")
        self.state_dir = Path(state_dir)
        self.school_id = str(school_id)
        self.fingerprint = str(fingerprint)
        self.path = self.state_dir / f"accountant-{self.fingerprint[:16]}.json"
        self.privacy_unit: str | None = None
        self.delta: float | None = None
        self._history: list[HistoryEntry] = self._load()

    def _load(self) -> list[HistoryEntry]:
        if not self.path.exists():
            return []
        try:
            state = json.loads(self.path.read_text(encoding="utf-8"))
        except RecursionError:
            raise AccountingError(f"{self.path}: unreadable accountant state (JSON nested too deeply)") from None
        except (OSError, ValueError) as exc:   # ValueError: not UTF-8, not JSON, an integer of 5,000 digits
            raise AccountingError(f"{self.path}: unreadable accountant state ({exc})") from exc
        if not isinstance(state, dict) or not isinstance(state.get("history"), list):
            raise AccountingError(f"{self.path}: field 'history' missing or not a list")
        if state.get("school_id") != self.school_id:
            raise AccountingError(f"{self.path}: belongs to school {state.get('school_id')!r}, not {self.school_id!r}")
        if state.get("fingerprint") != self.fingerprint:
            raise AccountingError(f"{self.path}: dataset fingerprint {state.get('fingerprint')!r} does not match "
                                  f"{self.fingerprint!r} (same 16-character prefix, different data)")
        history = []
        for i, entry in enumerate(state["history"]):
            if not isinstance(entry, (list, tuple)) or len(entry) != 3:
                raise AccountingError(f"{self.path}: history entry {i} is not [sigma, q, steps]")
            history.append(_check_entry(*entry, where=f"{self.path}: history entry {i}: "))
        self.privacy_unit = state.get("privacy_unit")
        self.delta = state.get("delta")
        return history

    def check_terms(self, privacy_unit: str, delta: float) -> None:
        """Refuse a round whose unit or δ differs from the history's: ε of a mixed history means nothing."""
        if self.privacy_unit is not None and privacy_unit != self.privacy_unit:
            raise AccountingError(f"school {self.school_id}: accountant history is for privacy unit "
                                  f"{self.privacy_unit!r}, not {privacy_unit!r}; units are never mixed")
        if self.delta is not None and float(delta) != float(self.delta):
            raise AccountingError(f"school {self.school_id}: accountant history is kept at δ {self.delta:g}, "
                                  f"not {float(delta):g}; δ is never mixed")

    @property
    def history(self) -> list[HistoryEntry]:
        return list(self._history)

    def epsilon(self, delta: float, kind: str = "prv") -> float:
        return epsilon_of(self._history, delta, kind)

    def epsilon_if(self, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                   kind: str = "prv") -> float:
        """ε the school would have spent after also training (σ, q, steps) — nothing is recorded."""
        planned = _check_entry(noise_multiplier, sample_rate, steps)
        return epsilon_of(self._history + [planned], delta, kind)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int, *, privacy_unit: str | None = None,
               delta: float | None = None) -> None:
        """Append a round to the history and persist it before returning (with its unit and δ, if given)."""
        entry = _check_entry(noise_multiplier, sample_rate, steps)
        with locked(self.path):
            history = self._load() + [entry]  # another process of the school may have recorded meanwhile
            if privacy_unit is not None and delta is not None:
                self.check_terms(privacy_unit, delta)
                self.privacy_unit, self.delta = privacy_unit, float(delta)
            state = {
                "schema": STATE_SCHEMA,
                "school_id": self.school_id,
                "fingerprint": self.fingerprint,
                "history": [list(e) for e in history],
            }
            if self.privacy_unit is not None:
                state.update(privacy_unit=self.privacy_unit, delta=self.delta)
            atomic_write_text(self.path, json.dumps(state, indent=1) + "\n")
        self._history = history
