"""Study designs and modes: which (N, D, C) points a study trains.

Designs (all log-spaced, so each decade gets equal weight in a log-log fit):
- ``isoflop``: several compute budgets C × model sizes; D = C / flops_per_token. Chinchilla's
  approach 2 (Hoffmann et al. 2022 §3.2): a parabola in log N per budget finds N*(C).
- ``n_sweep``: sizes at one fixed D, so L(N) is read with D controlled (Kaplan et al. 2020 §3.1).
- ``d_sweep``: token budgets at one fixed N, so L(D) is read with N controlled.

A mode is a design plus sizes and budgets chosen for a kind of machine. The shape dial is
``depth`` (see model.py): with aspect 32 and head_dim 16, depth 1..6 gives N ≈ 22k..2.7M on bytes.

WSD cooldown branching (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training Beyond
Fixed Training Durations", §3.2). Under schedule=wsd the learning rate is constant until the last
cooldown_frac (20%) of a run, so runs that differ only in D share their first steps: the longest
run of each such group is trained as usual and checkpoints at every shorter run's cooldown start
(its *trunk*), and each shorter run is a *branch* that starts from that checkpoint and trains only
its cooldown. A branch costs cooldown_frac of its FLOPs; a group costs (1 - f)·D_max + f·ΣD tokens
instead of ΣD. Two things make a wsd plan branch-friendly, and both apply to every wsd plan,
branching on or off (so `--branching false` trains the very same runs, for comparison):
- warmup: the default warmup is min(N, warmup_max_frac · D) (Porian et al. 2024 §4.2), which
  depends on D and so would split every group whose short runs hit the cap. WSD's point is a
  schedule that does not depend on the length, so a wsd plan fixes each group's warmup_tokens to
  that rule at the group's shortest D (logged as the param; see length_free_warmup).
- quick's grid: 3 budgets 2× apart with depth 5 at one budget only would save just 30%
  (0.8·D_max + 0.2·ΣD per depth). The wsd grid (MODES["quick"]["wsd"]) is 5 budgets √2 apart,
  6e11..2.4e12, with depths 1-5 at each: 25 runs at about half their independent cost, and less
  compute in total than the cosine quick study's 13 runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field

from .config import RunConfig, make_config
from .errors import SuiteError
from .schedule import BRANCH_FIELDS, branch_problem, cooldown_start

DESIGNS = ("isoflop", "n_sweep", "d_sweep")
# A mode's default study: "adaptive" (adaptive.py: a time box, Optuna placing the runs) for quick,
# dev and full; smoke keeps its fixed n_sweep. Every mode's fixed grid stays available by name
# (--design isoflop), for comparison (benchmarks/adaptive_vs_grid.py).
ADAPTIVE = "adaptive"


def default_design(mode: str) -> str:
    if mode not in MODES:
        raise SuiteError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    return ADAPTIVE if MODES[mode].get("adaptive") else MODES[mode]["design"]


@dataclass(frozen=True)
class Point:
    config: RunConfig
    tags: dict = field(default_factory=dict)   # design, C_budget ... (logged as child tags)


@dataclass(frozen=True)
class Plan:
    mode: str
    design: str
    points: tuple[Point, ...]
    branching: bool = False     # train wsd runs that differ only in D as cooldown branches of one trunk
    length_free_warmup: bool = False   # warmup_tokens was fixed per group (length_free_warmup); scale() redoes it

    @property
    def key(self) -> str:
        """Identifies the study: the same plan on the same data is the same study (idempotence).
        A branching study is another study than the independent one of the same runs."""
        parts = [self.mode, self.design, [p.config.to_params() for p in self.points]]
        blob = json.dumps(parts + (["branching"] if self.branching else []), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def total_flops(self) -> float:
        """FLOPs of the plan's runs trained independently (the sum of their C)."""
        return sum(p.config.derived().C for p in self.points)

    def branches(self) -> dict[int, tuple[int, int]]:
        """Point index -> (index of its trunk point, branch step), for the points trained as branches.

        Greedy, longest D first: a point branches from the first longer trunk it is compatible with
        (schedule.branch_problem: same params but the budget, same lr before its cooldown start), else
        it becomes a trunk itself."""
        if not self.branching:
            return {}

        derived = [p.config.derived() for p in self.points]
        out, trunks = {}, []
        for i in sorted(range(len(self.points)), key=lambda i: -derived[i].steps):
            cfg, d = self.points[i].config, derived[i]
            s = cooldown_start(cfg, d)
            t = next((t for t in trunks if derived[t].steps > d.steps
                      and branch_problem(self.points[t].config, cfg, s) is None), None)
            if t is None:
                trunks.append(i)
            else:
                out[i] = (t, s)
        return out

    def spent(self) -> list[float]:
        """FLOPs each point actually computes: a branch only the steps after its branch step."""
        br, out = self.branches(), []
        for i, p in enumerate(self.points):
            d = p.config.derived()
            out.append(d.C - (br[i][1] * p.config.batch_tokens * d.flops_per_token if i in br else 0))
        return out

    def spent_flops(self) -> float:
        return sum(self.spent())

    def describe(self) -> list[dict]:
        rows, br = [], self.branches()
        for i, p in enumerate(self.points):
            d = p.config.derived()
            row = {"depth": p.config.depth, "N": d.N, "D": d.D, "C": d.C, "steps": d.steps, **p.tags}
            if i in br:
                row.update(branch_of_point=br[i][0], branch_step=br[i][1])
            rows.append(row)
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
    # near 10-40k parameters at hundreds of tokens per parameter (a sizing probe at 3e11-1e13 FLOPs; a dense grid
    # in benchmarks/optimize_vs_grid.py found N* ≈ 15k at 3e11), and at 2e11 even the smallest
    # size won, so the budgets start at 6e11, where the minimum is bracketed. Narrow models
    # (aspect 16, heads of 8) give sizes 2-3× apart: N 7.5k..418k (1.75 decades). About 12
    # minutes on the reference 2-core CPU (README, "Modes").
    # With schedule=wsd: the branch-friendly grid of the same range (module docstring): 5 budgets
    # √2 apart, every depth at every budget, so each depth's 5 runs share one trunk.
    "quick": dict(design="isoflop", adaptive=True, budgets=[6e11, 1.2e12, 2.4e12],
                  depths={6e11: [1, 2, 3, 4], 1.2e12: [1, 2, 3, 4], 2.4e12: [1, 2, 3, 4, 5]},
                  base=dict(aspect=16, head_dim=8, context=64, batch_tokens=8192, eval_tokens=16384),
                  wsd=dict(budgets=[6e11, 8.5e11, 1.2e12, 1.7e12, 2.4e12],
                           depths={c: [1, 2, 3, 4, 5] for c in (6e11, 8.5e11, 1.2e12, 1.7e12, 2.4e12)})),
    # For a laptop GPU (MPS) or a CUDA card: 4 budgets × 5 sizes.
    "dev": dict(design="isoflop", adaptive=True, budgets=[1e13, 3e13, 1e14, 3e14],
                depths={c: [2, 3, 4, 5, 6] for c in (1e13, 3e13, 1e14, 3e14)},
                base=dict(context=128, batch_tokens=16384, eval_tokens=65536)),
    # For a CUDA card: 5 budgets × 6 sizes, wider models.
    "full": dict(design="isoflop", adaptive=True, budgets=[1e15, 3e15, 1e16, 3e16, 1e17],
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


BRANCHING = ("auto", "true", "false")


def make_plan(mode: str, design: str | None = None, overrides: dict | None = None,
              branching: str | bool = "auto") -> Plan:
    """The plan of MODE, in its own design or in DESIGN (same sizes and compute scale).

    BRANCHING: auto (on when schedule=wsd), true or false. A wsd plan gets the mode's wsd grid
    and length-free warmups either way (module docstring)."""
    plan = _make_plan(mode, design, overrides)
    wsd = plan.points[0].config.schedule == "wsd"
    choice = str(branching).lower()
    if choice not in BRANCHING:
        raise SuiteError(f"branching must be one of {', '.join(BRANCHING)}, got {branching!r}")
    if choice == "true" and not wsd:
        raise SuiteError("branching needs schedule=wsd (a constant learning rate until the cooldown), "
                         f"got schedule={plan.points[0].config.schedule}")
    if choice == "true" and plan.points[0].config.early_stop:
        raise SuiteError("branching and early_stop do not combine: a trunk stopped early has no checkpoints "
                         "for its longer-lived branches")
    on = wsd and not plan.points[0].config.early_stop if choice == "auto" else choice == "true"
    fix = wsd and "warmup_tokens" not in (overrides or {})
    points = length_free_warmup(plan.points) if fix else plan.points
    return Plan(plan.mode, plan.design, points, branching=on, length_free_warmup=fix)


def length_free_warmup(points) -> tuple[Point, ...]:
    """Each group of runs that differ only in the budget gets one warmup_tokens: the default rule,
    min(N, warmup_max_frac · D) (Porian et al. 2024 §4.2), at the group's shortest D. Under WSD
    the schedule up to the cooldown must not depend on the run's length (Hägele et al. 2024 §3),
    else the runs of a group cannot share a trunk (schedule.branch_problem)."""
    def group(c):
        return tuple(v for k, v in sorted(c.to_params().items()) if k not in BRANCH_FIELDS)

    shortest = {}
    for p in points:
        d = p.config.derived()
        g = group(p.config)
        shortest[g] = min(shortest.get(g, math.inf), d.D)
    out = []
    for p in points:
        c = p.config
        if c.warmup_tokens >= 0:
            out.append(p)
            continue
        warm = min(c.derived().N, c.warmup_max_frac * shortest[group(c)])
        out.append(Point(c.replace(warmup_tokens=float(round(warm))), p.tags))
    return tuple(out)


def _make_plan(mode: str, design: str | None, overrides: dict | None) -> Plan:
    if mode not in MODES:
        raise SuiteError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    spec = MODES[mode]
    design = design or spec["design"]
    if design not in DESIGNS:
        raise SuiteError(f"unknown design {design!r}; choose one of: {', '.join((ADAPTIVE,) + DESIGNS)}")
    base = {**spec["base"], **(overrides or {})}
    if "wsd" in spec and make_config(**base, D=1e9).schedule == "wsd":
        spec = {**spec, **spec["wsd"]}
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
    A branch trains (and evaluates) only its cooldown.
    """
    total, spent = 0.0, plan.spent()
    for i, p in enumerate(plan.points):
        d = p.config.derived()
        part = spent[i] / d.C
        n_evals = d.steps // d.eval_every + 1
        eval_flops = n_evals * p.config.eval_tokens * d.flops_per_token / 3
        total += part * (d.C + eval_flops) / rate[p.config.depth] + per_run_s
    return total


TIME_OVERHEAD_S = 40.0   # a study's set-up and analysis, outside its runs' training


def check_time_budget(seconds: float, overhead_s: float = TIME_OVERHEAD_S) -> None:
    """Refuse a budget that the overhead alone exceeds: before the speed probe, which costs a minute."""
    if seconds <= overhead_s:
        raise SuiteError(f"a budget of {seconds:.0f}s is too small: set-up and analysis alone take about {overhead_s:.0f}s")


def fit_to_time(mode: str, design: str | None, seconds: float, rate: dict[int, float],
                overrides: dict | None = None, overhead_s: float = TIME_OVERHEAD_S, branching: str | bool = "auto") -> Plan:
    """The largest plan of the design whose estimated wall time fits SECONDS.

    RATE is this device's measured training FLOP/s per depth (sweep.probe_rates). The mode's
    budgets (IsoFLOP) or tokens (sweeps) are all scaled by one factor, so the design's shape (sizes,
    spacing, tokens per parameter) is kept and only its scale moves; a run too small for one
    optimizer step is an error, never silently dropped. overhead_s: set-up and the analysis.
    """
    base = make_plan(mode, design, overrides, branching)
    check_time_budget(seconds, overhead_s)
    target = seconds - overhead_s
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
        if plan.length_free_warmup:   # redone for the new lengths below
            changed["warmup_tokens"] = -1.0
        pts.append(Point(make_config(**{**c.to_params(), **changed}), tags))
    pts = length_free_warmup(pts) if plan.length_free_warmup else tuple(pts)
    return Plan(plan.mode, plan.design, pts, plan.branching, plan.length_free_warmup)


def parse_duration(text: str) -> float:
    """'90s', '10m', '1.5h', '1h30m' or a bare number of seconds -> seconds."""
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
