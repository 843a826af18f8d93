"""The budget guard: before a round, would training it push the school past its lifetime ε budget?

The check uses the same accountant and the same function as the ledger's ε, so a school that is
allowed ends the round at ``epsilon_after <= budget`` exactly as recorded, and the first round that
would cross the budget is refused with reason ``budget-exhausted`` (the server stops selecting it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from privacy.accounting import SchoolAccountant

BUDGET_EXHAUSTED = "budget-exhausted"


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_now: float
    epsilon_after: float   # ε if the planned round is trained
    reason: str            # "" when allowed, else "budget-exhausted"


def check_budget(acct: SchoolAccountant, planned: Sequence, delta: float, budget: float | None,
                 accountant: str = "prv") -> BudgetDecision:
    """``planned`` = (noise_multiplier, sample_rate, steps) of the round about to be trained.
    ``budget`` None or inf means no limit (ε is still computed and reported)."""
    sigma, q, steps = planned
    if budget is not None and (math.isnan(budget) or budget < 0):
        raise ValueError(f"privacy budget must be >= 0, got {budget!r}")
    eps_now = acct.epsilon(delta, kind=accountant)
    eps_after = acct.epsilon_if(sigma, q, steps, delta, kind=accountant)
    limit = math.inf if budget is None else float(budget)
    allowed = eps_after <= limit
    return BudgetDecision(allowed=allowed, epsilon_now=eps_now, epsilon_after=eps_after,
                          reason="" if allowed else BUDGET_EXHAUSTED)
