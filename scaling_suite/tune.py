"""The tuned frontier: per-size learning-rate search, the learning-rate law, and `lr=auto`.

    scaling-suite tune --mode quick
    mlflow run . -e tune -P mode=quick --env-manager local

Why: small models are sensitive to hyperparameters, and scaling laws appear cleanly only on the
tuned frontier. Porian et al. 2024 (§4) moved the compute-optimal allocation exponent from 0.57 to
0.50 by tuning learning rate, batch and AdamW β2 per size; Lourie et al. 2026 find hyperparameters
the main confound below ~100M parameters.

For each model size of the mode, at one tokens-per-parameter ratio, an Optuna study searches the
peak learning rate (log scale) and β2 (0.95 / 0.99 / 0.999), optionally warmup. All trials of a size
share N, D and the evaluation steps, so their intermediate validation losses are comparable and a
median pruner (Optuna's MedianPruner, after a warm-up fraction of the run) stops the bad ones:
the compute it saved is 1 - FLOPs trained / FLOPs had every trial finished. Each trial is a nested
MLflow run of the tuning run (sweep.run_child); a pruned one ends KILLED with tag pruned=true and
metric tokens_trained.

Per size, a parabola in log10 lr through the completed trials near the best one
(analysis.minimum.profile_minimum, the routine of every optimum in the project) gives a steadier
optimum than the best trial, with a percentile bootstrap interval over trials. The law
lr*(N) = c N^-k is fitted through those optima (analysis.fit.fit_lr_law) and logged on the tuning
run: metrics lr_law_c, lr_law_k with _lo/_hi, lr_law.json, plots/lr_law.png, and tag lr_law_key,
a digest of what the law depends on (lr_auto.law_key). `lr_auto.resolve_lr` finds the newest law whose key matches
a study's, so `sweep --lr auto` (the default) trains each size at the law's lr.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time

import optuna

from . import data as data_lib
from . import tracking, worker
from .config import RunConfig, make_config, validate
from .device import pick_device
from .errors import SuiteError
from .lr_auto import ROLE, law_key
from .optimize import parse_numbers
from .plan import MODES
from .sweep import run_child
from .train import Pruned
from .tune_report import fit_optimum, summarize, summary_text
from .worker import DEFAULT_STORAGE

BETA2 = (0.95, 0.99, 0.999)
SEARCHABLE = ("lr", "beta2", "warmup")
WARMUP_MULTIPLES = (0.25, 1.0, 4.0)   # warmup_tokens = multiple x N (the default is 1 x N, Porian et al. §4.2)
TRIAL_ROLE = "tune_trial"             # not "train": mistuned trials are no scaling-law data (analysis.load)

# Per mode: the sizes tuned, the tokens-per-parameter ratio and trials per size. Quick: depths 1-4
# (N 7.5k-218k, 1.5 decades) at D/N = 20 (Hoffmann et al. 2022's compute-optimal ratio). The quick
# IsoFLOP runs sit at D/N 250-550, where the optimal lr is lower (a longer horizon wants a smaller
# lr: Bjorck et al. 2024, "Scaling Optimal LR Across Token Horizons"); 20 is what fits ~25 minutes on
# one core (depth 4 alone trains 4.4M tokens per trial at ~16k tokens/s). --tokens_per_param moves it.
TUNE_MODES = {
    "smoke": dict(depths=[1, 2, 3], tokens_per_param=20.0, trials=4),
    "quick": dict(depths=[1, 2, 3, 4], tokens_per_param=20.0, trials=6),
    "dev": dict(depths=[2, 3, 4, 5, 6], tokens_per_param=20.0, trials=8),
    "full": dict(depths=[4, 6, 8, 10, 12], tokens_per_param=20.0, trials=8),
}
# --- the search --------------------------------------------------------------------------------------

def check_settings(depths, lr_min, lr_max, trials, tokens_per_param, prune_after, search, beta2) -> None:
    """Every bad setting is one line, before anything loads or trains."""
    if len(set(depths)) < 2:
        raise SuiteError(f"tuning fits a law across sizes and needs at least 2 sizes, got depths {sorted(set(depths))}")
    if any(d < 1 for d in depths):
        raise SuiteError(f"depths must be at least 1, got {depths}")
    for name, v in (("--lr_min", lr_min), ("--lr_max", lr_max)):
        if not (math.isfinite(v) and v > 0):
            raise SuiteError(f"{name} must be a positive number, got {v:g}")
    if lr_min >= lr_max:
        raise SuiteError(f"the learning-rate range is empty: --lr_min {lr_min:g} is not below --lr_max {lr_max:g}")
    if trials < 2:
        raise SuiteError(f"--trials must be at least 2 per size, got {trials}")
    if not (math.isfinite(tokens_per_param) and tokens_per_param > 0):
        raise SuiteError(f"--tokens_per_param must be positive, got {tokens_per_param:g}")
    if not 0 <= prune_after < 1:
        raise SuiteError(f"--prune_after must lie in [0, 1), got {prune_after:g}")
    bad = set(search) - set(SEARCHABLE)
    if bad or "lr" not in search:
        raise SuiteError(f"--search takes lr (required), beta2, warmup; got {', '.join(search)}")
    if not beta2 or any(not 0 < b < 1 for b in beta2):
        raise SuiteError(f"--beta2 values must lie in (0, 1), got {beta2}")


def size_configs(mode: str, depths, tokens_per_param: float, overrides: dict) -> list[RunConfig]:

    if mode not in MODES:
        raise SuiteError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    base = {**MODES[mode]["base"], **overrides}
    return [make_config(**base, depth=k, tokens_per_param=tokens_per_param) for k in sorted(set(depths))]


def lr_grid(lr_min: float, lr_max: float, k: int) -> list[float]:
    """k log-spaced lrs across the range, middle first: the pruner's first (never pruned) trials
    are then the likeliest good ones, and the extremes are judged against them."""
    if k <= 0:
        return []
    xs = [lr_min * (lr_max / lr_min) ** (i / max(1, k - 1)) for i in range(k)] if k > 1 else [math.sqrt(lr_min * lr_max)]
    return sorted(xs, key=lambda x: abs(math.log(x) - 0.5 * math.log(lr_min * lr_max)))


def _trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state.name not in ("COMPLETE", "PRUNED", "FAIL") or "lr" not in t.user_attrs:
            continue
        if t.state.name == "FAIL" and "run_status" not in t.user_attrs:
            continue     # interrupted (Ctrl-C, kill) before its run ended: not a result, not counted
        u = t.user_attrs
        last = max(t.intermediate_values) if t.intermediate_values else None
        rows.append({"trial": t.number, "state": t.state.name, "lr": u["lr"], "beta2": u["beta2"],
                     "warmup_tokens": u.get("warmup_tokens"),
                     "final_val_loss": t.value if t.state.name == "COMPLETE" and t.value is not None else math.nan,
                     "last_step": last, "last_val_loss": t.intermediate_values[last] if last is not None else math.nan,
                     "flops_trained": u.get("flops_trained", 0.0), "C": u.get("C", 0.0),
                     "mlflow_run_id": u.get("mlflow_run_id")})
    return rows


class Objective:
    """One trial: suggest lr (and β2, warmup), train through sweep.run_child with a pruning hook."""

    def __init__(self, cfg: RunConfig, parent_run_id: str, data, lr_min, lr_max, search, beta2, prune_after,
                 study_key: str, progress: bool):
        self.cfg, self.parent, self.data = cfg, parent_run_id, data
        self.lr_min, self.lr_max, self.search, self.beta2 = lr_min, lr_max, tuple(search), tuple(beta2)
        self.study_key, self.progress = study_key, progress
        self.d = cfg.derived()
        self.warmup_steps = prune_after * self.d.steps    # no pruning before this share of the run

    def __call__(self, trial) -> float:
        lr = trial.suggest_float("lr", self.lr_min, self.lr_max, log=True)
        extra = {"lr": lr}
        if "beta2" in self.search:
            extra["beta2"] = trial.suggest_categorical("beta2", list(self.beta2))
        if "warmup" in self.search:
            extra["warmup_tokens"] = trial.suggest_categorical("warmup", list(WARMUP_MULTIPLES)) * self.d.N
        cfg = self.cfg.replace(**extra)
        validate(cfg)
        for k, v in {"lr": cfg.lr, "beta2": cfg.beta2, "warmup_tokens": cfg.warmup_tokens, "C": self.d.C,
                     "N": self.d.N, "D": self.d.D}.items():
            trial.set_user_attr(k, v)

        def on_eval(step: int, val_loss: float) -> None:

            trial.report(val_loss, step)
            if step >= self.warmup_steps and trial.should_prune():
                raise Pruned(step, f"pruned by Optuna's median rule at step {step} of {self.d.steps} "
                                   f"(val_loss {val_loss:.4f})")

        tags = {"role": TRIAL_ROLE, "search": "lr_tune", "optuna_study": trial.study.study_name,
                "optuna_trial": str(trial.number), "depth": str(cfg.depth)}
        out = run_child(cfg, self.parent, tags=tags, data=self.data, progress=self.progress,
                        study_key=self.study_key, on_eval=on_eval)
        # SKIPPED: finished earlier (same config and code), so it counts as a whole run.
        tokens = self.d.D if out.status == "SKIPPED" else out.tokens_trained if math.isfinite(out.tokens_trained) else 0.0
        trial.set_user_attr("mlflow_run_id", out.run_id)
        trial.set_user_attr("run_status", out.status)
        trial.set_user_attr("flops_trained", tokens * self.d.flops_per_token)
        if out.status == "PRUNED":
            raise optuna.TrialPruned(out.reason)
        if out.status == "FAILED":      # diverged at this lr: Optuna records FAIL (nan), the search goes on
            trial.set_user_attr("failure_reason", out.reason[:1000])
            return math.nan
        return float(out.final_val_loss)


def _study_key(cfgs, settings: dict) -> str:
    blob = json.dumps([[c.to_params() for c in cfgs], settings], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_tune(cfgs: list[RunConfig], *, trials: int, lr_min: float, lr_max: float, search=("lr", "beta2"),
             beta2=BETA2, prune_after: float = 0.3, init: int = 3, window: float = 0.6,
             storage_url: str | None = None, study_prefix: str = "lr-tune", experiment: str | None = None,
             seed: int = 0, progress: bool = True, params: dict | None = None, say=print) -> dict:
    """Tune every size in CFGS, fit the law, log everything on one tuning run. Returns the summary."""

    t0 = time.perf_counter()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    first = cfgs[0]
    data = data_lib.load_data(first.dataset, first.tokenizer, first.vocab_size)
    key, key_parts = law_key(first, data.digest)
    settings = {"lr_min": lr_min, "lr_max": lr_max, "search": sorted(search), "beta2": list(beta2),
                "prune_after": prune_after, "init": init, "seed": seed}
    skey = _study_key(cfgs, settings)
    storage = worker.open_storage(storage_url or worker.DEFAULT_STORAGE, None, None)
    client = tracking.init_store()
    tags = {"role": ROLE, "tune_key": skey, "lr_law_key": key,
            **{f"lr_law_{k}": str(v) for k, v in key_parts.items()}}
    parent = _tuning_run(client, experiment, tags, skey)
    with parent.running():
        parent.log_params({**(params or {}), "depths": " ".join(str(c.depth) for c in cfgs),
                           "tokens_per_param": first.tokens_per_param, "lr_min": lr_min, "lr_max": lr_max,
                           "search": " ".join(search), "beta2": " ".join(f"{b:g}" for b in beta2),
                           "prune_after": prune_after, "parametrization": first.parametrization,
                           "mup_base_width": first.mup_base_width})
        sizes = []
        for cfg in cfgs:
            d = cfg.derived()
            name = f"{study_prefix}-{skey}-depth{cfg.depth}"
            study = _size_study(name, storage, cfg, seed, init, lr_grid(lr_min, lr_max, min(init, trials)), search, beta2)
            counted = [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")
                       or (t.state.name == "FAIL" and "run_status" in t.user_attrs)]
            todo = max(0, trials - len(counted))
            say(f"[depth {cfg.depth}] N={d.N:,} D={d.D:,} ({d.steps} steps, D/N={d.D / d.N:.1f}): "
                f"{todo} trial(s) to run, Optuna study {name}")
            objective = Objective(cfg, parent.run_id, data, lr_min, lr_max, search, beta2, prune_after, skey,
                                  progress)
            for _ in range(todo):
                seen: list = []
                study.optimize(objective, n_trials=1, gc_after_trial=False, callbacks=[lambda s, t: seen.append(t)])
                for t in seen:
                    u = t.user_attrs
                    say(f"[depth {cfg.depth}] trial {t.number}: lr={u.get('lr', math.nan):.3g} "
                        f"beta2={u.get('beta2', math.nan):g} -> {t.state.name.lower()}"
                        + (f" at {u.get('flops_trained', 0) / d.C:.0%} of the run" if t.state.name == "PRUNED"
                           else f" loss={t.value:.4f}" if t.value is not None and math.isfinite(t.value) else ""))
            rows = _trial_rows(study)
            opt = fit_optimum(rows, window)
            sizes.append({"depth": cfg.depth, "d_model": d.shape.d_model, "N": d.N, "D": d.D, "C": d.C,
                          "steps": d.steps, "study": name, "optimum": opt, "trials": rows})
            if "lr_opt" in opt:
                # lr_lo/hi always logged, NaN without an interval: else the run's latest lr_lo/hi in the UI
                # would belong to an earlier size than its latest lr_opt.
                m = {"lr_opt": opt["lr_opt"], "loss_opt": opt["loss_opt"], "lr_lo": opt["lr_lo"], "lr_hi": opt["lr_hi"]}
                parent.log_metrics(m, step=d.N)   # one point per size: the MLflow step is N
                iv = f" [{opt['lr_lo']:.3g}, {opt['lr_hi']:.3g}]" if math.isfinite(opt["lr_lo"]) else ""
                say(f"[depth {cfg.depth}] lr_opt = {opt['lr_opt']:.4g}{iv} ({opt['status']}; best trial lr "
                    f"{opt['best_lr']:.3g}, beta2 {opt['best_beta2']:g}, loss {opt['best_loss']:.4f})")
        out = summarize(sizes, first, parent, key, key_parts, time.perf_counter() - t0)
    out["run_id"] = parent.run_id
    return out


def _tuning_run(client, experiment: str | None, tags: dict, skey: str):
    """The tuning run: `mlflow run`'s when under it, else the earlier run of the same tuning
    (resumed), else a new one."""
    if os.environ.get("MLFLOW_RUN_ID"):     # under `mlflow run`: that run is the tuning run
        return tracking.start_run(tags={**tags, "mlflow.runName": "lr tuning"}, system_metrics=False)
    exp_id = tracking.experiment_id(client, experiment)
    earlier = client.search_runs([exp_id], f"tags.role = '{ROLE}' and tags.tune_key = '{skey}'", max_results=1,
                                 order_by=["attributes.start_time DESC"])
    return tracking.start_run(experiment, run_name="lr tuning", tags=tags,
                              run_id=earlier[0].info.run_id if earlier else None, system_metrics=False,
                              reopen=True)   # the same tuning, run again


def _size_study(name: str, storage, cfg: RunConfig, seed: int, init: int, lrs, search, beta2):
    """One size's Optuna study, loaded, or created with a first trial per lr in LRS enqueued;
    trials a killed process left RUNNING are marked FAIL (not counted)."""
    sampler = optuna.samplers.TPESampler(seed=seed + cfg.depth, n_startup_trials=max(1, init), multivariate=True)
    # Median rule: stop a trial whose loss at a step is worse than the median of completed
    # trials at that step, after prune_after of the run (before it, high and low lrs are not
    # yet told apart: a cosine run's ranking settles as the lr decays).
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", sampler=sampler,
                                pruner=pruner, load_if_exists=True)
    if not study.trials:
        for lr in lrs:
            fixed = {"lr": lr}
            if "beta2" in search:
                fixed["beta2"] = cfg.beta2 if cfg.beta2 in beta2 else beta2[0]
            if "warmup" in search:
                fixed["warmup"] = 1.0
            study.enqueue_trial(fixed)
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "RUNNING":
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return study


# --- the command ---------------------------------------------------------------------------------

TUNE_FLAGS = ("dataset", "tokenizer", "vocab_size", "schedule", "seed", "device", "precision", "parametrization",
              "mup_base_width", "beta1", "weight_decay")


def cmd_tune(args) -> int:

    if args.mode not in MODES:
        raise SuiteError(f"unknown mode {args.mode!r}; choose one of: {', '.join(MODES)}")
    spec = TUNE_MODES[args.mode]
    one = lambda v, name: (parse_numbers([v], name) or [math.nan])[0]   # noqa: E731
    depths = [int(x) for x in parse_numbers(args.depths, "--depths")] if args.depths else spec["depths"]
    tpp = one(args.tokens_per_param, "--tokens_per_param") if args.tokens_per_param not in (None, "") \
        else spec["tokens_per_param"]
    trials = int(one(args.trials, "--trials")) if args.trials not in (None, "") else spec["trials"]
    lr_min, lr_max = one(args.lr_min, "--lr_min"), one(args.lr_max, "--lr_max")
    search = tuple(args.search or ("lr", "beta2"))
    beta2 = tuple(parse_numbers(args.beta2, "--beta2")) if args.beta2 else BETA2
    check_settings(depths, lr_min, lr_max, trials, tpp, one(args.prune_after, "--prune_after"), search, beta2)
    overrides = {k: getattr(args, k) for k in TUNE_FLAGS if getattr(args, k, None) not in (None, "")}
    cfgs = size_configs(args.mode, depths, tpp, overrides)
    pick_device(cfgs[0].device)
    tracking.init_store()
    out = run_tune(cfgs, trials=trials, lr_min=lr_min, lr_max=lr_max, search=search, beta2=beta2,
                   prune_after=float(args.prune_after), init=int(args.init), window=float(args.window),
                   storage_url=args.storage, study_prefix=args.study, experiment=args.experiment,
                   seed=int(args.sampler_seed), progress=not args.quiet, params={"mode": args.mode})
    print(summary_text(out))
    return 0 if "law" in out else 1


def register(sub) -> None:

    t = sub.add_parser("tune", help="tune lr (and beta2) per size; fit the lr law that `sweep --lr auto` uses")
    t.add_argument("--mode", default="quick", help="smoke | quick | dev | full (the sizes' shapes and batch)")
    t.add_argument("--depths", nargs="+", default=None, help="the sizes to tune (default: the mode's, e.g. quick 1 2 3 4)")
    t.add_argument("--tokens_per_param", default=None, help="D/N of every trial (default 20)")
    t.add_argument("--trials", default=None, help="trials per size (default: quick 6)")
    t.add_argument("--lr_min", default="2e-3", help="lowest peak lr searched (log scale; default 2e-3)")
    t.add_argument("--lr_max", default="8e-2", help="highest peak lr searched (default 8e-2)")
    t.add_argument("--search", nargs="+", default=None, choices=SEARCHABLE, help="what to search (default: lr beta2)")
    t.add_argument("--beta2", nargs="+", default=None, help="beta2 choices (default 0.95 0.99 0.999)")
    t.add_argument("--prune_after", default="0.3", help="share of a run before pruning may stop it (default 0.3)")
    t.add_argument("--init", default="3", help="log-spaced lr grid trials per size before the sampler (default 3)")
    t.add_argument("--window", default="0.6", help="parabola fit: decades of lr around the best trial")
    t.add_argument("--storage", default=DEFAULT_STORAGE, help=f"Optuna RDB URL (default {DEFAULT_STORAGE})")
    t.add_argument("--study", default="lr-tune", help="Optuna study name prefix")
    t.add_argument("--sampler_seed", default="0")
    t.add_argument("--experiment", default=None, help="MLflow experiment (default: scaling-suite)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    for k in TUNE_FLAGS:
        t.add_argument(f"--{k}", default=None, help="applies to every trial")
    t.set_defaults(fn=cmd_tune)

