"""`lr=auto`: the learning rate of every run of a study, from a tuned law, a preset law or a rule.

A tuning run (tune.py) fits lr*(N) = c N^-k on a study's shapes and data and tags itself with
lr_law_key, a digest of what the law depends on (law_key). resolve_lr finds the newest such law
for a plan, else a law measured on the reference machine for the same shapes (PRESET_LAWS), else
the DeepSeek LLM rule, and sets each run's lr. Studies (sweep, cli) call it; it sits below them
and beside the search, and trains nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math

from analysis.laws import lr_law

from . import tracking
from .config import RunConfig, validate
from .errors import SuiteError
from .plan import Point

ROLE = "tune"                         # the tuning run's role tag, which find_law searches for

# Fields a law depends on: the same data (content digest + tokenizer), shape family, context, batch,
# schedule and parametrization. Not N or D (the law is in N), not lr or β2 (tuned).
LAW_FIELDS = ("tokenizer", "vocab_size", "aspect", "head_dim", "context", "batch_tokens", "schedule",
              "parametrization", "mup_base_width")


# --- the law's identity and lr=auto ----------------------------------------------------------------

def law_key(cfg: RunConfig, data_digest: str) -> tuple[str, dict]:
    parts = {"data_digest": data_digest, **{k: getattr(cfg, k) for k in LAW_FIELDS}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16], parts


def find_law(client, key: str):
    """The newest FINISHED tuning run with this law key and a fitted law, in any experiment; or None."""
    exps = [e.experiment_id for e in client.search_experiments()]
    if not exps:
        return None
    runs = client.search_runs(exps, f"tags.role = '{ROLE}' and tags.lr_law_key = '{key}' and "
                                    "attributes.status = 'FINISHED'", max_results=50,
                              order_by=["attributes.start_time DESC"])
    return next((r for r in runs if "lr_law_c" in r.data.metrics), None)


# Laws measured on the reference machine, used by lr=auto when this machine has no tuning run for a
# study's law key (a fresh clone): today the quick mode's shapes on the default corpus (matched on the
# fields, not the digest: the stdlib text differs a little between Python versions). Tuned with
# `scaling-suite tune --mode quick --trials 6 --lr_min 2e-3 --lr_max 1.2e-1` (4 sizes, N 7.5k-218k, at
# D/N = 20) twice: c = 181, k = 0.881 and c = 176.7, k = 0.878 (2026-11-28; per-size optima 0.0855
# at the range's edge, 0.0091, 0.0155, 0.0029). Each fit's own k interval is wide ([-0.39, 2.15]), so
# this is a default schedule of lrs, not a measurement to cite. Why it is there: with the DeepSeek rule
# (~0.01 at every quick size) the sizes above depth 2 gained nothing, and neither the Chinchilla nor
# the Kaplan fit was identified in three quick studies; with this law the Chinchilla fit was in both
# quick studies run so far, Kaplan's L(N) in one of them (README "Analysis").
PRESET_LAWS = (
    {"fields": {"dataset": "stdlib", "tokenizer": "byte", "vocab_size": 256, "aspect": 16, "head_dim": 8,
                "context": 64, "batch_tokens": 8192, "schedule": "cosine", "parametrization": "standard"},
     "c": 176.7, "k": 0.8779, "tuned": "the reference 2-core CPU, `scaling-suite tune --mode quick`, 2026-11-28"},
)


def preset_law(cfg: RunConfig) -> dict | None:
    """The preset law whose fields all match cfg, or None."""
    return next((p for p in PRESET_LAWS if all(getattr(cfg, f) == v for f, v in p["fields"].items())), None)


def _law_lrs(plan, c: float, k: float) -> list:
    """The plan's configs with lr = c N^-k each (analysis.laws.lr_law)."""
    return [p.config.replace(lr=float(lr_law(p.config.derived().N, c, k))) for p in plan.points]


def rule_lr(cfg: RunConfig) -> float:
    """The fallback without a law: eta_opt = 0.3118 C^-0.125 (Bi et al. 2024, "DeepSeek LLM", §3.1,
    eq. 1, C in FLOPs). Fitted at 1e17-3e20 FLOPs with their batch and schedule, so at this suite's
    1e10-1e14 it is an extrapolation, and it ignores our batch; better than one fixed value across
    sizes because it falls with scale, and the study report says it was used."""
    return 0.3118 * cfg.derived().C ** -0.125


def parse_lr(value) -> float | None:
    """`--lr auto` (or empty: the default) -> None; a number -> that fixed value."""
    if value is None or str(value).strip().lower() in ("", "auto"):
        return None
    try:
        v = float(value)
    except ValueError:
        raise SuiteError(f"lr must be a positive number or auto, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise SuiteError(f"lr must be a positive number or auto, got {value!r}")
    return v


def resolve_lr(plan, data, lr=None, client=None):
    """The plan with every run's lr set, and what set it: (plan, info).

    lr a number: that value everywhere (lr_source=fixed). lr None ("auto"): the newest law whose
    key matches the plan's data and design; under parametrization=mup its tuned base lr for every
    width (lr_source=mup), else c N^-k per size (lr_source=law); without one, a PRESET_LAWS entry
    whose fields match (lr_source=preset), else rule_lr per run (lr_source=rule). info holds lr,
    lr_source, lr_law_run_id (or "-") and a description.
    """
    first = plan.points[0].config
    info = {"lr": "auto" if lr is None else f"{lr:g}", "lr_law_run_id": "-"}
    if lr is not None:
        new = [cfg.replace(lr=lr) for cfg in (p.config for p in plan.points)]
        info.update(lr_source="fixed", lr_rule=f"fixed lr = {lr:g}")
    else:
        client = client or tracking.init_store()
        key, _ = law_key(first, data.digest)
        run = find_law(client, key)
        preset = preset_law(first) if run is None else None
        if preset is not None:
            c, k = preset["c"], preset["k"]
            new = _law_lrs(plan, c, k)
            info.update(lr_source="preset", lr_rule=f"no tuned law on this machine; the preset law for these shapes: "
                        f"lr = {c:.4g} N^-{k:.4f} (tuned on {preset['tuned']}; lr_auto.PRESET_LAWS); run "
                        "`scaling-suite tune` to fit your own")
        elif run is None:
            # The rule falls with C; runs that share a WSD trunk must share an lr, so a branching
            # plan takes each size's rule at that size's largest budget (its trunk's).
            top: dict[int, float] = {}
            for p in plan.points:
                top[p.config.depth] = max(top.get(p.config.depth, 0.0), p.config.derived().C)
            new = [p.config.replace(lr=rule_lr(p.config.replace(C=top[p.config.depth], D=0.0, tokens_per_param=0.0)
                                                if plan.branching else p.config)) for p in plan.points]
            info.update(lr_source="rule", lr_rule="no tuned law for this data/design: lr = 0.3118 C^-0.125 "
                        "(DeepSeek LLM §3.1); run `scaling-suite tune` to fit one")
        else:
            m = run.data.metrics
            info["lr_law_run_id"] = run.info.run_id
            if first.parametrization == "mup":
                if "lr_base" not in m:
                    raise SuiteError(f"tuning run {run.info.run_id} has no lr_base for parametrization=mup")
                new = [p.config.replace(lr=m["lr_base"]) for p in plan.points]
                info.update(lr_source="mup", lr_rule=f"μP base lr {m['lr_base']:.4g} tuned at width "
                            f"{first.mup_base_width} (run {run.info.run_id})")
            else:
                c, k = m["lr_law_c"], m["lr_law_k"]
                new = _law_lrs(plan, c, k)
                info.update(lr_source="law", lr_rule=f"lr = {c:.4g} N^-{k:.4f}{_k_interval(m)} (run {run.info.run_id})")
    for cfg in new:
        validate(cfg)
    # dataclasses.replace keeps the plan's branching and warmup settings with the new lrs.
    return dataclasses.replace(plan, points=tuple(Point(c, p.tags) for c, p in zip(new, plan.points))), info


def _k_interval(m: dict) -> str:
    """The tuned law's 95% interval on k, as the tuning run logged it ('' without one): a law from a
    few sizes' optima can be poorly determined (on the 4.4 MB Debian text, 4 sizes gave k = 0.648
    [-0.41, 1.71]), and the study's lrs rest on it."""
    lo, hi = m.get("lr_law_k_lo"), m.get("lr_law_k_hi")
    return f" (k: 95% interval [{lo:.3g}, {hi:.3g}])" if lo is not None and hi is not None else ""


def rule_for(base: RunConfig, data, lr: float | None) -> tuple[dict, dict]:
    """How the study sets each run's lr, as a rule the workers apply per size (space.lr_from_rule; adaptive.py),
    and lr_info for the report. lr given: fixed. auto: a tuned law for this data and design (a
    `scaling-suite tune` run), else the preset law of these shapes (PRESET_LAWS), also on
    another corpus, where it was not tuned (lr_source preset_transfer: the lr optimum in N moves
    little with the text; the summary says so), else DeepSeek LLM's rule."""
    if lr is not None:
        return {"kind": "fixed", "lr": lr}, {"lr": f"{lr:g}", "lr_source": "fixed", "lr_law_run_id": "-",
                                             "lr_rule": f"fixed lr = {lr:g}"}
    key, _ = law_key(base, data.digest)
    run = find_law(tracking.init_store(), key)
    if run is not None and base.parametrization != "mup":
        m = run.data.metrics
        return ({"kind": "law", "c": m["lr_law_c"], "k": m["lr_law_k"], "B_ref": base.batch_tokens},
                {"lr": "auto", "lr_source": "law", "lr_law_run_id": run.info.run_id,
                 "lr_rule": f"lr = {m['lr_law_c']:.4g} N^-{m['lr_law_k']:.4f}{_k_interval(m)} (run {run.info.run_id}) "
                            f"x sqrt(B / {base.batch_tokens})"})
    exact = preset_law(base)
    moved = exact or preset_law(base.replace(dataset=PRESET_LAWS[0]["fields"]["dataset"]))
    if moved is not None and base.parametrization != "mup":
        c, k, B = moved["c"], moved["k"], moved["fields"]["batch_tokens"]
        source = "preset" if exact else "preset_transfer"
        where = "" if exact else f", tuned on {moved['fields']['dataset']}, not on this corpus"
        return {"kind": "law", "c": c, "k": k, "B_ref": B}, {
            "lr": "auto", "lr_source": source, "lr_law_run_id": "-",
            "lr_rule": f"the preset law lr = {c:.4g} N^-{k:.4f} at batch {B} (PRESET_LAWS{where}), x sqrt(B / {B}) "
                       "(Malladi et al. 2022); run `scaling-suite tune` to fit your own"}
    return {"kind": "rule"}, {"lr": "auto", "lr_source": "rule", "lr_law_run_id": "-",
                              "lr_rule": "no tuned law: lr = 0.3118 C^-0.125 (DeepSeek LLM §3.1)"}
