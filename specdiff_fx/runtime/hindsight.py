"""The hindsight correction: what the cached calls between two full calls moved the latent wrong.

A flow-matching sampler moves the latent by ``dt_i * v_i`` on each call (``dt_i = sigma_{i+1}
- sigma_i``, ``v_i`` what the transformer returned, combined over the branches by guidance).
Between two full calls at ``sigma_r`` and ``sigma_t`` the cached calls returned ``v_hat_i``:
reused outputs (and, on a sparse call, the computed tokens' fresh ones). Once the second full
call is computed, the outputs in between are better known than when they were needed: the
linear interpolation ``v_r + a_i (v_t - v_r)``, ``a_i = (sigma_r - sigma_i) / (sigma_r -
sigma_t)``, is two-sided where reuse was one-sided. The displacement the cached calls put in
the latent, against that estimate, is

    C = sum_i dt_i (v_r + a_i (v_t - v_r) - v_hat_i)

and the full call returns ``v_t + C / dt_t`` (scaled, below): the sampler's step ``x + dt_t *
out`` takes the displacement back. Guidance combines the branches' outputs linearly, so each branch (the
halves of a batched CFG call alike) corrects its own outputs and the guided step is corrected
by the same combination.

``dt_t``, the step the full call feeds, is not known when the call returns: its length is estimated
from the schedule so far as ``d1 * (d1 / d2)`` from the last two steps (smooth schedules change
their step geometrically), capped by ``sigma_t`` (a schedule ends at zero, so the last step is
exactly ``sigma_t`` long). A wrong estimate scales the correction by ``dt_t / estimate``, so the
correction is made only where the last two steps differ by at most :data:`STEP_RATIO` (the
pipelines' schedules: at most 1.8, SD3 at shift 3 and FLUX's dynamic shift at 4-100 steps): after a
short step in a custom schedule (0.290 to 0.289, say, where the steps around it are 0.06) the
estimate is a hundredth of the step that follows, and so many times the correction put an image
of a tiny SD3 pipeline 12.5 dB off eager (the same schedule without the correction: 48.9 dB). Such
a full call returns its output as computed, as with ``hindsight=False``.

The correction is scaled by ``1 - |dt_t| / sigma_t``. The model answers a displacement ``dx`` of
the latent with about ``dx / sigma`` in its output, as far as ``dx`` looks like noise to it (the
velocity points from the latent to the image it predicts), so the sampler's step from the full
call's output takes back ``|dt_t| / sigma_t`` of it by itself, and the rest is left to the
correction; on the last step of a schedule (``|dt_t| = sigma_t``) nothing is. Unscaled, corrections
late in the schedule counted the same displacement twice and left a fine-grained error on every
image (on the tune models: 1.2 dB less mean PSNR at 20-50 steps; on the SD3 model at 20 / 50
steps SSIM 0.956 / 0.961 instead of 0.968 / 0.991, BENCHMARKS.md).

The runtime records the corrected output as the branch's output, so routing's span test (the
latent update lies in the span of the branch's outputs) holds. The correction assumes what the
span test already does: the model output is a velocity the sampler integrates over sigma
(Euler; a multistep method spreads the same output over a few steps with weights that sum to
the step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


#: the largest ratio between the last two steps (either way) where the step estimate is trusted
STEP_RATIO = 3.0


def _last_steps(sigmas: list[float], sigma: float) -> tuple[float, float] | None:
    """``(d1, d2)``: the step to a call at ``sigma`` and the step before it, from the sigmas of the
    calls before it (oldest first; ``d2`` 0 with one call before); ``None`` with none."""
    sigmas = [s for s in sigmas if s > sigma]  # a second call at one sigma (Heun) steps on from it
    if not sigmas:
        return None
    return sigmas[-1] - sigma, (sigmas[-2] - sigmas[-1] if len(sigmas) >= 2 else 0.0)


def steady(sigmas: list[float], sigma: float) -> bool:
    """Whether the last two steps before a call at ``sigma`` differ by at most :data:`STEP_RATIO`,
    so :func:`step_estimate` can be trusted; also where fewer than two are known, or the one before
    the last has no length (Heun's corrector at the same sigma: the estimate is the last step)."""
    steps = _last_steps(sigmas, sigma)
    if steps is None or steps[1] <= 0:
        return True
    d1, d2 = steps
    return 1.0 / STEP_RATIO <= d1 / d2 <= STEP_RATIO


def step_estimate(sigmas: list[float], sigma: float) -> float | None:
    """The step (a positive length of sigma) after a call at ``sigma``, from the sigmas of the
    calls before it (oldest first); ``None`` with no call before."""
    steps = _last_steps(sigmas, sigma)
    if steps is None:
        return None
    d1, d2 = steps
    est = d1 * (d1 / d2) if d2 > 0 else d1
    return min(sigma, est)


@dataclass
class Hindsight:
    """Per branch: the last full call's output and the displacement the cached calls since it
    put in the latent, accumulated as their steps become known."""

    ref_sigma: float | None = None
    ref: torch.Tensor | None = None  # the last full call's output (uncorrected), float32
    pending: tuple[float, torch.Tensor] | None = None  # the last cached call: its step is not known yet
    acc: torch.Tensor | None = None  # sum_i dt_i (ref - v_hat_i) over the cached calls settled
    slope: float = 0.0  # sum_i dt_i (ref_sigma - sigma_i): the weight of (v_t - ref) / (ref_sigma - sigma_t)

    def _settle(self, sigma: float) -> None:
        if self.pending is None:
            return
        s_i, v = self.pending
        dt = sigma - s_i
        term = dt * (self.ref - v)
        self.acc = term if self.acc is None else self.acc + term
        self.slope += dt * (self.ref_sigma - s_i)
        self.pending = None

    def cached(self, sigma: float, out: torch.Tensor) -> None:
        """A cached call at ``sigma`` returned ``out``."""
        self._settle(sigma)
        if self.ref is not None:
            self.pending = (sigma, out.detach().to(torch.float32, copy=True))

    def full(self, sigma: float, out: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
        """A full call at ``sigma`` computed ``out`` (``sigmas``: the branch's earlier calls).
        Returns what the call should return: ``out`` plus the correction, if any."""
        self._settle(sigma)
        result = out
        fresh = out.detach().to(torch.float32, copy=True)  # kept as the next reference
        est = step_estimate(sigmas, sigma)
        if (self.acc is not None and est is not None and 0 < est < sigma and self.ref_sigma > sigma
                and steady(sigmas, sigma)):
            c = self.acc + (self.slope / (self.ref_sigma - sigma)) * (fresh - self.ref)
            result = (fresh - (1.0 - est / sigma) * c / est).to(out.dtype)
        self.ref_sigma, self.ref, self.acc, self.slope = sigma, fresh, None, 0.0
        return result

    @property
    def nbytes(self) -> int:
        from .state import nbytes  # state.py imports this module

        return nbytes(self.ref, self.acc, self.pending[1] if self.pending is not None else None)
