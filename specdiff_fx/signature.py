"""The interface between the rewrite passes and the runtime: what a compiled variant takes
beyond the model's own inputs, what it returns beyond the model's own outputs, and which
variant is which.

Every graph input a pass adds and every extra output it exposes is a :class:`Port`: a
role, and for per-attention tensors the attention index and ``"k"``/``"v"``. The string
names that appear in the graphs (``specdiff_k3``, ``kt0`` ...) are spelled here and only
here; the runtime looks values up by port, never by parsing a name.

A :class:`VariantKey` says which variant a graph is: full, sparse (``k`` image tokens
computed) or skip (no token computed), what it does with the context (text) tokens
(:class:`ContextMode`; with ``SUBSET`` also how many, ``k_txt``) and whether its cached K/V
are extrapolated.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass


class Role(enum.Enum):
    """What a port carries. Shapes: ``B`` batch, ``N`` image tokens, ``M`` text tokens of an
    attention, ``k`` computed image tokens, ``C`` output channels, ``H`` history depth,
    ``h``/``d`` heads and head dim, ``k_txt`` computed text tokens (``ContextMode.SUBSET``)."""

    # inputs of the sparse variant
    IDX = "idx"  # [B, k] int64 image-token indices
    TEXT_IDX = "idx_txt"  # [B, k_txt] int64 text-token positions (all non-image segments, in model order)
    BASE = "base"  # [B, N, C] outputs of the non-computed tokens (replaced by HISTORY/WEIGHTS)
    HISTORY = "history"  # [H, B, N, C] past per-token outputs, newest first
    WEIGHTS = "weights"  # [B, N, H] per-token weights over HISTORY
    KV_RATIO = "kv_ratio"  # [B, N] extrapolation ratio of the image K/V caches
    TEXT_RATIO = "kv_ratio_txt"  # [B] extrapolation ratio of the text K/V caches (ContextMode.CACHED)
    TEXT_TOKEN_RATIO = "kv_ratio_txt_tokens"  # [B, M] per-token ratio of the text K/V caches (SUBSET)
    KV = "kv"  # [B, h, N, d] image K or V of one attention (input: cache; output: fresh); under context
    #            parallelism [B, h/W, W*N, d], every rank's tokens for this rank's heads (after the exchange)
    KV_PREV = "kv_prev"  # [B, h, N, d] the computation before the cached one
    TEXT_KV = "text_kv"  # [B, h, M, d] text K or V of one attention (input: cache, written with SUBSET;
    #                                                                 output: fresh)
    TEXT_KV_PREV = "text_kv_prev"  # [B, h, M, d]
    # extra outputs
    TOKENS = "tokens"  # [B, N, C] per-token output before unpatchify
    SUBSET = "subset"  # [B, k, C] the computed tokens' fresh outputs, in idx order
    SCORE = "score"  # [B, N] attention received


_PER_ATTENTION = {Role.KV: "", Role.KV_PREV: "p", Role.TEXT_KV: "t", Role.TEXT_KV_PREV: "tp"}


@dataclass(frozen=True)
class Port:
    """One added input or extra output of a variant."""

    role: Role
    attention: int | None = None  # per-attention roles: the attention's index in plan.attention
    tensor: str | None = None  # per-attention roles: "k" or "v"

    def __post_init__(self) -> None:
        per_attention = self.role in _PER_ATTENTION
        if per_attention != (self.attention is not None) or per_attention != (self.tensor in ("k", "v")):
            raise ValueError(f"bad port {self}: per-attention roles need attention and tensor 'k'/'v'")

    @property
    def key(self) -> str:
        """The short name: ``k3``, ``vtp0``, ``tokens``, ``kv_ratio`` ..."""
        if self.role in _PER_ATTENTION:
            return f"{self.tensor}{_PER_ATTENTION[self.role]}{self.attention}"
        return self.role.value

    @property
    def input_name(self) -> str:
        """The graph placeholder's name when the port is an input."""
        return f"specdiff_{self.key}"

    @property
    def updated_in_place(self) -> bool:
        """Image K/V caches are written by the sparse graph (the computed tokens' rows); the
        text K/V caches only by a ``ContextMode.SUBSET`` variant (see ``NewInput.in_place``)."""
        return self.role in (Role.KV, Role.KV_PREV)


@functools.lru_cache(maxsize=None)
def kv_ports(role: Role, attentions: int) -> tuple[Port, ...]:
    """The per-attention ports of ``role`` in cache order: ``k0, v0, k1, v1, ...`` (built once
    per role and count: the runtime asks for them on every call)."""
    return tuple(Port(role, i, t) for i in range(attentions) for t in "kv")


def cache_slot(port: Port) -> int:
    """A per-attention port's position in cache order (:func:`kv_ports`)."""
    return 2 * port.attention + (port.tensor == "v")


class VariantKind(enum.Enum):
    FULL = "full"  # every token computed; exposes K/V and per-token outputs
    SPARSE = "sparse"  # k image tokens computed, the rest from history and K/V caches
    SKIP = "skip"  # no token computed: every output from history (the transformer is not run)


class ContextMode(enum.Enum):
    """What a variant does with the context (text) tokens."""

    COMPUTE = "compute"  # computed, their K/V not returned
    CACHED = "cached"  # not computed: attention reads their K/V from caches (sparse only)
    REFRESH = "refresh"  # computed, and their fresh K/V returned to refresh the caches
    # k_txt of them computed (Role.TEXT_IDX), like the image subset; attention reads all text K/V
    # from caches that the computed rows write in place (sparse only)
    SUBSET = "subset"


@dataclass(frozen=True)
class VariantKey:
    """Which variant of a graph: the executor compiles one per key."""

    kind: VariantKind
    k: int | None = None  # sparse: image tokens computed per sample
    context: ContextMode = ContextMode.COMPUTE
    extrapolate: bool = False  # sparse: cached K/V extrapolated (takes KV_PREV and ratios)
    k_txt: int | None = None  # ContextMode.SUBSET: text tokens computed per sample (0 <= k_txt <= M)

    def __post_init__(self) -> None:
        if (self.kind is VariantKind.SPARSE) != (self.k is not None):
            raise ValueError(f"{self}: k is given exactly for sparse variants")
        if self.context in (ContextMode.CACHED, ContextMode.SUBSET) and self.kind is not VariantKind.SPARSE:
            raise ValueError(f"{self}: only a sparse variant reads the context from caches")
        if (self.context is ContextMode.SUBSET) != (self.k_txt is not None):
            raise ValueError(f"{self}: k_txt is given exactly for context mode {ContextMode.SUBSET.value}")
        if self.k_txt is not None and (isinstance(self.k_txt, bool) or self.k_txt < 0):
            raise ValueError(f"{self}: k_txt must be a count >= 0 (its upper bound M is checked at build time)")

    @classmethod
    def full(cls, refresh_text: bool = True) -> "VariantKey":
        """The full variant; ``refresh_text`` also returns the text K/V."""
        return cls(VariantKind.FULL, context=ContextMode.REFRESH if refresh_text else ContextMode.COMPUTE)

    @classmethod
    def sparse(cls, k: int, context: ContextMode = ContextMode.COMPUTE, extrapolate: bool = True,
               k_txt: int | None = None) -> "VariantKey":
        """A sparse variant; ``k_txt`` (text tokens computed) goes with ``ContextMode.SUBSET``."""
        return cls(VariantKind.SPARSE, k=k, context=context, extrapolate=extrapolate, k_txt=k_txt)

    @classmethod
    def skip(cls) -> "VariantKey":
        return cls(VariantKind.SKIP)

    def __str__(self) -> str:
        parts = [self.kind.value] + ([f"k={self.k}"] if self.k is not None else [])
        if self.kind is not VariantKind.SKIP:
            parts.append(f"context {self.context.value}" + (f" k_txt={self.k_txt}" if self.k_txt is not None else ""))
        if self.kind is VariantKind.SPARSE:
            parts.append("K/V extrapolated" if self.extrapolate else "K/V reused")
        return ", ".join(parts)
