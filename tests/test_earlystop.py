"""Final-loss prediction from a partial learning curve: known answers on planted curves."""

import numpy as np
import pytest

from scaling_suite import earlystop
from scaling_suite.config import make_config
from scaling_suite.train import lr_at


def planted(schedule="cosine", steps=400, noise=0.0, seed=0):
    cfg = make_config(depth=1, context=32, batch_tokens=1024, D=steps * 1024, schedule=schedule, warmup_tokens=10240)
    d = cfg.derived()
    lrs = np.array([lr_at(s, cfg, d) for s in range(d.steps)]) / cfg.lr
    s1, s2 = earlystop.schedule_areas(lrs)
    truth = earlystop.law(s1, s2, 1.5, 3.0, 0.5, 0.002)
    rng = np.random.default_rng(seed)
    return lrs, truth + noise * rng.standard_normal(truth.shape), truth[-1]


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_noise_free_curve_predicted_exactly(schedule):
    lrs, losses, final = planted(schedule)
    # Observing 85% of the run sees part of the cosine decay: the annealing term is identifiable.
    p = earlystop.predict_final(list(losses[:340]), lrs, 0.0, 340)
    assert p.final_loss == pytest.approx(final, rel=2e-3)


def test_noisy_curve_interval_and_gap():
    lrs, losses, final = planted(noise=0.01)
    p = earlystop.predict_final(list(losses[:300]), lrs, val_gap=0.05, tokens_seen=300)
    assert p.lo < p.final_loss < p.hi
    assert p.final_loss == pytest.approx(final + 0.05, rel=0.03)


def test_too_few_points():
    lrs, losses, _ = planted()
    assert earlystop.predict_final(list(losses[:10]), lrs, 0.0, 10) is None


def test_stability_rule():
    P = earlystop.Prediction
    steady = [P(i, 2.0 + 0.001 * (i % 2), 1.99, 2.01) for i in range(3)]
    assert earlystop.is_stable(steady)
    assert not earlystop.is_stable(steady[:2])                              # too few
    assert not earlystop.is_stable(steady[:2] + [P(3, 2.1, 2.09, 2.11)])    # still moving
    assert not earlystop.is_stable(steady[:2] + [P(3, 2.0, 1.8, 2.2)])      # interval too wide


def study_curves(n=12, noise=0.0, seed=0):
    """Runs of one schedule whose log(loss(p) / final) = (0.6 - 0.05 log N + 0.02 log D)(1 - p)^1.5:
    what a run still gains from progress p on depends on its size and budget (known answer)."""
    rng = np.random.default_rng(seed)
    runs = {}
    for i in range(n):
        N, D = 10 ** rng.uniform(3.5, 5.5), 10 ** rng.uniform(6, 7.5)
        final = 1.6 + 0.3 * rng.random()
        p = np.linspace(0.05, 1, 20)
        gain = (0.6 - 0.05 * np.log(N) + 0.02 * np.log(D)) * (1 - p) ** 1.5
        y = final * np.exp(gain + noise * rng.standard_normal(p.size))
        y[-1] = final
        runs[f"r{i}"] = (p, y, final, N, D)
    return runs


def test_study_predictor_recovers_what_the_runs_share():
    runs = study_curves()
    reg = earlystop.leave_one_out(runs, at=0.25)
    med = earlystop.leave_one_out(runs, at=0.25, model="median")
    e_reg = max(abs(v[1]) for v in reg.values())
    e_med = max(abs(v[1]) for v in med.values())
    # The ratio's dependence on N and D is planted exactly: the regression recovers it; one median
    # ratio for every run cannot.
    assert len(reg) == 12 and e_reg < 1e-9, (e_reg, e_med)
    assert e_med > 0.01, (e_reg, e_med)


def test_study_predictor_needs_finished_runs_and_falls_back():
    runs = study_curves(n=3, noise=0.003)
    ref = earlystop.Reference()
    (p, y, final, N, D), *others = runs.values()
    lrs, losses, _ = planted()
    curve = [(q * D, v) for q, v in zip(p[:5], y[:5])]
    # One finished run is too few: the run's own curve (predict_final on its training losses) is used.
    one = ref.add(*others[0])
    own = earlystop.predict(one, curve, N, D, list(losses[:100]), lrs, 0.0, 100)
    assert own == earlystop.predict_final(list(losses[:100]), lrs, 0.0, 100)
    two = one.add(*others[1])
    study = earlystop.predict(two, curve, N, D, list(losses[:100]), lrs, 0.0, 100)
    assert study == earlystop.predict_from_study(two, p[:5], y[:5], 100, N, D)
    assert study.lo <= study.final_loss <= study.hi
    assert study.final_loss == pytest.approx(final, rel=0.05)
    # A reference run without a usable curve is not added.
    assert len(ref.add([0.5], [2.0], 1.8, 1e4, 1e6)) == 0
