"""The hindsight correction (specdiff_fx/runtime/hindsight.py): exact where its assumptions
hold, off where asked, and invisible to routing."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig
from specdiff_fx.runtime import SpecDiffRuntime
from specdiff_fx.runtime.hindsight import Hindsight, step_estimate

from test_runtime import B, FakeExecutor, N, C, fake_plan


def _euler(kinds, sigmas, v, correct=True):
    """Integrate ``v`` over ``sigmas`` with full calls where ``kinds`` says, cached calls reusing
    the last full call's output; returns the final latent."""
    h = Hindsight()
    x = torch.zeros_like(v(1.0))
    last = None
    for i, kind in enumerate(kinds):
        s = sigmas[i]
        if kind == "f":
            last = v(s)
            out = h.full(s, last, sigmas[:i]) if correct else last
        else:
            out = last.clone()
            h.cached(s, out)
        x = x + (sigmas[i + 1] - s) * out
    return x


def test_a_linear_velocity_loses_only_the_samplers_share_after_the_full_call():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    v = lambda s: a + b * s  # noqa: E731
    sigmas = [1.0]
    for k in range(6):  # steps growing geometrically: the step estimate is exact
        sigmas.append(sigmas[-1] - 0.05 * 1.2 ** k)
    kinds = "ffcccf"
    exact = sum((sigmas[i + 1] - sigmas[i]) * v(sigmas[i]) for i in range(6))
    off = _euler(kinds, sigmas, v, correct=False) - exact
    assert off.abs().max() > 1e-3  # reuse alone is off
    # the correction takes back all but dt / sigma of it: that share the sampler's own step
    # takes back, through the model's answer to a displaced latent (a linear v has none)
    left = (sigmas[6] - sigmas[5]) / -sigmas[5]
    torch.testing.assert_close(_euler(kinds, sigmas, v) - exact, left * off, rtol=1e-4, atol=1e-6)


def test_the_last_step_to_zero_is_estimated_as_sigma():
    assert step_estimate([], 1.0) is None
    assert step_estimate([1.0], 0.9) == pytest.approx(0.1)  # one step known: the same again
    assert step_estimate([1.0, 0.9], 0.78) == pytest.approx(0.12 * 1.2)  # geometric
    assert step_estimate([0.4, 0.25], 0.1) == pytest.approx(0.1)  # capped: a schedule ends at zero


def test_no_cached_call_no_correction():
    h = Hindsight()
    v0, v1 = torch.randn(3), torch.randn(3)
    assert h.full(1.0, v0, []) is v0
    assert h.full(0.9, v1, [1.0]) is v1
    assert h.nbytes == v1.numel() * 4  # the reference output only


class VelocityExecutor(FakeExecutor):
    """Full calls return a velocity that depends on sigma, so reuse is wrong and the
    correction is not zero."""

    def run_full(self, args):
        x, t = args
        out = super().run_full(args)
        v = -x + float(t[0]) / 1000.0
        return type(out)((v,), v, out.score, out.kv)


@pytest.mark.parametrize("hindsight", [True, False])
def test_the_runtime_corrects_full_calls_and_routing_follows(hindsight):
    ex = VelocityExecutor()
    cfg = SpecDiffConfig(controller="fixed", cache_ratio=0.75, warmup_steps=1, refresh_at=(0.5,), hindsight=hindsight)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    steps = 10
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    returned = []
    for i in range(steps):
        (v,) = rt(x, torch.full((B,), float(sigmas[i]) * 1000))
        returned.append((v.clone(), -x + float(sigmas[i])))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    rep = rt.report
    kinds = [s.kind for s in rep.steps]
    # one generation throughout (the corrected output is what routing explains the update by)
    assert len(rep.main_steps) == steps and kinds == ["full"] + ["cached"] * 4 + ["full"] + ["cached"] * 4
    first_full, refresh = returned[0], returned[5]
    torch.testing.assert_close(first_full[0], first_full[1])  # nothing cached before: nothing to correct
    if hindsight:
        assert (refresh[0] - refresh[1]).abs().max() > 1e-3
        assert rt.branches[0].hindsight.ref is not None
    else:
        torch.testing.assert_close(refresh[0], refresh[1])


def test_option_is_validated():
    with pytest.raises(ValueError, match="hindsight"):
        SpecDiffConfig(hindsight=1)


def test_the_last_step_to_zero_corrects_nothing():
    h = Hindsight()
    v = torch.ones(3)
    h.full(0.3, v, [0.4])
    h.cached(0.2, v)
    out = h.full(0.05, v * 2, [0.4, 0.3, 0.2])  # the step estimate is sigma itself: the model's step takes it all
    assert torch.equal(out, v * 2) and h.acc is None and h.ref_sigma == 0.05


def test_no_correction_where_the_step_estimate_cannot_be_trusted():
    """A full call right after a short step of a custom schedule (0.290 to 0.289 among steps of
    0.06): the step estimate (a hundredth of the next step) would scale the correction a hundred
    times, so the call returns its output as computed; on a steady schedule it is corrected."""
    from specdiff_fx.runtime.hindsight import STEP_RATIO, steady

    v = torch.ones(3)
    for before, corrected in (([0.41, 0.35], True), ([0.35, 0.29], False)):
        h = Hindsight()
        h.full(before[0], v, [0.47][: len(before) - 1])
        h.cached(before[1], v)
        sigma = 0.289 if not corrected else 0.29
        out = h.full(sigma, v * 2, [0.47] + before)
        assert torch.equal(out, v * 2) is not corrected and h.ref_sigma == sigma
    assert steady([0.5, 0.4], 0.3) and not steady([0.35, 0.29], 0.289) and steady([1.0], 0.9)
    assert steady([1.0, 0.9, 0.9], 0.8)  # Heun: the corrector's call at the step's end sigma
    assert steady([0.5, 0.4], 0.4 - 0.1 * STEP_RATIO + 1e-9) and not steady([0.5, 0.4], 0.4 - 0.1 * STEP_RATIO - 0.01)
    for kind in ("sd3", "flux256", "flux1024", "flux4096"):  # the pipelines' schedules are steady throughout
        for steps in (4, 8, 20, 28, 50):
            s = _schedule(kind, steps)
            assert all(steady(s[:i], s[i]) for i in range(len(s))), (kind, steps)


def _schedule(kind: str, steps: int) -> list[float]:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.test_controller_variants import _pipeline_sigmas

    return _pipeline_sigmas(kind, steps)
