"""Accounting: our numbers are dp-accounting's, and match published tables."""

import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp

from privlm.privacy import Ledger, calibrate_noise_multiplier, epsilon, epsilon_for, round_event
from privlm.privacy.accountant import PLD_DISCRETIZATION
from privlm.privacy.ledger import compose_events, event_from_dict, event_to_dict

# McMahan, Ramage, Talwar, Zhang 2018 ("Learning differentially private recurrent
# language models"), Table 1: (K users, C expected per round, z) -> eps at T rounds, delta = K^-1.1.
MCMAHAN_2018 = {
    (1e5, 1e2, 1.0): [0.697, 0.700, 0.725, 0.774, 0.884],
    (1e6, 1e3, 1.0): [0.892, 0.895, 0.919, 0.985, 1.095],
    (1e6, 1e3, 3.0): [0.162, 0.162, 0.163, 0.166, 0.200],
    (1e6, 1e4, 1.0): [1.366, 1.472, 1.682, 2.634, 7.808],
}


@pytest.mark.parametrize("row", list(MCMAHAN_2018))
def test_mcmahan_2018_table1_rdp(row):
    K, C, z = row
    for T, expected in zip([1, 10, 100, 1000, 10000], MCMAHAN_2018[row]):
        got = epsilon(C / K, z, T, K**-1.1, kind="rdp")
        assert abs(got - expected) <= 0.005, (row, T, got, expected)


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_epsilon_equals_direct_dp_accounting(kind):
    q, z, T, d = 0.01, 1.1, 300, 1e-6
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION) if kind == "pld" else rdp.RdpAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), T)
    assert epsilon(q, z, T, d, kind) == pytest.approx(acc.get_epsilon(d), rel=1e-12)


def test_cached_round_pld_gives_the_stock_accountants_epsilon_to_the_bit():
    """privlm caches a round's base PLD; every epsilon must still be the stock PLDAccountant's."""
    ledgers = [
        [round_event(1.0, 0.5)] * 5,
        [round_event(0.02, 0.9)] * 30 + [round_event(0.02, 1.3)] * 20 + [round_event(0.02, 0.9)],
        [round_event(0.3, 2.0), dp_accounting.GaussianDpEvent(4.0), round_event(0.3, 2.0)],
    ]
    for _ in range(2):  # the second pass is served from the cache
        for events in ledgers:
            stock = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
            stock.compose(compose_events(events))  # the ledger's event, composed by the stock class
            assert epsilon_for(events, 1e-5, "pld") == stock.get_epsilon(1e-5)
    # a zero sampling rate or zero noise still goes to the stock rules (free, resp. infinite)
    assert epsilon_for([round_event(0.0, 1.0)], 1e-5) == 0.0
    assert epsilon_for([round_event(0.1, 0.0)], 1e-5) == math.inf


def _stock(q: float, z: float, T: int, delta: float, interval: float = 1e-4) -> float:
    """dp-accounting's PLDAccountant at its default discretization (1e-4), untouched."""
    acc = pld.PLDAccountant() if interval == 1e-4 else pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dp_accounting.SelfComposedDpEvent(round_event(q, z), T))
    return acc.get_epsilon(delta)


def test_the_old_coarse_grid_overstated_epsilon_where_dp_fl_lives():
    """Issue #18.6: at q = 0.002, z = 1.3, T = 5,000, delta = 1e-7 the 1e-3 grid said 0.61295;
    the stock accountant at its default grid says 0.59828, and so must privlm."""
    q, z, T, d = 0.002, 1.3, 5000, 1e-7
    stock = _stock(q, z, T, d)
    assert _stock(q, z, T, d, interval=1e-3) > stock * 1.02  # what privlm reported before
    assert epsilon(q, z, T, d) == stock == pytest.approx(0.59828, abs=1e-5)
    assert PLD_DISCRETIZATION == 1e-4


# q in [1e-4, 1], z in [0.3, 10]; T kept small enough for CI (benchmarks/accounting.py runs
# the full grid, T up to 10,000).
GRID = [(q, z, T) for q in (1e-4, 0.01, 1.0) for z in (0.3, 1.0, 10.0) for T in (1, 40)] + [
    (0.002, 1.3, 2000), (0.02, 0.46, 50), (0.05, 0.56, 40), (0.2, 2.0, 10)]


@pytest.mark.parametrize("q,z,T", GRID)
def test_epsilon_is_the_stock_accountants_at_its_default_grid(q, z, T):
    assert epsilon(q, z, T, 1e-6) == _stock(q, z, T, 1e-6)


def test_epsilon_never_decreases_with_rounds():
    """What BudgetCheck's bisection relies on, on dp-accounting's numbers."""
    for q, z in [(1.0, 0.5), (0.02, 0.46), (0.3, 3.0), (1e-3, 0.3)]:
        eps = [epsilon(q, z, t, 1e-5) for t in range(1, 9)]
        assert all(a <= b for a, b in zip(eps, eps[1:])), (q, z)


@pytest.mark.parametrize("budget", [pytest.param(0.5, marks=pytest.mark.heavy), 2.0, 7.9, 1e6])  # (0.5: 20 s, CI time)
def test_budget_check_allows_exactly_what_a_round_by_round_check_allows(budget):
    from privlm.privacy.accountant import BudgetCheck

    prefix = [round_event(0.05, 0.8)] * 3
    event = round_event(0.05, 1.1)
    check = BudgetCheck(prefix, event, 1e-5, "pld", budget, horizon=40)
    brute = [epsilon_for([*prefix, *[event] * n], 1e-5) <= budget for n in range(1, 41)]
    assert [check.allows(n) for n in range(1, 41)] == brute
    assert check.evaluations <= 8  # log2(40) + 1 accountant calls, not 40
    assert BudgetCheck(prefix, event, 1e-5, "pld", None, horizon=40).allows(40)


def test_ledger_epsilon_equals_round_by_round_composition():
    led = Ledger()
    for r in range(1, 51):
        led.append(r, round_event(0.02, 0.9 if r <= 30 else 1.3))
    acc = pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    acc.compose(round_event(0.02, 0.9), 30).compose(round_event(0.02, 1.3), 20)
    assert epsilon_for(led, 1e-5, "pld") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)


def test_pld_is_tighter_than_rdp():
    args = (0.01, 1.0, 1000, 1e-6)
    assert epsilon(*args, kind="pld") < epsilon(*args, kind="rdp")


def test_epsilon_monotone_in_rounds_q_and_inverse_z():
    base = dict(sampling_rate=0.01, noise_multiplier=1.0, rounds=100, delta=1e-6)
    e0 = epsilon(**base)
    assert epsilon(**{**base, "rounds": 200}) > e0
    assert epsilon(**{**base, "sampling_rate": 0.02}) > e0
    assert epsilon(**{**base, "noise_multiplier": 0.8}) > e0
    assert epsilon(**{**base, "rounds": 0}) == 0.0


@pytest.mark.parametrize("kind", ["pld", "rdp"])
def test_calibration_is_smallest_z_meeting_target(kind):
    q, T, d, target = 0.05, 50, 1e-5, 3.0
    z = calibrate_noise_multiplier(target, q, T, d, kind, tol=1e-3)
    assert epsilon(q, z, T, d, kind) <= target
    assert epsilon(q, z - 1e-3, T, d, kind) > target  # the smallest multiple of tol that meets it
    assert round(z / 1e-3, 9).is_integer()


@pytest.mark.parametrize("coarse, fine", [
    (0.8000, 0.7963),   # the coarse answer a little above: galloping down, then bisection
    (0.8000, 0.8000),   # on a grid point
    (0.7000, 0.7412),   # the coarse answer below the fine one: the climb, then bisection
    (0.0500, 0.0500),   # the floor meets the target on both grids
    (0.0500, 0.0731),   # the floor meets it on the coarse grid only
    (2.5000, 0.0520),   # far above: galloping all the way to the floor's neighbourhood
])
def test_the_fine_search_returns_the_smallest_checked_multiple_of_tol(monkeypatch, coarse, fine):
    """Every path of the search, on a step-shaped epsilon: the answer is the smallest multiple of
    tol at or above the fine grid's threshold, and was itself evaluated on the fine grid."""
    import math as _math

    from privlm.privacy import accountant as acc

    fine_calls: list[float] = []

    def fake_epsilon(q, z, T, d, kind="pld", interval=acc.PLD_DISCRETIZATION):
        if interval == acc.PLD_DISCRETIZATION:
            fine_calls.append(z)
        return 1.0 if z >= (fine if interval == acc.PLD_DISCRETIZATION else coarse) else 10.0

    monkeypatch.setattr(acc, "epsilon", fake_epsilon)
    monkeypatch.setattr(acc.dp_accounting, "calibrate_dp_mechanism", lambda *a, **k: coarse)
    z = acc.calibrate_noise_multiplier.__wrapped__(5.0, 0.1, 10, 1e-5, "pld")
    assert z == round(_math.ceil(round(fine / 1e-4, 6)) * 1e-4, 12) and z in fine_calls
    assert len(fine_calls) <= 40


def test_ledger_json_roundtrip_and_allow_list():
    led = Ledger()
    led.append(1, round_event(0.1, 1.0))
    led.append(2, dp_accounting.NonPrivateDpEvent())
    back = Ledger.from_list(led.to_list())
    assert back.events == led.events
    d = event_to_dict(round_event(0.1, 1.0))
    assert event_from_dict(d) == round_event(0.1, 1.0)
    with pytest.raises(ValueError, match="unsupported"):
        event_from_dict({"class": "os.system", "command": "rm -rf /"})
    with pytest.raises(ValueError, match="unknown fields"):
        event_from_dict({**d, "extra": 1})
    with pytest.raises(ValueError, match="increase"):
        led.append(2, round_event(0.1, 1.0))


def test_nonprivate_event_gives_infinite_epsilon():
    assert math.isinf(epsilon_for([dp_accounting.NonPrivateDpEvent()], 1e-5))
