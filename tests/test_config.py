"""Budget arithmetic and validation: one function derives N, D, C and steps."""

import pytest

from scaling_suite.config import from_preset, make_config
from scaling_suite.errors import SuiteError


def test_three_ways_to_give_a_budget_agree():
    by_ratio = make_config(depth=2, tokens_per_param=20).derived()
    by_tokens = make_config(depth=2, D=by_ratio.D).derived()
    by_flops = make_config(depth=2, C=by_ratio.C).derived()
    assert by_ratio.D == by_tokens.D == by_flops.D
    assert by_flops.C == by_ratio.flops_per_token * by_ratio.D
    assert abs(by_ratio.D / by_ratio.N - 20) < by_ratio.batch_size * 64 / by_ratio.N + 0.5


def test_tokens_are_whole_global_batches():
    d = make_config(depth=1, D=100_000, batch_tokens=4096, context=64).derived()
    assert d.D % 4096 == 0 and d.steps == round(100_000 / 4096) and d.batch_size == 64


def test_warmup_defaults_to_N_tokens_capped():
    cfg = make_config(depth=2, tokens_per_param=20, batch_tokens=1024, context=64)
    d = cfg.derived()
    assert d.warmup_steps == round(min(d.N, 0.1 * d.D) / 1024)


def test_strings_are_typed():
    cfg = make_config(depth="3", lr="1e-3", D="2e6", schedule="wsd")
    assert cfg.depth == 3 and cfg.lr == 0.001 and cfg.D == 2e6


@pytest.mark.parametrize("values,match", [
    (dict(D=-1), "D must be a positive number"),
    (dict(C=-5.0), "C must be a positive number"),
    (dict(), "exactly one token budget"),
    (dict(D=1e6, C=1e12), "exactly one token budget"),
    (dict(D=10), "less than one global batch"),
    (dict(D=1e6, tokenizer="bpe", vocab_size=70000), "over 65535"),
    (dict(D=1e6, schedule="linear"), "unknown schedule"),
    (dict(D=1e6, device="tpu"), "unknown device"),
    (dict(D=1e6, batch_tokens=1000, context=64), "multiple of context"),
    (dict(D=1e6, depth="two"), "whole number"),
    (dict(D=1e6, micro_batch=3, batch_tokens=4096, context=64), "must divide"),
])
def test_bad_values_are_one_clear_line(values, match):
    with pytest.raises(SuiteError, match=match) as e:
        make_config(**values)
    assert "\n" not in str(e.value)


def test_unknown_preset():
    with pytest.raises(SuiteError, match="unknown preset 'huge'"):
        from_preset("huge")
