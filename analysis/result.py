"""FitResult: what every fitter in fit.py returns (lmfit-style: value, interval, report), with its
predictions and a JSON round trip (to_dict / from_dict)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

import numpy as np

from scaling_suite.errors import SuiteError

from . import laws, models
from .common import check_positive, jsonable, percentile_interval

LAWS = {"chinchilla": laws.chinchilla, "power_law": laws.power_law, "kaplan": laws.kaplan,
        "loglinear": laws.loglinear, "lr_law": laws.lr_law}


@dataclass(frozen=True)
class FitResult:
    """One fitted law. `params` are the natural parameters of the law in `laws.py`."""
    model: str
    params: dict
    objective: float
    n_points: int
    intervals: dict = field(default_factory=dict)    # name -> (lo, hi) at `level`
    stderr: dict = field(default_factory=dict)       # bootstrap s.d., else asymptotic
    n_bootstrap: int = 0
    converged: bool = True
    level: float = 0.95
    # What the data were and how the fit ran; None where a fitter does not say (see the fitters).
    x_name: str | None = None            # the input's label (power law, log-linear)
    y_name: str | None = None            # the output's label (log-linear)
    data_range: dict | None = None       # input name -> [min, max]; "C" too for (N, D) fits
    method: str | None = None            # a closed-form fit's method; None for the Huber multi-start
    delta: float | None = None           # Huber delta of the multi-start fits
    grid: str | None = None              # start grid: "published", "coarse", "default" or "custom"
    n_starts: int | None = None
    n_at_best: int | None = None         # starts that reached the best objective
    coords: dict | None = None           # the optimum in the optimiser's log-space coordinates
    local_optima: list | None = None     # the best distinct optima (coordinates), for warm starts
    local_optima_objective: list | None = None
    fixed: dict | None = None            # parameters held fixed (power law with fixed_E)
    fixed_E: float | None = None
    support: dict | None = None          # per exponent: distinct inputs its term is seen at (term_support)
    unidentified: dict | None = None     # exponent -> why the data do not identify it
    stderr_method: str | None = None
    bootstrap_converged: float | None = None   # share of bootstrap refits that converged
    seed: int | None = None
    bootstrap_starts: int | None = None
    dof: int | None = None               # OLS fits: residual degrees of freedom
    sigma2: float | None = None          # OLS fits: residual variance (lr law), for its band
    x_mean: float | None = None          # lr law: mean log N
    sxx: float | None = None             # lr law: sum of squared deviations of log N
    samples: dict | None = field(default=None, repr=False, compare=False)  # bootstrap draws

    @property
    def identified(self) -> bool:
        """False when a power-law term of the fit is seen at too few distinct inputs (`term_support`):
        its exponent and amplitude are then not determined by the data, whatever the interval says."""
        return not self.unidentified

    def predict(self, *inputs):
        """The fitted law at the given inputs (N, D for chinchilla/kaplan; x for the others). Laws
        fitted in log space are evaluated there, from the optimiser's coordinates: a degenerate fit's
        amplitude can overflow as a float (A = inf) where its log-space prediction is finite."""
        coords = self.coords
        if coords is None or self.model not in ("chinchilla", "kaplan", "power_law"):
            return LAWS[self.model](*inputs, **self.params)
        arrs = np.broadcast_arrays(*[np.asarray(x, dtype=float) for x in inputs])
        model = log_model(self)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            logs = tuple(np.log(a.ravel()) for a in arrs)
            logp = model.forward(np.asarray(list(coords.values()), dtype=float)[None], model.prepare(logs))[0][0]
        out = np.exp(logp).reshape(arrs[0].shape)
        return out if out.ndim else float(out)

    def predict_interval(self, *inputs, level: float | None = None):
        """Percentile band (lo, hi) of the prediction over the bootstrap draws, or None without them."""
        if not self.samples:
            return None
        level = self.level if level is None else level
        cols = [np.asarray(x, dtype=float)[None, ...] for x in inputs]
        shape = (-1,) + (1,) * np.ndim(inputs[0])      # draws down axis 0, inputs after it
        draws = {k: np.asarray(v).reshape(shape) for k, v in self.samples.items()}
        with np.errstate(over="ignore", invalid="ignore"):    # draws of a degenerate term: inf/NaN, dropped
            return percentile_interval(LAWS[self.model](*cols, **draws), level)

    def report(self) -> str:
        head = f"{self.model} fit: {self.n_points} points"
        if self.delta is not None:
            head += f", log-space Huber (delta={self.delta:g})"
        if self.n_starts is not None:
            head += f", {self.n_starts} starts ({self.n_at_best if self.n_at_best is not None else '?'} reached the best)"
        if self.method is not None:
            head += f", {self.method}"
        lines = [head, f"objective {self.objective:.6e}; converged: {'yes' if self.converged else 'NO'}"]
        pct = f"{100 * self.level:g}%"
        if self.n_bootstrap:
            lines.append(f"intervals: {pct} percentile bootstrap over {self.n_bootstrap} resamples")
        lines.append(f"  {'param':<9} {'value':>12}   {pct + ' interval':<27} {'stderr':>10}")
        for k, v in self.params.items():
            lo, hi = self.intervals.get(k, (np.nan, np.nan))
            iv = f"[{lo:.5g}, {hi:.5g}]" if np.isfinite(lo) else "-"
            fixed = " (fixed)" if k in (self.fixed or {}) else ""
            se = self.stderr.get(k, np.nan)
            lines.append(f"  {k:<9} {v:>12.6g}   {iv:<27} {se:>10.3g}{fixed}")
        lines += [f"WARNING: {msg}" for msg in (self.unidentified or {}).values()]
        return "\n".join(lines)

    @property
    def extras(self) -> dict:
        """The fields beyond the law's numbers, as the dict to_dict writes under "extras" (the
        layout of report.json and lr_law.json); only those a fitter set."""
        return {k: getattr(self, k) for k in EXTRA_FIELDS if getattr(self, k) is not None}

    def to_dict(self) -> dict:
        """JSON-safe copy (NaN/inf -> None; bootstrap draws summarised, not included)."""
        return jsonable({
            "model": self.model, "params": self.params, "objective": self.objective,
            "n_points": self.n_points, "intervals": {k: list(v) for k, v in self.intervals.items()},
            "stderr": self.stderr, "n_bootstrap": self.n_bootstrap, "converged": self.converged,
            "level": self.level, "extras": self.extras})

    @classmethod
    def from_dict(cls, d: dict) -> "FitResult":
        """The FitResult that to_dict wrote (e.g. read back from a report.json or lr_law.json): a
        number to_dict stored as None (it was NaN or infinite) comes back as NaN; the bootstrap
        draws, which to_dict leaves out, do not come back (samples is None). Keys under "extras"
        that are no field (written by an older version) are left out."""
        num = lambda v: math.nan if v is None else float(v)  # noqa: E731
        extras = d.get("extras", {})
        return cls(model=d["model"], params={k: num(v) for k, v in d["params"].items()},
                   objective=num(d.get("objective")), n_points=int(d["n_points"]),
                   intervals={k: (num(v[0]), num(v[1])) for k, v in d.get("intervals", {}).items()},
                   stderr={k: num(v) for k, v in d.get("stderr", {}).items()},
                   n_bootstrap=int(d.get("n_bootstrap", 0)), converged=bool(d.get("converged", True)),
                   level=float(d.get("level", 0.95)), **{k: extras[k] for k in EXTRA_FIELDS if k in extras})


EXTRA_FIELDS = tuple(f.name for f in fields(FitResult)
                     if f.name not in ("model", "params", "objective", "n_points", "intervals", "stderr",
                                       "n_bootstrap", "converged", "level", "samples"))


def log_model(fit: FitResult):
    """The log-space model (models.py) a Huber fit was made with."""
    if fit.model == "chinchilla":
        return models.CHINCHILLA
    if fit.model == "kaplan":
        return models.KAPLAN
    if fit.model == "power_law":
        return models.power_law_model(fit.fixed_E)
    raise SuiteError(f"no refit procedure for a {fit.model} fit")


def fit_inputs(fit: FitResult, inputs, loss):
    """FIT's log-space model and INPUTS, LOSS checked against it (positive, equal lengths)."""
    model = log_model(fit)
    if len(inputs) != len(model.inputs):
        raise SuiteError(f"a {fit.model} fit takes {len(model.inputs)} input array(s), got {len(inputs)}")
    first = check_positive(model.inputs[0], inputs[0])
    arrs = [first] + [check_positive(k, v, first.size) for k, v in zip(model.inputs[1:], inputs[1:])]
    return model, arrs, check_positive("loss", loss, first.size)
