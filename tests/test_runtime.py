"""The controller with a fake executor (no model): schedule, tiers, scores, speculation,
branches, generations, telemetry. Plus the pure schedule functions."""

import contextlib
import math

import pytest
import torch

from specdiff_fx import SpecDiffConfig, last_generation, ops, schedule
from specdiff_fx.layout import Layout, Seg
from specdiff_fx.plan import AttentionSite, DiTPlan
from specdiff_fx.runtime import SpecDiffRuntime, StepOutput
from specdiff_fx.signature import ContextMode, VariantKind

B, N, C = 2, 20, 3


def fake_plan(per_sigma=1000.0, conditioned=False):
    """``conditioned``: a third input, the conditioning (true CFG's cond and uncond calls differ in
    it; :func:`generate` passes each branch its own), which the fake executors ignore."""
    site = AttentionSite("sdpa", "transformer_blocks.0", Layout(2, (Seg("img", N),)), 1, 4, None)
    return DiTPlan(family="fake", batch=B, num_image_tokens=N, width=8, out_channels=C, start="s", end="e",
                   blocks=(), attention=(site,), side_inputs=(), timestep_input=1, sample_input=0,
                   timestep_per_sigma=per_sigma, condition_inputs=(2,) if conditioned else ())


class FakeExecutor:
    """Velocity = -x; score = a fixed per-token profile that depends on sigma."""

    def __init__(self):
        self.calls = []  # (kind, sigma, idx or None)
        self.full_flops = 100
        self.compiled = []
        self.prepared = []  # variant keys the runtime asked to compile ahead

    def prepare(self, keys):
        self.prepared.extend(keys)

    def score(self, sigma):
        pos = torch.arange(N, dtype=torch.float32)
        return (1.0 + torch.cos(pos * sigma * 3)).expand(B, N) + 0.01

    def run_full(self, args):
        x, t = args[:2]
        sigma = float(t[0]) / 1000.0
        self.calls.append(("full", sigma, None))
        kv = [torch.zeros(B, 1, N, 4), torch.zeros(B, 1, N, 4)]
        return StepOutput((-x,), -x, self.score(sigma), kv)

    def run_sparse(self, args, key, inputs):
        x, t = args[:2]
        sigma = float(t[0]) / 1000.0
        idx = inputs.idx
        self.calls.append(("sparse" if idx is not None else "skip", sigma, None if idx is None else idx.clone()))
        self.kv_inputs = (inputs.kv_prev, inputs.ratio)
        tokens = ops.tier_blend(inputs.history, inputs.weights)  # the variants' tier epilogue
        if idx is not None:
            rows = idx[..., None].expand(-1, -1, C)
            tokens.scatter_(1, rows, torch.gather(-x, 1, rows))
        # the skip variant computes no attention: no score, as the real one (VariantKey.skip)
        return StepOutput((tokens,), tokens, None if idx is None else self.score(sigma), list(inputs.kv))

    def flops(self, key):
        return 100 if key.kind is VariantKind.FULL else 30


def generate(rt, steps, seed=0, branches=1):
    """Euler over ``linspace(1, 0)``; ``branches`` calls per step on one latent (true CFG: a runtime
    of a ``fake_plan(conditioned=True)``, each branch with its own conditioning)."""
    assert branches == 1 or rt.plan.condition_inputs, "true CFG's calls differ in their conditioning"
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(seed))
    sigmas = torch.linspace(1.0, 0.0, steps + 1)
    for i in range(steps):
        t = torch.full((B,), float(sigmas[i]) * 1000)
        for b in range(branches):
            (v,) = rt(x, t, *([torch.full((1,), float(b))] if rt.plan.condition_inputs else []))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
    return x


def test_schedule_needs_no_step_count():
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=4, refresh_at=(0.45, 0.7))
    for steps in (10, 28, 50):
        refreshed, full = set(), []
        for i, s in enumerate(torch.linspace(1, 0, steps + 1)[:-1].tolist()):
            if schedule.is_full_step(i, s, refreshed, cfg):
                full.append(i)
                refreshed.update(schedule.due_refresh_points(s, refreshed, cfg))
        assert full[:4] == [0, 1, 2, 3] and len(full) == 6
        progress = [1 - torch.linspace(1, 0, steps + 1)[i].item() for i in full[4:]]
        assert progress[0] >= 0.45 and progress[1] >= 0.7


def test_speculative_sigmas_and_future_lookup():
    assert schedule.speculative_sigmas(1.0, 2) == [1.0, 0.5]
    spec = [(1.0, torch.tensor([1.0])), (0.5, torch.tensor([2.0]))]
    assert schedule.future_score(spec, 0.9).item() == 2.0  # nearest at or after (lower sigma)
    assert schedule.future_score(spec, 0.5).item() == 2.0
    assert schedule.future_score(spec, 0.2).item() == 2.0  # past the last: the last
    assert schedule.future_score(spec, 1.0).item() == 1.0
    assert schedule.future_score([], 0.3) is None


def test_normalisation_is_scale_free():
    x = torch.rand(2, 7) + 0.1
    torch.testing.assert_close(schedule.normalise(5 * x), schedule.normalise(x))
    torch.testing.assert_close(schedule.normalise(x).mean(dim=1), torch.ones(2))


def test_starvation_term_refreshes_neglected_tokens():
    his = torch.tensor([[1.0, 1.0, 1.0, 0.5]])
    cached = torch.tensor([[0, 0, 0, 0]])
    assert schedule.token_scores(his, None, cached, 0.5).argmin() == 3
    cached = torch.tensor([[0, 0, 0, 2]])  # token 3 waited two steps
    assert schedule.token_scores(his, None, cached, 0.5).argmax() == 3
    assert torch.equal(schedule.token_scores(his, None, cached, 0.0), schedule.normalise(his))


def test_tiers_sizes_and_reuse_mass():
    g = torch.Generator().manual_seed(0)
    score = torch.rand(3, 50, generator=g) ** 3
    idx, tier = schedule.assign_tiers(score, 10, 0.10)
    assert idx.shape == (3, 10) and torch.equal(idx, idx.sort(dim=1).values)
    assert ((tier == 1).sum(dim=1) == 10).all()
    assert torch.equal(torch.gather(tier, 1, idx), torch.ones_like(idx, dtype=torch.int8))
    for b in range(3):
        top = score[b].topk(10).indices.sort().values
        assert torch.equal(idx[b], top)
        c2 = score[b][tier[b] == 2]
        c3 = score[b][tier[b] == 3]
        assert c2.sum() <= 0.10 * score[b].sum() + 1e-6 and len(c2) > 0 and len(c3) > 0
        assert c2.max() <= c3.min()  # the reused are the lowest
    _, no_blend = schedule.assign_tiers(score, 10, 0.10, blend=False)
    assert set(no_blend.unique().tolist()) == {1, 2}
    _, no_reuse = schedule.assign_tiers(score, 10, 0.0)
    assert set(no_reuse.unique().tolist()) == {1, 3}


def test_blend_weights_sum_to_one_and_decay():
    w = schedule.blend_weights([0.8, 0.85, 0.9], 0.75, 3)
    assert math.isclose(w.sum().item(), 1.0, rel_tol=1e-6)
    raw = [math.exp(-j) * abs(s - 0.75) for j, s in zip((1, 2, 3), (0.8, 0.85, 0.9))]
    torch.testing.assert_close(w, torch.tensor(raw) / sum(raw))
    short = schedule.blend_weights([0.8], 0.75, 3)  # one past output only
    assert torch.equal(short, torch.tensor([1.0, 0.0, 0.0]))
    tier = torch.tensor([[1, 2, 3]], dtype=torch.int8)
    rows = schedule.tier_weights(tier, w)
    assert torch.equal(rows[0, 0], torch.zeros(3)) and torch.equal(rows[0, 1], torch.tensor([1.0, 0, 0]))
    torch.testing.assert_close(rows[0, 2], w)


def test_generation_kinds_tiers_and_shared_speculative_step():
    cfg = SpecDiffConfig(controller="fixed", cache_ratio=0.75, speculative_steps=2, warmup_steps=2, refresh_at=(0.5,), blend=True)
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    generate(rt, 10)
    kinds = [k for k, _, _ in ex.calls]
    # step 0 full (= speculative step 1), one more speculative call, step 1 full, then cached
    # until progress 0.5 (step 5) refreshes
    assert kinds == ["full", "full", "full", "sparse", "sparse", "sparse", "full"] + ["sparse"] * 4
    assert [round(s, 3) for _, s, _ in ex.calls[:2]] == [1.0, 0.5]  # speculative sigma grid
    rep = last_generation()
    assert rep is rt.report
    assert [s.kind for s in rep.steps][:3] == ["full", "speculative", "full"]
    assert rep.count("speculative") == 1 and rep.count("full") == 3 and rep.count("cached") == 7
    k = cfg.num_computed(N)
    for s in rep.steps:
        if s.kind == "cached":
            assert s.c1 == (k, k) and all(a + b + c == N for a, b, c in zip(s.c1, s.c2, s.c3))
            assert min(s.c3) > 0
    assert math.isclose(rep.flops_fraction, (4 * 100 + 7 * 30) / (10 * 100))
    assert "cached" in rep.summary() and "speculative" in rep.summary()


class ProfileExecutor(FakeExecutor):
    """Velocity = -x plus a per-token profile that changes with sigma: the speculative run
    sees a change pattern the main run's history has not seen yet."""

    def run_full(self, args):
        x, t = args
        out = super().run_full(args)
        v = -x + self.score(float(t[0]) / 1000.0)[..., None]
        return StepOutput((v,), v, out.score, out.kv)


@pytest.mark.parametrize("score", ["drift", "attention"])
def test_speculation_changes_the_selection(score):
    sel = {}
    for steps in (0, 2):
        ex = ProfileExecutor()
        rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", cache_ratio=0.75, speculative_steps=steps, score=score,
                                                         warmup_steps=2, refresh_at=(0.9,)), ex)
        generate(rt, 8)
        sel[steps] = [idx for k, _, idx in ex.calls if k == "sparse"][0]
    assert not torch.equal(sel[0], sel[2])


def test_no_speculative_calls_with_zero_steps():
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", speculative_steps=0, warmup_steps=1), ex)
    generate(rt, 6)
    assert last_generation().count("speculative") == 0 and ex.calls[0][0] == "full" and ex.calls[1][0] == "sparse"


def test_every_token_is_refreshed_by_starvation():
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", cache_ratio=0.8, warmup_steps=1, refresh_at=(0.99,),
                                                     starvation_scale=1.0), ex)
    generate(rt, 40)
    seen = torch.zeros(B, N, dtype=torch.bool)
    for k, _, idx in ex.calls:
        if k == "sparse":
            seen[torch.arange(B)[:, None], idx] = True
    assert seen.all()


def test_new_generation_and_branches():
    ex = FakeExecutor()
    cfg = SpecDiffConfig(controller="fixed", speculative_steps=2, warmup_steps=1, refresh_at=(0.95,))
    rt = SpecDiffRuntime(fake_plan(conditioned=True), cfg, ex)
    generate(rt, 5)
    first = rt.report
    generate(rt, 5, seed=1)  # sigma jumps back up: a new generation, speculation again
    assert rt.report is not first and rt.report.count("speculative") == 1
    ex.calls.clear()
    generate(rt, 4, seed=2, branches=2)  # true-CFG style: two calls per step, same sigma and latent, each its conditioning
    rep = rt.report
    assert rep.count("speculative") == 2  # one pre-run per branch
    assert {s.branch for s in rep.steps} == {0, 1}
    assert len(rep.main_steps) == 8


def test_reset_forgets_state():
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=1), ex)
    x = torch.randn(B, N, C)
    rt(x, torch.full((B,), 1000.0))
    rt(x, torch.full((B,), 900.0))
    rt.reset()
    ex.calls.clear()
    rt(x, torch.full((B,), 800.0))  # lower sigma, but after reset: a first step again
    assert ex.calls[0][0] == "full" and rt.report.steps[0].step == 0


def test_cache_cap_degrades_to_full_compute():
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=1, max_cache_bytes=10), ex)
    with pytest.warns(RuntimeWarning, match="max_cache_bytes"):
        generate(rt, 5)
    assert all(k == "full" for k, _, _ in ex.calls) and rt.report.notes


def test_cache_cap_first_drops_kv_extrapolation():
    """K/V 2 x 640 bytes, outputs 2 x 480: 3520 bytes with the previous K/V, 2240 without.
    A cap in between keeps caching with reused K/V; below both, no caches at all."""
    ex = FakeExecutor()
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=2, max_cache_bytes=3000)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    with pytest.warns(RuntimeWarning, match="drops K/V extrapolation"):
        generate(rt, 6)
    state, rep = rt.branches[0], rt.report
    assert not state.extrapolate and state.kv.prev == [] and not state.degraded
    assert ex.kv_inputs == (None, None)  # the sparse variant without extrapolation inputs
    assert rep.count("cached") == 4 and rep.cache_bytes == 2240 <= cfg.max_cache_bytes
    assert any("2240 bytes" in n for n in rep.notes)

    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), cfg.replace(max_cache_bytes=2000), ex)
    with pytest.warns(RuntimeWarning, match="computes every token"):
        generate(rt, 6)
    state = rt.branches[0]
    assert state.degraded and state.kv.kv == [] and state.tokens is None and rt.report.cache_bytes == 0
    assert [k for k, _, _ in ex.calls] == ["full"] * 6  # no speculative run either


@pytest.mark.parametrize("cap, extrapolate, context", [(5000, True, True), (3600, True, False),
                                                       (3000, False, True), (2300, False, False)])
def test_cache_cap_keeps_the_first_setting_that_fits(cap, extrapolate, context):
    """With text K/V (2 x 96 bytes): 3904 bytes with everything, 3520 without the text caches,
    2432 without extrapolation, 2240 without both; the first that fits the cap is kept."""
    ex = TextExecutor()
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0, context_ratio=1.0,
                         max_cache_bytes=cap)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    with pytest.warns(RuntimeWarning, match="drops") if not (extrapolate and context) else contextlib.nullcontext():
        generate(rt, 5)
    state, rep = rt.branches[0], rt.report
    assert state.extrapolate is extrapolate and rep.context_cached is context and not state.degraded
    assert (ex.text_inputs is not None) is context and (ex.kv_inputs[0] is not None) is extrapolate
    assert rep.cache_bytes <= cap and (len(rep.notes) == 0) is (extrapolate and context)


class WeightedExecutor(FakeExecutor):
    def run_full(self, args):
        return super().run_full(args[:2])

    def run_sparse(self, args, key, inputs):
        return super().run_sparse(args[:2], key, inputs)


def test_another_shape_in_between_does_not_reset_a_generation():
    """Two specialisations of one model (same weights) serving two generations at two
    resolutions, interleaved: each runtime continues its own generation (the latent moved as
    the sampler moves it); the other shape's calls in between change nothing."""
    from dataclasses import replace

    plan = replace(fake_plan(), weight_input=2)
    weight = torch.zeros(3)
    a, b = (SpecDiffRuntime(plan, SpecDiffConfig(controller="fixed", warmup_steps=1), WeightedExecutor()) for _ in range(2))
    xa, xb = torch.randn(B, N, C), torch.randn(B, N, C)
    sig = torch.linspace(1, 0, 6)
    for i in range(5):
        t = torch.full((B,), float(sig[i]) * 1000)
        (va,) = a(xa, t, weight)
        (vb,) = b(xb, t, weight)
        xa, xb = xa + (sig[i + 1] - sig[i]) * va, xb + (sig[i + 1] - sig[i]) * vb
    for rt in (a, b):
        assert [s.step for s in rt.report.main_steps] == [0, 1, 2, 3, 4] and not rt.report.notes


def test_taylor_weights_extrapolate_and_reuse():
    tier = torch.tensor([[1, 2, 3, 3]], dtype=torch.int8)
    fresh_sigma = torch.tensor([[[0.6, 0.6, 0.6, 0.6]], [[0.7, 0.7, 0.7, 0.6]]])  # last token: one output only
    w = schedule.taylor_weights(tier, fresh_sigma, 0.5, 3)
    assert torch.equal(w[0, 0], torch.zeros(3))
    assert torch.equal(w[0, 1], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(w[0, 2], torch.tensor([2.0, -1.0, 0.0]))  # r = (0.5-0.6)/(0.6-0.7) = 1
    assert torch.equal(w[0, 3], torch.tensor([1.0, 0.0, 0.0]))
    # a linear trajectory is extrapolated exactly
    f1, f2 = torch.tensor(3.0), torch.tensor(2.0)
    assert torch.isclose(w[0, 2, 0] * f1 + w[0, 2, 1] * f2, torch.tensor(4.0))


def test_cfg_halves_share_their_selection():
    from specdiff_fx.runtime import same_latent_groups

    x = torch.randn(1, N, C)
    assert torch.equal(same_latent_groups(torch.cat([x, x])), torch.tensor([0, 0]))
    assert same_latent_groups(torch.randn(2, N, C)) is None
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=1, cache_ratio=0.75), ex)
    sig = torch.linspace(1, 0, 7)
    for i in range(6):
        rt(torch.cat([x, x]), torch.full((B,), float(sig[i]) * 1000))
    sparse = [idx for k, _, idx in ex.calls if k == "sparse"]
    assert sparse and all(torch.equal(i[0], i[1]) for i in sparse)


@pytest.mark.parametrize("mode", ["paper", "taylor"])
def test_both_blend_modes_run(mode):
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=1, blend=True, blend_mode=mode), ex)
    out = generate(rt, 8)
    assert torch.isfinite(out).all() and rt.report.count("cached") > 0


def test_drift_scores_rank_by_predicted_staleness():
    # tokens: fast drift / slow drift / fast but just computed / one output only
    fresh = torch.zeros(2, 1, 4, 3)
    fresh[0, 0, :, 0] = torch.tensor([1.0, 0.1, 1.0, 5.0])
    fresh_sigma = torch.tensor([[[0.8, 0.8, 0.6, 0.7]], [[0.9, 0.9, 0.7, 0.7]]])
    d = schedule.drift_scores(fresh, fresh_sigma, 0.6)
    # rate |F1 - F2| / (s2 - s1) times the sigma travelled since F1
    torch.testing.assert_close(d[0, :3], torch.tensor([10 * 0.2, 1 * 0.2, 10 * 0.0]))
    torch.testing.assert_close(d[0, 3], torch.tensor(10 * 0.1))  # no rate yet: the largest rate
    none_known = schedule.drift_scores(fresh, torch.full((2, 1, 4), 0.7), 0.5)
    torch.testing.assert_close(none_known, torch.full((1, 4), 0.2))  # only the sigma travelled


def test_future_drift_reads_the_segment_of_the_speculative_run():
    t = [torch.zeros(1, 2, 1), torch.tensor([[[1.0], [0.0]]]), torch.tensor([[[1.0], [3.0]]])]
    spec = list(zip([1.0, 0.66, 0.33], t))
    torch.testing.assert_close(schedule.future_drift(spec, 0.9), torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(schedule.future_drift(spec, 0.5), torch.tensor([[0.0, 3.0]]))
    torch.testing.assert_close(schedule.future_drift(spec, 0.1), torch.tensor([[0.0, 3.0]]))  # past the last
    assert schedule.future_drift(spec[:1], 0.5) is None


def test_extrapolation_ratio():
    fresh_sigma = torch.tensor([[[0.6, 0.6, 0.6]], [[0.7, 0.6, 0.61]]])
    r = schedule.extrapolation_ratio(fresh_sigma, 0.5)
    torch.testing.assert_close(r, torch.tensor([[1.0, 0.0, 1.5]]))  # one output only: 0; clamped to 1.5


def test_kv_extrapolation_hands_the_previous_caches_to_the_graph():
    for extrapolate in (True, False):
        ex = FakeExecutor()
        rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0,
                                                         kv_extrapolation=extrapolate), ex)
        x = torch.randn(B, N, C)
        rt(x, torch.full((B,), 1000.0))
        first = rt.branches[0].kv.kv
        rt(x, torch.full((B,), 900.0))
        state = rt.branches[0]
        if extrapolate:  # the caches of the step before, each token's computation before the last
            assert all(p is c for p, c in zip(state.kv.prev, first))
        else:
            assert state.kv.prev == []
        rt(x, torch.full((B,), 800.0))
        prev, ratio = ex.kv_inputs
        if extrapolate:
            assert prev is state.kv.prev and ratio.shape == (B, N)
            torch.testing.assert_close(ratio, torch.ones(B, N))  # (0.9 - 0.8) / (1.0 - 0.9)
        else:
            assert prev is None and ratio is None


class TextExecutor(FakeExecutor):
    """A model with text tokens: full steps return text K/V, cached steps record what they get."""

    def flops(self, key):  # sparse: text computed / cached / returned
        if key.kind is VariantKind.FULL:
            return 100
        return {ContextMode.COMPUTE: 30, ContextMode.CACHED: 20, ContextMode.REFRESH: 31}[key.context]

    def run_full(self, args):
        out = super().run_full(args)
        text = [torch.zeros(B, 1, 3, 4), torch.zeros(B, 1, 3, 4)]  # k0, v0 of the one attention
        return StepOutput(out.user, out.tokens, out.score, out.kv, text)

    def run_sparse(self, args, key, inputs):
        self.keys = getattr(self, "keys", []) + [key]
        self.text_inputs = inputs if key.context is ContextMode.CACHED else None
        refresh = key.context is ContextMode.REFRESH
        self.refreshes = getattr(self, "refreshes", []) + [refresh]
        out = super().run_sparse(args, key, inputs)
        if refresh:  # a step that computes the context returns its text K/V
            sigma = float(args[1][0]) / 1000.0
            out.text = [torch.full((B, 1, 3, 4), sigma), torch.zeros(B, 1, 3, 4)]
        return out


@pytest.mark.parametrize("options, guided, expected", [
    ({"context_ratio": 1.0}, "no", True), ({"context_ratio": 1.0}, "batch", True),
    ({"context_ratio": 1.0}, "calls", True), ({"context_ratio": 0.0}, "no", False),
    ({"context_ratio": 0.0}, "calls", False),
    ({"cache_context": True}, "batch", True), ({"cache_context": False}, "no", False),  # deprecated spellings
])
def test_context_caching_follows_the_ratio_with_and_without_guidance(options, guided, expected):
    """``context_ratio`` 1 caches every text token on cached steps, 0 computes them all, with or
    without classifier-free guidance (batched halves, or two calls per step); the deprecated
    ``cache_context`` says the same with a FutureWarning."""
    ex = TextExecutor()
    with pytest.warns(FutureWarning, match="deprecated") if "cache_context" in options else contextlib.nullcontext():
        cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0, **options)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    x = torch.randn(B, N, C)
    if guided == "batch":
        x = torch.cat([x[:1], x[:1]])  # CFG halves: the same latent twice
    sigmas = torch.linspace(1, 0, 5)
    for i in range(4):
        t = torch.full((B,), float(sigmas[i]) * 1000)
        for _ in range(2 if guided == "calls" else 1):
            rt(x, t)
    assert rt.report.context_cached is expected
    # the variant compiled ahead is the one that ran (true CFG: known once both calls were seen)
    ran = {k for k in getattr(ex, "keys", [])}
    assert ex.prepared and set(ex.prepared) == ran, (ex.prepared, ran)
    got = ex.text_inputs
    if expected:
        assert len(got.text) == len(got.text_prev) == 2 and got.text_ratio is not None
        # the text was computed at sigma 1.0 and 0.75 (the full steps); now 0.25: r = 0.5 / 0.25, clamped
        torch.testing.assert_close(got.text_ratio, torch.full((B,), 1.5))
    else:  # and the text caches are dropped for the rest of the generation
        assert got is None and not rt.branches[0].text and not rt.branches[0].text.prev


def test_context_interval_refreshes_the_text_caches_on_cached_steps():
    """``context_interval=2``: every second cached step computes the context and its text
    K/V become the caches the next cached steps read (extrapolated from the last two)."""
    ex = TextExecutor()
    with pytest.warns(FutureWarning, match="'context_interval' is deprecated"):
        cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0,
                             context_ratio=1.0, context_interval=2)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    x = torch.randn(B, N, C)
    sigmas = torch.linspace(1, 0, 11)
    seen = []
    for i in range(7):
        rt(x, torch.full((B,), float(sigmas[i]) * 1000))
        if i >= 2:
            seen.append(ex.text_inputs)
    # cached steps 2..6: read, refresh, read, refresh, read
    assert ex.refreshes == [False, True, False, True, False]
    assert [t is not None for t in seen] == [True, False, True, False, True]
    state = rt.branches[0]
    # every text token's last two computations: the two refreshing cached steps
    torch.testing.assert_close(state.text.sigmas, torch.tensor([0.5, 0.7]).reshape(2, 1, 1).expand(2, B, 3))
    torch.testing.assert_close(state.text.kv[0], torch.full((B, 1, 3, 4), 0.5))
    torch.testing.assert_close(state.text.prev[0], torch.full((B, 1, 3, 4), 0.7))
    # r = (s1 - sigma) / (s2 - s1): step 2 (0.8) from the full steps 0.9 and 1.0; step 4
    # (0.6) from 0.7 (a refresh) and 0.9 (full); step 6 (0.4) from the refreshes 0.5 and 0.7
    for j, r in ((0, 1.0), (2, 0.5), (4, 0.5)):
        torch.testing.assert_close(seen[j].text_ratio, torch.full((B,), r))
    # each cached step reports the FLOPs of the variant it ran
    assert [s.flops for s in rt.report.steps if s.kind == "cached"] == [20, 31, 20, 31, 20]


class SubsetExecutor(TextExecutor):
    """A model with ``M = 3`` text tokens whose K drift at fixed per-token rates (``k = rate *
    sigma``): full steps return them; a text-subset step writes the computed rows into the
    caches in place (``prev <- cache``, ``cache <- fresh``) as the sparse graph does."""

    RATES = torch.tensor([0.0, 5.0, 1.0])

    def flops(self, key):
        return 25 if key.context is ContextMode.SUBSET else super().flops(key)

    def fresh(self, sigma):
        return (self.RATES * sigma).reshape(1, 1, 3, 1).expand(B, 1, 3, 4).clone()

    def run_full(self, args):
        out = super().run_full(args)
        out.text = [self.fresh(float(args[1][0]) / 1000.0), torch.zeros(B, 1, 3, 4)]
        return out

    def run_sparse(self, args, key, inputs):
        self.subsets = getattr(self, "subsets", []) + [inputs if key.context is ContextMode.SUBSET else None]
        if key.context is ContextMode.SUBSET:
            self.ratios = getattr(self, "ratios", []) + [inputs.text_ratio.clone()]
            rows = inputs.text_idx[:, None, :, None].expand(-1, 1, -1, 4)
            fresh = self.fresh(float(args[1][0]) / 1000.0)
            for cache, prev, new in zip(inputs.text, inputs.text_prev, (fresh, torch.zeros_like(fresh))):
                prev.scatter_(2, rows, cache.gather(2, rows))
                cache.scatter_(2, rows, new.gather(2, rows))
        return super().run_sparse(args, key, inputs)


def subset_plan():
    from dataclasses import replace
    return replace(fake_plan(), num_text_tokens=3)


def test_text_subset_computes_the_text_tokens_that_drifted_most():
    """``context_ratio=0.5`` of 3 text tokens: each cached step computes one (k_txt = 3 -
    round(1.5)), the one whose K moved most per unit of sigma times the sigma travelled since
    its last computation; its per-token sigmas move, and the others' K/V are extrapolated with
    their own ratio."""
    ex = SubsetExecutor()
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0,
                         context_ratio=0.5)
    rt = SpecDiffRuntime(subset_plan(), cfg, ex)
    x = torch.randn(B, N, C)
    sigmas = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    for s in sigmas:
        rt(x, torch.full((B,), s * 1000))
    key = ex.keys[0]
    assert key.context is ContextMode.SUBSET and key.k_txt == 1 and set(ex.keys) == {key}
    assert set(ex.prepared) == {key}  # compiled ahead: the one that ran
    assert rt.report.context_tokens == (1, 3) and rt.report.context_cached is True
    assert "1 of 3 computed" in rt.report.summary()
    chosen = [s.text_idx[0].tolist() for s in ex.subsets]
    # rates 0, 5, 1 per unit sigma: token 1 stays ahead, one step after its last computation
    # (0.1 x 5) against token 2's up to four steps (0.4 x 1); token 0 never moves
    assert chosen == [[1], [1], [1], [1]]
    state = rt.branches[0]
    torch.testing.assert_close(state.text.sigmas[:, 0], torch.tensor([[0.9, 0.5, 0.9], [1.0, 0.6, 1.0]]))
    torch.testing.assert_close(state.text.kv[0][0, 0, :, 0], torch.tensor([0.0, 2.5, 0.9]))
    # the ratio of step 0.6 per token: (0.7 - 0.6) / (0.8 - 0.7) for the token computed at 0.7
    # after 0.8, (0.9 - 0.6) / (1 - 0.9) = 3 clamped to 1.5 for the others
    torch.testing.assert_close(ex.ratios[2][0], torch.tensor([1.5, 1.0, 1.5]))
    assert [s.flops for s in rt.report.steps if s.kind == "cached"] == [25] * 4


def test_text_subset_choice_follows_the_drift_rates():
    """With token 1 standing still, token 2 (rate 1) is computed first; token 0 (rate 0) only
    ever when nothing else drifts more."""
    ex = SubsetExecutor()
    ex.RATES = torch.tensor([0.0, 0.0, 1.0])
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0,
                         context_ratio=0.5)
    rt = SpecDiffRuntime(subset_plan(), cfg, ex)
    x = torch.randn(B, N, C)
    for s in (1.0, 0.9, 0.8, 0.7):
        rt(x, torch.full((B,), s * 1000))
    assert [s.text_idx[1].tolist() for s in ex.subsets] == [[2], [2]]


@pytest.mark.parametrize("ratio, m, error, guided, expected", [
    (1.0, 3, None, True, (ContextMode.CACHED, None)), (0.0, 3, None, False, (ContextMode.COMPUTE, None)),
    (0.5, 3, None, True, (ContextMode.SUBSET, 1)), (0.75, 80, None, False, (ContextMode.SUBSET, 20)),
    (0.9, 3, None, True, (ContextMode.CACHED, None)),  # rounds to no text token computed
    (0.1, 3, None, False, (ContextMode.COMPUTE, None)),  # rounds to all
    # no text subset in the graph: all or nothing, by guidance
    (0.5, 0, "cross-attention", False, (ContextMode.CACHED, None)),
    (0.5, 0, "cross-attention", True, (ContextMode.COMPUTE, None)),
    (1.0, 0, "no text", True, (ContextMode.CACHED, None)), (0.0, 0, "no text", False, (ContextMode.COMPUTE, None)),
])
def test_text_mode_of_a_context_ratio(ratio, m, error, guided, expected):
    from dataclasses import replace
    from specdiff_fx.runtime.context import text_mode
    assert text_mode(ratio, replace(fake_plan(), num_text_tokens=m, text_subset_error=error), guided) == expected


@pytest.mark.parametrize("branches, mode", [(1, ContextMode.CACHED), (2, ContextMode.COMPUTE)])
def test_context_ratio_on_a_graph_without_text_subsets(branches, mode):
    """A graph that supports no text subset (e.g. Wan's cross-attention) caches every context
    token on cached steps, or computes them all under classifier-free guidance (here two
    calls per step), says so in the report, and never runs a subset variant."""
    from dataclasses import replace
    ex = TextExecutor()
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,), speculative_steps=0,
                         context_ratio=0.5)
    rt = SpecDiffRuntime(replace(fake_plan(conditioned=True), text_subset_error="cross-attention"), cfg, ex)
    generate(rt, 5, branches=branches)
    assert {k.context for k in ex.keys} == {mode} and set(ex.prepared) == set(ex.keys)
    how = "cache all" if mode is ContextMode.CACHED else "compute (classifier-free guidance) all"
    assert sum(f"computes no subset of its context tokens (cross-attention); cached steps {how}" in n
               for n in rt.report.notes) == 1  # once, whatever the branches


class HeldKVExecutor(FakeExecutor):
    """Records, at each full call, the image K/V the runtime holds meanwhile (ids of the current
    ones, count of the previous ones); can fail once, at call number ``fail_at``."""

    def __init__(self, rt_box, fail_at=None):
        super().__init__()
        self.rt_box, self.fail_at, self.held = rt_box, fail_at, []

    def run_full(self, args):
        state = self.rt_box[0].branches.get(0) if self.rt_box else None
        if state is not None and state.kv.kv:
            self.held.append(([id(t) for t in state.kv.kv], len(state.kv.prev)))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            self.calls.append(("raised", None, None))
            raise RuntimeError("out of memory (planted)")
        return super().run_full(args)


def test_a_later_full_call_holds_one_generation_of_image_kv():
    """During a full call after cached ones only the current K/V are held (their previous ones
    are dropped before the call, not after): two generations in memory instead of three. After
    it, the previous K/V are the K/V from before the call, as without the early release."""
    box = []
    ex = HeldKVExecutor(box)
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.5,),
                                                     speculative_steps=0), ex)
    box.append(rt)
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 9)
    checked = 0
    for i in range(8):
        held = len(ex.held)
        (v,) = rt(x, torch.full((B,), float(sigmas[i]) * 1000))
        x = x + (sigmas[i + 1] - sigmas[i]) * v
        if len(ex.held) > held:  # a full call with K/V from before
            ids, prev_during = ex.held[-1]
            assert prev_during == 0, ex.held
            assert [id(t) for t in rt.branches[0].kv.prev] == ids  # the K/V from before, not copies
            checked += 1
    kinds = [k for k, _, _ in ex.calls]
    assert checked >= 2 and "sparse" in kinds[2:kinds.index("full", 3)], kinds


def test_a_full_call_that_raises_leaves_a_correct_generation():
    """A full call that raises after the previous K/V were released: the error reaches the
    caller, the generation is noted and computes every token from then on (never a sparse call
    on caches that can no longer be extrapolated)."""
    box = []
    ex = HeldKVExecutor(box)
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.5,), speculative_steps=0)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    box.append(rt)
    generate(rt, 8)
    kinds = [k for k, _, _ in ex.calls]
    fail_at = next(i for i in range(3, len(kinds)) if kinds[i] == "full" and kinds[i - 1] != "full")

    box.clear()
    ex = HeldKVExecutor(box, fail_at=fail_at)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    box.append(rt)
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 9)
    i = 0
    with pytest.warns(RuntimeWarning, match="a full call raised"):
        while i < 8:
            t = torch.full((B,), float(sigmas[i]) * 1000)
            try:
                (v,) = rt(x, t)
            except RuntimeError as e:
                assert "planted" in str(e)
                continue  # the caller retries the same call
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            i += 1
    state = rt.branches[0]
    after = [k for k, _, _ in ex.calls][fail_at + 1:]
    assert state.degraded and any("a full call raised" in n for n in rt.report.notes)
    assert after and all(k == "full" for k in after), after


class SparseRaising(FakeExecutor):
    """Raises once, at its ``fail_at``-th sparse call (counted from 0), after it ran (the caches
    it updates in place may be half written)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.sparse_calls = fail_at, 0

    def run_sparse(self, args, key, inputs):
        out = super().run_sparse(args, key, inputs)
        if inputs.idx is not None:
            self.sparse_calls += 1
            if self.sparse_calls - 1 == self.fail_at:
                self.calls.append(("raised", None, None))
                raise RuntimeError("out of memory (planted)")
        return out


def test_a_sparse_call_that_raises_leaves_a_correct_generation():
    """A cached call that computes tokens updates the K/V caches in place: when it raises, the
    error reaches the caller and the generation, noted and warned, computes every token from then
    on (never a cached call on caches that may be half written)."""
    cfg = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.5,), speculative_steps=0)
    ex = SparseRaising(fail_at=1)
    rt = SpecDiffRuntime(fake_plan(), cfg, ex)
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(0))
    sigmas = torch.linspace(1.0, 0.0, 9)
    i, raised = 0, 0
    with pytest.warns(RuntimeWarning, match="a cached call raised"):
        while i < 8:
            try:
                (v,) = rt(x, torch.full((B,), float(sigmas[i]) * 1000))
            except RuntimeError as e:
                assert "planted" in str(e)
                raised += 1
                continue  # the caller retries the same call
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            i += 1
    kinds = [k for k, _, _ in ex.calls]
    after = kinds[kinds.index("raised") + 1:]
    assert raised == 1 and after and all(k == "full" for k in after), kinds
    assert rt.branches[0].degraded and any("a cached call raised" in n for n in rt.report.notes)
    assert all(s.note.startswith("no caches") for s in rt.report.main_steps[-len(after):])


@pytest.mark.parametrize("blend", [False, True])
def test_a_sparse_call_reads_its_tier_counts_only_with_blended_tokens(blend, monkeypatch):
    """Without a blended tier a sparse call computes k tokens per sample and reuses the rest:
    its record says so without reading the tier tensor (on a GPU, a synchronisation per call).
    With blending the counts are read, and both ways agree with the tiers."""
    one_hot = torch.nn.functional.one_hot
    used = []

    def counting(*a, **k):
        used.append(1)
        return one_hot(*a, **k)

    monkeypatch.setattr(torch.nn.functional, "one_hot", counting)
    ex = FakeExecutor()
    rt = SpecDiffRuntime(fake_plan(), SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.99,),
                                                     speculative_steps=0, blend=blend, cache_ratio=0.75), ex)
    generate(rt, 6)
    cached = [s for s in rt.report.steps if s.kind == "cached"]
    assert cached and bool(used) is blend
    for s in cached:
        assert all(c == N // 4 for c in s.c1) and all(a + b == N - N // 4 for a, b in zip(s.c2, s.c3))
        assert blend or all(b == 0 for b in s.c3)
    counts = rt.report.computed_counts
    assert counts.shape == (B, N) and int(counts.sum()) == len(cached) * B * (N // 4)
