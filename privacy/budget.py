"""The budget guard: before a round, would training it push the school past its lifetime ε budget?

The check uses the same accountant and the same function as the ledger's ε, so a school that is
allowed ends the round at ``epsilon_after <= budget`` exactly as recorded, and the first round that
would cross the budget is refused with reason ``budget-exhausted`` (the server stops selecting it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

from privacy.accounting import SchoolAccountant, epsilon_of

BUDGET_EXHAUSTED = "budget-exhausted"


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_after: float   # ε if the planned round is trained
    reason: str            # "" when allowed, else "budget-exhausted"
    _epsilon_now: Callable[[], float] = field(repr=False, compare=False, default=lambda: math.nan)

    @property
    def epsilon_now(self) -> float:
        """ε before the planned round. Computed on demand: the decision does not need it, and a deployed
        school runs every round in a fresh process, where each accountant call costs a PRV composition."""
        return self._epsilon_now()


def check_budget(acct: SchoolAccountant, planned: Sequence, delta: float, budget: float | None,
                 accountant: str = "prv") -> BudgetDecision:
    """``planned`` = (noise_multiplier, sample_rate, steps) of the round about to be trained.
    ``budget`` None or inf means no limit (ε is still computed and reported)."""
    sigma, q, steps = planned
    if budget is not None and (math.isnan(budget) or budget < 0):
        raise ValueError(f"privacy budget must be >= 0, got {budget!r}")
    history = acct.history
    eps_after = acct.epsilon_if(sigma, q, steps, delta, kind=accountant)
    limit = math.inf if budget is None else float(budget)
    allowed = eps_after <= limit
    return BudgetDecision(allowed=allowed, epsilon_after=eps_after, reason="" if allowed else BUDGET_EXHAUSTED,
                          _epsilon_now=lambda: epsilon_of(history, delta, accountant))
