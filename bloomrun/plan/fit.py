"""A power law of loss against compute, fitted to a study's runs and extrapolated.

Method: each (compute, loss) point is a checkpoint of a run (compute = 6 x params x tokens,
the model FLOPs, the same with or without recompute). The fit uses the compute frontier
(Kaplan et al. 2020, fig. 1): the points whose loss is lower than every point at less or
equal compute, over all runs. On those, ordinary least squares in log space,
    ln L = ln a - b ln C,
with numpy. The uncertainty of an extrapolated loss is the 95% prediction interval of that
regression: ln L0 +- t(0.975, n - 2) x s x sqrt(1 + x0' (X'X)^-1 x0), s the residuals' standard
deviation, x0 = (1, ln C0). Limits worth saying: a pure power law has no irreducible-loss
term, so it predicts too low a loss far out; and the interval only counts the scatter of
the points, not whether the law holds orders of magnitude beyond them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_POINTS = 3  # two parameters and at least one degree of freedom for the scatter

# Student's t, two-sided 95% (0.975 quantile), by degrees of freedom; 1.96 beyond 30.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


@dataclass(frozen=True)
class Point:
    compute: float  # model FLOPs, 6 N D
    loss: float
    run: str
    step: int


@dataclass(frozen=True)
class Prediction:
    compute: float
    loss: float
    low: float  # 95% prediction interval
    high: float


@dataclass(frozen=True)
class PowerLaw:
    """loss = a x compute^(-b), fitted on `points` (the frontier)."""

    a: float
    b: float
    points: tuple[Point, ...]
    residual_std: float  # s, in ln(loss)
    xtx_inv: tuple[tuple[float, float], tuple[float, float]]

    @property
    def dof(self) -> int:
        return len(self.points) - 2

    def predict(self, compute: float) -> Prediction:
        x0 = np.array([1.0, math.log(compute)])
        center = math.log(self.a) - self.b * math.log(compute)
        spread = self.residual_std * math.sqrt(1.0 + float(x0 @ np.array(self.xtx_inv) @ x0))
        t = T_975.get(self.dof, 1.96)
        return Prediction(compute, math.exp(center), math.exp(center - t * spread), math.exp(center + t * spread))

    def describe(self) -> str:
        return (f"loss = {self.a:.4g} x C^-{self.b:.4f} (least squares in log space on {len(self.points)} "
                f"frontier points, residual std {self.residual_std:.3g} in ln loss)")


def frontier(points: list[Point]) -> list[Point]:
    """The points no other point beats at less or equal compute, by increasing compute."""
    kept: list[Point] = []
    for point in sorted(points, key=lambda p: (p.compute, p.loss)):
        if not kept or point.loss < kept[-1].loss:
            kept.append(point)
    return kept


def fit_power_law(points: list[Point]) -> PowerLaw:
    """Fit on the compute frontier of `points`; ValueError (saying how many) when too few."""
    usable = [p for p in points if p.compute > 0 and p.loss > 0 and math.isfinite(p.loss)]
    front = frontier(usable)
    if len(front) < MIN_POINTS:
        raise ValueError(f"runs: {len(front)} point(s) on the loss-compute frontier (of {len(usable)} checkpoints "
                         f"with a loss), the fit needs at least {MIN_POINTS}")
    x = np.column_stack([np.ones(len(front)), np.log([p.compute for p in front])])
    y = np.log([p.loss for p in front])
    coef, _residuals, _rank, _sv = np.linalg.lstsq(x, y, rcond=None)
    residuals = y - x @ coef
    dof = len(front) - 2
    s = math.sqrt(float(residuals @ residuals) / dof)
    xtx_inv = np.linalg.inv(x.T @ x)
    return PowerLaw(a=math.exp(coef[0]), b=-float(coef[1]), points=tuple(front), residual_std=s,
                    xtx_inv=tuple(tuple(float(v) for v in row) for row in xtx_inv))
