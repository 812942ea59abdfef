"""Final-loss prediction from a partial learning curve: known answers on planted curves."""

import numpy as np
import pytest

from scaling_suite import earlystop
from scaling_suite.config import make_config
from scaling_suite.schedule import lr_at


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
