"""specdiff inside real ``QwenImagePipeline`` (no CFG) and ``WanPipeline`` (CFG: cond and
uncond as two calls per step) built from tiny local components (``family_pipelines.py``)."""

import pytest
import torch

import specdiff_fx
from controller_checks import assert_error_controlled
from test_families import RANDOM_MODEL_OPTIONS
from family_pipelines import qwenimage_call_kwargs, tiny_qwenimage_pipeline, tiny_wan_pipeline, wan_call_kwargs

CASES = {  # make, call kwargs, transformer calls per step, image tokens (64: 8 x 8; 96: 3 frames x 4 x 8)
    "qwenimage": (tiny_qwenimage_pipeline, qwenimage_call_kwargs, 1, 64),
    "wan": (tiny_wan_pipeline, wan_call_kwargs, 2, 96),
}
_EAGER: dict = {}
STEPS = 10


def run_pipe(name, options=None, **call):
    make, kwargs, _, _ = CASES[name]
    pipe = make()
    if options is not None:
        torch._dynamo.reset()
        pipe.transformer = torch.compile(pipe.transformer, backend="specdiff", options=options)
    out = pipe(**kwargs(**call))
    return out.frames if name == "wan" else out.images


def eager(name, steps):
    if (name, steps) not in _EAGER:
        _EAGER[(name, steps)] = run_pipe(name, num_inference_steps=steps)
    return _EAGER[(name, steps)]


@pytest.mark.parametrize("name", list(CASES))
def test_cache_ratio_zero_equals_eager(name):
    out = run_pipe(name, {"cache_ratio": 0.0, "inductor": False}, num_inference_steps=STEPS)
    torch.testing.assert_close(out, eager(name, STEPS), atol=1e-5, rtol=1e-4)
    assert specdiff_fx.last_record().status == "plain" and specdiff_fx.last_record().family == name


@pytest.mark.parametrize("name", list(CASES))
def test_default_options_cache_tokens(name):
    steps = STEPS
    _, _, calls, n = CASES[name]
    out = run_pipe(name, {"inductor": False, **RANDOM_MODEL_OPTIONS.get(name, {})}, num_inference_steps=steps)
    rep = specdiff_fx.last_generation()
    assert specdiff_fx.last_record().status == "specdiff"
    assert rep.family == name and rep.num_image_tokens == n and rep.batch == 1
    assert len(rep.main_steps) == steps * calls
    cached = [s for s in rep.steps if s.kind == "cached"]
    k = specdiff_fx.SpecDiffConfig().num_computed(n)  # every call of a cached step, both CFG branches
    cfg = specdiff_fx.SpecDiffConfig()
    full = [s.step for s in rep.steps if s.kind == "full" and s.branch == 0]
    assert_error_controlled(rep, steps, late_phase=name != "wan")  # Wan samples with UniPC (multistep)
    skipped = [s for s in rep.steps if s.kind == "skipped"]  # after an interval's first sparse call
    assert cached and len(cached) + len(skipped) == (steps - len(full)) * calls and all(s.c1 == (k,) for s in cached)
    # Wan samples with UniPC, a multistep sampler: held to a tighter tolerance, it caches less
    multistep = [note for note in rep.notes if "multistep" in note]
    assert len(multistep) == (name == "wan")
    assert rep.flops_fraction < (0.95 if multistep else 0.8)
    ref = eager(name, steps)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert (out - ref).abs().max() < 0.25  # cached, not identical; close on a random tiny model


@pytest.mark.parametrize("negative", ["blurry", "a photo of a red dog"])
def test_qwenimage_true_cfg_rescaled_per_token(negative):
    """``QwenImagePipeline``'s true CFG (a negative prompt, ``true_cfg_scale`` > 1) rescales the
    guided velocity per token to the cond output's norm, which no combination of whole outputs
    gives: routing explains it token by token. A negative prompt of another length than the
    prompt's is another graph (the cond and uncond calls in two runtimes, each the other's
    companion, linked to share their decisions; Dynamo's first graph, replaced by a dynamic one at
    step 1, keeps step 0 alone); one of the same length is a second branch of one generation.
    Either way every graph's calls after that are one generation, which caches."""
    call = dict(num_inference_steps=STEPS, true_cfg_scale=4.0, negative_prompt=negative)
    ref = run_pipe("qwenimage", **call)
    with specdiff_fx.track() as tracked:
        out = run_pipe("qwenimage", {"inductor": False}, **call)
    reports = tracked.reports
    assert sum(len(r.main_steps) for r in reports) == 2 * STEPS
    long = [r for r in reports if len(r.main_steps) > 1]
    assert len(reports) - len(long) <= 1 and len(long) == (2 if negative == "blurry" else 1)
    for rep in long:
        assert len({s.branch for s in rep.steps}) == 3 - len(long)
        assert rep.count("cached") > 0 and rep.flops_fraction < 0.8
    if len(long) == 2:  # two graphs: linked once both ran on the same latents twice, then one decision per step
        kinds = [{s.sigma: s.kind for s in rep.main_steps} for rep in long]
        shared = sorted(set(kinds[0]) & set(kinds[1]), reverse=True)[2:]
        assert len(shared) >= STEPS - 4 and all(kinds[0][s] == kinds[1][s] for s in shared)
    assert (out - ref).abs().max() < 0.25


def test_wan_request_sent_again_after_an_interrupt_equals_its_alone_run():
    """A Wan request interrupted after four steps (``pipe._interrupt`` in a step callback), then
    sent again: UniPC combines the last two calls' outputs, and the uncond call of a step is
    tested after the cond call moved on. Its span lacked the cond output two sigmas back, which
    the interrupted generation still held: the uncond calls went over to it, and the request
    split into one generation per step from there (every call full). Routing now keeps that
    output for the other branches' tests: one generation, equal to the alone-run."""
    make, kwargs, _, _ = CASES["wan"]
    pipe = make()
    torch._dynamo.reset()
    pipe.transformer = torch.compile(pipe.transformer, backend="specdiff",
                                     options={"inductor": False, "tolerance": 0.3})
    specdiff_fx.reset()
    alone = pipe(**kwargs(num_inference_steps=STEPS)).frames
    specdiff_fx.reset()

    def interrupt(p, i, t, kw):
        if i == 3:
            p._interrupt = True
        return {}

    pipe(**kwargs(num_inference_steps=STEPS), callback_on_step_end=interrupt)
    with specdiff_fx.track() as tracked:
        again = pipe(**kwargs(num_inference_steps=STEPS)).frames
    assert [len(r.main_steps) for r in tracked.reports] == [2 * STEPS]
    torch.testing.assert_close(again, alone, rtol=0, atol=0)
