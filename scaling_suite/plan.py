"""Study designs and modes: which (N, D, C) points a study trains.

Designs (all log-spaced, so each decade gets equal weight in a log-log fit):
- ``isoflop``: several compute budgets C × model sizes; D = C / flops_per_token. Chinchilla's
  approach 2 (Hoffmann et al. 2022 §3.2): a parabola in log N per budget finds N*(C).
- ``n_sweep``: sizes at one fixed D, so L(N) is read with D controlled (Kaplan et al. 2020 §3.1).
- ``d_sweep``: token budgets at one fixed N, so L(D) is read with N controlled.

A mode is a design plus sizes and budgets chosen for a kind of machine. The shape dial is
``depth`` (see model.py): with aspect 32 and head_dim 16, depth 1..6 gives N ≈ 22k..2.7M on bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field

from .config import RunConfig, make_config
from .errors import SuiteError

DESIGNS = ("isoflop", "n_sweep", "d_sweep")


@dataclass(frozen=True)
class Point:
    config: RunConfig
    tags: dict = field(default_factory=dict)   # design, C_budget ... (logged as child tags)


@dataclass(frozen=True)
class Plan:
    mode: str
    design: str
    points: tuple[Point, ...]

    @property
    def key(self) -> str:
        """Identifies the study: the same plan on the same data is the same study (idempotence)."""
        blob = json.dumps([self.mode, self.design, [p.config.to_params() for p in self.points]], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def total_flops(self) -> float:
        return sum(p.config.derived().C for p in self.points)

    def describe(self) -> list[dict]:
        rows = []
        for p in self.points:
            d = p.config.derived()
            rows.append({"depth": p.config.depth, "N": d.N, "D": d.D, "C": d.C, "steps": d.steps, **p.tags})
        return rows


def log_space(lo: float, hi: float, n: int) -> list[float]:
    if n == 1:
        return [lo]
    return [lo * (hi / lo) ** (i / (n - 1)) for i in range(n)]


# Settings common to a mode's runs; the rest come from RunConfig. Context 64 and small batches
# keep the smallest models from spending their budget on a handful of steps.
MODES: dict[str, dict] = {
    # 3 tiny runs in well under a minute on 2 CPU cores: the tests' study.
    "smoke": dict(design="n_sweep", depths=[1, 2, 3], D=65536,
                  base=dict(aspect=16, head_dim=8, context=32, batch_tokens=2048, eval_tokens=2048,
                            eval_every=4)),
    # IsoFLOP, 3 budgets × 4-5 sizes around each budget's optimum. At this scale the optimum sits
    # near 10-40k parameters at hundreds of tokens per parameter (shared/PITFALLS.md; a dense grid
    # in benchmarks/optimize_vs_grid.py found N* ≈ 15k at 3e11), and at 2e11 even the smallest
    # size won, so the budgets start at 6e11, where the minimum is bracketed. Narrow models
    # (aspect 16, heads of 8) give sizes 2-3× apart: N 7.5k..418k (1.75 decades). About 12
    # minutes on the reference 2-core CPU (README, "Modes").
    "quick": dict(design="isoflop", budgets=[6e11, 1.2e12, 2.4e12],
                  depths={6e11: [1, 2, 3, 4], 1.2e12: [1, 2, 3, 4], 2.4e12: [1, 2, 3, 4, 5]},
                  base=dict(aspect=16, head_dim=8, context=64, batch_tokens=8192, eval_tokens=16384)),
    # For a laptop GPU (MPS) or a CUDA card: 4 budgets × 5 sizes.
    "dev": dict(design="isoflop", budgets=[1e13, 3e13, 1e14, 3e14],
                depths={c: [2, 3, 4, 5, 6] for c in (1e13, 3e13, 1e14, 3e14)},
                base=dict(context=128, batch_tokens=16384, eval_tokens=65536)),
    # For a CUDA card: 5 budgets × 6 sizes, wider models.
    "full": dict(design="isoflop", budgets=[1e15, 3e15, 1e16, 3e16, 1e17],
                 depths={c: [4, 6, 8, 10, 12, 14] for c in (1e15, 3e15, 1e16, 3e16, 1e17)},
                 base=dict(context=256, aspect=64, head_dim=64, batch_tokens=65536, eval_tokens=262144)),
}


def isoflop(budgets, depths_for, base: dict, mode: str) -> Plan:
    pts = []
    for C in budgets:
        for depth in depths_for(C):
            cfg = make_config(**base, depth=depth, C=C)
            pts.append(Point(cfg, {"design": "isoflop", "C_budget": f"{C:g}"}))
    return Plan(mode, "isoflop", tuple(pts))


def n_sweep(depths, D: float, base: dict, mode: str) -> Plan:
    pts = tuple(Point(make_config(**base, depth=k, D=D), {"design": "n_sweep"}) for k in depths)
    return Plan(mode, "n_sweep", pts)


def d_sweep(depth: int, tokens: list[float], base: dict, mode: str) -> Plan:
    pts = tuple(Point(make_config(**base, depth=depth, D=D), {"design": "d_sweep"}) for D in tokens)
    return Plan(mode, "d_sweep", pts)


def make_plan(mode: str, design: str | None = None, overrides: dict | None = None) -> Plan:
    """The plan of MODE, in its own design or in DESIGN (same sizes and compute scale)."""
    if mode not in MODES:
        raise SuiteError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    spec = MODES[mode]
    design = design or spec["design"]
    if design not in DESIGNS:
        raise SuiteError(f"unknown design {design!r}; choose one of: {', '.join(DESIGNS)}")
    base = {**spec["base"], **(overrides or {})}
    depths = sorted({k for v in (spec["depths"].values() if isinstance(spec.get("depths"), dict)
                                 else [spec["depths"]]) for k in v})
    if design == "isoflop":
        if "budgets" in spec:
            return isoflop(spec["budgets"], lambda C: spec["depths"][C], base, mode)
        # A mode planned as a sweep, run as IsoFLOP: budgets around its token budget.
        mid = make_config(**base, depth=depths[len(depths) // 2], D=spec["D"]).derived().C
        return isoflop(log_space(mid / 3, mid * 3, 3), lambda C: depths, base, mode)
    if design == "n_sweep":
        D = spec.get("D") or _median_tokens(spec, base)
        return n_sweep(depths, D, base, mode)
    depth = depths[len(depths) // 2]
    D = spec.get("D") or _median_tokens(spec, base)
    return d_sweep(depth, log_space(D / 4, D * 4, 5), base, mode)


def _median_tokens(spec: dict, base: dict) -> float:
    C = spec["budgets"][len(spec["budgets"]) // 2]
    depth = sorted(spec["depths"][C])[len(spec["depths"][C]) // 2]
    return make_config(**base, depth=depth, C=C).derived().D


def estimate_seconds(plan: Plan, rate: dict[int, float], per_run_s: float = 2.0) -> float:
    """Wall time of PLAN at RATE (measured training FLOP/s per depth), evaluations included.

    An evaluation is a forward pass only, a third of a training step's FLOPs (Kaplan et al. 2020
    Table 1: backward = 2 × forward); per_run_s covers opening the MLflow run and checkpoints.
    """
    total = 0.0
    for p in plan.points:
        d = p.config.derived()
        n_evals = d.steps // d.eval_every + 1
        eval_flops = n_evals * p.config.eval_tokens * d.flops_per_token / 3
        total += (d.C + eval_flops) / rate[p.config.depth] + per_run_s
    return total


def fit_to_time(mode: str, design: str | None, seconds: float, rate: dict[int, float],
                overrides: dict | None = None, overhead_s: float = 40.0) -> Plan:
    """The largest plan of the design whose estimated wall time fits SECONDS.

    RATE is this device's measured training FLOP/s per depth (sweep.probe_rates). The mode's
    budgets (IsoFLOP) or tokens (sweeps) are all scaled by one factor, so the design's shape (sizes,
    spacing, tokens per parameter) is kept and only its scale moves; a run too small for one
    optimizer step is an error, never silently dropped. overhead_s: set-up and the analysis.
    """
    base = make_plan(mode, design, overrides)
    target = seconds - overhead_s
    if target <= 0:
        raise SuiteError(f"a budget of {seconds:.0f}s is too small: set-up and analysis alone take about {overhead_s:.0f}s")
    lo, hi = 1e-6, 1e6          # bisect the scale factor in log space: estimate is monotone in it
    for _ in range(60):
        mid = math.sqrt(lo * hi)
        try:
            ok = estimate_seconds(scale(base, mid), rate) <= target
        except SuiteError:
            ok = True           # too small for one step: go larger
        lo, hi = (mid, hi) if ok else (lo, mid)
    try:
        return scale(base, lo)
    except SuiteError as e:
        raise SuiteError(f"a budget of {seconds:.0f}s is too small for mode {mode}: {e}") from None


def scale(plan: Plan, factor: float) -> Plan:
    """PLAN with every compute (or token) budget multiplied by FACTOR."""
    pts = []
    for p in plan.points:
        c = p.config
        changed = dict(C=c.C * factor) if c.C else dict(D=c.D * factor)
        tags = dict(p.tags)
        if "C_budget" in tags:
            tags["C_budget"] = f"{float(tags['C_budget']) * factor:.3g}"
        pts.append(Point(make_config(**{**c.to_params(), **changed}), tags))
    return Plan(plan.mode, plan.design, tuple(pts))


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h', '1h30m' or a bare number of seconds -> seconds."""
    import re

    t = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", t):
        seconds = float(t)
    else:
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([hms])", t)
        if not parts or "".join(a + b for a, b in parts) != t.replace(" ", ""):
            raise SuiteError(f"cannot read the duration {text!r}; write e.g. 90s, 10m, 1.5h or 1h30m")
        seconds = sum(float(a) * {"h": 3600, "m": 60, "s": 1}[u] for a, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise SuiteError(f"the duration must be positive, got {text!r}")
    return seconds
