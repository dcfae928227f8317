"""CI smoke test of the schedule search: an all-full schedule gives the reference's images, the
search keeps the number of full steps and never ends worse than where it started, and a step's
calls share its letter (the transformer runs on full steps only)."""

import pytest
import torch

from benchmarks import protocol, schedule_search


def test_schedule_search_tiny():
    every, = schedule_search.main(["--model", "sd3", "--sampler", "sd3_cfg", "--steps", "6", "--evaluate", "ffffff",
                                   "--prompts", "1", "--seeds", "0"])
    assert every["schedule"] == "ffffff" and every["worst"] == [protocol.PSNR_CAP]
    cell = schedule_search.Cell("sd3", "sd3_cfg", 6, [0], prompts=1)
    forced = cell.evaluate("ssssss", 0)["kinds"]
    assert forced[0] == "f" and forced.count("f") == 2, forced  # the first call, the final jump
    start = schedule_search.evenly_spaced(6, forced, 4)
    assert start.count("f") == 4 and all(start[i] == "f" for i in range(6) if forced[i] == "f")
    found, best = schedule_search.search(cell, start, 0)
    assert found.count("f") == 4 and best["kinds"] == found
    assert (best["worst"], best["mean"]) >= (cell.evaluate(start, 0)["worst"], cell.evaluate(start, 0)["mean"])


def test_schedule_search_refuses_a_malformed_schedule():
    with pytest.raises(SystemExit):
        schedule_search.main(["--model", "sd3", "--steps", "6", "--evaluate", "fff", "--prompts", "1", "--seeds", "0"])


class _Counting:
    """A stand-in transformer: counts its calls and returns the call's number as the output."""

    def __init__(self):
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return (torch.full((1, 2), float(self.calls)),)


def test_the_calls_of_a_step_share_its_letter():
    t = _Counting()
    caller = schedule_search.ScheduleCaller(t, 1000.0, 2, "fsf", hindsight=False)
    outs = []
    for sigma in (1.0, 0.9, 0.8):  # cond then uncond per step; at 0.8 the estimated step, 0.1, is no final jump
        for _ in range(2):
            outs.append(caller(timestep=torch.tensor([sigma * 1000.0]))[0])
    assert caller.kinds == ["f", "s", "f"] and t.calls == 4  # the skipped step ran nothing
    assert [float(o[0, 0]) for o in outs] == [1.0, 2.0, 1.0, 2.0, 3.0, 4.0]  # each branch reuses its own output
