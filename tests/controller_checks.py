"""What every generation under the default (error-controlled) controller shows in its report."""

from __future__ import annotations

from specdiff_fx.control import StepView
from specdiff_fx.control.error import ErrorControlled


def assert_error_controlled(rep, steps: int, late_phase: bool = True) -> None:
    """Step 0 full, some calls cached, a full call at least every ``max_interval`` of sigma
    (``late_interval`` below ``late_sigma`` where the late phase applies: ``late_phase=False`` for
    a multistep or second-order sampler; weighted like the policy weighs it), the final jump full,
    and the branches of one step (true CFG) decided alike."""
    main = rep.main_steps
    full = [s for s in main if s.kind == "full" and s.branch == 0]
    assert full and full[0].step == 0 and len(full) < steps, [s.step for s in full]
    sigmas = sorted({s.sigma for s in main if s.branch == 0}, reverse=True)
    refresh = full[0].sigma
    for before, sigma in zip([None, *sigmas], sigmas):
        if any(s.sigma == sigma for s in full):
            refresh = sigma
        gap = before - sigma if before is not None else 0.0
        weight = min(1.0, sigma / gap) if gap > 0 else 1.0  # a short last step is exempt
        late = late_phase and sigma < ErrorControlled.late_sigma
        bound = ErrorControlled.late_interval if late else ErrorControlled.max_interval
        assert (refresh - sigma) * weight < bound + 1e-9, (refresh, sigma)
        view = StepView(step=0, sigma=sigma, sigmas=tuple(sigmas[:sigmas.index(sigma)]), num_tokens=1)
        if ErrorControlled.final_jump(view):
            assert any(s.sigma == sigma for s in full), ("the final jump is cached", sigma)
    kinds = {}
    for s in main:
        kinds.setdefault(s.step, set()).add(s.kind)
    assert all(len(k) == 1 for k in kinds.values()), kinds
