"""A method's run charged to the party's lifetime ledger: written before, checked after."""

from __future__ import annotations

import math
from typing import Any

from fedpsg.budget.ledger import Ledger
from fedpsg.budget.policy import PartyPolicy
from fedpsg.dp.accounting import PrivacyRecord
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
        release = method.run(stage, config, secret)
        _check_as_planned(method.name, planned, release.privacy)
    return release


def _check_as_planned(method: str, planned: PrivacyRecord, spent: PrivacyRecord) -> None:
    """A release whose mechanism differs from what the ledger holds must not leave the party."""
    same = (
        math.isclose(planned.noise_multiplier, spent.noise_multiplier, rel_tol=1e-9)
        and math.isclose(planned.sample_rate, spent.sample_rate, rel_tol=1e-12)
        and planned.steps == spent.steps
        and planned.adjacency == spent.adjacency
    )
    if not same:
        raise RuntimeError(f"{method} spent {spent} but planned {planned}: the release is withheld")
