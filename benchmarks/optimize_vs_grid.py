"""Does the Optuna search find the compute-optimal size with fewer runs than a dense grid?

    python benchmarks/optimize_vs_grid.py                    # real training: dense grid vs search (minutes)
    python benchmarks/optimize_vs_grid.py --samplers         # synthetic law: which sampler (no training)

Real mode trains a dense log-spaced grid of --grid sizes at one budget --flops, then runs the search
(`scaling-suite optimize`, default sampler) with --trials runs (default: half the grid), and prints
both optima (parabola in log N, analysis.minimum.profile_minimum) and their ratio. Target: the search lands
within 1.25x of the grid's N* with at most half its runs.

Synthetic mode draws the same kind of problem without training: the real size table at the budget,
loss = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022 eq. 2 form, alpha 0.34, beta 0.28) with D =
C / flops_per_token of each shape, the optimum placed at random inside the range, Gaussian noise
added; each sampler gets the same replicates. It prints the median |log10(N_est / N*)| and how often
N_est lands within 1.25x of N* after T trials.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaling_suite.config import make_config  # noqa: E402
from analysis.minimum import profile_minimum  # noqa: E402
from scaling_suite.space import DEFAULT_SAMPLER, Space, make_sampler  # noqa: E402

TOL = math.log10(1.25)


def base_config(args):
    return make_config(context=args.context, batch_tokens=args.batch_tokens, eval_tokens=args.eval_tokens,
                       head_dim=args.head_dim, aspect=args.aspect, device="cpu", precision="fp32", C=1e18)


# --- synthetic ----------------------------------------------------------------------------------------

def synthetic(args) -> None:
    import random

    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = Space(base_config(args), args.flops, min_tpp=args.min_tpp)
    E, alpha, beta = 1.69, 0.34, 0.28
    checkpoints = sorted(set(args.at))
    T = max(checkpoints)
    samplers = args.sampler_list.split(",")
    # At the optimum the two reducible terms sum to R (--reducible) and alpha*T1 = beta*T2, so the
    # IsoFLOP curvature is d2L/d(ln N)^2 = alpha*beta*R: the loss rises ~0.023 R nats at 2x off N*.
    R = args.reducible
    rise = 0.5 * alpha * beta * R * math.log(2) ** 2
    print(f"synthetic: C={args.flops:.3g}, {len(space.shapes)} sizes N {space.shapes[0].N:,}..{space.shapes[-1].N:,}, "
          f"{args.replicates} replicates, noise sd {args.noise} nats, loss rises {rise:.4f} nats at 2x off N*, "
          f"init {args.init}, D = C / 6N")
    rng = random.Random(0)
    problems = []
    for _ in range(args.replicates):
        n_star = 10 ** (space.lo + (space.hi - space.lo) * rng.uniform(0.25, 0.75))
        A = beta * R / (alpha + beta) * n_star ** alpha
        B = alpha * R / (alpha + beta) * (space.C / (6 * n_star)) ** beta
        problems.append((n_star, A, B, rng.randrange(10 ** 9)))
    header = "  ".join(f"T={t:<2d} med|err| within1.25x" for t in checkpoints)
    print(f"{'sampler':<10} {header}   s/suggest")
    for name in samplers:
        errs = {t: [] for t in checkpoints}
        t0, asks = time.perf_counter(), 0
        for r, (n_star, A, B, seed) in enumerate(problems):
            noise = random.Random(seed)
            used, Ns, losses = set(), [], []

            def loss_of(s):
                return E + A * s.N ** -alpha + B * (space.C / (6 * s.N)) ** -beta + noise.gauss(0, args.noise)

            if name == "grid":  # a non-adaptive log-spaced grid of T runs, for each T
                for t in checkpoints:
                    g = space.grid(t)
                    fit = profile_minimum([s.N for s in g], [loss_of(s) for s in g], decades=args.window, n_bootstrap=0)
                    errs[t].append(abs(math.log10(fit["x_opt"] / n_star)))
                continue
            study = optuna.create_study(sampler=make_sampler(name, seed=r, n_startup=args.init))
            if name.startswith("grid+"):
                for s in space.grid(args.init):
                    study.enqueue_trial({"log10_N": math.log10(s.N)})
            for t in range(1, T + 1):
                trial = study.ask()
                x = trial.suggest_float("log10_N", space.lo, space.hi)
                asks += 1
                s = next(s for s in space.nearest(x) if s not in used)   # as worker.Objective: nearest free size
                used.add(s)
                y = loss_of(s)
                study.tell(trial, y)
                Ns.append(s.N)
                losses.append(y)
                if t in errs:
                    fit = profile_minimum(Ns, losses, decades=args.window, n_bootstrap=0)
                    errs[t].append(abs(math.log10(fit["x_opt"] / n_star)))
        cells = "  ".join(f"{statistics.median(errs[t]):>11.3f} {sum(e <= TOL for e in errs[t]) / len(errs[t]):>10.0%}"
                          for t in checkpoints)
        per = (time.perf_counter() - t0) / asks if asks else 0.0
        print(f"{name:<10} {cells}   {per:.3f}", flush=True)


# --- real ---------------------------------------------------------------------------------------------

def real(args) -> None:
    import optuna

    from scaling_suite.cli import main
    from scaling_suite.optimize import trial_table

    out = Path(args.out or tempfile.mkdtemp(prefix="optimize-vs-grid-"))
    (out / "mlruns").mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out}/mlruns/mlflow.db"
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    storage = f"sqlite:///{out}/mlruns/optuna.db"
    trials = args.trials or args.grid // 2
    common = ["--flops", f"{args.flops:g}", "--storage", storage, "--quiet", "--threads", str(args.threads),
              "--context", str(args.context), "--batch_tokens", str(args.batch_tokens),
              "--eval_tokens", str(args.eval_tokens), "--head_dim", str(args.head_dim), "--aspect", str(args.aspect),
              "--device", "cpu", "--precision", "fp32", "--min_tpp", str(args.min_tpp), "--window", str(args.window)]
    space = Space(base_config(args), args.flops, min_tpp=args.min_tpp)
    print(f"C={args.flops:.3g} FLOPs: {len(space.shapes)} sizes N {space.shapes[0].N:,}..{space.shapes[-1].N:,}; "
          f"store {out}")
    results = {}
    for label, sampler, n in (("grid", "grid", args.grid), ("search", args.sampler, trials)):
        t0 = time.perf_counter()
        assert main(["optimize", *common, "--study", f"bench-{label}", "--sampler", sampler, "--trials", str(n),
                     "--init", str(args.init), "--sampler_seed", "0"]) == 0
        study = optuna.load_study(study_name=f"bench-{label}-C={args.flops:.3g}", storage=storage)
        rows = trial_table(study)
        fit = profile_minimum([r["N"] for r in rows], [r["final_val_loss"] for r in rows], decades=args.window)
        results[label] = (fit, rows, time.perf_counter() - t0)
    print("\nrun                N          final_val_loss")
    for label, (fit, rows, wall) in results.items():
        for r in rows:
            print(f"{label:<7} trial {r['trial']:>2}  {r['N']:>9,}  {r['final_val_loss']:.4f}")
    print()
    for label, (fit, rows, wall) in results.items():
        iv = f"[{fit['x_lo']:,.0f}, {fit['x_hi']:,.0f}]" if math.isfinite(fit["x_lo"]) else "-"
        print(f"{label:<7} runs {len(rows):>2}  N* = {fit['x_opt']:>9,.0f}  95% {iv:<22} loss* {fit['loss_opt']:.4f}  "
              f"fit {fit['status']} ({fit['n_points']} pts)  best run N {fit['best_x']:,.0f}  wall {wall:.0f}s")
    (g, grows, _), (s, srows, _) = results["grid"], results["search"]
    ratio = s["x_opt"] / g["x_opt"]
    ok = max(ratio, 1 / ratio) <= 1.25 and len(srows) <= len(grows) / 2
    print(f"\nsearch N* / grid N* = {ratio:.3f} (|log10| {abs(math.log10(ratio)):.3f}); runs {len(srows)} vs "
          f"{len(grows)}: {'PASS' if ok else 'FAIL'} (target: within 1.25x with at most half the runs)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samplers", action="store_true", help="synthetic sampler comparison (no training)")
    p.add_argument("--flops", type=float, default=3e11)
    p.add_argument("--grid", type=int, default=12, help="dense grid size (real mode)")
    p.add_argument("--trials", type=int, default=0, help="search runs (real mode; default grid/2)")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--init", type=int, default=4)
    p.add_argument("--window", type=float, default=0.5)
    p.add_argument("--min_tpp", type=float, default=1.0)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--batch_tokens", type=int, default=4096)
    p.add_argument("--eval_tokens", type=int, default=16384)
    p.add_argument("--head_dim", type=int, default=8)
    p.add_argument("--aspect", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: safe on a shared machine)")
    p.add_argument("--out", default=None, help="folder for the MLflow store and the Optuna storage")
    p.add_argument("--replicates", type=int, default=20)
    p.add_argument("--noise", type=float, default=0.005, help="synthetic loss noise sd (nats)")
    p.add_argument("--reducible", type=float, default=1.0, help="synthetic: reducible loss at N* (nats)")
    p.add_argument("--at", type=int, nargs="+", default=[5, 6, 8, 12], help="synthetic: report after T trials")
    p.add_argument("--sampler_list", default="random,grid,tpe,grid+tpe,gp,grid+gp")
    args = p.parse_args()
    synthetic(args) if args.samplers else real(args)


if __name__ == "__main__":
    main()
