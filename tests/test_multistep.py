"""A multistep sampler (UniPC, DPM-Solver++(2M)): its latent update combines the outputs of the
last calls, not the newest one's alone. The runtime tells it from how the latent moves
(``routing.update_order``) and the error controller holds such a generation to a tighter
tolerance (``ErrorControlled.multistep_share``). Fake executors of ``test_runtime`` (no model);
the tiny SD3 pipeline with UniPC and DPM-Solver++ in ``test_pipelines_specdiff``."""

import pytest
import torch

from specdiff_fx import SpecDiffConfig
from specdiff_fx.control import Action, Observation, StepView
from specdiff_fx.control.error import ErrorControlled
from specdiff_fx.control.base import Decision
from specdiff_fx.runtime import SpecDiffRuntime, StepOutput
from specdiff_fx.runtime.routing import FIRST_ORDER_CHECKS, Branch, Generation, update_order
from specdiff_fx.runtime.state import BranchState, UpdateOrder
from specdiff_fx.telemetry import GenerationReport
from test_runtime import B, C, N, FakeExecutor, fake_plan
from test_second_order import heun_generate


class CurvedExecutor(FakeExecutor):
    """Velocity ``-sin(3 x) / 3``: not linear in the latent, so an earlier call's output is not in the
    span of the newest call's latent and output (with ``-x`` every output is)."""

    def run_full(self, args):
        x, t = args
        out = super().run_full((torch.sin(3 * x) / 3, t))
        return StepOutput(out.user, out.tokens, out.score, out.kv)

    def run_sparse(self, args, key, inputs):
        x, t = args
        return super().run_sparse((torch.sin(3 * x) / 3, t), key, inputs)


def runtime(**options):
    cfg = SpecDiffConfig(speculative_steps=0, **options)
    return SpecDiffRuntime(fake_plan(), cfg, CurvedExecutor())


def generate(rt, steps, multistep, seed=0):
    """Over ``linspace(1, 0)`` sigmas: Euler, or the two-step Adams-Bashforth method (a multistep
    method as DPM-Solver++(2M) is one: the step combines the last two outputs; Euler on the first)."""
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    prev = None
    for i in range(steps):
        v = rt(x, torch.full((B,), float(sigmas[i]) * 1000))[0]
        dt = float(sigmas[i + 1] - sigmas[i])
        x = x + dt * (v if prev is None or not multistep else 1.5 * v - 0.5 * prev)
        prev = v
    return x


def test_update_order_of_constructed_updates():
    g = torch.Generator().manual_seed(0)
    x_prev, x_last, v_prev, v = (torch.randn(B, N, C, generator=g) for _ in range(4))
    gen = Generation(None, GenerationReport("f", N, B, 0.9, 1))
    br = Branch((), BranchState(extrapolate=False))
    br.trace.push(0.8, x_prev, v_prev)
    gen.branches.append(br)
    assert update_order(x_last - 0.1 * v, gen, br) is UpdateOrder.UNKNOWN  # one call: nothing to tell
    br.trace.push(0.7, x_last, v)
    assert update_order(x_last - 0.1 * v, gen, br) is UpdateOrder.FIRST  # Euler
    assert update_order(0.9 * x_last - 0.1 * v, gen, br) is UpdateOrder.FIRST  # DDIM-like: latent and output
    assert update_order(x_last - 0.1 * (1.5 * v - 0.5 * v_prev), gen, br) is UpdateOrder.MULTISTEP
    assert update_order(x_last + 0.1 * torch.randn(B, N, C, generator=g), gen, br) is UpdateOrder.UNKNOWN
    # a per-token rescale of a one-step update (Qwen-Image's true CFG): close to the span of whole
    # outputs, but not a combination of them, with or without the call before
    rescale = 1 + 0.02 * torch.randn(B, N, 1, generator=g)
    assert update_order(x_last - 0.1 * v * rescale, gen, br) is UpdateOrder.UNKNOWN
    # true CFG: the newest outputs of both branches combined are one step's update
    uncond = Branch((), BranchState(extrapolate=False))
    u_prev, u = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    uncond.trace.push(0.8, x_prev, u_prev)
    uncond.trace.push(0.7, x_last, u)
    gen.branches.append(uncond)
    assert update_order(x_last - 0.1 * (u + 3 * (v - u)), gen, br) is UpdateOrder.FIRST
    assert update_order(x_last - 0.1 * (u + 3 * (v - u)) + 0.05 * (v_prev - u_prev), gen, uncond) \
        is UpdateOrder.MULTISTEP


def test_a_multistep_sampler_is_told_from_its_second_update_and_noted():
    rt = runtime()
    generate(rt, 10, multistep=True)
    rep = rt.generation.report
    assert rt.generation.branches[0].state.update_order is UpdateOrder.MULTISTEP
    assert sum("multistep" in n for n in rep.notes) == 1


@pytest.mark.parametrize("sampler,tolerance", [("euler", 1e-6), ("euler", 0.16), ("heun", 0.16)])
def test_one_step_samplers_are_not_multistep(sampler, tolerance):
    rt = runtime(tolerance=tolerance)
    heun_generate(rt, 10) if sampler == "heun" else generate(rt, 10, multistep=False)
    state = rt.generation.branches[0].state
    assert len(rt.router.generations) == 1
    kinds = [s.kind for s in rt.generation.report.steps]
    if sampler == "heun":  # its calls at one sigma are not checked, nor what follows them
        assert state.update_order is UpdateOrder.UNKNOWN and state.order_checks == 0
    elif tolerance < 1e-3:  # every call full: checked on FIRST_ORDER_CHECKS continuations, then no more
        assert set(kinds) == {"full"}
        assert state.update_order is UpdateOrder.FIRST and state.first_order_updates == FIRST_ORDER_CHECKS
    else:  # checked only after two full calls in a row
        assert "cached" in kinds and state.update_order is not UpdateOrder.MULTISTEP
        runs = sum(1 for i in range(2, len(kinds)) if kinds[i - 2] == kinds[i - 1] == "full")
        assert state.first_order_updates == min(runs, FIRST_ORDER_CHECKS) >= 1
    assert not any("multistep" in n for n in rt.generation.report.notes)


def test_the_policy_sees_the_sampler_and_decides_with_the_tighter_tolerance():
    views = []

    class Recording(ErrorControlled):
        def decide(self, state, view):
            views.append(view)
            return super().decide(state, view)

    for multistep in (False, True):
        views.clear()
        rt = runtime()
        rt.policy = Recording(rt.config, N)
        generate(rt, 12, multistep=multistep)
        # calls 0 and 1 precede any update the runtime could read; the policy decides from call 1
        assert [v.multistep for v in views] == [False] + [multistep] * (len(views) - 1)


def test_the_error_controller_holds_a_multistep_sampler_to_a_share_of_the_tolerance():
    cfg = SpecDiffConfig(speculative_steps=0)
    policy = ErrorControlled(cfg, N)
    state = policy.start()
    policy.observe(state, StepView(1, 1.0, (), N), Observation(Decision.full("first"), 1.0, 100, 100))
    policy.observe(state, StepView(2, 0.9, (1.0,), N), Observation(Decision.full(), 0.9, 100, 100, 0.1))
    # rate 1 per unit of sigma: 0.1 predicted at sigma 0.8, between 7/16 of the tolerance and the tolerance
    one_step = StepView(3, 0.8, (1.0, 0.9), N)
    multistep = StepView(3, 0.8, (1.0, 0.9), N, multistep=True)
    assert policy.predict(state, one_step) == pytest.approx(0.1)
    assert policy.tolerance(multistep) == pytest.approx(0.07)
    assert policy.decide(state, one_step).action is Action.SPARSE
    assert policy.decide(state, multistep).action is Action.FULL


def test_checks_stop_after_a_few_updates_the_branch_does_not_explain(monkeypatch):
    """Skip-layer guidance or a per-token rescale: routing matched the update with other columns,
    the branch's own ones tell nothing (``UNKNOWN``); the runtime stops asking after
    FIRST_ORDER_CHECKS and the policy sees a one-step sampler."""
    import specdiff_fx.runtime.core as core

    asked = []
    monkeypatch.setattr(core, "update_order", lambda *a, **k: asked.append(1) or UpdateOrder.UNKNOWN)
    rt = runtime(tolerance=1e-6)  # every call full: every continuation may be checked
    generate(rt, 10, multistep=True)
    state = rt.generation.branches[0].state
    assert len(asked) == state.order_checks == FIRST_ORDER_CHECKS
    assert state.update_order is UpdateOrder.UNKNOWN and state.first_order_updates == 0


def test_a_multistep_generation_restarted_midway_continues_in_one_generation():
    """A generation dropped midway (by routing here, :meth:`Router._retire`; or evicted) starts
    over at its next call. Under a multistep sampler the step after combines that
    call's output with the one before, which the new generation never had: it explained no later
    step, and every call started another generation (every call full). The new generation now
    takes the dropped one's traces: one generation from the restart on. (The combination here
    weighs the older output heavily, ``4 v - 3 v_prev``, so that the newest call alone leaves
    more than routing's 5 % unexplained, as UniPC on the tiny Wan pipeline does; with
    Adams-Bashforth's ``1.5 v - 0.5 v_prev`` on this smooth executor it does not.)"""
    rt = runtime()
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 13)
    prev, ids = None, []
    for i in range(12):
        if i == 5:
            for gen in list(rt.router.generations.values()):
                rt.router._retire(gen)
        v = rt(x, torch.full((B,), float(sigmas[i]) * 1000))[0]
        ids.append(rt.generation.id)
        x = x + float(sigmas[i + 1] - sigmas[i]) * (v if prev is None else 4.0 * v - 3.0 * prev)
        prev = v
    assert len(set(ids[:5])) == 1 and len(set(ids[5:])) == 1 and ids[5] != ids[0], ids
