"""A method's run charged to the party's lifetime ledger: written before it runs."""

from __future__ import annotations

from typing import Any

from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy
from fedpsg.dp.secret import SecretRandomness
from fedpsg.methods import Method, PartyStage, Release


def charged_run(
    method: Method,
    stage: PartyStage,
    config: Any,
    ledger: Ledger,
    policy: PartyPolicy,
    purpose: str,
    secret: SecretRandomness | None = None,
) -> Release:
    """Run ``method`` on ``stage`` after writing its planned cost to ``ledger`` (refused if it does not fit).

    The plan uses only public facts (sizes, config, budget), so the refusal comes before the method
    computes anything on the data.
    """
    planned = method.plan(stage, config)
    with ledger.release(planned, policy, method=method.name, purpose=purpose):
        return method.run(stage, config, secret, planned=planned)  # withheld (raises) unless it spends that
