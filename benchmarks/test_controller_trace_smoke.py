"""CI smoke test: the controller trace runs, a full call's true error is zero, and each sparse
call's error is split between its computed and left-out tokens."""

import pytest

from benchmarks import controller_trace


def test_controller_trace_tiny(capsys):
    (t,) = controller_trace.main(["--model", "flux", "--sampler", "flux_nocfg", "--steps", "8", "--prompts", "1",
                                  "--threads", "1"])
    rows = t["rows"]
    assert len(rows) == 8 and t["kinds"][0] == "f" and "c" in t["kinds"]
    for r in rows:
        if r["kind"] == "full":  # every token computed: what the untouched transformer computes, plus the
            assert r["true"] == 0.0 and r["correction"] >= 0  # hindsight correction of the calls before
            if r["step"] == 0:  # nothing cached before the first call: nothing to correct
                assert r["correction"] < 1e-5
        else:
            assert r["predicted"] is not None and 0 < r["true"] < 1
            for key in ("computed_fresh", "computed_reused", "left_out_reused"):  # a skipped call computes none
                assert (0 < r[key] < 1) if r["kind"] == "cached" else key not in r, (key, r)
    printed = capsys.readouterr().out
    assert "sum e*dsigma" in printed and "computed tokens' fresh outputs" in printed


def test_controller_trace_takes_the_protocol_seed(monkeypatch):
    """``--seed`` reaches the protocol's noise (stopped there: the run itself is the test above)."""
    import pytest

    from benchmarks import protocol

    seeds = []

    def noise(seed, *args, **kwargs):
        seeds.append(seed)
        raise StopIteration

    monkeypatch.setattr(protocol, "initial_noise", noise)
    with pytest.raises(StopIteration):
        controller_trace.main(["--model", "flux", "--steps", "6", "--prompts", "1", "--threads", "1", "--seed", "3"])
    assert seeds == [3]


def test_controller_trace_names_the_samplers_on_a_wrong_one(capsys):
    with pytest.raises(SystemExit):
        controller_trace.main(["--sampler", "true_cfg"])
    err = capsys.readouterr().err
    assert "'true_cfg'" in err and "flux_truecfg" in err and "sd3_cfg" in err
