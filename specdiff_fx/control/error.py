"""The error-controlled schedule: a full step when the error of caching would exceed a tolerance.

The error of a cached step is, to a close approximation, the error of the outputs it does
not compute: each non-computed token reuses its last computed output, so the step's relative
error is ``e = ||F - F_reused|| / ||F||`` over those tokens (measured against full compute
on our models: it tracks the true relative error of the step's output within a few per
cent, ``BENCHMARKS.md``). The runtime measures ``e`` on every call:

* on a full call exactly: the fresh outputs against what each token would have reused;
* on a cached call by sampling: a share of the computed tokens are drawn at random from the
  tokens the score would have left out (probes); their fresh outputs against their reused
  ones estimate ``e`` for all the tokens left out, unbiased.

Between two full calls the error grows with the sigma travelled since the last one. The
policy measures the rate ``e / (sigma_refresh - sigma)`` on every call and predicts the next
call's error as ``rate * (sigma_refresh - sigma_next)``, ``rate`` being the largest measured
since the last full call: above ``tolerance`` the call is full, otherwise sparse. For an
error that grows linearly between refreshes, a fixed threshold on the end-of-interval error
minimises the summed error for a given number of refreshes (equal ``rate * length`` on every
interval). The largest rate rather than the latest: the sparse calls recompute the tokens
that drifted most, so with many calls between refreshes (50 steps rather than 20) the
measured error levels off below the tolerance and the latest rate falls call by call; the
run of cached calls then lasts until the interval guard, each call just under the tolerance,
and the error integrated over the run grows (BENCHMARKS.md, "Why the held-out cells lose at
50 steps"). With the largest rate an interval ends where a linear growth at its steepest
measured rate would reach the tolerance, whatever the step count (on the tune models, 2
seeds: +4.5 dB mean of cells for 3.8 points more FLOPs at the same tolerance; a looser
tolerance that gives those FLOPs back costs one full call at 8-12 steps, and 6-11 dB there).
The first cached call after a full call has no measurement of its own interval yet: it is
predicted with the larger of the full call's exact rate (over the whole interval that call
ended) and the rate the previous interval's first sparse call measured. The error of caching
grows like an offset plus a slower rise (BENCHMARKS.md, "How far the prediction overshoots"; under
guidance the offset is mostly the model's answer to the corrected full call's jump of the latent,
"What a cached call's error after a full call is made of"), so
the rate over a whole interval underestimates the error one or two steps after a full call,
while a rate measured over such a short distance does not; at 8 steps the interval's rate
predicted 0.098 for a call whose error was 0.169 (BENCHMARKS.md, "The first cached call").
It reads only sigmas and measurements: no step count, no shift, no guidance mode. Under true
CFG the two calls of a step share one state: they count as one step, and their errors pool as
a batch's do (:class:`StepErrors`). A second-order sampler (Heun) calls the model at a step's
start and again at its end sigma (the corrector, on the Euler-predicted latent); the runtime
has the corrector repeat the decision of its step's first call and pool with it, so the
decision serves the step's end sigma as well and is predicted there (``StepView.until``, the
end sigma estimated as the hindsight correction estimates a step): the first call of such a
step runs at the sigma of the corrector before it, where the error predicted for the call's
own sigma is 0 after a full corrector, and the decision would rest on the guards alone (on the
tune SD3 model, 10-25 Heun steps, 4 seeds: predicted at the call's own sigma, 1.6-6.6 dB less mean
per cell for 8-29 points fewer FLOPs, and the held-out SD3 model under 30 dB at 10 and 14 steps;
BENCHMARKS.md, "Heun's two calls per step").

A multistep sampler (UniPC, as Wan's pipelines sample; DPM-Solver++(2M)) is held to
:attr:`ErrorControlled.multistep_share` of the tolerance; the runtime tells one from how the
latent moves (``StepView.multistep``: an update that needs an earlier call's output besides the
newest one's). Such a sampler feeds an image's error back through the model more strongly than
Euler: on the tune SD3 model with CFG 4 at 10-16 UniPC steps the uncond outputs of some images
change by 18-95 % from one call to the next for several calls running (the median sample's by
3-10 %), and one call reused at sigma 0.9 (its true error 0.14) forked an image whose every later
call was computed in full (12 steps: 21.5 dB). The update's weights are not what amplifies it:
with every later output held at the reference's, an output's weight in the image is at most an
Euler step's (but the call before the last: 1.9 steps), and the fourth of 10 calls reused cost
29 dB held against 11 dB with the later calls computed (BENCHMARKS.md, "A multistep sampler
told from its updates"). On the tune model (4 seeds, 10-28 steps) every image stayed at 31.6 dB
or more at 0.07, against 25.4 at 0.08 and 13.2 at the Euler default 0.16.

Which cached calls compute tokens (``SpecDiffConfig.sparse_calls``, default 1): the first
cached call after a full call computes the most-drifted tokens and its probes measure the
rate; the cached calls after it, until the next full call, compute no token (``skip``: every
output reused, the prediction carried on from the largest rate measured). A token computed on
a sparse call attends to the others' cached keys and values; the further from the last full
call, the staler they are, and the less its fresh output is worth: on the tune models, at 28
steps, a sparse call's computed tokens still carry about the error of the tokens it leaves
out (BENCHMARKS.md, "What a sparse call's computed tokens are worth"). Skipping after the
first sparse call gave the same fidelity for fewer FLOPs, or 0.3-2 dB more at equal FLOPs, on
the tune models (held out: 2 dB more at 40 % of the FLOPs on the SD3 model, 1.7 dB less at 46 %).

Two guards, each a fact about flow-matching sampling rather than a tuned schedule:

* a full call at least every :attr:`ErrorControlled.max_interval` of sigma: during a long run of
  cached calls the probes are computed among stale neighbours (their keys and values are
  cached), so they see less of the error than there is; without this guard a generation
  without CFG ran 40 cached calls in a row at a measured error under the tolerance and lost
  3.6-7.1 dB against the guarded policy (BENCHMARKS.md, "Choosing the controller").
  The sigma travelled is weighted like the predicted error (``sigma / gap``, below 1 only
  where sigma is smaller than the step just taken: in practice the last step of a schedule
  that ends in a long jump to zero), so that step is not made full by the guard alone;
* the final jump: a call whose step takes the latent most of the way to zero (the step
  estimated from the schedule so far, as the hindsight correction estimates it, at least
  :attr:`ErrorControlled.final_share` of sigma) is full, unless its step is short (weight
  below 1/2: the tiny last call of a schedule that ends in a long jump, whose step moves the
  latent by little). The image is about ``x - sigma * v`` there, so that call's output error goes
  into the image whole, and no full call comes after it for the hindsight correction to take
  the error of the cached calls before it back. In the schedules of the pipelines that call
  stands apart (estimated step 0.86-1.0 of sigma; every other call's at most 0.5: SD3 shift 3,
  FLUX's dynamic shift, 8-50 steps): on the tune models, 2 seeds, it gave 3.9 dB more mean of
  cells at 20-50 steps for 2.5 points more FLOPs, and at 8 and 12 steps it kept the tolerance
  from making the call before the last sparse, which had cost 7-11 dB there (BENCHMARKS.md,
  "The final jump").

The short last call after the final jump (SD3's schedule: a jump from about 0.1 to sigma 0.009,
then a call there whose step weighs 0.06-0.15 at 20-50 steps) is not predicted from the rate:
the latent it sees holds a tenth of the noise the jump's call saw, and reusing the jump's output
there errs by about the whole output (measured 0.92-1.0 on the SD3 tune models at 20-50 steps,
where the rate predicted 0.01-0.02). It is predicted at :attr:`after_jump_error` (1) times its
step's weight and held to the tolerance itself, not the late phase's: its error stays in the image
with nothing after it, and on the tune SD3 models (20-50 steps, 2 seeds) held to twice the
tolerance it was computed at fewer tolerances for a lower curve (about 1 dB less mean at equal
FLOPs at ``tolerance`` 0.05-0.08). The default tolerance (0.16) lies above its weight up to 51
steps, so the defaults cache it as before (from 52 steps on they compute it; computing it at 20-50
steps gave 1.0 dB of mean for 3.1 points of FLOPs, under what the defaults' rule asks); at 0.05 it
is computed, and the tune SD3 models gain 4.3 dB of mean
for 3.1 points of FLOPs over their 20-50-step cells (BENCHMARKS.md, "The short last call").

No guard for the first calls at high noise, where the composition forms and consecutive outputs
differ by tens of per cent: the rate measured there (5-16 per unit of sigma on our tune models)
predicts an error above the tolerance for every call unless the step is short (at 50 steps and
shift 3, about 0.007 of sigma), and what a call cached there moves the latent wrong the hindsight
correction takes back at the next full call. A guard that kept every call full while the rate
exceeded 4 per unit of sigma cost, on the tune models with 2 seeds at ``tolerance=0.145``, 1.8
points of FLOPs at 20-50 steps for 0.4 dB less mean of cells (the same lowest cell and worst
image) and changed no image at 8-12 steps (BENCHMARKS.md, "Without the fast-phase guard").

The late phase: below sigma 0.5 a call is held to twice the tolerance, and the interval guard
allows 0.35 of sigma instead of 0.25. The image's composition is set there: a cached call late
in a generation costs the image a few times its step times its error, against tens of times
where the composition forms (BENCHMARKS.md, "What one cached call costs the image"), and the
searched placements of full calls end with one long interval from sigma 0.52-0.58 to the final
jump ("Where the full calls go"). The interval guard stays (0.35, not none): without it the
generations without guidance ran long runs of skipped calls below sigma 0.5 and lost 8-13 dB
of mean. Chosen on the four tune models (21 cells, 4 seeds) by ``benchmarks/choose_defaults.py``:
FLOPs down from 34.3 to 31.6 % for 2.8 dB of mean of cells (which sits far above its floor),
every image floor kept where one tolerance throughout kept it; on the held-out models 36.8 to
33.2 % for 2.7 dB, the same floors kept. The same relaxation of the first calls (sigma 0.93 and
above) forked images on the 1024-token tune model and on the held-out models (BENCHMARKS.md, "A
controller shaped by the phases of a generation"; "The late phase on all four tune models"). It
applies to one-step first-order samplers, the ones it was measured on: a multistep (UniPC) or
second-order (Heun) sampler keeps one tolerance and the 0.25 guard throughout.

Sparing the call right before the final jump (the final jump computes every token right after it)
was chosen on the first four tune models and dropped when a second SD3 tune model turned the same
rule against it: it forked an image there (BENCHMARKS.md, "A second SD3 tune model");
``error_before_final`` in ``benchmarks/controller_variants.py`` measures it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime.hindsight import step_estimate
from .base import Action, Decision, Observation, Policy, StepView, register_policy


@dataclass
class StepErrors:
    """What the calls of one step measured. Under true CFG a step has two calls (cond, uncond)
    sharing one controller state; their errors pool as a batch's do (root mean square of the
    relative errors), so a generation gets the same decisions whether its pipeline batches cond
    and uncond in one call or makes two."""

    sigma: float
    travelled: float  # from the last full call before this step to it (:meth:`ErrorControlled.distance`)
    prior_peak: float | None  # ``ErrorState.peak`` before this step
    squares: list[float] = field(default_factory=list)
    key: Any = None  # ``Observation.step`` of its calls (``None``: they are keyed by ``sigma``)

    def add(self, error: float | None) -> None:
        if error is not None and self.travelled > 1e-9:
            self.squares.append(error * error)

    @property
    def rate(self) -> float | None:
        """The pooled relative error per unit of sigma travelled, once a call measured."""
        if not self.squares:
            return None
        return (sum(self.squares) / len(self.squares)) ** 0.5 / self.travelled


@dataclass
class ErrorState:
    """Per-branch: where the last full call was and the error rate measured since."""

    refresh_sigma: float | None = None  # sigma of the last full call
    #: relative error per unit of sigma since that call: the largest a cached step measured since
    #: it (on the full call itself: the exact rate over the interval it ends; each step's calls pooled)
    rate: float | None = None
    peak: float | None = None  # the largest rate a cached step measured since the last full call
    sparse_since: int = 0  # sparse steps since the last full call
    #: the rate the first sparse call of the interval the last full call ended measured (over a
    #: short distance from a full call, as the next first cached call is); None if it had none
    first_rate: float | None = None
    short_rate: float | None = None  # the same for the current interval, once measured
    step: StepErrors | None = None  # the step last observed


@register_policy
class ErrorControlled(Policy):
    name = "error"
    options = ("tolerance", "sparse_calls")
    #: share of a cached call's computed tokens drawn at random to measure the error
    probe_fraction = 0.25

    def measures(self) -> bool:
        return True

    def sparse_limit(self) -> int | None:
        """Sparse calls per interval between full calls (``SpecDiffConfig.sparse_calls``);
        ``None``: every cached call is sparse."""
        return self.config.sparse_calls

    def may_skip(self) -> bool:
        return self.sparse_limit() is not None

    def probes(self, k: int) -> int:
        return max(1, round(self.probe_fraction * k)) if k > 1 else 0

    def start(self) -> ErrorState:
        return ErrorState()

    #: the most sigma a generation travels between two full calls
    max_interval = 0.25
    #: a call whose estimated step is at least this share of sigma is the final jump: full
    final_share = 0.75

    #: a multistep sampler's tolerance as a share of ``tolerance`` (0.07 at the default 0.16; see
    #: the module docstring)
    multistep_share = 7 / 16

    #: the late phase (see the module docstring): below ``late_sigma`` a one-step sampler's call is
    #: held to ``late_factor`` times the tolerance, and the interval guard allows ``late_interval``
    #: of sigma instead of :attr:`max_interval`
    late_sigma, late_factor, late_interval = 0.5, 2.0, 0.35

    def late(self, view: StepView) -> bool:
        """Whether the call lies in the late phase: below :attr:`late_sigma`, from a one-step
        first-order sampler (a multistep or a second-order sampler keeps one tolerance and one
        interval throughout: the late phase was measured on Euler's schedules only), and not the
        short last call after the final jump (held to the tolerance itself: see the module
        docstring)."""
        return (view.sigma < self.late_sigma and not view.multistep and view.until is None
                and not self.after_final_jump(view))

    def tolerance(self, view: StepView) -> float:
        """The tolerance this call is held to: ``tolerance``, its :attr:`multistep_share` under a
        multistep sampler, or :attr:`late_factor` times it in the late phase."""
        tol = self.config.tolerance * (self.multistep_share if view.multistep else 1.0)
        return tol * self.late_factor if self.late(view) else tol

    @staticmethod
    def step_weight(view: StepView) -> float:
        """``sigma / gap`` capped at 1: a step moves the latent at most sigma, so the error of
        a last step shorter than the one before it weighs little."""
        before = [s for s in view.sigmas if s > view.sigma]  # a second call at one sigma: from the step before
        gap = before[-1] - view.sigma if before else 0.0
        return min(1.0, view.sigma / gap) if gap > 0 else 1.0

    def guard(self, state: ErrorState, view: StepView) -> Decision | None:
        """The full call the guards demand (no measurement yet, the final jump, the interval
        guard), or None."""
        if state.rate is None or state.refresh_sigma is None:
            return Decision.full("no error measured yet")
        if self.final_jump(view):
            return Decision.full("the final jump: nothing after it corrects its error")
        if self.interval_passed(state, view):
            return Decision.full(f"{self.interval(view):g} of sigma since the last full call")
        return None

    def interval_passed(self, state: ErrorState, view: StepView) -> bool:
        """Whether the interval guard's sigma has run out since the last full call (weighted like
        the prediction)."""
        travelled = max(0.0, state.refresh_sigma - self.served(view)) * self.step_weight(view)
        return travelled >= self.interval(view) - 1e-9

    def interval(self, view: StepView) -> float:
        """The most sigma the interval guard lets a run of cached calls travel before this call:
        :attr:`max_interval`, or :attr:`late_interval` in the late phase."""
        return self.late_interval if self.late(view) else self.max_interval

    @staticmethod
    def served(view: StepView) -> float:
        """The lowest sigma the decision serves: this call's, or a second-order step's corrector's."""
        return view.sigma if view.until is None else min(view.sigma, view.until)

    @classmethod
    def to_zero(cls, view: StepView) -> bool:
        """Whether this call's step, estimated from the schedule so far, takes the latent most of
        the way to zero (at least :attr:`final_share` of sigma)."""
        est = step_estimate(list(view.sigmas), view.sigma)
        return est is not None and est >= cls.final_share * view.sigma

    @classmethod
    def final_jump(cls, view: StepView) -> bool:
        """Whether this call's step takes the latent most of the way to zero (and is not the
        short last step after such a jump)."""
        return cls.to_zero(view) and cls.step_weight(view) >= 0.5

    @classmethod
    def after_final_jump(cls, view: StepView) -> bool:
        """Whether this call is the short last call after the final jump (SD3's schedule ends in a
        jump to sigma 0.009 and a call there): a step to zero weighing under 1/2."""
        return cls.to_zero(view) and cls.step_weight(view) < 0.5

    #: the relative error of reusing the final jump's output on the short last call after it
    #: (measured 0.92-1.0 on the SD3 tune models at 20-50 steps; see the module docstring)
    after_jump_error = 1.0

    @staticmethod
    def distance(sigma_from: float, sigma_to: float) -> float:
        """How far the error of caching grows from a full call at ``sigma_from`` to a call at
        ``sigma_to``: the sigma travelled (rates are per unit of it; the interval guard measures
        sigma itself)."""
        return sigma_from - sigma_to

    def predict(self, state: ErrorState, view: StepView) -> float:
        """The error of caching predicted for this call (once a rate has been measured). Until a
        sparse call has measured since the last full call, with the larger of the full call's
        rate over the interval it ended and the rate the last interval's first sparse call
        measured: the error of caching grows like an offset plus a slower rise, so over the short
        distance of a first cached call the rate per unit of sigma runs above an interval's
        average (BENCHMARKS.md, "The first cached call")."""
        rate = state.rate
        if state.peak is None and state.first_rate is not None:
            rate = max(rate, state.first_rate)
        predicted = rate * max(0.0, self.distance(state.refresh_sigma, self.served(view))) * self.step_weight(view)
        if self.after_final_jump(view):  # the rate does not carry across the jump
            predicted = max(predicted, self.after_jump_error * self.step_weight(view))
        return predicted

    def decide(self, state: ErrorState, view: StepView) -> Decision:
        full = self.guard(state, view)
        if full is not None:
            return full
        predicted = self.predict(state, view)
        tol = self.tolerance(view)
        if predicted > tol:
            return Decision.full(f"predicted error {predicted:.3f} > tolerance {tol:g}", predicted)
        limit = self.sparse_limit()
        if limit is not None and state.sparse_since >= limit:
            return Decision.skip(f"predicted error {predicted:.3f}; {limit} sparse call(s) since the last full call",
                                 predicted)
        return Decision.sparse(self.config.num_computed(self.num_tokens), f"predicted error {predicted:.3f}", predicted)

    def observe(self, state: ErrorState, view: StepView, obs: Observation) -> None:
        action = obs.decision.action
        key = ("sigma", obs.sigma) if obs.step is None else ("step", obs.step)  # the step the call belongs to
        if state.step is None or key != state.step.key:  # the step's first call
            travelled = self.distance(state.refresh_sigma, obs.sigma) if state.refresh_sigma is not None else 0.0
            state.step = StepErrors(obs.sigma, travelled, state.peak, key=key)
            if action is Action.FULL:
                state.refresh_sigma, state.peak, state.sparse_since = obs.sigma, None, 0
                state.first_rate, state.short_rate = state.short_rate, None
            elif action is Action.SPARSE:
                state.sparse_since += 1
        state.step.add(obs.prediction_error)
        measured = state.step.rate
        if measured is None:
            return
        if action is Action.FULL:
            state.rate = measured
            return
        state.peak = state.rate = max(state.step.prior_peak or 0.0, measured)
        if action is Action.SPARSE and state.sparse_since == 1:
            state.short_rate = measured
