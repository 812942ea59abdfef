"""The learning-rate schedule as a pure function of the step, when two runs share it, and how to
read it back from a run's logged lr (lr_from_history).

Below the training loop (train.py) and the study planner (plan.py), which both ask it: the planner
groups WSD runs into trunks and branches, the loop sets each step's lr and refuses a checkpoint
that cannot start a branch.
"""

from __future__ import annotations

import math

import numpy as np

from .config import Derived, RunConfig


def lr_at(step: int, cfg: RunConfig, d: Derived) -> float:
    """Peak lr times the schedule's multiplier at this optimizer step."""
    if step < d.warmup_steps:                       # linear warmup
        return cfg.lr * (step + 1) / d.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "cosine":
        # Cosine to 10% of peak: Hoffmann et al. 2022 §3 / App. B found decaying by 10× over the
        # run's own length (not longer) matters for compute-optimal fits.
        p = (step - d.warmup_steps) / max(1, d.steps - d.warmup_steps)
        return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * p)))
    # wsd: warmup-stable-decay with a (1 - sqrt) cooldown over the last cooldown_frac of steps,
    # Hägele et al. 2024 ("Scaling Laws and Compute-Optimal Training Beyond Fixed Training
    # Durations", §3), which matches cosine at the same length.
    start = cooldown_start(cfg, d)
    if step < start:
        return cfg.lr
    return cfg.lr * (1 - math.sqrt((step - start) / max(1, d.steps - start)))


def lr_per_step(cfg: RunConfig, d: Derived) -> list[float]:
    """The lr of every optimizer step of the run (the loss predictor's schedule areas need them all)."""
    return [lr_at(s, cfg, d) for s in range(d.steps)]


def cooldown_start(cfg: RunConfig, d: Derived) -> int:
    return d.steps - max(1, round(cfg.cooldown_frac * d.steps))


# A branch (below) may start from a checkpoint of a run that differs in these fields only: the
# budget, and how often evaluations and checkpoints happen (neither changes the numerics).
BRANCH_FIELDS = ("D", "C", "tokens_per_param", "eval_every", "checkpoint_every")


def branch_problem(trunk: RunConfig, cfg: RunConfig, s: int) -> str | None:
    """Why CFG cannot be a WSD cooldown branch of TRUNK taken at step S, or None if it can.

    Hägele et al. 2024 §3.2: a branch continues from the trunk's state at step s and cools down
    over its own last cooldown_frac. That equals training CFG from scratch only when the two runs
    differ in the budget alone and their learning rates agree at every step before s (the same
    warmup, and s no later than either run's cooldown start)."""
    diff = [k for k in cfg.to_params() if k not in BRANCH_FIELDS and getattr(trunk, k) != getattr(cfg, k)]
    if diff:
        return f"the trunk differs in {', '.join(diff)}"
    if cfg.schedule != "wsd":
        return f"only a wsd run can branch, got schedule={cfg.schedule}"
    td, d = trunk.derived(), cfg.derived()
    if not 0 < s <= cooldown_start(cfg, d) or s > cooldown_start(trunk, td):
        return (f"step {s} is not within the constant phase of both runs (cooldown starts at step "
                f"{cooldown_start(cfg, d)} here, {cooldown_start(trunk, td)} in the trunk)")
    # Past both warmups and before both cooldowns the lr is the (equal) peak: only the warmup
    # steps need comparing.
    if any(lr_at(k, trunk, td) != lr_at(k, cfg, d) for k in range(min(s, max(td.warmup_steps, d.warmup_steps)))):
        return (f"the trunk's learning rate before step {s} differs from this run's "
                f"(warmup {td.warmup_steps} vs {d.warmup_steps} steps)")
    return None


def lr_from_history(tokens, lr, D: float, batch_tokens: float) -> np.ndarray | None:
    """A run's learning rate at every optimizer step from its logged `lr` history (train.py logs
    step s's lr at tokens (s + 1)·batch_tokens, every log_every steps; the steps between logged
    points are interpolated, the schedule being smooth there). None without a usable history."""
    t, v = np.asarray(tokens, dtype=float), np.asarray(lr, dtype=float)
    keep = np.isfinite(t) & np.isfinite(v) & (v > 0)
    steps = int(round(D / batch_tokens)) if batch_tokens > 0 else 0
    if steps < 1 or not keep.any():
        return None
    order = np.argsort(t[keep])
    return np.interp((np.arange(steps) + 1.0) * batch_tokens, t[keep][order], v[keep][order])
