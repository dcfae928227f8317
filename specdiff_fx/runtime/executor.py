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
from ..signature import ContextMode, Port, Role, VariantKey, VariantKind, kv_ports
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
    def run_full(self, args: Sequence[Any]) -> StepOutput:
        user, ex = self.full.run(args, {})
        return StepOutput(user, ex[Port(Role.TOKENS)], ex.get(Port(Role.SCORE)),
                          [ex[p] for p in kv_ports(Role.KV, self._attentions)], self._text(ex))

    def run_sparse(self, args: Sequence[Any], key: VariantKey, inputs: SparseInputs) -> StepOutput:
        """One cached step with the variant ``key`` (sparse or skip). Sparse variants update
        ``inputs.kv`` (and ``kv_prev``) in place for the computed tokens."""
        v = self.variant(key)
        values: dict[Port, Any] = {Port(Role.HISTORY): inputs.history, Port(Role.WEIGHTS): inputs.weights}
        if key.kind is VariantKind.SPARSE:
            values[Port(Role.IDX)] = inputs.idx
            values.update(zip(kv_ports(Role.KV, self._attentions), inputs.kv))
            if key.extrapolate:
                values[Port(Role.KV_RATIO)] = inputs.ratio
                values.update(zip(kv_ports(Role.KV_PREV, self._attentions), inputs.kv_prev))
            if key.context in (ContextMode.CACHED, ContextMode.SUBSET):
                values.update(self._text_values(v, Role.TEXT_KV, inputs.text))
                if key.context is ContextMode.SUBSET:
                    values[Port(Role.TEXT_IDX)] = inputs.text_idx
                if key.extrapolate:
                    ratio = Role.TEXT_RATIO if key.context is ContextMode.CACHED else Role.TEXT_TOKEN_RATIO
                    values[Port(ratio)] = inputs.text_ratio
                    values.update(self._text_values(v, Role.TEXT_KV_PREV, inputs.text_prev))
        # the runtime's indices come from topk: distinct and in range by construction, so they are
        # not read back (on a GPU each read is a synchronisation)
        user, ex = v.run(args, values, check_values=False)
        return StepOutput(user, ex[Port(Role.TOKENS)], ex.get(Port(Role.SCORE)), list(inputs.kv), self._text(ex))

    def _text(self, extras: dict[Port, Any]) -> list[torch.Tensor] | None:
        """The fresh text K/V a variant returned, in cache order (None when it returns none).
        Attentions without text tokens have no text K/V: their entries are None."""
        ports = kv_ports(Role.TEXT_KV, self._attentions)
        if not any(p in extras for p in ports):
            return None
        return [extras.get(p) for p in ports]

    def _text_values(self, v: Variant, role: Role, tensors: Sequence[torch.Tensor | None]) -> dict[Port, Any]:
        wanted = {i.port for i in v.new_inputs if i.port.role is role}
        return {p: t for p, t in zip(kv_ports(role, self._attentions), tensors) if p in wanted}
