"""Small helpers shared by the analysis modules: input checks, JSON conversion, bootstrap bands."""

from __future__ import annotations

import numpy as np

from scaling_suite.errors import SuiteError


def check_positive(name: str, values, n: int | None = None) -> np.ndarray:
    """A 1-D float array of finite, strictly positive values (log-space fits need > 0)."""
    if values is None:
        raise SuiteError(f"{name} is missing")
    try:
        arr = np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):
        raise SuiteError(f"{name} must be numeric") from None
    if arr.size == 0:
        raise SuiteError(f"{name} is empty")
    if n is not None and arr.size != n:
        raise SuiteError(f"{name} has {arr.size} values but the first input has {n}")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise SuiteError(f"{name} has {int(bad.sum())} NaN/inf value(s) (first at index {int(np.argmax(bad))})")
    nonpos = arr <= 0
    if nonpos.any():
        i = int(np.argmax(nonpos))
        raise SuiteError(f"{name} must be > 0: {int(nonpos.sum())} value(s) <= 0 (index {i}: {arr[i]:g})")
    return arr


def distinct_groups(logx, rel=0.01) -> np.ndarray:
    """Label of each value's distinct-input group: values sorted in log space, a new group after a
    gap > log(1 + rel), so values within rel of their neighbour are one input (robust to the jitter
    of measured N, D, C). The one rule for "how many distinct inputs" in the project."""
    lx = np.asarray(logx, dtype=float).ravel()
    order = np.argsort(lx, kind="stable")
    labels = np.empty(lx.size, dtype=int)
    labels[order] = np.concatenate([[0], np.cumsum(np.diff(lx[order]) > np.log1p(rel))]) if lx.size else []
    return labels


def n_distinct(logx, rel=0.01) -> int:
    """Number of distinct values of log inputs `logx` (distinct_groups' rule)."""
    labels = distinct_groups(logx, rel)
    return int(labels.max() + 1) if labels.size else 0


def percentile_interval(draws, level: float, axis=0):
    """Central `level` percentile interval (lo, hi) of bootstrap draws along `axis`, NaNs ignored
    (a draw can leave a law's domain, e.g. an overflowing extrapolation)."""
    q = 100 * (1 - level) / 2
    draws = np.asarray(draws, dtype=float)
    with np.errstate(invalid="ignore"):     # inf draws (a degenerate term) interpolate to inf or nan
        return np.nanpercentile(draws, q, axis=axis), np.nanpercentile(draws, 100 - q, axis=axis)


def fmt(v, spec: str = ".3g") -> str:
    """A number from a report (jsonable: NaN and inf are None there) for a line of text."""
    return "nan" if v is None else format(v, spec)


def format_interval(iv, spec: str = ".3g") -> str:
    """'[lo, hi]' of an interval from a report (jsonable: an infinite end is None there, and means
    unbounded: -inf below, inf above); '' when there is none."""
    if iv is None or len(iv) != 2 or (iv[0] is None and iv[1] is None):
        return ""
    lo, hi = (float("-inf") if iv[0] is None else iv[0]), (float("inf") if iv[1] is None else iv[1])
    return f"[{lo:{spec}}, {hi:{spec}}]"


def jsonable(obj):
    """Recursively convert numpy scalars/arrays and tuples to JSON types; non-finite floats -> None."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    return obj
