"""Configs that cannot work are refused with a message naming the value and what is allowed."""
import math

import pytest

from looplm import ConfigError, LoopConfig


@pytest.mark.parametrize("kwargs,message", [
    (dict(n_embd=100, n_head=6), r"n_embd \(100\) must be divisible by n_head \(6\)"),
    (dict(n_loops=0), r"n_loops must be an integer >= 1, got 0"),
    (dict(n_layer=-1), r"n_layer must be an integer >= 1"),
    (dict(n_loops=2.5), r"n_loops must be an integer >= 1, got 2.5"),
    (dict(n_coda=-1), r"n_coda must be an integer >= 0"),
    (dict(inject="concat"), r"inject must be one of \('none', 'add', 'norm_add'\), got 'concat'"),
    (dict(update="rk4"), r"update must be one of"),
    (dict(step_encoding="rope"), r"step_encoding must be one of"),
    (dict(state_init="ones"), r"state_init must be one of"),
    (dict(halt="perplexity", halt_threshold=1.0), r"halt must be one of .*'entropy'"),
    (dict(halt="entropy"), r"halt='entropy' needs halt_threshold"),
    (dict(halt="confidence", halt_threshold=1.5), r"halt_threshold for halt='confidence' must be in \(0.0, 1.0\]"),
    (dict(halt="gate", halt_threshold=0.0), r"must be in \(0.0, 1.0\]"),
    (dict(halt="entropy", halt_threshold=-0.1), r"must be in \[0.0, inf\)"),
    (dict(halt="delta", halt_threshold=math.nan), r"must be in \[0.0, inf\), got nan"),
    (dict(halt="entropy", halt_threshold=1.0, halt_thresholds_after={99: 2.0}), r"token id 99 is outside \[0, 65\)"),
    (dict(halt="confidence", halt_threshold=0.9, halt_thresholds_after={5: 2.0}), r"halt_thresholds_after\[5\]"),
    (dict(halt_threshold=0.5, halt_thresholds_after={5: 0.1}), r"halt='none'"),
    (dict(min_loops=5, max_loops=3), r"min_loops \(5\) must be <= max_loops \(3\)"),
    (dict(inject="none", state_init="zeros"), r"never shows the core the input"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(n_loops=True), r"n_loops must be an integer >= 1, got True"),
    (dict(max_loops=0), r"max_loops must be an integer >= 1, got 0"),
    (dict(n_prelude=-1), r"n_prelude must be an integer >= 0, got -1"),
    (dict(state_noise_std=0.0), r"state_noise_std must be > 0, got 0.0"),
])
def test_bad_configs_are_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        LoopConfig(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(halt="confidence", halt_threshold=1.0), dict(halt="gate", halt_threshold=1.0),
    dict(halt="entropy", halt_threshold=0.0), dict(halt="delta", halt_threshold=0.0), dict(halt="kl", halt_threshold=0.0),
    dict(halt="entropy", halt_threshold=1.0, halt_thresholds_after={0: 0.0, 64: 2.0}),
    dict(min_loops=3, n_loops=3), dict(dropout=0.0), dict(n_prelude=0, n_coda=0), dict(inject="none", state_init="embed"),
])
def test_the_edges_of_the_allowed_ranges_are_accepted(kwargs):
    cfg = LoopConfig(**kwargs)
    assert all(getattr(cfg, key) == value for key, value in kwargs.items())


def test_max_loops_defaults_to_n_loops_and_may_exceed_it():
    assert LoopConfig(n_loops=4).max_loops == 4
    assert LoopConfig(n_loops=4, max_loops=16).max_loops == 16


def test_dict_round_trip_and_unknown_keys():
    cfg = LoopConfig(halt="entropy", halt_threshold=0.5, halt_thresholds_after={12: 0.1})
    d = cfg.to_dict()
    assert d["halt_thresholds_after"] == {"12": 0.1}
    assert LoopConfig.from_dict(d) == cfg
    with pytest.raises(ConfigError, match=r"unknown LoopConfig keys \['n_loop'\]"):
        LoopConfig.from_dict({**d, "n_loop": 3})
