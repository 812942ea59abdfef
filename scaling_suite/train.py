"""Train one model on one token budget. The loop reads top to bottom (nanoGPT's train.py).

    train(cfg, tracker) -> RunResult

Batches are a pure function of (seed, step), the learning rate a pure function of the step, and
a checkpoint holds model, optimizer, step and RNG state, so a resumed run retraces the
uninterrupted one exactly. Memory limits change only how the global batch is split into
micro-batches (gradient accumulation), never the batch, the schedule or the token count.
"""

from __future__ import annotations

import math
import pickle
import re
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

import numpy as np

from . import data as data_lib
from . import earlystop
from .config import RunConfig, make_config
from .device import (COMPILE_PROBE_STEPS, autocast, compile_key, compile_model, compile_pays, compile_support,
                     compiled_shapes, fused_adamw, pick_precision, place, process_memory, record_warmup,
                     release_memory)
from .errors import SuiteError
from .model import GPT
from .schedule import branch_problem, lr_at, lr_per_step
from .tracking import NullTracker, scratch


class TrainingFailed(SuiteError):
    """A run that cannot go on (NaN loss, out of memory); a sweep records it FAILED and moves on."""


class Pruned(Exception):
    """Raised by an `on_eval` hook to stop a run early (an Optuna pruner, tune.py); STEP optimizer
    steps were trained. Not a failure: the caller records the run as pruned."""

    def __init__(self, step: int, reason: str = "pruned"):
        super().__init__(reason)
        self.step = step


@dataclass
class RunResult:
    run_id: str | None
    status: str
    final_val_loss: float
    final_train_loss: float
    val_bpb: float
    steps: int
    D: int
    C: float
    N: int
    wall_seconds: float
    tokens_per_second: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, val_loss)
    predicted: bool = False          # final_val_loss is an early-stop prediction, not a measurement
    predictions: list = field(default_factory=list)  # earlystop.Prediction over the run


@torch.no_grad()
def evaluate(model: GPT, val: torch.Tensor, micro: int, device, precision: str) -> float:
    """Mean cross-entropy (nats/token) over the fixed validation set."""
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(val), micro):
        chunk = val[i:i + micro].to(device)
        with autocast(device, precision):
            total += model(chunk[:, :-1], chunk[:, 1:]).item() * len(chunk)
        n += len(chunk)
    model.train()
    return total / n


def save_checkpoint(path: Path, model, opt, step: int, cfg: RunConfig, curve, train_losses, predictions,
                    branched_at: int = 0, run_id: str | None = None) -> None:
    """Tensors and plain Python values only (dicts, lists, str, int, float, bool, None), so that
    load_checkpoint can read it with torch.load(weights_only=True): numpy scalars (earlystop's
    fits return np.float64) are turned into floats, the RNG state is a uint8 tensor already and the
    config is its params dict. RUN_ID names the MLflow run the checkpoint belongs to."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": int(step),
             "config": cfg.to_params(), "run_id": run_id or "",
             "curve": [[int(t), float(v)] for t, v in curve], "train_losses": [float(x) for x in train_losses],
             "predictions": [_plain(asdict(p)) for p in predictions], "torch_rng": torch.get_rng_state(),
             "branched_at": int(branched_at)}
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a kill mid-write never leaves a truncated checkpoint
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as "file write failed", without the errno.
        try:
            tmp.unlink(missing_ok=True)
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MB free there"
        except OSError:
            free = "free space unknown"
        raise SuiteError(f"cannot write the checkpoint {path}: {type(e).__name__}: {e} "
                         f"(is the disk full? {free})") from None


def _plain(d: dict) -> dict:
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in d.items()}


CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "curve", "train_losses", "predictions", "torch_rng")


def load_checkpoint(path: Path, cfg: RunConfig, branch: bool = False, run_id: str | None = None) -> dict:
    """Read a checkpoint without running code, and refuse one that is not RUN_ID's own (or, for a
    branch, the trunk's) or does not fit CFG.

    weights_only=True: a checkpoint comes from the tracking store, which anyone who can log
    artifacts can write to; a full unpickle would run whatever a forged file asks for."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1).rstrip('.')})" if found else ""
        raise SuiteError(f"refused checkpoint {path}: it holds objects other than tensors and plain values{what}, "
                         "which could run code when loaded") from None
    except Exception as e:  # noqa: BLE001
        raise SuiteError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SuiteError(f"checkpoint {path} is not a scaling-suite checkpoint: it lacks {', '.join(missing)}")
    owner = state.get("run_id") or ""
    # Checkpoints written before run ids were recorded have none; their config is still checked.
    if run_id and owner and owner != run_id:
        raise SuiteError(f"checkpoint {path} belongs to run {owner}, not {run_id}; refused")
    if branch:
        check_branch(state, cfg, path)
    else:
        # Compared as configs, not as strings: a preset's D=1_000_000 is written "1000000", and
        # the same value rebuilt from MLflow's params (--resume) is the float 1000000.0.
        made = config_from_params(state["config"])
        diff = [f.name for f in fields(RunConfig) if getattr(made, f.name) != getattr(cfg, f.name)]
        if diff:
            raise SuiteError(f"checkpoint {path} was made with a different config ({', '.join(diff)})")
    return state


def check_branch(state: dict, cfg: RunConfig, path) -> None:
    """Refuse a checkpoint that cannot start CFG as a branch (branch_problem)."""
    problem = branch_problem(config_from_params(state["config"]), cfg, state["step"])
    if problem:
        raise SuiteError(f"checkpoint {path} cannot start a branch: {problem}")


class CompilePolicy:
    """torch.compile of the training forward (device.py): `true` from the first step; `auto` after
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
        remembered for the next process that compiles this graph (device.record_warmup)."""
        warm = max(0.0, step_seconds[-1] - float(np.median(step_seconds[2:-1] or [0])))
        self.tracker.log_metrics({"compile_seconds": warm}, step=tokens)
        if self.fresh:
            record_warmup(self.key, warm)


def _forward_backward(fwd, batch, pl, precision: str) -> float:
    """Gradients of one global batch, accumulated over equal micro-batches; its mean loss."""
    loss_sum = torch.zeros((), device=pl.device)
    for m in range(pl.accumulation):
        mb = batch[m * pl.micro_batch:(m + 1) * pl.micro_batch]
        with autocast(pl.device, precision):
            loss = fwd(mb[:, :-1], mb[:, 1:])
        # Equal micro-batches: the mean over the global batch is the mean of micro means.
        (loss / pl.accumulation).backward()
        loss_sum += loss.detach()
    return loss_sum.item() / pl.accumulation   # one device sync per step, not per micro-batch


def train(cfg: RunConfig, tracker=None, data: data_lib.TokenData | None = None,
          resume_from: Path | None = None, halt_at_step: int | None = None,
          checkpoint_dir: Path | None = None, progress: bool = True, tags: dict | None = None,
          bar_position: int = 0, save_at_steps=(), branch_from: Path | None = None, on_eval=None,
          trunk_run_id: str | None = None, reference: earlystop.Reference | None = None) -> RunResult:
    """Train CFG (_train). Without CHECKPOINT_DIR the checkpoints are written to a scratch folder
    that is removed when the run ends, finished or not: each is logged to the tracker as an
    artifact, and a full-size run's copy is gigabytes (a study would fill /tmp)."""
    if checkpoint_dir is not None:
        return _train(cfg, tracker, data, resume_from, halt_at_step, Path(checkpoint_dir), progress, tags,
                      bar_position, save_at_steps, branch_from, on_eval, trunk_run_id, reference)
    with scratch() as tmp:
        return _train(cfg, tracker, data, resume_from, halt_at_step, tmp, progress, tags,
                      bar_position, save_at_steps, branch_from, on_eval, trunk_run_id, reference)


def _train(cfg: RunConfig, tracker, data, resume_from, halt_at_step, checkpoint_dir: Path, progress, tags,
           bar_position, save_at_steps, branch_from, on_eval, trunk_run_id, reference) -> RunResult:
    """SAVE_AT_STEPS: also checkpoint the state after these steps as checkpoints/branch_<step>.pt
    (a WSD trunk keeps them for its branches). BRANCH_FROM: start from such a checkpoint of
    another run (the trunk) that differs only in the budget (check_branch); the run is then
    CFG's own, with the trunk's first steps (TRUNK_RUN_ID: the trunk's MLflow run, whose checkpoint
    it must be). RESUME_FROM must be the tracker's run's own checkpoint. Resuming an interrupted branch uses RESUME_FROM.
    ON_EVAL(step, val_loss), when given, is called after each evaluation before the end of the
    run, and may raise Pruned to stop it (tune.py reports the loss to an Optuna pruner).
    REFERENCE: finished runs of this schedule (sweep.py); with enough of them the final-loss
    prediction (and early stop) uses what they share (earlystop.predict)."""
    tracker = tracker or NullTracker()
    d = cfg.derived()
    pl = place(cfg.device, cfg.precision, cfg.micro_batch, d.shape, d.batch_size)
    data = data or data_lib.load_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size)
    if data.vocab_size != cfg.vocab_size:
        raise SuiteError(f"the data's vocabulary ({data.vocab_size}) differs from vocab_size ({cfg.vocab_size})")
    val = data_lib.validation_set(data, cfg.eval_tokens, cfg.context)
    bpt = data_lib.bytes_per_token(data, val)

    torch.manual_seed(cfg.seed)
    model = GPT(d.shape, cfg.parametrization, cfg.mup_base_width).to(pl.device)
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            fused=fused_adamw(pl.device))
    start, curve, train_losses, predictions = 0, [], [], []
    lrs = np.array(lr_per_step(cfg, d)) / cfg.lr   # for the predictor
    branched_at = 0                 # steps taken over from a trunk (BRANCH_FROM), not computed here
    if resume_from is not None or branch_from is not None:
        state = load_checkpoint(Path(branch_from or resume_from), cfg, branch=branch_from is not None,
                                run_id=trunk_run_id if branch_from is not None else tracker.run_id)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, curve = state["step"], [tuple(p) for p in state["curve"]]
        train_losses = list(state["train_losses"])
        predictions = [earlystop.Prediction(**p) for p in state["predictions"]]
        branched_at = state.get("branched_at", 0)
        if branch_from is not None:
            branched_at = start

    # Everything about the run goes to the tracker before the first step, so a run that dies
    # early is still traceable: config as params, sizes as metrics, placement as tags.
    tracker.log_params(cfg.to_params())
    tracker.set_tags({"role": "train", **pl.tags(), "micro_batch": pl.micro_batch,
                      "accumulation": pl.accumulation, "flops_convention": "6N+6*depth*context*d_model",
                      "N_convention": "N = non-embedding + output head (Porian et al. 2024)", **(tags or {})})
    tracker.log_dataset(data_lib.describe(data))
    # Once per run: a resumed run logged these when it started, and a branch has its trunk's
    # tokens and flops points (sweep.TRUNK_HISTORY); a second copy would be a duplicate point.
    if resume_from is None:
        start_metrics = {**d.metrics(), "bytes_per_token": bpt, **({"tokens": 0, "flops": 0} if branch_from is None else {})}
        tracker.log_metrics(start_metrics, step=0)

    ckpt_dir = checkpoint_dir
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = ckpt_dir / "last.pt"

    def checkpoint(step, path=ckpt_path):
        save_checkpoint(path, model, opt, step, cfg, curve, train_losses, predictions, branched_at, tracker.run_id)
        tracker.flush()  # metrics up to this step are durable together with the checkpoint
        tracker.log_artifact(path, "checkpoints")

    def eval_and_log(step):
        loss = evaluate(model, val, pl.micro_batch, pl.device, pl.precision)
        tokens = step * cfg.batch_tokens
        curve.append((tokens, loss))
        # tokens and flops at this step are logged by the training step that reached it.
        tracker.log_metrics({"val_loss": loss, "val_bpb": loss / math.log(2) / bpt,
                             "mem_gb": process_memory(pl.device) / 2**30}, step=tokens)
        if step >= cfg.predict_from * d.steps and step < d.steps:
            predict(step, loss)
        if on_eval is not None and step < d.steps:
            tracker.flush()      # the curve up to a pruning point is in MLflow with the run
            on_eval(step, loss)
        return loss

    def predict(step, val_loss):
        # The val-train gap at this point: val now minus the mean of the last few train losses.
        seen = train_losses[:step]
        recent = seen[-max(5, d.steps // 50):]
        pred = earlystop.predict(reference, curve, d.N, d.D, seen, lrs, val_loss - sum(recent) / len(recent),
                                 step * cfg.batch_tokens, peak_lr=cfg.lr)
        if pred is not None:
            predictions.append(pred)
            tracker.log_metrics({"predicted_final_loss": pred.final_loss, "predicted_final_loss_lo": pred.lo,
                                 "predicted_final_loss_hi": pred.hi}, step=pred.tokens_seen)

    if branch_from is not None:
        # The trunk's predictions aimed at the trunk's end: redo them for this run's schedule at
        # the trunk's evaluations (an independent run would make them at its own evaluations).
        predictions = []
        for tokens, loss in curve:
            if cfg.predict_from * d.steps <= tokens // cfg.batch_tokens < start:
                predict(tokens // cfg.batch_tokens, loss)
    save_at = {s for s in save_at_steps if start < s < d.steps}

    fwd, step_seconds, step_precision = model, [], pl.precision
    policy = CompilePolicy(cfg, d, pl, start, tracker)

    bar = _progress(d.steps, start, progress, cfg, bar_position)
    t0, train_loss, tok_s = time.perf_counter(), float("nan"), 0.0
    t_window, step_window = time.perf_counter(), start
    for step in range(start, d.steps):
        if step % d.eval_every == 0 and (not curve or curve[-1][0] != step * cfg.batch_tokens):
            eval_and_log(step)
            if cfg.early_stop and earlystop.is_stable(predictions):
                break
        if step == halt_at_step:
            break  # a simulated interruption, for tests: the last checkpoint stands
        if step == policy.at:
            fwd, step_precision = policy.decide(model, step_seconds, d.steps - step)
        t_step = time.perf_counter()
        lr = lr_at(step, cfg, d)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)      # μP per-group lr (model.param_groups)
        batch = data_lib.train_batch(data, cfg.seed, step, d.batch_size, cfg.context).to(pl.device)
        train_loss = _forward_backward(fwd, batch, pl, step_precision)
        train_losses.append(train_loss)
        if not math.isfinite(train_loss):
            _fail(tracker, f"training diverged: loss is {train_loss} at step {step}", pl.device)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - t_step)
        if step == policy.at and fwd is not model:   # the first compiled step carries the warm-up
            policy.record(step_seconds, (step + 1) * cfg.batch_tokens)

        tokens = (step + 1) * cfg.batch_tokens
        if (step + 1) % d.log_every == 0 or step + 1 == d.steps:
            now = time.perf_counter()
            tok_s = (step + 1 - step_window) * cfg.batch_tokens / (now - t_window)
            # train_loss: the mean over the steps since the last point (all of them when log_every is 1)
            window = train_losses[-(step + 1 - step_window):]
            t_window, step_window = now, step + 1
            tracker.log_metrics({"train_loss": sum(window) / len(window), "lr": lr, "tokens": tokens,
                                 "flops": tokens * d.flops_per_token, "tokens_per_second": tok_s}, step=tokens)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.3f}", val=f"{curve[-1][1]:.3f}" if curve else "-",
                        tok_s=f"{tok_s:,.0f}", mem=f"{process_memory(pl.device) / 2**30:.1f}G", refresh=False)
        if step + 1 in save_at:   # before last.pt: a run resumed from last.pt has its branch points behind it
            checkpoint(step + 1, ckpt_dir / f"branch_{step + 1}.pt")
        if (step + 1) % d.checkpoint_every == 0 and step + 1 < d.steps:
            checkpoint(step + 1)
    bar.close()
    wall = time.perf_counter() - t0

    if halt_at_step is not None and halt_at_step < d.steps:
        tracker.flush()
        return RunResult(tracker.run_id, "INTERRUPTED", float("nan"), train_loss, float("nan"),
                         halt_at_step, d.D, d.C, d.N, wall, tok_s, curve)

    stopped = len(train_losses) < d.steps
    if stopped:
        # Early stop: the final loss is the stable prediction, tagged as such; the checkpoint is
        # the model as it stands, so the run can still be continued to the end with --resume.
        final = predictions[-1].final_loss
        checkpoint(len(train_losses))
        tracker.set_tags({"predicted": "true"})
        tracker.log_metrics({"stopped_at_tokens": predictions[-1].tokens_seen,
                             "early_stop_saving": 1 - predictions[-1].tokens_seen / d.D}, step=d.D)
    else:
        final = eval_and_log(d.steps)
        checkpoint(d.steps)
        tracker.log_metrics(prediction_errors(predictions, final, d.D), step=d.D)
    steps_run = len(train_losses)
    result = RunResult(tracker.run_id, "FINISHED", final, train_loss, final / math.log(2) / bpt,
                       steps_run, d.D, d.C, d.N, wall, (steps_run - start) * cfg.batch_tokens / wall, curve,
                       predicted=stopped, predictions=predictions)
    # C_spent: the FLOPs this run computed itself; a branch took its first steps from its trunk.
    # val_bpb at D is the final evaluation's, logged with it, unless the run stopped early.
    tracker.log_metrics({"final_val_loss": final, "final_train_loss": train_loss,
                         **({"val_bpb": result.val_bpb} if stopped else {}), "wall_seconds": wall, **d.metrics(),
                         "C_spent": (steps_run - branched_at) * cfg.batch_tokens * float(d.flops_per_token)},
                        step=d.D)
    # Logging overhead (issue: ≤ 2% of step time): seconds inside the tracker over the run's wall.
    tracker.flush()
    tracker.log_metrics({"logging_seconds": tracker.log_seconds,
                         "logging_fraction": tracker.log_seconds / max(wall, 1e-9)}, step=d.D)
    del model, opt, fwd
    release_memory(pl.device)
    return result


def prediction_errors(predictions: list, actual: float, D: int) -> dict[str, float]:
    """How good early stop would have been on this run (measured, since it ran to the end).

    predict_error: relative error of the first prediction (made at predict_from of the run);
    predict_error_stable: that of the prediction at which early stop would have stopped;
    early_stop_saving: the fraction of the run's compute early stop would have saved.
    """
    if not predictions:
        return {}
    out = {"predict_error": (predictions[0].final_loss - actual) / actual,
           "predict_covered": float(predictions[0].lo <= actual <= predictions[0].hi)}
    for i in range(len(predictions)):
        if earlystop.is_stable(predictions[:i + 1]):
            out["predict_error_stable"] = (predictions[i].final_loss - actual) / actual
            out["early_stop_saving"] = 1 - predictions[i].tokens_seen / D
            break
    else:
        out["early_stop_saving"] = 0.0
    return out


def _fail(tracker, reason: str, device) -> None:
    release_memory(device)
    raise TrainingFailed(reason)


def _progress(total: int, initial: int, enabled: bool, cfg: RunConfig, position: int):
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI), where it would print every update.
    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step", leave=False,
                desc=f"depth={cfg.depth}", dynamic_ncols=True, position=position)


def config_from_params(params: dict) -> RunConfig:
    """Rebuild a RunConfig from an MLflow run's params (for --resume). It equals the logged config
    (dataclass equality: 1000000 == 1000000.0), though its to_params may spell a number otherwise."""
    names = {f.name for f in fields(RunConfig)}
    return make_config(**{k: v for k, v in params.items() if k in names})


def result_dict(r: RunResult) -> dict:
    out = asdict(r)
    out.pop("curve")
    return out
