import math

import dp_accounting
import pytest

from fedpsg.dp.accounting import (
    RDP_ORDERS,
    PrivacyRecord,
    best_rdp_order,
    calibrate_noise,
    epsilon_spent,
    private_record,
)

# (epsilon, sample rate, steps): the paper's stage (20k steps at B=256 over ~12k images), the
# CPU profile, and a one-shot release (DP-Merf).
SETTINGS = [(10.0, 256 / 12000, 20000), (1.0, 256 / 12000, 20000), (10.0, 128 / 11339, 1000), (1.0, 1.0, 1)]


@pytest.mark.parametrize("epsilon,q,steps", SETTINGS)
def test_calibrated_sigma_spends_exactly_the_target(epsilon, q, steps):
    sigma = calibrate_noise(epsilon, 1e-5, q, steps)
    spent = epsilon_spent(sigma, q, steps, 1e-5)
    assert spent <= epsilon
    assert spent == pytest.approx(epsilon, rel=1e-3)
    # a slightly smaller sigma would overspend: the calibration is tight
    assert epsilon_spent(sigma * 0.99, q, steps, 1e-5) > epsilon


@pytest.mark.parametrize("epsilon,q,steps", SETTINGS)
def test_optimal_rdp_order_is_inside_the_grid(epsilon, q, steps):
    sigma = calibrate_noise(epsilon, 1e-5, q, steps)
    order = best_rdp_order(sigma, q, steps, 1e-5)
    assert RDP_ORDERS[0] < order < RDP_ORDERS[-1]


@pytest.mark.parametrize("epsilon,q,steps", SETTINGS[:3])
def test_agrees_with_google_dp_accounting(epsilon, q, steps):
    sigma = calibrate_noise(epsilon, 1e-5, q, steps)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(event)
    assert accountant.get_epsilon(1e-5) == pytest.approx(epsilon, rel=0.02)
    pld = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-3)
    pld.compose(event)
    # PLD is tighter than RDP: never above, and not wildly below
    assert 0.5 * epsilon < pld.get_epsilon(1e-5) <= epsilon * 1.01


def test_one_shot_gaussian_matches_closed_form_direction():
    # For a single release, more noise means less epsilon, and the classical bound
    # sigma >= sqrt(2 ln(1.25/delta)) / eps (valid for eps < 1) is never beaten by much.
    sigma = calibrate_noise(0.5, 1e-5, 1.0, 1)
    classical = math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    assert 0.5 * classical < sigma <= classical


def test_prv_accountant_round_trips():
    sigma = calibrate_noise(10.0, 1e-5, 0.01, 500, accountant="prv")
    assert epsilon_spent(sigma, 0.01, 500, 1e-5, "prv") == pytest.approx(10.0, rel=2e-3)
    # PRV is tighter than RDP, so it needs less noise for the same budget
    assert sigma < calibrate_noise(10.0, 1e-5, 0.01, 500, accountant="rdp")


def test_non_private_and_invalid_budgets():
    assert calibrate_noise(math.inf, 1e-5, 0.01, 100) == 0.0
    assert private_record(math.inf, 1e-5, 0.01, 100).epsilon == math.inf
    for eps, delta in [(0, 1e-5), (-1, 1e-5), (1, 0), (1, 1), (float("nan"), 1e-5)]:
        with pytest.raises(ValueError):
            calibrate_noise(eps, delta, 0.01, 100)
    with pytest.raises(ValueError):
        epsilon_spent(1.0, 0.01, 100, 1e-5, accountant="moments")


def test_record_round_trips_through_dict():
    record = private_record(10.0, 1e-5, 0.02, 100, max_grad_norm=0.1)
    assert PrivacyRecord.from_dict(record.to_dict()) == record
    assert record.epsilon == pytest.approx(10.0, rel=1e-3)
