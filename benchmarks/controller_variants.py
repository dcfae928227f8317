"""Controller variants, registered for the protocol: those measured and not kept, and the
library's controller as it was before and as it was chosen.

``python benchmarks/controller_variants.py <protocol arguments>`` runs
``benchmarks/protocol.py`` with these policies registered, so ``--specdiff
'{"controller": "error_ladder"}'`` selects one. They are experiments, not library: the
numbers they gave are in BENCHMARKS.md ("Controller variants").

* ``error_ladder``: the error controller with *partial refreshes*. When the predicted error
  of the smallest ``k`` is over the tolerance it tries larger token counts (2.5x and 5x that
  ``k``, at most half the tokens) before a full call. The error of leaving out all but the
  top ``k`` is predicted per token: ``c * D(k)``, ``D(k)`` the root of the summed squared
  drift (:func:`specdiff_fx.schedule.drift_scores`) of the tokens outside each sample's top
  ``k``, ``c`` the measured error over ``D`` of the last measured call. Without partial
  refreshes this is the default policy's rate model; with them it follows each token's own
  staleness.
* ``error_ladder_k1``: the same prediction with the smallest ``k`` only (isolates the
  predictor from the partial refreshes).
* ``error_latest_rate``: the error controller as it was before it predicted with the largest
  rate measured since the last full call: it predicts with the latest measured rate, which
  falls call by call once the measured error levels off (BENCHMARKS.md, "Why the held-out
  cells lose at 50 steps"); use it with ``"tolerance": 0.1``, the default of then.
* ``error_calibrated``: the rate model's predictions scaled by the ratio of the error a full call
  measured (exactly) to what the rate model had predicted for it, clipped to [0.5, 2].
* ``error_refresh75``: full calls that end a run of sparse calls compute the 75 % most-drifted
  image tokens instead of all (a near-full refresh at three quarters of the cost).
* ``error_probes16``: at least 16 probe tokens per sample on a sparse call, computed on top of
  the top-scored tokens (on 256-token models 36 tokens instead of 26, the same 20 top-scored).
* ``error_alternate``: sparse and skipped calls alternate between full calls (the first cached
  call after a full one sparse); the default, ``sparse_calls=1``, skips every cached call after
  the first.
* ``error_skip_only``: every cached call a skip (no token computed); the rate is measured on
  full calls only.
* ``error_phases``: the library's late phase, and 1.5 times the tolerance at sigma 0.93 and
  above (BENCHMARKS.md, "A controller shaped by the phases of a generation", where it was measured
  as twice the tolerance and an interval guard of 0.35 of sigma below sigma 0.5 on top of the
  uniform controller: the same decisions).
* ``error_late``: the late phase alone, as measured before it became the library's (the same
  decisions as ``"error"`` now; BENCHMARKS.md, "The late phase on all four tune models").
* ``error_uniform``: the error controller before the late phase: one tolerance and an interval
  guard of 0.25 of sigma throughout.
* ``error_band_guard``: an interval guard of 0.12 of sigma at sigma 0.5 and above (the library's:
  0.25), so that no run of cached calls spans more of the band where a guided image is most
  sensitive; ``error_band_tolerance``: 0.6 times the tolerance at 0.5 <= sigma < 0.93;
  ``error_early_tight``: half the tolerance at sigma 0.93 and above (BENCHMARKS.md, "Held out
  with four seeds, and a forked tune image no controller setting keeps").
* ``error_late06``: the library's late phase from sigma 0.6 instead of 0.5 (the same section).
* ``error_before_final``: in the late phase, the call whose next call the schedule so far says is
  the final jump is not made full by the interval guard, and by the prediction only above twice
  the late tolerance (sparse or skipped instead; the final jump computes every token right after
  it). The library's controller from its choice on the first four tune models until a second SD3
  tune model turned the rule against it (BENCHMARKS.md, "The call before the final jump", where it
  was first measured with no tolerance at that call; "A second SD3 tune model").
* ``error_late_guard``: the late phase's interval guard (0.35 of sigma below sigma 0.5) without its
  tolerance factor (BENCHMARKS.md, "A second SD3 tune model": where the late phase saves FLOPs).
* ``error_before_tail``: the library's controller before the short last call after the final jump
  (SD3's schedule: sigma 0.009) was predicted at its step's weight: it is predicted from the rate
  like any call and held to the late phase's tolerance. ``error_tail_late``: predicted at its weight
  as the library does, but held to the late phase's twice the tolerance. ``error_last_full`` /
  ``error_uniform_last_full``: that call always full (on the library / on ``error_uniform``)
  (BENCHMARKS.md, "The short last call after the final jump").
* ``error_interleave``: a cached call after every full call whatever its predicted error (the
  guards aside), so the knob's tight end alternates full and cached calls; ``_skip``: that call
  skipped; ``_uniform``: without the late phase; ``_cap3`` / ``_cap6``: only while its predicted
  error is at most 3 / 6 tolerances. Measured on ``error_before_tail`` (the same section).
* ``error_log_sigma`` / ``_uniform``: the rate per unit of log sigma instead of sigma, predictions
  over the log sigma travelled (the same section, a screen).
* ``error_affine``: the error of caching predicted as an offset plus a slope, ``e1 + slope * (d - d1)``
  from the interval's first sparse call (``e1`` at distance ``d1``), the slope fitted on the last
  interval between its first sparse call and the full call that ended it; ``error_offset``: the
  last interval's average rate as the slope (BENCHMARKS.md, "An offset and a slope instead of the
  largest rate", a screen).

The variants above ``error_alternate`` were measured with every cached call sparse, as the
error controller then ran: they keep doing so whatever ``sparse_calls`` says
(:class:`EverySparse`). All of them were measured on the error controller of their day, which
kept every call full while the measured error grew faster than 4 per unit of sigma (a guard the
library has dropped since, BENCHMARKS.md "Without the fast-phase guard"), and, those above
``error_phases``, without the late phase; they inherit today's.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdiff_fx.control import Action, Decision, Observation, StepView, register_policy  # noqa: E402
from specdiff_fx.control.error import ErrorControlled, ErrorState  # noqa: E402
from specdiff_fx.runtime.hindsight import step_estimate  # noqa: E402


class EverySparse:
    """Mixin: every cached call sparse, as the error controller ran when these variants were
    measured (before ``sparse_calls``)."""

    def sparse_limit(self) -> None:
        return None


class ErrorLatestRate(EverySparse, ErrorControlled):
    name = "error_latest_rate"

    def observe(self, state: ErrorState, view: StepView, obs: Observation) -> None:
        err = obs.prediction_error
        if state.refresh_sigma is not None and err is not None and state.refresh_sigma - obs.sigma > 1e-9:
            state.rate = err / (state.refresh_sigma - obs.sigma)
        if obs.decision.action is Action.FULL:
            state.refresh_sigma = obs.sigma


@dataclass
class LadderState(ErrorState):
    calibration: float | None = None  # measured error per unit of drift mass, last measured call
    drift_mass: dict[int, float] = field(default_factory=dict)  # D(k) at the last decision


class ErrorLadder(ErrorLatestRate):  # as measured: with the latest rate
    name = "error_ladder"
    #: token counts a sparse call may use, as multiples of the smallest, at most max_fraction * N
    ladder = (1.0, 2.5, 5.0)
    max_fraction = 0.5

    def token_counts(self) -> tuple[int, ...]:
        k0 = self.config.num_computed(self.num_tokens)
        counts = [k0]
        for m in self.ladder[1:]:
            k = round(m * k0)
            if counts[-1] < k <= self.max_fraction * self.num_tokens:
                counts.append(k)
        return tuple(counts)

    def start(self) -> LadderState:
        return LadderState()

    def decide(self, state: LadderState, view: StepView) -> Decision:
        state.drift_mass = self._drift_mass(view)
        if state.calibration is None or not state.drift_mass:
            return super().decide(state, view)
        full = self.guard(state, view)
        if full is not None:
            return full
        weight, predicted = self.step_weight(view), 0.0
        for k in sorted(state.drift_mass):
            predicted = state.calibration * state.drift_mass[k] * weight
            if predicted <= self.config.tolerance:
                return Decision.sparse(k, f"predicted error {predicted:.3f}", predicted)
        return Decision.full(f"predicted error {predicted:.3f} > tolerance {self.config.tolerance:g}", predicted)

    def _drift_mass(self, view: StepView) -> dict[int, float]:
        drift = view.drift()
        if drift is None:
            return {}
        sq = drift.float().pow(2).sort(dim=-1, descending=True).values
        tail = sq.flip(-1).cumsum(-1).flip(-1).sum(0)  # tail[j]: over tokens j.. of every sample
        n = sq.shape[-1]
        return {k: float(tail[k].sqrt()) if k < n else 0.0 for k in self.token_counts()}

    def observe(self, state: LadderState, view: StepView, obs: Observation) -> None:
        err = obs.prediction_error
        if state.refresh_sigma is not None and err is not None:
            # a full call measures the smallest k's left-out tokens; a sparse one its own k's
            k = obs.decision.k if obs.decision.action is Action.SPARSE else self.token_counts()[0]
            mass = state.drift_mass.get(k, 0.0)
            if mass > 0:
                state.calibration = err / mass
        super().observe(state, view, obs)


@dataclass
class CalibratedState(ErrorState):
    calibration: float = 1.0
    raw: float | None = None  # this call's prediction before calibration


class ErrorCalibrated(EverySparse, ErrorControlled):
    """The rate model's prediction scaled by what the last full call showed: a full call that
    ends a run of sparse calls measures exactly the error a sparse call would have made there;
    its ratio to what the rate model predicted for it (clipped to ``bounds``) scales the
    predictions of the next interval."""

    name = "error_calibrated"
    bounds = (0.5, 2.0)

    def start(self) -> CalibratedState:
        return CalibratedState()

    def decide(self, state: CalibratedState, view: StepView) -> Decision:
        state.raw = None  # computed before the guards: a full call they force is calibrated on too
        if state.rate is not None and state.refresh_sigma is not None:
            state.raw = super().predict(state, view)
        return super().decide(state, view)

    def predict(self, state: CalibratedState, view: StepView) -> float:
        return state.calibration * state.raw

    def observe(self, state: CalibratedState, view: StepView, obs: Observation) -> None:
        if obs.decision.action is Action.FULL and state.peak is not None and obs.prediction_error is not None \
                and state.raw:  # a full call after sparse ones
            low, high = self.bounds
            state.calibration = min(high, max(low, obs.prediction_error / state.raw))
        super().observe(state, view, obs)


class ErrorNearFullRefresh(EverySparse, ErrorControlled):
    """The error controller whose refreshes after sparse calls compute the ``refresh_share``
    most-drifted image tokens instead of all: a full decision of the tolerance or the interval
    guard runs as ``sparse(round(refresh_share * N))`` and resets the interval like a full call,
    keeping the rate measured over the interval (after a sparse call it is the interval's largest;
    the refresh's probes only see the least-drifted tokens it leaves out, so it does not measure
    one)."""

    name = "error_refresh75"
    refresh_share = 0.75

    def _k_refresh(self) -> int:
        return max(1, round(self.refresh_share * self.num_tokens))

    def token_counts(self) -> tuple[int, ...]:
        return (*super().token_counts(), self._k_refresh())

    def probes(self, k: int) -> int:
        if k == self._k_refresh():
            return max(1, round(self.probe_fraction * (self.num_tokens - k)))
        return super().probes(k)

    def decide(self, state: ErrorState, view: StepView) -> Decision:
        decision = super().decide(state, view)
        if decision.action is Action.FULL and state.peak is not None:  # ends a run of sparse calls
            return Decision.sparse(self._k_refresh(), f"refresh: {decision.reason}", decision.predicted)
        return decision

    def observe(self, state: ErrorState, view: StepView, obs: Observation) -> None:
        if obs.decision.action is Action.SPARSE and obs.decision.k == self._k_refresh():
            state.refresh_sigma, state.peak = obs.sigma, None
            return
        super().observe(state, view, obs)


class ErrorProbeFloor(EverySparse, ErrorControlled):
    """The error controller with at least ``min_probes`` probe tokens per sample on a sparse
    call, computed on top of the top-scored tokens (``k`` grows by what the floor adds), so that
    one image's estimate of its error of caching rests on enough samples."""

    name = "error_probes16"
    min_probes = 16

    def _base_k(self) -> int:
        return self.config.num_computed(self.num_tokens)

    def _extra(self) -> int:
        k = self._base_k()
        return max(0, min(self.num_tokens - k, self.min_probes - super().probes(k)))

    def token_counts(self) -> tuple[int, ...]:
        return (self._base_k() + self._extra(),)

    def probes(self, k: int) -> int:
        return super().probes(self._base_k()) + self._extra()

    def decide(self, state: ErrorState, view: StepView) -> Decision:
        decision = super().decide(state, view)
        if decision.action is Action.SPARSE:
            return Decision.sparse(self.token_counts()[0], decision.reason, decision.predicted)
        return decision


class ErrorLadderK1(ErrorLadder):
    name = "error_ladder_k1"
    ladder = (1.0,)


@dataclass
class AlternateState(ErrorState):
    last_sparse: bool = False  # the last call was sparse


class ErrorAlternate(ErrorControlled):
    """Sparse and skipped calls alternate between full calls: a cached call that follows a
    sparse one is skipped, the one after it sparse again."""

    name = "error_alternate"

    def sparse_limit(self) -> None:  # no limit on sparse calls per interval: only the alternation skips
        return None

    def may_skip(self) -> bool:
        return True

    def start(self) -> AlternateState:
        return AlternateState()

    def decide(self, state: AlternateState, view: StepView) -> Decision:
        decision = super().decide(state, view)
        if decision.action is Action.SPARSE and state.last_sparse:
            return Decision.skip(f"{decision.reason}; the last call was sparse", decision.predicted)
        return decision

    def observe(self, state: AlternateState, view: StepView, obs: Observation) -> None:
        super().observe(state, view, obs)
        state.last_sparse = obs.decision.action is Action.SPARSE


class ErrorSkipOnly(ErrorControlled):
    """Every cached call a skip: no token computed between full calls, whose exact measurement
    alone gives the rate."""

    name = "error_skip_only"

    def sparse_limit(self) -> int:
        return 0


class ErrorPhases(ErrorControlled):
    """The library's late phase (below ``late_sigma``: ``late_factor`` times the tolerance, an
    interval guard of ``late_interval``), and ``early_factor`` times the tolerance at
    ``early_sigma`` and above. Each call is held to the factor at its own sigma."""

    name = "error_phases"
    early_sigma, early_factor = 0.93, 1.5

    def tolerance(self, view: StepView) -> float:
        tol = super().tolerance(view)
        return tol * self.early_factor if view.sigma >= self.early_sigma else tol


class ErrorLate(ErrorControlled):
    """The late phase alone: what the library's error controller does since it was chosen (the
    name kept so that the runs that chose it can be run again)."""

    name = "error_late"


class OneTolerance:
    """Mixin: no late phase (``late_factor`` 1, ``late_interval`` the guard's ``max_interval``)."""

    late_factor = 1.0
    late_interval = ErrorControlled.max_interval


class ErrorUniform(OneTolerance, ErrorControlled):
    """One tolerance and one interval guard throughout: the error controller before the late
    phase."""

    name = "error_uniform"


class ErrorBandGuard(ErrorControlled):
    """An interval guard of ``band_interval`` of sigma outside the late phase (the library's
    :attr:`~ErrorControlled.max_interval` there otherwise)."""

    name = "error_band_guard"
    band_interval = 0.12

    def interval(self, view: StepView) -> float:
        return super().interval(view) if self.late(view) else min(self.max_interval, self.band_interval)


class ErrorBandTolerance(ErrorControlled):
    """``band_factor`` times the tolerance at ``late_sigma`` <= sigma < ``band_top``."""

    name = "error_band_tolerance"
    band_factor, band_top = 0.6, 0.93

    def tolerance(self, view: StepView) -> float:
        tol = super().tolerance(view)
        return tol * self.band_factor if self.late_sigma <= view.sigma < self.band_top else tol


class ErrorEarlyTight(ErrorPhases):
    """:class:`ErrorPhases` with the first calls held tighter instead of looser: half the
    tolerance at ``early_sigma`` and above."""

    name = "error_early_tight"
    early_factor = 0.5


class ErrorLate06(ErrorControlled):
    """The late phase from sigma 0.6."""

    name = "error_late06"
    late_sigma = 0.6


class ErrorBeforeFinal(ErrorControlled):
    """The call before the final jump spared in the late phase: held to ``before_final_factor``
    times the late tolerance, and not made full by the interval guard."""

    name = "error_before_final"
    before_final_factor = 2.0

    @classmethod
    def next_is_final(cls, view: StepView) -> bool:
        """Whether the call after this one is the final jump, by the schedule so far: this call's
        step estimated as the final-jump rule estimates it, and that rule applied to the next call
        at the sigma it lands on."""
        est = step_estimate(list(view.sigmas), view.sigma)
        if est is None or est <= 0 or est >= view.sigma:
            return False
        return cls.final_jump(replace(view, sigma=view.sigma - est, sigmas=(*view.sigmas, view.sigma)))

    def before_final(self, view: StepView) -> bool:
        """Whether this call is the late phase's call right before the final jump."""
        return self.late(view) and not self.final_jump(view) and self.next_is_final(view)

    def tolerance(self, view: StepView) -> float:
        tol = super().tolerance(view)
        return tol * self.before_final_factor if self.before_final(view) else tol

    def guard(self, state: ErrorState, view: StepView) -> Decision | None:
        if state.rate is not None and state.refresh_sigma is not None and self.before_final(view):
            return None  # not the final jump (before_final says so): only the interval guard is waived
        return super().guard(state, view)

    def decide(self, state: ErrorState, view: StepView) -> Decision:
        decision = super().decide(state, view)
        if decision.action is not Action.FULL and self.before_final(view) and (
                decision.predicted > self.tolerance(view) / self.before_final_factor
                or self.interval_passed(state, view)):  # the call the rule spared: say so
            head = f"predicted error {decision.predicted:.3f}"
            decision = replace(decision, reason=decision.reason.replace(
                head, f"{head}; the last step's full call follows", 1))
        return decision


class ErrorLateGuard(ErrorControlled):
    """The late phase's longer interval guard alone: below ``late_sigma`` the guard allows
    ``late_interval`` of sigma, the tolerance stays the one of the earlier calls."""

    name = "error_late_guard"
    late_factor = 1.0


class ErrorBeforeTail(ErrorControlled):
    """The short last call after the final jump predicted from the rate, like any call, and held to
    the late phase's tolerance: the library's controller before it predicted that call at its
    step's weight."""

    name = "error_before_tail"

    @classmethod
    def after_final_jump(cls, view: StepView) -> bool:
        return False


class ErrorTailLate(ErrorControlled):
    """The short last call after the final jump predicted as the library predicts it, but held to
    the late phase's tolerance (twice the tolerance) rather than the tolerance itself."""

    name = "error_tail_late"

    def late(self, view: StepView) -> bool:
        return view.sigma < self.late_sigma and not view.multistep and view.until is None


@dataclass
class InterleaveState(ErrorState):
    last_full: bool = False  # the last call was full


class ErrorInterleave(ErrorBeforeTail):
    """A cached call after every full call, whatever its predicted error (the guards still make
    calls full): one cached call between two full calls is the case the hindsight correction
    handles best (two-sided, over two steps), so the tight end of the knob alternates full and
    cached calls instead of running full. On the library's controller before the short last call
    after the final jump was predicted at its weight (:class:`ErrorBeforeTail`), as measured."""

    name = "error_interleave"
    forced = Action.SPARSE
    #: the call after a full call is cached only while its predicted error is at most this many
    #: tolerances (``None``: whatever it is)
    forced_cap: float | None = None

    def start(self) -> InterleaveState:
        return InterleaveState()

    def decide(self, state: InterleaveState, view: StepView) -> Decision:
        decision = super().decide(state, view)
        if (decision.action is Action.FULL and state.last_full and decision.predicted is not None
                and self.guard(state, view) is None
                and (self.forced_cap is None or decision.predicted <= self.forced_cap * self.tolerance(view))):
            reason = f"{decision.reason}; the call after a full call is cached"
            if self.forced is Action.SKIP:
                return Decision.skip(reason, decision.predicted)
            return Decision.sparse(self.config.num_computed(self.num_tokens), reason, decision.predicted)
        return decision

    def observe(self, state: InterleaveState, view: StepView, obs: Observation) -> None:
        super().observe(state, view, obs)
        state.last_full = obs.decision.action is Action.FULL


class ErrorInterleaveSkip(ErrorInterleave):
    """:class:`ErrorInterleave` with the forced cached call skipped (no token computed)."""

    name = "error_interleave_skip"
    forced = Action.SKIP


class ErrorInterleaveUniform(OneTolerance, ErrorInterleave):
    """:class:`ErrorInterleave` without the late phase."""

    name = "error_interleave_uniform"


class ErrorInterleaveSkipUniformCap3(ErrorInterleaveUniform):
    """:class:`ErrorInterleaveUniform`, the forced call skipped, within 3 tolerances."""

    name = "error_interleave_skip_uniform_cap3"
    forced = Action.SKIP
    forced_cap = 3.0


class ErrorLastFull(ErrorControlled):
    """The tiny last call after the final jump computed too (the final-jump rule without its
    short-step exemption)."""

    name = "error_last_full"

    @classmethod
    def final_jump(cls, view: StepView) -> bool:
        return cls.to_zero(view)


class ErrorUniformLastFull(OneTolerance, ErrorLastFull):
    """:class:`ErrorLastFull` with one tolerance and one interval guard throughout."""

    name = "error_uniform_last_full"


class ErrorInterleaveCap3(ErrorInterleave):
    """:class:`ErrorInterleave` while the forced call's predicted error is within 3 tolerances."""

    name = "error_interleave_cap3"
    forced_cap = 3.0


class ErrorInterleaveCap6(ErrorInterleave):
    """:class:`ErrorInterleave` while the forced call's predicted error is within 6 tolerances."""

    name = "error_interleave_cap6"
    forced_cap = 6.0


class ErrorInterleaveUniformCap3(ErrorInterleaveUniform):
    """:class:`ErrorInterleaveUniform` while the forced call's predicted error is within 3 tolerances."""

    name = "error_interleave_uniform_cap3"
    forced_cap = 3.0


class ErrorLogSigma(ErrorControlled):
    """The error of caching taken to grow with ``log(sigma_full / sigma)`` rather than the sigma
    travelled: rates per unit of log sigma, predictions over it (the interval guard still in
    sigma). Near zero the output changes by about its step over sigma per call, so the linear
    rate underpredicts the calls there (the call after SD3's final jump: 0.01-0.02 predicted,
    0.92-1.0 true; on ``flux`` without CFG at 28 steps the call before the final jump: 0.027
    predicted, 0.103 true)."""

    name = "error_log_sigma"

    @staticmethod
    def distance(sigma_from: float, sigma_to: float) -> float:
        return math.log(sigma_from / sigma_to) if sigma_from > 0 and sigma_to > 0 else 0.0


class ErrorLogSigmaUniform(OneTolerance, ErrorLogSigma):
    """:class:`ErrorLogSigma` with one tolerance and one interval guard throughout."""

    name = "error_log_sigma_uniform"


@dataclass
class AffineState(ErrorState):
    current_first: tuple[float, float] | None = None  # (error, distance) of this interval's first sparse step
    ended_first: tuple[float, float] | None = None  # the same for the interval the last full call ended
    slope: float | None = None  # error per unit of distance after the first sparse step (last measured)


class ErrorAffine(ErrorControlled):
    """The error of caching taken to grow like an offset plus a slope, not in proportion to the
    distance from the last full call: once the interval's first sparse call has measured ``e1`` at
    distance ``d1``, a later call is predicted at ``e1 + slope * (d - d1)``, the slope being the one
    the last interval showed between its first sparse call and the full call that ended it (whose
    error of caching is exact): ``(e_full - e1') / (D - d1')``, at least 0. Before the first sparse
    call, and while no slope has been measured, it predicts as the library does. The library's
    linear rate from the first sparse call overpredicts the later calls 1.5-4 times ("How far the
    prediction overshoots")."""

    name = "error_affine"

    def start(self) -> AffineState:
        return AffineState()

    def slope_of(self, state: AffineState, e_full: float, distance: float) -> float | None:
        e1, d1 = state.ended_first
        return max(0.0, (e_full - e1) / (distance - d1)) if distance > d1 + 1e-9 else None

    def predict(self, state: AffineState, view: StepView) -> float:
        if state.current_first is None or state.slope is None or self.after_final_jump(view):
            return super().predict(state, view)
        e1, d1 = state.current_first
        d = max(0.0, self.distance(state.refresh_sigma, self.served(view)))
        return (e1 + state.slope * max(0.0, d - d1)) * self.step_weight(view)

    def observe(self, state: AffineState, view: StepView, obs: Observation) -> None:
        before = state.step
        super().observe(state, view, obs)
        action, step = obs.decision.action, state.step
        if step is not before and action is Action.FULL:  # the step's first call (a new step's record)
            state.ended_first, state.current_first = state.current_first, None
        rate = step.rate
        if rate is None:
            return
        if action is Action.SPARSE and state.sparse_since == 1:
            state.current_first = (rate * step.travelled, step.travelled)
        elif action is Action.FULL and state.ended_first is not None:
            slope = self.slope_of(state, rate * step.travelled, step.travelled)
            if slope is not None:
                state.slope = slope


class ErrorOffset(ErrorAffine):
    """:class:`ErrorAffine` with the last interval's average rate (``e_full / D``) as the slope: a
    steeper, more cautious rise than the fitted one."""

    name = "error_offset"

    def slope_of(self, state: AffineState, e_full: float, distance: float) -> float | None:
        return e_full / distance if distance > 1e-9 else None


def register() -> None:
    from specdiff_fx.control import policies

    for cls in (ErrorLadder, ErrorLadderK1, ErrorLatestRate, ErrorCalibrated, ErrorNearFullRefresh,
                ErrorProbeFloor, ErrorAlternate, ErrorSkipOnly, ErrorPhases, ErrorLate, ErrorUniform,
                ErrorBandGuard, ErrorBandTolerance, ErrorEarlyTight, ErrorLate06, ErrorBeforeFinal,
                ErrorLateGuard, ErrorInterleave, ErrorInterleaveSkip, ErrorInterleaveUniform,
                ErrorInterleaveCap3, ErrorInterleaveCap6, ErrorInterleaveUniformCap3,
                ErrorInterleaveSkipUniformCap3, ErrorLastFull, ErrorUniformLastFull,
                ErrorBeforeTail, ErrorTailLate, ErrorLogSigma, ErrorLogSigmaUniform, ErrorAffine,
                ErrorOffset):
        if cls.name not in policies():
            register_policy(cls)


def main(argv: list[str] | None = None) -> dict:
    register()
    from benchmarks import protocol

    return protocol.main(argv)


if __name__ == "__main__":
    main()
