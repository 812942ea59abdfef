"""The training loop: schedules, global-batch invariance, resume equivalence, NaN handling."""

import math

import pytest
import torch

from scaling_suite import compiling
from scaling_suite import data as data_lib
from scaling_suite.config import make_config
from scaling_suite.schedule import lr_at
from scaling_suite.train import TrainingFailed, train

SMALL = dict(depth=1, context=32, batch_tokens=1024, D=16 * 1024, eval_tokens=2048, eval_every=4,
             warmup_tokens=2048, precision="fp32", device="cpu")


@pytest.fixture(scope="module")
def stdlib(token_cache):
    return data_lib.load_data("stdlib")


def test_schedules_shapes():
    cfg = make_config(**{**SMALL, "D": 100 * 1024})
    d = cfg.derived()
    cos = [lr_at(s, cfg, d) for s in range(d.steps)]
    assert cos[0] == pytest.approx(cfg.lr / d.warmup_steps)              # linear warmup
    assert max(cos) == pytest.approx(cfg.lr, rel=1e-3)
    assert cos[-1] == pytest.approx(0.1 * cfg.lr, rel=0.01)              # cosine to 10% of peak
    wsd_cfg = cfg.replace(schedule="wsd")
    wsd = [lr_at(s, wsd_cfg, d) for s in range(d.steps)]
    assert wsd[d.warmup_steps:80] == [cfg.lr] * (80 - d.warmup_steps)     # stable phase
    assert all(a > b for a, b in zip(wsd[80:], wsd[81:]))                # 20% cooldown, decreasing
    assert wsd[-1] < 0.25 * cfg.lr
    const = [lr_at(s, cfg.replace(schedule="constant"), d) for s in range(d.steps)]
    assert const[-1] == cfg.lr


def test_loss_goes_down_and_curve_is_logged(stdlib):
    r = train(make_config(**SMALL), data=stdlib, progress=False)
    assert r.status == "FINISHED" and r.steps == 16 and r.D == 16 * 1024
    assert len(r.curve) == 5 and r.curve[-1][1] < r.curve[0][1]
    assert r.final_val_loss == r.curve[-1][1]


def test_global_batch_is_invariant_to_micro_batch(stdlib):
    """Memory only changes how the global batch is split: same loss after k steps."""
    losses = [train(make_config(**SMALL, micro_batch=m), data=stdlib, progress=False).final_val_loss
              for m in (32, 8, 1)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
    assert losses[2] == pytest.approx(losses[0], abs=1e-4)


def kill_at_step(monkeypatch, step: int) -> None:
    """The next run is killed (Ctrl-C) as it draws the batch of optimizer step STEP, once."""
    real, killed = data_lib.train_batch, []

    def batch(data, seed, s, *rest):
        if s == step and not killed:
            killed.append(s)
            raise KeyboardInterrupt
        return real(data, seed, s, *rest)

    monkeypatch.setattr(data_lib, "train_batch", batch)


def test_resume_reproduces_the_uninterrupted_run(stdlib, tmp_path, monkeypatch):
    cfg = make_config(**SMALL, checkpoint_every=4)
    straight = train(cfg, data=stdlib, progress=False)
    kill_at_step(monkeypatch, 10)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=stdlib, progress=False, checkpoint_dir=tmp_path)
    # The kill came at step 10; the last checkpoint is from step 8: resume retraces 8..16.
    assert torch.load(tmp_path / "last.pt", weights_only=False)["step"] == 8
    resumed = train(cfg, data=stdlib, progress=False, resume_from=tmp_path / "last.pt")
    assert resumed.final_val_loss == pytest.approx(straight.final_val_loss, abs=1e-5)
    assert [t for t, _ in resumed.curve] == [t for t, _ in straight.curve]


def test_diverging_run_fails_with_reason(stdlib):
    with pytest.raises(TrainingFailed, match="diverged"):
        train(make_config(**{**SMALL, "lr": 1e6, "grad_clip": 0.0, "warmup_tokens": 0.0}), data=stdlib,
              progress=False)


def test_checkpoint_from_another_config_is_refused(stdlib, tmp_path, monkeypatch):
    cfg = make_config(**SMALL, checkpoint_every=4)
    kill_at_step(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data=stdlib, progress=False, checkpoint_dir=tmp_path)
    from scaling_suite.errors import SuiteError
    with pytest.raises(SuiteError, match="different config"):
        train(cfg.replace(lr=1e-3), data=stdlib, progress=False, resume_from=tmp_path / "last.pt")


def test_compile_rule_weighs_the_warm_up():
    shape = make_config(**SMALL).shape()
    assert not compiling.compile_pays(shape, eager_step_s=0.05, steps_left=100)[0]     # 2 s saved < 15 s cold
    assert compiling.compile_pays(shape, eager_step_s=0.05, steps_left=10_000)[0]     # 200 s saved
    assert compiling.compile_cold_s(make_config(**{**SMALL, "depth": 5}).shape()) > compiling.compile_cold_s(shape)
    assert "steps left" in compiling.compile_pays(shape, 0.05, 100)[1]


def test_compile_rule_remembers_graphs_compiled_on_this_machine(tmp_path, monkeypatch):
    """A graph compiled here before loads from inductor's disk cache: the rule expects the warm-up
    last measured for it, and only for it (the key names torch, device, precision, micro-batch,
    shape), never less than the in-process floor."""
    import json

    monkeypatch.setenv("SCALING_SUITE_CACHE", str(tmp_path))
    monkeypatch.setattr(compiling, "_compiled_shapes", set())
    shape = make_config(**SMALL).shape()
    key = compiling.compile_key(torch.device("cpu"), shape, "fp32", 4)
    assert not compiling.compile_pays(shape, 0.05, 300, "fp32", key)[0]          # 6 s saved < 15 s cold
    compiling.record_warmup(key, 4.2)
    pays, why = compiling.compile_pays(shape, 0.05, 300, "fp32", key)
    assert pays and "last measured on this machine" in why                   # 6 s saved > 5 s floor
    assert not compiling.compile_pays(shape, 0.05, 300, "fp32", key.replace("fp32", "bf16"))[0]
    compiling.record_warmup(key, 12.0)                                          # a slower warm-up since
    assert not compiling.compile_pays(shape, 0.05, 300, "fp32", key)[0]
    assert json.loads((tmp_path / "compile_warmups.json").read_text()) == {key: 12.0}


def test_cpu_precision_rule(monkeypatch):
    """auto: bf16 on a CPU with AMX only for a compiled step at d_model >= 32, or for wide heads."""
    from scaling_suite import device
    from scaling_suite.model import ModelShape
    cpu, pick = torch.device("cpu"), device.pick_precision
    quick5, quick1 = ModelShape.from_dial(5, 16, 8, 256, 64), ModelShape.from_dial(1, 16, 8, 256, 64)
    wide = ModelShape.from_dial(4, 64, 64, 256, 64)
    monkeypatch.setattr(device, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(device, "cpu_has_bf16", lambda: True)
    assert [pick(cpu, "auto", quick5, compiled=c) for c in (True, False)] == ["bf16", "fp32"]
    assert pick(cpu, "auto", quick1, compiled=True) == "fp32"          # d_model 16: casts cost what AMX saves
    assert pick(cpu, "auto", wide, compiled=False) == "bf16"           # the eager rule: heads >= 64 wide
    assert pick(cpu, "fp32", quick5, compiled=True) == "fp32"          # asked for is what runs
    monkeypatch.setattr(device, "cpu_has_amx", lambda: False)
    assert pick(cpu, "auto", quick5, compiled=True) == "fp32"
    assert compiling.compile_gain(quick5, "bf16") > compiling.compile_gain(quick5, "fp32")


def test_bf16_training_follows_the_fp32_curve(stdlib):
    """bf16 autocast (fp32 master weights, fp32 attention for narrow heads, fp32 loss): the curve of
    the same run in fp32 within bf16 rounding."""
    cfg = make_config(**{**SMALL, "D": 24 * 1024})
    fp32 = train(cfg, data=stdlib, progress=False)
    bf16 = train(cfg.replace(precision="bf16"), data=stdlib, progress=False)
    assert [v for _, v in bf16.curve] == pytest.approx([v for _, v in fp32.curve], rel=1e-2)
    assert [v for _, v in bf16.curve] != [v for _, v in fp32.curve]


def test_compiled_step_keeps_the_numerics(stdlib):
    """torch.compile fuses kernels but computes the same function: same losses to float rounding."""
    from scaling_suite.device import compile_support
    if compile_support(torch.device("cpu")):
        pytest.skip(compile_support(torch.device("cpu")))
    cfg = make_config(**{**SMALL, "D": 12 * 1024})
    eager = train(cfg.replace(compile="false"), data=stdlib, progress=False)
    compiled = train(cfg.replace(compile="true"), data=stdlib, progress=False)
    assert compiled.final_val_loss == pytest.approx(eager.final_val_loss, rel=1e-5)
    assert [v for _, v in compiled.curve] == pytest.approx([v for _, v in eager.curve], rel=1e-5)


def test_compile_true_without_support_is_one_line(stdlib, monkeypatch):
    from scaling_suite.errors import SuiteError
    monkeypatch.setattr(compiling, "compile_support", lambda dev: "no C++ compiler (test)")
    with pytest.raises(SuiteError, match="compile=true, but no C"):
        train(make_config(**SMALL, compile="true"), data=stdlib, progress=False)


def test_auto_precision_is_bf16_for_compiled_steps_only(stdlib, monkeypatch):
    """precision=auto on an AMX CPU: the timed eager steps and every evaluation run fp32, the
    compiled steps bf16; the tags say so. (compile_model is the identity here: the test is about
    which autocast wraps which step, not about inductor.)"""
    from scaling_suite import device
    from scaling_suite import train as train_mod
    from scaling_suite.tracking import NullTracker

    class Tags(NullTracker):
        tags = {}

        def set_tags(self, tags):
            self.tags.update(tags)

    used = []
    monkeypatch.setattr(device, "cpu_has_amx", lambda: True)
    monkeypatch.setattr(compiling, "compile_support", lambda dev: None)
    monkeypatch.setattr(compiling, "compile_model", lambda m: m)
    monkeypatch.setattr(compiling, "compile_pays", lambda *a: (True, "test"))
    monkeypatch.setattr(compiling, "record_warmup", lambda *a: None)
    monkeypatch.setattr(train_mod, "autocast", lambda dev, prec: used.append(prec) or device.autocast(dev, prec))
    cfg = make_config(**{**SMALL, "precision": "auto", "compile": "auto", "D": 12 * 1024, "eval_every": 6})
    tracker = Tags()
    train(cfg, tracker=tracker, data=stdlib, progress=False)
    steps = cfg.derived().steps
    assert tracker.tags["precision"] == "bf16" and tracker.tags["precision_eager"] == "fp32"
    assert used.count("bf16") == steps - 8 and used.count("fp32") > 8        # 8 timed steps + evaluations


# WSD cooldown branching (Hägele et al. 2024 §3.2): a trunk at constant lr checkpoints at a shorter
# run's cooldown start; the branch cools down from there.
WSD = dict(SMALL, schedule="wsd", D=32 * 1024)


def test_branch_equals_an_independent_wsd_run(stdlib, tmp_path):
    trunk_cfg, short = make_config(**WSD), make_config(**{**WSD, "D": 16 * 1024})
    from scaling_suite.schedule import cooldown_start
    s = cooldown_start(short, short.derived())
    assert s == 13 < cooldown_start(trunk_cfg, trunk_cfg.derived())
    trunk = train(trunk_cfg, data=stdlib, progress=False, checkpoint_dir=tmp_path, save_at_steps=[s])
    assert trunk.status == "FINISHED" and (tmp_path / f"branch_{s}.pt").exists()
    branch = train(short, data=stdlib, progress=False, branch_from=tmp_path / f"branch_{s}.pt")
    alone = train(short, data=stdlib, progress=False)
    assert branch.steps == alone.steps == 16
    assert branch.final_val_loss == pytest.approx(alone.final_val_loss, abs=1e-6)
    assert branch.final_train_loss == pytest.approx(alone.final_train_loss, abs=1e-6)
    # The trunk itself is unchanged by saving branch checkpoints.
    assert trunk.final_val_loss == pytest.approx(train(trunk_cfg, data=stdlib, progress=False).final_val_loss, abs=1e-6)


def test_branch_from_an_incompatible_trunk_is_refused(stdlib, tmp_path):
    from scaling_suite.errors import SuiteError
    trunk_cfg = make_config(**WSD)
    train(trunk_cfg, data=stdlib, progress=False, checkpoint_dir=tmp_path, save_at_steps=[13, 28])
    short = make_config(**{**WSD, "D": 16 * 1024})
    with pytest.raises(SuiteError, match="differs in lr"):
        train(short.replace(lr=1e-3), data=stdlib, progress=False, branch_from=tmp_path / "branch_13.pt")
    with pytest.raises(SuiteError, match="not within the constant phase"):      # past both cooldown starts
        train(short, data=stdlib, progress=False, branch_from=tmp_path / "branch_28.pt")
    # Same params but the default warmup, min(N, 10% of D), which here depends on D: 3 vs 2 steps.
    auto = dict(WSD, warmup_tokens=-1.0)
    train(make_config(**auto), data=stdlib, progress=False, checkpoint_dir=tmp_path / "auto", save_at_steps=[13])
    with pytest.raises(SuiteError, match="warmup 3 vs 2 steps"):
        train(make_config(**{**auto, "D": 16 * 1024}), data=stdlib, progress=False,
              branch_from=tmp_path / "auto" / "branch_13.pt")
