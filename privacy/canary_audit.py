"""Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023, arXiv 2305.08846).

m canaries are each included in the training data by an independent fair coin. After training, an
auditor scores every canary (here: minus its loss under the final model, black-box), guesses "in" for
the k₊ highest scores and "out" for the k₋ lowest, and abstains on the rest. If training is (ε, δ)-DP,
the number of correct guesses v out of r = k₊ + k₋ is stochastically dominated by Binomial(r, e^ε/(1+e^ε))
up to a δ term (the paper's Theorem 3.1 with Proposition 5.2 / the algorithm of its Appendix D):

    P[V ≥ v] ≤ P[Binom(r, p_ε) ≥ v] + 2·m·δ · max_{i=1..v} P[v−i ≤ Binom(r, p_ε) < v] / i ,  p_ε = 1/(1+e^{−ε}).

The largest ε for which that p-value stays below β is a lower bound on the true ε with confidence 1−β.
If several guess counts k are tried, β is split among them (Bonferroni), so the maximum over k is still
a valid 1−β bound. A correct DP-SGD implementation can never give a lower bound above its claimed ε
(except with probability β); a non-private one memorises the canaries and gives a large bound. The control (DP off) keeps the clipping and drops
the noise, so the two runs differ only in σ.

The harness (:func:`run_canary_audit`) trains one school's data plus the included canaries with
:class:`privacy.student_dp.PrivateTrainer` — the same code path as the clients, each canary its own
privacy unit — at a calibrated ε, or with DP off (σ = 0) as the control.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
from scipy import stats


# ------------------------------------------------------------------------------------- statistics
def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Probability of ≥ v correct out of r guesses on m canaries under an (ε, δ)-DP mechanism."""
    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError(f"need eps >= 0 and delta in [0, 1], got {eps}, {delta}")
    p = 1.0 / (1.0 + math.exp(-eps))
    tail = float(stats.binom.sf(v - 1, r, p))          # P[Binom(r, p) >= v]
    if v == 0 or delta == 0:
        return min(1.0, tail)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)   # P[=v-1], P[=v-2], …, P[=0]
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(1.0, tail + alpha * delta * 2 * m)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05, iterations: int = 40) -> float:
    """Largest ε whose p-value is below β: (ε, δ)-DP is rejected at confidence 1−β for every smaller ε.
    Returns 0 when even ε = 0 cannot be rejected."""
    if not (0 < beta < 1):
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e4:
            return math.inf
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass
class AuditBound:
    epsilon_lb: float
    confidence: float
    m: int
    r: int             # guesses made (k₊ + k₋)
    v: int             # correct guesses
    k: int             # guesses on each side (k₊ = k₋ = k) of the best k
    ks_tried: list[int]
    delta: float


def guesses_from_scores(scores: Sequence[float], k_pos: int, k_neg: int) -> np.ndarray:
    """+1 ("in") for the k_pos highest scores, −1 ("out") for the k_neg lowest, 0 abstain."""
    scores = np.asarray(scores, dtype=float)
    if k_pos + k_neg > len(scores):
        raise ValueError(f"{k_pos} + {k_neg} guesses exceed the {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    guesses = np.zeros(len(scores), dtype=int)
    if k_neg:
        guesses[order[:k_neg]] = -1
    if k_pos:
        guesses[order[len(scores) - k_pos:]] = 1
    return guesses


def audit_scores(scores: Sequence[float], included: Sequence[bool], delta: float, beta: float = 0.05,
                 ks: Sequence[int] | None = None) -> AuditBound:
    """The one-run lower bound from canary scores (higher = more likely a member) and the coin flips.

    ``ks``: guess counts per side to try (default: 5 %, 10 %, 20 %, 30 % and 50 % of m); β is split
    evenly among them, so the reported maximum is a valid (1−β)-confidence bound.
    """
    scores = np.asarray(scores, dtype=float)
    truth = np.where(np.asarray(included, dtype=bool), 1, -1)
    m = len(scores)
    if m == 0 or len(truth) != m:
        raise ValueError(f"need one score per canary: {m} scores, {len(truth)} inclusion flags")
    if ks is None:
        ks = sorted({max(1, int(m * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.5)})
    ks = [k for k in ks if 2 * k <= m]
    if not ks:
        raise ValueError(f"too few canaries ({m}) to guess")
    best = None
    for k in ks:
        guesses = guesses_from_scores(scores, k, k)
        r = int(np.count_nonzero(guesses))
        v = int(np.sum(guesses == truth))
        eps = epsilon_lower_bound(m, r, v, delta, beta / len(ks))
        if best is None or eps > best.epsilon_lb:
            best = AuditBound(eps, 1 - beta, m, r, v, k, list(ks), delta)
    assert best is not None
    return best


# ------------------------------------------------------------------------------------- harness
@dataclass
class CanaryAuditResult:
    dp: bool
    claimed_epsilon: float          # the accountant's ε for what was trained (inf without DP)
    bound: AuditBound
    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: int
    canaries: int
    included: int
    base_frames: int
    units: int
    canary_loss_in: float           # mean loss of included canaries
    canary_loss_out: float          # mean loss of excluded canaries
    seconds: float
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["claimed_epsilon"] = None if math.isinf(self.claimed_epsilon) else self.claimed_epsilon
        return out


def make_canaries(m: int, shape: tuple[int, ...], num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """m random-pattern images in [-1, 1] (independent ±1 blocks of 4×4 pixels: far from any face, so
    the model can only fit them by memorising), a random label each, and the fair-coin inclusion."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    blocks = rng.choice([-1.0, 1.0], size=(m, c, (h + 3) // 4, (w + 3) // 4))
    images = np.repeat(np.repeat(blocks, 4, axis=2), 4, axis=3)[:, :, :h, :w].astype(np.float32)
    labels = rng.integers(0, num_classes, size=m)
    included = rng.random(m) < 0.5
    return images, labels, included


def run_canary_audit(base_x, base_y, base_units: Sequence[str] | None, model_builder: Callable[[], "object"], *,
                     canaries: int = 500, epsilon: float | None = 8.0, delta: float = 1e-5, epochs: int = 10,
                     units_per_batch: int = 32, frames_per_unit: int = 4, max_grad_norm: float = 1.0,
                     lr: float = 0.5, beta: float = 0.05, seed: int = 0, num_classes: int = 7,
                     progress: Callable[[str], None] | None = None) -> CanaryAuditResult:
    """Train once on base data + included canaries; bound ε from the canaries' losses.

    ``base_x`` float tensor (N, C, H, W) in model input form, ``base_y`` int labels (N,), ``base_units``
    one unit id per frame (student) or None (image). ``epsilon=None`` trains without DP (the control).
    """
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from privacy.accounting import calibrate_noise, epsilon_of
    from privacy.planner import sampling
    from privacy.student_dp import PrivateTrainer

    started = time.perf_counter()
    say = progress or (lambda s: None)
    images, labels, included = make_canaries(canaries, tuple(base_x.shape[1:]), num_classes, seed)
    cx, cy = torch.from_numpy(images), torch.from_numpy(labels).long()
    inc = torch.from_numpy(included)
    x = torch.cat([base_x, cx[inc]])
    y = torch.cat([base_y.long(), cy[inc]])
    n_inc = int(inc.sum())
    if base_units is not None:
        units = list(base_units) + [f"canary-{i}" for i in np.flatnonzero(included)]
        n_units = len(set(units))
    else:
        units, n_units = None, len(y)
    q, per_epoch = sampling(n_units, units_per_batch)
    steps = epochs * per_epoch
    if epsilon is None:  # the control: same clipping, no noise
        sigma, clip, claimed = 0.0, max_grad_norm, math.inf
    else:
        say(f"calibrating σ for ε={epsilon} (q={q:.4g}, {steps} steps)")
        sigma, clip = calibrate_noise(epsilon, delta, q, steps), max_grad_norm
        claimed = epsilon_of([(sigma, q, steps)], delta)
    torch.manual_seed(seed)
    model = model_builder()
    trainer = PrivateTrainer(model, torch.optim.SGD(model.parameters(), lr=lr), TensorDataset(x, y), units,
                             units_per_batch=units_per_batch, frames_per_unit=frames_per_unit,
                             noise_multiplier=sigma, max_grad_norm=clip, seed=seed, reproducible=True)

    def loss_fn(mdl, xb, yb):
        return nn.functional.cross_entropy(_logits(mdl(xb)), yb, reduction="none")

    for epoch in range(epochs):
        st = trainer.train_epoch(loss_fn)
        say(f"epoch {epoch + 1}/{epochs}: loss {st['loss']:.3f} ({st['steps']} steps)")
    trainer.close()
    model.eval()
    with torch.no_grad():
        losses = nn.functional.cross_entropy(_logits(model(cx)), cy, reduction="none").numpy()
    bound = audit_scores(-losses, included, delta, beta)
    return CanaryAuditResult(
        dp=epsilon is not None, claimed_epsilon=claimed, bound=bound, noise_multiplier=sigma, sample_rate=q,
        steps=steps, epochs=epochs, canaries=canaries, included=n_inc, base_frames=len(base_y), units=n_units,
        canary_loss_in=float(losses[included].mean()) if n_inc else math.nan,
        canary_loss_out=float(losses[~included].mean()) if n_inc < canaries else math.nan,
        seconds=time.perf_counter() - started,
        settings=dict(delta=delta, units_per_batch=units_per_batch, frames_per_unit=frames_per_unit,
                      max_grad_norm=max_grad_norm, lr=lr, beta=beta, seed=seed,
                      unit="student" if base_units is not None else "image"),
    )


def _logits(out):
    """Models of the zoo return an output object with ``.logits``; plain modules return the tensor."""
    return getattr(out, "logits", out)


def tiny_model_builder(shape: tuple[int, int, int], num_classes: int = 7, hidden: int = 256):
    """A small MLP for the harness: enough capacity to memorise canaries without DP, fast on a CPU."""
    from torch import nn

    c, h, w = shape

    def build():
        return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    return build
