"""Train one model on one token budget. The loop reads top to bottom (nanoGPT's train.py):

    train(cfg, tracker) -> RunResult
        restore (a checkpoint of this run or of its trunk) -> for each step: evaluate and predict
        (Evaluator), one optimizer step (optimizer_step), log (StepLog), checkpoint (Checkpoints)

Batches are a pure function of (seed, step), the learning rate a pure function of the step, and
a checkpoint holds model, optimizer, step and RNG state (checkpoint.py), so a resumed run retraces
the uninterrupted one exactly. Memory limits change only how the global batch is split into
micro-batches (gradient accumulation), never the batch, the schedule or the token count.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from . import earlystop
from .checkpoint import load_checkpoint, save_checkpoint
from .compiling import CompilePolicy
from .config import RunConfig
from .device import autocast, fused_adamw, place, process_memory, release_memory
from .errors import SuiteError
from .model import GPT
from .schedule import lr_at, lr_per_step
from .store import scratch
from .tracking import NullTracker


class TrainingFailed(SuiteError):
    """A run that cannot go on (NaN loss, out of memory); a sweep records it FAILED and moves on."""


# The signals the CLI's SIGINT/SIGTERM handler received, in order (its exit code is 128 + the first).
# A Ctrl-C during torch.compile's first (cold) compilation was lost on this machine (the run went on
# and exited 0); the loop checks this before every step.
SIGNALS: list[int] = []


def on_interrupt(signum, frame) -> None:
    """The CLI's SIGINT (Ctrl-C) and SIGTERM (`kill`, a scheduler) handler: remembered, then raised as
    a KeyboardInterrupt, so both end a run KILLED (Python's default SIGTERM left it RUNNING)."""
    SIGNALS.append(signum)
    raise KeyboardInterrupt


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


def train(cfg: RunConfig, tracker=None, data: data_lib.TokenData | None = None,
          resume_from: Path | None = None, checkpoint_dir: Path | None = None, progress: bool = True,
          tags: dict | None = None, bar_position: int = 0, save_at_steps=(), branch_from: Path | None = None,
          on_eval=None, trunk_run_id: str | None = None, reference: earlystop.Reference | None = None) -> RunResult:
    """Train CFG; the tracker's run gets its config, curves, checkpoints and final metrics.

    RESUME_FROM must be the tracker's run's own checkpoint (an interrupted branch resumes this way
    too). BRANCH_FROM: start from a checkpoint of another run (the trunk, TRUNK_RUN_ID) that
    differs only in the budget (checkpoint.check_branch); the run is then CFG's own, with the
    trunk's first steps. SAVE_AT_STEPS: also checkpoint the state after these steps as
    checkpoints/branch_<step>.pt (a WSD trunk keeps them for its branches). Without CHECKPOINT_DIR
    the checkpoints are written to a scratch folder removed when the run ends, finished or not:
    each is logged to the tracker as an artifact, and a full-size run's copy is gigabytes (a
    study would fill /tmp). ON_EVAL(step, val_loss), when given, is called after each evaluation
    before the end of the run, and may raise Pruned to stop it (tune.py reports the loss to an
    Optuna pruner). REFERENCE: finished runs of this schedule (sweep.py); with enough of them the
    final-loss prediction (and early stop) uses what they share (earlystop.predict)."""
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
    history = History()
    if resume_from is not None or branch_from is not None:
        history = restore(Path(branch_from or resume_from), cfg, model, opt, branch=branch_from is not None,
                          run_id=trunk_run_id if branch_from is not None else tracker.run_id)
    log_start(tracker, cfg, d, pl, data, bpt, tags, resumed=resume_from is not None,
              branched=branch_from is not None)

    with nullcontext(Path(checkpoint_dir)) if checkpoint_dir is not None else scratch() as ckpt_dir:
        checkpoints = Checkpoints(ckpt_dir, model, opt, cfg, tracker, history,
                                  {s for s in save_at_steps if history.step < s < d.steps})
        evaluator = Evaluator(cfg, d, model, val, bpt, pl, tracker, history, reference, on_eval)
        if branch_from is not None:
            evaluator.redo_predictions()
        start = history.step
        policy = CompilePolicy(cfg, d, pl, start, tracker)
        fwd, precision = model, pl.precision
        log = StepLog(cfg, d, tracker, start, _progress(d.steps, start, progress, cfg, bar_position))
        for step in range(start, d.steps):
            if SIGNALS:   # a Ctrl-C or SIGTERM that a library swallowed (cli.on_interrupt)
                raise KeyboardInterrupt
            if evaluator.due(step):
                evaluator.evaluate(step)
                if cfg.early_stop and earlystop.is_stable(history.predictions):
                    break
            if step == policy.at:
                fwd, precision = policy.decide(model, log.step_seconds, d.steps - step)
            t_step = time.perf_counter()
            lr = optimizer_step(step, cfg, d, model, opt, fwd, data, pl, precision, history)
            log.step_seconds.append(time.perf_counter() - t_step)
            if step == policy.at and fwd is not model:   # the first compiled step carries the warm-up
                policy.record(log.step_seconds, (step + 1) * cfg.batch_tokens)
            log.after_step(step + 1, lr, history, pl.device)
            checkpoints.after_step(step + 1, d)
        wall = log.close()
        result = finish(cfg, d, tracker, history, evaluator, checkpoints, start, wall, log.train_loss, bpt)
        # Every reference to the model and optimizer goes before the memory is given back.
        del model, opt, fwd, evaluator, checkpoints, policy
    release_memory(pl.device)
    return result


@dataclass
class History:
    """What a run has done so far besides its weights; a checkpoint holds it."""
    step: int = 0                                     # optimizer steps taken
    curve: list = field(default_factory=list)         # (tokens, val_loss) at each evaluation
    train_losses: list = field(default_factory=list)  # one per optimizer step
    predictions: list = field(default_factory=list)   # earlystop.Prediction, in order
    branched_at: int = 0     # steps taken over from a trunk (BRANCH_FROM), not computed here


def restore(path: Path, cfg: RunConfig, model, opt, branch: bool, run_id: str | None) -> History:
    """Load a checkpoint (load_checkpoint refuses a foreign one) into MODEL, OPT and torch's RNG."""
    state = load_checkpoint(path, cfg, branch=branch, run_id=run_id)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    return History(step=state["step"], curve=[tuple(p) for p in state["curve"]],
                   train_losses=list(state["train_losses"]),
                   predictions=[earlystop.Prediction(**p) for p in state["predictions"]],
                   branched_at=state["step"] if branch else state.get("branched_at", 0))


def log_start(tracker, cfg: RunConfig, d, pl, data, bpt: float, tags: dict | None, resumed: bool,
              branched: bool) -> None:
    """Everything about the run goes to the tracker before the first step, so a run that dies
    early is still traceable: config as params, sizes as metrics, placement as tags."""
    tracker.log_params(cfg.to_params())
    tracker.set_tags({"role": "train", **pl.tags(), "micro_batch": pl.micro_batch,
                      "accumulation": pl.accumulation, "flops_convention": "6N+6*depth*context*d_model",
                      "N_convention": "N = non-embedding + output head (Porian et al. 2024)",
                      "val_set": "eval_tokens in windows spread evenly over the val split", **(tags or {})})
    tracker.log_dataset(data_lib.describe(data))
    # Once per run: a resumed run logged these when it started, and a branch has its trunk's
    # tokens and flops points (sweep.TRUNK_HISTORY); a second copy would be a duplicate point.
    if not resumed:
        tracker.log_metrics({**d.metrics(), "bytes_per_token": bpt, **({} if branched else {"tokens": 0, "flops": 0})},
                            step=0)


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


class Evaluator:
    """Each evaluation: the validation loss on the curve and in the tracker, then (after
    predict_from of the run) a prediction of the final loss, then the ON_EVAL hook."""

    def __init__(self, cfg: RunConfig, d, model, val, bpt: float, pl, tracker, history: History, reference,
                 on_eval):
        self.cfg, self.d, self.model, self.val, self.bpt, self.pl = cfg, d, model, val, bpt, pl
        self.tracker, self.history, self.reference, self.on_eval = tracker, history, reference, on_eval
        self.lrs = np.array(lr_per_step(cfg, d)) / cfg.lr   # for the predictor

    def due(self, step: int) -> bool:
        """An evaluation step not already on the curve (a resumed run evaluated it before its kill)."""
        curve = self.history.curve
        return step % self.d.eval_every == 0 and (not curve or curve[-1][0] != step * self.cfg.batch_tokens)

    def evaluate(self, step: int) -> float:
        loss = evaluate(self.model, self.val, self.pl.micro_batch, self.pl.device, self.pl.precision)
        tokens = step * self.cfg.batch_tokens
        self.history.curve.append((tokens, loss))
        # tokens and flops at this step are logged by the training step that reached it.
        self.tracker.log_metrics({"val_loss": loss, "val_bpb": loss / math.log(2) / self.bpt,
                                  "mem_gb": process_memory(self.pl.device) / 2**30}, step=tokens)
        if step >= self.cfg.predict_from * self.d.steps and step < self.d.steps:
            self.predict(step, loss)
        if self.on_eval is not None and step < self.d.steps:
            self.tracker.flush()      # the curve up to a pruning point is in MLflow with the run
            self.on_eval(step, loss)
        return loss

    def predict(self, step: int, val_loss: float) -> None:
        h = self.history
        seen = h.train_losses[:step]
        pred = earlystop.predict(self.reference, h.curve, self.d.N, self.d.D, seen, self.lrs,
                                 earlystop.val_gap(seen, val_loss, self.d.steps), step * self.cfg.batch_tokens,
                                 peak_lr=self.cfg.lr, N_nonembed=self.d.N_nonembed)
        if pred is not None:
            h.predictions.append(pred)
            bounded = 0 < pred.lo and math.isfinite(pred.hi)     # an interval without an end: none logged
            ends = {"predicted_final_loss_lo": pred.lo, "predicted_final_loss_hi": pred.hi} if bounded else {}
            self.tracker.log_metrics({"predicted_final_loss": pred.final_loss, **ends}, step=pred.tokens_seen)

    def redo_predictions(self) -> None:
        """A branch: the trunk's predictions aimed at the trunk's end. Redo them for this run's
        schedule at the trunk's evaluations (an independent run would make them at its own)."""
        h, per_step = self.history, self.cfg.batch_tokens
        h.predictions = []
        for tokens, loss in h.curve:
            if self.cfg.predict_from * self.d.steps <= tokens // per_step < h.step:
                self.predict(tokens // per_step, loss)


def optimizer_step(step: int, cfg: RunConfig, d, model, opt, fwd, data, pl, precision: str,
                   history: History) -> float:
    """One optimizer step on the step's batch through FWD (the model, or its compiled forward);
    its loss goes on HISTORY. The scheduled learning rate, which it returns."""
    lr = lr_at(step, cfg, d)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)      # μP per-group lr (model.param_groups)
    batch = data_lib.train_batch(data, cfg.seed, step, d.batch_size, cfg.context).to(pl.device)
    train_loss = _forward_backward(fwd, batch, pl, precision)
    history.train_losses.append(train_loss)
    history.step = step + 1
    if not math.isfinite(train_loss):
        _fail(f"training diverged: loss is {train_loss} at step {step}", pl.device)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return lr


class StepLog:
    """The training metrics every log_every steps (train_loss: the mean over the steps since the
    last point, all of them when log_every is 1), the progress bar, and the clock: per-step
    seconds (for the compile decision) and the wall time of the loop."""

    def __init__(self, cfg: RunConfig, d, tracker, start: int, bar):
        self.cfg, self.d, self.tracker, self.bar = cfg, d, tracker, bar
        self.step_seconds: list[float] = []
        self.train_loss, self.tok_s = float("nan"), 0.0
        self.t0 = time.perf_counter()
        self.t_window, self.step_window = time.perf_counter(), start

    def after_step(self, done: int, lr: float, history: History, device) -> None:
        """DONE steps are done."""
        self.train_loss = history.train_losses[-1]
        tokens = done * self.cfg.batch_tokens
        if done % self.d.log_every == 0 or done == self.d.steps:
            now = time.perf_counter()
            self.tok_s = (done - self.step_window) * self.cfg.batch_tokens / (now - self.t_window)
            window = history.train_losses[-(done - self.step_window):]
            self.t_window, self.step_window = now, done
            self.tracker.log_metrics({"train_loss": sum(window) / len(window), "lr": lr, "tokens": tokens,
                                      "flops": tokens * self.d.flops_per_token, "tokens_per_second": self.tok_s},
                                     step=tokens)
        curve = history.curve
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.train_loss:.3f}", val=f"{curve[-1][1]:.3f}" if curve else "-",
                             tok_s=f"{self.tok_s:,.0f}", mem=f"{process_memory(device) / 2**30:.1f}G", refresh=False)

    def close(self) -> float:
        """The loop's wall seconds."""
        self.bar.close()
        return time.perf_counter() - self.t0


class Checkpoints:
    """Writes the run's checkpoints into one folder and logs each to the tracker: last.pt every
    checkpoint_every steps and at the end, branch_<step>.pt after each of SAVE_AT's steps."""

    def __init__(self, folder: Path, model, opt, cfg: RunConfig, tracker, history: History, save_at: set):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.model, self.opt, self.cfg = folder, model, opt, cfg
        self.tracker, self.history, self.save_at = tracker, history, save_at

    def after_step(self, done: int, d) -> None:
        if done in self.save_at:   # before last.pt: a run resumed from last.pt has its branch points behind it
            self.save(done, f"branch_{done}.pt")
        if done % d.checkpoint_every == 0 and done < d.steps:
            self.save(done)

    def save(self, step: int, name: str = "last.pt") -> None:
        h, path = self.history, self.folder / name
        save_checkpoint(path, self.model, self.opt, step, self.cfg, h.curve, h.train_losses, h.predictions,
                        h.branched_at, self.tracker.run_id)
        self.tracker.flush()  # metrics up to this step are durable together with the checkpoint
        self.tracker.log_artifact(path, "checkpoints")


def finish(cfg: RunConfig, d, tracker, history: History, evaluator: Evaluator, checkpoints: Checkpoints,
           start: int, wall: float, train_loss: float, bpt: float) -> RunResult:
    """The run's end: the final evaluation and checkpoint (or, stopped early, the prediction as the
    final loss), the final metrics, the result."""
    steps_run = len(history.train_losses)
    stopped = steps_run < d.steps
    if stopped:
        # Early stop: the final loss is the stable prediction, tagged as such; the checkpoint is
        # the model as it stands, so the run can still be continued to the end with --resume.
        last = history.predictions[-1]
        final = last.final_loss
        checkpoints.save(steps_run)
        tracker.set_tags({"predicted": "true"})
        tracker.log_metrics({"stopped_at_tokens": last.tokens_seen,
                             "early_stop_saving": 1 - last.tokens_seen / d.D}, step=d.D)
    else:
        final = evaluator.evaluate(d.steps)
        checkpoints.save(d.steps)
        tracker.log_metrics(earlystop.prediction_errors(history.predictions, final, d.D), step=d.D)
    result = RunResult(tracker.run_id, "FINISHED", final, train_loss, final / math.log(2) / bpt,
                       steps_run, d.D, d.C, d.N, wall, (steps_run - start) * cfg.batch_tokens / wall, history.curve,
                       predicted=stopped, predictions=history.predictions)
    # C_spent: the FLOPs this run computed itself; a branch took its first steps from its trunk.
    # val_bpb at D is the final evaluation's, logged with it, unless the run stopped early.
    tracker.log_metrics({"final_val_loss": final, "final_train_loss": train_loss,
                         **({"val_bpb": result.val_bpb} if stopped else {}), "wall_seconds": wall, **d.metrics(),
                         "C_spent": (steps_run - history.branched_at) * cfg.batch_tokens * float(d.flops_per_token)},
                        step=d.D)
    # Logging overhead (issue: ≤ 2% of step time): seconds inside the tracker over the run's wall.
    tracker.flush()
    tracker.log_metrics({"logging_seconds": tracker.log_seconds,
                         "logging_fraction": tracker.log_seconds / max(wall, 1e-9)}, step=d.D)
    return result


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


def _fail(reason: str, device) -> None:
    release_memory(device)
    raise TrainingFailed(reason)


def _progress(total: int, initial: int, enabled: bool, cfg: RunConfig, position: int):
    from tqdm.auto import tqdm   # lazy: only a run that shows a bar needs it (workers and CI runs do not)

    # disable=None: no bar when stderr is not a terminal (logs, CI), where it would print every update.
    return tqdm(total=total, initial=initial, disable=None if enabled else True, unit="step", leave=False,
                desc=f"depth={cfg.depth}", dynamic_ncols=True, position=position)


def result_dict(r: RunResult) -> dict:
    out = asdict(r)
    out.pop("curve")
    return out
