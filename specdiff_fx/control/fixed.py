"""The fixed schedule: full steps at fixed points, the same ``k`` on every other step.

Full: the first ``warmup_steps`` calls, and the first call whose progress ``1 - sigma``
reaches each point of ``refresh_at`` (each point once). Every other call is sparse with
``k = round((1 - cache_ratio) * N)``. Reads only the sigmas, never the step count.
"""

from __future__ import annotations

from .. import schedule
from .base import Decision, Policy, StepView, register_policy


@register_policy
class FixedSchedule(Policy):
    name = "fixed"
    options = ("warmup_steps", "refresh_at")

    def start(self) -> set[float]:
        return set()  # the refresh points consumed so far

    def decide(self, state: set[float], view: StepView) -> Decision:
        cfg = self.config
        due = schedule.due_refresh_points(view.sigma, state, cfg)
        state.update(due)  # a full call for any reason consumes the points it passed
        if view.step < cfg.warmup_steps:
            return Decision.full("warm-up")
        if due:
            return Decision.full(f"refresh at progress {due[0]:g}")
        return Decision.sparse(cfg.num_computed(self.num_tokens))
