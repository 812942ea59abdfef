"""`scaling-suite <verb>`: parse, call, print. Every flag is a RunConfig field of the same name.

Errors the user can fix end as one line, `error: ...`, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields

from .config import PRESETS, RunConfig, from_preset, make_config
from .errors import SuiteError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


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


def cmd_train(args) -> int:
    from . import data as data_lib
    from . import tracking
    from .device import pick_device
    from .train import config_from_params, load_checkpoint, result_dict, train

    tracking.quiet_downloads(args.quiet)
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
    with tracking.scratch() as tmp:
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


def cmd_doctor(args) -> int:
    """Check this machine end to end, as the original framework's test script did."""
    import torch

    from . import data as data_lib
    from . import tracking
    from .device import available_memory, compile_support, pick_device, pick_precision
    from .train import train

    problems = []
    def check(name, fn):
        t = time.perf_counter()
        try:
            detail = fn()
            print(f"  ok    {name}: {detail}  ({time.perf_counter() - t:.1f}s)")
            return detail
        except Exception as e:  # noqa: BLE001
            problems.append(f"{name}: {e}")
            print(f"  FAIL  {name}: {e}")

    print("scaling-suite doctor")
    device = check("device", lambda: pick_device(args.device or "auto"))
    if device is not None:
        check("device works", lambda: f"matmul on {device} = {float((torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)).sum()):.0f}")
        check("memory available", lambda: f"{available_memory(device) / 2**30:.1f} GiB")
    cfg = from_preset("tiny", device=args.device or "auto")
    cfg = cfg.replace(D=20 * cfg.batch_tokens, eval_every=20)
    check("precision", lambda: ", ".join(
        f"{pick_precision(device, 'auto', cfg.shape(), c)} for the tiny preset {'compiled' if c else 'eager'}"
        for c in (False, True) if not c or compile_support(device) is None) if device else "-")
    check("MLflow store", lambda: (tracking.init_store(), tracking.tracking_uri())[1])
    data = check("data (stdlib corpus)", lambda: data_lib.load_data(cfg.dataset))
    if data is not None:
        r = check("20-step training", lambda: train(cfg, data=data, progress=False))
        if r is not None:
            print(f"        {r.tokens_per_second:,.0f} tokens/s, val loss {r.curve[0][1]:.3f} -> {r.final_val_loss:.3f}")
            if not r.final_val_loss < r.curve[0][1]:
                problems.append("training did not lower the validation loss")
    if problems:
        print("doctor found problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("all checks passed")
    return 0


STUDY_FLAGS = ("dataset", "tokenizer", "vocab_size", "schedule", "lr", "beta2", "seed", "device", "precision",
               "compile", "early_stop", "parametrization", "mup_base_width")


def cmd_sweep(args) -> int:
    from . import plan as plan_lib
    from . import sweep, tracking
    from .device import pick_device

    from .tune import parse_lr, resolve_lr

    tracking.quiet_downloads(args.quiet)
    overrides = {k: getattr(args, k) for k in STUDY_FLAGS if getattr(args, k) not in (None, "") and k != "lr"}
    lr = parse_lr(args.lr)             # None: auto (the default), resolved below once the plan is final
    design = None if args.design in (None, "", "auto") else args.design
    budget = None if args.budget in (None, "", "0", "none") else plan_lib.parse_duration(args.budget)
    if budget:
        plan_lib.check_time_budget(budget)   # before the speed probe below, which takes a minute
    branching = args.branching or "auto"
    plan = plan_lib.make_plan(args.mode, design, overrides, branching)   # validates mode, design, every config
    pick_device(plan.points[0].config.device)
    tracking.init_store()
    if budget:
        from . import data as data_lib
        first = plan.points[0].config
        data = data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
        print(f"measuring this device's speed for a {args.budget} study ...", flush=True)
        rates = sweep.probe_rates(plan, data)
        plan = plan_lib.fit_to_time(args.mode, design, budget, rates, overrides, branching=branching)
        print(f"planned {len(plan.points)} runs, {plan.spent_flops():.3g} FLOPs, "
              f"estimated {plan_lib.estimate_seconds(plan, rates):.0f}s of training", flush=True)
    from . import data as data_lib
    first = plan.points[0].config
    plan, lr_info = resolve_lr(plan, data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size), lr)
    print(f"learning rates: {lr_info['lr_source']}: {lr_info['lr_rule']}", flush=True)
    if plan.branching:
        print(f"WSD branching: {len(plan.branches())} of {len(plan.points)} runs are cooldown branches; "
              f"{plan.spent_flops():.3g} FLOPs instead of {plan.total_flops():.3g} "
              f"({plan.spent_flops() / plan.total_flops():.2f}×)", flush=True)
    params = {"mode": args.mode, "design": args.design or "auto", "budget": args.budget or "0",
              "branching": branching}   # as asked (auto, true, false); the study's tag says whether it branched
    study = sweep.run_study(plan, args.experiment, params=params, progress=not args.quiet,
                            planned_seconds=budget, analyze=not args.no_analysis, lr_info=lr_info)
    done = sum(c.status != "FAILED" for c in study.children)
    print(f"study {study.parent_run_id}: {done}/{len(study.children)} runs finished "
          f"({sum(c.status == 'SKIPPED' for c in study.children)} from earlier), {study.wall_seconds:.0f}s")
    return 0 if done else 1


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
    w.add_argument("--design", default="auto", help="isoflop | n_sweep | d_sweep (auto: the mode's own)")
    w.add_argument("--budget", default=None, help="wall-time budget, e.g. 30m: the largest study that fits")
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

    d = sub.add_parser("doctor", help="check device, precision, memory, store and a 20-step run")
    d.add_argument("--device", default=None)
    d.set_defaults(fn=cmd_doctor)

    a = sub.add_parser("analyze", help="fit scaling laws to runs in MLflow or a CSV file")
    from analysis import report
    report.add_arguments(a)
    a.set_defaults(fn=cmd_analyze)

    from . import optimize, tune
    optimize.register(sub)  # optimize, worker
    tune.register(sub)      # tune
    return p


def cmd_analyze(args) -> int:
    """From a CSV: just the report. From MLflow: the report is logged to an analysis run, nested
    under the study's parent run when one is named (or the experiment holds exactly one study)."""
    from analysis import report

    from . import tracking

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
        args.out = str(tracking.scratch_dir() / "analysis")
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
    try:
        return args.fn(args)
    except SuiteError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        # The runs were marked KILLED on the way out (Tracker.running); 130 = 128 + SIGINT, the
        # shell's code for a Ctrl-C.
        print("interrupted: the run(s) in progress are marked KILLED; rerun the same command "
              "(or train --resume RUN_ID) to continue from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
