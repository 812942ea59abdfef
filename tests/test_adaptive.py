"""The adaptive, time-boxed study (scaling_suite/adaptive.py, ladder.py): the plan on stubbed
device speeds, the search's decisions on given profiles, bad input, and a SIGKILL mid-study at
smoke scale that a rerun completes without duplicates."""

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from types import SimpleNamespace

import mlflow
import numpy as np
import optuna
import pytest

from scaling_suite import adaptive, budget_search, cli, rdb
from scaling_suite import ladder as ladder_lib
from scaling_suite.plan import MODES

# This machine's per-worker speed at quick's shapes (a probe here: N -> FLOP/s at 1 thread).
HERE = ladder_lib.Rates(((7472, 6.9e9), (34976, 1.4e10), (217664, 2.1e10)), workers=2, efficiency=0.64)


def quick_plan(rates):
    base = adaptive.base_config("quick", {})
    s = adaptive.Settings("quick", ladder_lib.BOXES["quick"], 2)
    return base, adaptive.plan_for(base, None, s, rates, overhead=100.0)


def test_faster_device_plans_larger_budgets_and_sizes_and_places_runs_around_each_optimum():
    """Rates x1, x10, x100 (a stubbed probe): larger budgets and sizes, the validation budget beyond
    the ladder, and at every budget the predicted optimum strictly inside the sizes its search may
    place, with seeds on both sides of it."""
    tops, sizes = [], []
    for factor in (1, 10, 100):
        base, lad = quick_plan(HERE.scaled(factor))
        assert lad.est_ladder_seconds + lad.est_validation_seconds <= lad.train_seconds
        assert lad.validation_C >= ladder_lib.VALIDATION_MIN * lad.rungs[-1].C
        cs = [r.C for r in lad.rungs]
        assert cs == sorted(cs) and all(b / a >= ladder_lib.RATIO * 0.999 for a, b in zip(cs, cs[1:]))
        for rung in lad.rungs:
            space = budget_search.budget_space(base, rung, rung.N_guess, math.inf, {"kind": "rule"})
            Ns = [s.N for s in space.shapes]
            assert Ns[0] < rung.N_guess < Ns[-1], (factor, rung, Ns[0], Ns[-1])
            seeds = {space.nearest(math.log10(rung.N_guess) + o)[0].N for o in budget_search.FIRST_SEEDS}
            assert min(seeds) < rung.N_guess < max(seeds)
            # the batch grows with the budget (DeepSeek LLM §3.1 exponent), in whole sequences
            assert rung.batch_tokens % base.context == 0
        assert [r.batch_tokens for r in lad.rungs] == sorted(r.batch_tokens for r in lad.rungs)
        tops.append(lad.rungs[-1].C)
        sizes.append(lad.rungs[-1].N_guess)
    assert tops[0] < tops[1] < tops[2] and sizes[0] < sizes[1] < sizes[2]
    # the first budget's optimum lies above the smallest sensible model on every device
    assert all(quick_plan(HERE.scaled(f))[1].rungs[0].N_guess >= adaptive.smallest_sensible(
        adaptive.base_config("quick", {})) for f in (1, 10, 100))


def test_a_box_too_small_for_one_budget_is_refused_with_the_time_it_needs():
    base = adaptive.base_config("quick", {})
    with pytest.raises(Exception, match="too small for one bracketed budget"):
        adaptive.plan_for(base, None, adaptive.Settings("quick", 130.0, 2), HERE, overhead=100.0)


def rows_of(profile):
    return [{"trial": i, "N": n, "D": 1, "C": 1, "lr": 0.01, "final_val_loss": L, "mlflow_run_id": str(i)}
            for i, (n, L) in enumerate(profile)]


def test_search_steps_out_beyond_an_edge_and_stops_once_the_minimum_is_pinned():
    base = adaptive.base_config("quick", {})
    rung = ladder_lib.Rung(4e11, 8192, 2e4)
    space = budget_search.budget_space(base, rung, 2e4, math.inf, {"kind": "rule"})
    Ns = [s.N for s in space.shapes]
    # the best run is the largest tried: the next trial goes above it
    step, x = budget_search.next_step(rows_of([(Ns[2], 2.3), (Ns[4], 2.2), (Ns[6], 2.1)]), space, set())
    assert step == "step_out" and 10 ** x > Ns[6]
    # ... the smallest: below it
    step, x = budget_search.next_step(rows_of([(Ns[2], 2.0), (Ns[4], 2.2), (Ns[6], 2.4)]), space, set())
    assert step == "step_out" and 10 ** x < Ns[2]
    # ... but with a run still training beyond the edge best: the next run goes beside the best, short
    # of it (never a second step further out), and waits when no size is free there
    step, x = budget_search.next_step(rows_of([(Ns[2], 2.3), (Ns[4], 2.2)]), space, {Ns[2], Ns[4], Ns[8]}, 1)
    assert step == "inside" and round(10 ** x) == Ns[5]
    step, x = budget_search.next_step(rows_of([(Ns[4], 2.2), (Ns[6], 2.3)]), space, {Ns[1], Ns[4], Ns[6]}, 1)
    assert step == "inside" and round(10 ** x) == Ns[5]    # nearest the best, between its planned neighbours
    # one run finished, the seeds on both sides still training: beside it too (not a GP proposal from
    # one point: 151k at C=8e11, quick 2026-12-01)
    step, x = budget_search.next_step(rows_of([(Ns[4], 2.2)]), space, {Ns[2], Ns[4], Ns[6]}, 2)
    assert step == "inside" and Ns[2] < 10 ** x < Ns[6] and round(10 ** x) != Ns[4]
    inside = {Ns[2], Ns[3], Ns[4], Ns[5], Ns[8]}
    assert budget_search.next_step(rows_of([(Ns[2], 2.3), (Ns[4], 2.2)]), space, inside, 3)[0] == "wait"
    # bracketed by 4 sizes with a run at the vertex: pinned, no further run
    prof = [(n, 2.0 + 0.5 * (math.log10(n) - math.log10(Ns[5])) ** 2) for n in (Ns[1], Ns[3], Ns[5], Ns[7], Ns[9])]
    assert budget_search.next_step(rows_of(prof), space, set())[0] == "pinned"
    # bracketed by 3 sizes only: the untried size nearest the vertex next ...
    step, x = budget_search.next_step(rows_of(prof[1:4]), space, {Ns[3], Ns[5], Ns[7]})
    assert step == "vertex" and round(10 ** x) not in (Ns[3], Ns[5], Ns[7])
    assert abs(x - math.log10(Ns[5])) <= 1.5 * budget_search.PIN_DECADES
    # ... every size between the best run's neighbours planned: wait for the one still training,
    near = {s.N for s in space.shapes if abs(math.log10(s.N / Ns[5])) <= 1.5 * budget_search.PIN_DECADES}
    planned = near | {Ns[3], Ns[7]}
    assert budget_search.next_step(rows_of(prof[1:4]), space, planned, training=1)[0] == "wait"
    # ... then a fourth size just beside the bracket, on the vertex's side; never a far one (a 95k
    # GP proposal at C=4e11 bracketed by 7.5k and 27k, quick study 2026-12-01)
    step, x = budget_search.next_step(rows_of(prof[1:4]), space, planned)
    assert step == "vertex" and round(10 ** x) == min((n for n in Ns if n > Ns[7] and n not in planned))
    # ... 4 sizes, every size between the best's neighbours tried, none within PIN_DECADES: resolved
    four = [(n, 2.0 + 0.5 * (math.log10(n) - math.log10(Ns[5])) ** 2) for n in (Ns[3], Ns[4], Ns[6], Ns[8])]
    assert budget_search.next_step(rows_of(four), space, {Ns[3], Ns[4], Ns[5], Ns[6], Ns[8]})[0] == "resolved"
    # no vertex yet (two sizes): Optuna's GP proposes, away from the sizes planned
    assert budget_search.next_step(rows_of(prof[1:3]), space, {Ns[3], Ns[5]})[0] == "search"
    shape = budget_search.gp_proposal(rows_of(prof[1:4]), space, planned, seed=0)
    assert shape is not None and shape.N not in planned


def test_law_guess_follows_the_budgets_done():
    done = [budget_search.Budget(1e11, fit={"status": "ok", "x_opt": 1e4}),
            budget_search.Budget(4e11, fit={"status": "ok", "x_opt": 2e4})]
    assert budget_search.law_guess(done, 1.6e12, 150) == pytest.approx(4e4, rel=1e-6)   # slope 0.5 extended
    assert budget_search.law_guess(done[:1], 4e11, 150) == pytest.approx(2e4, rel=1e-6)  # one budget: slope 1/2
    assert budget_search.law_guess([], 6e11, 150) == pytest.approx(ladder_lib.prior_N(6e11, 150))


@pytest.mark.parametrize("argv, message", [
    (["--mode", "quick", "--budget", "30s"], "too small"),
    (["--mode", "quick", "--target_width", "0"], "--target_width must be a positive"),
    (["--mode", "quick", "--target_width", "-0.1"], "--target_width must be a positive"),
    (["--mode", "quick", "--target_width", "wide"], "--target_width takes a number"),
    (["--mode", "huge"], "unknown mode"),
    (["--mode", "quick", "--design", "isoflop", "--target_width", "0.2"], "applies to the adaptive design"),
    (["--mode", "quick", "--branching", "true"], "--branching applies to the fixed designs"),
    (["--mode", "quick", "--workers", "two"], "--workers takes a whole number"),
    (["--mode", "quick", "--workers", "0"], "--workers must be at least 1"),
    (["--mode", "quick", "--heartbeat", "90"], "--heartbeat (90s) must be at least 1 s and shorter than --grace"),
])
def test_bad_input_is_one_line_before_any_training(argv, message, mlflow_store, capsys, monkeypatch):
    monkeypatch.setattr(adaptive, "probe", lambda *a, **k: pytest.fail("probed before refusing bad input"))
    assert cli.main(["sweep"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_the_quick_mode_defaults_to_the_adaptive_design_and_keeps_its_grid_by_name():
    from scaling_suite import plan as plan_lib
    assert plan_lib.default_design("quick") == "adaptive" and plan_lib.default_design("smoke") == "n_sweep"
    assert len(plan_lib.make_plan("quick", "isoflop").points) == 13


def _children(uri):
    client = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, "tags.design = 'adaptive'", max_results=1000)


def test_sigkill_mid_study_then_rerun_completes_without_duplicates(mlflow_store, token_cache, tmp_path):
    """A smoke-scale adaptive study killed (SIGKILL, the whole process group: coordinator and
    workers) once two trials are done; the same command then completes it: every configuration has
    one FINISHED run, and no Optuna trial is counted twice."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    cmd = [sys.executable, "-m", "scaling_suite.cli", "sweep", "--mode", "smoke", "--design", "adaptive",
           "--budget", "110s", "--storage", storage, "--quiet", "--no_analysis", "--heartbeat", "1", "--grace", "3"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store}
    # Created here, under the suite's lock, before the child: this process polls the storage, and
    # opening a fresh SQLite file migrates its schema (two processes at once crash; test_faults).
    polled = rdb.open_storage(storage, heartbeat=None)
    p = subprocess.Popen(cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        time.sleep(1)
        try:
            names = optuna.get_all_study_names(polled)
            done = sum(t.state.name == "COMPLETE" for n in names
                       for t in optuna.load_study(study_name=n, storage=polled).get_trials(deepcopy=False))
        except Exception:  # noqa: BLE001 — a write holds the database lock; poll again
            continue
        if done >= 2:
            break
    assert p.poll() is None, p.stdout.read()
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = [r for r in _children(mlflow_store) if r.data.tags.get("role") == "train"]
    finished = [r for r in runs if r.info.status == "FINISHED"]
    keys = [tuple(sorted(r.data.params.items())) for r in finished]
    assert finished and len(keys) == len(set(keys)), "a configuration FINISHED twice"
    # every trial counted once: each budget's distinct configurations = its FINISHED runs
    counted = 0
    for n in optuna.get_all_study_names(storage):
        counted += len(budget_search.unique_rows(optuna.load_study(study_name=n, storage=storage)))
    assert counted == len(finished), (counted, len(finished))
    assert "adaptive study" in out.stdout


def _budgets(Cs, noise=0.001, seed=0):
    """Budgets done, each 5 runs on a parabola in log N around N* = 0.1 C^0.5, loss noise NOISE."""
    rng = np.random.default_rng(seed)
    done = []
    for C in Cs:
        n_star = 0.1 * C ** 0.5
        rows = [{"N": N, "D": C / (6 * N), "C": C, "mlflow_run_id": f"{C:g}-{i}",
                 "final_val_loss": (2 + 0.05 * math.log(N / n_star) ** 2) * (1 + noise * rng.standard_normal())}
                for i, N in enumerate(n_star * np.logspace(-0.4, 0.4, 5))]
        done.append(budget_search.Budget(C, rows=rows, fit={"status": "ok", "x_opt": n_star}))
    return done


def test_target_width_ends_the_ladder_only_from_enough_budgets_and_says_the_time_saved():
    rungs = [SimpleNamespace(est_seconds=100.0)] * 6
    logged, notes = {}, []
    parent = SimpleNamespace(log_metrics=lambda m, step: logged.update(m))
    s = adaptive.Settings(mode="quick", box_seconds=780, workers=2, target_width=0.3, n_bootstrap=0)
    Cs = [1e11 * 2 ** k for k in range(6)]
    # 3 budgets: an OLS interval of 1 dof, narrow by luck as often as not: never a reason to stop
    assert not adaptive.target_reached(_budgets(Cs[:3]), rungs, 2, s, 1.0, notes, parent)
    assert adaptive.target_reached(_budgets(Cs[:4]), rungs, 3, s, 1.0, notes, parent)
    assert "--target_width 0.3 reached after 4 budgets" in notes[-1] and "about 200s saved" in notes[-1], notes
    assert logged == {"target_width_seconds_saved": 200.0}
    narrow = adaptive.Settings(mode="quick", box_seconds=780, workers=2, target_width=1e-4, n_bootstrap=0)
    assert not adaptive.target_reached(_budgets(Cs[:4]), rungs, 3, narrow, 1.0, notes, parent)


def test_the_validation_run_is_planned_at_its_speed_alone_on_every_core():
    """The probe's per-worker rates are one worker's threads; the validation run trains alone on all
    of them (alone_speedup, measured by the probe): its estimate per FLOP shrinks by that factor, and
    the rates' copies (scaled) keep it."""
    _, slow = quick_plan(HERE)
    fast = replace(HERE, alone_speedup=1.8)
    assert fast.scaled(10).alone_speedup == 1.8
    _, lad = quick_plan(fast)
    per_flop = [x.est_validation_seconds / x.validation_C for x in (slow, lad)]
    assert per_flop[1] == pytest.approx(per_flop[0] / 1.8, rel=0.02)
    assert [r.C for r in lad.rungs][:len(slow.rungs)] == [r.C for r in slow.rungs]


def test_widen_adds_no_budget_whose_optimum_the_corpus_cannot_feed():
    """A sixth budget is added when the box has room, unless a size at half its predicted optimum
    would repeat the training split more than MAX_EPOCHS times (the second corpus, 4.4 MB, got one
    whose smallest placeable size was above its optimum: unbracketed after 6 runs, twice)."""
    base, lad = quick_plan(HERE.scaled(100))
    lad = replace(lad, rungs=lad.rungs[:ladder_lib.MAX_BUDGETS - 1])   # room above it
    done = _budgets([r.C for r in lad.rungs])
    s = adaptive.Settings(mode="quick", box_seconds=1e6, workers=2, n_bootstrap=0)
    parent = SimpleNamespace(log_text=lambda *a: None)
    nxt = lad.rungs[-1].C * lad.ratio
    D_opt = nxt / (6 * budget_search.law_guess(done, nxt, ladder_lib.PRIORS["quick"]))
    # the bracket's lower side, half of N*, needs 2 D_opt
    for D_max, above in ((2.1 * D_opt, True), (1.9 * D_opt, False)):
        rungs, notes = list(lad.rungs), []
        adaptive.widen(rungs, lad, done, base, s, time.perf_counter(), 1.0, notes, parent, D_max)
        assert len(rungs) == len(lad.rungs) + 1 and "added" in notes[-1], notes
        if above:
            assert rungs[-1].C == pytest.approx(nxt), notes
        else:   # the corpus stops the ladder's growth: a budget between two of its budgets instead
            assert "epochs of this corpus" in notes[0] and "added between" in notes[-1], notes
            assert rungs[-1].C == pytest.approx(math.sqrt(lad.rungs[0].C * lad.rungs[1].C)), notes
    # no room in the box: not added, and the summary says how much it needed
    rungs, notes = list(lad.rungs), []
    adaptive.widen(rungs, lad, done, base, replace(s, box_seconds=1.0), time.perf_counter(), 1.0, notes, parent, 2.1 * D_opt)
    assert len(rungs) == len(lad.rungs) and notes and all("not added" in n and "s left" in n for n in notes), notes
    # a planned budget the corpus cannot feed (the plan knew only the device's speed) is dropped before
    # it starts, and a budget between others goes in its place (Debian study of 2026-12-01: a planned
    # sixth budget stayed unbracketed after 6 runs, 164 s)
    rungs, notes = list(lad.rungs) + [ladder_lib.Rung(nxt, 8192, 1e4, 1.0)], []
    stop = adaptive._dropped(rungs, len(lad.rungs), lad, done, base, s, time.perf_counter(), 1.0, notes, parent, 1.9 * D_opt)
    assert stop == "corpus" and "epochs of this corpus" in notes[0] and "added between" in notes[-1], notes
    assert len(rungs) == len(lad.rungs) + 1 and rungs[-1].C < nxt
    assert sum(f"C={nxt:.3g}" in n.split(":")[0] for n in notes) == 1, notes    # said once, not again by widen


def test_fill_gaps_go_outermost_first_and_stop_at_max_filled():
    """Where the ladder cannot grow, budgets between its budgets: the gap farthest from the centre in
    log C first (most leverage on the slope), the lower of two equally far; each gap once."""
    rungs = [ladder_lib.Rung(1e11 * 2 ** k, 4096, 1e4, 10.0 * 2 ** k) for k in range(5)]
    order = []
    while (gap := ladder_lib.fill_gap(rungs, 2.0)) is not None:
        a, b = gap
        order.append(round(math.log2(a.C / 1e11)))
        rungs.append(ladder_lib.Rung(math.sqrt(a.C * b.C), 4096, 1e4, 14.0))
    assert order == [0, 3, 1, 2], order
    base, lad = quick_plan(HERE.scaled(100))
    done = _budgets([r.C for r in lad.rungs])
    s = adaptive.Settings(mode="quick", box_seconds=1e6, workers=2, n_bootstrap=0)
    nxt = lad.rungs[-1].C * lad.ratio
    D_max = 1.9 * nxt / (6 * budget_search.law_guess(done, nxt, ladder_lib.PRIORS["quick"]))  # the top: no
    rungs, notes = list(lad.rungs), []
    for _ in range(2 * ladder_lib.MAX_FILLED):
        adaptive.widen(rungs, lad, done, base, s, time.perf_counter(), 1.0, notes, SimpleNamespace(log_text=lambda *a: None),
                       D_max)
    assert len(rungs) == min(ladder_lib.MAX_FILLED, 2 * len(lad.rungs) - 1), notes


def test_the_summary_says_which_law_the_validation_run_contradicts():
    """A fresh quick study: the budgets' power law predicted 1.3625 [1.3201, 1.4063] and the
    parametric fit 1.5431 [1.4099, 1.6031] for a run that measured 1.3201. The second law is
    contradicted by the run; the summary says so, not only the two errors."""
    from scaling_suite.study_report import adaptive_summary
    lad = ladder_lib.Ladder((), 6.8e12, 780.0, 700.0, 600.0, 70.0, 2.0, 3000)
    v = {"C": 6.8e12, "factor": 4.0, "N": 34976, "N_opt_predicted": 38264.0, "predicted_loss": 1.3625,
         "predicted_lo": 1.3200, "predicted_hi": 1.4063, "measured_loss": 1.3201, "rel_error": 1.3201 / 1.3625 - 1,
         "law": "N_opt ∝ C^0.373", "n_runs_fitted": 36,
         "parametric": {"chinchilla": {"loss": 1.5431, "lo": 1.4099, "hi": 1.6031, "identified": True,
                                       "rel_error": 1.3201 / 1.5431 - 1},
                        "kaplan": {"loss": 1.3533, "lo": 1.3102, "hi": 1.3950, "identified": True,
                                   "rel_error": 1.3201 / 1.3533 - 1}}}
    text = adaptive_summary(lad, [], [], v, 592.0, 780.0)
    assert "measured 1.3201: error -3.11%, inside the interval" in text, text
    assert "Chinchilla's form 1.5431 [1.4099, 1.6031]: error -14.45%, below the interval: this law fails the test" in text, text
    assert "Kaplan's form 1.3533 [1.3102, 1.3950]: error -2.45%, inside the interval" in text, text
    v["parametric"]["chinchilla"]["lo"] = float("nan")
    text = adaptive_summary(lad, [], [], v, 592.0, 780.0)
    assert "error -14.45%, no interval" in text, text
