"""The one configuration object of the backend, and the parser of ``options``.

``torch.compile(model, backend="specdiff", options={...})`` hands ``options`` to the
backend as keyword arguments; :meth:`SpecDiffConfig.from_options` turns them into a
frozen :class:`SpecDiffConfig`, rejecting unknown keys (the message lists the valid
ones) and values of the wrong type or outside their range (the message names the key,
the value and what is allowed). Validation happens when the config is built, so a bad
option fails at compile time, before any model code runs.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Mapping


#: the values of ``kv_dtype`` (see :class:`SpecDiffConfig`)
KV_DTYPES = ("model", "bfloat16", "auto")

#: the default ``context_ratio`` (see :class:`SpecDiffConfig`)
CONTEXT_RATIO = 0.5


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class SpecDiffConfig:
    """Options of the ``specdiff`` backend. Every field is validated in ``__post_init__``.

    Attributes:
        cache_ratio: fraction of image tokens *not* recomputed on a cached step,
            ``0 <= r < 1``. ``0`` computes every token on every step (the output then
            equals plain Inductor/eager).
        controller: the policy that decides, per call, between a full step, a sparse step
            and (where the policy allows) a skipped one: a name registered in
            :mod:`specdiff_fx.control` (``"error"``, the default: full calls when the
            measured error of caching would exceed ``tolerance``; ``"fixed"``:
            ``warmup_steps`` + ``refresh_at``).
        tolerance: with ``controller="error"``: the relative error of its outputs a cached
            call may have (``||F - F_reused|| / ||F||`` over the tokens it does not compute,
            measured as the generation runs); a call predicted above it computes every token.
            Lower is sharper and slower. A generation whose sampler is multistep (UniPC,
            DPM-Solver++; told from how the latent moves) is held to 7/16 of it
            (``ErrorControlled.multistep_share``); a one-step sampler's calls below sigma 0.5
            to twice it (``ErrorControlled.late_factor``).
        sparse_calls: with ``controller="error"``: how many cached calls after each full call
            compute the most-drifted tokens (and measure the error of the others on their
            probes); the cached calls after them, until the next full call, compute no token
            (every output reused, the prediction carried on from the measurements). ``None``:
            every cached call computes its tokens. Default 1: a computed token attends to the
            others' cached keys and values, which grow staler call by call, so later sparse
            calls buy less than they cost (on the tune models, at equal FLOPs, 0.3-2 dB more
            with 1 than with every call sparse, BENCHMARKS.md).
        speculative_steps: steps of the self-speculative pre-run (``0`` = history only,
            the default: on the tune models the pre-run's better token choice did not pay
            for its full-cost call, BENCHMARKS.md; ``1`` is the same as ``0``: the pre-run's
            first step is the generation's first call).
        warmup_steps: with ``controller="fixed"``: leading steps of a generation that
            compute every token.
        refresh_at: with ``controller="fixed"``: progress points in ``(0, 1)`` (progress =
            ``1 - sigma``) at which a full step refreshes every cache; derived from the
            timesteps, so the user never passes the step count.
        reuse_mass: share of the total score mass, taken from the lowest-scored tokens,
            whose tokens reuse their last output (tier C2), ``0 <= m < 1``; only used with
            ``blend=True`` (without C3 every non-computed token reuses).
        blend_history: how many past outputs tier C3 blends (``>= 1``).
        blend: ``True`` turns tier C3 on: the non-computed tokens above ``reuse_mass``
            get an estimate from their past outputs instead of their last one. Off by
            default: under the error controller neither C3 estimate beat plain reuse on the
            tune models at equal FLOPs (the paper's blend -0.5 dB of mean; the taylor one on
            the ``tolerance`` curve, and an image forked at 8 steps; BENCHMARKS.md).
        blend_mode: how tier C3 estimates a token: ``"taylor"`` extrapolates its last two
            computed outputs to first order in sigma; ``"paper"`` blends its last
            ``blend_history`` step outputs with weights ``exp(-j) * |sigma_{now-j} - sigma|``
            as SpecDiff describes.
        reuse_extrapolation: ``lam``, how far a reused token's output is carried along its
            last two computed outputs in a generation without guidance: ``F1 + lam * r * (F1 -
            F2)``, ``r`` the first-order ratio of sigma (:func:`schedule.extrapolation_ratio`),
            on the skipped calls and on a sparse call's reused tokens; ``0`` reuses ``F1``
            as it is, ``1`` extrapolates to first order, ``0 <= lam <= 1``. Under guidance (batched
            CFG halves, true CFG's second call, linked graphs) the tokens are reused as they
            are, whatever ``lam`` (BENCHMARKS.md). Default ``0.5``: without guidance it gained
            2.3 dB mean over the unguided cells of our three tune FLUX models (4 seeds) for 0.4
            points more FLOPs, far above what ``tolerance`` trades (about 1.5 dB per point),
            which is how the rule the defaults are chosen by now weighs a costlier candidate;
            ``1`` forked an image on one of them (BENCHMARKS.md, "``reuse_extrapolation=0.5``
            by default").
        starvation_scale: ``s`` in ``exp(s * cached_for)``, the starvation term; ``None``
            picks 0.5 with ``score="attention"`` (SpecDiff) and 0 with ``score="drift"``
            (whose score already grows with the time since a token was computed).
        score: what ranks the tokens on a cached step. ``"drift"``: the predicted
            staleness of each token's last output, ``|F1 - F2| / (s2 - s1) * (s1 - sigma)``
            from its last two computed outputs, times (with a speculative run,
            ``speculative_steps >= 2``) the change that run saw per token over the same
            part of the schedule (``fut``). ``"attention"``:
            SpecDiff's ``his * fut`` of attention received (history and speculative run).
        kv_extrapolation: extrapolate the cached tokens' keys/values to first order in sigma
            from their last two computations (instead of reusing the last); doubles the K/V
            cache.
        kv_dtype: the dtype the image and text K/V caches are stored in. ``"auto"``
            (default): bfloat16 where the model's keys are float32, else the keys' own dtype
            (a bfloat16 or float16 model's caches are unchanged); ``"model"``: the keys' own
            dtype; ``"bfloat16"``: bfloat16 whatever the model computes in. Only the stored
            copies are rounded: a cached step widens them to the model's dtype where it
            extrapolates them and the attention reads them in it. For a float32 model half
            the K/V caches' bytes, and a cached step streams a third fewer bytes through its
            K/V extrapolation; on the held-out models every cell's PSNR within 0.1 dB
            (BENCHMARKS.md).
        hindsight: ``True`` (default) corrects, on each full call, what the cached calls since
            the previous full call moved the latent wrong: their outputs against the linear
            interpolation between the two full calls' outputs, summed over the steps they fed,
            folded into the full call's output, less the share the sampler's own step takes
            back (:mod:`specdiff_fx.runtime.hindsight`). Assumes a flow-matching model whose
            output the sampler integrates over sigma.
        context_ratio: fraction of the context (text) tokens *not* recomputed on a cached
            step, ``0 <= r <= 1``, like ``cache_ratio`` for the image tokens: the
            ``round((1 - r) * M)`` text tokens whose keys/values drifted most since their
            last computation are computed (their K/V caches refreshed row by row), the
            others' keys/values come from their caches (extrapolated like the image ones).
            ``1`` computes none, ``0`` all. The same with and without classifier-free
            guidance (chosen on the tune models, BENCHMARKS.md).
        cache_context: deprecated, use ``context_ratio``: ``True`` is ``context_ratio=1``,
            ``False`` is ``context_ratio=0``; ``None`` (default) leaves it to
            ``context_ratio``.
        context_interval: deprecated (with ``cache_context=True`` or ``context_ratio=1``
            only): every ``context_interval``-th cached step computes every context token
            again; ``context_ratio`` computes the most-drifted ones on every cached step
            instead.
        score_queries: query rows sampled per attention to estimate the attention each
            token receives (``0`` = every row, exact but costs a second ``QK^T``).
        inductor: ``True`` compiles the rewritten graphs with Inductor; ``False`` runs
            them as plain FX graphs (debugging, fast tests).
        regional_compile: ``True`` compiles each rewritten graph block by block, every
            distinct block once (:mod:`specdiff_fx.regional`): a shorter first generation
            for a model of many identical blocks, at the cost of Inductor's fusion across
            block boundaries and a Python call per block. ``"auto"`` (default): block by
            block when the model runs on an accelerator (where kernels launch
            asynchronously, so a call per block overlaps the device's work, and the whole
            graphs' compiles took minutes), whole graphs on the CPU (where that call is paid
            in full: a few per cent on a small model). Inductor only.
        strict: ``True`` raises instead of falling back to plain Inductor.
        max_cache_bytes: cap on the bytes specdiff's caches may hold (``None`` = no cap).
            Checked when a full step stores its caches; over it, a generation keeps the
            first that fits of: no text K/V caches (context computed), no K/V
            extrapolation, neither; else it computes every token and keeps no caches.
            Each fallback is logged, warned once and noted in the report.
        max_generations: generations one compiled graph keeps in flight (a server
            interleaving requests); past it one is evicted (noted in its report) and its next
            call starts over: the least recently used of those that ran one call, other than the
            ``max_generations // 2`` most recently used, else the least recently used.
    """

    cache_ratio: float = 0.9
    controller: str = "error"
    tolerance: float = 0.16
    sparse_calls: int | None = 1
    speculative_steps: int = 0
    warmup_steps: int = 4
    refresh_at: tuple[float, ...] = (0.45, 0.7)
    reuse_mass: float = 0.10
    blend_history: int = 3
    blend: bool = False
    blend_mode: str = "paper"
    starvation_scale: float | None = None
    reuse_extrapolation: float = 0.5
    score: str = "drift"
    kv_extrapolation: bool = True
    kv_dtype: str = "auto"
    hindsight: bool = True
    cache_context: bool | None = None
    context_interval: int = 0
    context_ratio: float = CONTEXT_RATIO
    score_queries: int = 256
    inductor: bool = True
    regional_compile: bool | str = "auto"
    strict: bool = False
    max_cache_bytes: int | None = field(default=None)
    max_generations: int = 8

    # -- validation ---------------------------------------------------------------
    def __post_init__(self) -> None:
        def bad(key: str, allowed: str) -> ValueError:
            value = getattr(self, key)
            return ValueError(
                f"specdiff option {key!r}: got {value!r} ({type(value).__name__}); allowed: {allowed}"
            )

        if not (_is_real(self.cache_ratio) and 0.0 <= self.cache_ratio < 1.0):
            raise bad("cache_ratio", "a number with 0 <= cache_ratio < 1")
        from .control import policies, policy_options

        if self.controller not in policies():
            raise bad("controller", " or ".join(repr(p) for p in policies()))
        if not (_is_real(self.tolerance) and 0.0 < self.tolerance <= 10.0):
            raise bad("tolerance", "a number with 0 < tolerance <= 10")
        if self.sparse_calls is not None and not (_is_int(self.sparse_calls) and 1 <= self.sparse_calls <= 1000):
            raise bad("sparse_calls", "None or an int with 1 <= sparse_calls <= 1000")
        if not (_is_int(self.speculative_steps) and 0 <= self.speculative_steps <= 16):
            raise bad("speculative_steps", "an int with 0 <= speculative_steps <= 16")
        if not (_is_int(self.warmup_steps) and 1 <= self.warmup_steps <= 1000):
            raise bad("warmup_steps", "an int with 1 <= warmup_steps <= 1000")
        refresh = self.refresh_at
        if isinstance(refresh, list):
            object.__setattr__(self, "refresh_at", tuple(refresh))
            refresh = self.refresh_at
        if not (
            isinstance(refresh, tuple)
            and all(_is_real(p) and 0.0 < p < 1.0 for p in refresh)
            and list(refresh) == sorted(set(refresh))
        ):
            raise bad("refresh_at", "a sorted tuple of distinct numbers in (0, 1), e.g. (0.45, 0.7)")
        # an option of another controller is refused rather than silently ignored
        defaults = {f.name: f.default for f in fields(self)}
        reads = policy_options(self.controller)
        for key in sorted(policy_options() - reads):
            if getattr(self, key) != defaults[key]:
                owners = [n for n in policies() if key in policy_options(n)]
                raise ValueError(f"specdiff option {key!r} only applies with controller="
                                 f"{' or '.join(map(repr, owners))}; got controller={self.controller!r}")
        if not (_is_real(self.reuse_mass) and 0.0 <= self.reuse_mass < 1.0):
            raise bad("reuse_mass", "a number with 0 <= reuse_mass < 1")
        if not (_is_real(self.reuse_extrapolation) and 0.0 <= self.reuse_extrapolation <= 1.0):
            raise bad("reuse_extrapolation", "a number with 0 <= reuse_extrapolation <= 1")
        if not (_is_int(self.blend_history) and 1 <= self.blend_history <= 8):
            raise bad("blend_history", "an int with 1 <= blend_history <= 8")
        if self.blend_mode not in ("taylor", "paper"):
            raise bad("blend_mode", "'taylor' or 'paper'")
        if self.score not in ("attention", "drift"):
            raise bad("score", "'attention' or 'drift'")
        if self.blend_mode == "taylor" and self.blend and self.blend_history < 2:
            raise bad("blend_history", "an int >= 2 with blend_mode='taylor' (or blend=False)")
        for key in ("blend", "kv_extrapolation", "hindsight", "inductor", "strict"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "True or False")
        if self.kv_dtype not in KV_DTYPES:
            raise bad("kv_dtype", " or ".join(repr(d) for d in KV_DTYPES))
        if not (isinstance(self.regional_compile, bool) or self.regional_compile == "auto"):
            raise bad("regional_compile", "True, False or 'auto'")
        if self.cache_context is not None and not isinstance(self.cache_context, bool):
            raise bad("cache_context", "True, False or None (deprecated: use context_ratio)")
        if not (_is_int(self.context_interval) and 0 <= self.context_interval <= 1000):
            raise bad("context_interval", "an int with 0 <= context_interval <= 1000 (0 = only full steps)")
        if not (_is_real(self.context_ratio) and 0.0 <= self.context_ratio <= 1.0):
            raise bad("context_ratio", "a number with 0 <= context_ratio <= 1")
        if self.cache_context is not None:
            if self.context_ratio != CONTEXT_RATIO:
                raise ValueError("specdiff options 'context_ratio' and 'cache_context' both say how the context "
                                 "tokens are cached; give 'context_ratio' only ('cache_context' is deprecated)")
            warnings.warn(f"specdiff option 'cache_context' is deprecated: use "
                          f"context_ratio={1.0 if self.cache_context else 0.0}", FutureWarning, stacklevel=4)
        if self.context_interval:
            if self.effective_context_ratio != 1.0:
                raise ValueError(f"specdiff option 'context_interval' only applies with every context token cached "
                                 f"(context_ratio=1); got context_ratio={self.effective_context_ratio}")
            warnings.warn("specdiff option 'context_interval' is deprecated: context_ratio < 1 computes the "
                          "context tokens that drifted most on every cached step", FutureWarning, stacklevel=4)
        if self.starvation_scale is None:
            object.__setattr__(self, "starvation_scale", 0.5 if self.score == "attention" else 0.0)
        if not (_is_real(self.starvation_scale) and 0.0 <= self.starvation_scale <= 10.0):
            raise bad("starvation_scale", "a number with 0 <= starvation_scale <= 10")
        if not (_is_int(self.score_queries) and self.score_queries >= 0):
            raise bad("score_queries", "an int >= 0 (0 = every query row)")
        if not (_is_int(self.max_generations) and 1 <= self.max_generations <= 10_000):
            raise bad("max_generations", "an int with 1 <= max_generations <= 10000")
        if self.max_cache_bytes is not None and not (
            _is_int(self.max_cache_bytes) and self.max_cache_bytes >= 0
        ):
            raise bad("max_cache_bytes", "None or an int >= 0")

    def kv_cache_dtype(self, dtype: "torch.dtype") -> "torch.dtype":
        """The dtype of the K/V caches of keys computed in ``dtype`` (see ``kv_dtype``)."""
        import torch

        if self.kv_dtype == "bfloat16" or (self.kv_dtype == "auto" and dtype == torch.float32):
            return torch.bfloat16
        return dtype

    def regional_on(self, device: "torch.device | str | None") -> bool:
        """Whether graphs whose inputs live on ``device`` compile block by block:
        ``regional_compile`` itself, or for ``"auto"`` whether ``device`` is an accelerator:
        neither the CPU nor the meta device (``None``, no tensor input: whole graphs)."""
        if self.regional_compile != "auto":
            return bool(self.regional_compile)
        return device is not None and str(device).split(":")[0] not in ("cpu", "meta")

    # -- construction -------------------------------------------------------------
    @classmethod
    def valid_keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, /, **kwargs: Any) -> "SpecDiffConfig":
        """Build a config from ``torch.compile``'s ``options`` dict and/or keywords.

        Raises:
            ValueError: an unknown key (the message lists the valid keys) or a bad value.
        """
        merged: dict[str, Any] = {}
        if options is not None:
            if isinstance(options, SpecDiffConfig):
                merged.update(options.to_dict())
            elif isinstance(options, Mapping):
                merged.update(options)
            else:
                raise ValueError(f"specdiff options must be a dict, got {type(options).__name__}")
        merged.update(kwargs)
        valid = cls.valid_keys()
        unknown = sorted(k for k in merged if k not in valid)
        if unknown:
            raise ValueError(
                f"unknown specdiff option(s) {', '.join(map(repr, unknown))}; "
                f"valid options are: {', '.join(valid)}"
            )
        return cls(**merged)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict that :meth:`from_options` turns back into an equal config."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "SpecDiffConfig":
        return dataclasses.replace(self, **changes)

    @property
    def effective_context_ratio(self) -> float:
        """``context_ratio``, or what the deprecated ``cache_context`` says (``True`` 1, ``False`` 0)."""
        if self.cache_context is None:
            return self.context_ratio
        return 1.0 if self.cache_context else 0.0

    @property
    def history_depth(self) -> int:
        """H, the past per-token outputs a sparse step reads: ``blend_history`` whole past steps
        for the paper blend, otherwise each token's last two computed outputs."""
        return self.blend_history if self.blend and self.blend_mode == "paper" else 2

    def num_computed(self, num_image_tokens: int) -> int:
        """k, the number of image tokens computed on a cached step (at least 1)."""
        return max(1, min(num_image_tokens, round((1.0 - self.cache_ratio) * num_image_tokens)))

    def num_unmeasured(self, num_image_tokens: int) -> int:
        """How many of the top-scored tokens the measured error of caching leaves out: ``k``, but
        never more than the default ``cache_ratio``'s. The error measures the tokens the score
        ranks below them; it predicts the sparse calls *and* the skipped calls after them, which
        reuse every token, and ``tolerance`` is calibrated on the default's set: at a lower
        ``cache_ratio`` a sparse call computes more tokens, but a measurement over the fewer
        tokens it leaves out would under-read what the skipped calls reuse (near ``cache_ratio=0``
        it read 0, and the controller skipped calls it should have computed)."""
        default = SpecDiffConfig.__dataclass_fields__["cache_ratio"].default
        return min(self.num_computed(num_image_tokens),
                   max(1, min(num_image_tokens, round((1.0 - default) * num_image_tokens))))
