"""The SpecDiff runtime: plain Python around the compiled variants.

One :class:`SpecDiffRuntime` per compiled graph (per shape specialisation). Per call it

1. reads the timestep, converts it to sigma (``families.py`` knows each family's scale) and
   asks the router (:mod:`.routing`) which generation and branch the call belongs to (by
   model, conditioning, monotone sigma and how the latent moved, never by call order), or
   starts a new generation;
2. on the first call of a branch runs main step 0 with the full variant and then
   ``speculative_steps - 1`` more Euler steps of the same model on a uniform sigma grid from
   the same latent and conditioning, recording each step's per-token outputs
   (attention-received scores with ``score="attention"``; step 0 *is* the first speculative
   step: shared, not run twice); the speculative calls' K/V and outputs never reach the
   main caches;
3. on later calls asks the controller policy (:mod:`specdiff_fx.control`) for a decision:
   ``full`` runs the full variant and refreshes every cache; ``sparse(k)`` scores the image
   tokens (``score="drift"``: each token's predicted staleness times the change the
   speculative run saw; ``"attention"``: SpecDiff's ``his * fut``; both times
   ``exp(s * cached_for)``), splits them into tiers and runs the sparse variant, whose graph
   extrapolates the cached K/V, estimates the non-computed tokens' outputs from their
   history and unpatchifies; of the context (text) tokens it computes the
   ``1 - context_ratio`` share whose K/V drifted most (:class:`~.state.TextKVStore`), the
   others' K/V come from their caches (extrapolated per token like the image K/V);
   ``skip`` runs no token at all (every output from its history);
4. with ``hindsight`` (default), adds to a full call's output what the cached calls since the
   previous full call moved the latent wrong (:mod:`.hindsight`) and remembers each cached
   call's output for it; routing sees the corrected output;
5. records telemetry (:mod:`specdiff_fx.telemetry`).

What belongs where: the router (:mod:`.routing`) keeps the live generations; the executor
(:mod:`.executor`) alone knows the variants and their inputs; the per-branch state
(:mod:`.state`) holds the caches; the policy decides; this module sequences them and
enforces the memory cap. One lock serialises the calls of a runtime: threads that share a
compiled model take turns, each with its own generation.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings
import weakref
from typing import Any, Sequence

import torch

from .. import schedule
from ..config import SpecDiffConfig
from ..control import Action, Decision, Observation, Policy, StepView, make_policy
from ..plan import DiTPlan
from ..signature import ContextMode, VariantKey
from ..telemetry import GenerationReport, StepRecord, note_call, set_last
from .context import text_mode, text_tokens
from .executor import GraphExecutor, SparseInputs, StepOutput
from .hindsight import step_estimate
from .ranks import ranks_for
from .routing import (FIRST_ORDER_CHECKS, Branch, Generation, Link, Router, StepPlan, _same_sigma, companion_columns,
                      update_order)
from .state import BranchState, ContextCaching, TokenHistory, UpdateOrder, detached, nbytes

log = logging.getLogger("specdiff_fx.runtime")
_UNSET = object()

_LIVE: "weakref.WeakSet[SpecDiffRuntime]" = weakref.WeakSet()


def variants_needed(config: SpecDiffConfig, policy: Policy, plan: DiTPlan) -> set[VariantKey]:
    """Every variant besides the full one that a runtime with ``config`` and ``policy`` may
    run on ``plan``'s graph: one sparse variant per token count, per context mode the
    generation may pick (by ``context_ratio``; on a graph without text subsets by guidance,
    decided per generation; the deprecated ``context_interval``
    refreshes; the memory cap may drop the text caches) and per K/V extrapolation setting
    (the cap may drop it)."""
    contexts = {text_mode(config.effective_context_ratio, plan, guided) for guided in (False, True)}
    if config.context_interval and (ContextMode.CACHED, None) in contexts:
        contexts.add((ContextMode.REFRESH, None))
    extrapolations = {config.kv_extrapolation}
    if config.max_cache_bytes is not None:
        contexts.add((ContextMode.COMPUTE, None))
        extrapolations.add(False)
    keys = {VariantKey.sparse(k, c, e, k_txt=t) for k in policy.token_counts() for c, t in contexts
            for e in extrapolations}
    if policy.may_skip():
        keys.add(VariantKey.skip())
    return keys


class SpecDiffRuntime:
    """The callable Dynamo runs in place of a DiT graph."""

    def __init__(self, plan: DiTPlan, config: SpecDiffConfig, executor: Any, policy: Policy | None = None) -> None:
        self.plan, self.config, self.executor = plan, config, executor
        self.policy = policy if policy is not None else make_policy(config, plan.num_image_tokens)
        self.k = config.num_computed(plan.num_image_tokens)
        self.router = Router(config.max_generations)
        #: the other ranks of a context-parallel model (a no-op without): decisions and the
        #: measured error agree across them
        self.ranks = ranks_for(plan.parallel)
        self.generation: Generation | None = None  # the one the current (or last) call belongs to
        self._j = 0  # the branch of the current call in it
        self._warned: set[str] = set()
        self._reuse: dict[tuple, torch.Tensor] = {}  # :meth:`_reuse_weights`, per shape
        self._lock = threading.RLock()
        #: ``max_cache_bytes`` as every rank applies it (:meth:`_fits_cap`); unset before the first full call
        self._cap: Any = _UNSET
        self._inference_checked = False  # the one-time note on weights without version counters
        _LIVE.add(self)

    # -- public -----------------------------------------------------------------------
    @property
    def report(self) -> GenerationReport | None:
        """The report of the generation of the current (or last) call."""
        return self.generation.report.settle() if self.generation is not None else None

    @property
    def _report(self) -> GenerationReport:
        """The current generation's report as the runtime writes it (measured errors of the
        last call may still be unread: :meth:`_settle`)."""
        return self.generation.report

    @property
    def branches(self) -> dict[int, BranchState]:
        """The branch states of the generation of the current (or last) call."""
        return {} if self.generation is None else {j: b.state for j, b in enumerate(self.generation.branches)}

    def reset(self) -> None:
        """Forget every generation; the next call starts a new one."""
        with self._lock:
            self.router.clear()
            self.generation = None

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        with self._lock:
            args = list(args)
            if not self.plan.stream_matches(args):
                return self._unsegmented(args)
            sigma = self._sigma(args)
            latent = args[self.plan.sample_input]
            sample, fixed = self._moving_part(latent)
            conditioning = tuple(args[i] for i in self.plan.condition_inputs) + fixed
            model, weights = self._model(args), self._weights(args)
            hit = self.router.route(model, conditioning, sigma, sample, self._image_rows(sample),
                                    companions=lambda s: self._companions(model, s), weights=weights)
            if not self.ranks.all(hit is not None):  # context parallelism: one rank starts over (a reset or a
                hit = None                           # weight change there alone), so all do: their collectives match
            gen, j = hit if hit is not None else (self._start_generation(model, weights), 0)
            if j == len(gen.branches):
                kept = tuple(detached(c) if isinstance(c, torch.Tensor) else c for c in conditioning)
                gen.branches.append(Branch(kept, BranchState(extrapolate=self.config.kv_extrapolation),
                                           policy=self.policy.start()))
                self.router.inherit(gen, j, sigma, sample, self._image_rows(sample))
            self._settle(gen)
            gen.confirm(j, sigma, sample)
            self.generation, self._j = gen, j
            branch = gen.branches[j]
            state = branch.state
            if state.step >= 2:
                self._check_order(gen, j, sigma, sample, model)
            if state.step >= 1:
                self._link(gen, j, model, sigma, sample)
            if state.step == 0:
                out, full = self._first_step(args, sigma, j, state), True
            else:
                out, full = self._later_step(args, sigma, j, state)
            out = self._hindsight(out, full, sigma, latent, state)
            branch.trace.push(sigma, sample, self._sample_of(out))
            state.sigmas.append(sigma)
            state.full_run = state.full_run + 1 if full else 0
            state.step += 1
            gen.report.live_generations = len(self.router.generations)
            gen.report.held_bytes = self.router.held_bytes
            note_call(gen.report)
            return out

    def _unsegmented(self, args: list[Any]) -> tuple[Any, ...]:
        """A call whose context tokens in the stream (FLUX.2 reference images) sit elsewhere
        than at compile time: the variants' split does not hold, so every token is computed
        and no generation state is touched."""
        msg = ("specdiff: this call's reference tokens are laid out differently from the compiled "
               "graph's (same shapes, other position ids); computing every token")
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return self.executor.run_full(args).user

    # -- routing ------------------------------------------------------------------------
    def _model(self, args: list[Any]) -> int | None:
        """The model's identity: the storage of one of its weights (two models may share one
        compiled graph, weights being graph inputs)."""
        i = self.plan.weight_input
        if i is None or not isinstance(args[i], torch.Tensor):
            return None
        return args[i].untyped_storage().data_ptr()

    def _weights(self, args: list[Any]) -> tuple:
        """The model's state as this call sees it: each module-state tensor's storage and version
        counter (an in-place change, ``load_state_dict`` or ``p.mul_()``, bumps it), and the value
        of each one read by value (a LoRA scale Dynamo passes as an input; the analysis sorts the
        inputs into the two kinds, ``DiTPlan.state_tensors`` / ``state_values``). Caches computed
        under other weights are stale: a call whose state differs continues no generation that ran
        under the old one. At SD3-medium's depth (683 inputs) this is the runtime's largest
        per-call cost after routing."""
        tensors, values = self.plan.state_tensors, self.plan.state_values
        if not self._inference_checked:
            self._inference_checked = True
            if any(args[i].is_inference() for i in tensors):
                log.info("specdiff: the model's weights are inference tensors (created under torch.inference_mode()), "
                         "which keep no version counter: a change in place during a generation is not seen; call "
                         "specdiff_fx.reset() after one")
        try:
            versions = [args[i]._version for i in tensors]
        except RuntimeError:  # an inference tensor keeps no version counter (and changes in place only there)
            versions = [None if args[i].is_inference() else args[i]._version for i in tensors]
        return (tuple(args[i].item() if isinstance(args[i], torch.Tensor) else args[i] for i in values),
                tuple(versions), tuple([args[i].data_ptr() for i in tensors]))

    def _other_branches(self, model: int | None):
        """``(runtime, generation, index, branch)`` of every branch the other live runtimes keep for
        ``model`` (another graph of the same model: routing's companions, :meth:`_link`'s partners).
        Read without their locks: a snapshot of references (tensors a trace holds are never
        written)."""
        for rt in list(_LIVE):
            if rt is self:
                continue
            for gen in list(rt.router.generations.values()):
                if gen.model == model:
                    for j, br in enumerate(list(gen.branches)):
                        yield rt, gen, j, br

    def _companions(self, model: int | None, sigma: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(latent, output)`` of the calls the other live runtimes made on ``model`` at ``sigma``
        (e.g. SD3.5's skip-layer guidance call: routing's companions)."""
        return [(x, out) for _, _, _, br in self._other_branches(model)
                for s, x, out in zip(list(br.trace.sigmas), list(br.trace.samples), list(br.trace.outputs))
                if out is not None and _same_sigma(s, sigma)]

    def _check_order(self, gen: Generation, j: int, sigma: float, sample: torch.Tensor,
                     model: int | None = None) -> None:
        """Whether the sampler combines earlier calls' outputs (:func:`~.routing.update_order`),
        kept in the leader's state for the controller (``StepView.multistep``): checked on a
        branch's continuations at a lower sigma after two full calls (whose outputs differ; after a
        cached call an earlier output may equal the newest; a second-order sampler's calls at one
        sigma are its own case) until one needs an earlier output or
        :data:`~.routing.FIRST_ORDER_CHECKS` were made (``FIRST`` if none needed more than the
        newest call; ``UNKNOWN`` stays where the branch's own calls did not explain an update:
        skip-layer guidance, per-token rescales). Every generation's first two calls are full, so
        its third call is checked."""
        branch, order = gen.branches[j], gen.leader(j).state
        if (order.update_order is not UpdateOrder.UNKNOWN or order.order_checks >= FIRST_ORDER_CHECKS
                or branch.state.second_order or branch.state.full_run < 2
                or _same_sigma(branch.trace.sigmas[0], sigma)):
            return
        newest = branch.trace
        companions = companion_columns(newest.samples[0], self._companions(model, newest.sigmas[0]))
        found = update_order(sample, gen, branch, self._image_rows(sample), companions)
        order.order_checks += 1
        if found is UpdateOrder.FIRST:
            order.first_order_updates += 1
            if order.first_order_updates >= FIRST_ORDER_CHECKS:
                order.update_order = UpdateOrder.FIRST
        elif found is UpdateOrder.MULTISTEP:
            order.update_order = UpdateOrder.MULTISTEP
            msg = ("specdiff: the sampler combines earlier calls' outputs (a multistep method such as UniPC or "
                   "DPM-Solver++); the error controller holds this generation to a tighter tolerance")
            log.info(msg)
            gen.report.notes.append(msg)

    def _link(self, gen: Generation, j: int, model: int | None, sigma: float, sample: torch.Tensor) -> None:
        """Link branch ``j``'s leader to a branch of another runtime of the same model and options
        that ran on this call's latent at this sigma and on the branch's last latent at its sigma
        (:class:`~.routing.Link`): from now on they share the controller's state and each step's
        plan. Two requests that merely started from the same noise part after their first step.
        The partner's last call ran after this branch's last call (the other half of this step): a
        branch that ran the same calls earlier (a generation of the same request finished or
        abandoned before this one, whose latents are this one's) is not linked."""
        leader, branch = gen.leader(j), gen.branches[j]
        if leader.link is not None or not branch.trace.sigmas:
            return
        last_sigma, last_sample = branch.trace.sigmas[0], branch.trace.samples[0]
        for rt, other_gen, oj, other in self._other_branches(model):
            if (rt.config == self.config and type(rt.policy) is type(self.policy) and other.trace.tick > branch.trace.tick
                    and other.called_on(sigma, sample) and other.called_on(last_sigma, last_sample)):
                partner = other_gen.leader(oj)
                link = partner.link
                if link is None:
                    link = partner.link = Link(partner.policy, partner.plan, [weakref.ref(other_gen)])
                link.generations.append(weakref.ref(gen))
                leader.link, leader.policy = link, link.policy
                return

    def _sigma(self, args: list[Any]) -> float:
        """The call's sigma: its timestep over the family's scale (the largest entry: Wan 2.2
        passes a timestep per token, 0 for the conditioning frame's)."""
        t = args[self.plan.timestep_input]
        value = float(t.max()) if isinstance(t, torch.Tensor) else float(t)
        return value / self.plan.timestep_per_sigma

    def _start_generation(self, model: int | None, weights: tuple = ()) -> Generation:
        report = GenerationReport(  # compile count and time are filled in by _record
            family=self.plan.family, num_image_tokens=self.plan.num_image_tokens, batch=self.plan.batch,
            cache_ratio=self.config.cache_ratio, full_flops=self.executor.full_flops,
            rank=self.ranks.rank, parallel=self.plan.parallel,
        )
        gen = Generation(model, report, weights=weights)
        report.id = gen.id
        last = self.generation
        if last is not None and last.model == model and last.weights != weights and last.id in self.router.generations:
            msg = (f"specdiff: the model's weights or module state changed since generation {last.id}'s last "
                   "call (in place, or another LoRA scale): its caches no longer hold, so this call starts a "
                   "new generation")
            report.notes.append(msg)
            log.info(msg)
        for old in self.router.add(gen):
            which = "of those that ran one call " if old.first_call_only else ""
            msg = (f"specdiff: generation {old.id} evicted (the least recently used {which}of more than "
                   f"max_generations={self.config.max_generations} in flight); its next call starts over")
            old.report.notes.append(msg)
            log.info(msg)
        set_last(report)
        return gen

    def _prepare(self, state: BranchState) -> None:
        """Compile the variants this generation will most likely run before its first cached
        step (the rest, e.g. a memory-cap fallback, compile on first use). Called at a
        branch's second call, when every call of the first step (true CFG: cond and uncond)
        has been seen, so that the context mode is the one :meth:`_context_mode` will pick."""
        cfg = self.config
        context, k_txt = self._text_plan(state)
        keys = [VariantKey.sparse(k, context, cfg.kv_extrapolation, k_txt=k_txt) for k in self.policy.token_counts()]
        if self.policy.may_skip():
            keys.append(VariantKey.skip())
        self.executor.prepare(keys)

    def _record(self, step: int, branch: int, kind: str, sigma: float, flops: int,
                tier: torch.Tensor | None = None, note: str = "", decision: Decision | None = None,
                measured: float | None = None) -> None:
        n, b = self.plan.num_image_tokens, self.plan.batch
        if kind == "skipped":  # every token reused
            sizes = ((0,) * b, (n,) * b, (0,) * b)
        elif tier is None:  # every token computed
            sizes = ((n,) * b, (0,) * b, (0,) * b)
        elif not self.config.blend and decision is not None:  # k computed per sample, the rest reused: no read
            k = decision.k
            sizes = ((k,) * b, (n - k,) * b, (0,) * b)
        else:  # per tier, per sample: one count and one synchronisation
            counts = torch.nn.functional.one_hot(tier.long(), 4).sum(dim=1)[:, 1:].T.tolist()
            sizes = tuple(tuple(c) for c in counts)
        ex = self.executor
        self._report.compiles = len(ex.compiled)
        self._report.compile_seconds = sum(v.compile_seconds for v in ex.compiled)
        predicted = None
        if decision is not None:  # the controller's reason and prediction
            note, predicted = note or decision.reason, decision.predicted
        deferred = isinstance(measured, torch.Tensor)  # read back at the generation's next call
        self._report.steps.append(StepRecord(step, branch, kind, sigma, *sizes, flops, note, predicted,
                                            None if deferred else measured))
        if deferred:
            self._report.defer(len(self._report.steps) - 1, measured)

    # -- steps ---------------------------------------------------------------------------
    def _view(self, state: BranchState, sigma: float) -> StepView:
        drift = (lambda: state.tokens.drift(sigma)) if state.tokens is not None else (lambda: None)
        multistep = self.generation.leader(self._j).state.update_order is UpdateOrder.MULTISTEP
        return StepView(step=state.step, sigma=sigma, sigmas=tuple(state.sigmas),
                        num_tokens=self.plan.num_image_tokens, drift=drift, multistep=multistep)

    def _later_step(self, args, sigma: float, branch: int, state: BranchState) -> tuple[tuple[Any, ...], bool]:
        if state.step == 1:
            self._prepare(state)
        view = self._view(state, sigma)
        leader = self.generation.leader(self._j)
        link = leader.link
        if link is not None:  # linked across runtimes: their observations first, then their plan
            for other in link.live():
                if other is not self.generation:
                    self._settle(other)
            if link.plan is not None and link.plan.sigma == sigma:
                leader.plan = link.plan
        again = bool(state.sigmas) and _same_sigma(state.sigmas[-1], sigma)  # a second call at one sigma (Heun)
        # a second-order sampler's corrector call (the first call at the step's end sigma, after the
        # step's first call): it completes the step its first call began, with that call's decision
        follow = state.second_order and state.recalled and not again and leader.plan is not None
        state.second_order = state.second_order or again
        plan = leader.plan
        if plan is not None and (follow or (plan.sigma == sigma and id(state) not in plan.used)):
            decision = plan.decision  # a further member at this step, or the step's corrector: the same decision
        else:
            if state.second_order and again:  # a second-order step: its corrector repeats this decision
                est = step_estimate(state.sigmas, sigma)
                view = dataclasses.replace(view, until=None if est is None else sigma - est)
            decision = self.policy.decide(leader.policy, view)
            plan = leader.plan = StepPlan(sigma, decision)
            if link is not None:
                link.plan = leader.plan
        plan.used.add(id(state))
        if state.degraded:
            decision = Decision.full("no caches: this generation computes every token (see the report's notes)")
        decision = self.ranks.agree(decision)
        if decision.action is Action.FULL:
            out, error = self._full_step(args, sigma, branch, state, decision)
            flops = self.executor.full_flops
        else:
            out, flops, error = self._cached_step(args, sigma, branch, state, decision)
        # the step's corrector pools with the step's first call, as a further member's call does
        self._observe(leader.policy, view, Observation(decision, sigma, flops, self.executor.full_flops, error,
                                                       step=plan.id))
        return out, decision.action is Action.FULL

    def _observe(self, state: Any, view: StepView, obs: Observation) -> None:
        """``policy.observe`` now, or, while the measured error is a tensor not yet read back,
        at the generation's next call (:meth:`_settle`): on a GPU reading it right after the
        variant would keep the host waiting for the whole call, where the sampler's step and
        the next call's start could run meanwhile. The next call reads the device's values
        anyway (its sigma, routing), so the read costs no further wait there, and the policy
        sees every observation before its next decision, in call order."""
        if isinstance(obs.prediction_error, torch.Tensor):
            index = len(self._report.steps) - 1  # the call's record, whose measured error waits as well
            assert self._report.steps[index].sigma == obs.sigma and self._report.steps[index].measured is None
            self.generation.pending.append((state, view, obs, index))
        else:
            self.policy.observe(state, view, obs)

    def _settle(self, gen: Generation) -> None:
        """Hand ``gen``'s deferred observations to the policy, in call order, their errors read."""
        if not gen.pending:
            return
        pending, gen.pending = gen.pending, []
        steps = gen.report.settle().steps  # one read per error, into the records
        for state, view, obs, index in pending:
            error = steps[index].measured
            if error is None:  # another thread is settling the report this moment: read it here
                error = float(obs.prediction_error)
            self.policy.observe(state, view, dataclasses.replace(obs, prediction_error=error))

    def _hindsight(self, out: tuple[Any, ...], full: bool, sigma: float, sample: torch.Tensor,
                   state: BranchState) -> tuple[Any, ...]:
        """The call's outputs with the hindsight correction (:mod:`.hindsight`) on a full call;
        a cached call's output is remembered for it. Only where the output is shaped like the
        latent (a velocity the sampler integrates)."""
        v = self._sample_of(out)
        if not self.config.hindsight or state.degraded or not isinstance(v, torch.Tensor) \
                or v.shape != sample.shape or not v.is_floating_point():
            return out
        if not full:
            state.hindsight.cached(sigma, v)
            return out
        i = self.plan.sample_output
        return (*out[:i], state.hindsight.full(sigma, v, state.sigmas), *out[i + 1:])

    def _store_full(self, state: BranchState, out: StepOutput, sigma: float) -> None:
        if not self._fits_cap(state, out):
            return
        state.kv.store(out.kv, state.extrapolate)
        if out.text is not None and self._may_cache_context(state):  # not once decided against it
            state.text.store(out.text, sigma, state.extrapolate)
        state.his = out.score
        state.cached_for = torch.zeros(out.tokens.shape[:2], dtype=torch.int32, device=out.tokens.device)
        self._push_past(state, sigma, out.tokens)
        if state.tokens is None:
            state.tokens = TokenHistory.start(out.tokens, sigma)
        else:
            state.tokens.push_all(out.tokens, sigma)
        self._report.cache_bytes = max(self._report.cache_bytes, state.cache_bytes)

    def _fits_cap(self, state: BranchState, out: StepOutput) -> bool:
        """Apply ``max_cache_bytes`` before a full step stores its caches: the bytes they will
        hold follow from the step's outputs (the previous K/V have the same sizes). Over the
        cap, the generation keeps the first of these that fits: without the text K/V caches
        (the context is then computed on cached steps), without K/V extrapolation (halves the
        K/V caches; cached steps reuse the K/V), without both; if none fits it computes every
        token on every step and keeps no caches. Each is logged, warned once and noted in the
        report."""
        if self._cap is _UNSET:  # every rank's first full call: the ranks' smallest cap (``ranks.smallest``)
            self._cap = self.ranks.smallest(self.config.max_cache_bytes)
        cap = self._cap
        if state.degraded:
            return False
        if cap is None:
            return True
        kv = nbytes(*out.kv)
        text = nbytes(*out.text) if out.text is not None and self._may_cache_context(state) else 0
        tokens = nbytes(out.tokens) * (2 + (self.config.blend_history if self._paper_blend else 0))

        def need(extrapolate: bool, context: bool) -> int:
            return (kv + text * context) * (1 + extrapolate) + tokens

        options = [(e, c) for e in dict.fromkeys((state.extrapolate, False)) for c in dict.fromkeys((text > 0, False))]
        fit = next((o for o in options if need(*o) <= cap), None)
        if fit == options[0]:
            return True
        over = f"specdiff: caches need {need(*options[0])} bytes > max_cache_bytes={cap}"
        if fit is None:
            state.degraded = True
            state.drop_caches()
            self._note(f"{over} even without text K/V caches and K/V extrapolation ({need(False, False)} bytes); "
                       "this generation computes every token (no caching)")
            return False
        dropped = []
        if options[0][1] and not fit[1]:
            state.context, state.k_txt = ContextCaching.COMPUTED, None
            state.text.clear()
            self._report.context_cached = False
            self._report.context_tokens = text_tokens(ContextMode.COMPUTE, None, self.plan)
            dropped.append("the text K/V caches (context computed on cached steps)")
        if options[0][0] and not fit[0]:
            state.extrapolate = False
            state.kv.prev = []
            state.text.drop_prev()
            dropped.append("K/V extrapolation (cached steps reuse the cached K/V)")
        self._note(f"{over}; this generation drops {' and '.join(dropped)}: {need(*fit)} bytes")
        return True

    def _may_cache_context(self, state: BranchState) -> bool:
        """Whether this generation may still keep text K/V caches: not once it decided to
        compute every text token on cached steps, nor when the options say it will."""
        if state.context is not ContextCaching.UNDECIDED:
            return state.context is not ContextCaching.COMPUTED
        return self.config.effective_context_ratio > 0

    def _note(self, msg: str) -> None:
        log.info(msg)
        self._report.notes.append(msg)
        if msg not in self._warned:
            self._warned.add(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=6)

    @property
    def _paper_blend(self) -> bool:
        return self.config.blend and self.config.blend_mode == "paper"

    def _push_past(self, state: BranchState, sigma: float, tokens: torch.Tensor) -> None:
        if not self._paper_blend:  # only the paper blend reads whole past steps
            return
        state.past.appendleft((sigma, detached(tokens)))
        while len(state.past) > self.config.blend_history:
            state.past.pop()

    def _full_step(self, args, sigma, branch, state, decision: Decision) -> tuple[tuple[Any, ...], float | None]:
        # The store below makes the current K/V the previous ones and drops the previous:
        # dropping them before the call keeps two generations of image K/V in memory during
        # it instead of three (the fresh K/V are the call's outputs).
        released = bool(state.extrapolate and state.kv.prev)
        if released:
            state.kv.prev = []
        try:
            out = self.executor.run_full(args)
        except BaseException:
            if released:  # the caches can no longer be extrapolated: never run a sparse call on them
                state.degraded = True
                state.drop_caches()
                self._note("specdiff: a full call raised after its previous K/V were released; this "
                           "generation computes every token from now on (no caching)")
            raise
        error = self._full_step_error(state, out, sigma)
        self._store_full(state, out, sigma)
        self._record(state.step, branch, "full", sigma, self.executor.full_flops, decision=decision, measured=error)
        return out.user, error

    def _full_step_error(self, state: BranchState, out: StepOutput, sigma: float) -> float | None:
        """The error a sparse call would have made here: over the tokens it would have left
        out (at most the default ``cache_ratio``'s top-scored tokens excepted:
        :meth:`SpecDiffConfig.num_unmeasured`), the fresh outputs against the reused ones
        (relative to the fresh outputs)."""
        if not self.policy.measures():
            return None
        if state.tokens is None:  # nothing to compare with (other ranks may have: a collective all the same)
            return self.ranks.relative_error(None, None)
        k = self.config.num_unmeasured(self.plan.num_image_tokens)
        left_out = torch.ones(out.tokens.shape[:2], dtype=torch.bool, device=out.tokens.device)
        left_out.scatter_(1, torch.topk(self._scores(state, sigma), k, dim=1).indices.to(left_out.device), False)
        err = (out.tokens.float() - state.tokens.latest.float()).pow(2).sum(dim=-1)
        return self.ranks.relative_error((err * left_out).sum(), out.tokens.float().pow(2).sum(), read=False)

    def _first_step(self, args, sigma, branch, state) -> tuple[Any, ...]:
        state.sigma0 = sigma
        state.groups = same_latent_groups(args[self.plan.sample_input])
        out = self.executor.run_full(args)
        self._store_full(state, out, sigma)
        self._record(0, branch, "full", sigma, self.executor.full_flops,
                     note="shared with speculative step 1" if self.config.speculative_steps else "")
        state.spec = [(sigma, self._spec_record(out))] if self.config.speculative_steps and not state.degraded else []
        if self.ranks.all(not state.degraded):  # no caches: nothing for a speculative run to inform
            self._speculate(args, out, sigma, branch, state)
        self.policy.observe(self.generation.leader(self._j).policy, self._view(state, sigma),
                            Observation(Decision.full("first call"), sigma, self.executor.full_flops,
                                        self.executor.full_flops))
        return out.user

    def _speculate(self, args, out0: StepOutput, sigma0: float, branch: int, state: BranchState) -> None:
        steps = self.config.speculative_steps
        if steps <= 1:
            return
        sample_i, t_i = self.plan.sample_input, self.plan.timestep_input
        x = args[sample_i]
        v = self._sample_of(out0.user)
        if not isinstance(v, torch.Tensor) or v.shape != x.shape:
            self._report.notes.append("speculative run skipped: the model output is not shaped like its input")
            return
        sigmas = schedule.speculative_sigmas(sigma0, steps)
        t = args[t_i]
        rows = self._image_rows(x)
        for j in range(1, steps):
            step = (sigmas[j] - sigmas[j - 1]) * v.float()
            if rows is not None:  # only the image tokens move; context tokens in the stream stay
                keep = torch.zeros_like(step)
                keep.narrow(1, *rows).copy_(step.narrow(1, *rows))
                step = keep
            x = (x.float() + step).to(x.dtype)
            spec_args = list(args)
            spec_args[sample_i] = x
            # the timesteps scale with sigma (entries at 0, e.g. a conditioning frame's, stay 0)
            spec_args[t_i] = t * (sigmas[j] / sigma0) if isinstance(t, torch.Tensor) and sigma0 > 0 else \
                torch.full_like(t, sigmas[j] * self.plan.timestep_per_sigma)
            out = self.executor.run_full(spec_args)
            state.spec.append((sigmas[j], self._spec_record(out)))
            self._record(-1, branch, "speculative", sigmas[j], self.executor.full_flops)
            v = self._sample_of(out.user)

    def _moving_part(self, latent: Any) -> tuple[Any, tuple[Any, ...]]:
        """The part of the latent input the sampler moves, for routing, and the rest, routed as
        conditioning (another image's condition is another generation); the whole latent and
        nothing where the two are one (``DiTPlan.moving``)."""
        if self.plan.moving is None or not isinstance(latent, torch.Tensor):
            return latent, ()
        axis, n = self.plan.moving
        if latent.dim() <= axis or latent.shape[axis] <= n:  # not the graph's shape (never, on a static graph)
            return latent, ()
        return latent.narrow(axis, 0, n), (latent.narrow(axis, n, latent.shape[axis] - n),)

    def _sample_of(self, outputs: Sequence[Any]) -> Any:
        """The model's output among a call's user outputs (``DiTPlan.sample_output``)."""
        i = self.plan.sample_output
        return outputs[i] if len(outputs) > i else None

    def _image_rows(self, sample: torch.Tensor) -> tuple[int, int] | None:
        """``(offset, length)`` of the image tokens on axis 1 of the latent when the stream
        carries context tokens too (FLUX.2 reference images); None otherwise."""
        stream = self.plan.stream
        if stream is None or sample.dim() != 3 or sample.shape[1] != stream.length:
            return None
        return stream.img_offset(), self.plan.num_image_tokens

    def _spec_record(self, out: StepOutput) -> torch.Tensor:
        """What the token score needs from a speculative call."""
        return out.score if self.config.score == "attention" else detached(out.tokens)

    def _guided(self, state: BranchState) -> bool:
        """Classifier-free guidance: batched halves from the same latent, more than one call
        per step (true CFG: a further branch that is a member, or one that has made only the
        call it shares with a member, so that it may still become one), or a branch linked to
        one in another runtime (the cond and uncond of one guided velocity in two graphs: a
        negative prompt of another token length). A further branch that went on from its first
        call without becoming a member is another request that started from the same noise at
        the same time (routing's module docstring): it does not make this one guided, or the
        two would sample otherwise than each alone."""
        gen = self.generation
        further = any(j in gen.members or len(br.trace.sigmas) < 2 for j, br in enumerate(gen.branches) if j)
        return state.groups is not None or further or gen.leader(self._j).link is not None

    def _text_plan(self, state: BranchState) -> tuple[ContextMode, int | None]:
        """The context mode (and ``k_txt``) of this generation's cached steps: every text
        token computed without text caches, else :func:`text_mode` of ``context_ratio``."""
        if not state.text:
            return ContextMode.COMPUTE, None
        return text_mode(self.config.effective_context_ratio, self.plan, self._guided(state))

    def _context_mode(self, state: BranchState) -> ContextCaching:
        """How this generation's cached steps treat the context tokens (:func:`text_mode` of
        ``context_ratio``), decided at its first cached step. Without text caches (a graph
        without text tokens, or the memory cap dropped them) every text token is computed;
        where the graph supports no text subset they are all cached, or all computed under
        classifier-free guidance (noted and logged: the ratio cannot be honoured)."""
        if state.context is ContextCaching.UNDECIDED:
            ratio = self.config.effective_context_ratio
            mode, k_txt = self._text_plan(state)
            if 0 < ratio < 1 and self.plan.text_subset_error is not None and state.text:
                how = "cache" if mode is ContextMode.CACHED else "compute (classifier-free guidance)"
                msg = (f"specdiff: context_ratio={ratio}: this {self.plan.family} graph computes no subset of "
                       f"its context tokens ({self.plan.text_subset_error}); cached steps {how} all of them")
                if msg not in self._report.notes:  # once per generation, not once per branch
                    log.info(msg)
                    self._report.notes.append(msg)
            state.context = {ContextMode.CACHED: ContextCaching.CACHED, ContextMode.SUBSET: ContextCaching.SUBSET,
                             ContextMode.COMPUTE: ContextCaching.COMPUTED}[mode]
            state.k_txt = k_txt
            if mode is ContextMode.COMPUTE:
                state.text.clear()
            self._report.context_cached = mode is not ContextMode.COMPUTE
            self._report.context_tokens = text_tokens(mode, k_txt, self.plan)
        return state.context

    def _scores(self, state: BranchState, sigma: float) -> torch.Tensor:
        cfg = self.config
        if cfg.score == "attention":
            base, fut = state.his, schedule.future_score(state.spec, sigma)
        else:
            base, fut = state.tokens.drift(sigma), schedule.future_drift(state.spec, sigma)
        score = schedule.token_scores(base, fut, state.cached_for, cfg.starvation_scale)
        if state.groups is not None:  # CFG halves of one image select the same tokens
            score = torch.zeros_like(score).index_add_(0, state.groups, score)[state.groups]
        return score

    def _measured_computed(self, step_score: torch.Tensor, k: int, probe: torch.Tensor) -> torch.Tensor | None:
        """``[B, m]``: the tokens a sparse call of ``k`` computes by their score (not drawn as
        probes) that the measured error still covers, those ranked below the top
        :meth:`SpecDiffConfig.num_unmeasured`; ``None`` where there are none (``k`` at most the
        default's). Their fresh outputs against their reused ones add to the probes' estimate."""
        top = self.config.num_unmeasured(self.plan.num_image_tokens)
        by_score = k - probe.shape[1]
        if by_score <= top:
            return None
        return torch.topk(step_score, by_score, dim=1).indices[:, top:]

    def _step_score(self, state: BranchState, sigma: float, own: torch.Tensor) -> torch.Tensor:
        """The score the step's token choice ranks: summed over the generation's branches
        (each branch's own score at ``sigma``), as over the halves of a batched CFG call, and
        over the branches linked to them in other runtimes (:meth:`_link`)."""
        gen = self.generation
        states = [gen.branches[m].state for m in (gen.members if self._j in gen.members else ())]
        link = gen.leader(self._j).link
        for other in link.live() if link is not None else ():
            if other is not gen:
                states += [b.state for i, b in enumerate(other.branches) if other.leader(i).link is link]
        total = own
        for st in states:
            if st is not state and st.tokens is not None and st.cached_for is not None \
                    and st.tokens.latest.shape[:2] == own.shape:
                total = total + self._scores(st, sigma)
        return total

    def _reuse_weights(self, latest: torch.Tensor, depth: int) -> torch.Tensor:
        """``[B, N, depth]`` history weights of a call that reuses every token's newest output
        (a skipped call: tier 2 everywhere, what :func:`schedule.taylor_weights` and
        :func:`schedule.tier_weights` give it), built once per shape; the graphs only read it."""
        key = (tuple(latest.shape[:2]), depth, latest.dtype, latest.device)
        w = self._reuse.get(key)
        if w is None:
            w = self._reuse[key] = torch.zeros((*latest.shape[:2], depth), dtype=latest.dtype, device=latest.device)
            w[..., 0] = 1
        return w

    def _reuse_reach(self, state: BranchState) -> float:
        """``config.reuse_extrapolation`` for a generation without guidance, else 0: under
        guidance (:meth:`_guided`) the guidance scale multiplies the difference of the branches'
        outputs, and their extrapolated differences with it (BENCHMARKS.md)."""
        lam = self.config.reuse_extrapolation
        if not lam or self._paper_blend or self._guided(state):
            return 0.0
        return lam

    def _cached_step(self, args, sigma: float, branch: int, state: BranchState,
                     decision: Decision) -> tuple[tuple[Any, ...], int, float | None]:
        cfg = self.config
        latest = state.tokens.latest
        n = self.plan.num_image_tokens
        probe = None
        if decision.action is Action.SKIP:  # every token reused (tier 2): no tier tensor to build
            idx = tier = None
        else:
            score = self._scores(state, sigma)
            plan = self.generation.leader(self._j).plan
            if plan.idx is None or plan.idx.shape[1] != decision.k:  # the step's first branch chooses
                probes = self.policy.probes(decision.k) if self.policy.measures() else 0
                step_score = self._step_score(state, sigma, score)
                plan.idx, plan.probe = schedule.choose_tokens(step_score, decision.k, probes,
                                                              seed=state.step, groups=state.groups)
                plan.measured = self._measured_computed(step_score, decision.k, plan.probe)
            idx, tier = schedule.assign_tiers(score, decision.k, cfg.reuse_mass, cfg.blend, idx=plan.idx)
            idx, probe = idx.to(latest.device), plan.probe.to(latest.device)
        reused = exact = None
        if probe is not None and probe.shape[1]:  # what the probes would have reused (before the history moves)
            reused = torch.gather(latest, 1, probe.unsqueeze(-1).expand(-1, -1, latest.shape[-1])).float()
            if plan.measured is not None:  # computed tokens the measured set holds (a low cache_ratio)
                exact = plan.measured.to(latest.device)
                exact_reused = torch.gather(latest, 1, exact.unsqueeze(-1).expand(-1, -1, latest.shape[-1])).float()
        if self._paper_blend:
            history = torch.zeros((cfg.blend_history, *latest.shape), dtype=latest.dtype, device=latest.device)
            for j, (_, tok) in enumerate(state.past):
                history[j] = tok
        else:  # reuse (C2) and the taylor C3 read each token's last two computed outputs: no copy
            history = state.tokens.outputs  # read by the graph before the history is updated
        reach = self._reuse_reach(state)
        if tier is None and not reach:
            weights = self._reuse_weights(latest, cfg.history_depth)
        elif self._paper_blend:
            blend = schedule.blend_weights([s for s, _ in state.past], sigma, cfg.blend_history)
            weights = schedule.tier_weights(tier, blend).to(latest.dtype)
        else:
            weights = schedule.taylor_weights(tier, state.tokens.sigmas, sigma, cfg.history_depth,
                                              reach=reach).to(latest.dtype)
        inputs = SparseInputs(idx, history, weights)
        refresh_text = False
        if decision.action is Action.SKIP:
            key = VariantKey.skip()
        else:
            inputs.kv = state.kv.kv
            if state.extrapolate:
                inputs.kv_prev, inputs.ratio = state.kv.prev, state.tokens.ratio(sigma).to(
                    device=state.kv.kv[0].device, dtype=torch.float32)
            context = ContextMode.COMPUTE
            mode = self._context_mode(state)
            if mode is ContextCaching.SUBSET:
                context = ContextMode.SUBSET
                inputs.text_idx = torch.topk(state.text.drift(sigma), state.k_txt, dim=1).indices.sort(dim=1).values
                inputs.text = state.text.kv
                if state.extrapolate:
                    inputs.text_prev = state.text.prev
                    inputs.text_ratio = state.text.ratio(sigma).to(inputs.ratio)
            elif mode is ContextCaching.CACHED:
                refresh_text = bool(cfg.context_interval) and state.text.age + 1 >= cfg.context_interval
                context = ContextMode.REFRESH if refresh_text else ContextMode.CACHED
                if not refresh_text:
                    inputs.text = state.text.kv
                    if state.extrapolate:
                        inputs.text_prev = state.text.prev
                        inputs.text_ratio = state.text.ratio(sigma)[:, 0].to(inputs.ratio)
            key = VariantKey.sparse(decision.k, context, state.extrapolate,
                                    k_txt=state.k_txt if context is ContextMode.SUBSET else None)
        try:
            out = self.executor.run_sparse(args, key, inputs)
        except BaseException:
            if inputs.kv:  # the graph updates the K/V caches in place: they may be half written
                state.degraded = True
                state.drop_caches()
                self._note("specdiff: a cached call raised while it updated its K/V caches in place; this "
                           "generation computes every token from now on (no caching)")
            raise
        error = None
        if reused is not None:  # the probes measure the error of the tokens left out
            fresh = torch.gather(out.tokens, 1, probe.unsqueeze(-1).expand(-1, -1, out.tokens.shape[-1])).float()
            left_out = n - decision.k
            total = (fresh - reused).pow(2).sum() * (left_out / probe.shape[1])
            if exact is not None:
                computed = torch.gather(out.tokens, 1, exact.unsqueeze(-1).expand(-1, -1, out.tokens.shape[-1]))
                total = total + (computed.float() - exact_reused).pow(2).sum()
            error = self.ranks.relative_error(total, out.tokens.float().pow(2).sum(), read=False)
        elif self.policy.measures():
            error = self.ranks.relative_error(None, None)
        if refresh_text:
            state.text.store(out.text, sigma, state.extrapolate)
        elif key.context is ContextMode.CACHED:
            state.text.age += 1
        elif key.context is ContextMode.SUBSET:
            state.text.push(inputs.text_idx, sigma)
        if idx is not None:
            state.tokens.push(idx, out.tokens, sigma)
        if out.score is not None:  # a skipped call computes no attention: the last received stays
            state.his = out.score
        state.cached_for = (state.cached_for + 1 if tier is None else torch.where(tier == 1, 0, state.cached_for + 1)
                            ).to(torch.int32)
        self._push_past(state, sigma, out.tokens)
        flops = self.executor.flops(key)
        self._record(state.step, branch, "cached" if idx is not None else "skipped", sigma, flops, tier=tier,
                     decision=decision, measured=error)
        if branch == 0 and tier is not None:  # a skipped call computes none
            counts = (tier == 1).to(torch.int32)  # stays on the device: no synchronisation per call
            rep = self._report
            rep.computed_counts = counts if rep.computed_counts is None else rep.computed_counts + counts
        return out.user, flops, error


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
