"""Per-branch generation state, in small typed parts.

A *generation* is one denoising run; a *branch* is one stream of calls within it (FLUX
true-CFG calls the model twice per step: cond and uncond are two branches). Each branch
owns a :class:`BranchState`: its step counter and sigmas, what the token choice reads
(:class:`TokenHistory`, the speculative run, starvation counters), the K/V caches the
sparse graph reads (:class:`KVStore` for image tokens, :class:`TextKVStore` for context
tokens), the decisions taken for the generation (context caching, K/V extrapolation, a
memory fallback). What a generation decides once per step for all its branches (the
controller's state, the step's decision and token choice) lives on the generation
(:mod:`.routing`).

Cache tensors are allocated outside inference mode (:func:`detached`): the sparse graphs
update them in place later, which inference tensors forbid outside inference mode.
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .. import schedule
from .hindsight import Hindsight


def _same_sigma(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-7 * max(1.0, abs(a))


def nbytes(*tensors: torch.Tensor | None) -> int:
    total = 0
    for t in tensors:  # a plain loop: the runtime sums every held tensor on every call
        if t is not None:
            total += t.nbytes
    return total


def detached(t: torch.Tensor) -> torch.Tensor:
    """A cache entry that later in-place updates may touch, whatever the grad mode."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return t.clone()
    return t.detach()


@dataclass
class TokenHistory:
    """Each image token's last two *computed* outputs and the sigmas they were computed at.

    ``outputs`` ``[2, B, N, C]`` (newest first), ``sigmas`` ``[2, B, N]``. A token computed
    once has both entries equal (no rate yet)."""

    outputs: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def start(cls, tokens: torch.Tensor, sigma: float) -> "TokenHistory":
        tokens = detached(tokens)
        s = torch.full(tokens.shape[:2], sigma, device=tokens.device)
        return cls(torch.stack([tokens, tokens]), torch.stack([s, s]))

    def push_all(self, tokens: torch.Tensor, sigma: float) -> None:
        """Every token was computed at ``sigma``."""
        tokens = detached(tokens)
        s = torch.full(tokens.shape[:2], sigma, device=tokens.device)
        self.outputs = torch.stack([tokens, self.outputs[0]])
        self.sigmas = torch.stack([s, self.sigmas[0]])

    def push(self, idx: torch.Tensor, tokens: torch.Tensor, sigma: float) -> None:
        """The tokens ``idx`` (``[B, k]``) were computed at ``sigma``; ``tokens`` is ``[B, N, C]``."""
        rows = idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        self.outputs[1].scatter_(1, rows, torch.gather(self.outputs[0], 1, rows))
        self.outputs[0].scatter_(1, rows, torch.gather(tokens, 1, rows).to(self.outputs.dtype))
        self.sigmas[1].scatter_(1, idx, torch.gather(self.sigmas[0], 1, idx))
        self.sigmas[0].scatter_(1, idx, torch.full(idx.shape, sigma, device=idx.device))

    @property
    def latest(self) -> torch.Tensor:
        return self.outputs[0]

    def drift(self, sigma: float) -> torch.Tensor:
        return schedule.drift_scores(self.outputs, self.sigmas, sigma)

    def ratio(self, sigma: float) -> torch.Tensor:
        return schedule.extrapolation_ratio(self.sigmas, sigma)

    @property
    def nbytes(self) -> int:
        return nbytes(self.outputs)


def _shift(old: list[torch.Tensor | None], new: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """What the "previous" caches become when ``new`` is stored: the old caches where the
    shapes agree (they hold each token's computation before), else copies of ``new``."""
    same = len(old) == len(new) and all(
        (a is None) == (b is None) and (a is None or a.shape == b.shape) for a, b in zip(old, new))
    return old if same else [None if t is None else t.clone() for t in new]


@dataclass
class KVStore:
    """Image-token K/V per attention in cache order ``k0, v0, k1, v1, ...``: each token's
    last computed (``kv``) and, with extrapolation, the computation before (``prev``).
    The sparse graph updates both in place for the tokens it computes."""

    kv: list[torch.Tensor] = field(default_factory=list)
    prev: list[torch.Tensor] = field(default_factory=list)

    def store(self, fresh: Sequence[torch.Tensor], extrapolate: bool) -> None:
        """A full step computed every token's K/V."""
        fresh = [detached(t) for t in fresh]
        if extrapolate:
            self.prev = _shift(self.kv, fresh)
        self.kv = fresh

    def clear(self) -> None:
        self.kv, self.prev = [], []

    @property
    def nbytes(self) -> int:
        return nbytes(*self.kv, *self.prev)


@dataclass
class TextKVStore:
    """Context-token K/V per attention (``None`` for attentions without text): each token's
    last computed (``kv``) and, with extrapolation, the computation before (``prev``), and
    the sigmas of both per token (``sigmas`` ``[2, B, M]``, newest first). A full or
    refreshing step computes every text token; a text-subset step
    (``ContextMode.SUBSET``) computes some, whose rows the sparse graph writes in place
    (:meth:`push` then moves their sigmas)."""

    kv: list[torch.Tensor | None] = field(default_factory=list)
    prev: list[torch.Tensor | None] = field(default_factory=list)
    sigmas: torch.Tensor | None = None
    age: int = 0  # cached steps since every text token was last computed

    def __bool__(self) -> bool:
        return bool(self.kv)

    def store(self, fresh: Sequence[torch.Tensor | None], sigma: float, extrapolate: bool) -> None:
        """Every text token was computed at ``sigma``."""
        fresh = [None if t is None else detached(t) for t in fresh]
        if extrapolate:
            self.prev = _shift(self.kv, fresh)
        self.kv = fresh
        some = next(t for t in fresh if t is not None)  # [B, h, M, d]
        now = torch.full((some.shape[0], some.shape[2]), sigma, device=some.device)
        before = self.sigmas[0] if self.sigmas is not None and self.sigmas.shape[1:] == now.shape else now
        self.sigmas = torch.stack([now, before])
        self.age = 0

    def push(self, idx: torch.Tensor, sigma: float) -> None:
        """The text tokens ``idx`` (``[B, k_txt]``) were computed at ``sigma`` (their K/V rows
        are already in the caches)."""
        self.sigmas[1].scatter_(1, idx, torch.gather(self.sigmas[0], 1, idx))
        self.sigmas[0].scatter_(1, idx, torch.full(idx.shape, sigma, device=idx.device))

    def ratio(self, sigma: float) -> torch.Tensor:
        """``[B, M]`` extrapolation ratio of each text token's K/V to ``sigma``."""
        return schedule.extrapolation_ratio(self.sigmas, sigma)

    def drift(self, sigma: float) -> torch.Tensor:
        """``[B, M]`` predicted staleness of each text token's cached K/V at ``sigma``: the
        change of its K/V (every attention, keys and values) between its last two
        computations, as a rate in sigma, times the sigma travelled since
        (:func:`schedule.staleness`; without the computation before, the sigma travelled)."""
        change = None
        for new, old in zip(self.kv, self.prev):
            if new is not None:
                sq = (new.float() - old.float()).pow(2).sum(dim=(1, 3))
                change = sq if change is None else change + sq
        if change is None:  # no extrapolation: no previous K/V
            change = torch.ones_like(self.sigmas[0])
        return schedule.staleness(change.sqrt(), self.sigmas, sigma)

    def clear(self) -> None:
        self.kv, self.prev, self.sigmas, self.age = [], [], None, 0

    def drop_prev(self) -> None:
        self.prev = []

    @property
    def nbytes(self) -> int:
        return nbytes(*self.kv, *self.prev)


class ContextCaching(enum.Enum):
    """Whether a generation's cached steps read the context tokens' K/V from caches."""

    UNDECIDED = "undecided"  # decided at the first cached step
    CACHED = "cached"  # none computed (all read from their caches)
    SUBSET = "subset"  # some computed (those that drifted most), the rest read from their caches
    COMPUTED = "computed"  # all computed


class UpdateOrder(enum.Enum):
    """What a branch's latent updates say of its sampler (``routing.update_order``)."""

    UNKNOWN = "unknown"  # not seen yet, or not from the branch's own calls (companions, per token)
    FIRST = "first"  # every update checked came from the newest call's latent and outputs alone
    MULTISTEP = "multistep"  # an update combined an earlier call's output too (UniPC, DPM-Solver++)


@dataclass
class BranchState:
    """The state of one branch of one generation."""

    extrapolate: bool  # K/V extrapolation in this generation (config, unless the memory cap dropped it)
    step: int = 0
    sigma0: float = 1.0
    sigmas: list[float] = field(default_factory=list)  # sigmas of the main-run calls so far
    groups: torch.Tensor | None = None  # [B]: samples that started from the same latent share a group
    tokens: TokenHistory | None = None
    kv: KVStore = field(default_factory=KVStore)
    text: TextKVStore = field(default_factory=TextKVStore)
    # the speculative run, high to low sigma: (sigma, attention score) with score="attention",
    # (sigma, per-token output) with score="drift"
    spec: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    his: torch.Tensor | None = None  # attention score of the last call (score="attention")
    cached_for: torch.Tensor | None = None  # [B, N] consecutive cached steps
    past: collections.deque = field(default_factory=collections.deque)  # paper blend: (sigma, tokens), newest first
    context: ContextCaching = ContextCaching.UNDECIDED
    k_txt: int | None = None  # ContextCaching.SUBSET: text tokens computed per sample on a cached step
    degraded: bool = False  # cache cap exceeded even without extrapolation, or a full call failed: every step full, no caches
    hindsight: Hindsight = field(default_factory=Hindsight)  # the cached calls' latent displacement
    #: a second-order sampler (Heun): the branch was called twice at one sigma on two latents
    second_order: bool = False
    #: what its latent updates say of the sampler (``routing.update_order``): how many updates
    #: were checked, how many of them came from the newest call alone
    update_order: UpdateOrder = UpdateOrder.UNKNOWN
    order_checks: int = 0
    first_order_updates: int = 0
    full_run: int = 0  # full calls in a row up to its last call

    @property
    def recalled(self) -> bool:
        """Whether its last call was a second call at the sigma of the one before (a second-order
        sampler's next step: the call after it is that step's corrector)."""
        return len(self.sigmas) >= 2 and _same_sigma(self.sigmas[-1], self.sigmas[-2])

    def drop_caches(self) -> None:
        self.kv.clear()
        self.text.clear()
        self.tokens = None
        self.past.clear()
        self.hindsight = Hindsight()

    @property
    def cache_bytes(self) -> int:
        """Bytes of the caches: image and text K/V, each token's last two outputs, past steps."""
        held = self.kv.nbytes + self.text.nbytes + (self.tokens.nbytes if self.tokens is not None else 0)
        return held + sum(nbytes(t) for _, t in self.past)

    @property
    def held_bytes(self) -> int:
        """Every tensor the branch holds (caches, sigmas, the speculative run's records, the
        hindsight correction's outputs)."""
        extra = (nbytes(self.tokens.sigmas) if self.tokens is not None else 0) + nbytes(self.text.sigmas)
        return (self.cache_bytes + extra + sum(nbytes(t) for _, t in self.spec) + nbytes(self.his, self.cached_for)
                + self.hindsight.nbytes)
