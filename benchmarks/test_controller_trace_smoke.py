"""CI smoke test: the controller trace runs, and a full call's true error is zero."""

from benchmarks import controller_trace


def test_controller_trace_tiny(capsys):
    (t,) = controller_trace.main(["--model", "flux", "--sampler", "flux_nocfg", "--steps", "8", "--prompts", "1",
                                  "--threads", "1"])
    rows = t["rows"]
    assert len(rows) == 8 and t["kinds"][0] == "f" and "c" in t["kinds"]
    for r in rows:
        if r["kind"] == "full":  # every token computed: what the untouched transformer computes
            assert r["true"] < 1e-5
        else:
            assert r["predicted"] is not None and 0 < r["true"] < 1
    assert "sum e*dsigma" in capsys.readouterr().out
