"""The SpecDiff decisions as small pure functions (no model, no state): which steps are
full, the speculative schedule, token scores, the three tiers and the blend weights.

Conventions: ``sigma`` is the flow-matching noise level in ``[0, 1]`` (1 = pure noise);
scores are ``[B, N]`` float tensors; a generation runs from high to low sigma.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .config import SpecDiffConfig

EPS = 1e-12


def is_full_step(step: int, sigma: float, refreshed: set[float], config: SpecDiffConfig) -> bool:
    """Whether main step ``step`` (0-based) at ``sigma`` computes every token.

    Full steps: the first ``warmup_steps`` steps, and the first step whose progress
    ``1 - sigma`` reaches each point of ``refresh_at`` (each point once; the caller adds
    the points this call consumes to ``refreshed``, see :func:`due_refresh_points`).
    Needs no step count: it reads only the sigmas the pipeline passes.
    """
    return step < config.warmup_steps or bool(due_refresh_points(sigma, refreshed, config))


def due_refresh_points(sigma: float, refreshed: set[float], config: SpecDiffConfig) -> list[float]:
    progress = 1.0 - sigma
    return [p for p in config.refresh_at if progress >= p and p not in refreshed]


def speculative_sigmas(sigma0: float, steps: int) -> list[float]:
    """Sigmas of the speculative pre-run: ``steps`` Euler steps from ``sigma0`` to 0 on a
    uniform grid; the first is ``sigma0`` itself (shared with main step 0)."""
    return [sigma0 * (1.0 - j / steps) for j in range(steps)]


def future_score(spec: Sequence[tuple[float, torch.Tensor]], sigma: float) -> torch.Tensor | None:
    """The speculative score at the nearest speculative sigma at or after ``sigma`` (i.e.
    the largest speculative sigma ``<= sigma``; the last one if all are larger)."""
    if not spec:
        return None
    later = [(s, sc) for s, sc in spec if s <= sigma + 1e-9]
    return max(later, key=lambda p: p[0])[1] if later else min(spec, key=lambda p: p[0])[1]


def normalise(score: torch.Tensor) -> torch.Tensor:
    """Per-sample mean normalisation: each row divided by its mean (so mean 1).

    Why: ``his`` may come from a full step (all queries) or a cached step (k queries) and
    ``fut`` from another run; their absolute scales differ, their relative order matters.
    Mean normalisation makes the product scale-free and keeps the starvation term
    ``exp(s * cached_for)`` comparable across steps."""
    score = score.float().clamp_min(0)
    return score / score.mean(dim=-1, keepdim=True).clamp_min(EPS)


def token_scores(his: torch.Tensor, fut: torch.Tensor | None, cached_for: torch.Tensor,
                 starvation_scale: float) -> torch.Tensor:
    """``score = his * fut * exp(s * cached_for)`` with normalised ``his`` and ``fut``
    (``his`` is the attention received, or the drift of :func:`drift_scores`)."""
    score = normalise(his)
    if fut is not None:
        score = score * normalise(fut)
    return score * torch.exp(starvation_scale * cached_for.float())


def drift_scores(fresh: torch.Tensor, fresh_sigma: torch.Tensor, sigma: float) -> torch.Tensor:
    """Predicted staleness of each token's last computed output at ``sigma``, ``[B, N]``.

    ``fresh`` ``[2, B, N, C]`` holds each token's last two computed outputs ``(F1, F2)``,
    computed at ``fresh_sigma`` ``(s1, s2)``. The output drifted at rate
    ``|F1 - F2| / (s2 - s1)`` per unit of sigma between them; the score is that rate times
    the sigma travelled since ``F1``: ``|F1 - F2| * (s1 - sigma) / (s2 - s1)``, the first-order
    estimate of how far the reused output is from a fresh one now.

    Tokens with a single computed output (``s1 == s2``) have no rate yet: they get the
    largest rate of their sample (so they are refreshed first, ties broken by the sigma
    travelled; with no rate anywhere, the score is the sigma travelled)."""
    return staleness((fresh[0].float() - fresh[1].float()).norm(dim=-1), fresh_sigma, sigma)


def staleness(change: torch.Tensor, fresh_sigma: torch.Tensor, sigma: float) -> torch.Tensor:
    """:func:`drift_scores` from each token's change between its last two computations,
    ``change`` ``[B, N]`` (a norm), instead of the outputs themselves (text tokens, which
    have no output of their own, pass the change of their K/V)."""
    s1, s2 = fresh_sigma[0].float(), fresh_sigma[1].float()
    gap = s2 - s1
    known = gap > 1e-9
    rate = change.float() / torch.where(known, gap, torch.ones_like(gap))
    rate = torch.where(known, rate, torch.zeros_like(rate))
    top = rate.amax(dim=-1, keepdim=True)
    top = torch.where(top > 0, top, torch.ones_like(top))
    rate = torch.where(known, rate, top.expand_as(rate))
    return rate * (s1 - sigma).clamp_min(0.0)


def future_drift(spec: Sequence[tuple[float, torch.Tensor]], sigma: float) -> torch.Tensor | None:
    """How much each token's output changed in the speculative run over the part of the
    schedule that contains ``sigma``, ``[B, N]``.

    ``spec`` holds the speculative run's ``(sigma_j, tokens_j)`` from high to low sigma;
    the segment ``[sigma_{j+1}, sigma_j]`` containing ``sigma`` (the last one below it)
    gives ``|tokens_{j+1} - tokens_j|``. ``None`` with fewer than two speculative outputs."""
    if len(spec) < 2:
        return None
    j = 0
    while j + 2 < len(spec) and spec[j + 1][0] > sigma + 1e-9:
        j += 1
    return (spec[j + 1][1].float() - spec[j][1].float()).norm(dim=-1)


def extrapolation_ratio(fresh_sigma: torch.Tensor, sigma: float, max_ratio: float = 1.5) -> torch.Tensor:
    """``r`` ``[B, N]`` of the first-order extrapolation ``F1 + r * (F1 - F2)`` of a value
    computed at ``s1`` (and before at ``s2``) to ``sigma``: ``r = (s1 - sigma) / (s2 - s1)``,
    clamped to ``[0, max_ratio]``; 0 while a token has one computation only."""
    s1, s2 = fresh_sigma[0], fresh_sigma[1]
    gap = s2 - s1
    known = gap > 1e-9
    r = (s1 - sigma) / torch.where(known, gap, torch.ones_like(gap))
    return torch.where(known, r, torch.zeros_like(r)).clamp(0.0, max_ratio)


def choose_tokens(score: torch.Tensor, k: int, probes: int = 0, seed: int = 0,
                  groups: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` tokens to compute per sample: the ``k - probes`` best scores and ``probes``
    tokens drawn uniformly at random from the others (a deterministic draw for ``seed``;
    samples of one group, the CFG halves of an image, draw the same).

    Returns ``idx`` ``[B, k]`` sorted by position and ``probe`` ``[B, probes]``, the drawn
    positions: their fresh outputs against their reused ones measure, without bias, the
    error of not computing the tokens the score left out."""
    b, n = score.shape
    top = torch.topk(score, k - probes, dim=1).indices
    if probes <= 0:
        return top.sort(dim=1).values, top[:, :0]
    draw = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)).to(score.device)
    if groups is not None:
        draw = draw[groups]
    draw.scatter_(1, top, -1.0)  # never draw a top token
    probe = torch.topk(draw, probes, dim=1).indices
    return torch.cat([top, probe], dim=1).sort(dim=1).values, probe


def assign_tiers(score: torch.Tensor, k: int, reuse_mass: float, blend: bool = True,
                 idx: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The three tiers per sample.

    Returns ``idx`` ``[B, k]`` (C1: top-k scores, sorted by position; or the given ``idx``)
    and ``tier`` ``[B, N]`` int8: 1 computed, 2 reused (the lowest scores whose sum stays
    within ``reuse_mass`` of the total score mass), 3 blended (the rest). ``blend=False``
    puts every non-computed token in C2.
    """
    b, n = score.shape
    if idx is None:
        idx = torch.topk(score, k, dim=1).indices.sort(dim=1).values
    tier = torch.full((b, n), 3 if blend else 2, dtype=torch.int8, device=score.device)
    tier.scatter_(1, idx, 1)
    if blend and reuse_mass > 0:
        rest = score.masked_fill(tier == 1, float("inf"))
        order = rest.argsort(dim=1)  # lowest first, computed tokens last
        sorted_scores = torch.gather(score, 1, order).masked_fill(torch.gather(tier, 1, order) == 1, 0.0)
        total = score.sum(dim=1, keepdim=True).clamp_min(EPS)
        reuse = (sorted_scores.cumsum(dim=1) <= reuse_mass * total) & (torch.gather(tier, 1, order) != 1)
        tier.scatter_(1, order, torch.where(reuse, torch.full_like(tier, 2), torch.gather(tier, 1, order)))
    return idx, tier


def blend_weights(past_sigmas: Sequence[float], sigma: float, history: int) -> torch.Tensor:
    """Weights of the last outputs, newest first: ``w_j ∝ exp(-j) * |sigma_{now-j} - sigma|``
    for ``j = 1 .. len(past_sigmas)`` (at most ``history``), normalised to sum 1; zero for
    missing history. If every distance is 0, the newest output gets weight 1."""
    w = torch.zeros(history)
    for j, s in enumerate(past_sigmas[:history], start=1):
        w[j - 1] = math.exp(-j) * abs(s - sigma)
    if w.sum() <= 0:
        w.zero_()
        w[0] = 1.0
    return w / w.sum()


def tier_weights(tier: torch.Tensor, blend: torch.Tensor) -> torch.Tensor:
    """``[B, N, H]`` rows for the in-graph blend: one-hot newest for C2, ``blend`` for C3,
    zeros for C1 (overwritten by the fresh outputs)."""
    b, n = tier.shape
    h = blend.shape[0]
    w = torch.zeros(b, n, h, device=tier.device)
    w[..., 0] = (tier == 2).float()
    w += (tier == 3).float().unsqueeze(-1) * blend.to(tier.device)
    return w


def taylor_weights(tier: torch.Tensor | None, fresh_sigma: torch.Tensor, sigma: float, history: int,
                   max_ratio: float = 1.5, reach: float = 0.0) -> torch.Tensor:
    """``[B, N, H]`` rows over each token's last two *computed* outputs ``(F1, F2)``: C3
    extrapolates to first order in sigma, ``F1 + (sigma - s1) / (s1 - s2) * (F1 - F2)``
    (weights ``1 + r, -r``, ``r`` clamped to ``[0, max_ratio]``; ``r = 0`` while a token has one
    computed output only); C2 carries ``F1`` the share ``reach`` of that way (``0``: reuses
    it); C1 rows are zeros (overwritten by the fresh outputs). ``tier=None``: every token C2
    (a skipped call). Needs ``history >= 2``."""
    r = extrapolation_ratio(fresh_sigma, sigma, max_ratio)
    b, n = r.shape
    w = torch.zeros(b, n, history, device=r.device)
    c2 = torch.ones_like(r) if tier is None else (tier == 2).float()
    c3 = torch.zeros_like(r) if tier is None else (tier == 3).float()
    slope = (c2 * reach + c3) * r
    w[..., 0] = c2 + c3 + slope
    if history > 1:
        w[..., 1] = -slope
    return w
