"""Many generations in flight: call routing by model, conditioning, sigma and latent update;
bounded state; per-generation telemetry; threads. A fake executor (velocity = cond - x)
here; the tiny real models and pipelines in test_serving.py."""

from dataclasses import replace

import pytest
import torch

import specdiff_fx
from specdiff_fx import SpecDiffConfig
from specdiff_fx.runtime import SpecDiffRuntime
from specdiff_fx.runtime.routing import Branch, Generation, companion_columns, unexplained
from specdiff_fx.telemetry import GenerationReport
from test_runtime import B, C, N, FakeExecutor, TextExecutor, fake_plan
from inflight import interleave, run_together, total_flops

CFG = SpecDiffConfig(controller="fixed", warmup_steps=2, refresh_at=(0.5,), speculative_steps=2)


def plan(weight=False):
    return replace(fake_plan(), condition_inputs=(2,), weight_input=3 if weight else None)


class CondExecutor(FakeExecutor):
    """Velocity = cond - x: the conditioning input changes the output."""

    def run_full(self, args):
        x, t, cond = args[:3]
        return super().run_full((x - cond, t))

    def run_sparse(self, args, key, inputs):
        x, t, cond = args[:3]
        return super().run_sparse((x - cond, t), key, inputs)


class Gen:
    """One generation driven step by step: Euler on a fixed sigma grid, optionally true CFG
    (two calls per step: cond, then uncond)."""

    def __init__(self, rt, seed, cond=0.0, steps=10, weight=None, true_cfg=False, start=1.0):
        g = torch.Generator().manual_seed(seed)
        self.rt, self.x = rt, torch.randn(B, N, C, generator=g)
        self.cond = torch.full((B, N, C), float(cond))
        self.sig = torch.linspace(start, 0, steps + 1)
        self.i, self.steps, self.weight, self.true_cfg = 0, steps, weight, true_cfg

    def _call(self, cond):
        t = torch.full((B,), float(self.sig[self.i]) * 1000)
        args = (self.x, t, cond) + ((self.weight,) if self.weight is not None else ())
        return self.rt(*args)[0]

    def step(self):
        v = self._call(self.cond)
        if self.true_cfg:
            v_neg = self._call(torch.zeros_like(self.cond))
            v = v_neg + 3.0 * (v - v_neg)
        self.x = self.x + (self.sig[self.i + 1] - self.sig[self.i]) * v
        self.i += 1
        return self.i < self.steps

    def run(self):
        while self.step():
            pass
        return self.x


def runtime(weight=False, **options):
    return SpecDiffRuntime(plan(weight), CFG.replace(**options), CondExecutor())


def alone(reuse_extrapolation=None, **kw):
    """A generation's result and FLOPs, run alone on a fresh runtime (``reuse_extrapolation``:
    ``CFG``'s unless given)."""
    options = {} if reuse_extrapolation is None else {"reuse_extrapolation": reuse_extrapolation}
    rt = runtime(weight=kw.get("weight") is not None, **options)
    out = Gen(rt, **kw).run()
    return out, sum(s.flops for s in rt.report.steps)


@pytest.mark.parametrize("same_prompt", [True, False])
def test_two_generations_alternating_equal_each_alone(same_prompt):
    kws = [dict(seed=1, cond=0.5), dict(seed=2, cond=0.5 if same_prompt else -0.5)]
    refs = [alone(**kw) for kw in kws]
    rt = runtime()
    with specdiff_fx.track() as tracked:
        outs = interleave([Gen(rt, **kw) for kw in kws])
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    assert len(tracked.reports) == 2
    assert total_flops(tracked.reports) <= 1.15 * sum(f for _, f in refs)
    assert [r.count("speculative") for r in tracked.reports] == [1, 1]


def test_three_generations_started_apart():
    kws = [dict(seed=s, cond=0.3) for s in (1, 2, 3)]
    refs = [alone(**kw) for kw in kws]
    rt = runtime()
    with specdiff_fx.track() as tracked:
        outs = interleave([Gen(rt, **kw) for kw in kws], starts=[0, 4, 8])
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    assert total_flops(tracked.reports) <= 1.15 * sum(f for _, f in refs)


@pytest.mark.parametrize("lam", [0.0, 0.5])
def test_same_seed_other_prompt_is_another_generation(lam):
    """Two requests from the same noise at the same time look like true CFG's cond and uncond
    until their second calls: each still samples as it would alone, also where being guided
    changes what a reused token gets (``reuse_extrapolation``)."""
    kws = [dict(seed=1, cond=0.5), dict(seed=1, cond=-0.5)]
    refs = [alone(reuse_extrapolation=lam, **kw) for kw in kws]
    rt = runtime(reuse_extrapolation=lam)
    outs = interleave([Gen(rt, **kw) for kw in kws])
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    if lam:  # the reach moved the images: the comparison above could fail
        assert not torch.allclose(refs[0][0], alone(reuse_extrapolation=0.0, **kws[0])[0])


@pytest.mark.parametrize("true_cfg", [False, True])
def test_the_same_request_twice_at_once_is_two_generations(true_cfg):
    """The same request twice in flight (same noise, same prompt), interleaved call by call: not
    true CFG's two branches of one guided generation (whose reused tokens would stay as they are,
    ``reuse_extrapolation`` off) but two generations, each sampling as it would alone."""
    kw = dict(seed=1, cond=0.5, true_cfg=true_cfg)
    ref, flops = alone(reuse_extrapolation=0.5, **kw)
    if not true_cfg:  # the reach moves the image: were the two guided, the comparison below would fail
        assert not torch.allclose(ref, alone(reuse_extrapolation=0.0, **kw)[0])
    rt = runtime(reuse_extrapolation=0.5)
    with specdiff_fx.track() as tracked:
        outs = interleave([Gen(rt, **kw), Gen(rt, **kw)])
    for out in outs:
        torch.testing.assert_close(out, ref)
    assert len(tracked.reports) == 2
    assert [len(r.main_steps) for r in tracked.reports] == [10 * (1 + true_cfg)] * 2
    assert total_flops(tracked.reports) <= 1.15 * 2 * flops


@pytest.mark.parametrize("stopped_after", [1, 4])
def test_a_request_retried_after_it_was_abandoned_gets_a_generation_of_its_own(stopped_after):
    """A request abandoned after some steps and then sent again (the same noise and prompt): the
    retry is a generation of its own from its first call to its last, as it would be alone, and
    the abandoned one is not continued."""
    kw = dict(seed=1, cond=0.5)
    ref, flops = alone(reuse_extrapolation=0.5, **kw)
    rt = runtime(reuse_extrapolation=0.5)
    first = Gen(rt, **kw)
    for _ in range(stopped_after):
        first.step()
    with specdiff_fx.track() as tracked:
        out = Gen(rt, **kw).run()
    torch.testing.assert_close(out, ref)
    assert len(tracked.reports) == 1 and len(tracked.reports[0].main_steps) == 10
    assert sum(s.flops for s in tracked.reports[0].steps) == flops


class FailingExecutor(CondExecutor):
    """Raises once, at its ``fail_at``-th call of a full step (counted from 0)."""

    def __init__(self, fail_at):
        super().__init__()
        self.fail_at, self.full_calls = fail_at, 0

    def run_full(self, args):
        self.full_calls += 1
        if self.full_calls - 1 == self.fail_at:
            raise RuntimeError("out of memory (planted)")
        return super().run_full(args)


def test_a_request_retried_after_a_call_raised_does_not_inherit_the_failed_generation():
    """A full call raises mid-way (its generation then computes every token from then on); the
    request sent again continues its own generation past the step where the failed one stopped:
    the same images and FLOPs as alone, none of the failed generation's notes."""
    kw = dict(seed=1, cond=0.5)
    ref, flops = alone(**kw)
    probe = runtime()
    Gen(probe, **kw).run()
    kinds = [s.kind for s in probe.report.main_steps]
    fail_at = [i for i, k in enumerate(kinds) if k == "full"].index(
        next(i for i in range(2, len(kinds)) if kinds[i] == "full" and kinds[i - 1] != "full"))
    rt = SpecDiffRuntime(plan(), CFG, FailingExecutor(fail_at + CFG.speculative_steps - 1))
    with pytest.raises(RuntimeError, match="planted"), pytest.warns(RuntimeWarning, match="a full call raised"):
        Gen(rt, **kw).run()
    with specdiff_fx.track() as tracked:
        out = Gen(rt, **kw).run()
    torch.testing.assert_close(out, ref)
    (report,) = tracked.reports
    assert len(report.main_steps) == 10 and sum(s.flops for s in report.steps) == flops
    assert not report.notes


def test_true_cfg_stays_guided_with_reuse_extrapolation():
    """Under true CFG (two calls per step on one latent) reused tokens stay as they are, alone
    and interleaved with another generation."""
    kws = [dict(seed=1, cond=0.5, true_cfg=True), dict(seed=2, cond=0.5, true_cfg=True)]
    plain = [alone(reuse_extrapolation=0.0, **kw)[0] for kw in kws]
    refs = [alone(reuse_extrapolation=0.5, **kw)[0] for kw in kws]
    for ref, p in zip(refs, plain):
        torch.testing.assert_close(ref, p, rtol=0, atol=0)
    rt = runtime(reuse_extrapolation=0.5)
    outs = interleave([Gen(rt, **kw) for kw in kws])
    for out, p in zip(outs, plain):
        torch.testing.assert_close(out, p, rtol=0, atol=0)


def test_two_models_sharing_one_graph_keep_separate_state():
    """Same graph (weights are inputs), same prompt and seed: the weights tell them apart."""
    w1, w2 = torch.zeros(3), torch.ones(3)
    refs = [alone(seed=1, cond=0.5, weight=w) for w in (w1, w2)]
    rt = runtime(weight=True)
    with specdiff_fx.track() as tracked:
        outs = interleave([Gen(rt, seed=1, cond=0.5, weight=w) for w in (w1, w2)])
    assert len(tracked.reports) == 2
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)


def test_true_cfg_generations_interleaved():
    """Two calls per step (cond, uncond) are two branches of one generation, also when two
    such generations alternate."""
    kws = [dict(seed=1, cond=0.5, true_cfg=True), dict(seed=2, cond=0.5, true_cfg=True)]
    refs = [alone(**kw) for kw in kws]
    rt = runtime()
    with specdiff_fx.track() as tracked:
        outs = interleave([Gen(rt, **kw) for kw in kws])
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    assert len(tracked.reports) == 2
    for rep in tracked.reports:
        assert {s.branch for s in rep.steps} == {0, 1} and rep.count("speculative") == 2
        assert rep.context_cached is False  # the fake model has no text tokens
    assert total_flops(tracked.reports) <= 1.15 * sum(f for _, f in refs)


@pytest.mark.parametrize("case", ["same latent", "other latent", "other model"])
def test_a_second_graph_of_the_model_on_the_same_latent(case):
    """Skip-layer guidance: on some steps the sampler calls the model a second time through
    another compiled graph (another runtime) on the same latent and adds what it returns. Each
    runtime keeps its one generation; the other runtime's outputs explain the update only when
    called on this latent, at this sigma, by this model."""
    w = torch.zeros(3)
    main, aux = runtime(weight=True), runtime(weight=True)
    x = torch.randn(B, N, C, generator=torch.Generator().manual_seed(1))
    cond, sig = torch.full((B, N, C), 0.5), torch.linspace(1, 0, 11)
    cond_aux = torch.randn(B, N, C, generator=torch.Generator().manual_seed(2))  # outside main's span
    with specdiff_fx.track() as tracked:
        for i in range(10):
            t = torch.full((B,), float(sig[i]) * 1000)
            v = main(x, t, cond, w)[0]
            if 1 <= i < 5:
                x_aux = x if case != "other latent" else x + 0.01
                w_aux = w if case != "other model" else torch.ones(3)
                v = v + 2.0 * (v - aux(x_aux, t, cond_aux, w_aux)[0])
            x = x + (sig[i + 1] - sig[i]) * v
    mains = [r for r in tracked.reports if any(s.sigma < 0.5 for s in r.main_steps)]
    if case == "same latent":
        assert len(tracked.reports) == 2 and len(mains) == 1
        assert len(mains[0].main_steps) == 10 and mains[0].count("cached") > 0
        assert [s.step for s in tracked.reports[1].main_steps] == [0, 1, 2, 3]
    else:  # the added output is nobody's this runtime may use: the main run starts over
        assert len(tracked.reports) > 2 and all(len(r.main_steps) < 10 for r in mains)


def test_companion_columns_align_rows_by_latent():
    x = torch.randn(1, 4, 2)
    pair = torch.cat([x, x])  # the halves of a batched CFG call on x
    out2, out1 = torch.randn(2, 4, 2), torch.randn(1, 4, 2)
    # one latent, a call with two rows on it: two columns, one per row
    cols = companion_columns(x, [(pair, out2)])
    assert len(cols) == 2 and torch.equal(cols[0], out2[:1]) and torch.equal(cols[1], out2[1:])
    # two equal rows, a call on one of them: one column, in both rows
    cols = companion_columns(pair, [(x, out1)])
    assert len(cols) == 1 and torch.equal(cols[0], torch.cat([out1, out1]))
    # rows that differ: only the matching row gets the output, the other a zero column
    mixed = torch.cat([x, x + 1])
    (col,) = companion_columns(mixed, [(x, out1)])
    assert torch.equal(col[0], out1[0]) and not col[1].any()
    # another latent, another shape, another dtype: nothing
    assert companion_columns(x, [(x + 1e-3, out1)]) == []
    assert companion_columns(x, [(torch.randn(1, 5, 2), torch.randn(1, 5, 2))]) == []
    assert companion_columns(x, [(x.double(), out1.double())]) == []


def test_a_latent_no_generation_explains_starts_a_new_one():
    """Same prompt, lower sigma, but the latent is not a sampler update of any live
    generation's (an abandoned generation, then a new one started below its sigma)."""
    rt = runtime()
    g = Gen(rt, seed=1, cond=0.5)
    for _ in range(3):
        g.step()
    first = rt.report
    h = Gen(rt, seed=5, cond=0.5, start=0.6)  # starts below the first one's sigma
    h.step()
    assert rt.report is not first and rt.report.steps[0].step == 0 and rt.report.steps[0].kind == "full"
    g.step()  # and the first one continues where it was
    assert rt.report is first and first.main_steps[-1].step == 3


def test_state_stays_bounded_with_many_abandoned_generations():
    rt = runtime(max_generations=4)
    reports = []
    for seed in range(50):
        g = Gen(rt, seed=seed, cond=0.5)
        for _ in range(3):
            g.step()
        reports.append(rt.report)
    assert len(rt.router.generations) == 4 and rt.router.evicted == 46
    assert rt.report.live_generations == 4
    per_generation = rt.router.generations[rt.report.id].held_bytes
    assert 0 < rt.report.held_bytes <= 4 * per_generation * 1.01
    assert any("evicted" in n for n in reports[0].notes) and not any("evicted" in n for n in reports[-1].notes)
    # an evicted generation's next call starts over (a full step) instead of failing
    g_old = reports[0]
    assert g_old.id not in rt.router.generations


def test_threads_each_with_its_generation_equal_alone():
    kws = [dict(seed=s, cond=c) for s, c in ((1, 0.5), (2, 0.5), (3, -0.2))]
    refs = [alone(**kw) for kw in kws]
    rt = runtime()
    runs = run_together([lambda kw=kw: Gen(rt, **kw).run for kw in kws])
    for (out, rep), (ref, flops) in zip(runs, refs):
        torch.testing.assert_close(out, ref)
        assert sum(s.flops for s in rep.steps) == flops


def test_span_test_explains_sampler_updates_only():
    rt = runtime()
    g = Gen(rt, seed=1, cond=0.5)
    g.step()
    g.step()
    gen = rt.generation
    br = gen.branches[0]
    v = br.trace.outputs[0]
    x_last = br.trace.samples[0]
    assert unexplained(x_last - 0.07 * v, gen, br, None) < 1e-6  # Euler
    assert unexplained(x_last - 0.07 * v + 0.01 * br.trace.outputs[1], gen, br, None) < 1e-6  # multistep
    assert unexplained(torch.randn(B, N, C), gen, br, None) > 0.5  # another latent
    assert unexplained(x_last, gen, br, None) == 0.0  # did not move: a zero update
    for dt in (1e-3, 1e-4):  # the last, short steps: float32 arithmetic still sees a continuation
        assert unexplained(x_last - dt * v, gen, br, None) < 1e-3
    # bf16 latents: the dtype's rounding is allowed on top
    xb = (x_last - 0.01 * v).to(torch.bfloat16)
    empty = Generation(None, GenerationReport("f", N, B, 0.9, 1))
    empty.branches.append(Branch((), br.state, trace=br.trace))
    assert unexplained(xb, empty, empty.branches[0], None) < 0.05


def _unexplained_one_by_one(sample, gen, br, groups):
    """The span test written per sample, plainly (least squares): the reference for the batched one."""
    b = sample.shape[0]
    lat = [t.reshape(b, -1).double() for t in br.trace.samples]
    outs = [o.reshape(b, -1).double() for other in gen.branches for s in br.trace.sigmas
            for o in [other.trace.output_at(s)] if o is not None]
    group_of = groups.tolist() if groups is not None else list(range(b))
    worst = 0.0
    for i in range(b):
        cols = [x[i] for x in lat] + [o[j] for o in outs for j in range(b) if group_of[j] == group_of[i]]
        a = torch.stack(cols, dim=1)
        d = sample.reshape(b, -1)[i].double() - lat[0][i]
        if float(d.norm()) == 0.0:
            continue
        coef = torch.linalg.lstsq(a, d.unsqueeze(1), driver="gelsd").solution  # SVD-based: any rank
        slack = 2 * torch.finfo(sample.dtype).eps * float(sample[i].double().norm())  # the latent's rounding
        worst = max(worst, max(0.0, float((d - (a @ coef).squeeze(1)).norm()) - slack) / float(d.norm()))
    return worst


def test_span_test_batches_samples_with_groups_of_different_sizes():
    """Samples 0 and 1 are the halves of one CFG image, 2 and 3 single images: the batched span
    test gives the per-sample answer, continuation or not, whatever the group sizes (and the
    second half, answered by its twin while their latents are equal, is checked again once they
    differ)."""
    torch.manual_seed(0)
    b, n, c = 4, 12, 3
    groups = torch.tensor([0, 0, 2, 3])
    x_prev, x_last = torch.randn(b, n, c), torch.randn(b, n, c)
    x_prev[1], x_last[1] = x_prev[0], x_last[0]  # the CFG halves move as one latent
    out_prev, out_last = torch.randn(b, n, c), torch.randn(b, n, c)
    br = Branch((), None)
    br.trace.push(0.8, x_prev, out_prev)
    br.trace.push(0.7, x_last, out_last)
    gen = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=[br])
    guided = out_last[0] + 4.0 * (out_last[1] - out_last[0])  # what a CFG sampler steps with
    step = torch.stack([guided, guided, out_last[2], out_last[3] - 0.3 * out_prev[3]])  # Euler; one multistep
    cont = x_last - 0.05 * step
    other = torch.randn(b, n, c)
    half = cont.clone()
    half[2] = other[2]  # one sample of the batch is not a continuation: the batch is not one
    split = cont.clone()
    split[1] = other[1]  # one CFG half moved elsewhere: not the answer of its twin
    for sample, low in ((cont, True), (other, False), (half, False), (split, False)):
        got, ref = unexplained(sample, gen, br, groups), _unexplained_one_by_one(sample, gen, br, groups)
        assert abs(got - ref) < 1e-6, (got, ref)  # float32 against float64 least squares
        assert (got < 1e-6) if low else (got > 0.3)
    # without groups each half may use only its own outputs: the guided update is not explained
    assert unexplained(cont, gen, br, None) > 0.05
    # float64 latents are tested in float64
    for sample in (cont.double(), other.double()):
        assert abs(unexplained(sample, gen, br, groups) - _unexplained_one_by_one(sample, gen, br, groups)) < 1e-12


def test_span_test_with_dependent_columns_and_non_finite_values():
    """Columns that depend on each other (the two CFG halves' outputs equal, a latent that did
    not move) still recognise a continuation; NaN or Inf in a latent or an output matches
    nothing (inf), whichever group it is in."""
    torch.manual_seed(0)
    b, n, c = 4, 12, 3
    groups = torch.tensor([0, 0, 2, 3])
    x_last = torch.randn(b, n, c)
    x_last[1] = x_last[0]
    out_last = torch.randn(b, n, c)
    out_last[1] = out_last[0]  # guidance changes nothing: the halves' outputs are one column twice
    br = Branch((), None)
    br.trace.push(0.8, x_last, out_last)  # x_prev = x_last: the latent did not move between
    br.trace.push(0.7, x_last, out_last)
    gen = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=[br])
    cont = x_last - 0.05 * out_last
    assert unexplained(cont, gen, br, groups) < 1e-6
    assert abs(unexplained(cont, gen, br, groups) - _unexplained_one_by_one(cont, gen, br, groups)) < 1e-6
    assert unexplained(torch.randn(b, n, c), gen, br, groups) > 0.3
    for bad in (float("nan"), float("inf")):
        for j in (0, 3):  # a sample of the CFG group, a single one
            x = cont.clone()
            x[j, 0, 0] = bad
            assert unexplained(x, gen, br, groups) == float("inf")
            out = out_last.clone()
            out[j, 1, 1] = bad
            br2 = Branch((), None)
            br2.trace.push(0.7, x_last, out)
            gen2 = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=[br2])
            assert unexplained(cont, gen2, br2, groups) == float("inf")


def test_span_test_with_fewer_latent_entries_than_columns():
    """A latent of fewer entries per sample than the span test has columns (the QR's R has no
    entry for the update then): the explicit projection gives the per-sample answer."""
    torch.manual_seed(0)
    b, n, c = 3, 1, 2  # 2 entries per sample; x_last, x_prev and two outputs: 4 columns
    br = Branch((), None)
    br.trace.push(0.8, torch.randn(b, n, c), torch.randn(b, n, c))
    br.trace.push(0.7, torch.randn(b, n, c), torch.randn(b, n, c))
    gen = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=[br])
    for sample in (br.trace.samples[0] - 0.05 * br.trace.outputs[0], torch.randn(b, n, c)):
        got, ref = unexplained(sample, gen, br, None), _unexplained_one_by_one(sample, gen, br, None)
        assert abs(got - ref) < 1e-5, (got, ref)


@pytest.mark.parametrize("layout", ["packed", "channels first"])
def test_span_test_token_by_token_explains_a_per_token_rescale(layout):
    """Qwen-Image's true CFG gives each token of the guided velocity the cond output's norm: no
    combination of whole outputs explains that update, token by token it is; another latent
    stays unexplained either way, and a token with too few channels for its columns is not
    tested (``inf``)."""
    torch.manual_seed(0)
    b, n, c = 2, 30, 16
    shape, dim = ((b, n, c), -1) if layout == "packed" else ((b, c, 5, 6), 1)
    x_last, cond, uncond = torch.randn(shape), torch.randn(shape), torch.randn(shape)
    branches = [Branch((), None), Branch((), None)]
    for br, out in zip(branches, (cond, uncond)):
        br.trace.push(0.8, x_last, out)
    gen = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=branches)
    comb = uncond + 4.0 * (cond - uncond)
    cont = x_last - 0.05 * comb * (cond.norm(dim=dim, keepdim=True) / comb.norm(dim=dim, keepdim=True))
    br = branches[0]
    assert unexplained(x_last - 0.05 * comb, gen, br, None) < 1e-6  # plain true CFG: whole outputs do
    assert unexplained(cont, gen, br, None) > 0.05
    assert unexplained(cont, gen, br, None, per_token=True) < 1e-5
    assert unexplained(torch.randn(shape), gen, br, None, per_token=True) > 0.5
    # 3 columns (x_last, two outputs) need 6 channels per token: with 4 the test is not made
    few = (lambda t: t[..., :4]) if layout == "packed" else (lambda t: t[:, :4])
    small = [Branch((), None), Branch((), None)]
    for sb, out in zip(small, (cond, uncond)):
        sb.trace.push(0.8, few(x_last), few(out))
    gen4 = Generation(None, GenerationReport("f", n, b, 0.9, 1), branches=small)
    assert unexplained(few(cont), gen4, small[0], None, per_token=True) == float("inf")


def test_a_latent_rescaled_per_token_at_the_same_sigma_is_another_request():
    """The token-by-token span test is for a sampler's step to a lower sigma. At the same sigma
    another request whose latent is this one's rescaled per token (an edit whose reference image
    is the other's, scaled or blanked: FLUX Kontext carries it in the latent) was taken for a
    further call of this generation (a second-order sampler's) and read its caches."""
    from specdiff_fx.runtime.routing import Router
    from specdiff_fx.runtime.state import BranchState

    torch.manual_seed(0)
    b, n, c = 1, 30, 16
    x, out, cond = torch.randn(b, n, c), torch.randn(b, n, c), (torch.ones(3),)
    router = Router(8)
    gen = Generation(None, GenerationReport("f", n, b, 0.9, 1))
    gen.branches.append(Branch(cond, BranchState(extrapolate=True)))
    gen.branches[0].trace.push(0.8, x, out)
    router.add(gen)
    scaled = x * torch.rand(b, n, 1)
    assert router.route(None, cond, 0.8, scaled) is None
    rescaled = x - 0.1 * out * torch.rand(b, n, 1)  # a step whose velocity is rescaled per token
    assert router.route(None, cond, 0.7, rescaled) == (gen, 0)


class TwoGraphGen(Gen):
    """True CFG whose uncond call runs through another runtime (another graph of the same model:
    a negative prompt of another token length)."""

    def __init__(self, rt, rt_uncond, **kw):
        super().__init__(rt, true_cfg=True, **kw)
        self.rt_uncond = rt_uncond

    def step(self):
        t = torch.full((B,), float(self.sig[self.i]) * 1000)
        w = (self.weight,) if self.weight is not None else ()
        v = self.rt(self.x, t, self.cond, *w)[0]
        v_neg = self.rt_uncond(self.x, t, torch.zeros_like(self.cond), *w)[0]
        self.x = self.x + (self.sig[self.i + 1] - self.sig[self.i]) * (v_neg + 3.0 * (v - v_neg))
        self.i += 1
        return self.i < self.steps


@pytest.mark.parametrize("warmup", [2, 1])  # 1: the step the link is made at is already cached
def test_true_cfg_across_two_graphs_links_and_equals_one_graph(warmup):
    """cond in one runtime, uncond in another, on the same latents: after two steps the branches
    are linked and share every decision and token choice, as the two branches of one runtime do:
    the same image, the same calls."""
    w = torch.zeros(3)
    one = runtime(weight=True, warmup_steps=warmup)
    ref = Gen(one, seed=1, cond=0.5, true_cfg=True, weight=w).run()
    ref_flops = sum(s.flops for s in one.report.steps)
    rt_a, rt_b = runtime(weight=True, warmup_steps=warmup), runtime(weight=True, warmup_steps=warmup)
    with specdiff_fx.track() as tracked:
        out = TwoGraphGen(rt_a, rt_b, seed=1, cond=0.5, weight=w).run()
    torch.testing.assert_close(out, ref)
    assert len(tracked.reports) == 2 and total_flops(tracked.reports) == ref_flops
    kinds = [[(s.step, s.kind) for s in r.main_steps] for r in tracked.reports]
    assert kinds[0] == kinds[1] and any(k == "cached" for _, k in kinds[0])
    sparse = [[c for c in ex.calls if c[0] == "sparse"] for ex in (rt_a.executor, rt_b.executor)]
    assert sparse[0] and all(a[1] == b[1] and torch.equal(a[2], b[2]) for a, b in zip(*sparse))
    assert rt_a.generation.branches[0].link is rt_b.generation.branches[0].link is not None


class CondTextExecutor(CondExecutor, TextExecutor):
    """:class:`CondExecutor` of a model with text tokens (:class:`TextExecutor`: full calls
    return text K/V, cached calls record their variant keys)."""


def test_two_graphs_of_one_guided_velocity_count_as_guided():
    """Linked branches in two runtimes are the cond and uncond of one guided velocity: where the
    graph supports no text subset, a ``context_ratio`` between 0 and 1 computes every context
    token on cached steps under guidance, in each runtime as in one runtime with two branches,
    and the two graphs give that runtime's image (each alone would count as unguided and cache
    them all)."""
    from specdiff_fx.runtime.context import ContextMode
    refused = replace(plan(weight=True), text_subset_error="cross-attention")
    options = CFG.replace(context_ratio=0.5, warmup_steps=3)
    w = torch.zeros(3)
    one = SpecDiffRuntime(refused, options, CondTextExecutor())
    ref = Gen(one, seed=1, cond=0.5, true_cfg=True, weight=w).run()
    rts = [SpecDiffRuntime(refused, options, CondTextExecutor()) for _ in range(2)]
    out = TwoGraphGen(*rts, seed=1, cond=0.5, weight=w).run()
    torch.testing.assert_close(out, ref)
    assert rts[0].generation.branches[0].link is not None
    for rt in (one, *rts):
        assert rt.executor.keys and {k.context for k in rt.executor.keys} == {ContextMode.COMPUTE}
        assert any("cached steps compute (classifier-free guidance) all of them" in n for n in rt.report.notes)


def test_two_requests_from_the_same_noise_in_two_graphs_stay_apart():
    """Two requests in two runtimes of one model, started from the same noise at the same time
    with other prompts: equal latents at their first step only, so they are never linked."""
    w = torch.zeros(3)
    refs = [alone(seed=1, cond=c, weight=w) for c in (0.5, -0.5)]
    rts = [runtime(weight=True), runtime(weight=True)]
    outs = interleave([Gen(rt, seed=1, cond=c, weight=w) for rt, c in zip(rts, (0.5, -0.5))])
    for out, (ref, _) in zip(outs, refs):
        torch.testing.assert_close(out, ref)
    assert all(b.link is None for rt in rts for b in rt.generation.branches)


def test_the_same_request_again_is_not_linked_to_its_finished_run_in_another_graph():
    """A request run to its end in one runtime of a model and then again in another (two graphs of
    one model), or a two-graph true-CFG request run twice: the later run's calls repeat the earlier
    run's latents, but the earlier run's branches ran before them, so nothing is linked and each
    run samples as it did alone."""
    w = torch.zeros(3)
    ref, flops = alone(seed=1, cond=0.5, weight=w)
    rts = [runtime(weight=True), runtime(weight=True)]
    for rt in rts:
        torch.testing.assert_close(Gen(rt, seed=1, cond=0.5, weight=w).run(), ref)
        assert sum(s.flops for s in rt.report.steps) == flops
    assert all(b.link is None for rt in rts for g in rt.router.generations.values() for b in g.branches)
    rt_a, rt_b = runtime(weight=True), runtime(weight=True)
    runs = []
    for _ in range(2):
        with specdiff_fx.track() as tracked:
            runs.append((TwoGraphGen(rt_a, rt_b, seed=1, cond=0.5, weight=w).run(), total_flops(tracked.reports)))
        assert len(tracked.reports) == 2
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=0, atol=0)
    assert runs[1][1] == runs[0][1]
