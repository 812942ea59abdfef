"""When to compile the training forward, and compiling it (torch.compile, TorchInductor).

CompilePolicy is the decision train.py asks: compile from the first step (`compile=true`), never
(`false`), or (`auto`) after timing a few eager steps, when the time saved repays the warm-up.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .cache import cache_root, read_json, write_json
from .config import RunConfig
from .device import compile_support, pick_precision, recompile_limit_problem
from .errors import SuiteError
from .model import ModelShape

# torch.compile (TorchInductor) fuses the elementwise work between the matmuls (norms, rotary
# embeddings, SwiGLU, residual adds) into a few generated kernels. At the widths a CPU trains
# (d_model 16-192) that work, not the matmuls, dominates an eager step: compiled steps were
# 1.2-2x faster on the reference 2-core CPU (benchmarks/throughput.py). The price is a warm-up:
# tracing plus C++ compilation of the kernels, paid once per model shape per process, and mostly
# once per machine: inductor keeps the compiled kernels on disk (under the suite's cache, so they
# survive a reboot), and a later process of the same graph warms up faster. compile_warmups.json
# records the last warm-up of each graph compiled here, which the rule then expects.
# (Where inductor keeps its kernels is set on import of device.py.)
COMPILE_WARM_S = 5.0    # a shape this process compiled before (guards, cache lookups); a floor
COMPILE_PROBE_STEPS = 8 # eager steps timed before an `auto` decision
_compiled_shapes: set = set()


def compile_cold_s(shape: ModelShape) -> float:
    """Expected warm-up of a shape not compiled in this process: tracing and C++ codegen grow with
    the number of layers (measured 15-30 s for depths 1-5 on the reference CPU, cold cache)."""
    return 10.0 + 5.0 * shape.depth


def compile_gain(shape: ModelShape, precision: str = "fp32") -> float:
    """Share of an eager step a compiled step of PRECISION is assumed to save, on the low side of
    what was measured (benchmarks/throughput.py, reference CPU): fp32 45% at d_model 16-32, where
    elementwise work and dispatch dominate the step, 20-35% at 48-80; compiled bf16 (AMX GEMMs)
    against the eager fp32 step 45-60% at d_model 32-192."""
    if precision == "bf16":
        return 0.4
    return 0.4 if shape.d_model <= 32 else 0.2


def compiled_shapes() -> frozenset:
    """Shapes this process has compiled (their warm-up is guards and cache lookups)."""
    return frozenset(_compiled_shapes)


def compile_key(device: torch.device, shape: ModelShape, precision: str, micro_batch: int) -> str:
    """What a compiled training graph depends on, as a key of the warm-up record."""
    return f"torch {torch.__version__} | {device.type} | {precision} | micro_batch {micro_batch} | {shape}"


def _warmup_record() -> Path:
    return cache_root() / "compile_warmups.json"


def known_warmups() -> dict:
    return read_json(_warmup_record())


def record_warmup(key: str, seconds: float) -> None:
    """Remember a measured warm-up (best effort: an unwritable cache only loses the hint)."""
    write_json(_warmup_record(), {**known_warmups(), key: round(seconds, 2)})


def compile_pays(shape: ModelShape, eager_step_s: float, steps_left: int, precision: str = "fp32",
                 key: str | None = None) -> tuple[bool, str]:
    """Whether compiling now is repaid within the run: saved time > expected warm-up (5 s for a
    shape compiled in this process, the last warm-up measured on this machine for graph KEY, else
    the cold estimate)."""
    if shape in _compiled_shapes:
        warm, source = COMPILE_WARM_S, "compiled in this process"
    elif key is not None and key in (known := known_warmups()):
        # Compiled on this machine before: its kernels are in inductor's disk cache, and the last
        # warm-up measured here is the estimate (a process's first compile still traces the model:
        # 11-19 s at depths 1-3 with the cache warm against 18-33 s cold, `make quick` here).
        warm, source = max(known[key], COMPILE_WARM_S), "as last measured on this machine"
    else:
        warm, source = compile_cold_s(shape), "cold"
    saved = steps_left * eager_step_s * compile_gain(shape, precision)
    why = (f"{steps_left} steps left at {eager_step_s * 1e3:.0f} ms: ~{saved:.0f}s saved vs ~{warm:.0f}s warm-up "
           f"({source})")
    return saved > warm, why


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The compiled training forward; parameters are shared with MODEL (evaluation stays eager)."""
    problem = recompile_limit_problem()
    if problem:
        raise SuiteError(problem)
    _compiled_shapes.add(model.shape)
    # A study or tuning process trains many shapes; past dynamo's default of 8 graphs per
    # function it would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    # dynamic=False: every step has the same shapes; a size not seen before gets its own graph
    # rather than a slower shape-generic one.
    return torch.compile(model, dynamic=False)


class CompilePolicy:
    """torch.compile of the training forward: `true` from the first step; `auto` after
    timing a few eager steps, and only when the time saved repays the warm-up within this run.
    The same function in fused kernels: losses agree with eager to float rounding
    (tests/test_train.py). Evaluation stays eager, so it costs no second graph.
    precision=auto may differ for compiled steps (device.pick_precision: bf16 on an AMX CPU at
    d_model >= 32): eager steps and every evaluation run in the placement's precision, compiled
    steps in the precision chosen with the compile.

    `at` is the step where the decision is made (None: never compiled, tagged so at once)."""

    def __init__(self, cfg: RunConfig, d, pl, start: int, tracker):
        self.cfg, self.shape, self.eager_precision, self.tracker = cfg, d.shape, pl.precision, tracker
        why_not = compile_support(pl.device) if cfg.compile != "false" else "compile=false"
        if cfg.compile == "true" and why_not:
            raise SuiteError(f"compile=true, but {why_not}")
        self.precision = pick_precision(pl.device, cfg.precision, d.shape, compiled=True)
        self.key = compile_key(pl.device, d.shape, self.precision, pl.micro_batch)
        self.at, self.fresh = None, False
        if why_not is None:
            self.at = start if cfg.compile == "true" else start + COMPILE_PROBE_STEPS
        if self.at is None or self.at >= d.steps:
            why_not = why_not or f"the run's {d.steps - start} steps are too few to time and repay a compile"
            tracker.set_tags({"compile": "false", "compile_reason": why_not})

    def decide(self, model, step_seconds: list, steps_left: int):
        """(the forward to train with, its precision), tagged with the reason."""
        if self.cfg.compile == "true":
            use, why = True, "compile=true"
        else:   # median of the timed eager steps, the first two (allocation) left out
            use, why = compile_pays(self.shape, float(np.median(step_seconds[2:])), steps_left, self.precision,
                                    self.key)
        self.fresh = self.shape not in compiled_shapes()   # the process's first compile of it: worth recording
        fwd, precision = (compile_model(model), self.precision) if use else (model, self.eager_precision)
        self.tracker.set_tags({"compile": str(use).lower(), "compile_reason": why, "precision": precision,
                               **({"precision_eager": self.eager_precision} if precision != self.eager_precision
                                  else {})})
        return fwd, precision

    def record(self, step_seconds: list, tokens: int) -> None:
        """The first compiled step's excess over the eager median: the warm-up, logged, and
        remembered for the next process that compiles this graph (record_warmup)."""
        warm = max(0.0, step_seconds[-1] - float(np.median(step_seconds[2:-1] or [0])))
        self.tracker.log_metrics({"compile_seconds": warm}, step=tokens)
        if self.fresh:
            record_warmup(self.key, warm)
