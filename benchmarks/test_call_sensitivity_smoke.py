"""CI smoke test: the call-by-call sensitivity runs; every call full reproduces full compute, and
one skipped call changes the images."""

import math

from benchmarks import call_sensitivity


def test_call_sensitivity_tiny(capsys):
    (res,) = call_sensitivity.main(["--model", "sd3", "--sampler", "sd3_cfg", "--steps", "5", "--prompts", "1"])
    assert res["all_full"]["mean_psnr"] == 100.0 and res["all_full"]["rel"] < 1e-6
    rows = res["rows"]
    assert [r["call"] for r in rows] == [1, 2, 3, 4]
    sigmas = [r["sigma"] for r in rows]
    assert sigmas == sorted(sigmas, reverse=True)
    for r in rows:
        assert 0 < r["e"] < 2 and r["e_guided"] is not None and r["e_guided"] > 0
        assert r["mean_psnr"] < 100.0 and r["rel"] > 0 and math.isfinite(r["per_dt_e"])
    assert "r / (dt e_t)" in capsys.readouterr().out
