"""The decision interface every controller implements, and the policy registry."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Sequence

import torch

from ..config import SpecDiffConfig


class Action(enum.Enum):
    FULL = "full"  # every token computed, every cache refreshed
    SPARSE = "sparse"  # k image tokens computed, the others from their history and the K/V caches
    SKIP = "skip"  # no token computed: every token's output from its history


@dataclass(frozen=True)
class Decision:
    action: Action
    k: int | None = None  # sparse: image tokens computed per sample
    reason: str = ""  # for the telemetry
    #: the error of caching the policy predicted for this call, where it predicts one (telemetry:
    #: ``StepRecord.predicted``, next to the error measured on the call)
    predicted: float | None = None

    @classmethod
    def full(cls, reason: str = "", predicted: float | None = None) -> "Decision":
        return cls(Action.FULL, reason=reason, predicted=predicted)

    @classmethod
    def sparse(cls, k: int, reason: str = "", predicted: float | None = None) -> "Decision":
        return cls(Action.SPARSE, k, reason, predicted)

    @classmethod
    def skip(cls, reason: str = "", predicted: float | None = None) -> "Decision":
        return cls(Action.SKIP, reason=reason, predicted=predicted)


@dataclass
class StepView:
    """What a policy may read before a main-run call of one branch.

    Only what the pipeline's calls reveal: the step index in this branch, the current sigma
    and those of the earlier calls. No step count, no shift, no guidance mode."""

    step: int  # main-run calls of this branch so far (>= 1 when decide is called)
    sigma: float
    sigmas: Sequence[float]  # sigmas of the earlier main-run calls, oldest first
    num_tokens: int  # N, image tokens per sample
    #: per-token estimate of the error of not computing each token now ([B, N]), when the
    #: runtime has one (each token's predicted drift since its last computation)
    drift: Callable[[], torch.Tensor | None] = lambda: None
    #: the lowest sigma the decision serves, where it serves a later call too: a second-order
    #: sampler's step, whose corrector (at the step's end sigma, estimated from the sigmas so far)
    #: repeats the decision; ``None``: this call's own sigma
    until: float | None = None
    #: the sampler's updates combine outputs of calls before the newest (a multistep method:
    #: UniPC, DPM-Solver++), as the runtime saw from how the latent moved
    multistep: bool = False


@dataclass
class Observation:
    """What the runtime measured on the call a decision led to."""

    decision: Decision
    sigma: float
    flops: int  # of the call
    full_flops: int  # of a full call
    #: with :meth:`Policy.measures`: the relative error of the outputs a sparse call does not
    #: compute, ``||F - F_reused|| / ||F||`` over those tokens (a full call: exact, for the
    #: tokens a sparse call would have left out; a sparse call: estimated from its probes)
    prediction_error: float | None = None
    extra: dict = field(default_factory=dict)
    #: which step the call belongs to: calls with one key pool their errors as one step's (the
    #: runtime passes its step plan's: the branches of one step, a second-order sampler's corrector
    #: with its step's first call); ``None``: the calls at one sigma
    step: Any = None


class Policy:
    """A controller. Subclasses set ``name`` and implement :meth:`decide`.

    One policy object serves every generation of a compiled graph; per-branch state lives in
    what :meth:`start` returns (kept in the branch's state and passed back)."""

    name: ClassVar[str] = ""
    #: the :class:`SpecDiffConfig` fields only this kind of policy reads (the config refuses
    #: them, set, with another controller)
    options: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: SpecDiffConfig, num_tokens: int) -> None:
        self.config, self.num_tokens = config, num_tokens

    def token_counts(self) -> tuple[int, ...]:
        """The ``k`` values :meth:`decide` may return in a sparse decision."""
        return (self.config.num_computed(self.num_tokens),)

    def may_skip(self) -> bool:
        """Whether :meth:`decide` may return a skip decision."""
        return False

    def measures(self) -> bool:
        """Whether the runtime should measure each call's error of caching for
        :meth:`observe` (``Observation.prediction_error``)."""
        return False

    def probes(self, k: int) -> int:
        """How many of a sparse call's ``k`` computed tokens are drawn at random from the
        tokens the score left out, so that their fresh outputs measure the error of caching
        those (0: none; only read when :meth:`measures`)."""
        return 0

    def start(self) -> Any:
        """Fresh per-branch state (the first call of a branch is always full)."""
        return None

    def decide(self, state: Any, view: StepView) -> Decision:
        raise NotImplementedError

    def observe(self, state: Any, view: StepView, obs: Observation) -> None:
        """After every main-run call of the branch (the first included), in call order and
        before the policy's next decision for the generation: a call whose measured error is
        still on the device is observed at the generation's next call (the runtime reads the
        error back there; ``obs.prediction_error`` is always a float or None)."""


_REGISTRY: dict[str, type[Policy]] = {}


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make ``cls`` selectable as ``controller=cls.name``."""
    if not cls.name or cls.name in _REGISTRY:
        raise ValueError(f"policy name {cls.name!r} is empty or taken")
    _REGISTRY[cls.name] = cls
    return cls


def policies() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def policy_options(name: str | None = None) -> set[str]:
    """The config fields policy ``name`` reads of its own (``None``: of any policy)."""
    classes = _REGISTRY.values() if name is None else [_REGISTRY[name]]
    return {key for cls in classes for key in cls.options}


def make_policy(config: SpecDiffConfig, num_tokens: int) -> Policy:
    """The policy ``config.controller`` names, for graphs with ``num_tokens`` image tokens."""
    try:
        cls = _REGISTRY[config.controller]
    except KeyError:
        raise ValueError(f"unknown controller {config.controller!r}; registered: {', '.join(_REGISTRY)}") from None
    return cls(config, num_tokens)
