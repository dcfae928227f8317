"""The controllers' decisions, with a fake error model and with the fake executor.

The fake error model: the relative error of not computing grows at a known rate per unit of
sigma travelled since the last full call. The error-controlled policy must then refresh
every ``tolerance / rate`` of sigma, whatever the step count, the shift or the CFG mode."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from specdiff_fx import SpecDiffConfig, last_generation, schedule
from specdiff_fx.control import Action, Decision, Observation, StepView, make_policy
from specdiff_fx.runtime import SpecDiffRuntime
from specdiff_fx.signature import VariantKind
from test_runtime import B, N, FakeExecutor, fake_plan, generate


def pipeline_sigmas(steps: int, shift: float) -> list[float]:
    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(steps)
    return s.sigmas[:-1].tolist()


def drive(policy, sigmas, rate, ceiling=float("inf"), offset=0.0, members=(1.0,)):
    """Run ``policy`` over ``sigmas`` against the fake error model ``error = min(offset + rate(sigma)
    * (sigma at the last full call - sigma), ceiling)``, observed once per member of a step (the
    calls of one step under true CFG), member ``m``'s error scaled by ``members[m]``. Returns the
    decision of every step (its ``predicted``: the error the policy predicted)."""
    state, out, refresh = policy.start(), [], None
    for i, sigma in enumerate(sigmas):
        view = StepView(step=i, sigma=sigma, sigmas=tuple(sigmas[:i]), num_tokens=N)
        decision = Decision.full("first") if i == 0 else policy.decide(state, view)
        out.append(decision)
        error = None if refresh is None else min(offset + rate(sigma) * (refresh - sigma), ceiling)
        if decision.action is Action.SKIP:  # a call that computes no token measures nothing
            error = None
        for scale in members:
            policy.observe(state, view, Observation(decision, sigma, 1, 1, None if error is None else error * scale))
        if decision.action is Action.FULL:
            refresh = sigma
    return out


def full_sigmas(sigmas, run):
    return [s for s, d in zip(sigmas, run) if d.action is Action.FULL]


def uniform(policy):
    """``policy`` with one tolerance and one interval guard throughout: the tests of the rate
    model's geometry read it in one tolerance (the late phase has a test of its own)."""
    policy.late_factor, policy.late_interval = 1.0, policy.max_interval
    return policy


def tol_at(policy, sigma: float) -> float:
    """The tolerance a one-step sampler's call at ``sigma`` is held to."""
    return policy.tolerance(StepView(step=1, sigma=sigma, sigmas=(sigma + 0.02,), num_tokens=N))  # a short step


def test_sparse_only_while_the_predicted_error_is_within_tolerance():
    tol = 0.1
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=tol, sparse_calls=None), N)
    sigmas = pipeline_sigmas(28, 3.0)
    run = drive(policy, sigmas, lambda s: 1.0)
    assert {d.action for d in run} == {Action.FULL, Action.SPARSE}
    for s, d in list(zip(sigmas, run))[2:]:
        if d.action is Action.SPARSE:
            assert d.predicted <= tol_at(policy, s) and d.k == SpecDiffConfig().num_computed(N)
        elif "predicted" in d.reason:
            assert d.predicted > tol_at(policy, s)


@pytest.mark.parametrize("steps", [20, 28, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_refreshes_follow_sigma_not_the_step_count_or_the_shift(steps, shift):
    """A constant error rate: refreshes every ``tol / rate`` of sigma (give or take one step),
    on any step grid."""
    tol, rate = 0.2, 1.0
    policy = uniform(make_policy(SpecDiffConfig(controller="error", tolerance=tol), N))
    sigmas = pipeline_sigmas(steps, shift)
    fulls = full_sigmas(sigmas, drive(policy, sigmas, lambda s: rate))
    widest = max(a - b for a, b in zip(sigmas, sigmas[1:]))
    gaps = np.diff(fulls) * -1
    assert len(fulls) >= 3
    # the first interval calibrates (no rate yet); the tail shortens as sigma runs out
    for g in gaps[1:]:
        if g < tol / rate - widest:
            assert g == pytest.approx(gaps[-1])  # only the last interval may be short
        assert g <= tol / rate + widest + 1e-6


@pytest.mark.parametrize("limit", [1, 2])
@pytest.mark.parametrize("steps", [20, 50])
def test_sparse_calls_then_skips_until_the_next_full_call(limit, steps):
    """With ``sparse_calls``: at most that many sparse calls (which measure) after each full
    call, skips after them until the next full call, which comes where it comes without the
    limit (the prediction carries on from the rate measured)."""
    tol = 0.2
    sigmas = pipeline_sigmas(steps, 3.0)
    plain = drive(make_policy(SpecDiffConfig(controller="error", tolerance=tol, sparse_calls=None), N), sigmas,
                  lambda s: 1.0)
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=tol, sparse_calls=limit), N)
    assert policy.may_skip() and not make_policy(SpecDiffConfig(controller="error", sparse_calls=None), N).may_skip()
    run = drive(policy, sigmas, lambda s: 1.0)
    assert [d.action is Action.FULL for d in run] == [d.action is Action.FULL for d in plain]
    assert Action.SKIP in {d.action for d in run}
    since = 0
    for s, d in zip(sigmas, run):
        if d.action is Action.FULL:
            since = 0
        elif d.action is Action.SPARSE:
            assert since < limit
            since += 1
        else:
            assert since == limit and d.predicted is not None and d.predicted <= tol_at(policy, s)


@pytest.mark.parametrize("steps", [20, 50])
def test_an_error_that_levels_off_does_not_stretch_the_interval(steps):
    """The sparse calls recompute the most-drifted tokens, so the measured error may level off
    below the tolerance (here at 0.6 of it) instead of growing: the policy predicts with the
    largest rate measured since the last full call, so its intervals stay ``tol / rate`` long
    as with an error that keeps growing, instead of running until the interval guard. (The
    first call after a full one must see the rate: one step's error stays under the level.)"""
    tol, rate = 0.15, 1.0
    policy = uniform(make_policy(SpecDiffConfig(controller="error", tolerance=tol), N))
    sigmas = pipeline_sigmas(steps, 1.0)
    widest = max(a - b for a, b in zip(sigmas, sigmas[1:]))
    assert rate * widest < 0.6 * tol
    growing = full_sigmas(sigmas, drive(policy, sigmas, lambda s: rate))
    levelled = full_sigmas(sigmas, drive(policy, sigmas, lambda s: rate, ceiling=0.6 * tol))
    assert levelled == growing
    assert max(np.diff(levelled) * -1) <= tol / rate + widest + 1e-6 < policy.max_interval


@pytest.mark.parametrize("limit", [1, 2, None])
def test_the_calls_of_one_step_count_once_and_pool_their_errors(limit):
    """Under true CFG a step has two calls (cond, uncond) sharing one controller state: they
    count as one step against ``sparse_calls`` and their errors pool as a batch's do (root mean
    square), on full calls as on sparse ones: the decisions are those of one call with the
    pooled error, whichever call comes first."""
    sigmas = pipeline_sigmas(28, 3.0)

    def run(members):
        policy = make_policy(SpecDiffConfig(controller="error", tolerance=0.15, sparse_calls=limit), N)
        return drive(policy, sigmas, lambda s: 0.8 if s > 0.5 else 1.2, offset=0.01, members=members)

    one = run((((1.0 + 1.5 ** 2) / 2) ** 0.5,))
    for members in ((1.0, 1.5), (1.5, 1.0)):
        two = run(members)
        assert [d.action for d in two] == [d.action for d in one]
        assert [d.predicted for d in two] == pytest.approx([d.predicted for d in one])
    assert [d.action for d in run((1.0,))] != [d.action for d in one]
    if limit == 2:
        assert "sparse, sparse, skip" in ", ".join(d.action.value for d in one)


def test_the_first_cached_call_is_predicted_at_the_short_range_rate():
    """An error that starts with an offset after each full call (``0.03 + 0.5 * travelled``):
    the full call's rate over the whole interval it ends underestimates a first cached call's
    error; the rate the last first cached call measured, over a similar short distance, does
    not (the steps grow along the schedule)."""
    offset, rate = 0.03, 0.5
    sigmas = pipeline_sigmas(28, 3.0)
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=0.15), N)
    run = drive(policy, sigmas, lambda s: rate, offset=offset)
    firsts, interval_rate = [], None
    refresh = None
    for i, (s, d) in enumerate(zip(sigmas[:-1], run)):  # not the tiny last call (its error weighs little)
        if d.action is Action.FULL:
            if refresh is not None:
                interval_rate = (offset + rate * (refresh - s)) / (refresh - s)
            refresh = s
        elif run[i - 1].action is Action.FULL and interval_rate is not None:
            firsts.append((d.predicted, offset + rate * (refresh - s), interval_rate * (refresh - s)))
    assert len(firsts) >= 3
    later = firsts[1:]  # the first interval's first cached call has no earlier one to learn from
    assert all(pred >= true - 1e-9 for pred, true, _ in later)
    assert all(average < true for _, true, average in later)  # what the interval's rate alone predicts


def test_full_where_the_error_demands_it():
    """The error rate jumps at sigma 0.5: the policy refreshes much more often below it."""
    policy = uniform(make_policy(SpecDiffConfig(controller="error", tolerance=0.1), N))
    sigmas = pipeline_sigmas(50, 1.0)
    fulls = full_sigmas(sigmas, drive(policy, sigmas, lambda s: 0.2 if s > 0.5 else 2.0))
    above = sum(s > 0.5 for s in fulls)
    below = sum(s <= 0.5 for s in fulls)
    assert below >= 3 * max(above - 1, 1)


@pytest.mark.parametrize("steps", [8, 50])
def test_a_steep_rate_at_high_noise_is_left_to_the_prediction(steps):
    """No guard of its own for the first calls at high noise, where the error grows fastest:
    with a steep rate there, the prediction makes every call full where the steps are long
    (8 steps) and caches those whose short steps keep it within the tolerance (50 steps)."""
    policy = make_policy(SpecDiffConfig(controller="error"), N)
    tol, steep = policy.config.tolerance, 12.0
    sigmas = pipeline_sigmas(steps, 3.0)
    run = drive(policy, sigmas, lambda s: steep if s > 0.8 else 0.01)
    early = [(s, d) for s, d in zip(sigmas, run) if s > 0.8]
    for _, d in early:
        if d.action is not Action.FULL:
            assert d.predicted is not None and d.predicted <= tol
        elif d.predicted is not None:
            assert d.predicted > tol and "predicted" in d.reason
    cached = [d for _, d in early if d.action is not Action.FULL]
    if steps == 8:
        assert not cached
    else:
        assert len(cached) >= 3


def test_interval_guard_weighs_a_short_last_step_like_the_prediction():
    """The guard forces a full call after ``max_interval`` of sigma, except on a last step that
    moves the latent by less than the step before it (its error weighs ``sigma / gap``)."""
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=10.0), N)
    interval = policy.max_interval
    state = policy.start()
    state.refresh_sigma, state.rate = 0.9, 0.01
    mid = StepView(step=5, sigma=0.9 - interval, sigmas=(0.9, 0.9 - interval + 0.05), num_tokens=N)
    assert policy.decide(state, mid).action is Action.FULL
    state.refresh_sigma = 0.5  # the late phase: the guard allows late_interval (0.35)
    last = StepView(step=5, sigma=0.02, sigmas=(0.5, 0.2), num_tokens=N)  # 0.48 travelled, gap 0.18
    assert policy.decide(state, last).action is Action.SPARSE
    wide = StepView(step=5, sigma=0.1, sigmas=(0.5, 0.2), num_tokens=N)  # weight 1: the guard holds
    assert policy.decide(state, wide).action is Action.FULL


def test_the_late_phase_doubles_the_tolerance_and_lengthens_the_interval_guard():
    """Below ``late_sigma`` (0.5) a one-step sampler's call is held to twice the tolerance and the
    interval guard allows 0.35 of sigma; a multistep or a second-order sampler's call keeps one
    tolerance and the 0.25 guard throughout (the late phase was measured on Euler only)."""
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=0.1), N)

    def view(sigma, refresh, **kw):
        return StepView(step=5, sigma=sigma, sigmas=(refresh, sigma + 0.02), num_tokens=N, **kw)

    assert policy.tolerance(view(0.7, 0.9)) == pytest.approx(0.1)
    assert policy.tolerance(view(0.3, 0.5)) == pytest.approx(0.2)
    assert policy.tolerance(view(0.3, 0.5, multistep=True)) == pytest.approx(0.1 * policy.multistep_share)
    assert policy.tolerance(view(0.3, 0.5, until=0.25)) == pytest.approx(0.1)
    state = policy.start()
    state.rate, state.refresh_sigma = 3.0, 0.54  # predicted 3 * 0.04 = 0.12: over 0.1, under 0.2
    assert policy.decide(state, view(0.5, 0.54)).action is Action.FULL  # sigma 0.5: not late yet
    state.refresh_sigma = 0.34
    assert policy.decide(state, view(0.3, 0.34)).action is Action.SPARSE
    assert policy.decide(state, view(0.3, 0.34, multistep=True)).action is Action.FULL
    state.rate, state.refresh_sigma = 0.01, 0.6  # only the guards decide
    assert policy.decide(state, view(0.3, 0.6)).action is not Action.FULL  # 0.3 travelled < 0.35
    full = policy.decide(state, view(0.24, 0.6))
    assert full.action is Action.FULL and "0.35 of sigma" in full.reason
    full = policy.decide(state, view(0.3, 0.6, until=0.28))  # Heun's step: the 0.25 guard
    assert full.action is Action.FULL and "0.25 of sigma" in full.reason


def flux_sigmas(steps: int, tokens: int) -> list[float]:
    """FluxPipeline's schedule: ``linspace(1, 1/n, n)`` with the dynamic shift for ``tokens``."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                        base_image_seq_len=256, max_image_seq_len=4096)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(tokens, 256, 4096, 0.5, 1.15))
    return s.sigmas[:-1].tolist()


@pytest.mark.parametrize("kind", ["sd3", "flux256", "flux4096"])
@pytest.mark.parametrize("steps", [4, 8, 20, 50])
def test_the_final_jump_is_full(kind, steps):
    """The call whose step takes the latent to (about) zero is full whatever the tolerance: on
    SD3's schedule the one before the tiny last call (which stays cached), on FLUX's the last."""
    sigmas = pipeline_sigmas(steps, 3.0) if kind == "sd3" else flux_sigmas(steps, int(kind[4:]))
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=10.0), N)
    run = drive(policy, sigmas, lambda s: 0.01)
    jump = len(sigmas) - (2 if kind == "sd3" else 1)
    assert run[jump].action is Action.FULL and "final jump" in run[jump].reason
    assert all("final jump" not in d.reason for i, d in enumerate(run) if i != jump)
    if kind == "sd3":
        assert run[-1].action is not Action.FULL  # sigma 0.009 after a jump of 0.1 or more, weight < 10
    if steps >= 8:
        assert any(d.action is not Action.FULL for d in run[:jump])


@pytest.mark.parametrize("steps", [8, 20, 28, 50])
def test_the_short_last_call_after_the_final_jump_is_predicted_at_its_weight(steps):
    """SD3's schedule ends in a jump to sigma 0.009 and a call there. Its reused output is the jump's
    and errs by about the whole output, whatever the rate measured before the jump: the call is
    predicted at its step's weight (``sigma / gap``), held to the tolerance itself (not the late
    phase's twice the tolerance), so it is full exactly when the tolerance lies below its weight.
    FLUX's schedules end at the final jump: nothing after it."""
    sigmas = pipeline_sigmas(steps, 3.0)
    weight = sigmas[-1] / (sigmas[-2] - sigmas[-1])
    assert 0.02 < weight < 0.5
    for tol in (weight * 0.8, weight * 1.25, 0.16):
        policy = make_policy(SpecDiffConfig(controller="error", tolerance=tol), N)
        run = drive(policy, sigmas, lambda s: 0.01)  # a slow rate: it would predict about 0.001
        assert run[-1].predicted == pytest.approx(weight)
        assert (run[-1].action is Action.FULL) == (tol < weight)
    view = StepView(step=steps - 1, sigma=sigmas[-1], sigmas=tuple(sigmas[:-1]), num_tokens=N)
    assert policy.after_final_jump(view) and not policy.final_jump(view) and not policy.late(view)
    assert policy.tolerance(view) == pytest.approx(0.16)
    for s in (flux_sigmas(steps, 256), flux_sigmas(steps, 4096)):
        views = [StepView(step=i, sigma=x, sigmas=tuple(s[:i]), num_tokens=N) for i, x in enumerate(s)]
        assert not any(policy.after_final_jump(v) for v in views)


def test_tolerance_trades_full_calls_monotonically():
    sigmas = pipeline_sigmas(28, 3.0)
    counts = []
    for tol in (0.02, 0.05, 0.1, 0.2, 0.5):
        policy = make_policy(SpecDiffConfig(controller="error", tolerance=tol), N)
        counts.append(len(full_sigmas(sigmas, drive(policy, sigmas, lambda s: 1.0))))
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]


def test_choose_tokens_draws_probes_outside_the_top_scores():
    score = torch.rand(4, 50, generator=torch.Generator().manual_seed(0))
    idx, probe = schedule.choose_tokens(score, 12, 3, seed=5)
    top = torch.topk(score, 9, dim=1).indices
    assert idx.shape == (4, 12) and probe.shape == (4, 3)
    assert torch.equal(idx, idx.sort(dim=1).values)
    for b in range(4):
        assert set(top[b].tolist()) | set(probe[b].tolist()) == set(idx[b].tolist())
        assert not set(top[b].tolist()) & set(probe[b].tolist())
    again, _ = schedule.choose_tokens(score, 12, 3, seed=5)
    other, _ = schedule.choose_tokens(score, 12, 3, seed=6)
    assert torch.equal(idx, again) and not torch.equal(idx, other)
    same = score[:2].repeat(2, 1)  # two CFG halves of two images
    idx_g, _ = schedule.choose_tokens(same, 12, 3, seed=5, groups=torch.tensor([0, 1, 0, 1]))
    assert torch.equal(idx_g[:2], idx_g[2:])
    none, no_probe = schedule.choose_tokens(score, 12, 0)
    assert no_probe.shape == (4, 0) and torch.equal(none, torch.topk(score, 12, dim=1).indices.sort(dim=1).values)


class Recording:
    """Wraps a policy and keeps what it was told."""

    def __init__(self, policy):
        self.policy, self.seen = policy, []

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def observe(self, state, view, obs):
        self.seen.append(obs)
        self.policy.observe(state, view, obs)


@pytest.mark.parametrize("branches", [1, 2])  # 2: true CFG, two calls per step pooling their errors
def test_errors_read_back_a_call_later_give_the_same_decisions(branches, monkeypatch):
    """The runtime does not read a call's measured error right after its variant (on a GPU that
    waits for the whole call): the policy observes it at the generation's next call, before
    deciding. The decisions and the telemetry equal those of reading it at once."""
    from specdiff_fx.runtime.ranks import SingleProcess

    def run():
        cfg = SpecDiffConfig(controller="error", tolerance=0.2, speculative_steps=0)
        policy = Recording(make_policy(cfg, N))
        rt = SpecDiffRuntime(fake_plan(conditioned=True), cfg, FakeExecutor(), policy=policy)
        generate(rt, 24, branches=branches)
        rep = last_generation()
        return [(s.kind, s.measured, s.predicted) for s in rep.steps], policy.seen, rt

    deferred, seen, rt = run()
    assert any(isinstance(o.prediction_error, torch.Tensor) for _, _, o, _ in rt.generation.pending) or \
        deferred[-1][1] is None  # the last call's error is still on its way (unless it measured none)
    original = SingleProcess.relative_error
    monkeypatch.setattr(SingleProcess, "relative_error", lambda self, e, n, read=True: original(self, e, n))
    at_once, seen_at_once, rt_at_once = run()
    assert rt_at_once.generation.pending == []
    assert deferred == at_once
    assert {k for k, _, _ in deferred} >= {"full", "cached", "skipped"}
    assert [(o.decision, o.prediction_error) for o in seen] == \
        [(o.decision, o.prediction_error) for o in seen_at_once[:len(seen)]]


def test_runtime_measures_the_error_of_caching_for_the_policy():
    cfg = SpecDiffConfig(controller="error", tolerance=0.3, speculative_steps=0)
    policy = Recording(make_policy(cfg, N))
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), cfg, ex, policy=policy)
    generate(rt, 20)
    kinds = [o.decision.action for o in policy.seen]
    assert Action.SPARSE in kinds and kinds[0] is Action.FULL
    assert policy.seen[0].prediction_error is None  # nothing to compare the first call with
    for o in policy.seen[1:]:  # full and sparse calls measure; a skipped call computes nothing to measure with
        measured = o.prediction_error is not None and o.prediction_error >= 0
        assert measured if o.decision.action is not Action.SKIP else o.prediction_error is None
    # the telemetry carries each call's prediction and measurement; a measured call reaches the
    # policy at the generation's next call (its error is read back then), so the last one is
    # still pending when the generation ends
    steps = last_generation().main_steps
    pending = rt.generation.pending
    assert len(policy.seen) + len(pending) == len(steps) and len(pending) <= 1
    observed = policy.seen + [o for _, _, o, _ in pending]
    assert [s.measured for s in steps] == [None if o.prediction_error is None else float(o.prediction_error)
                                          for o in observed]
    assert [s.predicted for s in steps] == [o.decision.predicted for o in observed]
    assert all(isinstance(o.prediction_error, (float, type(None))) for o in policy.seen)  # the policy reads floats
    assert any(s.predicted is not None for s in steps[1:])
    assert "measured error" in last_generation().summary()
    # sparse calls computed probes: tokens beyond the top scores
    sparse = [c for c in ex.calls if c[0] == "sparse"]
    k = cfg.num_computed(N)
    assert sparse and all(c[2].shape == (B, k) for c in sparse)


def test_a_low_cache_ratio_measures_the_defaults_set():
    """Below the default ``cache_ratio`` a sparse call computes more tokens, but the skipped
    calls after it reuse them all: the error of caching is measured over the tokens the
    default's top-scored ones leave out, never over fewer. (Over the tokens a sparse call left
    out it read 0 near ``cache_ratio=0``: the controller then skipped calls it should have
    computed, and a lower ``cache_ratio`` gave worse images.)"""
    default_k = SpecDiffConfig().num_computed(N)
    for ratio in (0.95, 0.9):  # at the default and above: the tokens a sparse call leaves out, as before
        assert SpecDiffConfig(cache_ratio=ratio).num_unmeasured(N) == SpecDiffConfig(cache_ratio=ratio).num_computed(N)
    cfg = SpecDiffConfig(controller="error", tolerance=0.3, cache_ratio=1e-6)
    assert cfg.num_computed(N) == N and cfg.num_unmeasured(N) == default_k
    policy = Recording(make_policy(cfg, N))
    rt = SpecDiffRuntime(fake_plan(), cfg, FakeExecutor(), policy=policy)
    generate(rt, 20)
    measured = [(o.decision.action, float(o.prediction_error)) for o in policy.seen[1:]
                if o.prediction_error is not None]
    assert {a for a, _ in measured} >= {Action.FULL, Action.SPARSE}
    assert all(e > 0 for _, e in measured), measured


def test_runtime_skip_calls():
    """``sparse_calls=1`` through the runtime: skip calls run the skip variant (prepared with
    the others), only after a sparse call or a skip, measure nothing, carry the controller's
    prediction and are reported as skipped; the sparse calls' probes still measure."""
    cfg = SpecDiffConfig(controller="error", tolerance=0.3, sparse_calls=1)
    policy = Recording(make_policy(cfg, N))
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), cfg, ex, policy=policy)
    generate(rt, 20)
    kinds = [c[0] for c in ex.calls]
    assert "skip" in kinds and "sparse" in kinds
    assert any(key.kind is VariantKind.SKIP for key in ex.prepared)
    for a, b in zip(kinds, kinds[1:]):  # a skip follows a sparse call or a skip, never a full call
        if b == "skip":
            assert a in ("sparse", "skip")
    seen = [(o.decision.action, o.prediction_error) for o in policy.seen]
    assert all(err is None for action, err in seen if action is Action.SKIP)
    assert all(err is not None for action, err in seen[1:] if action is Action.SPARSE)
    steps = last_generation().main_steps
    assert [s.kind for s in steps].count("skipped") == kinds.count("skip")
    assert all(s.predicted is not None for s in steps if s.kind == "skipped")


def test_attention_score_survives_skipped_calls():
    """``score="attention"`` under the error controller: a skipped call computes no attention
    (its variant returns no score), so the attention each token received is the last computed
    one's; the full call after skipped calls ranks the tokens by it to measure the error of
    caching (it used to find no score there and raise)."""
    cfg = SpecDiffConfig(controller="error", tolerance=0.3, sparse_calls=1, score="attention")
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    generate(rt, 20)
    kinds = [c[0] for c in ex.calls]
    after_skip = [b for a, b in zip(kinds, kinds[1:]) if a == "skip"]
    assert "full" in after_skip and "sparse" in kinds
    assert rt.generation.branches[0].state.his is not None


def test_error_controller_tolerance_sets_the_compute():
    flops = []
    for tol in (0.01, 0.3, 5.0):
        cfg = SpecDiffConfig(controller="error", tolerance=tol, speculative_steps=0)
        rt = SpecDiffRuntime(fake_plan(), cfg, FakeExecutor())
        generate(rt, 20)
        flops.append(last_generation().flops_fraction)
    assert flops[0] == pytest.approx(1.0) and flops[0] > flops[1] >= flops[2]


def test_true_cfg_branches_share_one_plan():
    """Two calls per step (cond, uncond) that move together: one decision per step for both."""
    cfg = SpecDiffConfig(controller="error", tolerance=0.3, speculative_steps=0)
    rt = SpecDiffRuntime(fake_plan(conditioned=True), cfg, FakeExecutor())
    generate(rt, 16, branches=2)
    rep = last_generation()
    by_step = {}
    for st in rep.main_steps:
        by_step.setdefault(st.step, {})[st.branch] = st.kind
    assert set(len(v) for v in by_step.values()) == {2}
    assert all(v[0] == v[1] for v in by_step.values())
    assert {"full", "cached"} <= {k for v in by_step.values() for k in v.values()}


def test_a_first_cached_call_rate_holds_for_the_next_interval_only():
    """The rate a first sparse call measured predicts the first cached call of the next interval
    only: an interval that ends without a sparse call leaves none for the one after (else a
    steep rate measured early keeps every later call full)."""
    policy = make_policy(SpecDiffConfig(controller="error", tolerance=10.0), N)
    state = policy.start()

    def step(sigma, action, error):
        policy.observe(state, StepView(step=0, sigma=sigma, sigmas=(), num_tokens=N),
                       Observation(Decision(action, k=4 if action is Action.SPARSE else None), sigma, 1, 1, error))

    def predicted(sigma):
        return policy.decide(state, StepView(step=9, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=N)).predicted

    step(1.0, Action.FULL, None)
    step(0.98, Action.FULL, 0.02)  # rate 1
    step(0.96, Action.SPARSE, 0.1)  # over a short distance: rate 5
    step(0.94, Action.FULL, 0.08)  # the interval's rate: 2
    assert predicted(0.92) == pytest.approx(5 * 0.02)  # the short-range rate
    step(0.92, Action.FULL, 0.01)  # an interval without a sparse call: rate 0.5
    assert predicted(0.90) == pytest.approx(0.5 * 0.02)


def test_true_cfg_steps_count_once_against_sparse_calls():
    """``sparse_calls=2`` with two calls a step (cond, uncond): two sparse steps after each full
    step, as with one call a step (each call once counted a step)."""
    for branches in (1, 2):
        cfg = SpecDiffConfig(controller="error", tolerance=0.3, sparse_calls=2, speculative_steps=0)
        generate(SpecDiffRuntime(fake_plan(conditioned=True), cfg, FakeExecutor()), 30, branches=branches)
        kinds = "".join(st.kind[0] for st in last_generation().main_steps if st.branch == 0)
        assert "fccs" in kinds and "fcs" not in kinds, (branches, kinds)
