"""The SpecDiff controller: plain Python around the compiled full / sparse variants.

One :class:`SpecDiffRuntime` per compiled graph (per shape specialisation). Per call it

1. reads the timestep, converts it to sigma (``families.py`` knows each family's scale)
   and detects the start of a generation (sigma jumps back up, or a different latent at
   the same sigma) and branches (further calls at the same sigma with the same latent,
   e.g. FLUX true-CFG's uncond call: each branch keeps its own state);
2. on the first call of a generation (per branch) runs main step 0 with the full variant
   and then ``speculative_steps - 1`` more Euler steps of the same model on a uniform
   sigma grid from the same latent and conditioning, recording each step's per-token
   outputs (attention-received scores with ``score="attention"``; step 0 *is* the first
   speculative step: shared, not run twice); the speculative calls' K/V and outputs never
   reach the main caches;
3. on full steps (warm-up, refresh points) runs the full variant and refreshes every cache;
4. on cached steps scores tokens (``score="drift"``: each token's predicted staleness
   times the change the speculative run saw; ``"attention"``: SpecDiff's
   ``his * fut``; both times ``exp(s * cached_for)``), splits them into the tiers and runs
   the sparse variant, whose graph extrapolates the cached K/V, estimates the
   non-computed tokens' outputs from their history and unpatchifies (with the context
   cached, the text K/V come from their caches too; every ``context_interval``-th cached
   step computes the context tokens instead and refreshes those caches);
5. records telemetry (:mod:`specdiff_fx.telemetry`).
"""

from __future__ import annotations

import collections
import logging
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.fx as fx

from . import schedule
from .config import SpecDiffConfig
from .plan import DiTPlan
from .telemetry import GenerationReport, StepRecord, set_last
from .variants import Variant, build_variant, count_flops

log = logging.getLogger("specdiff_fx.runtime")

_LIVE: "weakref.WeakSet[SpecDiffRuntime]" = weakref.WeakSet()
#: model identity (the storage of one of its weights) -> the runtime that ran its last call
_LAST_RUNTIME: "weakref.WeakValueDictionary[int, SpecDiffRuntime]" = weakref.WeakValueDictionary()


@dataclass
class StepOutput:
    user: tuple[Any, ...]  # the graph's own outputs, returned to the caller
    tokens: torch.Tensor  # [B, N, C] per-token output (tiered on cached steps)
    score: torch.Tensor | None  # [B, N] attention received (score="attention" only)
    kv: list[torch.Tensor]  # per attention: K, V ([B, H, N, d]); the caches after the call
    text: dict[str, torch.Tensor] = field(default_factory=dict)  # cache_context: text K/V by input name


class GraphExecutor:
    """Runs the compiled variants of one graph (the sparse one is built on first use)."""

    def __init__(self, gm: fx.GraphModule, example_inputs: Sequence[Any], plan: DiTPlan,
                 config: SpecDiffConfig, mode: str | None = None) -> None:
        self.gm, self.example_inputs, self.plan, self.config, self.mode = gm, list(example_inputs), plan, config, mode
        self.k = config.num_computed(plan.num_image_tokens)
        self.full: Variant = build_variant(gm, example_inputs, plan, config, "full", mode=mode)
        self._sparse: dict[tuple[bool | None, bool], Variant] = {}  # by (context mode, K/V extrapolation)
        self.full_flops = count_flops(gm, example_inputs)

    @property
    def compiled(self) -> list[Variant]:
        return [self.full, *self._sparse.values()]

    def sparse(self, cache_context: bool | None = False, extrapolate: bool | None = None) -> Variant:
        """The sparse variant that computes the context tokens (``False``), caches them
        (``True``) or computes them and returns their fresh K/V (``None``: a cached step that
        refreshes the text caches, see ``context_interval``), with or without K/V
        extrapolation (``None``: as configured; a generation drops it when the caches would
        exceed ``max_cache_bytes``); built on first use. The example inputs are kept until
        every variant this config may need exists."""
        if extrapolate is None:
            extrapolate = self.config.kv_extrapolation
        key = (cache_context, extrapolate)
        if key not in self._sparse:
            config = self.config.replace(cache_context=cache_context, kv_extrapolation=extrapolate)
            self._sparse[key] = build_variant(self.gm, self.example_inputs, self.plan, config, "sparse",
                                              k=self.k, mode=self.mode)
            modes = {False}
            if self.config.cache_context is not False:
                modes = {True} | ({None} if self.config.context_interval else set())
                if self.config.cache_context is None:  # auto may decide against caching
                    modes.add(False)
            extrapolations = {self.config.kv_extrapolation}
            if self.config.max_cache_bytes is not None:  # the cap may drop the text caches and the extrapolation
                modes.add(False)
                extrapolations.add(False)
            if {(m, e) for m in modes for e in extrapolations} <= self._sparse.keys():
                self.example_inputs = None  # every variant built: do not keep the first call's tensors
        return self._sparse[key]

    def run_full(self, args: Sequence[Any]) -> StepOutput:
        user, ex = self.full.split(self.full(*args))
        kv = [ex[f"{c}{i}"] for i in range(len(self.plan.attention)) for c in "kv"]
        return StepOutput(user, ex["tokens"], ex.get("score"), kv, _text_outputs(ex, len(self.plan.attention)))

    def run_sparse(self, args: Sequence[Any], idx: torch.Tensor, history: torch.Tensor,
                   weights: torch.Tensor, caches: list[torch.Tensor],
                   prev: list[torch.Tensor] | None = None, ratio: torch.Tensor | None = None,
                   text: dict[str, torch.Tensor] | None = None, refresh_text: bool = False) -> StepOutput:
        """One cached step. ``caches`` (and ``prev``, with K/V extrapolation) are the K/V
        caches in the order ``k0, v0, k1, v1, ...``; the graph updates them in place.
        ``text`` holds the context-caching inputs by name (text K/V, their previous values
        and ``specdiff_kv_ratio_txt``); they are only read. ``refresh_text`` computes every
        context token and returns their fresh K/V in ``StepOutput.text``."""
        v = self.sparse(None if refresh_text else bool(text), extrapolate=prev is not None)
        named = {"specdiff_idx": idx, "specdiff_history": history, "specdiff_weights": weights,
                 "specdiff_kv_ratio": ratio, **(text or {})}
        for i in range(len(self.plan.attention)):
            for j, c in enumerate("kv"):
                named[f"specdiff_{c}{i}"] = caches[2 * i + j]
                if prev is not None:
                    named[f"specdiff_{c}p{i}"] = prev[2 * i + j]
        user, ex = v.split(v(*args, *v.extra_inputs(named)))
        return StepOutput(user, ex["tokens"], ex.get("score"), caches, _text_outputs(ex, len(self.plan.attention)))

    def flops(self, kind: str, cache_context: bool | None = False, extrapolate: bool | None = None) -> int:
        return (self.full if kind == "full" else self.sparse(cache_context, extrapolate)).flops


def _text_outputs(extras: dict[str, Any], attentions: int) -> dict[str, torch.Tensor]:
    """A variant's fresh text K/V extras, named as the sparse variant's inputs."""
    return {f"specdiff_{c}t{i}": extras[f"{c}t{i}"] for i in range(attentions) for c in "kv" if f"{c}t{i}" in extras}


@dataclass
class BranchState:
    """Per-branch state of one generation."""

    step: int = 0
    sigma0: float = 1.0
    his: torch.Tensor | None = None  # attention score of the last call (score="attention")
    # the speculative run, high to low sigma: (sigma, score) with score="attention",
    # (sigma, per-token output) with score="drift"
    spec: list[tuple[float, torch.Tensor]] = field(default_factory=list)
    cached_for: torch.Tensor | None = None  # [B, N] consecutive cached steps
    caches: list[torch.Tensor] = field(default_factory=list)  # K/V: each token's last computed
    prev: list[torch.Tensor] = field(default_factory=list)  # K/V: the computation before (extrapolation)
    text: dict[str, torch.Tensor] = field(default_factory=dict)  # text K/V of their last computation (cache_context)
    text_prev: dict[str, torch.Tensor] = field(default_factory=dict)  # ... of the computation before
    text_sigmas: list[float] = field(default_factory=list)  # sigmas of those two, newest first
    text_age: int = 0  # cached steps since the text K/V were computed
    cache_context: bool | None = None  # decided at the first cached step
    history: collections.deque = field(default_factory=collections.deque)  # (sigma, tokens), newest first
    refreshed: set[float] = field(default_factory=set)
    degraded: bool = False  # cache cap exceeded even without extrapolation: every step full, no caches
    extrapolate: bool = True  # K/V extrapolation in this generation (config, unless the cap dropped it)
    groups: torch.Tensor | None = None  # [B]: samples that started from the same latent share a group
    fresh: torch.Tensor | None = None  # [2, B, N, C]: each token's last two computed outputs (kept always)
    fresh_sigma: torch.Tensor | None = None  # [2, B, N]: the sigmas they were computed at


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _detached(t: torch.Tensor) -> torch.Tensor:
    """A cache entry that later in-place updates may touch, whatever the grad mode."""
    if torch.is_inference_mode_enabled():
        with torch.inference_mode(False):
            return t.clone()
    return t.detach()


class SpecDiffRuntime:
    """The callable Dynamo runs in place of a DiT graph."""

    def __init__(self, plan: DiTPlan, config: SpecDiffConfig, executor: Any) -> None:
        self.plan, self.config, self.executor = plan, config, executor
        self.k = config.num_computed(plan.num_image_tokens)
        self.branches: dict[int, BranchState] = {}
        self.report: GenerationReport | None = None
        self._last_sigma: float | None = None
        self._last_sample: torch.Tensor | None = None
        self._branch = 0
        self._warned: set[str] = set()
        self._pending_notes: list[str] = []  # for the next generation's report
        _LIVE.add(self)

    # -- public -----------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all generation state; the next call starts a new generation."""
        self.branches.clear()
        self._last_sigma = None
        self._last_sample = None
        self._branch = 0

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        args = list(args)
        self._check_owner(args)
        sigma = self._sigma(args)
        branch = self._route(sigma, args[self.plan.sample_input])
        state = self.branches.setdefault(branch, BranchState(extrapolate=self.config.kv_extrapolation))
        if state.step == 0:
            out = self._first_step(args, sigma, branch, state)
        elif state.degraded or schedule.is_full_step(state.step, sigma, state.refreshed, self.config):
            state.refreshed.update(schedule.due_refresh_points(sigma, state.refreshed, self.config))
            out = self._full_step(args, sigma, branch, state, "full")
        else:
            out = self._cached_step(args, sigma, branch, state)
        state.step += 1
        return out

    # -- routing ------------------------------------------------------------------------
    def _check_owner(self, args: list[Any]) -> None:
        """If the model's previous call ran in another specialisation (the caller changed
        the resolution or batch size mid-generation), this runtime's caches are stale:
        start over with a full step instead of reusing them."""
        i = self.plan.weight_input
        if i is None or not isinstance(args[i], torch.Tensor):
            return
        key = args[i].untyped_storage().data_ptr()
        last = _LAST_RUNTIME.get(key)
        if last is not None and last is not self and self.branches:
            log.info("specdiff: the model ran at another shape since this runtime's last call; resetting")
            self.reset()
            self._pending_notes.append("the model ran at another shape mid-generation: caches reset, "
                                       "restarted with a full step")
        _LAST_RUNTIME[key] = self

    def _sigma(self, args: list[Any]) -> float:
        t = args[self.plan.timestep_input]
        value = float(t.reshape(-1)[0]) if isinstance(t, torch.Tensor) else float(t)
        return value / self.plan.timestep_per_sigma

    def _route(self, sigma: float, sample: torch.Tensor) -> int:
        """Branch index of this call; starts a new generation when sigma jumps up."""
        last = self._last_sigma
        same_sigma = last is not None and abs(sigma - last) <= 1e-7 * max(1.0, abs(sigma))
        same_latent = (self._last_sample is not None and self._last_sample.shape == sample.shape
                       and torch.equal(self._last_sample, sample))
        if same_sigma and same_latent:
            self._branch += 1
        else:
            # sigma jumped back up, or the same sigma with a new latent: a new generation
            if last is None or same_sigma or sigma > last:
                self._start_generation()
            self._branch = 0
        self._last_sigma = sigma
        self._last_sample = sample.detach().clone()
        return self._branch

    def _start_generation(self) -> None:
        self.branches.clear()
        self.report = GenerationReport(  # compile count and time are filled in by _record
            family=self.plan.family, num_image_tokens=self.plan.num_image_tokens, batch=self.plan.batch,
            cache_ratio=self.config.cache_ratio, full_flops=self.executor.full_flops,
            notes=self._pending_notes,
        )
        self._pending_notes = []
        set_last(self.report)

    def _record(self, step: int, branch: int, kind: str, sigma: float, flops: int,
                tier: torch.Tensor | None = None, note: str = "") -> None:
        n, b = self.plan.num_image_tokens, self.plan.batch
        if tier is None:  # every token computed
            sizes = ((n,) * b, (0,) * b, (0,) * b)
        else:
            sizes = tuple(tuple(int(x) for x in (tier == t).sum(dim=1)) for t in (1, 2, 3))
        ex = self.executor
        self.report.compiles = len(ex.compiled)
        self.report.compile_seconds = sum(v.compile_seconds for v in ex.compiled)
        self.report.steps.append(StepRecord(step, branch, kind, sigma, *sizes, flops, note))

    # -- steps ---------------------------------------------------------------------------
    def _store_full(self, state: BranchState, out: StepOutput, sigma: float) -> None:
        if not self._fits_cap(state, out):
            return
        caches = [_detached(t) for t in out.kv]
        if state.extrapolate:  # the old caches hold each token's computation before this one
            same = len(state.caches) == len(caches) and all(
                a.shape == b.shape for a, b in zip(state.caches, caches))
            state.prev = state.caches if same else [c.clone() for c in caches]
        state.caches = caches
        if out.text and self._may_cache_context(state):  # not once decided against it, nor under batched CFG
            self._store_text(state, out.text, sigma)
        state.his = out.score
        state.cached_for = torch.zeros(out.tokens.shape[:2], dtype=torch.int32, device=out.tokens.device)
        self._push_history(state, sigma, out.tokens)
        self._push_fresh(state, sigma, out.tokens, None)
        nbytes = _nbytes(*state.caches, *state.prev, *state.text.values(), *state.text_prev.values())
        nbytes += _nbytes(out.tokens) * (2 + (len(state.history) if self._paper_blend else 0))
        self.report.cache_bytes = max(self.report.cache_bytes, nbytes)

    def _fits_cap(self, state: BranchState, out: StepOutput) -> bool:
        """Apply ``max_cache_bytes`` before a full step stores its caches: the bytes they will
        hold follow from the step's outputs (the previous K/V have the same sizes). Over the
        cap, the generation keeps the first of these that fits: without the text K/V caches
        (the context is then computed on cached steps), without K/V extrapolation (halves the
        K/V caches; cached steps reuse the K/V), without both; if none fits it computes every
        token on every step and keeps no caches. Each is logged, warned once and noted in the
        report."""
        cap = self.config.max_cache_bytes
        if state.degraded:
            return False
        if cap is None:
            return True
        kv = _nbytes(*out.kv)
        text = _nbytes(*out.text.values()) if self._may_cache_context(state) else 0
        tokens = _nbytes(out.tokens) * (2 + (self.config.blend_history if self._paper_blend else 0))

        def need(extrapolate: bool, context: bool) -> int:
            return (kv + text * context) * (1 + extrapolate) + tokens

        options = [(e, c) for e in dict.fromkeys((state.extrapolate, False)) for c in dict.fromkeys((text > 0, False))]
        fit = next((o for o in options if need(*o) <= cap), None)
        if fit == options[0]:
            return True
        over = f"specdiff: caches need {need(*options[0])} bytes > max_cache_bytes={cap}"
        if fit is None:
            state.degraded = True
            state.caches, state.prev, state.text, state.text_prev = [], [], {}, {}
            state.fresh = state.fresh_sigma = None
            state.history.clear()
            self._note(f"{over} even without text K/V caches and K/V extrapolation ({need(False, False)} bytes); "
                       "this generation computes every token (no caching)")
            return False
        dropped = []
        if options[0][1] and not fit[1]:
            state.cache_context, state.text, state.text_prev = False, {}, {}
            self.report.context_cached = False
            dropped.append("the text K/V caches (context computed on cached steps)")
        if options[0][0] and not fit[0]:
            state.extrapolate, state.prev, state.text_prev = False, [], {}
            dropped.append("K/V extrapolation (cached steps reuse the cached K/V)")
        self._note(f"{over}; this generation drops {' and '.join(dropped)}: {need(*fit)} bytes")
        return True

    def _may_cache_context(self, state: BranchState) -> bool:
        """Whether this generation may still keep text K/V caches: not when the option or an
        earlier decision says no, nor under batched CFG with ``cache_context=None`` (auto)."""
        if self.config.cache_context is False or state.cache_context is False:
            return False
        return state.cache_context is True or self.config.cache_context is True or state.groups is None

    def _note(self, msg: str) -> None:
        log.info(msg)
        self.report.notes.append(msg)
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=5)

    def _store_text(self, state: BranchState, text: dict[str, torch.Tensor], sigma: float) -> None:
        """The context tokens' K/V were computed at ``sigma`` (a full step, or a cached step
        that refreshed them): shift them into the text caches."""
        text = {name: _detached(t) for name, t in text.items()}
        if state.extrapolate:
            same = state.text.keys() == text.keys() and all(state.text[n].shape == t.shape for n, t in text.items())
            state.text_prev = state.text if same else {n: t.clone() for n, t in text.items()}
        state.text = text
        state.text_sigmas = [sigma, *state.text_sigmas[:1]]
        state.text_age = 0

    @property
    def _paper_blend(self) -> bool:
        return self.config.blend and self.config.blend_mode == "paper"

    def _push_fresh(self, state: BranchState, sigma: float, tokens: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Shift each computed token's last fresh output (all tokens when ``idx`` is None)."""
        if state.fresh is None or idx is None:
            tokens = _detached(tokens)
            prev = tokens if state.fresh is None else state.fresh[0]
            prev_sigma = torch.full(tokens.shape[:2], sigma, device=tokens.device) if state.fresh is None \
                else state.fresh_sigma[0]
            state.fresh = torch.stack([tokens, prev])
            state.fresh_sigma = torch.stack([torch.full(tokens.shape[:2], sigma, device=tokens.device), prev_sigma])
            return
        rows = idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
        state.fresh[1].scatter_(1, rows, torch.gather(state.fresh[0], 1, rows))
        state.fresh[0].scatter_(1, rows, torch.gather(tokens, 1, rows).to(state.fresh.dtype))
        state.fresh_sigma[1].scatter_(1, idx, torch.gather(state.fresh_sigma[0], 1, idx))
        state.fresh_sigma[0].scatter_(1, idx, torch.full(idx.shape, sigma, device=idx.device))

    def _push_history(self, state: BranchState, sigma: float, tokens: torch.Tensor) -> None:
        if not self._paper_blend:  # only the paper blend reads whole past steps
            return
        state.history.appendleft((sigma, _detached(tokens)))
        while len(state.history) > self.config.blend_history:
            state.history.pop()

    def _full_step(self, args, sigma, branch, state, kind, note: str = "") -> tuple[Any, ...]:
        out = self.executor.run_full(args)
        self._store_full(state, out, sigma)
        self._record(state.step, branch, kind, sigma, self.executor.flops("full"), note=note)
        return out.user

    def _first_step(self, args, sigma, branch, state) -> tuple[Any, ...]:
        state.sigma0 = sigma
        state.groups = same_latent_groups(args[self.plan.sample_input])
        out = self.executor.run_full(args)
        self._store_full(state, out, sigma)
        self._record(0, branch, "full", sigma, self.executor.flops("full"),
                     note="shared with speculative step 1" if self.config.speculative_steps else "")
        state.spec = [(sigma, self._spec_record(out))] if self.config.speculative_steps and not state.degraded else []
        if state.degraded:  # no caches: nothing for a speculative run to inform
            return out.user
        self._speculate(args, out, sigma, branch, state)
        return out.user

    def _speculate(self, args, out0: StepOutput, sigma0: float, branch: int, state: BranchState) -> None:
        steps = self.config.speculative_steps
        if steps <= 1:
            return
        sample_i, t_i = self.plan.sample_input, self.plan.timestep_input
        x = args[sample_i]
        v = out0.user[0] if out0.user else None
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            self.report.notes.append("speculative run skipped: the model output is not shaped like its input")
            return
        sigmas = schedule.speculative_sigmas(sigma0, steps)
        t = args[t_i]
        for j in range(1, steps):
            x = (x.float() + (sigmas[j] - sigmas[j - 1]) * v.float()).to(x.dtype)
            spec_args = list(args)
            spec_args[sample_i] = x
            spec_args[t_i] = torch.full_like(t, sigmas[j] * self.plan.timestep_per_sigma)
            out = self.executor.run_full(spec_args)
            state.spec.append((sigmas[j], self._spec_record(out)))
            self._record(-1, branch, "speculative", sigmas[j], self.executor.flops("full"))
            v = out.user[0]

    def _spec_record(self, out: StepOutput) -> torch.Tensor:
        """What the token score needs from a speculative call."""
        return out.score if self.config.score == "attention" else _detached(out.tokens)

    def _uses_context_cache(self, state: BranchState) -> bool:
        """``cache_context`` for this generation: the option, or with ``None`` (auto) on
        unless it uses classifier-free guidance (batched halves from the same latent, or
        more than one call per step), whose guidance scale amplifies stale text K/V."""
        if state.cache_context is None:
            wanted = self.config.cache_context
            guided = state.groups is not None or len(self.branches) > 1
            state.cache_context = (not guided) if wanted is None else wanted
            state.cache_context = state.cache_context and bool(state.text)  # a graph without text tokens
            if not state.cache_context:
                state.text, state.text_prev = {}, {}
            self.report.context_cached = state.cache_context
        return state.cache_context

    def _text_inputs(self, state: BranchState, sigma: float, ratio: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The sparse variant's context-caching inputs by name: the text K/V of their last
        computation and, with K/V extrapolation, of the one before and their ratio ``[B]``
        (every text token was computed on those two steps)."""
        text = dict(state.text)
        if ratio is not None:
            s1, s2 = (state.text_sigmas + state.text_sigmas[:1])[:2]
            pair = torch.tensor([s1, s2], device=ratio.device).reshape(2, 1, 1).expand(2, ratio.shape[0], 1)
            text["specdiff_kv_ratio_txt"] = schedule.extrapolation_ratio(pair, sigma)[:, 0].to(ratio)
            for name, t in state.text_prev.items():  # specdiff_kt3 -> specdiff_ktp3
                stem = name.rstrip("0123456789")
                text[f"{stem}p{name[len(stem):]}"] = t
        return text

    def _cached_step(self, args, sigma, branch, state) -> tuple[Any, ...]:
        cfg = self.config
        if cfg.score == "attention":
            base, fut = state.his, schedule.future_score(state.spec, sigma)
        else:
            base = schedule.drift_scores(state.fresh, state.fresh_sigma, sigma)
            fut = schedule.future_drift(state.spec, sigma)
        score = schedule.token_scores(base, fut, state.cached_for, cfg.starvation_scale)
        if state.groups is not None:  # CFG halves of one image select the same tokens
            score = torch.zeros_like(score).index_add_(0, state.groups, score)[state.groups]
        idx, tier = schedule.assign_tiers(score, self.k, cfg.reuse_mass, cfg.blend)
        tokens0 = state.fresh[0]
        if self._paper_blend:
            history = torch.zeros((cfg.blend_history, *tokens0.shape), dtype=tokens0.dtype, device=tokens0.device)
            for j, (_, tok) in enumerate(state.history):
                history[j] = tok
            blend = schedule.blend_weights([s for s, _ in state.history], sigma, cfg.blend_history)
            weights = schedule.tier_weights(tier, blend)
        else:  # reuse (C2) and the taylor C3 read each token's last two computed outputs: no copy
            history = state.fresh  # read by the graph before _push_fresh updates it
            weights = schedule.taylor_weights(tier, state.fresh_sigma, sigma, cfg.history_depth)
        idx = idx.to(tokens0.device)
        ratio = None
        if state.extrapolate:
            ratio = schedule.extrapolation_ratio(state.fresh_sigma, sigma).to(state.caches[0])
        text, refresh_text = {}, False
        if self._uses_context_cache(state):
            refresh_text = bool(cfg.context_interval) and state.text_age + 1 >= cfg.context_interval
            text = {} if refresh_text else self._text_inputs(state, sigma, ratio)
        out = self.executor.run_sparse(args, idx, history, weights.to(tokens0.dtype), state.caches,
                                       state.prev if state.extrapolate else None, ratio, text, refresh_text)
        if refresh_text:
            self._store_text(state, out.text, sigma)
        elif text:
            state.text_age += 1
        self._push_fresh(state, sigma, out.tokens, idx)
        state.his = out.score
        state.cached_for = torch.where(tier == 1, 0, state.cached_for + 1).to(torch.int32)
        self._push_history(state, sigma, out.tokens)
        variant = None if refresh_text else bool(text)
        self._record(state.step, branch, "cached", sigma, self.executor.flops("sparse", variant, state.extrapolate),
                     tier=tier)
        if branch == 0:
            counts = (tier == 1).to(torch.int32).cpu()
            rep = self.report
            rep.computed_counts = counts if rep.computed_counts is None else rep.computed_counts + counts
        return out.user


def same_latent_groups(sample: torch.Tensor) -> torch.Tensor | None:
    """``[B]`` group ids: samples whose latents are equal (the uncond/cond halves of a batched
    CFG call) get the same id, so they select the same tokens: guidance amplifies the
    difference of the two halves, and stale outputs from the same step keep that difference
    consistent. ``None`` when every sample is distinct."""
    b = sample.shape[0]
    flat = sample.reshape(b, -1)
    groups = torch.arange(b)
    for i in range(b):
        for j in range(i):
            if groups[j] == j and torch.equal(flat[i], flat[j]):
                groups[i] = j
                break
    return None if bool((groups == torch.arange(b)).all()) else groups.to(sample.device)


def reset_all() -> None:
    """Reset every live specdiff runtime in this process (see :meth:`SpecDiffRuntime.reset`)."""
    for rt in list(_LIVE):
        rt.reset()
