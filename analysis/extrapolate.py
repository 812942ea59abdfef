"""Predicted loss beyond the data: at a target model size, a target compute, or the end of a run.

Every prediction carries its interval (percentiles over the fit's bootstrap draws) and how far it
reaches beyond the data (`extrapolation_factor` = target / largest value fitted). Past 100x a
warning is attached: scaling laws fitted over 2-3 decades are routinely extrapolated further, but
the error grows with the reach (Besiroglu et al. 2024 §4 on the width of Chinchilla's intervals).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from scaling_suite.errors import SuiteError

from . import laws
from .common import fmt, format_interval, jsonable, percentile_interval
from .fit import fit_power_law
from .result import FitResult

DEFAULT_TARGET_N = 1.5e9        # parameters (GPT-2 XL scale)
DEFAULT_TARGET_C = laws.CHINCHILLA_C
WARN_FACTOR = 100.0


@dataclass(frozen=True)
class Extrapolation:
    target: str                      # "N", "C" or "tokens"
    value: float
    loss: float
    interval: tuple | None
    via: str
    extrapolation_factor: float
    warning: str | None = None
    level: float = 0.95
    details: dict = field(default_factory=dict)

    def report(self) -> str:
        iv = "" if self.interval is None else f" [{self.interval[0]:.4f}, {self.interval[1]:.4f}] ({100 * self.level:g}%)"
        s = (f"predicted loss at {self.target} = {self.value:.3g}: {self.loss:.4f}{iv} via {self.via}; "
             f"{self.extrapolation_factor:.3g}x beyond the data")
        extra = ", ".join(f"{k} = {v:.3g}" for k, v in self.details.items() if isinstance(v, float))
        s += f" ({extra})" if extra else ""
        return s + (f"\n  WARNING: {self.warning}" if self.warning else "")

    def to_dict(self) -> dict:
        return jsonable(self.__dict__)


def _factor_and_warning(name, value, data_max):
    factor = float(value / data_max)
    warning = None
    if factor > WARN_FACTOR:
        warning = (f"target {name} = {value:.3g} is {factor:.3g}x the largest {name} in the data "
                   f"({data_max:.3g}): {np.log10(factor):.1f} decades of extrapolation")
    return factor, warning


def _band(draws, level):
    """Percentile interval of scalar predictions over bootstrap draws; None without usable draws."""
    draws = np.asarray(draws, dtype=float)
    if not np.isfinite(draws).any():
        return None
    return tuple(float(v) for v in percentile_interval(np.where(np.isfinite(draws), draws, np.nan), level))


def _pair(band):
    return None if band is None else (float(band[0]), float(band[1]))


def _data_max(fit: FitResult, name: str) -> float:
    rng = (fit.data_range or {}).get(name)
    if rng is None:
        raise SuiteError(f"the {fit.model} fit has no data range for {name}")
    return float(rng[1])


def _optimal_D_for_N(N, p):
    """D on the compute-optimal frontier for model size N (Hoffmann et al. 2022 §3.3 eq. 4 inverted:
    N = G (C/6)^a gives C/6 = (N/G)^(1/a), and D = (C/6)/N)."""
    a, _ = laws.chinchilla_optimal_exponents(p["alpha"], p["beta"])
    G = laws.chinchilla_G(p["A"], p["B"], p["alpha"], p["beta"])
    with np.errstate(over="ignore"):    # a bootstrap draw with a huge exponent: inf, dropped by the band
        return (N / G) ** (1.0 / a) / N


def at_N(fit: FitResult, N: float = DEFAULT_TARGET_N, level: float | None = None) -> Extrapolation:
    """Loss at model size N: from an L(N) power law directly, or from a Chinchilla fit at the
    compute-optimal D for that N (each bootstrap draw with its own optimal D)."""
    level = fit.level if level is None else level
    if fit.model == "power_law" and fit.x_name == "N":
        loss = float(fit.predict(N))
        iv = _pair(fit.predict_interval(N, level=level))
        via, details = "L(N) power law", {}
    elif fit.model == "chinchilla":
        D = float(_optimal_D_for_N(N, fit.params))
        loss = float(fit.predict(N, D))
        iv = None
        if fit.samples:
            s = fit.samples
            # A draw whose amplitude overflowed (A = inf, an unidentified term) has no finite
            # prediction (inf * 0 far out): it is NaN, and the band leaves it out, as it leaves out
            # any non-finite draw.
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                iv = _band(laws.chinchilla(N, _optimal_D_for_N(N, s), **s), level)
        via, details = "Chinchilla L(N, D) at compute-optimal D", {"D": D, "C": 6.0 * N * D}
    else:
        raise SuiteError(f"at_N needs an L(N) power law or a chinchilla fit, got {fit.model} "
                         f"of {fit.x_name or '?'}")
    factor, warning = _factor_and_warning("N", N, _data_max(fit, "N"))
    return Extrapolation("N", float(N), loss, iv, via, factor, warning, level, details)


def at_C(fit: FitResult, C: float = DEFAULT_TARGET_C, level: float | None = None) -> Extrapolation:
    """Loss at compute C: a Chinchilla fit at its compute-optimal (N, D) for C (Hoffmann et al. 2022
    §3.3 eq. 4; C = 6 N D), or an L(C) power law (e.g. fitted to an envelope or IsoFLOP minima)."""
    level = fit.level if level is None else level
    if fit.model == "chinchilla":
        N, D = (float(v) for v in laws.chinchilla_optimal(C, **fit.params))
        loss = float(fit.predict(N, D))
        iv = None
        if fit.samples:
            s = fit.samples
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # as in at_N
                Ns, Ds = laws.chinchilla_optimal(C, **s)
                iv = _band(laws.chinchilla(Ns, Ds, **s), level)
        via, details = "Chinchilla L(N, D) at compute-optimal (N, D)", {"N": N, "D": D}
    elif fit.model == "power_law" and fit.x_name == "C":
        loss = float(fit.predict(C))
        iv = _pair(fit.predict_interval(C, level=level))
        via, details = "L(C) power law", {}
    else:
        raise SuiteError(f"at_C needs an L(C) power law or a chinchilla fit, got {fit.model} "
                         f"of {fit.x_name or '?'}")
    factor, warning = _factor_and_warning("C", C, _data_max(fit, "C"))
    return Extrapolation("C", float(C), loss, iv, via, factor, warning, level, details)


def predict_final_loss(tokens, loss, target_tokens: float, min_fraction: float = 0.1,
                       n_bootstrap: int = 200, seed: int = 0, level: float = 0.95) -> Extrapolation:
    """Early-stop prediction: fit the learning curve L(t) = E + A t^-alpha (laws.learning_curve) to
    the points after `min_fraction` of the tokens seen so far (warm-up and the fast initial drop do
    not follow the power law), and evaluate it at target_tokens with a bootstrap interval."""
    t = np.asarray(tokens, dtype=float)
    y = np.asarray(loss, dtype=float)
    if t.size != y.size:
        raise SuiteError(f"tokens has {t.size} values but loss has {y.size}")
    if t.size == 0:
        raise SuiteError("the learning curve is empty")
    keep = np.isfinite(t) & np.isfinite(y) & (t >= min_fraction * np.nanmax(t))
    fit = fit_power_law(t[keep], y[keep], x_name="tokens", n_bootstrap=n_bootstrap, seed=seed, level=level)
    factor, warning = _factor_and_warning("tokens", target_tokens, _data_max(fit, "tokens"))
    return Extrapolation("tokens", float(target_tokens), float(fit.predict(target_tokens)),
                         _pair(fit.predict_interval(target_tokens)), "learning-curve power law",
                         factor, warning, level,
                         {"E": fit.params["E"], "A": fit.params["A"], "alpha": fit.params["alpha"],
                          "n_points": float(keep.sum())})


def extrapolation_lines(extrapolations: list) -> list[str]:
    """A study summary's lines for a report's EXTRAPOLATIONS (Extrapolation.to_dict()): those within
    WARN_FACTOR of the data; those beyond are named, not printed: there the interval holds the fit's
    spread, not the error of the law's form (Besiroglu et al. 2024 §4). report.md keeps them all."""
    far = [e for e in extrapolations if e.get("warning")]
    lines = [f"predicted loss at {e['target']}={fmt(e['value'])}: {fmt(e['loss'], '.3f')}"
             + f" {format_interval(e.get('interval'))}".rstrip()
             + f" via {e['via']}, {fmt(e['extrapolation_factor'])}× beyond the data"
             for e in extrapolations if not e.get("warning")]
    if far:
        factors: dict[str, list] = {}     # each target with the factors of its extrapolations (laws differ in their data)
        for e in far:
            factors.setdefault(f"{e['target']}={fmt(e['value'])}", []).append(e["extrapolation_factor"])
        lines.append("not printed: the loss at " + ", ".join(
            f"{t} ({fmt(min(f))}×)" if fmt(min(f)) == fmt(max(f)) else f"{t} ({fmt(min(f))}-{fmt(max(f))}×)"
            for t, f in factors.items()) + f" beyond the data: past {WARN_FACTOR:g}× a law's interval holds its "
            "parameters' spread, not the error of its form (report.md lists them)")
    return lines
