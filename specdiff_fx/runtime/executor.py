"""The executor: the one place that knows the compiled variants and their signatures.

The runtime asks for a step by :class:`~specdiff_fx.signature.VariantKey` and hands the
per-step tensors over as plain lists (K/V in cache order ``k0, v0, k1, v1, ...``); the
executor maps them onto the variant's ports, runs it and returns a :class:`StepOutput`.
Variants are compiled on first use; :meth:`GraphExecutor.prepare` compiles a set up front
(the runtime does so before a generation's first step, so compiles do not land in the
middle of one).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
import torch.fx as fx

from ..config import SpecDiffConfig
from ..plan import DiTPlan
from ..signature import Port, Role, VariantKey, cache_slot, kv_ports
from ..variants import Variant, build_variant, count_flops

log = logging.getLogger("specdiff_fx.runtime")


@dataclass
class StepOutput:
    """What one call of a variant gives the runtime."""

    user: tuple[Any, ...]  # the graph's own outputs, returned to the caller
    tokens: torch.Tensor  # [B, N, C] per-token output (tiered on cached steps)
    score: torch.Tensor | None  # [B, N] attention received (score="attention" only)
    kv: list[torch.Tensor]  # image K/V in cache order: fresh (full) or the caches after the call (sparse)
    text: list[torch.Tensor] | None = None  # fresh text K/V in cache order (variants that refresh them)


@dataclass
class SparseInputs:
    """The per-step tensors of a sparse (or skip) call, besides the model's own inputs."""

    idx: torch.Tensor | None  # [B, k] computed image tokens (None for skip)
    history: torch.Tensor  # [H, B, N, C]
    weights: torch.Tensor  # [B, N, H]
    kv: Sequence[torch.Tensor] = ()  # image K/V caches, updated in place
    kv_prev: Sequence[torch.Tensor] | None = None  # with extrapolation: the computation before
    ratio: torch.Tensor | None = None  # [B, N] with extrapolation
    text: Sequence[torch.Tensor] | None = None  # text K/V caches: CACHED reads them, SUBSET writes them in place
    text_prev: Sequence[torch.Tensor] | None = None
    text_ratio: torch.Tensor | None = None  # [B] (CACHED), [B, M] per text token (SUBSET)
    text_idx: torch.Tensor | None = None  # [B, k_txt] computed text tokens (SUBSET)


class GraphExecutor:
    """Compiles and runs the variants of one analysed graph.

    ``may_need`` lists the variants a runtime may ask for besides the full one; the first
    call's example inputs are kept until each of them exists (building a variant needs
    them), then dropped. ``None`` keeps them (any variant may be built later).
    """

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], plan: DiTPlan,
                 config: SpecDiffConfig, mode: str | None = None,
                 may_need: Iterable[VariantKey] | None = None) -> None:
        self.gm, self.plan, self.config, self.mode = gm, plan, config, mode
        self.example_inputs: list[Any] | None = list(example_inputs)
        self.full_key = VariantKey.full(refresh_text=config.effective_context_ratio > 0)
        self._variants: dict[VariantKey, Variant] = {}
        self.may_need: set[VariantKey] | None = None if may_need is None else set(may_need)
        self.full: Variant = self.variant(self.full_key)
        self.full_flops = count_flops(gm, example_inputs)
        self._attentions = len(plan.attention)
        self._bindings: dict[VariantKey, Binding] = {}

    @property
    def compiled(self) -> list[Variant]:
        return list(self._variants.values())

    def variant(self, key: VariantKey) -> Variant:
        """The compiled variant ``key``, built on first use."""
        if key not in self._variants:
            if self.example_inputs is None:
                raise RuntimeError(f"specdiff: variant {key} was not announced in may_need and the example "
                                   "inputs needed to build it are gone")
            self._variants[key] = build_variant(self.gm, self.example_inputs, self.plan, self.config, key, self.mode)
            log.info("specdiff: compiled the %s variant in %.1f s", key, self._variants[key].compile_seconds)
            if self.may_need is not None and self.may_need <= self._variants.keys():
                self.example_inputs = None  # every variant built: do not keep the first call's tensors
        return self._variants[key]

    def prepare(self, keys: Iterable[VariantKey]) -> None:
        """Compile ``keys`` now (each once)."""
        for key in keys:
            self.variant(key)

    def flops(self, key: VariantKey) -> int:
        return self.variant(key).flops

    # -- running ---------------------------------------------------------------------
    def binding(self, v: Variant) -> "Binding":
        """Where ``v``'s added inputs come from and its extra outputs go (built once per variant)."""
        b = self._bindings.get(v.key)
        if b is None:
            b = self._bindings[v.key] = Binding.of(v, self._attentions)
        return b

    def run_full(self, args: Sequence[Any]) -> StepOutput:
        b = self.binding(self.full)
        if b.inputs:
            raise KeyError(f"specdiff: the full variant takes inputs {[i.name for i in self.full.new_inputs]}")
        return b.output(self.full.call(args))

    def run_sparse(self, args: Sequence[Any], key: VariantKey, inputs: SparseInputs) -> StepOutput:
        """One cached step with the variant ``key`` (sparse or skip). Sparse variants update
        ``inputs.kv`` (and ``kv_prev``) in place for the computed tokens."""
        v = self.variant(key)
        b = self.binding(v)
        # the runtime's indices come from topk: distinct and in range by construction, so they are
        # not read back (on a GPU each read is a synchronisation)
        out = b.output(v.call([*args, *b.values(inputs, v)], check_values=False))
        out.kv = list(inputs.kv)
        return out


#: The :class:`SparseInputs` field each added input's value comes from (per-attention roles:
#: a list in cache order, indexed by :func:`~specdiff_fx.signature.cache_slot`).
_FIELDS = {
    Role.HISTORY: "history", Role.WEIGHTS: "weights", Role.IDX: "idx", Role.KV: "kv", Role.KV_PREV: "kv_prev",
    Role.KV_RATIO: "ratio", Role.TEXT_KV: "text", Role.TEXT_KV_PREV: "text_prev", Role.TEXT_RATIO: "text_ratio",
    Role.TEXT_TOKEN_RATIO: "text_ratio", Role.TEXT_IDX: "text_idx",
}


@dataclass(frozen=True)
class Binding:
    """One variant's signature resolved to positions, once: for each added input (in order) the
    :class:`SparseInputs` field and cache slot its value comes from, and where each extra output
    the runtime reads sits in the variant's outputs. The runtime calls a variant on every
    denoising step; looking ports up by name there cost about a millisecond per call on a
    24-block model (``BENCHMARKS.md``, "The runtime's host time per call")."""

    inputs: tuple[tuple[str, int | None], ...]  # (field, slot or None) per added input
    user: int  # number of user outputs
    tokens: int
    score: int | None
    kv: tuple[int, ...]  # fresh image K/V in cache order (full variants; empty for the others)
    text: tuple[int | None, ...] | None  # fresh text K/V in cache order (None: the variant returns none)

    @classmethod
    def of(cls, v: Variant, attentions: int) -> "Binding":
        inputs = []
        for spec in v.new_inputs:
            role = spec.port.role
            if role not in _FIELDS:
                raise KeyError(f"specdiff: the runtime passes no value for input {spec.name} of the {v.key} variant")
            inputs.append((_FIELDS[role], cache_slot(spec.port) if spec.port.attention is not None else None))
        at = {p: v.num_user_outputs + i for i, p in enumerate(v.outputs)}
        kv = tuple(at[p] for p in kv_ports(Role.KV, attentions) if p in at)
        if kv and len(kv) != 2 * attentions:
            raise KeyError(f"specdiff: the {v.key} variant returns {len(kv)} of the {2 * attentions} image K/V")
        text = tuple(at.get(p) for p in kv_ports(Role.TEXT_KV, attentions))
        return cls(tuple(inputs), v.num_user_outputs, at[Port(Role.TOKENS)], at.get(Port(Role.SCORE)), kv,
                   text if any(i is not None for i in text) else None)

    def values(self, inputs: SparseInputs, v: Variant) -> list[Any]:
        """The added inputs' values, in order."""
        out = []
        for (name, slot), spec in zip(self.inputs, v.new_inputs):
            value = getattr(inputs, name)
            if value is not None and slot is not None:
                value = value[slot]
            if value is None:
                raise KeyError(f"specdiff: no value for the input {spec.name} of the {v.key} variant")
            out.append(value)
        return out

    def output(self, outputs: Sequence[Any]) -> StepOutput:
        return StepOutput(tuple(outputs[:self.user]), outputs[self.tokens],
                          None if self.score is None else outputs[self.score],
                          [outputs[i] for i in self.kv],
                          None if self.text is None else [None if i is None else outputs[i] for i in self.text])
