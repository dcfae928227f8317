"""CI smoke test: the weight-streaming check of profile_cached_step.py runs on the mid config's
linears at a cached and a full step's rows."""

from benchmarks import profile_cached_step


def test_weight_streaming_runs(capsys):
    out = profile_cached_step.weight_streaming(0.1, 0.5, rounds=1)
    assert out["cached"]["rows"] == (2 * 102, 2 * 40) and out["full"]["rows"] == (2 * 1024, 2 * 80)
    assert out["full"]["flops"] > 5 * out["cached"]["flops"] > 0  # 10x fewer image rows, half the text rows
    assert all(r["own_weights_s"] > 0 and r["resident_s"] > 0 for r in out.values())
    assert all(r["onednn_packed_s"] is None or r["onednn_packed_s"] > 0 for r in out.values())
    assert "MiB of weights read per call" in capsys.readouterr().out


def test_ab_times_each_cached_variant_right_after_a_full_step():
    calls = []
    med = profile_cached_step.after_full(lambda: calls.append("full"),
                                         {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=5)
    assert set(med) == {"full", "a", "b"} and all(t >= 0 for t in med.values())
    assert calls[0::2] == ["full"] * 10 and sorted(calls[1::2]) == ["a"] * 5 + ["b"] * 5
    assert calls[1::2] != ["a", "b"] * 5  # the pairs' order changes from round to round
