"""The search space of an allocation study: the sizes one budget may train, and the samplers.

Below the Optuna search (optimize.py), which creates a study per budget, and the workers
(worker.py), which train its trials: both rebuild the same Space from the study's spec.

The search dial: a trial suggests log10 N (continuous) and trains the nearest shape of a table of
(depth, aspect) shapes, aspect within a factor `spread` of the base aspect. The depth dial alone is
too coarse (depth 1 -> 2 -> 3 is N 22k -> 35k -> 96k ... at aspect 32); letting aspect vary gives a
size every few percent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import optuna

from .config import RunConfig, derive, make_config, validate
from .errors import SuiteError
from .model import ModelShape, count_params

SAMPLERS = ("gp", "grid+gp", "tpe", "grid+tpe", "random", "grid")
DEFAULT_SAMPLER = "grid+gp"   # chosen by measurement: benchmarks/optimize_vs_grid.py --samplers
TUNABLE = ("lr", "beta2")
SEARCHED = ("depth", "aspect", "D", "C", "tokens_per_param")   # set per trial, never by the user


# --- the search space --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    N: int
    depth: int
    aspect: int
    d_model: int


def shape_table(base: RunConfig, spread: float, max_N: float) -> list[Shape]:
    """Shapes of N <= max_N, sorted by N: each (depth, width) once, at the aspect nearest the base's.

    Shapes within 2% of a smaller kept one are dropped unless their aspect is nearer the base's.
    A one-layer shape is kept only below the smallest two-layer one of two heads or more: Kaplan et
    al. (2020, §3.1 and Fig. 6) find models of fewer than two layers off the trend that deeper ones
    follow, and every stored study here agreed (the wide one-layer runs sat 0.01-0.06 nats above
    their budget's quadratic in log N, the two-layer ones below it; docs/adaptive.md).
    """
    lo, hi = max(1, math.floor(base.aspect / spread)), math.ceil(base.aspect * spread)
    best: dict[tuple, tuple] = {}
    shallow_below = math.inf      # the smallest two-layer shape of two heads or more
    depth = 0
    while True:
        depth += 1
        smallest = None
        for a in range(lo, hi + 1):
            s = ModelShape.from_dial(depth, a, base.head_dim, base.vocab_size, base.context)
            n = count_params(s)["N"]
            smallest = n if smallest is None else min(smallest, n)
            if depth == 2 and s.d_model >= 2 * base.head_dim:
                shallow_below = min(shallow_below, n)
            far = abs(math.log(a / base.aspect))
            if n <= max_N and ((depth, s.d_model) not in best or far < best[(depth, s.d_model)][0]):
                best[(depth, s.d_model)] = (far, Shape(n, depth, a, s.d_model))
        if (smallest > max_N and depth >= 2) or depth > 256:
            break
    kept: list[tuple] = []
    for far, shape in sorted(best.values(), key=lambda v: v[1].N):
        if shape.depth == 1 and shape.N >= shallow_below:
            continue
        if kept and shape.N < 1.02 * kept[-1][1].N:
            if far < kept[-1][0]:
                kept[-1] = (far, shape)
            continue
        kept.append((far, shape))
    return [s for _, s in kept]


class Space:
    """The sizes one budget's search may train, and how a trial picks one."""

    def __init__(self, base: RunConfig, C: float, spread: float = 2.0, min_tpp: float = 1.0,
                 max_tpp: float = 1e4, min_steps: int = 20, tune: tuple = (), N_min: float = 0.0,
                 N_max: float = math.inf, D_max: float = math.inf, lr_rule: dict | None = None):
        if not (math.isfinite(C) and C > 0):
            raise SuiteError(f"--flops must be positive numbers, got {C}")
        if spread < 1:
            raise SuiteError(f"--spread must be at least 1 (1 = the depth dial alone), got {spread}")
        self.base, self.C, self.spread = base, float(C), float(spread)
        self.min_tpp, self.max_tpp, self.min_steps, self.tune = float(min_tpp), float(max_tpp), int(min_steps), tuple(tune)
        # An adaptive study's window around the expected optimum, and its corpus limit (D_max: a
        # run that would repeat the training split more often is left out; ladder.py).
        self.N_min, self.N_max, self.D_max = float(N_min), float(N_max), float(D_max)
        self.lr_rule = lr_rule     # each size's lr (lr_from_rule); None: the base's lr for every size
        bad = set(self.tune) - set(TUNABLE)
        if bad:
            raise SuiteError(f"--tune takes {', '.join(TUNABLE)}, got {', '.join(sorted(bad))}")
        # D/N >= min_tpp and C ≈ 6 N D bound N above by sqrt(C / (6 min_tpp)).
        table = shape_table(base, spread, math.sqrt(C / 6 / self.min_tpp) * 1.1)
        self.shapes = []
        for s in table:
            d = self._derive(s)
            if (d is not None and d.steps >= self.min_steps and self.min_tpp <= d.D / d.N <= self.max_tpp
                    and self.N_min <= s.N <= self.N_max and d.D <= self.D_max):
                self.shapes.append(s)
        if len(self.shapes) < 2:
            smallest = table[0] if table else Shape(0, 1, base.aspect, 0)
            d = self._derive(smallest) if table else None
            got = f"{d.D:,} tokens ({d.steps} steps)" if d else "less than one batch"
            raise SuiteError(f"budget C={C:.3g} FLOPs is too small for this search: the smallest model "
                             f"(N={smallest.N:,}, depth {smallest.depth}) would train on {got}; it needs at least "
                             f"{self.min_steps} steps of {base.batch_tokens} tokens and D/N >= {self.min_tpp:g} for "
                             "two sizes; raise --flops, or lower batch_tokens, --min_steps or --min_tpp")
        self.logN = [math.log10(s.N) for s in self.shapes]
        self.lo, self.hi = self.logN[0], self.logN[-1]

    def _derive(self, s: Shape):
        try:
            return derive(self.base.replace(depth=s.depth, aspect=s.aspect, C=self.C, D=0.0, tokens_per_param=0.0))
        except SuiteError:
            return None

    def config(self, s: Shape, **extra) -> RunConfig:
        cfg = self.base.replace(depth=s.depth, aspect=s.aspect, C=self.C, D=0.0, tokens_per_param=0.0, **extra)
        if self.lr_rule and "lr" not in extra:
            cfg = cfg.replace(lr=lr_from_rule(self.lr_rule, cfg))
        validate(cfg)
        return cfg

    def suggest(self, trial) -> tuple[float, dict]:
        x = trial.suggest_float("log10_N", self.lo, self.hi)
        extra = {}
        if "lr" in self.tune:
            extra["lr"] = trial.suggest_float("lr", self.base.lr / 4, self.base.lr * 4, log=True)
        if "beta2" in self.tune:
            extra["beta2"] = trial.suggest_float("beta2", 0.9, 0.999)
        return x, extra

    def nearest(self, x: float) -> list[Shape]:
        """All shapes, nearest to log10 N = x first."""
        return [s for _, s in sorted(zip((abs(v - x) for v in self.logN), self.shapes), key=lambda p: p[0])]

    def grid(self, k: int) -> list[Shape]:
        """k distinct shapes evenly spaced in log N across the range (a coarse pass brackets the minimum)."""
        if k <= 0:
            return []
        k = min(k, len(self.shapes))
        targets = [self.lo + (self.hi - self.lo) * i / max(1, k - 1) for i in range(k)] if k > 1 else [(self.lo + self.hi) / 2]
        out: list[Shape] = []
        for x in targets:
            out.append(next(s for s in self.nearest(x) if s not in out))
        return sorted(out, key=lambda s: s.N)

    def to_spec(self) -> dict:
        return {"C": self.C, "base": self.base.to_params(), "spread": self.spread, "min_tpp": self.min_tpp,
                "max_tpp": self.max_tpp, "min_steps": self.min_steps, "tune": list(self.tune),
                **({"N_min": self.N_min, "N_max": self.N_max, "D_max": self.D_max}
                   if (self.N_min, self.N_max, self.D_max) != (0.0, math.inf, math.inf) else {}),
                **({"lr_rule": self.lr_rule} if self.lr_rule else {})}

    @classmethod
    def from_spec(cls, spec: dict) -> "Space":
        return cls(make_config(**spec["base"]), spec["C"], spec["spread"], spec["min_tpp"], spec["max_tpp"],
                   spec["min_steps"], tuple(spec["tune"]), spec.get("N_min", 0.0), spec.get("N_max", math.inf),
                   spec.get("D_max", math.inf), spec.get("lr_rule"))


def lr_from_rule(rule: dict, cfg: RunConfig) -> float:
    """The lr of CFG under an adaptive study's rule (adaptive.lr_rule_for): fixed; a law c N^-k
    tuned at batch B_ref, moved to CFG's batch by the square-root rule for Adam (Malladi et al.
    2022, §4: lr ∝ sqrt(B)); or DeepSeek LLM's 0.3118 C^-0.125 (§3.1, which sets the batch jointly)."""
    kind = rule["kind"]
    if kind == "fixed":
        return float(rule["lr"])
    if kind == "law":
        return float(rule["c"] * derive(cfg).N ** -rule["k"] * math.sqrt(cfg.batch_tokens / rule["B_ref"]))
    if kind == "rule":
        return float(0.3118 * derive(cfg).C ** -0.125)
    raise SuiteError(f"unknown lr rule {kind!r}")


def make_sampler(name: str, seed: int | None = None, n_startup: int = 4):
    """The sampler for one worker. For grid+X the coarse grid is queued at study creation."""
    kind = name.split("+")[-1]
    if kind == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(1, n_startup))
    if kind == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(1, n_startup), constant_liar=True)
    if kind in ("random", "grid"):
        return optuna.samplers.RandomSampler(seed=seed)
    raise SuiteError(f"unknown --sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
