"""The controller variants of ``benchmarks/controller_variants.py`` decide as documented (fake
drift, no model), so the experiments in BENCHMARKS.md stay reproducible."""

from __future__ import annotations

import pytest
import torch

from benchmarks import controller_variants
from specdiff_fx import SpecDiffConfig
from specdiff_fx.control import Action, Decision, Observation, StepView, make_policy


def _policy(name: str, n: int = 100):
    controller_variants.register()
    return make_policy(SpecDiffConfig(controller=name, tolerance=0.1), n)


def _view(sigma: float, drift: torch.Tensor) -> StepView:
    return StepView(step=3, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=drift.shape[-1],
                    drift=lambda: drift)


def test_ladder_tries_a_larger_k_before_a_full_call():
    policy = _policy("error_ladder")
    assert policy.token_counts() == (10, 25, 50)
    drift = torch.zeros(1, 100)
    drift[0, :20] = 1.0  # the error sits in 20 tokens: computing 25 leaves none of it out
    drift[0, 20:] = 0.01
    state = policy.start()
    state.refresh_sigma, state.rate = 0.95, 0.5
    view = _view(0.85, drift)
    policy.decide(state, view)
    # calibrate: the k=10 call measured an error of 0.2 for its left-out drift mass
    policy.observe(state, view, Observation(Decision.sparse(10), 0.85, 1, 1, 0.2))
    decision = policy.decide(state, _view(0.84, drift))
    assert decision.action is Action.SPARSE and decision.k == 25
    flat = torch.ones(1, 100)  # the error everywhere: no k brings it under the tolerance
    state.calibration = 1.0
    assert policy.decide(state, _view(0.83, flat)).action is Action.FULL


def test_ladder_k1_uses_the_smallest_k_only():
    policy = _policy("error_ladder_k1")
    assert policy.token_counts() == (10,)


def test_calibrated_scales_the_next_predictions_by_the_last_full_call():
    policy = _policy("error_calibrated")
    drift = torch.ones(1, 100)
    state = policy.start()
    state.refresh_sigma, state.rate, state.peak = 0.95, 1.0, 1.0  # sparse calls since the refresh at 0.95
    view = _view(0.80, drift)
    full = policy.decide(state, view)  # predicts 0.15 > 0.1
    assert full.action is Action.FULL and full.predicted == pytest.approx(0.15)
    policy.observe(state, view, Observation(full, 0.80, 1, 1, 0.06))  # the full call measured 0.06
    assert state.calibration == pytest.approx(max(0.4, policy.bounds[0]))  # measured / predicted, clipped
    state.rate = 1.0  # a sparse call measured the old rate again
    d = policy.decide(state, _view(0.65, drift))  # uncalibrated 0.15
    assert d.action is Action.SPARSE and d.predicted == pytest.approx(0.15 * state.calibration)


def test_near_full_refresh_replaces_full_calls_after_sparse_ones():
    policy = _policy("error_refresh75")
    assert policy.token_counts() == (10, 75)
    assert policy.probes(75) == round(0.25 * 25)
    drift = torch.ones(1, 100)
    state = policy.start()
    state.refresh_sigma, state.rate, state.peak = 0.95, 1.0, 1.0
    view = _view(0.80, drift)
    d = policy.decide(state, view)
    assert d.action is Action.SPARSE and d.k == 75 and d.reason.startswith("refresh")
    policy.observe(state, view, Observation(d, 0.80, 1, 1, 0.01))
    assert (state.refresh_sigma, state.rate, state.peak) == (0.80, 1.0, None)  # an interval starts
    fresh = policy.start()  # no sparse call yet in the interval: a full decision stays full
    fresh.refresh_sigma, fresh.rate = 0.95, 20.0  # predicted 0.2 > tolerance 0.1
    assert policy.decide(fresh, _view(0.94, drift)).action is Action.FULL


def test_probe_floor_adds_probes_on_top_of_the_top_scored_tokens():
    policy = _policy("error_probes16", n=256)  # k = 26 of which 6 probes by default: 20 top-scored
    assert policy.token_counts() == (36,) and policy.probes(36) == 16  # still 20 top-scored
    state = policy.start()
    state.refresh_sigma, state.rate = 0.95, 0.1
    d = policy.decide(state, _view(0.90, torch.ones(1, 256)))
    assert d.action is Action.SPARSE and d.k == 36
    large = _policy("error_probes16", n=1024)  # k = 102 has 26 probes already
    assert large.token_counts() == (102,) and large.probes(102) == 26


def _run(policy, sigmas, rate=1.0):
    """Decisions over ``sigmas`` against an error growing at ``rate`` per unit of sigma since the
    last full call (measured on full and sparse calls; a skip measures nothing)."""
    state, out, refresh = policy.start(), [], None
    for i, sigma in enumerate(sigmas):
        view = StepView(step=i, sigma=sigma, sigmas=tuple(sigmas[:i]), num_tokens=100)
        decision = Decision.full("first") if i == 0 else policy.decide(state, view)
        out.append(decision.action)
        error = None if refresh is None or decision.action is Action.SKIP else rate * (refresh - sigma)
        policy.observe(state, view, Observation(decision, sigma, 1, 1, error))
        if decision.action is Action.FULL:
            refresh = sigma
    return out


SIGMAS = [1.0 - i / 40 for i in range(40)]


def test_alternate_skips_every_other_cached_call():
    policy = _policy("error_alternate")
    run = _run(policy, SIGMAS)
    assert policy.may_skip() and Action.SKIP in run and Action.SPARSE in run
    for before, after in zip(run, run[1:]):
        if after is Action.SKIP:
            assert before is Action.SPARSE  # never two skips in a row, never one after a full call
        if before is Action.SPARSE and after is not Action.FULL:
            assert after is Action.SKIP


def test_skip_only_computes_no_token_between_full_calls():
    policy = _policy("error_skip_only")
    run = _run(policy, SIGMAS)
    assert set(run) == {Action.FULL, Action.SKIP}


@pytest.mark.parametrize("name", ["error_latest_rate", "error_calibrated", "error_refresh75", "error_probes16"])
def test_variants_measured_before_sparse_calls_keep_every_cached_call_sparse(name):
    policy = _policy(name)
    assert not policy.may_skip() and Action.SKIP not in _run(policy, SIGMAS)


def test_phases_shape_the_tolerance_and_the_interval_guard_by_sigma():
    policy = _policy("error_phases")
    tol = policy.config.tolerance
    views = {s: StepView(step=3, sigma=s, sigmas=(1.0, s + 0.02), num_tokens=100) for s in (0.95, 0.7, 0.3)}
    assert [policy.tolerance(v) for v in views.values()] == pytest.approx([1.5 * tol, tol, 2 * tol])
    state = policy.start()
    state.rate = 0.01  # a prediction far under every tolerance: only the guards decide
    state.refresh_sigma = 0.9
    full = policy.decide(state, StepView(step=3, sigma=0.64, sigmas=(0.9, 0.66), num_tokens=100))
    assert full.action is Action.FULL and "0.25 of sigma" in full.reason
    state.refresh_sigma = 0.6  # below sigma 0.5 the interval guard allows 0.35, not 0.25
    assert policy.decide(state, StepView(step=3, sigma=0.32, sigmas=(0.6, 0.34), num_tokens=100)).action is Action.SPARSE
    full = policy.decide(state, StepView(step=3, sigma=0.24, sigmas=(0.6, 0.26), num_tokens=100))
    assert full.action is Action.FULL and "0.35 of sigma" in full.reason
    state.rate = 3.0  # predicted 3 * 0.04 = 0.12: over the tolerance (0.1) at 0.7, under twice it at 0.3
    state.refresh_sigma = 0.74
    assert policy.decide(state, StepView(step=3, sigma=0.7, sigmas=(0.74, 0.72), num_tokens=100)).action is Action.FULL
    state.refresh_sigma = 0.34
    assert policy.decide(state, StepView(step=3, sigma=0.3, sigmas=(0.34, 0.32), num_tokens=100)).action is Action.SPARSE


def test_uniform_is_the_controller_before_the_late_phase_and_late_is_the_library():
    uniform, late, library = _policy("error_uniform"), _policy("error_late"), _policy("error")
    tol = library.config.tolerance
    for sigma in (0.95, 0.7, 0.3):
        view = StepView(step=3, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=100)
        assert uniform.tolerance(view) == pytest.approx(tol)
        assert uniform.interval(view) == pytest.approx(0.25)
        assert late.tolerance(view) == library.tolerance(view) and late.interval(view) == library.interval(view)
    assert _run(late, SIGMAS) == _run(library, SIGMAS) and _run(late, SIGMAS, rate=10.0) == _run(library, SIGMAS, rate=10.0)
    # sparing the call before the final jump differs from the library only at that call (sigma 0.05)
    spared = _run(_policy("error_before_final"), SIGMAS, rate=10.0)
    differ = [i for i, (a, b) in enumerate(zip(spared, _run(library, SIGMAS, rate=10.0))) if a != b]
    assert differ == [len(SIGMAS) - 2]


def test_band_and_early_variants_change_only_their_own_stretch_of_sigma():
    library, guard = _policy("error"), _policy("error_band_guard")
    band, early = _policy("error_band_tolerance"), _policy("error_early_tight")
    tol = library.config.tolerance
    for sigma, band_f, early_f, interval in ((0.95, 1.0, 0.5, 0.12), (0.7, 0.6, 1.0, 0.12), (0.3, 1.0, 1.0, 0.35)):
        view = StepView(step=3, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=100)
        assert band.tolerance(view) == pytest.approx(band_f * library.tolerance(view))
        assert early.tolerance(view) == pytest.approx(early_f * library.tolerance(view))
        assert guard.interval(view) == pytest.approx(interval) and guard.tolerance(view) == library.tolerance(view)
    assert library.tolerance(StepView(step=3, sigma=0.3, sigmas=(1.0, 0.32), num_tokens=100)) == pytest.approx(2 * tol)
    state = guard.start()
    state.rate, state.refresh_sigma = 0.01, 0.9  # only the guards decide
    full = guard.decide(state, StepView(step=3, sigma=0.77, sigmas=(0.9, 0.79), num_tokens=100))
    assert full.action is Action.FULL and "0.12 of sigma" in full.reason
    assert library.decide(state, StepView(step=3, sigma=0.77, sigmas=(0.9, 0.79), num_tokens=100)).action is Action.SPARSE


def test_late06_starts_the_late_phase_at_sigma_0_6():
    library, late06 = _policy("error"), _policy("error_late06")
    for sigma, late in ((0.65, False), (0.58, True), (0.45, True)):
        view = StepView(step=3, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=100)
        assert late06.late(view) is late and library.late(view) is (sigma < 0.5)
        assert late06.interval(view) == pytest.approx(0.35 if late else 0.25)


def test_before_final_keeps_the_call_before_the_final_jump_off_full():
    """FLUX's 20-step tail (sigma 0.292, 0.225, 0.155, 0.080): at 0.155 the next call is the final
    jump, so neither a large predicted error nor the interval guard makes it full; earlier in the
    tail, and outside the late phase, it decides as the library (``error_late``)."""
    library, variant = _policy("error_late"), _policy("error_before_final")
    tail = (1.0, 0.6, 0.52, 0.47, 0.414, 0.355, 0.292, 0.225)
    view = StepView(step=8, sigma=0.155, sigmas=tail, num_tokens=100)
    assert variant.next_is_final(view) and not variant.final_jump(view)
    earlier = StepView(step=7, sigma=0.225, sigmas=tail[:-1], num_tokens=100)
    assert not variant.next_is_final(earlier)
    for policy in (library, variant):
        state = policy.start()
        state.refresh_sigma, state.rate, state.sparse_since = 0.52, 1.0, 1  # 0.37 of sigma since, error 0.37 predicted
        expected = Action.FULL if policy is library else Action.SKIP
        assert policy.decide(state, view).action is expected
        assert policy.decide(state, earlier).action is Action.FULL  # the prediction, 0.295 > 0.2
    final = StepView(step=9, sigma=0.080, sigmas=tail + (0.155,), num_tokens=100)
    state = variant.start()
    state.refresh_sigma, state.rate = 0.155, 0.1
    assert variant.decide(state, final).action is Action.FULL  # the final jump itself
    early = StepView(step=3, sigma=0.7, sigmas=(1.0, 0.9, 0.8), num_tokens=100)
    state = variant.start()
    state.refresh_sigma, state.rate = 0.9, 1.0
    assert variant.decide(state, early) == library.decide(state, early)


def test_late_guard_keeps_the_tolerance_and_lengthens_the_late_guard():
    library, guard = _policy("error"), _policy("error_late_guard")
    tol = library.config.tolerance
    for sigma, interval in ((0.7, 0.25), (0.3, 0.35)):
        view = StepView(step=3, sigma=sigma, sigmas=(1.0, sigma + 0.02), num_tokens=100)
        assert guard.tolerance(view) == pytest.approx(tol)
        assert guard.interval(view) == pytest.approx(interval) == library.interval(view)
    assert library.tolerance(StepView(step=3, sigma=0.3, sigmas=(1.0, 0.32), num_tokens=100)) == pytest.approx(2 * tol)


def _pipeline_sigmas(kind: str, steps: int) -> list[float]:
    """The sigmas of the protocol's SD3 (``"sd3"``, shift 3) or FLUX (``"flux<tokens>"``, dynamic
    shift) schedule at ``steps``, without the trailing zero."""
    from benchmarks import protocol

    if kind == "sd3":
        scheduler = protocol.sd3_scheduler("euler")
        scheduler.set_timesteps(steps)
    else:
        scheduler, _ = protocol.flux_timesteps(steps, int(kind[4:]))
    return scheduler.sigmas[:-1].tolist()


@pytest.mark.parametrize("kind", ["sd3", "flux256", "flux1024"])
@pytest.mark.parametrize("steps", [8, 12, 20, 28, 50])
def test_the_call_before_the_final_jump_is_found_on_the_pipelines_schedules(kind, steps):
    variant = _policy("error_before_final")
    sigmas = _pipeline_sigmas(kind, steps)
    views = [StepView(step=i, sigma=s, sigmas=tuple(sigmas[:i]), num_tokens=100) for i, s in enumerate(sigmas)][1:]
    jumps = [v.step for v in views if variant.final_jump(v)]
    before = [v.step for v in views if variant.next_is_final(v)]
    assert len(jumps) == 1 and before == [jumps[0] - 1]


@pytest.mark.parametrize("kind", ["sd3", "flux1024"])
def test_the_call_before_the_final_jump_is_spared_the_guard_and_held_to_twice_the_late_tolerance(kind):
    """``error_before_final``: in the late phase the call right before the final jump is not made
    full by the interval guard, and by the prediction only above twice the late tolerance; the call
    before it, and the library's controller, decide by the guard and the late tolerance."""
    sigmas = _pipeline_sigmas(kind, 20)
    jump = len(sigmas) - (2 if kind == "sd3" else 1)
    before = jump - 1

    def view(i):
        return StepView(step=i, sigma=sigmas[i], sigmas=tuple(sigmas[:i]), num_tokens=100)

    def decide(i, refresh, rate, name="error_before_final", tol=0.1):
        policy = make_policy(SpecDiffConfig(controller=name, tolerance=tol), 100)
        state = policy.start()
        state.refresh_sigma, state.rate, state.sparse_since = refresh, rate, 1
        return policy.decide(state, view(i))

    library, variant = _policy("error"), _policy("error_before_final")
    assert not hasattr(library, "before_final")  # the library spares no call
    assert library.tolerance(view(before)) == pytest.approx(0.2)
    assert [i for i in range(1, len(sigmas)) if variant.before_final(view(i))] == [before]
    assert variant.tolerance(view(before)) == pytest.approx(0.4) and variant.tolerance(view(before - 1)) == pytest.approx(0.2)
    far = sigmas[before] + 0.4  # past the late interval guard's 0.35 of sigma
    guarded = decide(before, far, 0.01, name="error")
    assert guarded.action is Action.FULL and "of sigma since" in guarded.reason
    spared = decide(before, far, 0.01)
    assert spared.action is Action.SKIP and "full call follows" in spared.reason
    assert decide(before - 1, sigmas[before - 1] + 0.4, 0.01).action is Action.FULL  # the guard, one call earlier
    rate = 0.3 / (far - sigmas[before])  # predicted 0.3: over the late tolerance 0.2, under 0.4
    assert decide(before, far, rate, name="error").action is Action.FULL
    assert decide(before, far, rate).action is Action.SKIP
    strict = decide(before, far, rate, tol=0.05)  # 0.3 over 4 x 0.05
    assert strict.action is Action.FULL and "predicted" in strict.reason
    assert decide(jump, sigmas[before], 0.01).action is Action.FULL  # the final jump itself


@pytest.mark.parametrize("steps", [20, 28, 50])
def test_the_short_last_call_after_the_final_jump_under_each_tail_variant(steps):
    """SD3's last call (sigma 0.009, after the final jump): the library predicts it at its step's
    weight and holds it to the tolerance; ``error_before_tail`` predicts it from the rate and holds
    it to twice the tolerance (the library before); ``error_tail_late`` predicts it at its weight
    but holds it to twice the tolerance; ``error_last_full`` always computes it."""
    sigmas = _pipeline_sigmas("sd3", steps)
    last = StepView(step=len(sigmas) - 1, sigma=sigmas[-1], sigmas=tuple(sigmas[:-1]), num_tokens=100)
    weight = sigmas[-1] / (sigmas[-2] - sigmas[-1])

    controller_variants.register()

    def decide(name, tol):
        policy = make_policy(SpecDiffConfig(controller=name, tolerance=tol), 100)
        state = policy.start()
        state.refresh_sigma, state.rate = sigmas[-2], 0.01  # the final jump was full; a slow rate
        return policy.decide(state, last)

    for tol in (weight / 1.5, weight / 3, weight * 1.5):
        assert (decide("error", tol).action is Action.FULL) == (tol < weight)
        assert decide("error", tol).predicted == pytest.approx(weight)
        assert decide("error_before_tail", tol).action is not Action.FULL
        assert decide("error_before_tail", tol).predicted < 0.01 * weight
        assert (decide("error_tail_late", tol).action is Action.FULL) == (2 * tol < weight)
        assert decide("error_last_full", tol).action is Action.FULL


def test_interleave_caches_the_call_after_a_full_call():
    """``error_interleave``: the call after a full call is cached (sparse; ``_skip``: skipped) even
    where its predicted error is over the tolerance, unless a guard demands a full call; ``_cap3``
    only while the prediction is within 3 tolerances; the call after that one decides as usual."""
    sigmas = [1.0, 0.98, 0.96, 0.94, 0.92]

    def run(name, rate):  # the error of caching: rate x the sigma since the last full call
        policy = make_policy(SpecDiffConfig(controller=name, tolerance=0.1), 100)
        state, out, refresh = policy.start(), [], None
        for i, s in enumerate(sigmas):
            view = StepView(step=i, sigma=s, sigmas=tuple(sigmas[:i]), num_tokens=100)
            d = Decision.full("first") if i == 0 else policy.decide(state, view)
            error = None if refresh is None or d.action is Action.SKIP else rate * (refresh - s)
            policy.observe(state, view, Observation(d, s, 1, 1, error))
            refresh = s if d.action is Action.FULL else refresh
            out.append(d.action)
        return out

    F, C, S = Action.FULL, Action.SPARSE, Action.SKIP
    controller_variants.register()
    assert run("error", 10.0) == [F, F, F, F, F]  # predicted 0.2 > 0.1 on every call
    assert run("error_interleave", 10.0) == [F, F, C, F, C]  # the second call: no error measured yet
    assert run("error_interleave_skip", 10.0) == [F, F, S, F, S]
    assert run("error_interleave_cap3", 10.0) == [F, F, C, F, C]  # 0.2 within 0.3
    assert run("error_interleave_cap3", 20.0) == [F, F, F, F, F]  # 0.4 over 0.3


def test_log_sigma_measures_and_predicts_over_log_sigma():
    """``error_log_sigma``: a full call at sigma 0.8 that measured an error of 0.1 over log(1/0.8)
    predicts ``0.1 / log(1.25) * log(0.8 / sigma)`` (the library: over the sigma travelled)."""
    import math

    controller_variants.register()
    for name, dist in (("error", lambda a, b: a - b), ("error_log_sigma", lambda a, b: math.log(a / b))):
        policy = make_policy(SpecDiffConfig(controller=name, tolerance=10.0), 100)
        state = policy.start()
        for i, (s, err) in enumerate(((1.0, None), (0.8, 0.1))):
            view = StepView(step=i, sigma=s, sigmas=(1.0,)[:i], num_tokens=100)
            policy.observe(state, view, Observation(Decision.full(), s, 1, 1, err))
        view = StepView(step=2, sigma=0.7, sigmas=(1.0, 0.8), num_tokens=100)
        assert policy.decide(state, view).predicted == pytest.approx(0.1 / dist(1.0, 0.8) * dist(0.8, 0.7))


@pytest.mark.parametrize("name, slope", [("error", None), ("error_affine", 0.4), ("error_offset", 0.5)])
def test_affine_predicts_an_offset_and_the_last_intervals_slope(name, slope):
    """``error_affine``: a full call at 0.6 that measured 0.15 over 0.3 of sigma ended an interval
    whose first sparse call measured 0.05 at 0.05 of sigma: slope (0.15 - 0.05) / 0.25 = 0.4 (its
    ``error_offset`` kin: the interval's average, 0.15 / 0.3 = 0.5). The next interval's first sparse
    call measures 0.04 at 0.05: a call at 0.45 is predicted at 0.04 + slope * 0.1 (the library: the
    largest rate since the full call, 0.04 / 0.05, times 0.15)."""
    controller_variants.register()
    policy = make_policy(SpecDiffConfig(controller=name, tolerance=10.0), 100)
    state = policy.start()
    calls = ((1.0, Decision.full(), None), (0.9, Decision.full(), 0.2), (0.85, Decision.sparse(10), 0.05),
             (0.6, Decision.full(), 0.15), (0.55, Decision.sparse(10), 0.04))
    for i, (s, decision, err) in enumerate(calls):
        view = StepView(step=i, sigma=s, sigmas=tuple(c[0] for c in calls[:i]), num_tokens=100)
        policy.observe(state, view, Observation(decision, s, 1, 1, err))
    view = StepView(step=5, sigma=0.45, sigmas=tuple(c[0] for c in calls), num_tokens=100)
    expected = 0.04 / 0.05 * 0.15 if slope is None else 0.04 + slope * 0.1
    assert policy.decide(state, view).predicted == pytest.approx(expected)


def test_affine_decides_as_the_library_for_an_error_proportional_to_the_distance():
    """For an error that grows in proportion to the sigma travelled (no offset), the fitted slope is
    the rate and ``error_affine`` decides every call as the library does."""
    controller_variants.register()
    for rate in (0.5, 2.0):
        lib = _run(make_policy(SpecDiffConfig(tolerance=0.1), 100), SIGMAS, rate)
        assert Action.SKIP in lib and lib.count(Action.FULL) > 3
        assert _run(make_policy(SpecDiffConfig(controller="error_affine", tolerance=0.1), 100), SIGMAS, rate) == lib
