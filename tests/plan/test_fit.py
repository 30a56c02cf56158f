"""The power-law fit of loss against compute: recovers a known law, says how uncertain an
extrapolation is, fits only the compute frontier, and refuses too few points."""

import math

import numpy as np
import pytest

from bloomrun.plan.fit import T_975, Point, fit_power_law, frontier


def law(compute, a=60.0, b=0.05):
    return a * compute ** -b


def test_exact_power_law_is_recovered():
    points = [Point(c, law(c), "run", i) for i, c in enumerate(np.logspace(18, 21, 6))]
    fit = fit_power_law(points)
    assert fit.a == pytest.approx(60.0, rel=1e-9) and fit.b == pytest.approx(0.05, rel=1e-9)
    predicted = fit.predict(1e24)
    assert predicted.loss == pytest.approx(law(1e24), rel=1e-9)
    assert predicted.low == pytest.approx(predicted.loss, rel=1e-6) == predicted.high  # no scatter, no spread


def test_noisy_law_is_fitted_as_numpy_polyfit_does_and_the_interval_widens_with_distance():
    rng = np.random.default_rng(0)
    computes = np.logspace(18, 21, 12)
    losses = law(computes) * np.exp(rng.normal(0, 0.02, computes.size))
    # Make every point a frontier point: losses falling with compute (the law falls faster than the noise).
    points = [Point(c, l, f"run{i}", 100) for i, (c, l) in enumerate(zip(computes, np.minimum.accumulate(losses)))]
    fit = fit_power_law(points)
    slope, intercept = np.polyfit(np.log(computes), np.log(np.minimum.accumulate(losses)), 1)
    assert fit.b == pytest.approx(-slope, rel=1e-9) and fit.a == pytest.approx(math.exp(intercept), rel=1e-9)
    assert fit.b == pytest.approx(0.05, abs=0.01)
    near, far = fit.predict(1e21), fit.predict(1e24)
    assert near.low < near.loss < near.high
    assert math.log(far.high / far.low) > math.log(near.high / near.low)  # extrapolating costs certainty
    assert far.low < law(1e24) < far.high


def test_prediction_interval_by_hand():
    # Three points, one degree of freedom: t = 12.706.
    points = [Point(1e18, 4.0, "a", 1), Point(1e19, 3.5, "b", 1), Point(1e20, 3.2, "c", 1)]
    fit = fit_power_law(points)
    x = np.column_stack([np.ones(3), np.log([1e18, 1e19, 1e20])])
    y = np.log([4.0, 3.5, 3.2])
    coef = np.linalg.solve(x.T @ x, x.T @ y)
    s = math.sqrt(float(((y - x @ coef) ** 2).sum()) / 1)
    x0 = np.array([1.0, math.log(1e22)])
    spread = s * math.sqrt(1 + x0 @ np.linalg.inv(x.T @ x) @ x0)
    center = coef[0] + coef[1] * math.log(1e22)
    p = fit.predict(1e22)
    assert p.loss == pytest.approx(math.exp(center))
    assert p.low == pytest.approx(math.exp(center - T_975[1] * spread))
    assert p.high == pytest.approx(math.exp(center + T_975[1] * spread))


def test_only_the_compute_frontier_is_fitted():
    points = [Point(1e18, 4.0, "small", 1), Point(2e18, 4.5, "bad-arm", 1), Point(1e19, 3.5, "small", 2),
              Point(1e19, 3.9, "bad-arm", 2), Point(1e20, 3.0, "big", 1)]
    kept = frontier(points)
    assert [(p.run, p.step) for p in kept] == [("small", 1), ("small", 2), ("big", 1)]
    assert fit_power_law(points).points == tuple(kept)


def test_too_few_points_are_refused_with_the_count():
    with pytest.raises(ValueError, match=r"2 point\(s\) on the loss-compute frontier \(of 3 checkpoints"):
        fit_power_law([Point(1e18, 4.0, "a", 1), Point(1e19, 3.0, "a", 2), Point(1e20, 3.5, "a", 3)])
    with pytest.raises(ValueError, match=r"0 point\(s\)"):
        fit_power_law([Point(1e18, float("nan"), "a", 1)])
