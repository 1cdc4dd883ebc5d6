"""The fit of step energy on step tokens: energy per prefill token and per decode token.

A least-squares fit without intercept, ``dynamic energy = a * prefill tokens + b * decode
tokens`` over a window's steps, with 95% intervals from Student's t and the coefficient of
determination. Pure arithmetic: the attribution (:mod:`pytest_llem.harness.attribution`) uses
the ratio ``a / b`` to split a step's dynamic energy among the requests in it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["TokenFit", "fit_token_energy", "t_quantile_975"]

#: Student's t 0.975 quantile for 1..30 degrees of freedom.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip
_Z975 = 1.959964


def t_quantile_975(df: int) -> float:
    """Student's t 0.975 quantile (a table to 30 degrees of freedom, Cornish-Fisher above)."""
    if df < 1:
        raise ValueError("degrees of freedom must be at least 1")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


@dataclass(frozen=True)
class TokenFit:
    """Fitted J per prefill token (``prefill``) and per decode token (``decode``).

    A coefficient is None when its tokens never occur in the steps (or the two columns cannot
    be told apart); its interval is None with too few steps. ``note`` says what went wrong.
    """

    prefill: float | None
    decode: float | None
    prefill_ci: tuple[float, float] | None
    decode_ci: tuple[float, float] | None
    r2: float | None
    steps: int
    note: str | None = None


def _r2(rows: Sequence[tuple[float, float, float]], a: float, b: float) -> float | None:
    ys = [y for _, _, y in rows]
    mean = math.fsum(ys) / len(ys)
    tss = math.fsum((y - mean) ** 2 for y in ys)
    if tss <= 0:
        return None
    rss = math.fsum((y - a * p - b * d) ** 2 for p, d, y in rows)
    return 1.0 - rss / tss


def _interval(value: float, variance: float, t: float) -> tuple[float, float]:
    half = t * math.sqrt(max(variance, 0.0))
    return value - half, value + half


def _one_column(rows: Sequence[tuple[float, float, float]], column: int) -> TokenFit:
    sxx = math.fsum(r[column] ** 2 for r in rows)
    coef = math.fsum(r[column] * r[2] for r in rows) / sxx
    a, b = (coef, 0.0) if column == 0 else (0.0, coef)
    n = len(rows)
    ci = None
    if n > 1:
        rss = math.fsum((y - a * p - b * d) ** 2 for p, d, y in rows)
        ci = _interval(coef, rss / (n - 1) / sxx, t_quantile_975(n - 1))
    other = "decode" if column == 0 else "prefill"
    note = f"no {other} tokens in the steps: energy per {other} token not identifiable"
    if column == 0:
        return TokenFit(coef, None, ci, None, _r2(rows, a, b), n, note)
    return TokenFit(None, coef, None, ci, _r2(rows, a, b), n, note)


def fit_token_energy(rows: Sequence[tuple[float, float, float]]) -> TokenFit:
    """Fit ``energy = a * prefill + b * decode`` (no intercept) by least squares.

    Args:
        rows: One ``(prefill tokens, decode tokens, dynamic energy J)`` per step.

    Returns:
        The coefficients (J/token), their 95% intervals, R^2 and the number of steps.
    """
    n = len(rows)
    spp = math.fsum(p * p for p, _, _ in rows)
    sdd = math.fsum(d * d for _, d, _ in rows)
    if spp <= 0 and sdd <= 0:
        return TokenFit(None, None, None, None, None, n, "no step did any token work")
    if sdd <= 0:
        return _one_column(rows, 0)
    if spp <= 0:
        return _one_column(rows, 1)
    spd = math.fsum(p * d for p, d, _ in rows)
    spy = math.fsum(p * y for p, _, y in rows)
    sdy = math.fsum(d * y for _, d, y in rows)
    det = spp * sdd - spd * spd
    if det <= 1e-12 * spp * sdd:
        why = "prefill and decode tokens always occur in the same proportion: not separable"
        return TokenFit(None, None, None, None, None, n, why)
    a = (sdd * spy - spd * sdy) / det
    b = (spp * sdy - spd * spy) / det
    a_ci = b_ci = None
    if n > 2:
        s2 = math.fsum((y - a * p - b * d) ** 2 for p, d, y in rows) / (n - 2)
        t = t_quantile_975(n - 2)
        a_ci = _interval(a, s2 * sdd / det, t)
        b_ci = _interval(b, s2 * spp / det, t)
    return TokenFit(a, b, a_ci, b_ci, _r2(rows, a, b), n)
