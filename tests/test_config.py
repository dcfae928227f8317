"""Options: parsing, validation messages, round trip; bad options fail at compile time."""

import pytest
import torch

import specdiff_fx
from specdiff_fx import SpecDiffConfig


def test_defaults_and_round_trip():
    cfg = SpecDiffConfig()
    assert 0 < cfg.cache_ratio < 1 and cfg.speculative_steps == 0 and cfg.inductor and not cfg.strict
    assert SpecDiffConfig.from_options(cfg.to_dict()) == cfg
    assert cfg.controller == "error"
    other = SpecDiffConfig.from_options({"cache_ratio": 0.5, "controller": "fixed", "refresh_at": [0.3, 0.6]})
    assert other.refresh_at == (0.3, 0.6)
    assert SpecDiffConfig.from_options(other.to_dict()) == other
    assert "cache_ratio=0.5" in repr(other)


@pytest.mark.parametrize("options, key, owner", [
    ({"warmup_steps": 2}, "warmup_steps", "'fixed'"),
    ({"refresh_at": (0.5,)}, "refresh_at", "'fixed'"),
    ({"controller": "fixed", "tolerance": 0.2}, "tolerance", "'error'"),
    ({"controller": "fixed", "sparse_calls": 3}, "sparse_calls", "'error'"),
])
def test_an_option_of_another_controller_is_refused(options, key, owner):
    with pytest.raises(ValueError, match=f"'{key}' only applies with controller={owner}"):
        SpecDiffConfig.from_options(options)
    # the default values themselves, and lists for tuples, are fine with either controller
    SpecDiffConfig(controller="fixed", tolerance=SpecDiffConfig().tolerance)
    SpecDiffConfig(refresh_at=[0.45, 0.7], warmup_steps=4)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError) as e:
        SpecDiffConfig.from_options({"cache_ration": 0.5})
    msg = str(e.value)
    assert "'cache_ration'" in msg
    for key in SpecDiffConfig.valid_keys():
        assert key in msg


@pytest.mark.parametrize(
    "options, key, allowed",
    [
        ({"cache_ratio": 1.5}, "cache_ratio", "0 <= cache_ratio < 1"),
        ({"cache_ratio": -0.1}, "cache_ratio", "0 <= cache_ratio < 1"),
        ({"cache_ratio": float("nan")}, "cache_ratio", "0 <= cache_ratio < 1"),
        ({"cache_ratio": "0.5"}, "cache_ratio", "a number"),
        ({"speculative_steps": -1}, "speculative_steps", "0 <= speculative_steps"),
        ({"speculative_steps": 2.0}, "speculative_steps", "an int"),
        ({"speculative_steps": "2"}, "speculative_steps", "an int"),
        ({"warmup_steps": 0}, "warmup_steps", "1 <= warmup_steps"),
        ({"sparse_calls": 0}, "sparse_calls", "1 <= sparse_calls"),
        ({"sparse_calls": 1.0}, "sparse_calls", "None or an int"),
        ({"reuse_mass": 1.0}, "reuse_mass", "0 <= reuse_mass < 1"),
        ({"blend_history": 0}, "blend_history", "1 <= blend_history"),
        ({"inductor": "yes"}, "inductor", "True or False"),
        ({"strict": 1}, "strict", "True or False"),
        ({"score_queries": -5}, "score_queries", "an int >= 0"),
        ({"refresh_at": (0.7, 0.3)}, "refresh_at", "sorted"),
        ({"refresh_at": (0.0,)}, "refresh_at", "(0, 1)"),
        ({"max_cache_bytes": -1}, "max_cache_bytes", "None or an int >= 0"),
        ({"context_interval": -1}, "context_interval", "0 <= context_interval"),
        ({"context_interval": 2.0}, "context_interval", "an int"),
        ({"context_interval": True}, "context_interval", "an int"),
        ({"context_ratio": 1.5}, "context_ratio", "0 <= context_ratio <= 1"),
        ({"context_ratio": True}, "context_ratio", "0 <= context_ratio <= 1"),
        ({"context_ratio": None}, "context_ratio", "a number"),
    ],
)
def test_bad_values_name_key_value_and_range(options, key, allowed):
    with pytest.raises(ValueError) as e:
        SpecDiffConfig.from_options(options)
    msg = str(e.value)
    assert repr(key) in msg and allowed in msg and repr(options[key]) in msg


@pytest.mark.parametrize("old, ratio", [(True, 1.0), (False, 0.0)])
def test_cache_context_is_a_deprecated_spelling_of_context_ratio(old, ratio):
    with pytest.warns(FutureWarning, match=f"'cache_context' is deprecated: use context_ratio={ratio}"):
        cfg = SpecDiffConfig.from_options({"cache_context": old})
    assert cfg.effective_context_ratio == ratio and SpecDiffConfig().effective_context_ratio == 0.5
    with pytest.raises(ValueError, match="'context_ratio' and 'cache_context' both say"):
        SpecDiffConfig.from_options({"context_ratio": 0.25, "cache_context": old})


def test_context_interval_needs_every_context_token_cached():
    with pytest.raises(ValueError, match="'context_interval' only applies with every context token cached"):
        SpecDiffConfig.from_options({"context_interval": 2})
    with pytest.warns(FutureWarning, match="'context_interval' is deprecated"):
        SpecDiffConfig.from_options({"context_interval": 2, "context_ratio": 1.0})


def test_options_must_be_a_dict():
    with pytest.raises(ValueError, match="must be a dict"):
        SpecDiffConfig.from_options([("cache_ratio", 0.5)])


def test_backend_object_validates_immediately():
    with pytest.raises(ValueError, match="cache_ratio"):
        specdiff_fx.backend(cache_ratio=1.5)
    with pytest.raises(ValueError, match="unknown specdiff option"):
        specdiff_fx.backend({"bogus": 1})


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"nope": 1}, "unknown specdiff option"),
        ({"cache_ratio": 1.5}, "cache_ratio"),
        ({"speculative_steps": -1}, "speculative_steps"),
        ({"cache_ratio": "high"}, "cache_ratio"),
    ],
)
def test_bad_options_raise_value_error_at_compile_time(options, needle):
    """Through ``torch.compile(backend="specdiff", options=...)`` the ValueError surfaces
    when Dynamo hands the graph to the backend (the first call), before any caching."""
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 3)
    compiled = torch.compile(model, backend="specdiff", options=options)
    with pytest.raises(Exception) as e:
        compiled(torch.randn(2, 3))
    # Dynamo wraps backend errors in BackendCompilerFailed; the message and the inner
    # exception are ours
    assert "ValueError" in str(e.value) and needle in str(e.value)
    inner = getattr(e.value, "inner_exception", e.value)
    assert isinstance(inner, ValueError) and needle in str(inner)
