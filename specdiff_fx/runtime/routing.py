"""Call routing: which generation, and which branch of it, a call belongs to.

A server interleaves requests, so "the previous call" is not the same generation. A call is
matched by what stays fixed through a generation and by how its latent moved:

* the **model** (the storage of one of its weights: two models that share one compiled graph
  keep separate state) and the **conditioning** (every graph input that is neither the
  latent, the timestep nor a weight: prompt embeddings, pooled projections, guidance, ids),
  compared exactly;
* a **monotone sigma**: a continuation runs at a lower sigma than the branch's last call;
* the **latent update**: a sampler moves the latent by a combination of what the model just
  returned (for every branch of the generation: CFG combines cond and uncond) and of the
  latents themselves (multistep samplers), so ``x - x_last`` lies in the span of
  ``{x_last, x_prev, the branches' last two outputs}`` (per sample, over the samples that
  started from the same latent: batched CFG), up to the rounding of the latent's dtype.
  The candidate that explains the update best wins if what it leaves unexplained stays
  below :data:`SPAN_TOLERANCE` of the update. A latent that no live generation explains
  starts a new generation: a wrong match would read another image's caches, a missed one
  only costs a full step.

A call that continues no branch but has the *same* sigma and the *same* latent as a
branch's last call is a further branch of that generation (FLUX true-CFG: cond, then
uncond, each with its own conditioning). It becomes a *member* that shares the step's
decision and token choice with the first branch once it is called with that branch's latent
at a second sigma as well (true CFG updates both from one guided velocity); until then it
decides alone: two requests that merely started from the same noise at the same time never
share anything.

Generations are kept in a bounded LRU (``SpecDiffConfig.max_generations``); the least
recently used one is evicted with a note when a new one would exceed the bound.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..telemetry import GenerationReport
from .state import BranchState, nbytes

log = logging.getLogger("specdiff_fx.runtime")

#: a continuation's latent update may leave at most this share of its norm unexplained
#: (beyond the latent dtype's rounding); another generation's latent leaves nearly all of it
SPAN_TOLERANCE = 0.05
_IDS = itertools.count(1)


def _same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-7 * max(1.0, abs(a))


@dataclass
class Trace:
    """What routing remembers of a branch's calls: the last two latents, sigmas and outputs."""

    sigmas: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))  # newest first
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))
    outputs: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))

    def push(self, sigma: float, sample: torch.Tensor, output: Any) -> None:
        self.sigmas.appendleft(sigma)
        self.samples.appendleft(sample.detach().clone())
        out = output if isinstance(output, torch.Tensor) and output.shape == sample.shape else None
        self.outputs.appendleft(None if out is None else out.detach().clone())

    def output_at(self, sigma: float) -> torch.Tensor | None:
        for s, out in zip(self.sigmas, self.outputs):
            if _same_sigma(s, sigma):
                return out
        return None

    @property
    def nbytes(self) -> int:
        return nbytes(*self.samples, *[o for o in self.outputs if o is not None])


@dataclass
class Branch:
    """One stream of calls within a generation, with the controller's state and the step's
    plan it uses while it is not a member (see the module docstring)."""

    conditioning: tuple[Any, ...]
    state: BranchState
    policy: Any = None
    trace: Trace = field(default_factory=Trace)
    plan: "StepPlan | None" = None


@dataclass
class StepPlan:
    """What the first member called at a sigma decided, for the generation's other members
    at that sigma (true CFG: cond and uncond compute the same tokens on the same steps, as
    the two halves of a batched CFG call do: guidance amplifies their difference)."""

    sigma: float
    decision: Any
    idx: torch.Tensor | None = None  # [B, k] the computed tokens (sparse)
    probe: torch.Tensor | None = None  # [B, p] those of them drawn at random


@dataclass
class Generation:
    """One denoising run: its branches, its report, its model. Branch 0 and the branches
    confirmed to move with it (``members``) share branch 0's controller state and plans."""

    model: int | None
    report: GenerationReport
    branches: list[Branch] = field(default_factory=list)
    members: set[int] = field(default_factory=lambda: {0})
    id: int = field(default_factory=lambda: next(_IDS))

    def leader(self, j: int) -> Branch:
        """The branch whose controller state and plans branch ``j`` uses."""
        return self.branches[0] if j in self.members else self.branches[j]

    def confirm(self, j: int, sigma: float, sample: torch.Tensor) -> None:
        """Branch ``j`` becomes a member if a member was called at ``sigma`` with ``sample``
        and ``j`` already ran at an earlier sigma."""
        br = self.branches[j]
        if j in self.members or not br.trace.sigmas:
            return
        for m in self.members:
            t = self.branches[m].trace
            if t.sigmas and _same_sigma(t.sigmas[0], sigma) and t.samples[0].shape == sample.shape \
                    and torch.equal(t.samples[0], sample):
                self.members.add(j)
                return

    @property
    def held_bytes(self) -> int:
        return sum(b.state.held_bytes + b.trace.nbytes for b in self.branches)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b)))
    return a == b


def same_conditioning(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _rounding(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def unexplained(sample: torch.Tensor, generation: Generation, branch: Branch,
                groups: torch.Tensor | None, rows: tuple[int, int] | None = None) -> float:
    """The largest, over samples, relative residual of ``sample - x_last`` after projecting
    it onto the span of what a sampler could have combined it from (see the module
    docstring), less the latent dtype's rounding of ``sample``; ``inf`` when the branch has
    no earlier call of this shape or nothing to project on. ``rows`` (offset, length on
    axis 1) restricts the test to the image tokens of a latent that carries context tokens
    the sampler does not move (FLUX.2 reference images)."""
    trace = branch.trace
    if not trace.samples or trace.samples[0].shape != sample.shape:
        return float("inf")
    b = sample.shape[0]
    take = (lambda t: t.narrow(1, *rows)) if rows is not None else (lambda t: t)
    latents = [take(t).reshape(b, -1) for t in trace.samples]  # x_last (, x_prev)
    outputs = [take(out).reshape(b, -1) for other in generation.branches for s in trace.sigmas
               for out in [other.trace.output_at(s)] if out is not None and out.shape == sample.shape]
    sample = take(sample)
    if not outputs:
        return float("inf")
    group_of = groups.tolist() if groups is not None else list(range(b))
    flat = sample.reshape(b, -1)
    members = [[j for j in range(b) if group_of[j] == group_of[i]] for i in range(b)]
    by_size: dict[int, list[int]] = collections.defaultdict(list)  # samples with as many members: one batch
    for i, m in enumerate(members):
        # a member whose latents equal those of its group's first member (the halves of a batched
        # CFG call) has the same columns and the same update: the same answer
        first = m[0]
        if i == first or not (torch.equal(flat[i], flat[first])
                              and all(torch.equal(x[i], x[first]) for x in latents)):
            by_size[len(m)].append(i)
    # float32 arithmetic (float64 for float64 latents): the decision compares a share with 5 %, which
    # the QR's rounding moves far less (3e-8 against float64 least squares in the tests; an update
    # of 1e-4 of the latent still reads as a continuation); a third less time than float64
    work = torch.float64 if sample.dtype == torch.float64 else torch.float32
    shares = []
    for size, rows_i in by_size.items():
        idx = torch.tensor(rows_i, device=flat.device)
        mem = torch.tensor([members[i] for i in rows_i], device=flat.device)  # [b', size]
        cols = torch.stack([x.index_select(0, idx) for x in latents]
                           + [o.index_select(0, mem[:, k]) for o in outputs for k in range(size)], dim=1).to(work)
        a = cols.transpose(1, 2)  # [b', n, columns]: what sample i's update may combine (column-major, as QR wants)
        x = flat.index_select(0, idx).to(work)
        d = x - cols[:, 0]  # cols[:, 0] is x_last
        slack = 2 * _rounding(sample.dtype) * x.norm(dim=1)
        shares.append(_unexplained_share(a, d, slack))
    # one synchronisation for the batch; NaN/Inf latents or outputs (a non-finite share): nothing to match on
    worst = float(torch.stack(shares).max())
    return worst if math.isfinite(worst) else float("inf")


def _unexplained_share(a: torch.Tensor, d: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """The largest over the batch of ``max(0, |d - P d| - slack) / |d|``, ``P`` the projection
    onto the span of ``a``'s columns (``a``: ``[b, n, m]``, ``d``: ``[b, n]``); 0 where ``d`` is 0
    (a zero update is in every span); NaN or Inf where ``a`` or ``d`` is not finite. A 0-d tensor
    (the caller synchronises once per batch)."""
    # an orthonormal basis of a space that holds the span, from the Householder QR of ``a``
    # itself: orthonormal to rounding whatever the columns' conditioning (the Gram matrix's
    # squared condition number once let rounding decide the rank: a continuation was sometimes
    # not recognised). A column that depends on the earlier ones adds a direction of rounding
    # noise, which explains about 1/n of an update that lies outside the span: nothing that
    # moves the decision. Half the time of the SVD it replaces, same shares.
    q, _ = torch.linalg.qr(a)
    residual = (d - (q @ (q.transpose(1, 2) @ d.unsqueeze(-1))).squeeze(-1)).norm(dim=1)
    norm = d.norm(dim=1)
    tiny = torch.finfo(norm.dtype).tiny  # 1e-300 underflows in float32
    share = torch.where(norm > 0, (residual - slack).clamp_min(0) / norm.clamp_min(tiny), torch.zeros_like(norm))
    finite = torch.isfinite(a.sum()) & torch.isfinite(norm).all()
    return torch.where(finite, share.max(), torch.full_like(norm[0], float("nan")))


class Router:
    """The live generations of one runtime, and the matching of calls to them."""

    def __init__(self, max_generations: int) -> None:
        self.max_generations = max_generations
        self.generations: collections.OrderedDict[int, Generation] = collections.OrderedDict()  # LRU order
        self.evicted = 0

    def clear(self) -> None:
        self.generations.clear()

    def route(self, model: int | None, conditioning: tuple[Any, ...], sigma: float,
              sample: torch.Tensor, rows: tuple[int, int] | None = None) -> tuple[Generation, int] | None:
        """The (generation, branch index) this call continues or joins; ``None``: a new
        generation. Marks the generation most recently used."""
        best, best_score = None, SPAN_TOLERANCE
        live = [g for g in self.generations.values() if g.model == model]
        for gen in live:  # a continuation: same conditioning, lower sigma, the latent moved as a sampler moves it
            for j, br in enumerate(gen.branches):
                last = br.trace.sigmas[0] if br.trace.sigmas else None
                if (last is not None and last > sigma and not _same_sigma(last, sigma)
                        and same_conditioning(br.conditioning, conditioning)):
                    score = unexplained(sample, gen, br, br.state.groups, rows)
                    if score < best_score or (best is None and score <= best_score):
                        best, best_score = (gen, j), score
        if best is None:  # a further branch: the same sigma and latent as a call of this generation
            best = next(((gen, len(gen.branches)) for gen in live for br in gen.branches
                         if br.trace.sigmas and _same_sigma(br.trace.sigmas[0], sigma)
                         and br.trace.samples[0].shape == sample.shape
                         and torch.equal(br.trace.samples[0], sample)), None)
        if best is not None:
            self.generations.move_to_end(best[0].id)
        return best

    def add(self, generation: Generation) -> list[Generation]:
        """Register a new generation; returns the generations evicted to make room."""
        evicted = []
        while len(self.generations) >= self.max_generations:
            _, old = self.generations.popitem(last=False)
            evicted.append(old)
            self.evicted += 1
        self.generations[generation.id] = generation
        return evicted

    @property
    def held_bytes(self) -> int:
        return sum(g.held_bytes for g in self.generations.values())
