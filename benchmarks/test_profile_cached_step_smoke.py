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
