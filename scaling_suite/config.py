"""One flat, typed configuration per training run, its presets, validation, and budget arithmetic.

Every field name is also the CLI flag (``--depth``), the MLproject parameter (``-P depth=``), the
MLflow param key, and the analysis DataFrame column: one name per concept. N, D and C always mean
parameters, tokens and training FLOPs.

``derived()`` is the ONE place where budgets are turned into model size, tokens and steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, fields

from .errors import SuiteError
from .model import ModelShape, count_params, flops_per_token

SCHEDULES = ("cosine", "wsd", "constant")
PARAMETRIZATIONS = ("standard", "mup")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILES = ("auto", "true", "false")
TOKENIZERS = ("byte", "bpe")


@dataclass(frozen=True)
class RunConfig:
    # data
    dataset: str = "stdlib"          # stdlib | hf:<name>[:<config>] | a local file, directory or glob
    tokenizer: str = "byte"          # byte | bpe
    vocab_size: int = 256            # 256 for byte; the BPE vocabulary size otherwise (≤ 65535)
    # model shape: one dial (depth) at a fixed aspect ratio and head size
    depth: int = 2
    aspect: int = 32                 # d_model = depth · aspect, rounded up to whole heads
    head_dim: int = 16
    context: int = 128
    # parametrization (model.py): standard, or μP (Yang et al. 2022) relative to mup_base_width
    parametrization: str = "standard"   # standard | mup
    mup_base_width: int = 0          # μP only: the d_model at which lr was tuned (required with mup)
    # budget: give exactly one of D (tokens), C (FLOPs) or tokens_per_param (D / N)
    D: float = 0.0
    C: float = 0.0
    tokens_per_param: float = 0.0
    # optimization; the global batch is part of the science and never changes with the device
    batch_tokens: int = 8192         # tokens per optimizer step (a multiple of context)
    lr: float = 3e-3
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_tokens: float = -1.0      # -1: N tokens (Porian et al. 2024 §4.2), capped at warmup_max_frac of D
    warmup_max_frac: float = 0.1
    schedule: str = "cosine"         # cosine (to 10% of peak) | wsd | constant
    cooldown_frac: float = 0.2       # wsd: the last 20% of steps cool down (Hägele et al. 2024 §3)
    # evaluation and checkpoints
    eval_every: int = 0              # steps between evaluations; 0: about 20 per run
    eval_tokens: int = 32768         # size of the fixed validation set
    checkpoint_every: int = 0        # steps between checkpoints; 0: about 5 per run
    # early stop by learning-curve extrapolation (earlystop.py); predictions are logged either way
    early_stop: bool = False         # stop once the predicted final loss is stable
    predict_from: float = 0.25       # fraction of the run after which predictions start
    # hardware (never changes the optimization: micro_batch only splits the global batch)
    device: str = "auto"             # auto | cpu | cuda[:i] | mps
    precision: str = "auto"          # auto | fp32 | bf16
    compile: str = "auto"            # auto | true | false: torch.compile the training step (compiling.py)
    micro_batch: int = 0             # sequences per forward pass; 0: planned from free memory
    seed: int = 0
    preset: str = ""                 # the preset these values started from (recorded only)

    def to_params(self) -> dict[str, str]:
        return {f.name: str(getattr(self, f.name)) for f in fields(self)}

    def replace(self, **kw) -> "RunConfig":
        return dataclasses.replace(self, **kw)

    def shape(self) -> ModelShape:
        return ModelShape.from_dial(self.depth, self.aspect, self.head_dim, self.vocab_size, self.context)

    def derived(self) -> "Derived":
        return derive(self)


# Presets change only model shape, budget, batch and evaluation fields (see MLproject: those
# are the fields a preset owns, so `mlflow run -P preset=...` never contradicts a logged param).
PRESETS: dict[str, dict] = {
    # Trains on 2 CPU cores in about 10 s; the test fixture and the README demo.
    "tiny": dict(depth=2, context=64, batch_tokens=4096, D=1_000_000, eval_tokens=16384),
    # A minute or two on a laptop CPU; 20 tokens per parameter (Hoffmann et al. 2022 Table 3).
    "small": dict(depth=4, context=128, batch_tokens=8192, tokens_per_param=20.0, eval_tokens=32768),
    # Sized for a laptop GPU.
    "base": dict(depth=8, context=256, batch_tokens=32768, tokens_per_param=20.0, eval_tokens=131072),
}
PRESET_FIELDS = sorted({k for p in PRESETS.values() for k in p} | {"tokens_per_param", "D", "C"})


def from_preset(name: str, **overrides) -> RunConfig:
    if name not in PRESETS:
        raise SuiteError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return make_config(**{**PRESETS[name], "preset": name, **overrides})


def make_config(**values) -> RunConfig:
    """Build a RunConfig from strings or typed values, validating every field."""
    names = {f.name: f for f in fields(RunConfig)}
    typed = {}
    for k, v in values.items():
        if k not in names:
            raise SuiteError(f"unknown setting {k!r}")
        typed[k] = _coerce(k, names[k].type, v)
    cfg = RunConfig(**typed)
    validate(cfg)
    return cfg


def _coerce(name, typ, value):
    if not isinstance(value, str):
        return value
    try:
        if typ in ("bool", bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if typ in ("int", int):
            return int(float(value)) if float(value).is_integer() else int(value)
        if typ in ("float", float):
            return float(value)
    except ValueError:
        kind = {"float": "number", "int": "whole number", "bool": "true or false"}.get(str(typ), str(typ))
        raise SuiteError(f"{name} must be a {kind}, got {value!r}") from None
    return value


def validate(c: RunConfig) -> None:
    """Reject bad values with one clear line, before anything loads."""
    def need(ok, msg):
        if not ok:
            raise SuiteError(msg)

    budgets = [("D", c.D), ("C", c.C), ("tokens_per_param", c.tokens_per_param)]
    for name, v in budgets:
        need(math.isfinite(v) and v >= 0, f"{name} must be a positive number, got {v}")
    given = [n for n, v in budgets if v > 0]
    need(len(given) == 1, "give exactly one token budget: D (tokens), C (FLOPs) or tokens_per_param"
         + (f" (got {', '.join(given)})" if given else " (got none, or only zeros/negatives)"))
    need(c.tokenizer in TOKENIZERS, f"unknown tokenizer {c.tokenizer!r}; choose one of: {', '.join(TOKENIZERS)}")
    need(c.vocab_size <= 65535, f"vocab_size {c.vocab_size} is over 65535 (tokens are stored as uint16)")
    if c.tokenizer == "byte":
        need(c.vocab_size == 256, f"the byte tokenizer has vocab_size 256, got {c.vocab_size}")
    else:
        need(c.vocab_size > 256, f"a BPE vocab_size must be over 256, got {c.vocab_size}")
    for name in ("depth", "aspect", "head_dim", "context", "batch_tokens", "eval_tokens"):
        need(getattr(c, name) >= 1, f"{name} must be at least 1, got {getattr(c, name)}")
    need(c.head_dim % 2 == 0, f"head_dim must be even for rotary embeddings, got {c.head_dim}")
    need(c.batch_tokens % c.context == 0,
         f"batch_tokens ({c.batch_tokens}) must be a multiple of context ({c.context})")
    need(c.eval_tokens >= c.context, f"eval_tokens ({c.eval_tokens}) must be at least one context ({c.context})")
    need(c.lr > 0 and math.isfinite(c.lr), f"lr must be positive, got {c.lr}")
    need(0 <= c.beta1 < 1 and 0 <= c.beta2 < 1, "beta1 and beta2 must lie in [0, 1)")
    need(c.weight_decay >= 0 and c.grad_clip >= 0, "weight_decay and grad_clip must be non-negative")
    need(c.warmup_tokens == -1 or c.warmup_tokens >= 0, "warmup_tokens must be -1 (auto) or non-negative")
    need(0 < c.predict_from < 1, f"predict_from must lie in (0, 1), got {c.predict_from}")
    need(0 <= c.warmup_max_frac < 1 and 0 < c.cooldown_frac < 1, "warmup_max_frac and cooldown_frac must lie in (0, 1)")
    need(c.schedule in SCHEDULES, f"unknown schedule {c.schedule!r}; choose one of: {', '.join(SCHEDULES)}")
    need(c.compile in COMPILES, f"compile must be auto, true or false, got {c.compile!r}")
    need(c.parametrization in PARAMETRIZATIONS,
         f"unknown parametrization {c.parametrization!r}; choose one of: {', '.join(PARAMETRIZATIONS)}")
    need(c.mup_base_width >= 0, f"mup_base_width must be non-negative, got {c.mup_base_width}")
    need(c.parametrization != "mup" or c.mup_base_width >= 1,
         "parametrization=mup needs mup_base_width, the d_model at which the learning rate is tuned")
    need(c.precision in PRECISIONS, f"unknown precision {c.precision!r}; choose one of: {', '.join(PRECISIONS)}")
    need(c.device == "auto" or c.device in ("cpu", "mps") or c.device.split(":")[0] == "cuda",
         f"unknown device {c.device!r}; choose auto, cpu, cuda, cuda:<i> or mps")
    need(c.micro_batch >= 0 and c.eval_every >= 0 and c.checkpoint_every >= 0,
         "micro_batch, eval_every and checkpoint_every must be non-negative (0 = auto)")
    need(c.micro_batch == 0 or (c.batch_tokens // c.context) % c.micro_batch == 0,
         f"micro_batch ({c.micro_batch}) must divide the global batch of {c.batch_tokens // c.context} sequences")
    if c.preset:
        need(c.preset in PRESETS, f"unknown preset {c.preset!r}; choose one of: {', '.join(PRESETS)}")
    derive(c)  # budget too small for one step, etc.


@dataclass(frozen=True)
class Derived:
    shape: ModelShape
    N: int
    N_nonembed: int
    N_total: int
    flops_per_token: int
    D: int                 # tokens actually trained: steps · batch_tokens
    C: float               # flops_per_token · D
    steps: int
    batch_size: int        # sequences per optimizer step
    warmup_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int         # steps per logged train_loss point (their mean): ≤ 500 points per curve

    def metrics(self) -> dict[str, float]:
        return {k: float(getattr(self, k)) for k in
                ("N", "N_nonembed", "N_total", "flops_per_token", "D", "C", "steps")}


def derive(c: RunConfig) -> Derived:
    shape = c.shape()
    counts = count_params(shape)
    fpt = flops_per_token(shape)
    if c.D > 0:
        tokens = c.D
    elif c.C > 0:
        tokens = c.C / fpt                         # C = flops_per_token · D (Kaplan et al. 2020 §2.1)
    else:
        tokens = c.tokens_per_param * counts["N"]
    # Whole optimizer steps: the global batch is fixed, so D is rounded to a multiple of it and
    # the D actually trained is what gets logged (never the request).
    steps = round(tokens / c.batch_tokens)
    if steps < 1:
        raise SuiteError(f"the budget gives {tokens:.3g} tokens, less than one global batch of "
                         f"{c.batch_tokens} tokens; raise D, C or tokens_per_param")
    D = steps * c.batch_tokens
    warm = counts["N"] if c.warmup_tokens < 0 else c.warmup_tokens
    warm = min(warm, c.warmup_max_frac * D) if c.warmup_tokens < 0 else warm
    return Derived(
        shape=shape, N=counts["N"], N_nonembed=counts["N_nonembed"], N_total=counts["N_total"],
        flops_per_token=fpt, D=D, C=float(fpt) * D, steps=steps,
        batch_size=c.batch_tokens // c.context,
        warmup_steps=min(steps, round(warm / c.batch_tokens)),
        eval_every=c.eval_every or max(1, steps // 20),
        checkpoint_every=c.checkpoint_every or max(1, steps // 5),
        log_every=log_every(steps),
    )


def log_every(steps: int) -> int:
    """Steps per logged train_loss point. A point per step would cost 5 metric rows per step in the
    store: at ~150 µs a row in a SQLite log_batch that is several % of the 16-25 ms steps of the
    smallest models; at most 500 points a curve keeps it under 2% (benchmarks/throughput.py). Every
    step's loss is still kept in the checkpoint's train_losses."""
    return max(1, math.ceil(steps / 500))


# ------------------------------------------------------------------------ command-line flags

def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per RunConfig field, named exactly as the field (and the MLflow param)."""
    g = p.add_argument_group("run settings (defaults: the preset, else RunConfig)")
    for f in fields(RunConfig):
        if f.name != "preset":
            # Parsed as strings: make_config types and validates them, and "" means "not given"
            # (MLproject passes every declared parameter, empty when the user gave none).
            g.add_argument(f"--{f.name}", default=None, metavar=str(f.type).upper())
    p.add_argument("--preset", default=None, help=f"start from a preset: {', '.join(PRESETS)}")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {f.name: getattr(args, f.name) for f in fields(RunConfig)
             if f.name != "preset" and getattr(args, f.name, None) not in (None, "")}
    budget_given = {"D", "C", "tokens_per_param"} & set(given)
    if args.preset:
        base = dict(PRESETS.get(args.preset, {}))
        if budget_given:  # a budget on the command line replaces the preset's budget entirely
            for k in ("D", "C", "tokens_per_param"):
                base.pop(k, None)
        if args.preset not in PRESETS:
            return from_preset(args.preset)  # raises the one-line error
        return make_config(**{**base, "preset": args.preset, **given})
    if not budget_given:
        given["tokens_per_param"] = 20.0  # Hoffmann et al. 2022's compute-optimal ratio
    return make_config(**given)
