"""A second-order sampler (Heun, as diffusers' ``FlowMatchHeunDiscreteScheduler`` steps): each step
but the last calls the transformer at its start sigma, then at its end sigma on the Euler-predicted
latent (the corrector); the next step's first call runs at that same end sigma on the corrected
latent. Routing keeps the calls in one generation; the corrector repeats its step's decision (and
tokens), as a further branch at one sigma does. Fake executor of ``test_runtime`` (no model)."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig
from specdiff_fx.runtime import SpecDiffRuntime
from specdiff_fx.runtime.hindsight import step_estimate
from specdiff_fx.runtime.routing import Branch, _continues
from specdiff_fx.runtime.state import BranchState
from test_runtime import B, C, N, FakeExecutor, fake_plan


def heun_generate(rt, steps, seed=0, branches=1, guidance=3.0):
    """Heun's method over ``linspace(1, 0)`` sigmas, the last step Euler (its end sigma is 0); with
    ``branches=2`` two calls per evaluation (cond, uncond) combined by ``guidance``."""
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)

    def velocity(x, s):
        cond = [[torch.full((1,), float(b))] if rt.plan.condition_inputs else [] for b in range(branches)]
        outs = [rt(x, torch.full((B,), float(s) * 1000), *cond[b])[0] for b in range(branches)]
        return outs[0] if branches == 1 else outs[1] + guidance * (outs[0] - outs[1])

    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = velocity(x, s)
        if s_next == 0:
            return x + (s_next - s) * d
        d2 = velocity(x + (s_next - s) * d, s_next)
        x = x + (s_next - s) * (d + d2) / 2
    return x


def test_a_branch_continues_at_its_sigma_on_another_latent_or_after_a_corrector():
    x = torch.randn(B, N, C)
    branch = Branch((), BranchState(extrapolate=True))
    branch.trace.push(0.5, x, -x)
    assert _continues(branch, 0.4, x + 1)  # a lower sigma
    assert not _continues(branch, 0.6, x + 1)  # a higher one: another generation
    assert _continues(branch, 0.5, x + 1)  # the same sigma on another latent: Heun's next step
    assert not _continues(branch, 0.5, x.clone())  # the same latent: a further branch (true CFG)
    branch.state.second_order = True  # a second-order branch whose last call was a corrector:
    assert _continues(branch, 0.5, x.clone())  # a skipped corrector leaves the latent where it predicted
    branch.state.sigmas = [0.6, 0.5, 0.5]  # its last call was a step's first call: the same latent is a further branch
    assert not _continues(branch, 0.5, x.clone())


def test_the_step_estimate_steps_on_from_a_second_call_at_one_sigma():
    assert step_estimate([1.0, 0.8], 0.8) == pytest.approx(step_estimate([1.0], 0.8))
    assert step_estimate([1.0, 0.8, 0.8], 0.6) == pytest.approx(step_estimate([1.0, 0.8], 0.6))


@pytest.mark.parametrize("controller", ["error", "fixed"])
@pytest.mark.parametrize("branches", [1, 2])
def test_heun_is_one_generation_whose_correctors_repeat_their_steps_decision(controller, branches):
    steps = 12
    cfg = SpecDiffConfig(controller=controller, speculative_steps=0)
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(conditioned=branches > 1), cfg, ex)
    x = heun_generate(rt, steps, branches=branches)
    assert torch.isfinite(x).all()
    rep = rt.report
    calls = 2 * steps - 1
    assert len(rep.main_steps) == calls * branches and {s.branch for s in rep.main_steps} == set(range(branches))
    kinds = [[s.kind for s in rep.main_steps if s.branch == j] for j in range(branches)]
    assert all(k == kinds[0] for k in kinds)  # the branches of one evaluation share its decision
    k0 = kinds[0]
    # calls: 0 = step 0's first, 1 = its corrector (decided alone: nothing has shown the sampler
    # second-order yet), then (2i, 2i + 1) = step i's first call and its corrector, the last call alone
    assert all(k0[2 * i] == k0[2 * i + 1] for i in range(1, steps - 1))
    assert set(k0) >= {"full", "cached"} and rep.flops_fraction < 0.8
    if branches == 1:  # the corrector computes its step's tokens
        assert len(ex.calls) == calls
        pairs = [(ex.calls[2 * i][2], ex.calls[2 * i + 1][2]) for i in range(1, steps - 1)]
        assert any(a is not None for a, _ in pairs)
        assert all((a is None and b is None) or torch.equal(a, b) for a, b in pairs)


def test_euler_decides_every_call():
    """Without a second call at one sigma nothing follows: an Euler generation's decisions are the
    policy's on every call (a skipped call after a sparse one, as the default ``sparse_calls``)."""
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(speculative_steps=0), FakeExecutor())
    from test_runtime import generate

    generate(rt, 16)
    kinds = [s.kind for s in rt.report.main_steps]
    assert "skipped" in kinds and not any(s.second_order for s in rt.branches.values())


def test_a_second_order_steps_decision_is_predicted_at_its_correctors_sigma():
    """A second-order step's first call runs at the sigma of the last full call (the corrector
    before it refreshed there) but its decision serves the step's corrector one step further on:
    the error is predicted there, where it would be 0 at the call's own sigma; the corrector pools
    with its step's first call (one ``Observation.step``), not a step of its own."""
    from specdiff_fx.control import Action, Decision, Observation, StepView, make_policy

    policy = make_policy(SpecDiffConfig(controller="error", tolerance=10.0), N)
    state = policy.start()

    def observe(sigma, action, error, step):
        policy.observe(state, StepView(step=0, sigma=sigma, sigmas=(), num_tokens=N),
                       Observation(Decision(action, k=4 if action is Action.SPARSE else None), sigma, 1, 1, error,
                                   step=step))

    observe(1.0, Action.FULL, None, None)
    observe(0.9, Action.FULL, 0.2, 1)  # rate 2 per unit of sigma, refreshed at 0.9
    own = StepView(step=2, sigma=0.9, sigmas=(1.0, 0.9), num_tokens=N)
    assert policy.decide(state, own).predicted == pytest.approx(0.0)
    served = StepView(step=2, sigma=0.9, sigmas=(1.0, 0.9), num_tokens=N, until=0.8)
    assert policy.decide(state, served).predicted == pytest.approx(2 * 0.1)
    observe(0.9, Action.SPARSE, 0.0, 2)  # the step's first call, at the refresh sigma: a step of its own
    observe(0.8, Action.SPARSE, 0.3, 2)  # its corrector: the same step
    assert state.sparse_since == 1 and state.step.sigma == 0.9
