"""Controller variants that were measured and not kept, registered for the protocol.

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
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from specdiff_fx.control import Action, Decision, Observation, StepView, register_policy  # noqa: E402
from specdiff_fx.control.error import ErrorControlled, ErrorState  # noqa: E402


class ErrorLatestRate(ErrorControlled):
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
                state.predicted = predicted
                return Decision.sparse(k, f"predicted error {predicted:.3f}")
        state.predicted = predicted
        return Decision.full(f"predicted error {predicted:.3f} > tolerance {self.config.tolerance:g}")

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


class ErrorLadderK1(ErrorLadder):
    name = "error_ladder_k1"
    ladder = (1.0,)


def register() -> None:
    from specdiff_fx.control import policies

    for cls in (ErrorLadder, ErrorLadderK1, ErrorLatestRate):
        if cls.name not in policies():
            register_policy(cls)


def main(argv: list[str] | None = None) -> dict:
    register()
    from benchmarks import protocol

    return protocol.main(argv)


if __name__ == "__main__":
    main()
