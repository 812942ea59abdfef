"""`scaling-suite <verb>`: parse, call, print. Every flag is a RunConfig field of the same name.

Errors the user can fix end as one line, `error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import fields

import torch

from analysis import report

from . import data as data_lib
from . import adaptive, optimize, store, sweep, tracking, tune, worker
from . import ladder as ladder_lib
from . import plan as plan_lib
from .config import RunConfig, add_config_flags, config_from_args, from_preset
from .device import (TORCH_MIN, autocast, available_memory, compile_support, mps_state, pick_device, pick_precision,
                     place)
from .errors import SuiteError
from .lr_auto import parse_lr, resolve_lr
from .checkpoint import config_from_params, load_checkpoint
from .train import SIGNALS, on_interrupt, result_dict, train

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def cmd_train(args) -> int:
    store.quiet_downloads(args.quiet)
    if args.resume:
        # The run's own settings, exactly: a flag beside --resume would either be ignored or make
        # another run under this one's id.
        given = [f"--{f.name}" for f in fields(RunConfig) if getattr(args, f.name, None) not in (None, "")]
        given += [f"--{k}" for k in ("experiment", "run_name") if getattr(args, k, None)]
        if given:
            raise SuiteError(f"--resume continues run {args.resume} with its own settings; drop {', '.join(given)}")
        client = tracking.init_store()
        try:
            run = client.get_run(args.resume)
        except Exception:  # noqa: BLE001
            raise SuiteError(f"no MLflow run {args.resume!r} in {tracking.tracking_uri()}") from None
        if run.info.status == "FINISHED":
            raise SuiteError(f"run {args.resume} is FINISHED: nothing to resume (start a new run instead)")
        cfg = config_from_params(run.data.params)
    else:
        cfg = config_from_args(args)
    pick_device(cfg.device)                      # an absent device fails before anything loads
    tracking.init_store()                        # so does an unwritable store
    d = cfg.derived()
    data = data_lib.load_data(cfg.dataset, cfg.tokenizer, cfg.vocab_size)
    with store.scratch() as tmp:
        resume_from = None
        if args.resume:
            # Fetched and checked before the run is touched: a refusal leaves it as it was.
            resume_from = tracking.fetch_checkpoint(client, args.resume, tmp)
            if resume_from is None:
                raise SuiteError(f"run {args.resume} has no checkpoint to resume from; start it again")
            load_checkpoint(resume_from, cfg, run_id=args.resume)
        tracker = tracking.start_run(args.experiment, run_name=args.run_name or tracking.run_name(d.N, d.D),
                                     run_id=args.resume)
        with tracker.running():
            result = train(cfg, tracker, data=data, resume_from=resume_from, progress=not args.quiet)
    out = result_dict(result)
    print(f"run {result.run_id}: N={d.N:,} D={d.D:,} C={d.C:.3g} FLOPs  final_val_loss={result.final_val_loss:.4f} "
          f"({result.val_bpb:.3f} bits/byte)  {result.wall_seconds:.1f}s, {result.tokens_per_second:,.0f} tok/s")
    if args.json:
        print(json.dumps(out))
    return 0


def _one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line (torch's compile errors carry whole tracebacks)."""
    text = " ".join(str(e).split()) or type(e).__name__
    text = text if isinstance(e, SuiteError) else f"{type(e).__name__}: {text}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


class DoctorRecorder(tracking.NullTracker):
    """Keeps a doctor run's tags and metrics, so doctor reports what the run did: the
    precision and compile tags, and the step times behind tokens_per_second."""

    def __init__(self):
        self.tags, self.metrics = {}, []

    def set_tags(self, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_metrics(self, metrics, step):
        self.metrics.append(dict(metrics))

    def series(self, key):
        return [m[key] for m in self.metrics if key in m]


def in_force(device, precision) -> str:
    # What autocast really does on this device and torch (torch 2.5 silently disabled bf16 on
    # MPS; MPS bf16 kernels need macOS 14): a matmul's output dtype, not the flag.
    a = torch.ones(8, 8, device=device)
    with autocast(device, precision):
        got = (a @ a).dtype
    want = torch.bfloat16 if precision == "bf16" else torch.float32
    if got != want:
        raise SuiteError(f"precision {precision} requested but a matmul under it gives {got}")
    return f"{precision} (a matmul under it gives {got})"


def cmd_doctor(args) -> int:
    """Check this machine end to end, as a run would use it: torch, devices, precision in force,
    the store, the data, a 12-step eager run and, where compiling is supported, three compiled
    steps (a warm-up and two timed). Every check prints one line, and the measured step times say
    what a run at that shape costs here; any failure ends in one `error:` line and exit status 1."""

    problems = []

    def check(name, fn, show=str):
        t = time.perf_counter()
        try:
            detail = fn()
        except Exception as e:  # noqa: BLE001 — doctor reports every failure and goes on
            problems.append(f"{name}: {_one_line(e)}")
            print(f"  FAIL  {name}: {_one_line(e)}")
            return None
        print(f"  ok    {name}: {show(detail)}  ({time.perf_counter() - t:.1f}s)")
        return detail

    print("scaling-suite doctor")
    print(f"  torch {torch.__version__}; the suite supports torch>={'.'.join(map(str, TORCH_MIN))} on CPU, "
          f"CUDA and Apple MPS")
    print(f"  CUDA: torch.cuda.is_available() = {torch.cuda.is_available()} (this torch built with CUDA "
          f"{torch.version.cuda or 'no'}; {torch.cuda.device_count() if torch.cuda.is_available() else 0} device(s))")
    print(f"  MPS: torch.backends.mps.is_built() = {torch.backends.mps.is_built()}, is_available() = "
          f"{torch.backends.mps.is_available()}: {mps_state()}")
    cfg = from_preset("tiny", device=args.device or "auto", precision=args.precision or "auto")
    # 12 eager steps (the loss must fall, and 11 of them are timed) on a 4,096-token validation set.
    cfg = cfg.replace(D=12 * cfg.batch_tokens, eval_every=12, eval_tokens=4096, compile="false")
    shape = cfg.shape()
    device = check("device", lambda: pick_device(cfg.device))
    if device is None:
        return _doctor_verdict(problems)
    check("device works", lambda: f"matmul on {device} = "
          f"{float((torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum()):.0f}")
    check("memory available", lambda: f"{available_memory(device) / 2**30:.1f} GiB")
    placed = check("placement (tiny preset)", lambda: place(cfg.device, cfg.precision, 0, shape, cfg.derived().batch_size),
                   lambda p: f"{p.device}, {p.precision}, micro-batch {p.micro_batch} x {p.accumulation}")
    if placed is not None:
        check("precision in force, eager", lambda: in_force(device, placed.precision))
    why_not = check("compile support", lambda: compile_support(device) or "supported")
    compiling = why_not == "supported"
    if compiling:
        check("precision in force, compiled",
              lambda: in_force(device, pick_precision(device, cfg.precision, shape, compiled=True)))
    check("MLflow store", lambda: (tracking.init_store(), tracking.tracking_uri())[1])
    data = check("data (stdlib corpus)", lambda: data_lib.load_data(cfg.dataset))
    if data is None or placed is None:
        return _doctor_verdict(problems)

    eager = DoctorRecorder()
    r = check("12-step training, eager", lambda: _brief(train(cfg, tracker=eager, data=data, progress=False)))
    if r is not None:
        curve = eager.series("val_loss")
        if not curve[-1] < curve[0]:
            problems.append("12-step training, eager: the validation loss did not go down")
        # One logged point per step here (log_every 1); the first also holds the first evaluation.
        step_s = statistics.median(cfg.batch_tokens / t for t in eager.series("tokens_per_second")[1:])
        print(f"        eager step {step_s * 1e3:.0f} ms at the tiny preset (depth {shape.depth}, d_model "
              f"{shape.d_model}, {cfg.batch_tokens:,} tokens per step): {cfg.batch_tokens / step_s:,.0f} tokens/s; "
              f"1,000 such steps take about {1000 * step_s:.0f} s here")
    if compiling:
        # Steps compiled from the first (compile=true), as a long run compiles after its eight timed
        # steps: a missing compiler or a dynamo/inductor failure shows here, not mid-study. The
        # first step carries the warm-up; the other two are timed.
        cfg2 = cfg.replace(D=3 * cfg.batch_tokens, compile="true", eval_tokens=cfg.context, eval_every=3)
        comp = DoctorRecorder()
        if check("3 compiled steps", lambda: _brief(train(cfg2, tracker=comp, data=data, progress=False))) is not None:
            warm = (comp.series("compile_seconds") or [float("nan")])[0]
            step_c = statistics.median(cfg.batch_tokens / t for t in comp.series("tokens_per_second")[1:])
            print(f"        compiled step {step_c * 1e3:.0f} ms ({comp.tags.get('precision')}) after a {warm:.1f} s "
                  f"warm-up; compile=auto compiles a run only where its own timed eager steps say the "
                  f"warm-up is repaid")
    return _doctor_verdict(problems)


def _brief(r) -> str:
    return f"val loss {r.curve[0][1]:.3f} -> {r.final_val_loss:.3f}, {r.wall_seconds:.1f}s"


def _doctor_verdict(problems: list[str]) -> int:
    if problems:
        print(f"error: doctor found {len(problems)} problem(s): " + "; ".join(problems), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


STUDY_FLAGS = ("dataset", "tokenizer", "vocab_size", "schedule", "lr", "beta2", "seed", "device", "precision",
               "compile", "early_stop", "parametrization", "mup_base_width")


def cmd_sweep(args) -> int:
    store.quiet_downloads(args.quiet)
    overrides = {k: getattr(args, k) for k in STUDY_FLAGS if getattr(args, k) not in (None, "") and k != "lr"}
    lr = parse_lr(args.lr)             # None: auto (the default), resolved below once the plan is final
    design = None if args.design in (None, "", "auto") else args.design
    if (design or plan_lib.default_design(args.mode)) == plan_lib.ADAPTIVE:   # validates the mode
        return cmd_adaptive(args, overrides, lr)
    for flag in ("target_width", "workers", "storage"):
        if getattr(args, flag) not in (None, "", "none"):
            raise SuiteError(f"--{flag} applies to the adaptive design; --design {args.design} trains a fixed plan")
    budget = None if args.budget in (None, "", "0", "none") else plan_lib.parse_duration(args.budget)
    if budget:
        plan_lib.check_time_budget(budget)   # before the speed probe below, which takes a minute
    branching = args.branching or "auto"
    plan = plan_lib.make_plan(args.mode, design, overrides, branching)   # validates mode, design, every config
    pick_device(plan.points[0].config.device)
    tracking.init_store()
    # The corpus, loaded once for the speed probe, the lr law's key and the study's runs (the
    # dataset and tokenizer are study-wide flags, so the final plan's first point has the same).
    first = plan.points[0].config
    data = data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
    if budget:
        print(f"measuring this device's speed for a {args.budget} study ...", flush=True)
        rates = sweep.probe_rates(plan, data)
        plan = plan_lib.fit_to_time(args.mode, design, budget, rates, overrides, branching=branching)
        print(f"planned {len(plan.points)} runs, {plan.spent_flops():.3g} FLOPs, "
              f"estimated {plan_lib.estimate_seconds(plan, rates):.0f}s of training", flush=True)
    plan, lr_info = resolve_lr(plan, data, lr)
    print(f"learning rates: {lr_info['lr_source']}: {lr_info['lr_rule']}", flush=True)
    if plan.branching:
        print(f"WSD branching: {len(plan.branches())} of {len(plan.points)} runs are cooldown branches; "
              f"{plan.spent_flops():.3g} FLOPs instead of {plan.total_flops():.3g} "
              f"({plan.spent_flops() / plan.total_flops():.2f}×)", flush=True)
    params = {"mode": args.mode, "design": args.design or "auto", "budget": args.budget or "0",
              "branching": branching}   # as asked (auto, true, false); the study's tag says whether it branched
    study = sweep.run_study(plan, args.experiment, params=params, progress=not args.quiet,
                            planned_seconds=budget, analyze=not args.no_analysis, lr_info=lr_info, data=data)
    done = sum(c.status != "FAILED" for c in study.children)
    print(f"study {study.parent_run_id}: {done}/{len(study.children)} runs finished "
          f"({sum(c.status == 'SKIPPED' for c in study.children)} from earlier), {study.wall_seconds:.0f}s")
    return 0 if done else 1


def cmd_adaptive(args, overrides: dict, lr) -> int:
    """`sweep` with the adaptive design (adaptive.py): every input checked before the speed probe."""
    if str(args.branching or "auto").lower() != "auto":
        raise SuiteError("--branching applies to the fixed designs (WSD runs sharing a trunk); the adaptive design "
                         "places each run itself")
    if str(overrides.get("early_stop", "false")).lower() in ("true", "1", "yes"):
        raise SuiteError("early_stop applies to the fixed designs; the adaptive design stops a budget's search "
                         "instead (--target_width stops the study)")
    box = (plan_lib.parse_duration(args.budget) if args.budget not in (None, "", "0", "none")
           else ladder_lib.BOXES[args.mode])
    if box <= adaptive.ANALYSIS_S:
        raise SuiteError(f"a box of {box:.0f}s is too small: set-up, the speed probe and the analysis alone take "
                         f"about {adaptive.ANALYSIS_S:.0f}s")
    width = None
    if args.target_width not in (None, "", "none"):
        try:
            width = float(args.target_width)
        except ValueError:
            raise SuiteError(f"--target_width takes a number, got {args.target_width!r}") from None
        if not (math.isfinite(width) and width > 0):
            raise SuiteError(f"--target_width must be a positive width of the 95% interval on a, got {args.target_width!r}")
    try:
        workers = int(args.workers) if args.workers not in (None, "") else adaptive.default_workers()
    except ValueError:
        raise SuiteError(f"--workers takes a whole number, got {args.workers!r}") from None
    if workers < 1:
        raise SuiteError(f"--workers must be at least 1, got {args.workers}")
    if not 1 <= args.heartbeat < args.grace:
        raise SuiteError(f"--heartbeat ({args.heartbeat}s) must be at least 1 s and shorter than --grace ({args.grace}s)")
    base = adaptive.base_config(args.mode, overrides)         # validates every setting
    pick_device(base.device)
    tracking.init_store()
    storage = worker.storage_url(args.storage)
    worker.open_storage(storage, None, None)                  # an unreachable storage fails here
    data = data_lib.load_data(base.dataset, base.tokenizer, base.vocab_size)
    settings = adaptive.Settings(args.mode, box, workers, width, storage, args.heartbeat, args.grace, experiment=args.experiment,
                                 progress=not args.quiet, analyze=not args.no_analysis)
    print(f"{args.mode} study, adaptive design: a box of {box:.0f}s on this machine", flush=True)
    out = adaptive.run_adaptive(base, data, settings, lr,
                                params={"design": args.design or "auto", "budget": args.budget or "0",
                                        "target_width": args.target_width or "none"})
    print(f"study {out.parent_run_id}: {len(out.children)} runs, {out.wall_seconds:.0f}s")
    return 0 if out.children else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scaling-suite", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="verb", required=True)

    t = sub.add_parser("train", help="train one model and track it in MLflow")
    add_config_flags(t)
    t.add_argument("--experiment", default=None, help="MLflow experiment (default: scaling-suite)")
    t.add_argument("--run_name", default=None)
    t.add_argument("--resume", default=None, metavar="RUN_ID", help="continue an interrupted run")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--json", action="store_true", help="also print the result as JSON")
    t.set_defaults(fn=cmd_train)

    w = sub.add_parser("sweep", help="run a planned scaling study (a parent run with a child per config)")
    w.add_argument("--mode", default="quick", help="smoke | quick | dev | full")
    w.add_argument("--design", default="auto", help="adaptive | isoflop | n_sweep | d_sweep (auto: the mode's own: "
                                                    "adaptive for quick, dev, full)")
    w.add_argument("--budget", default=None, help="wall-time box, e.g. 30m (adaptive: default the mode's box; "
                                                  "fixed designs: the largest plan that fits)")
    w.add_argument("--target_width", default=None, help="adaptive: end the ladder once the 95%% interval on a is "
                                                        "narrower than this")
    w.add_argument("--workers", default=None, help="adaptive: trainings at once, the cores split between them "
                                                   f"(default ${adaptive.WORKERS_ENV}, else 2 on a CPU with >= 2 cores, else 1)")
    w.add_argument("--heartbeat", type=int, default=worker.DEFAULT_HEARTBEAT,
                   help="adaptive: seconds between a trial's heartbeats")
    w.add_argument("--grace", type=int, default=worker.DEFAULT_GRACE,
                   help="adaptive: a trial silent this long (its worker died) is retried")
    w.add_argument("--storage", default=None, help=f"adaptive: Optuna RDB (default ${worker.STORAGE_ENV}, else "
                                                   f"{worker.DEFAULT_STORAGE})")
    w.add_argument("--experiment", default=None, help="MLflow experiment (default: scaling-suite)")
    for k in STUDY_FLAGS:
        w.add_argument(f"--{k}", default=None, help="applies to every run of the study" + (
            "; auto (default): the tuned lr law for this data/design (scaling-suite tune), else a rule" if k == "lr" else ""))
    w.add_argument("--branching", default="auto",
                   help="auto | true | false: train wsd runs that differ only in D as cooldown branches of one "
                        "trunk (auto: when --schedule wsd)")
    w.add_argument("--no_analysis", action="store_true", help="train only; analyze later")
    w.add_argument("--quiet", action="store_true", help="no progress bars")
    w.set_defaults(fn=cmd_sweep)

    d = sub.add_parser("doctor", help="check torch, device, precision in force, memory, store, a 12-step run "
                                      "and three compiled steps; print the step times")
    d.add_argument("--device", default=None)
    d.add_argument("--precision", default=None, help="auto | fp32 | bf16: the precision to check")
    d.set_defaults(fn=cmd_doctor)

    a = sub.add_parser("analyze", help="fit scaling laws to runs in MLflow or a CSV file")
    report.add_arguments(a)
    a.set_defaults(fn=cmd_analyze)

    optimize.register(sub)  # optimize, worker
    tune.register(sub)      # tune
    return p


def cmd_analyze(args) -> int:
    """From a CSV: just the report. From MLflow: the report is logged to an analysis run, nested
    under the study's parent run when one is named (or the experiment holds exactly one study)."""
    if args.csv:
        return report.main(args) or 0
    client = tracking.init_store()
    for name in args.experiment or []:
        if client.get_experiment_by_name(name) is None:
            raise SuiteError(f"unknown MLflow experiment {name!r} in {tracking.tracking_uri()}")
    parent = args.parent_run
    if parent is None and args.experiment and len(args.experiment) == 1:
        studies = tracking.find_runs_in(client, args.experiment[0], {"role": "study"})
        parent = studies[0].info.run_id if len(studies) == 1 else None
    if args.out == "out/analysis":  # the default: keep MLflow analyses apart from CSV ones
        args.out = str(store.scratch_dir() / "analysis")
    if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run -e analyze`: that run is the analysis run
        tags = {"role": "analysis", **({"mlflow.parentRunId": parent} if parent else {})}
        tracker = tracking.start_run(tags=tags, system_metrics=False)
    else:
        tracker = tracking.start_run((args.experiment or [None])[0], run_name="analysis",
                                     tags={"role": "analysis"}, parent_run_id=parent, system_metrics=False)
    with tracker.running():
        code = report.main(args, logger=tracker) or 0
    print(f"analysis run {tracker.run_id}" + (f" (nested under {parent})" if parent else ""))
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and threading.current_thread() is threading.main_thread():   # the command line, not a test
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_interrupt)
    try:
        return args.fn(args)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The runs were marked KILLED on the way out (Tracker.running); the shell's code for death
        # by a signal: 128 + its number (130 for a Ctrl-C, 143 for SIGTERM).
        print("interrupted: the run(s) in progress are marked KILLED; rerun the same command "
              "(or train --resume RUN_ID) to continue from the last checkpoint", file=sys.stderr)
        return 128 + SIGNALS[0] if SIGNALS else EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
