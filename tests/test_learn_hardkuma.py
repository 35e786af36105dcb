"""HardKuma math (SPEC 4): the support, the point masses and expected L0 against Monte
Carlo, the Kumaraswamy mean, and gradients of the reparameterised sample in a and b."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from lychee_fx.learn import hardkuma as K

positive = st.floats(min_value=0.05, max_value=20.0)
moderate = st.floats(min_value=0.2, max_value=5.0)
unit = st.floats(min_value=0.0, max_value=1.0)


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


@given(a=positive, b=positive, u=unit)
def test_samples_lie_in_the_unit_interval(a, b, u):
    s = K.kumaraswamy_sample(_t(a), _t(b), _t(u))
    z = K.hardkuma_sample(_t(a), _t(b), _t(u))
    assert 0.0 <= float(s) <= 1.0, f"kumaraswamy sample {float(s)} for a={a}, b={b}, u={u}"
    assert 0.0 <= float(z) <= 1.0, f"hardkuma sample {float(z)} for a={a}, b={b}, u={u}"


@given(a=moderate, b=moderate, seed=st.integers(0, 2**31 - 1))
def test_point_masses_expected_l0_and_mean_match_monte_carlo(a, b, seed):
    n = 20_000
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    at, bt = _t(a), _t(b)
    s = K.kumaraswamy_sample(at, bt, u)
    z = K.hardkuma_sample(at, bt, u)
    for name, observed, expected in (
        ("P(z = 0)", (z == 0).double().mean(), K.prob_closed(at, bt)),
        ("P(z = 1)", (z == 1).double().mean(), K.prob_open_fully(at, bt)),
        ("E[L0] = P(z > 0)", (z > 0).double().mean(), K.expected_l0(at, bt)),
    ):
        p = float(expected)
        tol = 5 * math.sqrt(max(p * (1 - p), 1e-4) / n)
        assert abs(float(observed) - p) <= tol, f"{name}: Monte Carlo {float(observed):.5f}, formula {p:.5f} (a={a}, b={b})"
    mean, sd = float(s.mean()), float(s.std())
    assert abs(mean - float(K.kumaraswamy_mean(at, bt))) <= 5 * sd / math.sqrt(n) + 1e-9, (
        f"Kumaraswamy mean: Monte Carlo {mean:.5f}, formula {float(K.kumaraswamy_mean(at, bt)):.5f}"
    )


def test_closed_forms_at_a_equals_b_equals_1():
    one = _t(1.0)
    assert float(K.prob_closed(one, one)) == pytest.approx(1 / 12)
    assert float(K.prob_open_fully(one, one)) == pytest.approx(1 / 12)
    assert float(K.expected_l0(one, one)) == pytest.approx(11 / 12)
    assert float(K.kumaraswamy_mean(one, one)) == pytest.approx(0.5)


@given(a=moderate, b=moderate, u=st.floats(min_value=0.01, max_value=0.99))
def test_reparameterised_sample_is_differentiable_in_a_and_b(a, b, u):
    s = float(K.kumaraswamy_sample(_t(a), _t(b), _t(u)))
    assume(1 / 12 + 0.01 < s < 11 / 12 - 0.01)  # inside the stretch: z is not clamped
    at = _t(a).requires_grad_(True)
    bt = _t(b).requires_grad_(True)
    ut = _t(u)
    assert torch.autograd.gradcheck(lambda x, y: K.hardkuma_sample(x, y, ut), (at, bt))
    (ga, gb) = torch.autograd.grad(K.hardkuma_sample(at, bt, ut), (at, bt))
    assert float(ga) > 0, f"dz/da must be positive (larger a pushes s up), got {float(ga)}"
    assert float(gb) < 0, f"dz/db must be negative (larger b pushes s down), got {float(gb)}"


@given(a=moderate, b=moderate)
def test_density_formulas_are_differentiable(a, b):
    at = _t(a).requires_grad_(True)
    bt = _t(b).requires_grad_(True)
    assert torch.autograd.gradcheck(K.expected_l0, (at, bt))
    assert torch.autograd.gradcheck(K.kumaraswamy_mean, (at, bt))


def test_gates_force_units_open_and_count_them_in_the_density():
    forced = torch.zeros(3, 2, dtype=torch.bool)
    forced[0] = True
    gates = K.HardKumaGates(3, 2, forced=forced)
    z = gates.sample(torch.Generator().manual_seed(0))
    assert z.shape == (3, 2)
    assert torch.equal(z[0], torch.ones(2))
    assert float(gates.density().detach()) == pytest.approx((2 + 4 * 11 / 12) / 6)
    assert torch.equal(gates.mean()[0], torch.ones(2))
    assert torch.allclose(gates.mean()[1:], torch.full((2, 2), 0.5))
    z.sum().backward()
    assert gates.log_a.grad is not None and torch.all(gates.log_a.grad[0] == 0)


def test_gates_reject_a_forced_table_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"forced must be a bool tensor of shape \(3, 2\), got torch.bool \(2, 3\)"):
        K.HardKumaGates(3, 2, forced=torch.zeros(2, 3, dtype=torch.bool))
