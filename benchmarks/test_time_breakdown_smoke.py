"""CI smoke test: the time breakdown matches every timed call of a generation to its record in the
report (the counts agree on both families, true CFG's two calls per step included), and the
per-kind seconds add up to no more than the generation's."""

import pytest

from benchmarks import time_breakdown


@pytest.mark.parametrize("model", ["sd3", "flux"])
def test_calls_match_the_report(model):
    out = time_breakdown.measure(model, steps=6, prompts=1, repeats=1, inductor=False, log=lambda _: None)
    (row,) = out["rounds"]
    kinds = row["kinds"]
    calls = sum(k["calls"] for k in kinds.values())
    assert calls == 6 * (2 if out["sampler"] == "flux_truecfg" else 1)
    assert kinds["full"]["calls"] >= 1
    assert 0 < sum(k["seconds"] for k in kinds.values()) <= row["specdiff"]
    # each kind's median call splits into the compiled variant, routing and the rest
    for v in out["split"].values():
        assert 0 < v["graph_ms"] < v["call_ms"] and 0 < v["routing_ms"] < v["outside_ms"] <= v["call_ms"]
    assert sum(v["calls"] for v in out["split"].values()) == calls


def test_a_random_weight_config():
    """(with Dynamo's guards on the modules skipped, ``--skip-module-guards``: the same calls)"""
    out = time_breakdown.measure_config("tiny", steps=4, repeats=1, inductor=False, log=lambda _: None,
                                        skip_module_guards=True)
    (row,) = out["rounds"]
    assert sum(k["calls"] for k in row["kinds"].values()) == 4 and out["config"] == "tiny"


def test_count_mismatch_is_an_error():
    class Report:
        main_steps = []

    with pytest.raises(ValueError, match="1 timed calls"):
        time_breakdown.split_by_kind([0.1], Report())
