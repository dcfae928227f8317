"""CI smoke test: the oracle schedule computes every call at tolerance 0 (the images are the
reference's) and only the first call and the final jump at a tolerance nothing reaches."""

from benchmarks import oracle_schedule, protocol


def test_oracle_schedule_tiny(capsys):
    every, fewest = oracle_schedule.main(["--models", "flux", "--samplers", "flux_truecfg", "--steps", "8",
                                          "--seeds", "0", "--prompts", "1", "--tolerances", "0,100"])
    assert every["kinds"] == ["ffffffff"] and every["full_fraction"] == 1.0
    assert every["worst_psnr"] == protocol.PSNR_CAP  # nothing skipped, nothing corrected
    kinds = fewest["kinds"][0]
    assert kinds[0] == "f" and kinds.count("f") == 2 and "s" in kinds, kinds  # the first call, the final jump
    assert fewest["worst_psnr"] < protocol.PSNR_CAP
    assert "lowest worst image" in capsys.readouterr().out
