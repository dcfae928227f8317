"""A server's situations on tiny real models: generations interleaved step by step, started
apart, at two resolutions, in threads, on two models sharing one compiled graph, and real
pipelines sharing one compiled transformer from two threads. Every generation must equal
its alone-run and the FLOPs executed stay within 1.15x of the alone-runs' sum."""

import threading

import pytest
import torch

import specdiff_fx
from oracle import flux_inputs, sd3_inputs, tiny_flux, tiny_sd3
from pipelines import flux_call_kwargs, sd3_call_kwargs, tiny_flux_pipeline, tiny_sd3_pipeline
from inflight import interleave, run_together, total_flops

OPTIONS = {"inductor": False, "controller": "fixed", "warmup_steps": 2, "refresh_at": (0.6,)}
#: the default controller (errors measured per call, skipped calls, the hindsight correction)
ERROR_CONTROLLED = {"inductor": False, "tolerance": 0.3}
STEPS = 12


class CFGGeneration:
    """One SD3 generation with batched CFG (uncond + cond in one call), stepped by hand."""

    def __init__(self, model, seed, height=8, width=8, steps=STEPS, guidance=3.0):
        inputs = sd3_inputs(2, height, width, seed=seed)
        self.model, self.cond = model, {k: v for k, v in inputs.items() if k not in ("hidden_states", "timestep")}
        self.x = inputs["hidden_states"][:1].clone()
        self.sig = torch.linspace(1, 0, steps + 1)
        self.i, self.steps, self.guidance = 0, steps, guidance

    def step(self) -> bool:
        t = torch.full((2,), float(self.sig[self.i]) * 1000)
        with torch.no_grad():
            v = self.model(**self.cond, hidden_states=torch.cat([self.x, self.x]), timestep=t).sample
        v_u, v_c = v.chunk(2)
        self.x = self.x + (self.sig[self.i + 1] - self.sig[self.i]) * (v_u + self.guidance * (v_c - v_u))
        self.i += 1
        return self.i < self.steps

    def run(self):
        while self.step():
            pass
        return self.x


class TrueCFGGeneration:
    """One FLUX generation with true CFG (cond, then uncond: two calls per step), stepped by
    hand; ``noise``, ``prompt`` and ``negative`` seed the latent and the two conditionings."""

    def __init__(self, model, prompt, noise=0, negative=99, steps=STEPS, guidance=3.0):
        def conditioning(seed):
            return {k: v for k, v in flux_inputs(1, 4, 4, seed=seed).items() if k not in ("hidden_states", "timestep")}

        self.model, self.cond, self.neg = model, conditioning(prompt), conditioning(negative)
        self.x = flux_inputs(1, 4, 4, seed=noise)["hidden_states"].clone()
        self.sig = torch.linspace(1, 0, steps + 1)
        self.i, self.steps, self.guidance = 0, steps, guidance

    def step(self) -> bool:
        t = torch.full((1,), float(self.sig[self.i]))
        with torch.no_grad():
            v_c = self.model(**self.cond, hidden_states=self.x, timestep=t).sample
            v_u = self.model(**self.neg, hidden_states=self.x, timestep=t).sample
        self.x = self.x + (self.sig[self.i + 1] - self.sig[self.i]) * (v_u + self.guidance * (v_c - v_u))
        self.i += 1
        return self.i < self.steps


def compiled(model, options=OPTIONS):
    return torch.compile(model, backend="specdiff", options=options)


def alone_runs(cm, specs):
    outs, reports = [], []
    for spec in specs:
        with specdiff_fx.track() as tracked:
            outs.append(CFGGeneration(cm, **spec).run())
        reports.append(tracked.report)
    return outs, reports


@pytest.mark.parametrize("situation,options", [("alternating", OPTIONS), ("started_apart", OPTIONS),
                                               ("two_resolutions", OPTIONS), ("alternating", ERROR_CONTROLLED),
                                               ("started_apart", ERROR_CONTROLLED),
                                               ("same_noise_other_steps", ERROR_CONTROLLED),
                                               ("same_noise_other_guidance", ERROR_CONTROLLED)],
                         ids=["alternating", "started_apart", "two_resolutions", "alternating-error",
                              "started_apart-error", "same_noise_other_steps", "same_noise_other_guidance"])
def test_interleaved_generations_equal_each_alone(situation, options):
    """Generations stepped in turn give what each gives alone. The ``same_noise_*`` pairs (a
    preview and a final render of one request) share their first call, and each one's next
    latent is also a combination of the other's older outputs: routing must follow each
    trajectory by its newest call, not merge them."""
    specs = {"alternating": [dict(seed=1), dict(seed=2)],
             "started_apart": [dict(seed=1), dict(seed=2), dict(seed=3)],
             "two_resolutions": [dict(seed=1), dict(seed=2, width=12)],
             "same_noise_other_steps": [dict(seed=1, steps=20), dict(seed=1, steps=12)],
             "same_noise_other_guidance": [dict(seed=1, steps=20), dict(seed=1, steps=14, guidance=6.0)]}[situation]
    starts = [0, 4, 8] if situation == "started_apart" else None
    torch._dynamo.reset()
    cm = compiled(tiny_sd3(0), options)
    refs, ref_reports = alone_runs(cm, specs)
    with specdiff_fx.track() as tracked:
        outs = interleave([CFGGeneration(cm, **spec) for spec in specs], starts)
    assert len(tracked.reports) == len(specs)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert total_flops(tracked.reports) <= 1.15 * total_flops(ref_reports)
    assert all(r.count("cached") > 0 for r in tracked.reports)


def test_two_compiled_models_with_the_same_shapes_interleaved():
    """Two models of one architecture share one Dynamo graph (weights are graph inputs); their
    generations keep separate state."""
    torch._dynamo.reset()
    cms = [compiled(tiny_sd3(1)), compiled(tiny_sd3(2))]
    refs, ref_reports = [], []
    for cm in cms:
        out, rep = alone_runs(cm, [dict(seed=1)])
        refs += out
        ref_reports += rep
    with specdiff_fx.track() as tracked:
        outs = interleave([CFGGeneration(cm, seed=1) for cm in cms])
    assert len(tracked.reports) == 2
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert total_flops(tracked.reports) <= 1.15 * total_flops(ref_reports)


def test_threads_sharing_one_compiled_model():
    torch._dynamo.reset()
    cm = compiled(tiny_sd3(0))
    specs = [dict(seed=1), dict(seed=2), dict(seed=3)]
    refs, ref_reports = alone_runs(cm, specs)
    runs = run_together([lambda spec=spec: CFGGeneration(cm, **spec).run for spec in specs])
    for (out, _), ref in zip(runs, refs):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    assert total_flops([rep for _, rep in runs]) <= 1.15 * total_flops(ref_reports)


def test_threads_racing_the_first_compile_share_one_runtime():
    """Threads that call a freshly compiled model at once all miss Dynamo's cache, so Dynamo
    compiles the graph once per thread. Each copy was a runtime of its own, and later calls
    reached only the last: the other threads' generations started over midway (two
    generations, images not their alone-runs). An equal graph compiled again by the same backend
    now gets the runtime built for it."""
    torch._dynamo.reset()
    be = specdiff_fx.backend(**OPTIONS)
    cm = torch.compile(tiny_sd3(0), backend=be)
    specs = [dict(seed=1), dict(seed=2), dict(seed=3)]
    runs = run_together([lambda spec=spec: CFGGeneration(cm, **spec).run for spec in specs])
    assert len(be.runtimes) == 1
    specdiff_fx.reset()
    refs, _ = alone_runs(cm, specs)
    for (out, report), ref in zip(runs, refs):
        assert len(report.main_steps) == STEPS
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_calls_that_never_continue_do_not_evict_a_generation_under_way():
    """A pipeline that edits the latent between steps (inpainting) starts a generation per
    call; a burst of them between two steps of another request (more than ``max_generations``)
    evicts one another, not the generation under way: it equals its alone-run. (Before its
    second call a generation is one of those that ran once: it outlives up to
    ``max_generations - 1`` new ones, as under least-recently-used eviction alone.)"""
    torch._dynamo.reset()
    cm = compiled(tiny_sd3(0), ERROR_CONTROLLED)
    (ref,), _ = alone_runs(cm, [dict(seed=1)])
    specdiff_fx.reset()  # the alone-run's generation would hold a slot
    gen, burst = CFGGeneration(cm, seed=1), 0
    with specdiff_fx.track() as tracked:
        while gen.step():
            for _ in range(10 if gen.i >= 2 else 7):  # > max_generations (8) once under way: one-call generations
                burst += 1
                CFGGeneration(cm, seed=100 + burst).step()
    under_way = tracked.reports[0]
    assert len(under_way.main_steps) == STEPS and not any("evicted" in n for n in under_way.notes)
    torch.testing.assert_close(gen.x, ref, atol=1e-6, rtol=1e-5)


def test_requests_started_together_outlive_finished_generations():
    """Once finished generations fill the slots (a server's steady state), two new requests
    stepped in turn each evict a finished one, not the other's generation after its first call:
    each equals its alone-run. (Before, each first call evicted the other's one-call generation,
    so neither ever cached again: a full call and an eviction note per call.)"""
    torch._dynamo.reset()
    cm = compiled(tiny_sd3(0), {**ERROR_CONTROLLED, "max_generations": 4})
    specs = [dict(seed=1), dict(seed=2)]
    refs, _ = alone_runs(cm, specs)
    alone_runs(cm, [dict(seed=10 + i, steps=4) for i in range(4)])  # four finished generations fill the slots
    with specdiff_fx.track() as tracked:
        outs = interleave([CFGGeneration(cm, **spec) for spec in specs])
    assert [len(r.main_steps) for r in tracked.reports] == [STEPS, STEPS]
    assert not any("evicted" in n for r in tracked.reports for n in r.notes)
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_true_cfg_requests_from_one_noise_with_one_negative_prompt_never_mix():
    """Two true-CFG requests from the same noise with the same negative prompt, stepped in turn:
    the second's cond call joined the first's generation as a further branch (nothing tells it
    from a third guidance branch), and its uncond call is the first's again. Kept, that
    generation also explained the second request's next latents, and both requests' uncond calls
    ran in one branch (47 calls in one generation; the first image twice as far from eager as
    alone). The repeated call drops it: each request goes on in generations of its own, which
    never hold the other's prompt, restarted at their second step."""
    torch._dynamo.reset()
    model = tiny_flux(0)
    be = specdiff_fx.backend(**ERROR_CONTROLLED)
    cm = torch.compile(model, backend=be)
    eager = [TrueCFGGeneration(model, prompt) for prompt in (1, 2)]
    interleave(eager)
    refs = []
    for prompt in (1, 2):
        gen = TrueCFGGeneration(cm, prompt)
        interleave([gen])
        refs.append(gen.x)
    specdiff_fx.reset()
    with specdiff_fx.track() as tracked:
        outs = interleave([TrueCFGGeneration(cm, prompt) for prompt in (1, 2)])
    assert max(len(r.main_steps) for r in tracked.reports) <= 2 * STEPS
    assert any("another request from the same noise" in n for r in tracked.reports for n in r.notes)
    prompts = [TrueCFGGeneration(model, p).cond["encoder_hidden_states"] for p in (1, 2)]
    for gen in be.runtimes[-1].router.generations.values():
        held = [any(torch.equal(br.conditioning[i], p) for br in gen.branches for i in range(len(br.conditioning))
                    if isinstance(br.conditioning[i], torch.Tensor) and br.conditioning[i].shape == p.shape)
                for p in prompts]
        assert not all(held)
    for out, ref, e in zip(outs, refs, eager):  # a restart, not the alone-run's schedule: as close to eager
        assert (out - e.x).norm() <= 2 * (ref - e.x).norm()


def test_state_is_bounded_with_many_abandoned_generations():
    torch._dynamo.reset()
    model = tiny_sd3(0)
    cm = torch.compile(model, backend="specdiff", options={**OPTIONS, "max_generations": 4})
    for seed in range(10):  # 6 evicted (the eviction bookkeeping over 50: test_routing.py, fake executor)
        gen = CFGGeneration(cm, seed=seed)
        for _ in range(3):
            gen.step()
    rep = specdiff_fx.last_generation()
    assert rep.live_generations == 4 and 0 < rep.held_bytes
    # a generation holds its caches: 4 in flight hold about 4 times one
    with specdiff_fx.track() as tracked:
        gen = CFGGeneration(compiled(tiny_sd3(0)), seed=99)
        for _ in range(3):
            gen.step()
    assert rep.held_bytes <= 4.5 * tracked.report.held_bytes


@pytest.mark.parametrize("family", ["sd3", "flux_true_cfg"])
def test_two_pipelines_sharing_one_compiled_transformer_in_two_threads(family):
    """Two pipelines with one compiled transformer, each called from its own thread, strictly
    alternating step by step (step callbacks hand over): the images each gives alone."""
    make, call = {"sd3": (tiny_sd3_pipeline, sd3_call_kwargs),
                  "flux_true_cfg": (tiny_flux_pipeline, lambda **kw: flux_call_kwargs(
                      negative_prompt="blurry", true_cfg_scale=2.0, **kw))}[family]
    torch._dynamo.reset()
    first, second = make(), make()
    second.transformer = first.transformer = compiled(first.transformer)
    steps = 8
    prompts = ["a red circle", "a blue square on a green background"]
    alone = [first(**call(prompt=p, seed=j, num_inference_steps=steps)).images for j, p in enumerate(prompts)]
    turn = [threading.Event(), threading.Event()]
    order, results, errors = [], [None, None], []

    def handover(j):
        def callback(pipe, i, t, tensors):
            order.append(j)
            turn[1 - j].set()
            if i < steps - 1:
                turn[j].wait()
                turn[j].clear()
            return tensors
        return callback

    def work(j, pipe):
        try:
            turn[j].wait()
            turn[j].clear()
            with torch.no_grad():
                results[j] = pipe(**call(prompt=prompts[j], seed=j, num_inference_steps=steps,
                                         callback_on_step_end=handover(j))).images
            turn[1 - j].set()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            turn[1 - j].set()

    threads = [threading.Thread(target=work, args=(j, p)) for j, p in enumerate((first, second))]
    for t in threads:
        t.start()
    turn[0].set()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert order[:6] == [0, 1] * 3  # really interleaved
    for got, want in zip(results, alone):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
