"""Call routing: which generation, and which branch of it, a call belongs to.

A server interleaves requests, so "the previous call" is not the same generation. A call is
matched by what stays fixed through a generation and by how its latent moved:

* the **model** (the storage of one of its weights: two models that share one compiled graph
  keep separate state), its **weights** (every module-state input's storage and version
  counter, a number's value: a generation's caches hold only for the weights they were
  computed with) and the **conditioning** (every graph input that is neither the latent, the
  timestep nor a weight: prompt embeddings, pooled projections, guidance, ids), compared
  exactly;
* a **monotone sigma**: a continuation runs at a lower sigma than the branch's last call, or,
  where no branch continues at a lower one, at the same sigma on another latent: a second-order
  sampler (Heun) calls the model at a step's end sigma twice, on the Euler-predicted latent (the
  corrector) and on the corrected one (the next step's first call). The same latent at the same
  sigma is a further branch (below), except after a second-order branch's corrector: a corrector
  that returned what its step's first call did leaves the corrected latent where it predicted;
* the **latent update**: a sampler moves the latent by a combination of what the model just
  returned (for every branch of the generation: CFG combines cond and uncond) and of the
  latents themselves (multistep samplers), so ``x - x_last`` lies in the span of
  ``{x_last, x_prev, the branches' last two outputs}`` (per sample, over the samples that
  started from the same latent: batched CFG), up to the rounding of the latent's dtype.
  The candidate that explains the update best wins if what it leaves unexplained stays
  below :data:`SPAN_TOLERANCE` of the update. Where several candidates continue at a lower
  sigma, one whose newest call alone explains the update (one sampler step from its last
  latent) goes before those that need older calls: two requests with the same noise and
  prompt share their first call, and each one's next latent is also a combination of the
  other's older outputs; the newest call tells them apart. A latent that no live generation explains
  starts a new generation: a wrong match would read another image's caches, a missed one
  only costs a full step.

The sampler may also combine outputs of calls this runtime never saw: another compiled graph of
the same model, called on the same latent at the same sigma (SD3.5's skip-layer guidance calls
the transformer a second time per step with some blocks left out: Dynamo compiles that as a
graph of its own, with a runtime of its own). When a branch's own span leaves the update
unexplained, the router tries again with those *companion* outputs added: the outputs of other
runtimes' calls of the same model whose latent rows equal the branch's at one of its sigmas
(:func:`companion_columns`). Equality of the latent at the same sigma is what ties them to this
image; the call itself stays in its own runtime, with its own caches and decisions.

Branches of one image in two runtimes are *linked* once both ran on the same latent at two
sigmas running (:class:`Link`, made by the runtime): the branches of one guided velocity whose
conditionings differ in shape (a negative prompt of another token length than the prompt's is
another graph). Linked, they share the controller's state and each step's plan, as members do.

Some samplers rescale the guided velocity per token: Qwen-Image's true CFG gives each token the
norm of its cond output (``comb * |cond| / |comb|`` over the token's channels), which no
combination of whole latents and outputs gives. When neither test above explains the update,
the router tests a step to a lower sigma *token by token* (:func:`unexplained` with ``per_token``;
at the same sigma another request's latent rescaled per token, e.g. an edit's reference image
scaled, would pass it): each token's
update must lie in the span of that token's columns, with coefficients of its own. It is tried
only where a token has at least twice as many channels as there are columns to explain with,
so that another image's latent still leaves most of its update unexplained (a random update
keeps about ``sqrt(1 - columns / channels)`` of its norm: at least 70 %, against the 5 % allowed).

A call that continues no branch but has the *same* sigma and the *same* latent as a
branch's last call, under a conditioning no branch of that generation ran there, is a further
branch of that generation (FLUX true-CFG: cond, then uncond, each with its own conditioning).
It becomes a *member* that shares the step's decision and token choice with the first branch
once it is called with that branch's latent at a second sigma as well (true CFG updates both
from one guided velocity); until then it decides alone: two requests that merely started from
the same noise at the same time never share anything. The same call again (same latent, sigma
and conditioning: one request twice, in flight together or retried) is another generation. Where
it repeats a branch other than the first and a third branch ran on that latent too (two true-CFG
requests from the same noise with one negative prompt: the second's cond call joined the first's
generation), the generation is dropped (:meth:`Router._shared`): nothing tells which of its
branches are whose, and kept it would explain both requests' next latents.

Where several generations explain a call equally well, their calls so far were the same (one
request twice) and any of them would give it the same output; the most recently used one takes
it. A request retried after it was abandoned or failed mid-way (an error raised from a call: its
generation may have stopped caching) thus continues its own generation and not the abandoned one,
whose last calls lie further back; two copies in flight together trade generations step by step,
each step's calls going to one generation each, which changes no output.

Generations are kept in a bounded LRU (``SpecDiffConfig.max_generations``); one is evicted
with a note when a new one would exceed the bound (:meth:`Router.add`). The traces of the last
few generations evicted or dropped are remembered (:class:`Remembered`): a generation that
starts over where one of them left off takes them (:meth:`Router.inherit`), so that a
multistep sampler's next update, which combines the last two calls' outputs, still continues it.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..telemetry import GenerationReport
from .state import BranchState, UpdateOrder, _same_sigma, nbytes

log = logging.getLogger("specdiff_fx.runtime")

#: a continuation's latent update may leave at most this share of its norm unexplained
#: (beyond the latent dtype's rounding); another generation's latent leaves nearly all of it
SPAN_TOLERANCE = 0.05
_IDS = itertools.count(1)
_TICKS = itertools.count()  # orders the calls of every runtime (:attr:`Trace.tick`)
_PLANS = itertools.count(1)


def _continues(branch: "Branch", sigma: float, sample: torch.Tensor) -> bool:
    """Whether a call at ``sigma`` on ``sample`` may continue ``branch``: at a lower sigma than its
    last call, or at the same sigma on another latent (Heun: the corrector's call on the
    Euler-predicted latent, then the next step's first call on the corrected one, both at that
    step's end sigma). The same latent at the same sigma continues only a branch already seen to
    be second-order whose last call was a corrector (a corrector that returned what its step's
    first call did corrects nothing: the next step starts on the predicted latent); otherwise it
    is a further branch (true CFG's uncond call) or another request from the same noise."""
    last = branch.trace.sigmas[0]
    if not _same_sigma(last, sigma):
        return last > sigma
    return not branch.called_on(sigma, sample) or (branch.state.second_order and not branch.state.recalled)


@dataclass
class Trace:
    """What routing remembers of a branch's calls: the last two latents, sigmas and outputs, and
    the output of the call before them (``older``: for the other branches' span tests only)."""

    sigmas: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))  # newest first
    samples: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))
    outputs: collections.deque = field(default_factory=lambda: collections.deque(maxlen=2))
    #: when the newest call ran, in the order of every call of the process (:data:`_TICKS`)
    tick: int = -1
    #: ``(sigma, output)`` of the call before the two kept: the branch called first in a step (true
    #: CFG's cond) has moved on when the next one (uncond) is tested, whose update under a
    #: multistep sampler combines both branches' outputs at the two sigmas before
    older: tuple[float, torch.Tensor | None] | None = None

    def push(self, sigma: float, sample: torch.Tensor, output: Any) -> None:
        out = output if isinstance(output, torch.Tensor) and output.shape == sample.shape else None
        self.push_kept(sigma, sample.detach().clone(), None if out is None else out.detach().clone())

    def copy(self) -> "Trace":
        """Another trace of the same calls (the tensors shared: a trace never writes them)."""
        t = Trace()
        for sigma, sample, output in zip(reversed(self.sigmas), reversed(self.samples), reversed(self.outputs)):
            t.push_kept(sigma, sample, output)
        t.older = self.older
        return t

    def newest(self) -> "Trace":
        """The trace of the last call alone."""
        t = Trace()
        t.push_kept(self.sigmas[0], self.samples[0], self.outputs[0])
        return t

    def push_kept(self, sigma: float, sample: torch.Tensor, output: torch.Tensor | None) -> None:
        """:meth:`push` of tensors already kept by a trace (no copy)."""
        if len(self.sigmas) == self.sigmas.maxlen:
            self.older = (self.sigmas[-1], self.outputs[-1])
        self.sigmas.appendleft(sigma)
        self.samples.appendleft(sample)
        self.outputs.appendleft(output)
        self.tick = next(_TICKS)

    def output_at(self, sigma: float) -> torch.Tensor | None:
        for s, out in zip(self.sigmas, self.outputs):
            if _same_sigma(s, sigma):
                return out
        if self.older is not None and _same_sigma(self.older[0], sigma):
            return self.older[1]
        return None

    @property
    def nbytes(self) -> int:
        older = [self.older[1]] if self.older is not None and self.older[1] is not None else []
        return nbytes(*self.samples, *[o for o in self.outputs if o is not None], *older)


@dataclass
class Branch:
    """One stream of calls within a generation, with the controller's state and the step's
    plan it uses while it is not a member (see the module docstring)."""

    conditioning: tuple[Any, ...]
    state: BranchState
    policy: Any = None
    trace: Trace = field(default_factory=Trace)
    plan: "StepPlan | None" = None
    link: "Link | None" = None

    def last_called_on(self, sigma: float, sample: torch.Tensor) -> bool:
        """Whether the branch's newest call ran at ``sigma`` on exactly ``sample``."""
        t = self.trace
        return bool(t.sigmas) and _same_sigma(t.sigmas[0], sigma) and t.samples[0].shape == sample.shape \
            and torch.equal(t.samples[0], sample)

    def called_on(self, sigma: float, sample: torch.Tensor) -> bool:
        """Whether one of the calls the trace remembers ran at ``sigma`` on exactly ``sample``."""
        return any(_same_sigma(s, sigma) and x.shape == sample.shape and x.dtype == sample.dtype
                   and x.device == sample.device and torch.equal(x, sample)
                   for s, x in zip(self.trace.sigmas, self.trace.samples))


@dataclass(eq=False)
class Link:
    """Leader branches of one image in several runtimes (graphs) of one model: called on the same
    latent at the same sigmas at two steps running, so moved by one guided velocity (a negative
    prompt of another token length than the prompt's is another graph). Like the members of a
    generation they share the controller's state and each step's plan (decision and tokens):
    guidance amplifies the difference of their outputs. Each keeps its own caches."""

    policy: Any
    plan: "StepPlan | None" = None
    #: the linked branches' generations (weak: an evicted one is not kept alive by its partner)
    generations: list = field(default_factory=list)

    def live(self) -> list["Generation"]:
        return [g for g in (ref() for ref in self.generations) if g is not None]


@dataclass
class StepPlan:
    """What the first member called at a sigma decided, for the generation's other members
    at that sigma (true CFG: cond and uncond compute the same tokens on the same steps, as
    the two halves of a batched CFG call do: guidance amplifies their difference)."""

    sigma: float
    decision: Any
    idx: torch.Tensor | None = None  # [B, k] the computed tokens (sparse)
    probe: torch.Tensor | None = None  # [B, p] those of them drawn at random
    #: [B, m] those of them chosen by score that the measured error covers (a cache_ratio below
    #: the default's: :meth:`SpecDiffRuntime._measured_computed`); None: none
    measured: torch.Tensor | None = None
    #: the branches that ran with it (``id`` of their :class:`BranchState`): a branch called
    #: again at the same sigma (a second-order sampler's next step) decides anew
    used: set = field(default_factory=set)
    id: int = field(default_factory=lambda: next(_PLANS))  # the controller's key of the step (``Observation.step``)


@dataclass
class Generation:
    """One denoising run: its branches, its report, its model. Branch 0 and the branches
    confirmed to move with it (``members``) share branch 0's controller state and plans."""

    model: int | None
    report: GenerationReport
    #: the model's state when the generation ran (:meth:`SpecDiffRuntime._weights`): a call under
    #: other weights (changed in place) or another module-state value never continues it
    weights: tuple = ()
    branches: list[Branch] = field(default_factory=list)
    members: set[int] = field(default_factory=lambda: {0})
    id: int = field(default_factory=lambda: next(_IDS))
    #: observations whose measured error is still a device tensor, in call order; the runtime
    #: hands them to the policy at the generation's next call (:meth:`SpecDiffRuntime._settle`)
    pending: list = field(default_factory=list)
    #: the dropped or evicted generation whose traces this one's branches took (:meth:`Router.inherit`)
    ancestor: "Remembered | None" = None

    def leader(self, j: int) -> Branch:
        """The branch whose controller state and plans branch ``j`` uses."""
        return self.branches[0] if j in self.members else self.branches[j]

    def confirm(self, j: int, sigma: float, sample: torch.Tensor) -> None:
        """Branch ``j`` becomes a member if a member was called at ``sigma`` with ``sample``
        and ``j`` already ran at an earlier sigma."""
        br = self.branches[j]
        if j in self.members or not br.trace.sigmas:
            return
        if any(self.branches[m].last_called_on(sigma, sample) for m in self.members):
            self.members.add(j)

    @property
    def held_bytes(self) -> int:
        return sum(b.state.held_bytes + b.trace.nbytes for b in self.branches)

    @property
    def first_call_only(self) -> bool:
        """Whether every branch ran one call (the generation was never continued)."""
        return all(b.state.step <= 1 for b in self.branches)


@dataclass
class Remembered:
    """What routing keeps of a generation dropped or evicted: each branch's conditioning, trace
    and sample groups (no caches, no controller state), for :meth:`Router.inherit`."""

    model: int | None
    weights: tuple
    branches: list[Branch]

    @classmethod
    def of(cls, gen: Generation) -> "Remembered":
        return cls(gen.model, gen.weights, [Branch(br.conditioning, _Groups(br.state.groups), trace=br.trace)
                                            for br in gen.branches if br.trace.sigmas])


@dataclass
class _Groups:
    """The one part of a branch's state a remembered branch keeps."""

    groups: torch.Tensor | None


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and a.device == b.device and (a is b or torch.equal(a, b)))
    return a == b


def same_conditioning(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))


def _rounding(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


@functools.lru_cache(maxsize=64)
def _group_members(group_of: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Per sample, the samples of its group (its own first), for the group ids ``group_of``."""
    return tuple(tuple(j for j, g in enumerate(group_of) if g == gi) for gi in group_of)


@functools.lru_cache(maxsize=256)
def _columns_index(members: tuple[tuple[int, ...], ...], rows: tuple[int, ...], n_lat: int, n_out: int,
                   device: torch.device) -> torch.Tensor:
    """Where each of ``rows``' columns lies in the stacked ``[n_lat + n_out + 1, b, n]`` tensor
    (the latents, the outputs, the update; flattened over its first two axes): its latents, every
    output at each member of its group, then its update; ``[len(rows) * (m + 1)]``."""
    b, size = len(members), len(members[rows[0]])
    which = list(range(n_lat)) + [n_lat + o for o in range(n_out) for _ in range(size)] + [n_lat + n_out]
    at = [[i] * n_lat + [members[i][k] for _ in range(n_out) for k in range(size)] + [i] for i in rows]
    return torch.tensor([w * b + r for row in at for w, r in zip(which, row)], device=device)


@functools.lru_cache(maxsize=64)
def _twins(members: tuple[tuple[int, ...], ...], device: torch.device) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The samples that are not the first of their group, and (as index tensors) them and their firsts."""
    twins = [i for i, m in enumerate(members) if m[0] != i]
    return twins, torch.tensor(twins, device=device), torch.tensor([members[i][0] for i in twins], device=device)


def companion_columns(latent: torch.Tensor, calls: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """Outputs of other calls made on this latent, as columns aligned with its rows.

    ``latent`` (``[b, ...]``) is a branch's latent at one of its sigmas; ``calls`` are
    ``(latent, output)`` pairs of calls outside the branch's runtime at that sigma. For each pair
    whose rows have ``latent``'s shape, and each row of ``latent``, the output rows whose latent
    row equals it: slot ``m`` holds every row's ``m``-th match (zeros where a row has fewer; a
    zero column explains nothing). A pair that shares no row contributes nothing: another image's
    calls never enter the span."""
    b = latent.shape[0]
    flat = latent.reshape(b, -1)
    columns: list[torch.Tensor] = []
    for other, out in calls:
        if (other.shape[1:] != latent.shape[1:] or out.shape != other.shape or other.dtype != latent.dtype
                or other.device != latent.device):
            continue
        equal = (flat[:, None, :] == other.reshape(other.shape[0], 1, -1).transpose(0, 1)).all(dim=2)  # [b, b_other]
        matches = [torch.nonzero(row).flatten().tolist() for row in equal.cpu()]
        for m in range(max((len(r) for r in matches), default=0)):
            col = torch.zeros_like(latent, dtype=out.dtype)
            for i, r in enumerate(matches):
                if m < len(r):
                    col[i] = out[r[m]]
            columns.append(col)
    return columns


def token_channels(sample: torch.Tensor) -> tuple[int, bool]:
    """``(channels, last)``: how many entries one token of ``sample`` has, and whether they lie on
    the last axis (a packed ``[B, N, C]`` latent) or on axis 1 (``[B, C, *spatial]``: a token per
    position)."""
    return (sample.shape[-1], True) if sample.dim() == 3 else (sample.shape[1], False)


def unexplained(sample: torch.Tensor, generation: Generation, branch: Branch,
                groups: torch.Tensor | None, rows: tuple[int, int] | None = None,
                extra: Sequence[torch.Tensor] = (), per_token: bool = False) -> float:
    """The largest, over samples, relative residual of ``sample - x_last`` after projecting
    it onto the span of what a sampler could have combined it from (see the module
    docstring), less the latent dtype's rounding of ``sample``; ``inf`` when the branch has
    no earlier call of this shape or nothing to project on. ``rows`` (offset, length on
    axis 1) restricts the test to the image tokens of a latent that carries context tokens
    the sampler does not move (FLUX.2 reference images). ``extra``: more output columns shaped
    like ``sample`` (companion calls: :func:`companion_columns`). ``per_token``: every token's
    update in its own columns' span (coefficients per token; the residual is the norm over the
    tokens' residuals); ``inf`` where a token has fewer than twice as many channels as there are
    columns to explain with.

    It runs on every call, so it is a handful of batched ops whatever the batch and the number
    of branches: one stack of the update, the latents and the outputs, one gather of every
    sample's columns, one QR per group size (``BENCHMARKS.md``, "The runtime's own time")."""
    trace = branch.trace
    if not trace.samples or trace.samples[0].shape != sample.shape:
        return float("inf")
    b = sample.shape[0]
    take = (lambda t: t.narrow(1, *rows)) if rows is not None else (lambda t: t)
    outputs = [take(out) for other in generation.branches for s in trace.sigmas
               for out in [other.trace.output_at(s)] if out is not None and out.shape == sample.shape]
    outputs += [take(col) for col in extra if col.shape == sample.shape]
    if not outputs:
        return float("inf")
    # float32 arithmetic (float64 for float64 latents): the decision compares a share with 5 %, which
    # the QR's rounding moves far less (3e-8 against float64 least squares in the tests; an update
    # of 1e-4 of the latent still reads as a continuation); a third less time than float64
    work = torch.float64 if sample.dtype == torch.float64 else torch.float32
    x = take(sample).reshape(b, -1).to(work)
    latents = [take(t).reshape(b, -1).to(work) for t in trace.samples]  # x_last (, x_prev)
    n_lat = len(latents)
    # [latents + outputs + 1, b, n]: the latents, the branches' outputs, the update x - x_last
    src = torch.stack([*latents, *[o.reshape(b, -1).to(work) for o in outputs], x - latents[0]])
    members = _group_members(tuple(groups.tolist()) if groups is not None else tuple(range(b)))
    # a member whose latents equal those of its group's first member (the halves of a batched
    # CFG call) has the same columns and the same update: the same answer (one comparison for all)
    twins, twin_idx, first_idx = _twins(members, src.device)
    keep = set(range(b))
    if twins:
        head = torch.stack([x, *latents])
        same = (head.index_select(1, twin_idx) == head.index_select(1, first_idx)).all(dim=2).all(dim=0)
        keep -= {i for i, s in zip(twins, same.tolist()) if s}
    by_size: dict[int, list[int]] = collections.defaultdict(list)  # samples with as many members: one batch
    for i in sorted(keep):
        by_size[len(members[i])].append(i)
    shares = []
    for size, rows_i in by_size.items():
        if size == 1 and len(rows_i) == b:  # every sample alone: its columns are its rows of src, in order
            aug, own = src.transpose(0, 1), x
        else:
            at = _columns_index(members, tuple(rows_i), n_lat, len(outputs), src.device)
            aug = src.reshape(-1, src.shape[-1]).index_select(0, at).view(len(rows_i), -1, src.shape[-1])
            own = x if len(rows_i) == b else x.index_select(0, torch.tensor(rows_i, device=x.device))
        slack = 2 * _rounding(sample.dtype) * own.norm(dim=1)
        shares.append(_unexplained_share(aug, slack, token_channels(take(sample)) if per_token else None))
    # one synchronisation for the batch; NaN/Inf latents or outputs (a non-finite share): nothing to match on
    worst = float(torch.stack(shares).max()) if len(shares) > 1 else float(shares[0])
    return worst if math.isfinite(worst) else float("inf")


def _unexplained_share(aug: torch.Tensor, slack: torch.Tensor, tokens: tuple[int, bool] | None = None) -> torch.Tensor:
    """The largest over the batch of ``max(0, |d - P d| - slack) / |d|``, ``d`` the last of each
    sample's columns ``aug`` (``[b, m + 1, n]``: ``m + 1`` columns of length ``n``) and ``P`` the
    projection onto the span of the ``m`` before it; 0 where ``d`` is 0 (a zero update is in every
    span); NaN or Inf where a column is not finite. A 0-d tensor (the caller synchronises once per
    batch)."""
    # The Householder QR of [columns | d]: the last diagonal entry of R is the norm of what remains
    # of d once the columns before it are projected out, to the rounding of |d| whatever the
    # columns' conditioning (the Gram matrix's squared condition number once let rounding decide
    # the rank: a continuation was sometimes not recognised). A column that depends on the earlier
    # ones adds a direction of rounding noise, which explains about 1/n of an update that lies
    # outside the span: nothing that moves the decision. R alone: no Q is formed or multiplied.
    m, n = aug.shape[1] - 1, aug.shape[2]
    a = aug.transpose(1, 2)  # [b, n, m + 1]: column-major, as LAPACK wants
    if tokens is not None:  # per token: [b * T, c, m + 1], one small QR each
        c, last = tokens
        if c < 2 * m or n % c:
            return torch.full_like(aug[0, 0, 0], float("inf"))
        per = aug.reshape(aug.shape[0], m + 1, n // c, c) if last else aug.reshape(aug.shape[0], m + 1, c, n // c).transpose(2, 3)
        r_tok = torch.linalg.qr(per.permute(0, 2, 3, 1).reshape(-1, c, m + 1), mode="r").R[:, m, m]
        residual = r_tok.reshape(aug.shape[0], -1).pow(2).sum(dim=1).sqrt()
    elif n > m:
        residual = torch.linalg.qr(a, mode="r").R[:, m, m].abs()
    else:  # no more entries than columns (tiny latents): project explicitly
        q = torch.linalg.qr(a[..., :m]).Q
        d = a[..., m:]
        residual = (d - q @ (q.transpose(1, 2) @ d)).squeeze(-1).norm(dim=1)
    norm = aug[:, m].norm(dim=1)
    tiny = torch.finfo(norm.dtype).tiny  # 1e-300 underflows in float32
    share = torch.where(norm > 0, (residual - slack).clamp_min(0) / norm.clamp_min(tiny), torch.zeros_like(norm))
    finite = torch.isfinite(aug.sum())
    return torch.where(finite, share.max(), torch.full_like(norm[0], float("nan")))


#: updates a branch's sampler is checked on (each after two full calls); all from the newest call
#: alone, it counts as one-step (a multistep method combines earlier outputs from its second
#: update on)
FIRST_ORDER_CHECKS = 3
#: an update explained to within this share by some columns is a combination of them: far above
#: the rounding of one that is (float32 arithmetic: about 1e-6), far below what a multistep
#: method's second-order terms leave unexplained by the newest call alone (half the change of the
#: outputs from one call to the next: 1-25 % on the tune models) and what a per-token rescale
#: leaves unexplained by any combination of whole outputs (Qwen-Image's true CFG: 0.2-2 %)
EXACT_SHARE = 1e-4


def update_order(sample: torch.Tensor, generation: Generation, branch: Branch,
                 rows: tuple[int, int] | None = None, companions: Sequence[torch.Tensor] = ()) -> UpdateOrder:
    """Whether the update that led to ``sample`` (a continuation of ``branch`` at a lower sigma)
    is a combination of the branch's newest call alone: its latent and the outputs every branch
    returned at that call (Euler, DDIM, guidance combining them), or needed the call before as
    well (a multistep method: UniPC's predictor and corrector, DPM-Solver++(2M) combine the last
    two outputs). Two span tests like routing's (:func:`unexplained`), each to
    :data:`EXACT_SHARE`; ``UNKNOWN`` where neither explains the update (it was matched with
    companions' outputs or token by token, or within routing's tolerance only) or the branch has
    fewer than two calls. Only telling where the two calls' outputs differ (both computed, not one
    reused from the other): the caller checks. ``companions``: other graphs' outputs on the newest
    call's latent (:func:`companion_columns`); an update the newest call explains with them is
    ``UNKNOWN``, not multistep (skip-layer guidance: in float16 the latent's rounding, which the
    tests allow for, is up to a quarter of a late step's update, and the two-call test passes on it)."""
    trace = branch.trace
    if len(trace.sigmas) < 2:
        return UpdateOrder.UNKNOWN
    newest = dataclasses.replace(branch, trace=trace.newest())
    if unexplained(sample, generation, newest, branch.state.groups, rows) <= EXACT_SHARE:
        return UpdateOrder.FIRST
    if companions and unexplained(sample, generation, newest, branch.state.groups, rows, companions) <= EXACT_SHARE:
        return UpdateOrder.UNKNOWN  # one call's outputs, another graph's among them (skip-layer guidance)
    if unexplained(sample, generation, branch, branch.state.groups, rows) <= EXACT_SHARE:
        return UpdateOrder.MULTISTEP
    return UpdateOrder.UNKNOWN


class Router:
    """The live generations of one runtime, and the matching of calls to them."""

    def __init__(self, max_generations: int) -> None:
        self.max_generations = max_generations
        self.generations: collections.OrderedDict[int, Generation] = collections.OrderedDict()  # LRU order
        self.evicted = 0
        #: the traces of generations dropped or evicted lately (:meth:`inherit`), newest last
        self.remembered: collections.deque[Remembered] = collections.deque(maxlen=4)

    def clear(self) -> None:
        self.generations.clear()
        self.remembered.clear()

    def route(self, model: int | None, conditioning: tuple[Any, ...], sigma: float,
              sample: torch.Tensor, rows: tuple[int, int] | None = None,
              companions: Callable[[float], Sequence[tuple[torch.Tensor, torch.Tensor]]] | None = None,
              weights: tuple = (),
              ) -> tuple[Generation, int] | None:
        """The (generation, branch index) this call continues or joins; ``None``: a new
        generation. Marks the generation most recently used. ``companions(s)``: the
        ``(latent, output)`` of the calls other runtimes made on this model at sigma ``s``, tried
        when no branch's own outputs explain the update (see the module docstring). Only
        generations of ``model`` that ran under the same ``weights`` are candidates."""
        live = [g for g in reversed(self.generations.values())  # most recent first: ties
                if g.model == model and g.weights == weights]
        # a continuation: same conditioning, lower sigma (or, where no branch continues at a lower
        # sigma, the same sigma: a second-order sampler's next step), the latent moved as a sampler
        # moves it
        candidates = [(gen, j, br) for gen in live for j, br in enumerate(gen.branches)
                      if br.trace.sigmas and _continues(br, sigma, sample)
                      and same_conditioning(br.conditioning, conditioning)]
        lower, again = [], []
        for c in candidates:
            (again if _same_sigma(c[2].trace.sigmas[0], sigma) else lower).append(c)
        best = self._best_one_step(lower, sample, rows) if len(lower) > 1 else None
        if best is None:
            best = self._best(lower, sample, rows, lambda br: ())
        if best is None and again:
            best = self._best(again, sample, rows, lambda br: ())
        found: dict[int, list[torch.Tensor]] = {}
        if best is None and companions is not None and candidates:
            def extra(br: Branch) -> list[torch.Tensor] | None:  # None: nothing new to try
                cols = found[id(br)] = [col for s, x in zip(br.trace.sigmas, br.trace.samples)
                                        for col in companion_columns(x, companions(s))]
                return cols or None
            best = self._best(candidates, sample, rows, extra)
        if best is None and lower:  # a sampler that rescales per token (Qwen-Image's true CFG); not at the same
            # sigma: another request whose latent is this one's rescaled per token (an edit's reference image
            # scaled) would read as a further call of it
            best = self._best(lower, sample, rows, lambda br: found.get(id(br), []), per_token=True)
        if best is None:
            for gen in [g for g in live if self._shared(g, conditioning, sigma, sample)]:
                self._retire(gen)
                live.remove(gen)
        if best is None:  # a further branch: another conditioning on a latent and sigma of this generation
            best = next(((gen, len(gen.branches)) for gen in live if self._joins(gen, conditioning, sigma, sample)),
                        None)
        if best is not None:
            self.generations.move_to_end(best[0].id)
        return best

    @staticmethod
    def _joins(gen: Generation, conditioning: tuple[Any, ...], sigma: float, sample: torch.Tensor) -> bool:
        """Whether a call under ``conditioning`` at ``sigma`` on ``sample`` is a further branch of
        ``gen``: one of its branches' last call ran there, and none of its branches ran there under
        this conditioning (that would be the same call again: another request)."""
        return any(br.last_called_on(sigma, sample) for br in gen.branches) and not any(
            same_conditioning(br.conditioning, conditioning) and br.called_on(sigma, sample) for br in gen.branches)

    def inherit(self, gen: Generation, j: int, sigma: float, sample: torch.Tensor,
                rows: tuple[int, int] | None = None) -> None:
        """Give branch ``j`` of ``gen``, new at this call, the trace of the branch it continues in
        a generation dropped or evicted lately, if any: one with its conditioning whose last
        latent and outputs explain this call's latent (the first branch of a new generation), or,
        for a further branch, the branch with its conditioning of the generation the first
        branch continued. Routing's memory only (no caches, no controller state): a multistep
        sampler (UniPC, DPM-Solver++) combines the last two calls' outputs, and a generation
        restarted without the older one never explained a later step again, so it started over
        on every call."""
        branch = gen.branches[j]
        if j == 0:
            for old in reversed(self.remembered):
                if old.model != gen.model or old.weights != gen.weights:
                    continue
                as_gen = Generation(old.model, None, weights=old.weights, branches=old.branches)
                lower = [(as_gen, k, br) for k, br in enumerate(old.branches)  # a continuation at a lower sigma
                         if same_conditioning(br.conditioning, branch.conditioning)
                         and br.trace.sigmas[0] > sigma and not _same_sigma(br.trace.sigmas[0], sigma)]
                hit = self._best(lower, sample, rows, lambda br: ())
                if hit is not None:
                    gen.ancestor = old
                    branch.trace = old.branches[hit[1]].trace.copy()
                    return
        elif gen.ancestor is not None:
            k = next((k for k, br in enumerate(gen.ancestor.branches)
                      if same_conditioning(br.conditioning, branch.conditioning)), None)
            if k is not None and gen.ancestor.branches[k].trace.sigmas and _same_sigma(
                    gen.ancestor.branches[k].trace.sigmas[0], gen.ancestor.branches[0].trace.sigmas[0]):
                branch.trace = gen.ancestor.branches[k].trace.copy()

    @staticmethod
    def _shared(gen: Generation, conditioning: tuple[Any, ...], sigma: float, sample: torch.Tensor) -> bool:
        """Whether this call shows that two requests share ``gen``'s calls at ``sigma`` on
        ``sample``: it is the same call again as one of ``gen``'s branches other than the first
        (two requests from the same noise with the same negative prompt, under true CFG: cond,
        uncond, each call a branch), and a third branch ran there too. That third branch (the
        other request's cond, which joined as a further branch) may be either request's: had
        ``gen`` been kept, the other request's next calls would have found their outputs in its
        span and continued its branches, mixing two images' caches. (The same call again as the
        first branch is the same request twice, or another request that shares only its first
        call: nothing of it joined ``gen``.)"""
        hits = [j for j, br in enumerate(gen.branches) if br.called_on(sigma, sample)]
        return len(hits) >= 3 and any(j and same_conditioning(gen.branches[j].conditioning, conditioning)
                                      for j in hits)

    def _retire(self, gen: Generation) -> None:
        """Drop ``gen``, whose branches two requests may share (:meth:`_shared`): each request's
        next call starts a generation of its own (a second call: full, as it most likely was)."""
        del self.generations[gen.id]
        self.remembered.append(Remembered.of(gen))
        msg = (f"specdiff: generation {gen.id} dropped: another request from the same noise repeated one of its "
               "calls, so its branches may be two requests'; its next call starts over")
        gen.report.notes.append(msg)
        log.info(msg)

    @classmethod
    def _best_one_step(cls, candidates, sample, rows) -> tuple[Generation, int] | None:
        """The candidate whose newest call alone explains the update (its latent and what every
        branch returned at that call), if any: the continuation of the trajectory that call
        started, where another candidate explains it only with older outputs (a request that
        shared its first call with this one)."""
        newest = [(gen, j, dataclasses.replace(br, trace=br.trace.newest())) for gen, j, br in candidates]
        return cls._best(newest, sample, rows, lambda br: ())

    @staticmethod
    def _best(candidates, sample, rows, extra, per_token: bool = False) -> tuple[Generation, int] | None:
        """The candidate ``(generation, j, branch)`` whose span (with ``extra(branch)``'s columns;
        ``None`` skips it; ``per_token``: token by token) explains the update best, if within
        :data:`SPAN_TOLERANCE`. Candidates come most recently used first; a later one wins only
        by more than :data:`EXACT_SHARE`: two that explain the update alike (the same request
        sent again after it was abandoned: the same calls, whose outputs differ by rounding or by
        what each run cached) are a tie, which the most recently used takes."""
        best, best_score = None, SPAN_TOLERANCE
        for gen, j, br in candidates:
            cols = extra(br)
            if cols is None:
                continue
            score = unexplained(sample, gen, br, br.state.groups, rows, cols, per_token)
            if best is None and score <= best_score or best is not None and score < best_score - EXACT_SHARE:
                best, best_score = (gen, j), score
        return best

    def add(self, generation: Generation) -> list[Generation]:
        """Register a new generation; returns the generations evicted to make room: the least
        recently used of those that ran only their first call (every branch once) and are not
        among the ``max_generations // 2`` most recently used, else the least recently used.
        Calls that never continue (a pipeline that edits the latent between steps starts a
        generation per call) then push out one another, not a generation under way; and
        requests that start together (a server stepping up to ``max_generations // 2`` new
        requests in turn) outlive the finished generations that fill the slots, each one's first
        call being among the most recent until its second. Starting a one-call generation
        again costs what its next call would most likely have cost anyway (the second call has
        no measured error yet: full), where a generation well under way loses its caches and its
        controller's history."""
        evicted = []
        while len(self.generations) >= self.max_generations:
            keys = list(self.generations)  # least recently used first
            older = keys[:len(keys) - self.max_generations // 2]
            key = next((i for i in older if self.generations[i].first_call_only), keys[0])
            old = self.generations.pop(key)
            self.remembered.append(Remembered.of(old))
            evicted.append(old)
            self.evicted += 1
        self.generations[generation.id] = generation
        return evicted

    @property
    def held_bytes(self) -> int:
        return sum(g.held_bytes for g in self.generations.values())
