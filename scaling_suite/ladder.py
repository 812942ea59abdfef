"""The plan of an adaptive study (design `adaptive`): a ladder of compute budgets that fits a box
of wall time on this machine, and a validation budget beyond it. Pure: rates in, ladder out, so a
faster device (a stubbed probe in the tests) shows what the planner would do there.

The rules, and why:

- **A mode is a box of wall time** on the machine it runs on (BOXES), planned from this device's
  measured training speed (adaptive.probe: FLOP/s at a few sizes, log-linear in N between them),
  not a fixed list of budgets: on a 10x faster device the same mode trains 10x larger budgets.
- **The first budget** is the smallest whose expected optimum lies above the smallest sensible
  model (two attention heads at depth 1): below it the minimum cannot be bracketed from above and
  below with models worth the name. The expectation is a prior allocation N*(C) = sqrt(C / (6 r))
  (D = r N at the optimum and C ≈ 6 N D: Hoffmann et al. 2022 §3, with r the mode's tokens per
  parameter at the optimum, measured at this scale: PRIORS); the search corrects it from the first
  budget on.
- **Budgets r_C apart** (r_C >= 2): approach 2's slope needs budgets spread in log C. The ladder
  grows upward while the box allows, up to MAX_BUDGETS; beyond that the spacing widens instead,
  so a fast device gets a wider ladder, not a denser one. During the study (adaptive.widen), where
  the corpus or the box stops it growing, the time left goes to budgets between its budgets
  (fill_gap), up to MAX_FILLED.
- **Validation**: one run at >= 2x the largest budget, at the optimum the fitted law predicts, so
  the study tests its own law out of sample (as a lab does before a large run). It gets what the
  box leaves after the ladder, at least VALIDATION_MIN x the top budget.
- **Global batch grows with the budget**: B ∝ C^0.3271, the exponent of the batch-size law of
  DeepSeek LLM (DeepSeek-AI 2024, §3.1, B_opt = 0.292 C^0.3271), anchored at the mode's batch at
  its reference budget (this CPU's step overhead makes DeepSeek's absolute batches, ~2k tokens at
  1e12, slow here), in whole sequences. The learning rate follows it by
  the square-root rule for Adam (Malladi et al. 2022, "On the SDEs and Scaling Rules for Adaptive
  Gradient Algorithms", §4): lr ∝ sqrt(B). So no budget's runs have only a few dozen steps.
- **Cost of a budget**: RUNS_PER_BUDGET runs near its optimum, each C (plus its evaluations, a
  forward pass being a third of a step: Kaplan et al. 2020 Table 1) at the rate of its size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import SuiteError

# Wall seconds of each mode's box, set-up, probe, runs and analysis included. quick: `make quick`
# must finish in 15 minutes on a 2-core CPU, of which ~40 s are the install and `mlflow run`.
BOXES = {"smoke": 150.0, "quick": 13 * 60.0, "dev": 60 * 60.0, "full": 8 * 3600.0}
# Tokens per parameter at the optimum, for the first budget's guess only. quick: measured at this
# scale (the quick IsoFLOP study, N* ≈ 35k at C = 1.2e12, D*/N* ≈ 150; the tiny models' embedding
# and attention make the optimum data-heavy); dev/full: towards Chinchilla's 20 as models grow.
PRIORS = {"smoke": 20.0, "quick": 150.0, "dev": 60.0, "full": 20.0}
C_REF = {"smoke": 3e9, "quick": 1.2e12, "dev": 1e14, "full": 1e16}   # where each mode's base batch is right
RUNS_PER_BUDGET = 5.0       # expected runs to bracket and pin one budget's minimum (seeds + search)
MIN_BUDGETS = 4             # --target_width stops no ladder shorter: a's OLS interval from 3 minima (1 dof) is narrow by luck
MAX_BUDGETS = 6
MAX_FILLED = 9              # with budgets between those of the ladder (fill_gap): Hoffmann et al. 2022 §3.2 used 9
RATIO = 2.0                 # least spacing of the budgets
VALIDATION_MIN = 2.0        # the validation budget, at least this x the largest fitted budget
VALIDATION_SHARE = 0.25     # at most this share of the training time goes to the validation run
BATCH_EXPONENT = 0.3271     # DeepSeek LLM §3.1
EVAL_SHARE = 1 / 3          # an evaluation token costs a third of a training token (forward only)
EVAL_TOKENS = 0.3           # evaluation tokens per training token: ~20 evaluations, ~30% of D at the small budgets
PER_RUN_S = 2.0             # opening a run, the first evaluation, checkpoints: 1-2 s here (smoke-scale runs)
WORKER_START_S = 10.0       # worker processes importing torch and loading the corpus (their first run is slower)
MAX_EPOCHS = 4.0            # Muennighoff et al. 2023 §4: up to ~4 epochs repeated data is as good as new


@dataclass(frozen=True)
class Rates:
    """Measured training FLOP/s at a few sizes (one worker), and how many workers share the box."""
    points: tuple            # ((N, FLOP/s), ...)
    workers: int = 1
    efficiency: float = 1.0  # each of `workers` concurrent runs trains at this share of its alone-rate
    alone_speedup: float = 1.0  # one run alone on every core / on one worker's threads (the validation run)

    def at(self, N: float) -> float:
        """FLOP/s of one worker at size N: log-linear between the probed sizes, flat beyond them."""
        pts = sorted(self.points)
        if len(pts) == 1 or N <= pts[0][0]:
            return pts[0][1]
        if N >= pts[-1][0]:
            return pts[-1][1]
        for (n0, r0), (n1, r1) in zip(pts, pts[1:]):
            if n0 <= N <= n1:
                t = math.log(N / n0) / math.log(n1 / n0)
                return math.exp(math.log(r0) + t * math.log(r1 / r0))
        return pts[-1][1]

    def scaled(self, factor: float) -> "Rates":
        return Rates(tuple((n, r * factor) for n, r in self.points), self.workers, self.efficiency, self.alone_speedup)


@dataclass(frozen=True)
class Rung:
    C: float
    batch_tokens: int
    N_guess: float           # the prior's N*(C): where the first budget's seeds go
    est_seconds: float = 0.0  # the plan's estimate of this budget's search


@dataclass(frozen=True)
class Ladder:
    rungs: tuple
    validation_C: float
    box_seconds: float
    train_seconds: float     # the box less set-up and analysis
    est_ladder_seconds: float
    est_validation_seconds: float
    ratio: float
    N_floor: int

    def validation_seconds(self, C: float, calib: float) -> float:
        """The validation run's estimated seconds at budget C: the plan's estimate per FLOP, x calib."""
        return self.est_validation_seconds / self.validation_C * C * max(calib, 0.5)

    @property
    def span_decades(self) -> float:
        return math.log10(max(r.C for r in self.rungs) / min(r.C for r in self.rungs)) if self.rungs else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["rungs"] = [asdict(r) for r in self.rungs]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Ladder":
        return cls(**{**d, "rungs": tuple(Rung(**r) for r in d["rungs"])})

    def describe(self) -> str:
        cs = ", ".join(f"{r.C:.3g}" for r in self.rungs)
        return (f"{len(self.rungs)} budgets {cs} FLOPs ({self.span_decades:.2f} decades, {self.ratio:.2g}x apart), "
                f"validation at {self.validation_C:.3g}; estimated {self.est_ladder_seconds:.0f}s + "
                f"{self.est_validation_seconds:.0f}s of {self.train_seconds:.0f}s for training")


def fill_gap(rungs, ratio: float) -> tuple[Rung, Rung] | None:
    """Two of the ladder's budgets (RUNGS, in any order) RATIO apart with none between them, where
    a budget at their geometric mean fills in; None when every such gap is filled. Used where the
    ladder cannot grow upward (the corpus or the box stops it): more budgets over the same span
    still narrow the slope's interval (the OLS standard error falls as 1/sqrt(Sxx), and the degrees
    of freedom rise). The gap farthest from the ladder's centre in log C first (the most leverage
    on the slope); of two equally far, the lower (the cheaper)."""
    rs = sorted(rungs, key=lambda r: r.C)
    gaps = [(a, b) for a, b in zip(rs, rs[1:]) if b.C / a.C >= ratio * 0.99]
    if not gaps:
        return None
    centre = math.log(rs[0].C * rs[-1].C) / 2
    return max(gaps, key=lambda g: (round(abs(math.log(g[0].C * g[1].C) / 2 - centre), 6), -g[0].C))


def tokens_for(C: float, N: float) -> float:
    """D of a run of size N on budget C, with C = 6 N D (Hoffmann et al. 2022 §3)."""
    return C / (6.0 * N)


def max_tokens(train_tokens: int) -> float:
    """The most tokens a run may train on a corpus of TRAIN_TOKENS: MAX_EPOCHS repeats of it."""
    return MAX_EPOCHS * train_tokens


def prior_N(C: float, tokens_per_param: float) -> float:
    """N*(C) if D* = r N* and C = 6 N D (Hoffmann et al. 2022 §3): sqrt(C / (6 r))."""
    return math.sqrt(C / (6.0 * tokens_per_param))


def batch_for(C: float, base_batch: int, C_ref: float, context: int) -> int:
    """The global batch at budget C: base_batch at C_ref, ∝ C^0.3271 (DeepSeek LLM §3.1), rounded to
    whole sequences of the context (at least 8), so it grows smoothly along the ladder and the
    validation run's batch follows the same rule as the runs the law was fitted to."""
    want = base_batch * (C / C_ref) ** BATCH_EXPONENT
    return int(max(8, round(want / context)) * context)


def batch_at(C: float, mode: str, base_batch: int, context: int) -> int:
    """batch_for with the mode's reference budget: the batch of any run of an adaptive study at C."""
    return batch_for(C, base_batch, C_REF.get(mode, 1e12), context)


def run_seconds(C: float, N: float, rates: Rates) -> float:
    """Wall seconds of one run of budget C at size N on one worker (its evaluations included)."""
    per_worker = rates.at(N) * (rates.efficiency if rates.workers > 1 else 1.0)
    return C * (1 + EVAL_TOKENS * EVAL_SHARE) / per_worker + PER_RUN_S


def budget_seconds(C: float, N: float, rates: Rates, runs: float = RUNS_PER_BUDGET) -> float:
    """Wall seconds of one budget's search: RUNS runs near N, `workers` at a time."""
    return runs * run_seconds(C, N, rates) / max(1, rates.workers)


def plan_ladder(box_seconds: float, rates: Rates, tokens_per_param: float, N_floor: int, base_batch: int,
                C_ref: float, context: int, overhead_seconds: float, N_ceiling: float = math.inf) -> Ladder:
    """The widest ladder of budgets, and its validation budget, whose estimated wall time fits the box.

    N_floor: the smallest sensible model (the first budget's optimum lies above it); N_ceiling: the
    largest model the device can hold (budgets whose optimum is beyond it are not planned).
    Raises SuiteError when not even one budget (and its validation run) fits."""
    train_s = box_seconds - overhead_seconds
    if train_s <= 0:
        raise SuiteError(f"a box of {box_seconds:.0f}s is too small: set-up, the speed probe and the analysis "
                         f"alone take about {overhead_seconds:.0f}s")
    # The first budget: its prior optimum sqrt(C / 6r) at the floor.
    C1 = 6.0 * tokens_per_param * N_floor ** 2

    def cost(cs):
        return sum(budget_seconds(c, prior_N(c, tokens_per_param), rates) for c in cs)

    alone = Rates(rates.points).scaled(rates.alone_speedup)   # the validation run trains alone, on every core

    def validation(cs):
        """(C_v, its seconds): the largest budget >= VALIDATION_MIN x the top one that the rest of the
        box, and at most VALIDATION_SHARE of it, allows (up to 4x)."""
        top = cs[-1]
        allowed = min(max(train_s - cost(cs), 0.0), VALIDATION_SHARE * train_s)
        Cv = VALIDATION_MIN * top
        while Cv * 1.25 <= 4 * top and run_seconds(Cv * 1.25, prior_N(Cv * 1.25, tokens_per_param), alone) <= allowed:
            Cv *= 1.25
        return Cv, run_seconds(Cv, prior_N(Cv, tokens_per_param), alone)

    def fits(cs):
        if prior_N(cs[-1], tokens_per_param) > N_ceiling:
            return False
        Cv, tv = validation(cs)
        return cost(cs) + tv <= train_s

    if not fits([C1]):
        need = cost([C1]) + validation([C1])[1]
        raise SuiteError(f"a box of {box_seconds:.0f}s is too small for one bracketed budget on this device: the "
                         f"smallest useful budget ({C1:.3g} FLOPs, about {RUNS_PER_BUDGET:.0f} runs) and its "
                         f"validation run need about {need + overhead_seconds:.0f}s; give a larger --budget")
    # Grow upward at RATIO while the box allows (up to MAX_BUDGETS), then widen the spacing.
    ratio = RATIO
    cs = [C1]
    while len(cs) < MAX_BUDGETS and fits(cs + [cs[-1] * ratio]):
        cs.append(cs[-1] * ratio)
    if len(cs) == MAX_BUDGETS:
        lo, hi = ratio, 1e4
        for _ in range(40):
            mid = math.sqrt(lo * hi)
            if fits([C1 * mid ** i for i in range(MAX_BUDGETS)]):
                lo = mid
            else:
                hi = mid
        ratio = lo
        cs = [C1 * ratio ** i for i in range(MAX_BUDGETS)]
    Cv, tv = validation(cs)
    rungs = tuple(Rung(c, batch_for(c, base_batch, C_ref, context), prior_N(c, tokens_per_param), cost([c]))
                  for c in cs)
    return Ladder(rungs, Cv, box_seconds, train_s, cost(cs), tv, ratio, int(N_floor))
