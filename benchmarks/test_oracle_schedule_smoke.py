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


class _Scripted:
    """A stand-in transformer returning, call after call, the tensors of a list."""

    def __init__(self, outputs):
        self.outputs = list(outputs)

    def __call__(self, *args, **kwargs):
        return (self.outputs.pop(0),)


def _call(caller, sigma):
    import torch

    return caller(timestep=torch.tensor([sigma * 1000.0]))[0]


def test_true_cfg_calls_pool_their_errors_and_earlier_outputs_follow_the_decision():
    import torch

    one, two = torch.ones(1, 4), 2 * torch.ones(1, 4)
    # step 1 full (nothing to reuse); step 2: the cond call repeats itself (error 0), the uncond call
    # changes by 50 %: pooled sqrt((0 + 0.25) / 2) = 0.35
    scripted = [one, two, one, 4 * torch.ones(1, 4)]
    for tol, kinds in ((0.3, "ff"), (0.4, "fs")):
        caller = oracle_schedule.OracleCaller(_Scripted(scripted), 1000.0, 2, tol, hindsight=False)
        assert torch.equal(_call(caller, 1.0), one) and torch.equal(_call(caller, 1.0), two)
        cond = _call(caller, 0.9)
        uncond = _call(caller, 0.9)
        assert caller.kinds == list(kinds)
        expected_uncond = two if kinds[1] == "s" else 4 * torch.ones(1, 4)
        assert torch.equal(cond, one) and torch.equal(uncond, expected_uncond)
    # the cond call's returned tensor is overwritten when the step is skipped on the uncond call's say
    caller = oracle_schedule.OracleCaller(_Scripted([one, two, 3 * one, two]), 1000.0, 2, 10.0, hindsight=False)
    _call(caller, 1.0), _call(caller, 1.0)
    cond = _call(caller, 0.9)
    assert torch.equal(cond, 3 * one)  # not decided yet
    _call(caller, 0.9)
    assert caller.kinds == ["f", "s"] and torch.equal(cond, one)


def test_sigma_weight_moves_the_threshold_with_sigma():
    import pytest
    import torch

    flat = oracle_schedule.OracleCaller(_Scripted([]), 1000.0, 1, 0.2)
    assert flat.threshold(0.9) == flat.threshold(0.1) == 0.2
    strict_early = oracle_schedule.OracleCaller(_Scripted([]), 1000.0, 1, 0.2, sigma_weight=1.0, weight_cap=2.0)
    assert strict_early.threshold(0.5) == pytest.approx(0.2)
    assert strict_early.threshold(0.9) == pytest.approx(0.2 / 9)
    assert strict_early.threshold(0.1) == pytest.approx(0.4)  # 9x, capped at 2x
    # the same 50 % change at sigma 0.9 is reused under the flat tolerance 0.6, computed under the weighted one
    one, two = torch.ones(1, 4), 2 * torch.ones(1, 4)
    for weight, kinds in ((0.0, ["f", "s"]), (1.0, ["f", "f"])):
        caller = oracle_schedule.OracleCaller(_Scripted([one, two]), 1000.0, 1, 0.6, hindsight=False,
                                              sigma_weight=weight)
        _call(caller, 1.0), _call(caller, 0.9)
        assert caller.kinds == kinds
