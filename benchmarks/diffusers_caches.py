"""Diffusers' own feature caches on the SD3 zoo model: the baselines specdiff is compared with.

diffusers 0.42 ships seven caching hooks (``diffusers/hooks``): TaylorSeer, FirstBlockCache,
MagCache, FasterCache, PyramidAttentionBroadcast (PAB), SeaCache and TextKVCache. This module
applies the ones that work on :class:`diffusers.SD3Transformer2DModel` to the trained SD3
"shapes" model of :mod:`specdiff_zoo` and measures them against full compute.
``benchmarks/protocol.py`` applies the same five to the FLUX-architecture zoo models too (all five
run on :class:`diffusers.FluxTransformer2DModel` unchanged; FasterCache there with
``is_guidance_distilled=True``, since FLUX has no batched [uncond, cond] call to split).

How the caches are driven here (and why not with ``transformer.enable_cache``):

* ``SD3Transformer2DModel`` does **not** inherit :class:`diffusers.models.cache_utils.CacheMixin`
  (its bases are ``ModelMixin, AttentionMixin, ConfigMixin, PeftAdapterMixin,
  FromOriginalModelMixin, SD3Transformer2DLoadersMixin``), so ``enable_cache``,
  ``disable_cache``, ``cache_context`` and ``_reset_stateful_cache`` do not exist on it
  (``AttributeError: 'SD3Transformer2DModel' object has no attribute 'enable_cache'``), and
  ``StableDiffusion3Pipeline`` never enters a ``cache_context`` nor resets hook state.
  :func:`apply_cache` therefore does what ``CacheMixin`` does, on any module: it calls the
  ``diffusers.hooks.apply_*`` function of the config, records the hooks that appeared (so
  :meth:`CacheHandle.remove` can take exactly those off again), resets state with
  ``HookRegistry.reset_stateful_hooks`` (what ``_reset_stateful_cache`` calls and what
  ``DiffusionPipeline.maybe_free_model_hooks`` runs after every generation) and sets the
  cache context with ``diffusers.hooks.hooks._set_cache_context`` (what ``cache_context`` does).
* TaylorSeer and FirstBlockCache keep their state per cache context and raise
  ``ValueError: No cache context is set. Wrap the denoiser call in `model.cache_context(name,
  ...)` ...`` without one; MagCache falls back to a context named ``"inference"``; PAB and
  FasterCache keep state on the hook itself and instead need a ``current_timestep_callback``.
  :class:`CachedTransformer` (from :func:`cached_sampler`) covers all of them: every call runs
  inside ``context(name, step_index=..., num_inference_steps=..., timestep=..., sigma=...)``
  and publishes the current 1000-scale timestep to the callbacks. ``name`` is ``"cond"`` unless
  the caller entered ``CachedTransformer.cache_context(name)`` (SD3 classifier-free guidance is
  one batched call, uncond first, in one context; ``FluxPipeline`` wraps its call in
  ``cache_context("cond")`` and, with true CFG, a second call in ``cache_context("uncond")``).
* State per cache context. TaylorSeer, FirstBlockCache and MagCache hold theirs in a
  ``StateManager`` keyed by the context name, so cond and uncond never mix (MagCache still uses
  one calibrated ``mag_ratios`` list for every context). PAB and FasterCache keep one state
  object on each hook, which stock diffusers shares across contexts: under FLUX true CFG the
  uncond call would reuse attention outputs the cond call cached and advance the same
  iteration counters. :meth:`CacheHandle.context` gives those hooks one state per context name.
* State must be reset between generations (TaylorSeer's step counter, PAB's and FasterCache's
  iteration counters and caches otherwise carry over). :class:`CachedTransformer` resets when
  it sees the timestep jump back up (a new generation), and :meth:`CachedTransformer.reset`
  does it explicitly.

SD3-specific adaptations (see :data:`NOT_APPLICABLE` for the stock failures they avoid):

* FirstBlockCache: the last SD3 block has ``context_pre_only=True`` and returns
  ``(None, hidden_states)``; the stock tail hook subtracts from that ``None``. The cache is
  therefore applied to a view holding every block but the last, so the last block always
  computes (FBC's head/tail then are blocks ``0`` and ``N-2``).
* FasterCache: ``tensor_format="BCHW"`` (SD3 outputs ``[B, C, H, W]``) and
  ``pooled_projections`` added to the inputs that are split into uncond/cond halves.
* MagCache: ``mag_ratios`` are calibrated on the model with diffusers' own calibration mode
  (``MagCacheConfig(calibrate=True)``) on prompts other than the evaluation prompts.

Run ``python benchmarks/diffusers_caches.py`` for the full 28-step sweep (a few minutes on
two CPU cores); ``benchmarks/test_diffusers_caches_smoke.py`` is the fast check.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import math
import os
import sys
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # running as a script from a checkout without an installed package
    import specdiff_fx  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from diffusers.utils import logging as diffusers_logging

from specdiff_fx.metrics import psnr
from specdiff_zoo import ShapesModel, load_shapes_dit

__all__ = [
    "CACHES",
    "CALIBRATION_PROMPTS",
    "EVAL_PROMPTS",
    "NOT_APPLICABLE",
    "SWEEP",
    "CacheHandle",
    "CachedTransformer",
    "SweepResult",
    "apply_cache",
    "cached_sampler",
    "calibrate_mag_ratios",
    "count_flops",
    "evaluate",
    "main",
    "reproduce_not_applicable",
    "timestep_scale",
]

# ---------------------------------------------------------------------------------------
# configs


def _faster_cache_config(**params: Any) -> FasterCacheConfig:
    """:class:`FasterCacheConfig` with the settings SD3 needs (overridable through ``params``).

    * ``tensor_format="BCHW"``: the default ``"BCFHW"`` permutes the output as a 5-D video.
    * ``pooled_projections`` is split into its uncond/cond halves together with
      ``hidden_states``, ``encoder_hidden_states`` and ``timestep``; the stock list omits it.
    * ``attention_weight_callback``: the 0.5 diffusers falls back to, set explicitly (quiet).
    """
    params.setdefault("tensor_format", "BCHW")
    params.setdefault(
        "_unconditional_conditional_input_kwargs_identifiers",
        ["hidden_states", "encoder_hidden_states", "timestep", "pooled_projections",
         "attention_mask", "encoder_attention_mask"],
    )
    params.setdefault("attention_weight_callback", lambda _module: 0.5)
    return FasterCacheConfig(**params)


CACHES: dict[str, Callable[..., Any]] = {
    "taylorseer": TaylorSeerCacheConfig,
    "first_block_cache": FirstBlockCacheConfig,
    "mag_cache": MagCacheConfig,
    "faster_cache": _faster_cache_config,
    "pyramid_attention_broadcast": PyramidAttentionBroadcastConfig,
}
"""Cache name -> config factory (``factory(**params)`` builds the diffusers config)."""

_APPLY: dict[type, Callable[[nn.Module, Any], None]] = {
    TaylorSeerCacheConfig: apply_taylorseer_cache,
    FirstBlockCacheConfig: apply_first_block_cache,
    MagCacheConfig: apply_mag_cache,
    FasterCacheConfig: apply_faster_cache,
    PyramidAttentionBroadcastConfig: apply_pyramid_attention_broadcast,
}

SWEEP: list[tuple[str, dict[str, Any]]] = [
    # TaylorSeer (attention outputs of every block predicted by a first-order Taylor series;
    # full steps are the first `disable_cache_before_step` ones, then every `cache_interval`).
    ("taylorseer", {"cache_interval": 2, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 4, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 5, "disable_cache_before_step": 3}),
    ("taylorseer", {"cache_interval": 3, "disable_cache_before_step": 6, "disable_cache_after_step": 25}),
    ("taylorseer", {"cache_interval": 5, "disable_cache_before_step": 6}),
    # FirstBlockCache: relative change of block 0's residual below `threshold` -> reuse the
    # residual of the remaining cached blocks (0.05, the diffusers default, never skips here).
    ("first_block_cache", {"threshold": 0.1}),
    ("first_block_cache", {"threshold": 0.2}),
    ("first_block_cache", {"threshold": 0.3}),
    # MagCache (mag_ratios calibrated on the model by `cached_sampler`); 20 % of the steps kept.
    ("mag_cache", {"threshold": 0.03, "max_skip_steps": 2, "retention_ratio": 0.2}),
    ("mag_cache", {"threshold": 0.06, "max_skip_steps": 3, "retention_ratio": 0.2}),
    ("mag_cache", {"threshold": 0.12, "max_skip_steps": 3, "retention_ratio": 0.2}),
    # FasterCache: the uncond half is recomputed every `unconditional_batch_skip_range` steps
    # below timestep 641 (of 1000) and approximated from the cond half in between; attention
    # outputs are extrapolated every other step below 681 on those steps.
    ("faster_cache", {"unconditional_batch_skip_range": 3}),
    ("faster_cache", {}),
    ("faster_cache", {"spatial_attention_timestep_skip_range": (-1, 801),
                      "unconditional_batch_timestep_skip_range": (-1, 781),
                      "unconditional_batch_skip_range": 5}),
    # PAB: attention outputs reused for `skip_range - 1` steps inside the timestep range.
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                     "spatial_attention_timestep_skip_range": (100, 800)}),
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 3,
                                     "spatial_attention_timestep_skip_range": (100, 800)}),
    ("pyramid_attention_broadcast", {"spatial_attention_block_skip_range": 2,
                                     "spatial_attention_timestep_skip_range": (50, 950)}),
]
"""``(cache name, params)`` settings for 28 steps, grouped by cache (the smoke test runs the
last setting of each cache, which also skips work in an 8-step generation)."""

NOT_APPLICABLE: dict[str, str] = {
    "enable_cache / disable_cache / cache_context (CacheMixin API)": (
        "SD3Transformer2DModel does not inherit CacheMixin (bases: ModelMixin, AttentionMixin, ConfigMixin, "
        "PeftAdapterMixin, FromOriginalModelMixin, SD3Transformer2DLoadersMixin): "
        "\"AttributeError: 'SD3Transformer2DModel' object has no attribute 'enable_cache'\"; "
        "StableDiffusion3Pipeline never enters cache_context nor resets hook state. Worked around here by calling "
        "diffusers.hooks.apply_* directly (apply_cache)."
    ),
    "first_block_cache (stock: whole block list)": (
        "The last JointTransformerBlock has context_pre_only=True and returns (None, hidden_states); "
        "FBCBlockHook(is_tail=True) computes `output[return_encoder_hidden_states_index] - "
        "shared_state.head_block_output[1]` -> \"TypeError: unsupported operand type(s) for -: 'NoneType' and "
        "'Tensor'\" on the first call. SWEEP applies it to all blocks but the last (the last always computes)."
    ),
    "taylorseer (use_lite_mode=True)": (
        "Lite mode makes every `^[^.]*block[^.]*\\.[^.]+$` module (all transformer_blocks.i) an inactive "
        "(zero-returning) module; TaylorSeerState.update records `output.dtype` of every output and the last "
        "block's output (None, hidden_states) fails: \"AttributeError: 'NoneType' object has no attribute "
        "'dtype'\". The default mode (attention outputs, `^transformer_blocks.*attn`) works and is in SWEEP."
    ),
    "faster_cache (stock input identifiers / tensor_format)": (
        "The default tensor_format='BCFHW' permutes SD3's 4-D output as a video on the first call: \"RuntimeError: "
        "permute(sparse_coo): number of dimensions in the tensor input does not match the length of the desired "
        "ordering of dimensions i.e. input.dim() = 4 is not equal to len(dims) = 5\". With tensor_format='BCHW' the "
        "denoiser hook still splits only hidden_states, encoder_hidden_states, timestep, attention_mask, "
        "encoder_attention_mask into uncond/cond halves; SD3's pooled_projections keeps batch 2B, so temb and the "
        "image stream disagree on the first uncond-skipping step: \"RuntimeError: The size of tensor a (4) must match "
        "the size of tensor b (2) at non-singleton dimension 0\" (AdaLayerNormZero, one prompt). SWEEP passes "
        "pooled_projections and tensor_format='BCHW' (see _faster_cache_config)."
    ),
    "pyramid_attention_broadcast (cross_attention_block_skip_range)": (
        "SD3 has no cross-attention modules (joint attention: Attention.is_cross_attention is False), so the "
        "cross-attention range hooks nothing; only spatial_attention_block_skip_range applies (in SWEEP)."
    ),
    "sea_cache (SeaCacheConfig)": (
        "Degenerate: without raw_vision_callback there is no SD3 adapter (only Cosmos 3 and Wan T2V): \"SeaCache "
        "requires raw vision latents containing at least one noisy frame; ... run in fail-open mode\". With a "
        "callback returning hidden_states as (C, 1, H, W), the tail block (context_pre_only) returns "
        "encoder_hidden_states=None, so _record_full_execution (requires_und_output=True) never records a residual "
        "and every gated step logs \"SeaCache selected a cache hit without residual history; running in fail-open "
        "mode.\" -- it never skips (output identical to full compute)."
    ),
    "text_kv_cache (TextKVCacheConfig)": (
        "Degenerate: apply_text_kv_cache only hooks NucleusMoEImageTransformerBlock modules; on SD3 it installs the "
        "transformer-level hook alone and caches nothing. It could not be lossless anyway: SD3's text stream is "
        "modulated by the timestep (norm1_context is AdaLayerNormZero on temb), so text K/V change every step."
    ),
}
"""Caches (or stock configurations) that do not apply to SD3Transformer2DModel, and why. The
quoted errors/outcomes are reproduced by ``python benchmarks/diffusers_caches.py
--check-not-applicable`` (:func:`reproduce_not_applicable`)."""

EVAL_PROMPTS: tuple[str, ...] = (
    "a red circle at the left on a blue background",
    "yellow triangle at top and green square at bottom on black background",
)
CALIBRATION_PROMPTS: tuple[str, ...] = (
    "a white square at the center on a navy background",
    "purple circle at left and orange triangle at right on gray background",
)
"""Prompts MagCache is calibrated on (the training caption grammar, other content than EVAL_PROMPTS)."""

# ---------------------------------------------------------------------------------------
# applying / resetting / removing


def _hook_inventory(root: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every ``(module, hook name)`` of diffusers' hook registries under ``root``."""
    found = []
    for _, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if isinstance(registry, HookRegistry):
            found.extend((module, name) for name in registry._hook_order)
    return found


class _BlockView(nn.Module):
    """A module whose only child is ``transformer_blocks``: a subset of another model's blocks.

    Block-list caches (FirstBlockCache) find their head and tail among a module's children
    named like ``transformer_blocks``; applying them to this view instead of the model
    leaves the blocks outside the view uncached. The hooks land on the shared blocks.
    """

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(blocks)


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, CacheHandle]" = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class CacheHandle:
    """A diffusers cache applied to a transformer: reset its state, set its context, remove it.

    Also a context manager: ``with apply_cache(t, "taylorseer", ...) as h:`` removes the
    cache on exit.
    """

    transformer: nn.Module
    name: str
    config: Any
    hooks: list[tuple[nn.Module, str]] = field(default_factory=list)
    #: the timestep of the current call (1000 scale); read by PAB/FasterCache callbacks
    current_timestep: float = 1000.0
    removed: bool = False
    #: cache context name -> (id of hook -> its state in that context), for the hooks that keep
    #: their state on the hook itself (``hook.state``: PAB, FasterCache), which stock diffusers
    #: shares across contexts; see :meth:`context`
    context_states: dict[str, dict[int, Any]] = field(default_factory=dict)

    def reset(self) -> None:
        """Forget all cached state (call between generations), like ``_reset_stateful_cache``."""
        HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
        self.context_states.clear()

    def _select_context_states(self, name: str) -> None:
        """Point every hook that keeps its state on itself at context ``name``'s own state
        (a fresh one on the context's first call since the last reset)."""
        states = self.context_states.setdefault(name, {})
        for module, hook_name in self.hooks:
            hook = module._diffusers_hook.hooks.get(hook_name)
            state = getattr(hook, "state", None)
            if state is None or isinstance(state, StateManager):
                continue
            if id(hook) not in states:
                states[id(hook)] = type(state)()
            hook.state = states[id(hook)]

    @contextlib.contextmanager
    def context(self, name: str = "cond", *, step_index: int | None = None,
                num_inference_steps: int | None = None, timestep: float | None = None,
                sigma: float | None = None) -> Iterator[None]:
        """``transformer.cache_context(name, ...)`` for any module (CacheMixin's implementation),
        with one difference: hooks that keep their state on the hook (PAB, FasterCache) get one
        state per context name here, where stock diffusers shares one across contexts (so
        FLUX true CFG's "uncond" call would read what the "cond" call cached)."""
        if timestep is not None:
            self.current_timestep = float(timestep)
        self._select_context_states(name)
        _set_cache_context(self.transformer, CacheContext(
            name, step_index=step_index, num_inference_steps=num_inference_steps, timestep=timestep, sigma=sigma))
        try:
            yield
        finally:
            _set_cache_context(self.transformer, None)

    def remove(self) -> None:
        """Take exactly the hooks this cache installed off again (``disable_cache``)."""
        if self.removed:
            return
        self.reset()
        for module, hook_name in reversed(self.hooks):
            module._diffusers_hook.remove_hook(hook_name, recurse=False)
        HookRegistry.check_if_exists_or_initialize(self.transformer).invalidate_child_registries_cache()
        self.removed = True
        if _ACTIVE.get(self.transformer) is self:
            del _ACTIVE[self.transformer]

    def __enter__(self) -> "CacheHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _last_block_is_context_pre_only(transformer: nn.Module) -> bool:
    blocks = getattr(transformer, "transformer_blocks", None)
    return bool(blocks) and bool(getattr(blocks[-1], "context_pre_only", False))


def _install(transformer: nn.Module, name: str, config: Any, apply_fn: Callable[[nn.Module, Any], None],
             target: nn.Module | None = None, handle: CacheHandle | None = None) -> CacheHandle:
    """Run ``apply_fn(target or transformer, config)`` and record the hooks it installed."""
    if transformer in _ACTIVE:
        raise RuntimeError(f"{_ACTIVE[transformer].name} is still applied to this transformer; remove() it first")
    handle = handle or CacheHandle(transformer, name, config)
    handle.config = config
    before = set((id(m), n) for m, n in _hook_inventory(transformer))

    def installed() -> list[tuple[nn.Module, str]]:
        return [(m, n) for m, n in _hook_inventory(transformer) if (id(m), n) not in before]

    try:
        apply_fn(transformer if target is None else target, config)
    except BaseException:  # take off whatever was installed before the error
        handle.hooks = installed()
        handle.remove()
        raise
    handle.hooks = installed()
    _ACTIVE[transformer] = handle
    HookRegistry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    return handle


def apply_cache(transformer: nn.Module, name: str, **params: Any) -> CacheHandle:
    """Apply cache ``name`` (a key of :data:`CACHES`) built from ``params`` to ``transformer``.

    Model-dependent defaults are filled in unless ``params`` sets them: TaylorSeer's factors
    use the transformer's dtype; PAB/FasterCache read the current timestep from the handle
    (kept up to date by :meth:`CacheHandle.context`). MagCache needs ``mag_ratios`` (or
    ``calibrate=True``); :func:`cached_sampler` calibrates them. FirstBlockCache skips a
    ``context_pre_only`` last block (see :data:`NOT_APPLICABLE`). Raises ``RuntimeError`` if
    a cache applied by this function is still on ``transformer``.
    """
    if name not in CACHES:
        raise KeyError(f"unknown cache {name!r}; expected one of {sorted(CACHES)}")
    if transformer in _ACTIVE:
        raise RuntimeError(f"{_ACTIVE[transformer].name} is still applied to this transformer; remove() it first")
    handle = CacheHandle(transformer, name, None)
    params = dict(params)
    if name == "taylorseer":
        params.setdefault("taylor_factors_dtype", next(transformer.parameters()).dtype)
    if name in ("faster_cache", "pyramid_attention_broadcast"):
        params.setdefault("current_timestep_callback", lambda: handle.current_timestep)
    if name == "mag_cache" and "mag_ratios" in params and not torch.is_tensor(params["mag_ratios"]):
        params["mag_ratios"] = torch.tensor(params["mag_ratios"])
    config = CACHES[name](**params)
    target = None
    if name == "first_block_cache" and _last_block_is_context_pre_only(transformer):
        target = _BlockView(list(transformer.transformer_blocks)[:-1])
    return _install(transformer, name, config, _APPLY[type(config)], target, handle)


# ---------------------------------------------------------------------------------------
# a transformer callable for ShapesModel.sample


def timestep_scale(model: ShapesModel) -> float:
    """Transformer ``timestep`` per unit sigma as the pipelines pass it: SD3 ``sigma * 1000``,
    FLUX ``sigma`` (``FluxPipeline`` divides the scheduler's timestep by 1000)."""
    return 1.0 if model.family == "flux" else 1000.0


class CachedTransformer:
    """The transformer with a cache, callable like the diffusers model (keyword arguments).

    Each call runs inside ``handle.context(name, step_index=i, num_inference_steps=n,
    timestep=1000 * sigma, sigma=sigma)`` with ``sigma = timestep / timestep_scale``: ``name`` is
    the innermost :meth:`cache_context` the caller entered (``context_name`` outside any), ``i``
    counts that context's calls since the last reset, and the 1000-scale timestep is what PAB and
    FasterCache compare with their timestep ranges (``FluxPipeline`` publishes the scheduler's
    timestep, not the ``timestep / 1000`` it passes to the model). With ``auto_reset`` a call whose
    timestep is above the previous one starts a new generation and resets the cache first.
    """

    def __init__(self, transformer: nn.Module, handle: CacheHandle, num_steps: int, *,
                 auto_reset: bool = True, context_name: str = "cond", timestep_scale: float = 1000.0) -> None:
        self.transformer, self.handle, self.num_steps = transformer, handle, num_steps
        self.auto_reset, self.context_name, self.timestep_scale = auto_reset, context_name, timestep_scale
        self.step = 0  # calls since the last reset, all contexts together
        self.context_steps: dict[str, int] = {}
        self._active: str | None = None
        self._last_timestep: float | None = None

    @contextlib.contextmanager
    def cache_context(self, name: str) -> Iterator[None]:
        """What ``CacheMixin.cache_context`` is to a pipeline: the calls inside run in cache
        context ``name`` (``FluxPipeline``: ``"cond"``, and ``"uncond"`` for true CFG)."""
        previous, self._active = self._active, name
        try:
            yield
        finally:
            self._active = previous

    def __call__(self, **kwargs: Any) -> Any:
        timestep = float(torch.as_tensor(kwargs["timestep"]).flatten()[0])
        if self._last_timestep is not None and timestep > self._last_timestep and self.auto_reset:
            self.reset()
        name = self._active or self.context_name
        index = self.context_steps.get(name, 0)
        sigma = timestep / self.timestep_scale
        with self.handle.context(name, step_index=index, num_inference_steps=self.num_steps,
                                 timestep=sigma * 1000.0, sigma=sigma):
            out = self.transformer(**kwargs)
        self.context_steps[name] = index + 1
        self.step += 1
        self._last_timestep = timestep
        return out

    def reset(self) -> None:
        """Start a new generation: clear the cache's state and the step counters."""
        self.handle.reset()
        self.step = 0
        self.context_steps.clear()
        self._last_timestep = None

    def remove(self) -> None:
        """Remove the cache from the transformer (it is then plain eager again)."""
        self.handle.remove()


_MAG_RATIOS: "weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, tuple[str, ...], str], list[float]]]" = (
    weakref.WeakKeyDictionary())

#: ``sample(transformer, prompts, seed)``: one generation with ``transformer`` in place of the model's
Sampler = Callable[[Callable[..., Any], Sequence[str], int], Any]


def calibrate_mag_ratios(model: ShapesModel, num_steps: int = 28,
                         prompts: Sequence[str] = CALIBRATION_PROMPTS, seed: int = 1234, *,
                         sample: Sampler | None = None, sampler_name: str = "") -> list[float]:
    """MagCache ``mag_ratios`` of ``model`` with diffusers' calibration mode.

    Runs one generation with ``MagCacheConfig(calibrate=True)`` (nothing skipped) and parses
    the list it prints at the end ("Copy these values to MagCacheConfig(mag_ratios=...)").
    The generation is ``model.sample`` unless ``sample`` is given (then ``sampler_name`` tells
    calibrations apart). With several cache contexts per step (FLUX true CFG) each context
    calibrates its own list; the first printed, the ``"cond"`` context's, is returned: a
    ``MagCacheConfig`` holds one list for every context. Cached per (transformer, steps,
    prompts, sampler name).
    """
    known = _MAG_RATIOS.setdefault(model.transformer, {})
    key = (num_steps, tuple(prompts), sampler_name)
    if key not in known:
        handle = apply_cache(model.transformer, "mag_cache", calibrate=True, num_inference_steps=num_steps)
        try:
            runner = CachedTransformer(model.transformer, handle, num_steps, timestep_scale=timestep_scale(model))
            buf = io.StringIO()
            with contextlib.redirect_stdout(buf):
                if sample is None:
                    model.sample(list(prompts), num_steps=num_steps, seed=seed, transformer=runner)
                else:
                    sample(runner, list(prompts), seed)
        finally:
            handle.remove()
        lines = buf.getvalue().splitlines()
        marker = next(i for i, line in enumerate(lines) if "Calibration Complete" in line)
        ratios = next(ast.literal_eval(line) for line in lines[marker + 1:] if line.strip().startswith("["))
        if len(ratios) != num_steps:
            raise RuntimeError(f"MagCache calibration returned {len(ratios)} ratios for {num_steps} steps")
        known[key] = [float(r) for r in ratios]
    return list(known[key])


def cached_sampler(model: ShapesModel, name: str, params: dict[str, Any], *, num_steps: int = 28,
                   auto_reset: bool = True) -> CachedTransformer:
    """Apply cache ``name`` with ``params`` to ``model.transformer``; return the callable to pass
    as ``model.sample(..., num_steps=num_steps, transformer=...)``.

    MagCache gets ``num_inference_steps=num_steps`` and, unless ``params`` has them,
    ``mag_ratios`` calibrated on :data:`CALIBRATION_PROMPTS`. Call ``.remove()`` on the result
    before applying another cache to the same model.
    """
    params = dict(params)
    if name == "mag_cache":
        params.setdefault("num_inference_steps", num_steps)
        if "mag_ratios" not in params and not params.get("calibrate", False):
            params["mag_ratios"] = calibrate_mag_ratios(model, num_steps)
    handle = apply_cache(model.transformer, name, **params)
    return CachedTransformer(model.transformer, handle, num_steps, auto_reset=auto_reset,
                             timestep_scale=timestep_scale(model))


def reproduce_not_applicable(model: ShapesModel, num_steps: int = 6) -> dict[str, str]:
    """Run the stock configurations behind :data:`NOT_APPLICABLE` on ``model``; say what happened.

    Each runs inside a proper cache context (so a missing context is never the cause), for
    ``num_steps`` steps on one prompt; the outcome is the exception raised, or whether the
    images differ from full compute.
    """
    from diffusers.hooks import (SeaCacheConfig, TextKVCacheConfig, apply_sea_cache, apply_text_kv_cache)

    transformer = model.transformer
    prompts = list(EVAL_PROMPTS[:1])
    reference = model.sample(prompts, num_steps=num_steps)

    def raw_vision(_module: nn.Module, _args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[torch.Tensor]:
        return [x.unsqueeze(1) for x in kwargs["hidden_states"].unbind(0)]  # (C, T=1, H, W)

    cases: dict[str, Callable[[CacheHandle], tuple[Any, Callable[[nn.Module, Any], None]]]] = {
        "first_block_cache (stock: whole block list)":
            lambda h: (FirstBlockCacheConfig(threshold=0.3), apply_first_block_cache),
        "taylorseer (use_lite_mode=True)":
            lambda h: (TaylorSeerCacheConfig(use_lite_mode=True, taylor_factors_dtype=torch.float32),
                       apply_taylorseer_cache),
        "faster_cache (stock input identifiers / tensor_format)":
            lambda h: (FasterCacheConfig(current_timestep_callback=lambda: h.current_timestep,
                                         attention_weight_callback=lambda _m: 0.5), apply_faster_cache),
        "faster_cache (tensor_format='BCHW' only)":
            lambda h: (FasterCacheConfig(current_timestep_callback=lambda: h.current_timestep, tensor_format="BCHW",
                                         attention_weight_callback=lambda _m: 0.5), apply_faster_cache),
        "sea_cache (SeaCacheConfig)": lambda h: (SeaCacheConfig(), apply_sea_cache),
        "sea_cache (with raw_vision_callback)":
            lambda h: (SeaCacheConfig(raw_vision_callback=raw_vision), apply_sea_cache),
        "text_kv_cache (TextKVCacheConfig)": lambda h: (TextKVCacheConfig(), apply_text_kv_cache),
    }
    outcomes = {"enable_cache / disable_cache / cache_context (CacheMixin API)":
                "has enable_cache: " + str(hasattr(transformer, "enable_cache"))}
    for key, make in cases.items():
        handle = CacheHandle(transformer, key, None)
        config, apply_fn = make(handle)
        try:
            _install(transformer, key, config, apply_fn, handle=handle)
            images = model.sample(prompts, num_steps=num_steps,
                                  transformer=CachedTransformer(transformer, handle, num_steps))
        except Exception as error:  # noqa: BLE001 - the error is the finding
            outcomes[key] = f"{type(error).__name__}: {error}"
        else:
            outcomes[key] = ("ran; output identical to full compute (nothing cached)" if torch.equal(images, reference)
                             else f"ran; PSNR {psnr(images, reference):.2f} dB vs full compute")
        finally:
            handle.remove()
    return outcomes


# ---------------------------------------------------------------------------------------
# measuring


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn()`` under specdiff's FLOP counter (CPU SDPA counted); return (result, FLOPs)."""
    from specdiff_fx.variants import flop_counter

    with flop_counter() as counter:
        result = fn()
    return result, counter.get_total_flops()


@dataclass
class SweepResult:
    """One SWEEP entry measured on a model (see :func:`evaluate`)."""

    name: str
    params: dict[str, Any]
    flops_fraction: float  # transformer FLOPs / FLOPs of full compute
    time_ratio: float  # wall clock (cached / eager), measured interleaved in one process
    cpu_ratio: float  # process CPU time (cached / eager): less sensitive to other load on the machine
    psnr_db: float  # vs full compute
    reset_equal: bool  # the generation after reset() equals the first one
    leaks_without_reset: bool | None  # a second generation with neither reset differs (None: not checked)
    removed_clean: bool | None = None  # after remove() the model is eager again (None: not checked)

    def row(self) -> str:
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items()) or "defaults"
        leak = "-" if self.leaks_without_reset is None else ("yes" if self.leaks_without_reset else "no")
        return (f"| {self.name} | {params} | {self.flops_fraction:.1%} | {self.time_ratio:.2f} | {self.cpu_ratio:.2f} | "
                f"{self.psnr_db:.2f} | {'yes' if self.reset_equal else 'NO'} | {leak} |")


def _fmt(v: Any) -> str:
    return f"({v[0]}, {v[1]})" if isinstance(v, tuple) and len(v) == 2 else str(v)


TABLE_HEADER = ("| cache | params | FLOPs vs full | wall time vs eager | CPU time vs eager | PSNR dB | reset → same "
                "| state leaks w/o reset |\n|---|---|---|---|---|---|---|---|")


def evaluate(model: ShapesModel, sweep: Sequence[tuple[str, dict[str, Any]]], *, prompts: Sequence[str] = EVAL_PROMPTS,
             num_steps: int = 28, seed: int = 0, repeats: int = 3, leak_check: bool = True,
             log: Callable[[str], None] = print) -> list[SweepResult]:
    """Measure every ``(name, params)`` of ``sweep`` on ``model`` against full compute.

    Per entry, with the cache applied to ``model.transformer`` and an untouched deep copy as
    eager: ``repeats`` times eager (timed) then cached (timed, ``reset()`` before each), one
    more cached generation under a FLOP counter, and optionally one with no reset at all
    (does state leak into the next generation?). Every reset generation must equal the
    first. ``time_ratio`` = min cached wall time / min eager wall time (the minimum is the
    estimate least disturbed by other load on the machine); ``cpu_ratio`` the same with the
    process CPU time. Afterwards the cache is removed and the
    model must reproduce full compute exactly.
    """
    prompts = list(prompts)
    eager = copy.deepcopy(model.transformer)

    def run(transformer: Callable[..., Any]) -> torch.Tensor:
        return model.sample(prompts, num_steps=num_steps, seed=seed, transformer=transformer)

    def timed(transformer: Callable[..., Any]) -> tuple[torch.Tensor, float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        out = run(transformer)
        return out, time.perf_counter() - t0, time.process_time() - c0

    run(eager)  # warm-up (first calls allocate / initialise kernels)
    reference, full_flops = count_flops(lambda: run(eager))
    results = []
    for name, params in sweep:
        sampler = cached_sampler(model, name, params, num_steps=num_steps, auto_reset=False)
        eager_times, cached_times, eager_cpu, cached_cpu, outputs = [], [], [], [], []
        try:
            for _ in range(max(1, repeats)):
                _, seconds, cpu = timed(eager)
                eager_times.append(seconds)
                eager_cpu.append(cpu)
                sampler.reset()
                out, seconds, cpu = timed(sampler)
                outputs.append(out)
                cached_times.append(seconds)
                cached_cpu.append(cpu)
            sampler.reset()
            counted, flops = count_flops(lambda: run(sampler))
            outputs.append(counted)
            leaks = None
            if leak_check:  # no reset: a leak makes this generation differ
                leaks = not torch.equal(run(sampler), outputs[0])
        finally:
            sampler.remove()
        clean = torch.equal(run(model.transformer), reference)
        result = SweepResult(
            name=name, params=dict(params), flops_fraction=flops / full_flops,
            time_ratio=min(cached_times) / min(eager_times), cpu_ratio=min(cached_cpu) / min(eager_cpu), psnr_db=psnr(outputs[0], reference),
            reset_equal=all(torch.equal(outputs[0], o) for o in outputs[1:]),
            leaks_without_reset=leaks, removed_clean=clean)
        log(result.row() + ("" if clean else "  (model not clean after remove()!)"))
        results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--only", default="", help="comma-separated cache names (default: all of SWEEP)")
    parser.add_argument("--prompts", nargs="*", default=list(EVAL_PROMPTS))
    parser.add_argument("--repeats", type=int, default=3, help="timed eager/cached pairs per entry")
    parser.add_argument("--no-leak-check", action="store_true", help="skip the generation without any reset")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared machine, OpenMP threads descheduled at barriers make "
                             "multi-threaded timings noise)")
    parser.add_argument("--check-not-applicable", action="store_true",
                        help="only run the stock configurations behind NOT_APPLICABLE and print what happens")
    parser.add_argument("--out", default="", help="also write the markdown table to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusers_logging.set_verbosity_error()  # FasterCache's "experimental" warnings
    warnings.filterwarnings("ignore", message=".*meshgrid.*")  # FasterCache's torch.meshgrid call

    only = {s for s in args.only.split(",") if s}
    unknown = only - set(CACHES)
    if unknown:
        parser.error(f"unknown cache(s) {sorted(unknown)}; choose from {sorted(CACHES)}")
    sweep = [(n, p) for n, p in SWEEP if not only or n in only]
    model = load_shapes_dit("sd3")
    if args.check_not_applicable:
        for what, outcome in reproduce_not_applicable(model).items():
            print(f"* {what}: {outcome}")
        return 0
    print(f"diffusers caches on the SD3 zoo model: {args.steps} steps, prompts {args.prompts}, "
          f"CFG {model.config.get('default_guidance_scale')}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} torch thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs\n")
    print(TABLE_HEADER)
    results = evaluate(model, sweep, prompts=args.prompts, num_steps=args.steps, repeats=args.repeats,
                       leak_check=not args.no_leak_check)
    print("\nnot applicable to SD3Transformer2DModel (or only degenerately):")
    for what, why in NOT_APPLICABLE.items():
        print(f"* {what}: {why}")
    if args.out:
        Path(args.out).write_text(TABLE_HEADER + "\n" + "\n".join(r.row() for r in results) + "\n")
    bad = [r for r in results if not r.reset_equal or r.removed_clean is False or not r.flops_fraction < 1.0
           or math.isinf(r.psnr_db)]
    if bad:
        print(f"\nFAILED checks: {[(r.name, r.params) for r in bad]}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
